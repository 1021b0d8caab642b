"""S6 selective SSM (Mamba, arXiv 2312.00752; DSF baseline, arXiv 2405.15731): chunked == per-channel
token loop == decoding, chunk independence, the A = 0 identity, Mamba's initialisation, linear cost.

Tolerances: float64 ~1e-13.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.mechanisms.linear.s6 import S6

from .test_scan import assert_linear

F64 = torch.float64
TOL = 1e-12


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


def build(**kw) -> S6:
    torch.manual_seed(0)
    return az.create("s6", 16, 2, causal=True, **{"d_state": 4, **kw}).double().eval()


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_equals_token_loop(chunk):
    m = build(chunk=chunk)
    x = rand(2, 37, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(m.mix(x)[0], m.mix_reference(x), atol=TOL, rtol=0)


def test_decode_state_is_the_reference_state():
    m = build(chunk=4)
    x = rand(2, 15, 16, seed=1)
    with torch.no_grad():
        full = m(x)
        y, st = m.prefill(x[:, :6])
        outs = [y]
        for t in range(6, 15):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
        # the state after the sequence, from the per-channel loop: h (B, E, n) -> (B, H, n, e)
        sel = m.selection(x)
        h = torch.zeros(2, 16, 4, dtype=F64)
        for t in range(15):
            h = torch.exp(sel["delta"][:, t, :, None] * sel["A"]) * h + (sel["delta"][:, t] * sel["u"][:, t])[:, :, None] * sel["b"][:, t, None]
        torch.testing.assert_close(st["h"], h.view(2, 2, 8, 4).transpose(-1, -2), atol=TOL, rtol=0)


def test_without_decay_it_is_causal_linear_attention_plus_skip():
    """A = 0 (Lambda = I): y = tril(C B^T) (Delta * u) + D u, i.e. linear attention with q = c_t, k = b_t."""
    m = build()
    with torch.no_grad():
        m.A_log.fill_(-math.inf)  # A = -exp(-inf) = 0
        x = rand(1, 21, 16, seed=2)
        sel = m.selection(x)
        attn = torch.tril(sel["c"] @ sel["b"].transpose(-1, -2))  # (1, N, N)
        expect = attn @ (sel["delta"] * sel["u"]) + m.D * sel["u"]
        torch.testing.assert_close(m.mix(x)[0], expect, atol=TOL, rtol=0)


def test_mamba_initialisation():
    m = az.create("s6", 64, 4, causal=True)
    a = -torch.exp(m.A_log)
    torch.testing.assert_close(a, -torch.arange(1, 17, dtype=torch.float32).repeat(64, 1))
    dt = torch.nn.functional.softplus(m.dt_up.bias)
    assert (dt >= 0.001 - 1e-6).all() and (dt <= 0.1 + 1e-6).all()
    assert m.dt_down.out_features == math.ceil(64 / 16)
    torch.testing.assert_close(m.D.detach(), torch.ones(64))


def test_chunked_form_is_linear_in_n():
    m = az.create("s6", 8, 1, causal=True, d_state=4, chunk=64).eval()

    def run(n):
        m.mix(torch.randn(1, n, 8))

    assert_linear(run)

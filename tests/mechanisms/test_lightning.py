"""Lightning Attention (arXiv 2401.04658, 2405.17381; TransNormerLLM 2307.14995): blocked == masked
quadratic == recurrence, block-size independence, lambda = 1 identity, slopes, modules, linear cost.

Tolerances: float64; sums of O(1) terms reordered, ~1e-13.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.core.scan import recurrence_step
from attnzoo.mechanisms.linear.lightning import (
    lightning_attention,
    lightning_attention_reference,
    lightning_slopes,
    srms_norm,
)

from .test_scan import assert_linear

F64 = torch.float64
TOL = 1e-12


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("block", [1, 7, 16, 64, 128, 512])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_blocked_equals_masked_quadratic(block, n):
    q, k, v = rand(2, 4, n, 60, seed=1), rand(2, 4, n, 60, seed=2), rand(2, 4, n, 60, seed=3)
    torch.testing.assert_close(
        lightning_attention(q, k, v, block_size=block), lightning_attention_reference(q, k, v), atol=TOL, rtol=0
    )


def test_reference_is_the_decay_mask_formula():
    """o_t = sum_{s<=t} lambda^{t-s} (q_t . k_s) v_s with lambda_h = exp(-s_h) (written out)."""
    q, k, v = rand(1, 2, 8, 3, seed=1), rand(1, 2, 8, 3, seed=2), rand(1, 2, 8, 2, seed=3)
    out = lightning_attention_reference(q, k, v)
    lam = torch.exp(-lightning_slopes(2))
    for h in range(2):
        for t in range(8):
            expect = sum(lam[h] ** (t - s) * (q[0, h, t] @ k[0, h, s]) * v[0, h, s] for s in range(t + 1))
            torch.testing.assert_close(out[0, h, t], expect, atol=1e-13, rtol=0)


def test_slopes_are_alibi_and_layer_scaled():
    torch.testing.assert_close(lightning_slopes(8), torch.tensor([2 ** (-(h + 1)) for h in range(8)], dtype=F64))
    torch.testing.assert_close(lightning_slopes(4), torch.tensor([2 ** (-2 * (h + 1)) for h in range(4)], dtype=F64))
    s0, s_last = lightning_slopes(4, 0, 12), lightning_slopes(4, 11, 12)
    torch.testing.assert_close(s0, lightning_slopes(4) * (1 + 1e-5))
    torch.testing.assert_close(s_last, lightning_slopes(4) * 1e-5)  # last layer: lambda ~ 1


def test_lambda_one_is_causal_unnormalised_linear_attention():
    q, k, v = rand(2, 3, 70, 16, seed=1), rand(2, 3, 70, 16, seed=2), rand(2, 3, 70, 8, seed=3)
    expect = torch.matmul(torch.tril(torch.matmul(q, k.transpose(-1, -2))), v)
    torch.testing.assert_close(lightning_attention(q, k, v, slopes=0.0, block_size=16), expect, atol=TOL, rtol=0)


def test_recurrent_decoding_form():
    """KV_t = lambda KV_{t-1} + k_t^T v_t, o_t = q_t KV_t reproduces the blocked output and its state."""
    q, k, v = rand(1, 4, 50, 8, seed=1), rand(1, 4, 50, 8, seed=2), rand(1, 4, 50, 6, seed=3)
    out = lightning_attention(q, k, v, block_size=16)
    s = lightning_slopes(4)
    kv = torch.zeros(1, 4, 8, 6, dtype=F64)
    for t in range(50):
        o, kv = recurrence_step(kv, q[:, :, t], k[:, :, t], v[:, :, t], -s)
        torch.testing.assert_close(o, out[:, :, t], atol=TOL, rtol=0)
    lam = torch.exp(-s).view(1, 4, 1)
    powers = lam ** torch.arange(49, -1, -1, dtype=F64).view(1, 1, 50)
    torch.testing.assert_close(kv, torch.einsum("bhn,bhnd,bhne->bhde", powers, k, v), atol=TOL, rtol=0)


def test_fewer_queries_than_keys_is_bottom_right_aligned():
    q, k, v = rand(1, 2, 40, 8, seed=1), rand(1, 2, 40, 8, seed=2), rand(1, 2, 40, 8, seed=3)
    full = lightning_attention(q, k, v, block_size=16)
    torch.testing.assert_close(
        az.attention(q[:, :, -5:], k, v, "lightning", causal=True, cross=False, block_size=16), full[:, :, -5:], atol=TOL, rtol=0
    )


def test_noncausal_use_is_refused():
    q = rand(1, 2, 5, 4)
    with pytest.raises(az.UnsupportedError):
        az.attention(q, q, q, "lightning", causal=False)
    with pytest.raises(ValueError, match="causal"):
        lightning_attention(q, q, q, causal=False)


@pytest.mark.parametrize("variant", ["transnormer", "tnl"])
def test_module_decode_and_state(variant):
    torch.manual_seed(0)
    m = az.create("lightning", 16, 2, causal=True, variant=variant, block_size=4).double().eval()
    x = rand(2, 13, 16, seed=4)
    with torch.no_grad():
        full = m(x)
        y, st = m.prefill(x[:, :5])
        outs = [y]
        for t in range(5, 13):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
        torch.testing.assert_close(m.prefill(x)[1]["kv"], st["kv"], atol=TOL, rtol=0)
        m.impl = "reference"
        torch.testing.assert_close(m(x), full, atol=TOL, rtol=0)


def test_transnormer_module_is_norm_attention():
    """out = W_o (u * SRMSNorm(lightning(SiLU(q), SiLU(k), v))), SRMSNorm without gain."""
    torch.manual_seed(0)
    m = az.create("lightning", 16, 2, causal=True).double().eval()
    x = rand(1, 9, 16, seed=4)
    split = lambda t: t.view(1, 9, 2, 8).transpose(1, 2)  # noqa: E731
    q, k, v = torch.nn.functional.silu(split(m.q_proj(x))), torch.nn.functional.silu(split(m.k_proj(x))), split(m.v_proj(x))
    o = lightning_attention_reference(q, k, v, slopes=lightning_slopes(2)).transpose(1, 2).reshape(1, 9, 16)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.out_proj(m.u_proj(x) * o), atol=TOL, rtol=0)
    y = srms_norm(rand(3, 10, seed=5))
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3, dtype=F64), atol=1e-5, rtol=0)


def test_left_padding_changes_nothing():
    q, k, v = rand(1, 2, 20, 8, seed=1), rand(1, 2, 20, 8, seed=2), rand(1, 2, 20, 8, seed=3)
    g = 10 * rand(1, 2, 6, 8, seed=9)
    mask = torch.zeros(1, 26, dtype=torch.bool)
    mask[:, :6] = True
    out = lightning_attention(torch.cat([g, q], 2), torch.cat([g, k], 2), torch.cat([g, v], 2), key_padding_mask=mask, block_size=8)
    torch.testing.assert_close(out[:, :, 6:], lightning_attention(q, k, v, block_size=8), atol=TOL, rtol=0)


def test_blocked_form_is_linear_in_n():
    def run(n):
        x = torch.randn(1, 1, n, 16)
        lightning_attention(x, x, x, block_size=64)

    assert_linear(run)


def test_block_flops_match_the_lightning2_count():
    """Per block of C: Q K^T (C^2 d), (.)V (C^2 e), Q KV (C d e), K^T V (C d e): 2 flops per multiply-add."""
    from torch.utils.flop_counter import FlopCounterMode

    n, d, c = 1024, 16, 64
    x = torch.randn(1, 1, n, d)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        lightning_attention(x, x, x, block_size=c)
    expected = 2 * (n // c) * (c * c * d + c * c * d + c * d * d + c * d * d)
    assert fc.get_total_flops() == expected, (fc.get_total_flops(), expected)
    assert math.isclose(expected / n, 2 * (2 * c * d + 2 * d * d))  # per token: constant in N


def test_training_step_is_linear_in_n():
    """Forward + backward: FLOPs and allocated bytes x2 per doubling of N (2k -> 16k)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .test_scan import AllocCounter

    rows = []
    for n in (2048, 4096, 8192, 16384):
        q, k, v = (torch.randn(1, 1, n, 16, requires_grad=True) for _ in range(3))
        fc, alloc = FlopCounterMode(display=False), AllocCounter()
        with fc, alloc:
            lightning_attention(q, k, v, block_size=64).square().sum().backward()
        rows.append((fc.get_total_flops(), alloc.total, alloc.largest))
    for (f0, a0, l0), (f1, a1, l1) in zip(rows, rows[1:]):
        assert 1.8 < f1 / f0 < 2.2 and 1.7 < a1 / a0 < 2.3, (f0, f1, a0, a1)
        assert l1 / l0 < 2.3
    assert rows[-1][2] < 16384 * 16384 * 4 / 64

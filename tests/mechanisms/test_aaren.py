"""Aaren ("Attention as an RNN", arXiv 2405.13956): scan output == softmax attention of the learned
query over each prefix, scan == stable RNN, O(1) decoding state, stability, linear cost.

Tolerances: float64 ~1e-13 between the scan and materialised softmax.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.layout import split_heads
from attnzoo.core.scan import softmax_scan_loop
from attnzoo.mechanisms.linear.aaren import aaren_attention, aaren_attention_reference

from .test_scan import assert_linear

F64 = torch.float64
TOL = 1e-12


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_output_is_softmax_attention_of_the_query_over_the_prefix(chunk, n):
    query, k, v = rand(3, 60, seed=1), rand(2, 3, n, 60, seed=2), rand(2, 3, n, 60, seed=3)
    out, _ = aaren_attention(query, k, v, chunk=chunk)
    q = query[None, :, None, :].expand(2, 3, n, 60)
    torch.testing.assert_close(out, az.attention(q, k, v, "softmax", causal=True), atol=TOL, rtol=0)


def test_scan_equals_the_sequential_stable_rnn_and_its_state():
    query, k, v = rand(2, 8, seed=1), rand(1, 2, 40, 8, seed=2), rand(1, 2, 40, 5, seed=3)
    out, st = aaren_attention(query, k, v, chunk=8)
    s = torch.einsum("hd,bhnd->bhn", query, k) / 8**0.5
    loop, st_loop = softmax_scan_loop(s, v)
    torch.testing.assert_close(out, loop, atol=TOL, rtol=0)
    # the state is (running max, normaliser, weighted values) of the whole prefix
    m = s.amax(-1)
    torch.testing.assert_close(st["m"], m, atol=TOL, rtol=0)
    torch.testing.assert_close(st["u"], torch.exp(s - m[..., None]).sum(-1), atol=TOL, rtol=0)
    torch.testing.assert_close(st["w"], torch.einsum("bhn,bhne->bhe", torch.exp(s - m[..., None]), v), atol=TOL, rtol=0)
    for key in st:
        torch.testing.assert_close(st[key], st_loop[key], atol=TOL, rtol=0)


def test_stable_with_logits_of_1e4():
    query, k, v = rand(2, 8, seed=1).float(), rand(1, 2, 50, 8, seed=2).float(), rand(1, 2, 50, 4, seed=3).float()
    out, _ = aaren_attention(query, k, v, scale=3e3, chunk=16)  # |scores| ~ 1e4
    assert torch.isfinite(out).all()
    ref = aaren_attention_reference(query.double(), k.double(), v.double(), scale=3e3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_padding_is_ignored():
    query, k, v = rand(2, 8, seed=1), rand(2, 2, 20, 8, seed=2), rand(2, 2, 20, 4, seed=3)
    g = 10 * rand(2, 2, 5, 8, seed=4)
    mask = torch.zeros(2, 25, dtype=torch.bool)
    mask[:, :5] = True
    out, _ = aaren_attention(query, torch.cat([g, k], 2), torch.cat([g[..., :4], v], 2), key_padding_mask=mask, chunk=8)
    torch.testing.assert_close(out[:, :, 5:], aaren_attention(query, k, v)[0], atol=TOL, rtol=0)


def test_module_uses_the_learned_query_and_decodes():
    torch.manual_seed(0)
    m = az.create("aaren", 16, 2, causal=True, chunk=4).double().eval()
    assert m.q_proj is None and m.query.shape == (2, 8)
    x = rand(2, 13, 16, seed=5)
    with torch.no_grad():
        full = m(x)
        k, v = split_heads(m.k_proj(x), 2), split_heads(m.v_proj(x), 2)
        q = m.query[None, :, None, :].expand(2, 2, 13, 8)
        o = az.attention(q, k, v, "softmax", causal=True)
        torch.testing.assert_close(full, m.out_proj(o.transpose(1, 2).reshape(2, 13, 16)), atol=TOL, rtol=0)
        y, st = m.prefill(x[:, :4])
        outs = [y]
        for t in range(4, 13):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
    assert st["w"].shape == (2, 2, 8)  # O(e) per head, whatever the length


def test_no_qkv_functional_form():
    q = rand(1, 2, 4, 8)
    with pytest.raises(TypeError, match="no functional form"):
        az.attention(q, q, q, "aaren", causal=True)


def test_chunked_scan_is_linear_in_n():
    query = torch.randn(1, 16)

    def run(n):
        x = torch.randn(1, 1, n, 16)
        aaren_attention(query, x, x, chunk=64)

    assert_linear(run)

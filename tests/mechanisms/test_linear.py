"""Linear attention (Katharopoulos et al., arXiv 2006.16236): reference == chunked == RNN, the paper's
identities, decoding state, CAB causal cross, linear cost.

Tolerances: float64; the forms reorder sums of O(1) positive terms, so they agree to ~1e-14.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.mechanisms.linear.linear import linear_attention, linear_attention_reference

from .test_scan import assert_linear

F64 = torch.float64
TOL = 1e-12


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


def phi(x):
    return F.elu(x) + 1


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_fast_equals_reference_all_patterns(causal, cross, n):
    m = n + 7 if cross else n
    q, k, v = rand(2, 2, n, 60, seed=1), rand(2, 2, m, 60, seed=2), rand(2, 2, m, 60, seed=3)
    mask = torch.zeros(2, m, dtype=torch.bool)
    mask[1, ::3] = True
    for kpm in (None, mask):
        kw = dict(causal=causal, cross=cross, key_padding_mask=kpm)
        torch.testing.assert_close(linear_attention(q, k, v, chunk=16, **kw), linear_attention_reference(q, k, v, **kw), atol=TOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 300])
def test_output_independent_of_chunk(chunk):
    q, k, v = rand(1, 2, 77, 8, seed=1), rand(1, 2, 77, 8, seed=2), rand(1, 2, 77, 8, seed=3)
    torch.testing.assert_close(
        linear_attention(q, k, v, causal=True, chunk=chunk), linear_attention(q, k, v, causal=True, chunk=77), atol=TOL, rtol=0
    )


def test_causal_is_the_papers_rnn():
    """Eqs. 16-20: S_i = S_{i-1} + phi(k_i) v_i^T, z_i = z_{i-1} + phi(k_i), V'_i = phi(q_i)^T S_i / phi(q_i)^T z_i."""
    q, k, v = rand(1, 1, 20, 4, seed=1), rand(1, 1, 20, 4, seed=2), rand(1, 1, 20, 3, seed=3)
    s = torch.zeros(4, 3, dtype=F64)
    z = torch.zeros(4, dtype=F64)
    out = linear_attention(q, k, v, causal=True, chunk=8)
    for i in range(20):
        s = s + torch.outer(phi(k[0, 0, i]), v[0, 0, i])
        z = z + phi(k[0, 0, i])
        expect = phi(q[0, 0, i]) @ s / (phi(q[0, 0, i]) @ z)
        torch.testing.assert_close(out[0, 0, i], expect, atol=TOL, rtol=0)


def test_rows_are_normalised_and_last_causal_row_is_noncausal():
    q, k = rand(2, 2, 30, 8, seed=1), rand(2, 2, 30, 8, seed=2)
    ones = torch.ones(2, 2, 30, 1, dtype=F64)
    torch.testing.assert_close(linear_attention(q, k, ones, causal=True), torch.ones_like(ones), atol=TOL, rtol=0)
    v = rand(2, 2, 30, 5, seed=3)
    torch.testing.assert_close(
        linear_attention(q, k, v, causal=True)[:, :, -1], linear_attention(q, k, v)[:, :, -1], atol=TOL, rtol=0
    )


def test_causal_self_with_fewer_queries_is_bottom_right_aligned():
    q, k, v = rand(1, 2, 40, 8, seed=1), rand(1, 2, 40, 8, seed=2), rand(1, 2, 40, 8, seed=3)
    full = linear_attention(q, k, v, causal=True)
    part = az.attention(q[:, :, -9:], k, v, "linear", causal=True, cross=False)
    torch.testing.assert_close(part, full[:, :, -9:], atol=TOL, rtol=0)


def test_causal_cross_output_depends_on_its_own_query_only():
    """CAB causal cross: out(q[:i+1], source)[i] == out(q, source)[i]; the source is never masked."""
    q, k, v = rand(1, 2, 12, 8, seed=1), rand(1, 2, 19, 8, seed=2), rand(1, 2, 19, 8, seed=3)
    out = linear_attention(q, k, v, causal=True, cross=True)
    for i in (0, 5, 11):
        torch.testing.assert_close(linear_attention(q[:, :, : i + 1], k, v, causal=True, cross=True)[:, :, i], out[:, :, i], atol=TOL, rtol=0)
    torch.testing.assert_close(out, linear_attention(q, k, v, cross=True), atol=TOL, rtol=0)


def test_eps_option_is_the_official_code_formula():
    q, k, v = rand(1, 1, 10, 4, seed=1), rand(1, 1, 10, 4, seed=2), rand(1, 1, 10, 3, seed=3)
    kv = phi(k)[0, 0].T @ v[0, 0]
    z = phi(k)[0, 0].sum(0)
    expect = (phi(q)[0, 0] @ kv) / (phi(q)[0, 0] @ z + 1e-6)[:, None]
    torch.testing.assert_close(linear_attention(q, k, v, eps=1e-6)[0, 0], expect, atol=TOL, rtol=0)


def test_module_decode_state_is_the_sum_of_outer_products():
    torch.manual_seed(0)
    m = az.create("linear", 16, 2, causal=True, chunk=4).double().eval()
    x = rand(2, 11, 16, seed=4)
    with torch.no_grad():
        full = m(x)
        y, st = m.prefill(x[:, :3])
        outs = [y]
        for t in range(3, 11):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
        k = phi(m.k_proj(x).view(2, 11, 2, 8).transpose(1, 2))
        v = m.v_proj(x).view(2, 11, 2, 8).transpose(1, 2)
        torch.testing.assert_close(st["kv"], torch.einsum("bhnd,bhne->bhde", k, v), atol=TOL, rtol=0)
        torch.testing.assert_close(st["k_sum"], k.sum(2), atol=TOL, rtol=0)
        _, st2 = m.prefill(x)
        torch.testing.assert_close(st2["kv"], st["kv"], atol=TOL, rtol=0)


def test_causal_chunked_form_is_linear_in_n():
    def run(n):
        x = torch.randn(1, 1, n, 16)
        linear_attention(x, x, x, causal=True, chunk=64)

    assert_linear(run)

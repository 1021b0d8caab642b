"""Tensor attention: streamed exact form == literal Kronecker reference, reduction to softmax attention,
the Kronecker identities, the polynomial method's error falling with the degree, decode.

float64 comparisons use 1e-10 (the streamed form only reorders the sums).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.tensor import tensor_attention, tensor_attention_reference

F64 = torch.float64


def _five(b, h, n, m, d, scale=1.0):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64) * scale  # noqa: E731
    return r(b, h, n, d), r(b, h, m, d), r(b, h, m, d), r(b, h, m, d), r(b, h, m, d)


@pytest.mark.parametrize(
    "n,m,causal,cross",
    [
        (1, 1, False, False),
        (37, 37, False, False),
        (37, 37, True, False),
        (5, 20, True, False),
        (9, 14, False, True),
        (9, 14, True, True),
    ],
)
def test_exact_equals_kronecker_reference(n, m, causal, cross):
    q, k1, v1, k2, v2 = _five(2, 2, n, m, 6)
    kpm = torch.rand(2, m) < 0.25
    kpm[1] = True  # every key padded: zeros
    for mask in (None, kpm):
        for chunk in (None, 3):
            a = tensor_attention(
                q, k1, v1, k2=k2, v2=v2, causal=causal, cross=cross, key_padding_mask=mask, chunk=chunk
            )
            b = tensor_attention_reference(
                q, k1, v1, k2=k2, v2=v2, causal=causal, cross=cross, key_padding_mask=mask
            )
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    assert torch.equal(a[1], torch.zeros_like(a[1]))


def test_literal_triple_sum():
    # T_i = sum_{j1,j2} exp(s_ij1j2) V1[j1]⊙V2[j2] / sum exp(s),  s = scale * sum_l Q[i,l] K1[j1,l] K2[j2,l]
    q, k1, v1, k2, v2 = _five(1, 1, 3, 4, 2)
    out = tensor_attention(q, k1, v1, k2=k2, v2=v2, scale=0.7)
    for i in range(3):
        num, den = torch.zeros(2, dtype=F64), torch.zeros((), dtype=F64)
        for j1 in range(4):
            for j2 in range(4):
                w = torch.exp(0.7 * (q[0, 0, i] * k1[0, 0, j1] * k2[0, 0, j2]).sum())
                num += w * v1[0, 0, j1] * v2[0, 0, j2]
                den += w
        torch.testing.assert_close(out[0, 0, i], num / den, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_reduces_to_softmax_attention(causal, scale):
    q, k1, v1, _, _ = _five(2, 2, 23, 23, 8)
    ones = torch.ones_like(k1)
    out = tensor_attention(q, k1, v1, k2=ones, v2=ones, causal=causal, scale=scale)
    expect = reference_attention(q, k1, v1, causal=causal, scale=1 / 8 if scale is None else scale)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)


def test_kronecker_identity():
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(7, 3, generator=g, dtype=F64) for _ in range(4))
    kron = lambda x, y: (x[:, None, :] * y[None, :, :]).reshape(-1, x.shape[1])  # noqa: E731  (column-wise)
    torch.testing.assert_close(kron(a, b).T @ kron(c, d), (a.T @ c) * (b.T @ d), atol=1e-12, rtol=0)


def test_rows_of_normalised_a_sum_to_one():
    q, k1, _, k2, _ = _five(1, 2, 6, 6, 4)
    ones_v = torch.ones(1, 2, 6, 4, dtype=F64)
    out = tensor_attention(q, k1, ones_v, k2=k2, v2=ones_v)  # D^{-1} A 1 = 1
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-12, rtol=0)


def test_poly_equals_its_reference_and_error_falls_with_degree():
    q, k1, v1, k2, v2 = _five(2, 2, 30, 30, 3, scale=0.5)  # bounded entries
    kpm = torch.rand(2, 30) < 0.2
    exact = tensor_attention(q, k1, v1, k2=k2, v2=v2, key_padding_mask=kpm)
    errs = []
    for deg in (0, 2, 4, 6):
        fast = tensor_attention(q, k1, v1, k2=k2, v2=v2, method="poly", degree=deg, key_padding_mask=kpm)
        ref = tensor_attention_reference(
            q, k1, v1, k2=k2, v2=v2, method="poly", degree=deg, key_padding_mask=kpm
        )
        torch.testing.assert_close(fast, ref, atol=1e-10, rtol=0)
        errs.append((fast - exact).abs().max().item())
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-6


def test_poly_cost_is_linear_in_length():
    def flops(n):
        q, k1, v1, k2, v2 = (t.float() for t in _five(1, 1, n, n, 4))
        with FlopCounterMode(display=False) as fc:
            tensor_attention(q, k1, v1, k2=k2, v2=v2, method="poly", degree=2)
        return fc.get_total_flops()

    assert flops(256) > 0
    assert flops(512) == 2 * flops(256)


def test_module_fast_equals_reference_and_decode():
    torch.manual_seed(0)
    layer = az.create("tensor", dim=16, num_heads=2, causal=True).double()
    x = torch.randn(2, 13, 16, dtype=F64)
    full = layer(x)
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), full, atol=1e-10, rtol=0)
    layer.impl = "fast"
    y, state = layer.prefill(x[:, :4])
    outs = [y]
    for t in range(4, 13):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


def test_errors():
    q, k1, v1, k2, v2 = _five(1, 1, 4, 4, 2)
    with pytest.raises(ValueError):
        tensor_attention(q, k1, v1, method="poly", causal=True)
    with pytest.raises(ValueError):
        tensor_attention(q, k1, v1, k2=k2[:, :, :3])
    with pytest.raises(ValueError):
        tensor_attention(q, k1, v1, method="magic")

"""The golden reference: an independent loop implementation, masks of every kind, empty rows, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnzoo.core.reference import reference_attention

F64 = torch.float64


def loop_attention(q, k, v, allowed, scale):
    """Softmax attention one query at a time, in plain Python sums (no matmul, no masking tricks)."""
    b, h, n, _ = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                js = [j for j in range(k.shape[2]) if allowed[bi, hi, i, j]]
                if not js:
                    continue
                s = [float((q[bi, hi, i] * k[bi, hi, j]).sum()) * scale for j in js]
                mx = max(s)
                w = [math.exp(x - mx) for x in s]
                z = sum(w)
                for wj, j in zip(w, js):
                    out[bi, hi, i] += (wj / z) * v[bi, hi, j]
    return out


def test_matches_a_loop_with_a_random_boolean_mask_and_empty_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 5, generator=g, dtype=F64) for _ in range(3))
    mask = torch.rand(2, 2, 6, 6, generator=g) > 0.5
    mask[0, 1, 3] = False  # a row with every key masked
    out = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, loop_attention(q, k, v, mask, 5**-0.5), atol=1e-12, rtol=0)
    assert torch.equal(out[0, 1, 3], torch.zeros(5, dtype=F64))
    assert torch.isfinite(out).all()


def test_additive_mask_with_minus_inf_counts_as_masked():
    q, k, v = (torch.randn(1, 1, 4, 3, dtype=F64) for _ in range(3))
    add = torch.zeros(4, 4, dtype=F64)
    add[:, 0] = float("-inf")
    add[:, 1] = 0.7
    add[2] = float("-inf")  # an empty row through the additive mask
    out = reference_attention(q, k, v, add)
    allowed = torch.isfinite(add).expand(1, 1, 4, 4)
    expected = loop_attention(q + 0, k, v, allowed, 3**-0.5)
    # the +0.7 bias on key 1 shifts its weight: compare with an explicit softmax instead of the loop for it
    s = (q @ k.transpose(-1, -2)) * 3**-0.5 + add
    p = torch.softmax(s[0, 0, [0, 1, 3]], -1)
    torch.testing.assert_close(out[0, 0, [0, 1, 3]], p @ v[0, 0], atol=1e-12, rtol=0)
    assert torch.equal(out[0, 0, 2], torch.zeros(3, dtype=F64))
    assert expected.shape == out.shape


@pytest.mark.parametrize("n,m", [(5, 5), (3, 8), (1, 7)])
def test_causal_is_bottom_right_aligned(n, m):
    q, k, v = torch.randn(1, 2, n, 4, dtype=F64), torch.randn(1, 2, m, 4, dtype=F64), torch.randn(1, 2, m, 4, dtype=F64)
    allowed = (torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)).expand(1, 2, n, m)
    torch.testing.assert_close(reference_attention(q, k, v, causal=True), loop_attention(q, k, v, allowed, 0.5), atol=1e-12, rtol=0)


def test_equals_sdpa_and_keeps_float32():
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    out = reference_attention(q, k, v, causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_key_padding_and_gqa_and_weights():
    q = torch.randn(2, 4, 5, 8, dtype=F64)
    k, v = torch.randn(2, 2, 7, 8, dtype=F64), torch.randn(2, 2, 7, 3, dtype=F64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    out, w = reference_attention(q, k, v, key_padding_mask=pad, return_weights=True)
    assert w.shape == (2, 4, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5, dtype=F64))
    assert torch.equal(w[1, :, :, 4:], torch.zeros_like(w[1, :, :, 4:]))
    # head 3 of q uses kv head 1
    ref = reference_attention(q[:, 3:4], k[:, 1:2], v[:, 1:2], key_padding_mask=pad)
    torch.testing.assert_close(out[:, 3:4], ref)

"""S2-Attention: block-gathered fast form == dense masked reference, dkernel's pattern, coverage, decode, cost.

float64 comparisons use 1e-10 (same maths, different summation order).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnzoo as az
from attnzoo.core.flops import flop_counter
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.s2 import s2_attention, s2_attention_reference, s2_block_mask, s2_coverage

F64 = torch.float64


def _flop_counter():
    return flop_counter()


def _qkv(b, h, n, d, m=None, hkv=None, dtype=F64):
    m = n if m is None else m
    hkv = h if hkv is None else hkv
    return (
        torch.randn(b, h, n, d, dtype=dtype),
        torch.randn(b, hkv, m, d, dtype=dtype),
        torch.randn(b, hkv, m, d, dtype=dtype),
    )


def _dkernel_block_mask(num_heads, blocks, local_blocks, vert_stride, offset=0, num_dense=0):
    """Loop transcription of dkernel.utils.get_sparse_attn_mask's block mask (no GQA)."""
    step = max(1, int(vert_stride / num_heads))
    out = torch.zeros(num_heads, blocks, blocks, dtype=torch.bool)
    for h in range(num_heads):
        for i in range(blocks):
            for j in range(blocks):
                vert = h >= num_heads - num_dense or (j + h * step + offset) % vert_stride == 0
                out[h, i, j] = i >= j and (i - j < local_blocks or vert)
    return out


@pytest.mark.parametrize(
    "heads,vs,offset,dense", [(4, 4, 0, 0), (2, 4, 0, 0), (3, 8, 1, 0), (8, 4, 2, 1), (4, 1, 0, 0)]
)
def test_block_mask_matches_dkernel(heads, vs, offset, dense):
    ours = s2_block_mask(heads, 11, 11, 3, vs, head_sliding_offset=offset, num_dense_heads=dense)
    assert torch.equal(ours, _dkernel_block_mask(heads, 11, 3, vs, offset, dense))


@pytest.mark.parametrize("heads,hkv", [(4, 4), (4, 2), (3, 3)])
@pytest.mark.parametrize("n,m", [(1, 1), (63, 63), (257, 257), (1, 70), (5, 70)])
def test_fast_equals_reference(n, m, heads, hkv):
    q, k, v = _qkv(2, heads, n, 60, m=m, hkv=hkv)
    for cfg in (
        dict(block_size=8, local_blocks=2, vert_stride=4),
        dict(block_size=16, local_blocks=1, vert_stride=3, head_sliding_offset=1),
    ):
        a = s2_attention(q, k, v, causal=True, **cfg)
        b = s2_attention_reference(q, k, v, causal=True, **cfg)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_fast_equals_reference_padding_dense_homo():
    q, k, v = _qkv(2, 4, 45, 8)
    kpm = torch.rand(2, 45) < 0.3
    kpm[1] = True
    for cfg in (dict(num_dense_heads=1), dict(homo_head=True), {}):
        a = s2_attention(
            q, k, v, causal=True, key_padding_mask=kpm, block_size=4, local_blocks=2, vert_stride=3, **cfg
        )
        b = s2_attention_reference(
            q, k, v, causal=True, key_padding_mask=kpm, block_size=4, local_blocks=2, vert_stride=3, **cfg
        )
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        assert torch.equal(a[1], torch.zeros_like(a[1]))


def test_backward_matches_reference():
    q, k, v = _qkv(1, 2, 37, 8)
    grads = []
    for fn in (s2_attention, s2_attention_reference):
        t = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = fn(*t, causal=True, block_size=4, local_blocks=2, vert_stride=3)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads.append([x.grad for x in t])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)


def test_vert_stride_one_and_wide_local_are_dense_causal():
    q, k, v = _qkv(1, 2, 50, 8)
    full = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(
        s2_attention(q, k, v, block_size=8, local_blocks=1, vert_stride=1), full, atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        s2_attention(q, k, v, block_size=8, local_blocks=7, vert_stride=5), full, atol=1e-10, rtol=0
    )


def test_sparsity_is_exercised():
    q, k, v = _qkv(1, 2, 64, 8)
    full = reference_attention(q, k, v, causal=True)
    out = s2_attention(q, k, v, block_size=4, local_blocks=2, vert_stride=4)
    assert (out - full).abs().max() > 1e-3


@pytest.mark.parametrize("heads,vs", [(1, 4), (2, 4), (3, 4), (4, 4), (8, 4), (4, 8), (8, 8), (2, 2)])
def test_union_covers_iff_enough_heads(heads, vs):
    nb = 20
    union = s2_block_mask(heads, nb, nb, 1, vs).any(0)
    tri = torch.ones(nb, nb, dtype=torch.bool).tril()
    cov = s2_coverage(heads, vs)
    assert torch.equal(union, tri) == cov.covered == (heads >= vs)
    if not cov.covered:
        assert cov.missing and str(cov).count("mod") >= 1


def test_module_reports_coverage():
    with pytest.warns(UserWarning, match="cover residues"):
        layer = az.create("s2", dim=16, num_heads=2, causal=True, vert_stride=4, block_size=4)
    assert not layer.coverage.covered and layer.coverage.missing == (1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = az.create("s2", dim=16, num_heads=4, causal=True, vert_stride=4, block_size=4)
    assert layer.coverage.covered


def test_every_row_has_a_key():
    q, k, v = _qkv(1, 4, 30, 4)
    blocks = s2_block_mask(4, 8, 8, 1, 4)
    assert blocks.any(-1).all()


def test_decode_equals_forward():
    layer = az.create(
        "s2", dim=16, num_heads=4, causal=True, block_size=4, local_blocks=2, vert_stride=3
    ).double()
    x = torch.randn(2, 29, 16, dtype=F64)
    full = layer(x)
    y, state = layer.prefill(x[:, :7])
    outs = [y]
    for t in range(7, 29):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), full, atol=1e-10, rtol=0)


def test_noncausal_is_unsupported():
    with pytest.raises(az.UnsupportedError):
        az.create("s2", dim=16, num_heads=4, causal=False)
    q, k, v = _qkv(1, 2, 8, 4)
    with pytest.raises(ValueError):
        s2_attention(q, k, v, causal=False)
    with pytest.raises(ValueError):
        s2_attention(q, k, v, block_size=0)


def test_cost_is_n_squared_over_stride():
    d, bs, lb = 16, 32, 2

    def flops(n, vs):
        q, k, v = _qkv(1, 1, n, d, dtype=torch.float32)
        with _flop_counter() as fc:
            s2_attention(q, k, v, block_size=bs, local_blocks=lb, vert_stride=vs)
        return fc.get_total_flops()

    n = 2048
    dense = 2 * 2 * n * n * d
    assert flops(n, 4) > 0
    for vs in (4, 8, 16):
        nb = n // bs
        rmax = lb + -(-(nb - lb) // vs)  # longest list of key blocks
        assert flops(n, vs) <= 2 * 2 * n * rmax * bs * d
    assert flops(n, 16) < dense / 8
    assert flops(n, 8) < 0.6 * flops(n, 4)  # halving the shard halves the remote work


def test_gqa_kv_pattern_matches_dkernel():
    # dkernel with num_kv_heads: pattern per kv head, step from the query-head count, shared by the group
    q, k, v = _qkv(1, 4, 40, 8, hkv=2)
    out = s2_attention(q, k, v, block_size=4, local_blocks=1, vert_stride=4, gqa_pattern="kv")
    step = max(1, int(4 / 4))
    blocks = torch.zeros(4, 10, 10, dtype=torch.bool)
    for hq in range(4):
        h = hq // 2
        for i in range(10):
            for j in range(10):
                blocks[hq, i, j] = i >= j and (i - j < 1 or (j + h * step) % 4 == 0)
    mask = torch.kron(blocks.to(torch.uint8), torch.ones(4, 4, dtype=torch.uint8)).bool()[None]
    expect = reference_attention(q, k, v, mask, causal=True)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        out,
        s2_attention_reference(q, k, v, block_size=4, local_blocks=1, vert_stride=4, gqa_pattern="kv"),
        atol=1e-10,
        rtol=0,
    )
    layer = None
    with pytest.warns(UserWarning):
        layer = az.create(
            "s2", dim=16, num_heads=4, num_kv_heads=2, causal=True, vert_stride=4, gqa_pattern="kv"
        )
    assert layer.coverage.missing == (1, 2)  # kv heads 0, 1 with step 1 see residues 0 and 3


def test_key_padding_is_variable_length():
    q, k, v = _qkv(1, 2, 30, 8)
    cfg = dict(block_size=4, local_blocks=2, vert_stride=3)
    ref = s2_attention(q, k, v, **cfg)
    pad = torch.randn(1, 2, 5, 8, dtype=F64) * 10
    for cut in (0, 13, 30):
        cat = lambda t, cut=cut: torch.cat([t[:, :, :cut], pad, t[:, :, cut:]], 2)  # noqa: E731
        kpm = torch.zeros(1, 35, dtype=torch.bool)
        kpm[:, cut : cut + 5] = True
        for fn in (s2_attention, s2_attention_reference):
            out = fn(cat(q), cat(k), cat(v), key_padding_mask=kpm, **cfg)
            torch.testing.assert_close(out[:, :, ~kpm[0]], ref, atol=1e-10, rtol=0)

"""DaViT channel group attention and spatial window attention.

Tolerances: float64 comparisons use 1e-10 (the fast and reference forms differ only in the order of
summation, rounding stays near 1e-14 for O(1) inputs); float32 checks use 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.vision.davit import (
    channel_group_attention,
    channel_group_attention_reference,
    window_attention_2d,
    window_attention_2d_reference,
)

F64 = torch.float64
TOL = 1e-10


def _qkv(b, h, n, d, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3))


# -- channel group attention ------------------------------------------------------------------------
@pytest.mark.parametrize("map_from", ["qk", "kv"])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_channel_fast_matches_reference(map_from, n):
    q, k, v = _qkv(2, 2, n, 60)
    fast = channel_group_attention(q, k, v, map_from=map_from)
    ref = channel_group_attention_reference(q, k, v, map_from=map_from)
    assert fast.shape == (2, 2, n, 60)
    assert (fast - ref).abs().max() < TOL
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 2 :] = True
    mask[0, 0] = n > 1
    fast = channel_group_attention(q, k, v, map_from=map_from, key_padding_mask=mask)
    ref = channel_group_attention_reference(q, k, v, map_from=map_from, key_padding_mask=mask)
    assert (fast - ref).abs().max() < TOL


def test_channel_paper_equation_written_out():
    """(softmax(Q^T K / sqrt(C_g)) V^T)^T for one group, by explicit sums."""
    q, k, v = _qkv(1, 1, 11, 5)
    Q, K, V = q[0, 0], k[0, 0], v[0, 0]
    logits = torch.zeros(5, 5, dtype=F64)
    for a in range(5):
        for c in range(5):
            logits[a, c] = sum(Q[n, a] * K[n, c] for n in range(11)) / 5**0.5
    amap = torch.softmax(logits, dim=-1)
    expected = torch.stack([torch.stack([sum(amap[a, c] * V[n, c] for c in range(5)) for a in range(5)]) for n in range(11)])
    assert (channel_group_attention(q, k, v)[0, 0] - expected).abs().max() < TOL


def test_channel_official_code_variant():
    """map_from='kv' is the official code: M = softmax(k^T v * s) applied to q; it differs from the paper's form."""
    q, k, v = _qkv(2, 3, 20, 8)
    s = 8**-0.5
    attention = torch.softmax((k * s).transpose(-1, -2) @ v, dim=-1)
    code = (attention @ q.transpose(-1, -2)).transpose(-1, -2)
    assert (channel_group_attention(q, k, v, map_from="kv") - code).abs().max() < TOL
    assert (channel_group_attention(q, k, v, map_from="qk") - code).abs().max() > 1e-3


def test_channel_map_rows_sum_to_one():
    """With every value row equal to ones, the output rows are the row sums of the map: ones."""
    q, k, _ = _qkv(2, 2, 30, 6)
    v = torch.ones_like(q)
    out = channel_group_attention(q, k, v)
    assert (out - 1).abs().max() < TOL


def test_channel_permutation_equivariant_module():
    """Permuting the spatial positions permutes the output identically (grid and sequence inputs)."""
    torch.manual_seed(0)
    m = az.create("channel_group", 48, 4).to(F64).eval()
    x = torch.randn(2, 7, 9, 48, dtype=F64)
    perm = torch.randperm(63)
    flat = x.reshape(2, 63, 48)
    with torch.no_grad():
        y = m(x).reshape(2, 63, 48)
        yp = m(flat[:, perm].reshape(2, 7, 9, 48)).reshape(2, 63, 48)
        ys = m(flat[:, perm])
    assert (yp - y[:, perm]).abs().max() < TOL
    assert (ys - y[:, perm]).abs().max() < TOL
    # window attention is not: a permutation that crosses windows changes the result
    w = az.create("spatial_window", 48, 4, window_size=3).to(F64).eval()
    with torch.no_grad():
        a = w(flat[:, perm].reshape(2, 7, 9, 48)).reshape(2, 63, 48)
        b = w(x).reshape(2, 63, 48)[:, perm]
    assert (a - b).abs().max() > 1e-3


def test_channel_cost_linear_in_tokens():
    """FLOPs double when N doubles (the maps are C_g x C_g)."""
    m = az.create("channel_group", 64, 4).eval()
    flops = []
    for n in (64, 128, 256):
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            m(torch.randn(1, n, 64))
        flops.append(c.get_total_flops())
    assert flops[1] == 2 * flops[0] and flops[2] == 2 * flops[1], flops


# -- spatial window attention -----------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (8, 8)])
@pytest.mark.parametrize("w", [1, 3, 4, 7])
def test_window_fast_matches_reference(grid, w):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, *grid, 12, generator=g, dtype=F64) for _ in range(3))
    fast = window_attention_2d(q, k, v, window_size=w)
    ref = window_attention_2d_reference(q, k, v, window_size=w)
    assert fast.shape == q.shape
    assert (fast - ref).abs().max() < TOL


def test_window_covering_grid_is_full_attention():
    q, k, v = (torch.randn(1, 2, 6, 5, 8, dtype=F64) for _ in range(3))
    out = window_attention_2d(q, k, v, window_size=7)
    flat = lambda t: t.reshape(1, 2, 30, 8)  # noqa: E731
    full = reference_attention(flat(q), flat(k), flat(v)).reshape(1, 2, 6, 5, 8)
    assert (out - full).abs().max() < TOL


def test_window_locality_by_gradient():
    """Output at a position depends only on inputs in its own w x w window."""
    torch.manual_seed(0)
    m = az.create("spatial_window", 16, 2, window_size=3).to(F64)
    x = torch.randn(1, 7, 8, 16, dtype=F64, requires_grad=True)
    y = m(x)
    (g,) = torch.autograd.grad(y[0, 4, 4].sum(), x)  # window rows 3..5, cols 3..5
    dep = g[0].abs().sum(-1) > 0
    expected = torch.zeros(7, 8, dtype=torch.bool)
    expected[3:6, 3:6] = True
    assert torch.equal(dep, expected)


def test_window_pad_modes():
    """pad_mode='zeros' (official code): zero-padded inputs are keys; equals 'mask' when w divides the grid."""
    torch.manual_seed(0)
    a = az.create("spatial_window", 16, 2, window_size=4, qkv_bias=True).to(F64).eval()
    b = az.create("spatial_window", 16, 2, window_size=4, qkv_bias=True, pad_mode="zeros").to(F64).eval()
    b.load_state_dict(a.state_dict())
    x8 = torch.randn(2, 8, 8, 16, dtype=F64)
    x7 = torch.randn(2, 7, 9, 16, dtype=F64)
    with torch.no_grad():
        assert (a(x8) - b(x8)).abs().max() < TOL
        assert (a(x7) - b(x7)).abs().max() > 1e-4
        # the official behaviour written out: pad the input, window attention with all tokens real, crop
        xp = F.pad(x7, (0, 0, 0, 3, 0, 1))
        heads = lambda t: t.view(2, 8, 12, 2, 8).permute(0, 3, 1, 2, 4)  # noqa: E731
        q, k, v = heads(b.q_proj(xp)), heads(b.k_proj(xp)), heads(b.v_proj(xp))
        o = window_attention_2d_reference(q, k, v, window_size=4).permute(0, 2, 3, 1, 4).reshape(2, 8, 12, 16)
        expected = b.out_proj(o[:, :7, :9])
        assert (b(x7) - expected).abs().max() < TOL
        b.impl = "reference"
        assert (b(x7) - expected).abs().max() < TOL


@pytest.mark.parametrize("name", ["channel_group", "spatial_window"])
@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
def test_grid_shapes_and_dtype(name, grid):
    m = az.create(name, 32, 4)
    x = torch.randn(2, *grid, 32)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_spatial_window_rejects_sequences_and_bad_settings():
    m = az.create("spatial_window", 16, 2)
    with pytest.raises(az.UnsupportedError):
        m(torch.randn(1, 5, 16))
    with pytest.raises(ValueError):
        az.create("spatial_window", 16, 2, window_size=0)
    with pytest.raises(ValueError):
        az.create("spatial_window", 16, 2, pad_mode="reflect")
    with pytest.raises(ValueError):
        channel_group_attention(*_qkv(1, 1, 4, 4), map_from="qv")

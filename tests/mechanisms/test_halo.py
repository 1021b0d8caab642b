"""HaloNet blocked local attention (arXiv 2103.12731): fast == dense reference, identities, locality, cost.

Tolerances: float64, 1e-10 (unfolded windows vs dense masked form differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.halo import (
    halo_attention,
    halo_attention_2d,
    halo_attention_2d_reference,
    halo_attention_reference,
)

F64 = torch.float64
TOL = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def tables(b, h, d, seed=10):
    win = b + 2 * h
    return rand(2 * win - 1, d, seed=seed), rand(2 * win - 1, d, seed=seed + 1)


@pytest.mark.parametrize("scale_pos_embed", [False, True])
@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("b,h", [(4, 2), (8, 3), (5, 0)])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_1d_fast_matches_reference(n, b, h, mask_padding, scale_pos_embed):
    q, k, v = (rand(2, 2, n, 12, seed=s) for s in (1, 2, 3))
    rh, rw = tables(b, h, 12)
    kw = dict(block_size=b, halo_size=h, mask_padding=mask_padding, scale_pos_embed=scale_pos_embed, rel_h=rh, rel_w=rw)
    assert (halo_attention(q, k, v, **kw) - halo_attention_reference(q, k, v, **kw)).abs().max().item() < TOL


@pytest.mark.parametrize("mask_padding", [False, True])
@pytest.mark.parametrize("b,h", [(4, 2), (8, 3)])
@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (5, 3)])
def test_2d_fast_matches_reference(grid, b, h, mask_padding):
    q, k, v = (rand(2, 2, *grid, 12, seed=s) for s in (1, 2, 3))
    rh, rw = tables(b, h, 12)
    kw = dict(block_size=b, halo_size=h, mask_padding=mask_padding, rel_h=rh, rel_w=rw)
    assert (halo_attention_2d(q, k, v, **kw) - halo_attention_2d_reference(q, k, v, **kw)).abs().max().item() < TOL


def test_block_and_halo_covering_the_grid_is_full_attention():
    flat = lambda t: t.reshape(2, 2, -1, 12)  # noqa: E731
    # one block = the whole (square) map, no halo, no relative logits: no padding at all
    q, k, v = (rand(2, 2, 6, 6, 12, seed=s) for s in (1, 2, 3))
    out = halo_attention_2d(q, k, v, block_size=6, halo_size=0)
    assert (flat(out) - reference_attention(flat(q), flat(k), flat(v))).abs().max().item() < TOL
    # blocks that do not divide the map, halo reaching everything, padding masked
    q, k, v = (rand(2, 2, 6, 7, 12, seed=s) for s in (4, 5, 6))
    out = halo_attention_2d(q, k, v, block_size=4, halo_size=4, mask_padding=True)
    assert (flat(out) - reference_attention(flat(q), flat(k), flat(v))).abs().max().item() < TOL
    # and in 1-D
    q, k, v = (rand(2, 2, 23, 12, seed=s) for s in (7, 8, 9))
    out = halo_attention(q, k, v, block_size=5, halo_size=20, mask_padding=True)
    assert (out - reference_attention(q, k, v)).abs().max().item() < TOL
    # the unmasked (timm) padding lets zero keys take part: not full attention
    out = halo_attention(q, k, v, block_size=5, halo_size=20)
    assert (out - reference_attention(q, k, v)).abs().max().item() > 1e-3


def test_padding_choice_only_matters_at_the_border():
    q, k, v = (rand(1, 1, 12, 12, 8, seed=s) for s in (1, 2, 3))
    a = halo_attention_2d(q, k, v, block_size=4, halo_size=2)
    m = halo_attention_2d(q, k, v, block_size=4, halo_size=2, mask_padding=True)
    assert (a[:, :, 4:8, 4:8] - m[:, :, 4:8, 4:8]).abs().max().item() < TOL  # window inside the map
    assert (a[:, :, 0:4, 0:4] - m[:, :, 0:4, 0:4]).abs().max().item() > 1e-3  # window hangs over the edge


def test_locality_gradient_is_zero_outside_the_halo_window():
    b, h = 4, 1
    q, k, v = (rand(1, 1, 12, 12, 4, seed=s).requires_grad_(True) for s in (1, 2, 3))
    rh, rw = tables(b, h, 4)
    out = halo_attention_2d(q, k, v, block_size=b, halo_size=h, rel_h=rh, rel_w=rw)
    y, x = 5, 6  # block (1, 1): rows/cols 4..7, window 3..8
    gk, gv = torch.autograd.grad(out[0, 0, y, x].sum(), (k, v))
    g = (gk.abs() + gv.abs()).sum(-1)[0, 0]
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[3:9, 3:9] = True
    assert g[~inside].abs().max().item() == 0.0
    assert (g[inside] > 0).all()


def test_relative_logits_are_translation_equivariant():
    """Shifting the map by a whole block shifts the output (interior blocks, relative logits only depend on offsets)."""
    b, h = 4, 2
    q, k, v = (rand(1, 1, 16, 16, 8, seed=s) for s in (1, 2, 3))
    rh, rw = tables(b, h, 8)
    kw = dict(block_size=b, halo_size=h, rel_h=rh, rel_w=rw)
    out = halo_attention_2d(q, k, v, **kw)
    sh = lambda t: torch.roll(t, shifts=(b, b), dims=(2, 3))  # noqa: E731
    out_s = halo_attention_2d(sh(q), sh(k), sh(v), **kw)
    assert (out_s[:, :, 8:12, 8:12] - out[:, :, 4:8, 4:8]).abs().max().item() < TOL


def test_module_spatial_and_sequence_gradients():
    layer = az.create("halo", 32, 2, block_size=4, halo_size=1).double()
    x = rand(2, 9, 7, 32, seed=1)
    y = layer(x)
    layer.impl = "reference"
    assert y.shape == x.shape and (layer(x) - y).abs().max().item() < TOL
    layer.impl = "fast"
    y.square().sum().backward()
    assert layer.rel_h.grad.abs().sum() > 0 and layer.rel_w.grad.abs().sum() > 0
    assert layer(rand(2, 30, 32, seed=2)).shape == (2, 30, 32)


def test_backward_runs_through_the_fast_form():
    q, k, v = (rand(2, 2, 45, 12, seed=s).float().requires_grad_(True) for s in (1, 2, 3))
    rh, rw = (t.float().requires_grad_(True) for t in tables(4, 2, 12))
    halo_attention(q, k, v, block_size=4, halo_size=2, rel_h=rh, rel_w=rw).square().sum().backward()
    for t in (q, k, v, rw):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_cost_counts():
    """2-D FLOPs = 4 N w^2 d (content) + 4 N (2w - 1) d (relative tables): linear in the pixel count N."""
    b, h, d = 8, 3, 16
    win = b + 2 * h
    rt = torch.randn(2 * win - 1, d)
    for side in (16, 32, 64):
        q, k, v = (torch.randn(1, 1, side, side, d) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            halo_attention_2d(q, k, v, block_size=b, halo_size=h, rel_h=rt, rel_w=rt)
        n = side * side
        assert fc.get_total_flops() == 4 * n * win * win * d + 4 * n * (2 * win - 1) * d

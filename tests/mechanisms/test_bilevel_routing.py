"""Bi-Level Routing Attention (BiFormer, arXiv 2303.08810): fast == dense reference, paper identities, cost.

Tolerances: float64, 1e-10 (gathered vs dense forms differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.bilevel_routing import (
    bilevel_routing_attention,
    bilevel_routing_attention_2d,
    bilevel_routing_attention_2d_reference,
    bilevel_routing_attention_reference,
    local_context_enhancement,
)

F64 = torch.float64
TOL = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("region_size,topk", [(8, 2), (5, 3), (16, 100)])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_1d_fast_matches_reference(n, region_size, topk, masked):
    q, k, v = rand(2, 2, n, 12, seed=1), rand(2, 2, n, 12, seed=2), rand(2, 2, n, 12, seed=3)
    kw = dict(region_size=region_size, topk=topk, lce_weight=rand(24, 1, 3, 3, seed=4), lce_bias=rand(24, seed=5))
    if masked:
        kpm = torch.zeros(2, n, dtype=torch.bool)
        kpm[0, n // 3 :: 2] = True
        kw["key_padding_mask"] = kpm
    a = bilevel_routing_attention(q, k, v, **kw)
    b = bilevel_routing_attention_reference(q, k, v, **kw)
    assert (a - b).abs().max().item() < TOL


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (5, 3)])
def test_2d_fast_matches_reference(grid):
    q, k, v = (rand(2, 2, *grid, 12, seed=s) for s in (1, 2, 3))
    kw = dict(n_win=3, topk=2, lce_weight=rand(24, 1, 5, 5, seed=4), lce_bias=rand(24, seed=5))
    a = bilevel_routing_attention_2d(q, k, v, **kw)
    b = bilevel_routing_attention_2d_reference(q, k, v, **kw)
    assert (a - b).abs().max().item() < TOL


def test_all_regions_routed_is_global_attention_plus_lce():
    q, k, v = (rand(2, 2, 6, 6, 12, seed=s) for s in (1, 2, 3))
    flat = lambda t: t.reshape(2, 2, 36, -1)  # noqa: E731
    out = bilevel_routing_attention_2d(q, k, v, n_win=3, topk=9)
    assert (flat(out) - reference_attention(flat(q), flat(k), flat(v))).abs().max().item() < TOL
    w = rand(24, 1, 3, 3, seed=9)
    out_lce = bilevel_routing_attention_2d(q, k, v, n_win=3, topk=9, lce_weight=w)
    conv = F.conv2d(v.permute(0, 1, 4, 2, 3).reshape(2, 24, 6, 6), w, padding=1, groups=24)
    conv = conv.view(2, 2, 12, 6, 6).permute(0, 1, 3, 4, 2)
    assert (out_lce - out - conv).abs().max().item() < TOL
    # 1-D as well, and the official scale quirk is the global scale (H d)^-1/2
    q1, k1, v1 = (rand(1, 4, 40, 8, seed=s) for s in (6, 7, 8))
    assert (bilevel_routing_attention(q1, k1, v1, region_size=8, topk=5) - reference_attention(q1, k1, v1)).abs().max() < TOL
    quirk = bilevel_routing_attention(q1, k1, v1, region_size=8, topk=5, scale_mode="qk_dim")
    assert (quirk - reference_attention(q1, k1, v1, scale=(4 * 8) ** -0.5)).abs().max().item() < TOL


def test_unrouted_regions_do_not_matter():
    n, r = 48, 8  # 6 regions, each routed to 2
    q, k, v = (rand(1, 2, n, 16, seed=s) for s in (1, 2, 3))
    k[:, :, 16:24] = 3.0 * q[:, :, 0:8].mean(2, keepdim=True)  # region 2 is region 0's best key region
    out = bilevel_routing_attention(q, k, v, region_size=r, topk=2)
    qreg = q.view(1, 2, 6, r, 16).mean(3)
    kreg = k.view(1, 2, 6, r, 16).mean(3)
    routed = torch.einsum("bhid,bhjd->bij", qreg, kreg)[0, 0].topk(2).indices.tolist()
    assert 2 in routed
    other = next(j for j in range(6) if j not in routed)
    v2 = v.clone()
    v2[:, :, other * r : (other + 1) * r] += 10.0
    out2 = bilevel_routing_attention(q, k, v2, region_size=r, topk=2)
    assert (out2[:, :, 0:r] - out[:, :, 0:r]).abs().max().item() < TOL
    v3 = v.clone()
    v3[:, :, 16:24] += 10.0
    assert (bilevel_routing_attention(q, k, v3, region_size=r, topk=2)[:, :, 0:r] - out[:, :, 0:r]).abs().max() > 1e-3


def test_ties_broken_toward_lower_region():
    q = torch.ones(1, 1, 16, 4, dtype=F64)
    k = torch.ones(1, 1, 16, 4, dtype=F64)  # every region has the same affinity
    v = torch.arange(16, dtype=F64).view(1, 1, 16, 1).expand(1, 1, 16, 4).contiguous()
    out = bilevel_routing_attention(q, k, v, region_size=4, topk=2)
    # every region routes to regions 0 and 1: uniform average of values 0..7
    assert torch.allclose(out, torch.full_like(out, 3.5), atol=TOL, rtol=0)
    assert (out - bilevel_routing_attention_reference(q, k, v, region_size=4, topk=2)).abs().max() < TOL


def test_1d_lce_is_centre_row_of_the_kernel():
    v = rand(1, 2, 10, 3, seed=1)
    w = rand(6, 1, 5, 5, seed=2)
    out = local_context_enhancement(v, w, None)
    conv = F.conv1d(v.permute(0, 1, 3, 2).reshape(1, 6, 10), w[:, :, 2], padding=2, groups=6)
    assert (out - conv.view(1, 2, 3, 10).permute(0, 1, 3, 2)).abs().max().item() < TOL


def test_module_spatial_and_sequence():
    layer = az.create("bilevel_routing", 64, 2, n_win=7, topk=4).double()
    x = rand(2, 14, 14, 64, seed=1)
    y = layer(x)
    layer.impl = "reference"
    assert y.shape == x.shape and (layer(x) - y).abs().max().item() < TOL
    layer.impl = "fast"
    y.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer(rand(2, 50, 64, seed=2)).shape == (2, 50, 64)


def test_backward_runs_through_the_fast_form():
    q, k, v = (rand(2, 2, 45, 12, seed=s).float().requires_grad_(True) for s in (1, 2, 3))
    bilevel_routing_attention(q, k, v, region_size=8, topk=2).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_cost_counts():
    """FLOPs = token attention 4 N (topk r) d + region affinity 2 R^2 d: linear in N at fixed R-size
    except the small R^2 routing term (R = N / r)."""
    d, r, topk = 16, 32, 2
    for n in (512, 1024, 2048):
        q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            bilevel_routing_attention(q, k, v, region_size=r, topk=topk)
        nr = n // r
        assert fc.get_total_flops() == 4 * n * topk * r * d + 2 * nr * nr * d
        assert fc.get_total_flops() < 0.15 * 4 * n * n * d

"""TransNeXt aggregated attention and ConvGLU.

Tolerances: float64 comparisons use 1e-10 (fast and per-pixel reference forms differ in summation
order only); float32 checks use 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.mechanisms.vision.aggregated import ConvGLU, cpb_offsets

F64 = torch.float64
TOL = 1e-10


def _module(dim=24, heads=2, seed=0, **cfg):
    torch.manual_seed(seed)
    cfg.setdefault("cpb_hidden", 16)
    m = az.create("aggregated", dim, heads, **cfg).to(F64).eval()
    with torch.no_grad():  # non-zero learnable bias so that it is exercised
        if m.learnable_bias is not None:
            m.learnable_bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("cfg", [{}, {"shared_kv": True}, {"learnable_tokens": False}, {"window_size": 5, "pool_size": 2}, {"window_size": 1}])
@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (2, 3)])
def test_fast_matches_reference(grid, cfg):
    m = _module(**cfg)
    x = torch.randn(2, *grid, 24, dtype=F64)
    with torch.no_grad():
        fast = m(x)
        m.impl = "reference"
        ref = m(x)
    assert fast.shape == x.shape
    assert (fast - ref).abs().max() < TOL


def test_cosine_attention_invariant_to_query_key_scale():
    """Scaling W_q and W_k (both paths) by any c > 0 leaves the output unchanged."""
    m = _module(qkv_bias=False)
    x = torch.randn(2, 6, 7, 24, dtype=F64)
    with torch.no_grad():
        y = m(x)
        m.q_proj.weight.mul_(3.7)
        m.k_proj.weight.mul_(0.2)
        m.k_pool_proj.weight.mul_(11.0)
        y2 = m(x)
    assert (y - y2).abs().max() < TOL


def test_weights_over_valid_window_and_pool_sum_to_one():
    """Without learnable tokens, constant values give that constant back everywhere (corners included):
    the weights over the valid window slots plus the pooled tokens sum to 1 and padded slots get none."""
    m = _module(learnable_tokens=False, qkv_bias=True)
    c = torch.randn(24, dtype=F64)
    with torch.no_grad():
        for proj in (m.v_proj, m.v_pool_proj):
            proj.weight.zero_()
            proj.bias.copy_(c)
        m.out_proj.weight.copy_(torch.eye(24, dtype=F64))
        m.out_proj.bias.zero_()
        x = torch.randn(1, 5, 6, 24, dtype=F64)
        y = m(x)
    assert (y - c).abs().max() < TOL


def test_length_scale_and_learnable_tokens_matter():
    m = _module()
    x = torch.randn(1, 5, 5, 24, dtype=F64)
    with torch.no_grad():
        y = m(x)
        m.learnable_tokens.zero_()
        m.learnable_bias.zero_()
        y0 = m(x)
    assert (y - y0).abs().max() > 1e-4


def test_shared_kv_flag():
    a = az.create("aggregated", 24, 2, qkv_bias=True)
    b = az.create("aggregated", 24, 2, qkv_bias=True, shared_kv=True)
    na = sum(p.numel() for p in a.parameters())
    nb = sum(p.numel() for p in b.parameters())
    assert na - nb == 2 * (24 * 24 + 24)
    assert b.k_pool_proj is None


def test_local_path_receptive_field():
    """With the pooled path's value projection zeroed, pixel p sees x only in its k x k window
    (plus, through the pooled *keys* and the pooled softmax share, every pixel: checked to be zero
    only when the pooled keys do not depend on x, i.e. sr weight zero)."""
    m = _module(window_size=3, pool_size=2)
    with torch.no_grad():
        m.v_pool_proj.weight.zero_()
        m.sr.weight.zero_()
    x = torch.randn(1, 6, 7, 24, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x)[0, 2, 3].sum(), x)
    dep = g[0].abs().sum(-1) > 0
    expected = torch.zeros(6, 7, dtype=torch.bool)
    expected[1:4, 2:5] = True
    assert torch.equal(dep, expected)


def test_cpb_offsets_log_spaced():
    rel = cpb_offsets(5, 5, 1, 1, dtype=F64)  # one pooled cell centred at (2, 2)
    # pixel (0, 0): offset -2 rows, -2 cols -> -2/4*8 = -4 -> -log2(5)/log2(8)
    assert torch.allclose(rel[0, 0], torch.full((2,), -math.log2(5) / 3, dtype=F64))
    assert torch.equal(rel[12, 0], torch.zeros(2, dtype=F64))


def test_temperature_init():
    m = az.create("aggregated", 24, 2)
    assert torch.allclose(torch.nn.functional.softplus(m.temperature.detach()), torch.full((2,), 1 / 0.24))


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
def test_shapes_dtype_gradients(grid):
    m = az.create("aggregated", 32, 4, pool_size=3)
    x = torch.randn(2, *grid, 32)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bad_settings():
    with pytest.raises(ValueError):
        az.create("aggregated", 24, 2, window_size=4)
    with pytest.raises(ValueError):
        az.create("aggregated", 24, 2, pool_size=0)
    with pytest.raises(az.UnsupportedError):
        az.create("aggregated", 24, 2)(torch.randn(1, 5, 24))


# -- ConvGLU ----------------------------------------------------------------------------------------
def test_convglu_shapes_and_hidden_width():
    glu = ConvGLU(24, mlp_ratio=4.0)
    assert glu.hidden == int(2 * 96 / 3) == 64
    assert glu.fc1.out_features == 128 and glu.fc2.in_features == 64
    x = torch.randn(2, 7, 9, 24)
    assert glu(x).shape == x.shape
    t = x.reshape(2, 63, 24)
    assert (glu(t, size=(7, 9)) - glu(x).reshape(2, 63, 24)).abs().max() < 1e-5
    with pytest.raises(ValueError):
        glu(t)


def test_convglu_equation_and_kernel_one_is_pointwise():
    torch.manual_seed(0)
    glu = ConvGLU(8, hidden_dim=12).to(F64)
    x = torch.randn(1, 4, 5, 8, dtype=F64)
    a, g = glu.fc1(x).split(8, dim=-1)
    conv = torch.nn.functional.conv2d(a.permute(0, 3, 1, 2), glu.dwconv.weight, glu.dwconv.bias, padding=1, groups=8)
    expected = glu.fc2(torch.nn.functional.gelu(conv.permute(0, 2, 3, 1)) * g)
    assert (glu(x) - expected).abs().max() < TOL
    point = ConvGLU(8, hidden_dim=12, kernel_size=1).to(F64)
    perm = torch.randperm(20)
    flat = x.reshape(1, 20, 8)
    y = point(x).reshape(1, 20, 8)[:, perm]
    yp = point(flat[:, perm].reshape(1, 4, 5, 8)).reshape(1, 20, 8)
    assert (y - yp).abs().max() < TOL

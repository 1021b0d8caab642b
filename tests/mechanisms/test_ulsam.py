"""ULSAM: subspace attention maps, both layouts, fast == reference, and the parameter overhead claim.

Tolerances: float64 comparisons use 1e-10 (same maths, different order); float32 checks 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo as az
from attnzoo.mechanisms.vision.ulsam import ULSAM, ulsam_param_count

F64 = torch.float64
TOL = 1e-10


def _module(dim=24, g=4, **cfg):
    torch.manual_seed(0)
    m = az.create("ulsam", dim, g, **cfg).to(F64)
    if m.bn_dw is not None:  # non-trivial running statistics and affine parameters
        with torch.no_grad():
            for bn in (m.bn_dw, m.bn_pw):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("norm_act", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
def test_fast_matches_reference(norm_act, train, grid):
    if train and grid == (1, 1) and norm_act:
        grid = (2, 1)  # batch statistics need more than one value per channel
    m = _module(norm_act=norm_act).train(train)
    x = torch.randn(2, 24, *grid, dtype=F64)
    with torch.no_grad():
        state = {k: v.clone() for k, v in m.state_dict().items()}
        fast = m.forward_nchw(x)
        m.load_state_dict(state)  # undo the running-stat update of the fast form
        m.impl = "reference"
        ref = m.forward_nchw(x)
    assert fast.shape == x.shape
    assert (fast - ref).abs().max() < TOL


def test_maps_are_distributions_and_output_rule():
    m = _module(g=3, dim=12).eval()
    x = torch.randn(2, 12, 5, 6, dtype=F64)
    with torch.no_grad():
        a = m.attention_maps(x)
        y = m.forward_nchw(x)
    assert a.shape == (2, 3, 5, 6) and (a >= 0).all()
    assert (a.sum(dim=(2, 3)) - 1).abs().max() < TOL
    # F^_n = A_n * F_n + F_n, the map broadcast over the 4 channels of each subspace
    expected = x * (1 + a.repeat_interleave(4, dim=1))
    assert (y - expected).abs().max() < TOL
    xp = x.abs()
    assert (m.forward_nchw(xp) >= xp).all()


def test_one_subspace_shares_one_map():
    m = _module(g=1, dim=8).eval()
    x = torch.rand(1, 8, 4, 4, dtype=F64) + 0.1
    with torch.no_grad():
        ratio = m.forward_nchw(x) / x
    assert (ratio - ratio[:, :1]).abs().max() < TOL


def test_layouts_agree():
    m = _module().eval()
    x = torch.randn(2, 24, 5, 7, dtype=F64)
    with torch.no_grad():
        nchw = m.forward_nchw(x)
        nhwc = m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        cf = _module(channels_first=True).eval()
        cf.load_state_dict(m.state_dict())
        assert (cf(x) - nchw).abs().max() < TOL
    assert (nhwc - nchw).abs().max() < TOL
    with pytest.raises(ValueError):
        m.forward_nchw(torch.randn(2, 23, 5, 7, dtype=F64))
    with pytest.raises(az.UnsupportedError):
        m(torch.randn(2, 5, 24, dtype=F64))


def test_equation_written_out_for_one_subspace():
    """A_1 = softmax(PW(maxpool3x3(DW(F_1)))) with explicit loops over pixels."""
    m = _module(g=2, dim=4).eval()
    x = torch.randn(1, 4, 3, 4, dtype=F64)
    with torch.no_grad():
        a = m.attention_maps(x)[0, 0]
        f = x[0, :2] * m.dw_weight[:2, None, None] + m.dw_bias[:2, None, None]
        logits = torch.empty(3, 4, dtype=F64)
        for i in range(3):
            for j in range(4):
                pooled = f[:, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].amax(dim=(1, 2))
                logits[i, j] = (pooled * m.pw_weight[0]).sum() + m.pw_bias[0]
        expected = torch.softmax(logits.flatten(), 0).view(3, 4)
    assert (a - expected).abs().max() < TOL


def _mobilenet_v1_block(c: int) -> nn.Module:
    """Depthwise-separable MobileNet-V1 block c -> c: DW 3x3 + BN + ReLU, PW 1x1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
    )


@pytest.mark.parametrize("channels", [512, 1024])
@pytest.mark.parametrize("norm_act", [False, True])
def test_parameter_overhead_under_one_percent(channels, norm_act):
    """The paper's claim on a MobileNet-V1 block of 512 / 1024 channels (where ULSAM is inserted), g = 4."""
    block = _mobilenet_v1_block(channels)
    ulsam = az.create("ulsam", channels, 4, norm_act=norm_act)
    n_block = sum(p.numel() for p in block.parameters())
    n_ulsam = sum(p.numel() for p in ulsam.parameters())
    assert n_ulsam == ulsam_param_count(channels, 4, norm_act)
    ratio = n_ulsam / n_block
    print(f"\nULSAM(C={channels}, g=4, norm_act={norm_act}): {n_ulsam} params; MobileNet-V1 block: {n_block}; overhead {100 * ratio:.3f}%")
    assert ratio < 0.01
    # and it works as a plug-in on the block's output
    x = torch.randn(1, channels, 7, 7)
    ulsam_cf = ULSAM(channels, 4, channels_first=True, norm_act=norm_act).eval()
    y = ulsam_cf(block.eval()(x))
    assert y.shape == x.shape


def test_no_projections_and_gradients():
    m = az.create("ulsam", 16, 4)
    assert m.q_proj is None and m.out_proj is None
    x = torch.randn(2, 7, 9, 16)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

"""ULSAM: ultra-lightweight subspace attention for CNN feature maps (``ulsam``).

Paper: "ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural
Networks" (Saini, Jha, Das, Mittal, Mohan; WACV 2020, arXiv 2006.15102 — the issue text lists
1909.13469, but the arXiv record of this title is 2006.15102). Official code read (not copied):
``Nandan91/ULSAM``, ``ulsam.py`` (``SubSpace``, ``ULSAM``).

Equations: the ``C`` channels of a feature map ``F (B, C, H, W)`` are split into ``g`` subspaces
``F_1 .. F_g`` of ``C / g`` channels; for each subspace

    A_n  = softmax_{H W}( PW( maxpool_{3x3, stride 1}( DW(F_n) ) ) )      (one map, sums to 1 over H W)
    F^_n = A_n * F_n + F_n                                                 (map broadcast over the channels)

and ``F^ = concat(F^_1 .. F^_g)``. ``DW`` is a depthwise 1x1 convolution (a per-channel affine map),
``PW`` a pointwise 1x1 convolution ``C/g -> 1``. There are no query/key/value or output projections:
the module adds ``4 C + ... `` parameters only (``2 C`` for DW, ``C + g`` for PW, plus ``2 C + 2 g``
BatchNorm affine parameters with ``norm_act=True``), under 1% of a MobileNet block (see the tests).

Paper vs official code: the code puts BatchNorm + ReLU after DW and after PW (and builds the
BatchNorms with ``momentum=0.9``, which in PyTorch means a 90% weight on the *new* batch); the
equation above has neither. Default ``norm_act=False`` is the equation; ``norm_act=True`` gives the
code's BatchNorm + ReLU (with PyTorch's default momentum 0.1; pass ``bn_momentum=0.9`` to copy the code).

Layouts: registered as a ``spatial`` mechanism, so ``module(x)`` with ``x (B, H, W, C)`` works like every
other 2-D mechanism; the CNN form ``(B, C, H, W)`` is :meth:`ULSAM.forward_nchw`, or build with
``channels_first=True`` to make ``module(x)`` read 4-D inputs as ``(B, C, H, W)`` (drop-in for a CNN).
``num_heads`` is the number of subspaces ``g`` (``C % g == 0``).

Fast form: all subspaces at once (grouped 1x1 convolution, fused max-pool); reference form: one
subspace at a time with the pooling written as a maximum over the nine shifted copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import check_tensor
from ...core.module import AttentionModule
from ...registry import register

NAME = "ulsam"


def _bn(x: Tensor, bn: nn.BatchNorm2d, training: bool) -> Tensor:
    return F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=training, momentum=bn.momentum, eps=bn.eps
    )


def _bn_reference(x: Tensor, bn: nn.BatchNorm2d, idx: slice | int, training: bool) -> Tensor:
    """BatchNorm written out: ``(x - mean) / sqrt(var + eps) * gamma + beta`` (batch stats in training)."""
    if training:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean = bn.running_mean[idx].to(x.dtype).view(1, -1, 1, 1)
        var = bn.running_var[idx].to(x.dtype).view(1, -1, 1, 1)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[idx].view(1, -1, 1, 1) + bn.bias[idx].view(1, -1, 1, 1)


@register(
    NAME,
    paper="ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural Networks",
    arxiv="2006.15102",
    family="vision",
    capabilities={"spatial", "trainable"},
    complexity="time O(N C), memory O(N C); about 3 C + g parameters",
    defaults={"norm_act": False, "bn_momentum": 0.1, "channels_first": False},
    summary="one softmax spatial map per channel subspace (DW 1x1, max-pool 3x3, PW 1x1), applied as x * (1 + A)",
    deviations="norm_act=True adds the official code's BatchNorm + ReLU (absent from the paper's equation); "
    "num_heads is the number of subspaces; BN momentum 0.1 by default (code: 0.9)",
    test_config={},
)
class ULSAM(AttentionModule):
    """ULSAM plug-in. ``module(x)``: ``(B, H, W, C)`` (or ``(B, C, H, W)`` with ``channels_first=True``);
    :meth:`forward_nchw` always takes the CNN layout ``(B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        # no projections: ULSAM acts on the feature map directly
        self.q_proj = self.k_proj = self.v_proj = self.out_proj = None
        g = num_heads
        cg = dim // g
        self.num_splits = g
        bound = cg**-0.5  # PyTorch's Conv2d default init bounds (fan_in 1 for DW, C/g for PW)
        self.dw_weight = nn.Parameter(torch.empty(dim).uniform_(-1.0, 1.0))
        self.dw_bias = nn.Parameter(torch.empty(dim).uniform_(-1.0, 1.0))
        self.pw_weight = nn.Parameter(torch.empty(g, cg).uniform_(-bound, bound))
        self.pw_bias = nn.Parameter(torch.empty(g).uniform_(-bound, bound))
        if self.settings["norm_act"]:
            self.bn_dw = nn.BatchNorm2d(dim, momentum=self.settings["bn_momentum"])
            self.bn_pw = nn.BatchNorm2d(g, momentum=self.settings["bn_momentum"])
        else:
            self.bn_dw = self.bn_pw = None

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        if self.settings["channels_first"] and isinstance(x, Tensor) and x.dim() == 4:
            return self.forward_nchw(x)
        return super().forward(x, context, key_padding_mask)

    def forward_spatial(self, x: Tensor) -> Tensor:
        return self.forward_nchw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    # -- the CNN form -----------------------------------------------------------------------------
    def forward_nchw(self, x: Tensor) -> Tensor:
        """ULSAM on a CNN feature map ``(B, C, H, W)``; returns the same shape."""
        check_tensor(x, f"{NAME}: x")
        if x.dim() != 4 or x.shape[1] != self.dim or 0 in x.shape:
            raise ValueError(f"{NAME}: expected a (batch, {self.dim}, height, width) feature map, got {tuple(x.shape)}")
        attn = self.attention_maps(x)  # (B, g, H, W)
        return x * (1 + attn.repeat_interleave(self.dim // self.num_splits, dim=1))

    def attention_maps(self, x: Tensor) -> Tensor:
        """The subspace attention maps ``A (B, g, H, W)`` of a ``(B, C, H, W)`` map; each sums to 1 over ``H W``."""
        fn = self._maps_reference if self.impl == "reference" else self._maps_fast
        return fn(x)

    def _maps_fast(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = self.num_splits
        t = x * self.dw_weight.view(1, c, 1, 1) + self.dw_bias.view(1, c, 1, 1)
        if self.bn_dw is not None:
            t = F.relu(_bn(t, self.bn_dw, self.training))
        t = F.max_pool2d(t, kernel_size=3, stride=1, padding=1)
        t = F.conv2d(t, self.pw_weight.view(g, c // g, 1, 1), self.pw_bias, groups=g)
        if self.bn_pw is not None:
            t = F.relu(_bn(t, self.bn_pw, self.training))
        return torch.softmax(t.reshape(b, g, h * w), dim=-1).view(b, g, h, w)

    def _maps_reference(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        g = self.num_splits
        cg = c // g
        maps = []
        for n in range(g):
            sl = slice(n * cg, (n + 1) * cg)
            f = x[:, sl]
            t = f * self.dw_weight[sl].view(1, cg, 1, 1) + self.dw_bias[sl].view(1, cg, 1, 1)  # DW 1x1
            if self.bn_dw is not None:
                t = torch.clamp_min(_bn_reference(t, self.bn_dw, sl, self.training), 0.0)
            padded = F.pad(t, (1, 1, 1, 1), value=float("-inf"))
            shifted = [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)]
            t = torch.stack(shifted, dim=0).amax(dim=0)  # max-pool 3x3, stride 1
            a = (t * self.pw_weight[n].view(1, cg, 1, 1)).sum(dim=1, keepdim=True) + self.pw_bias[n]  # PW 1x1
            if self.bn_pw is not None:
                a = torch.clamp_min(_bn_reference(a, self.bn_pw, slice(n, n + 1), self.training), 0.0)
            e = torch.exp(a - a.amax(dim=(2, 3), keepdim=True))
            maps.append(e / e.sum(dim=(2, 3), keepdim=True))
        return torch.cat(maps, dim=1)


def ulsam_param_count(dim: int, num_splits: int, norm_act: bool = False) -> int:
    """Parameters ULSAM adds to a block of width ``dim`` (``2 C + C + g``, plus ``2 C + 2 g`` with BatchNorm)."""
    return 3 * dim + num_splits + (2 * dim + 2 * num_splits if norm_act else 0)


__all__ = ["ULSAM", "ulsam_param_count"]

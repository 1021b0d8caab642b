"""DaViT: channel group attention (``channel_group``) and spatial window attention (``spatial_window``).

Paper: "DaViT: Dual Attention Vision Transformers" (Ding, Xiao, Codella, Luo, Wang, Yuan;
ECCV 2022, arXiv 2204.03645). Official code read (not copied): ``dingmyu/davit``,
``timm/models/davit.py`` (``ChannelAttention``, ``WindowAttention``).

Channel group attention (``channel_group``), groups ``G = num_heads``, ``C_g = C / G`` channels per
group; for one group with ``Q, K, V`` of shape ``(N, C_g)`` (the *channel tokens* are the columns):

    A_channel(Q, K, V) = ( softmax( Q^T K / sqrt(C_g) ) V^T )^T = V softmax(Q^T K / sqrt(C_g))^T

``softmax`` is taken over the last index of the ``C_g x C_g`` map. The token axis is summed out in
``Q^T K``, so the map is global and the cost is ``O(N C_g^2)`` per group; permuting the ``N`` tokens
permutes the output in the same way (the property checked in the tests).

Official-code quirk, offered as ``map_from="kv"``: the code builds the channel map from ``k`` and
``v`` and applies it to ``q``: ``M = softmax(K^T V / sqrt(C_g))``, ``out = Q M^T``. Structurally the
same operator with the three projections renamed; the default ``map_from="qk"`` is the paper's
equation. ``key_padding_mask``: a padded token is left out of the token sum (its row of ``K`` is
zeroed); the other tokens' outputs are then exactly those of the unpadded sequence.

Spatial window attention (``spatial_window``): the ``H x W`` grid is split into non-overlapping
``w x w`` windows (``window_size``, default 7) and plain multi-head softmax attention
``softmax(q k^T / sqrt(d)) v`` runs inside each window (no relative position bias, no shifted
windows, as in the paper and code). Grids that are not multiples of ``w`` are padded at the
bottom/right. Padding choice (``pad_mode``): ``"mask"`` (default) masks the padded positions, so
every window is attention over its real tokens only; ``"zeros"`` is the official code's behaviour:
the *input* is zero-padded before the q/k/v projection and the padded tokens take part as keys
(key = value = projection bias).

Deviations: the DaViT blocks around the attention (ConvPosEnc depthwise convolutions, MLP) are not
part of these modules (use :class:`attnzoo.models.ViT` for a backbone); the official ``qkv`` bias
is on (``qkv_bias=True``) while the library's module default is ``qkv_bias=False``; pass
``qkv_bias=True`` to match. The paper (and code) give no causal or decoding form and none is offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import get, pattern_name, register

CHANNEL = "channel_group"
WINDOW = "spatial_window"


# -- shared helpers for the vision modules of this package ------------------------------------------
def require_pattern(name: str, causal: bool, cross: bool) -> None:
    get(name).require(pattern_name(bool(causal), bool(cross)))


# -- channel group attention ------------------------------------------------------------------------
def _check_map_from(map_from: str) -> None:
    if map_from not in ("qk", "kv"):
        raise ValueError(f"{CHANNEL}: map_from must be 'qk' (paper) or 'kv' (official code), got {map_from!r}")


def channel_group_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    map_from: str = "qk",
    scale: float | None = None,
) -> Tensor:
    """Channel group attention on per-head tensors ``(B, G, N, C_g)`` (a head is a channel group)."""
    require_pattern(CHANNEL, causal, cross)
    _check_map_from(map_from)
    k, v = expand_kv(k, v, q.shape[1])
    s = q.shape[-1] ** -0.5 if scale is None else scale
    if key_padding_mask is not None:
        k = k.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    if map_from == "qk":
        amap = torch.softmax(torch.matmul(q.transpose(-1, -2), k) * s, dim=-1)  # (B, G, C_g, C_g)
        return torch.matmul(v, amap.transpose(-1, -2))
    amap = torch.softmax(torch.matmul(k.transpose(-1, -2), v) * s, dim=-1)
    return torch.matmul(q, amap.transpose(-1, -2))


def channel_group_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    map_from: str = "qk",
    scale: float | None = None,
) -> Tensor:
    """The paper's equation, one (batch, group) at a time, padded tokens dropped from the token sum."""
    require_pattern(CHANNEL, causal, cross)
    _check_map_from(map_from)
    k, v = expand_kv(k, v, q.shape[1])
    b, g, n, c = q.shape
    s = c**-0.5 if scale is None else scale
    out = torch.empty(b, g, n, v.shape[-1], dtype=q.dtype, device=q.device)
    for bi in range(b):
        keep = slice(None) if key_padding_mask is None else ~key_padding_mask[bi]
        for gi in range(g):
            Q, K, V = q[bi, gi], k[bi, gi], v[bi, gi]  # (N, C_g) each
            if map_from == "qk":
                A = torch.softmax((Q[keep].T @ K[keep]) * s, dim=-1)  # (C_g, C_g)
                out[bi, gi] = (A @ V.T).T
            else:
                A = torch.softmax((K[keep].T @ V[keep]) * s, dim=-1)
                out[bi, gi] = (A @ Q.T).T
    return out


@register(
    CHANNEL,
    paper="DaViT: Dual Attention Vision Transformers",
    arxiv="2204.03645",
    family="vision",
    capabilities={"noncausal_self", "spatial", "key_padding_mask", "trainable"},
    complexity="time O(N C^2 / G), memory O(C^2 / G) for the maps",
    functional=channel_group_attention,
    reference=channel_group_attention_reference,
    defaults={"map_from": "qk", "scale": None},
    summary="attention among channel tokens within each of G channel groups; global over positions, linear in N",
    deviations="map_from='kv' reproduces the official code (map from k and v, applied to q); "
    "ConvPosEnc/MLP of the DaViT block are not part of the module",
    test_config={},
)
class ChannelGroupAttention(AttentionModule):
    """DaViT channel group attention; ``num_heads`` is the number of channel groups ``G``.

    Takes ``(B, N, C)`` sequences (it is permutation-equivariant over positions) and ``(B, H, W, C)``
    grids (flattened row-major; the result does not depend on the order).
    """


    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        t = x.reshape(b, hh * ww, c)
        q, k, v = self.project(t, None)
        out = self.attend(q, k, v, cross=False, key_padding_mask=None)
        return self.out_proj(merge_heads(out)).view(b, hh, ww, c)


# -- spatial window attention -----------------------------------------------------------------------
def _check_window(window_size: int, pad_mode: str) -> None:
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"{WINDOW}: window_size must be a positive int, got {window_size!r}")
    if pad_mode not in ("mask", "zeros"):
        raise ValueError(f"{WINDOW}: pad_mode must be 'mask' (default) or 'zeros' (official code), got {pad_mode!r}")


def window_attention_2d(q: Tensor, k: Tensor, v: Tensor, *, window_size: int, scale: float | None = None) -> Tensor:
    """Attention inside non-overlapping ``w x w`` windows of per-head grids ``(B, h, H, W, D)``.

    The grid is padded at the bottom/right to multiples of ``w``; padded positions are masked keys
    and their query rows are dropped.
    """
    b, h, hh, ww, d = q.shape
    w = window_size
    ph, pw = (-hh) % w, (-ww) % w
    nh, nw = (hh + ph) // w, (ww + pw) // w

    def part(t: Tensor) -> Tensor:
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
        t = t.view(b, h, nh, w, nw, w, t.shape[-1]).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(b, h, nh * nw, w * w, t.shape[-1])

    mask = None
    if ph or pw:
        valid = torch.zeros(hh + ph, ww + pw, dtype=torch.bool, device=q.device)
        valid[:hh, :ww] = True
        mask = valid.view(nh, w, nw, w).permute(0, 2, 1, 3).reshape(nh * nw, 1, w * w)
    out = F.scaled_dot_product_attention(part(q), part(k), part(v), attn_mask=mask, scale=scale)
    out = out.view(b, h, nh, nw, w, w, -1).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, hh + ph, ww + pw, -1)
    return out[:, :, :hh, :ww]


def window_attention_2d_reference(q: Tensor, k: Tensor, v: Tensor, *, window_size: int, scale: float | None = None) -> Tensor:
    """Full attention over the flattened grid with the mask "same ``w x w`` window" (no padding needed)."""
    b, h, hh, ww, d = q.shape
    rows = torch.arange(hh, device=q.device).repeat_interleave(ww)
    cols = torch.arange(ww, device=q.device).repeat(hh)
    win = (rows // window_size) * (ww // window_size + 2) + cols // window_size  # a distinct id per window
    same = win[:, None] == win[None, :]
    flat = lambda t: t.reshape(b, h, hh * ww, t.shape[-1])  # noqa: E731
    out = reference_attention(flat(q), flat(k), flat(v), same, scale=scale)
    return out.reshape(b, h, hh, ww, -1)


@register(
    WINDOW,
    paper="DaViT: Dual Attention Vision Transformers",
    arxiv="2204.03645",
    family="vision",
    capabilities={"spatial", "trainable"},
    complexity="time O(N w^2 d), memory O(N w^2) per head",
    defaults={"window_size": 7, "pad_mode": "mask", "scale": None},
    summary="multi-head softmax attention inside non-overlapping w x w windows (no shift, no relative bias)",
    deviations="pad_mode='zeros' reproduces the official code (zero-padded inputs take part as keys); "
    "the default masks the padding",
    test_config={"window_size": 4},
)
class SpatialWindowAttention(AttentionModule):
    """DaViT spatial window attention on ``(B, H, W, C)`` grids (spatial only)."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        _check_window(self.settings["window_size"], self.settings["pad_mode"])


    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        s = self.settings
        w = s["window_size"]
        if s["pad_mode"] == "zeros":  # official code: pad the input, the padded tokens are real keys
            x = F.pad(x, (0, 0, 0, (-ww) % w, 0, (-hh) % w))
        gh, gw = x.shape[1], x.shape[2]
        h = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(b, gh, gw, h, -1).permute(0, 3, 1, 2, 4)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        fn = window_attention_2d_reference if self.impl == "reference" else window_attention_2d
        out = fn(q, k, v, window_size=w, scale=s["scale"])
        out = out.permute(0, 2, 3, 1, 4).reshape(b, gh, gw, -1)[:, :hh, :ww]
        return self.out_proj(out)


__all__ = [
    "ChannelGroupAttention",
    "SpatialWindowAttention",
    "channel_group_attention",
    "channel_group_attention_reference",
    "window_attention_2d",
    "window_attention_2d_reference",
]

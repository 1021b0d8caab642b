"""Bi-Level Routing Attention (BRA) with local context enhancement (LCE), 1-D and 2-D.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al., CVPR 2023,
arXiv 2303.08810); official code rayleizhu/BiFormer (``ops/torch/bra.py``, read, not copied).

Equations (per image / sequence; ``q, k, v`` are the projected tokens, ``H`` heads of width ``d``):

1. Partition the tokens into regions: an ``S x S`` grid of regions for a 2-D map (``n_win = S``),
   consecutive runs of ``region_size`` tokens for a 1-D sequence.
2. Region-level queries and keys are the means over each region's tokens:
   ``Q^r = mean(q)``, ``K^r = mean(k)`` over all heads' channels (the routing is shared by the
   heads, as in the paper, where ``Q^r, K^r`` live in the full ``qk_dim``).
3. Region affinity ``A^r = Q^r (K^r)^T`` and routing ``I^r = topk(A^r, topk)`` (row-wise; the
   routing is an index, so no gradient flows through it, as the paper's default).
4. Each region's queries attend, per head, to the tokens of its ``topk`` routed regions gathered
   together: ``O_i = softmax(q_i K_g^T * scale) V_g``.
5. LCE: ``O += DWConv_{k x k}(V)`` on the full-resolution value map (``side_dwconv = k``; 0 = off).

Scale: the paper writes standard scaled dot-product attention, i.e. ``d^{-1/2}`` with ``d`` the
head width (``scale_mode="head_dim"``, the default). The official code scales both the routing
logits and the token attention by ``qk_dim^{-1/2}`` with ``qk_dim = H * d`` (all heads together);
``scale_mode="qk_dim"`` reproduces that quirk (it matters for loading released weights). The
routing scale never changes the top-k choice, only the token-attention scale matters.

Ties in the region affinities go to the lower region index (stable sort), in both forms.

Padding choice: a map (or sequence) that does not divide into the regions is padded at the
bottom/right (end) up to a multiple; padded positions are *masked*: they are excluded from the
region means and are never attended. (The official ``auto_pad`` pads the input with zeros before
the projection and lets the padded tokens take part; masking makes the result independent of the
padding, which is what a key padding mask needs.) A ``key_padding_mask`` (1-D) marks tokens that do
not exist: they leave the key set *and* the region query means (their own output rows are
meaningless). Region means of a region with no valid key are
``-inf`` affinity (never chosen ahead of a non-empty region). The LCE convolution zero-pads at the
border and sees padded (masked) keys' values as zeros.

Deviations: no kv downsampling (the released models use ``identity``); the routing weights
(``mul_weight``) are not used (the official default); 1-D regions are runs of ``region_size``
tokens, the paper is 2-D only. The block-level extras (depthwise positional conv, MLP, LayerNorm)
belong to the block, not to this attention layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv, validate_qkv
from ...core.module import AttentionModule
from ...core.reference import reference_attention, safe_softmax, stable_topk
from ...registry import register

NAME = "bilevel_routing"


def _check(causal: bool, cross: bool, topk: int, scale_mode: str) -> None:
    if causal or cross:
        raise ValueError(f"{NAME}: only non-causal self-attention is defined (got causal={causal}, cross={cross})")
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"{NAME}: topk must be a positive int, got {topk!r}")
    if scale_mode not in ("head_dim", "qk_dim"):
        raise ValueError(f"{NAME}: scale_mode must be 'head_dim' (paper) or 'qk_dim' (official code), got {scale_mode!r}")


def _scale(h: int, d: int, scale_mode: str) -> float:
    return 1.0 / math.sqrt(d if scale_mode == "head_dim" else h * d)


def local_context_enhancement(v: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise ``k x k`` convolution of the value map, zero padding. ``v (B, H, *grid, Dv)``.

    ``weight (H*Dv, 1, k, k)`` (odd ``k``); a 1-D sequence is treated as a ``1 x N`` map, so only
    the kernel's centre row acts on it.
    """
    b, h = v.shape[:2]
    grid = v.shape[2:-1]
    dv = v.shape[-1]
    ks = weight.shape[-1]
    if ks % 2 == 0:
        raise ValueError(f"{NAME}: the LCE kernel size must be odd, got {ks}")
    x = v.movedim(-1, 2).reshape(b, h * dv, *grid)  # (B, H*Dv, *grid)
    if len(grid) == 1:
        x = x[:, :, None]
    y = F.conv2d(x, weight.to(v.dtype), None if bias is None else bias.to(v.dtype), padding=ks // 2, groups=h * dv)
    if len(grid) == 1:
        y = y[:, :, 0]
    return y.reshape(b, h, dv, *grid).movedim(2, -1)


# ---------------------------------------------------------------------------------------------------
def _bra_core(qr: Tensor, kr: Tensor, vr: Tensor, real: Tensor, kvalid: Tensor, topk: int, scale: float) -> Tensor:
    """BRA on region-grouped tensors ``(B, H, R, r, D)``; ``real``/``kvalid`` ``(B, R, r)`` masks."""
    b, h, nr, r, d = qr.shape
    dv = vr.shape[-1]
    rq = real.to(qr.dtype)[:, None, :, :, None]
    rk = kvalid.to(kr.dtype)[:, None, :, :, None]
    q_reg = (qr * rq).sum(3) / rq.sum(3).clamp_min(1)  # (B, H, R, D)
    k_reg = (kr * rk).sum(3) / rk.sum(3).clamp_min(1)
    aff = torch.einsum("bhid,bhjd->bij", q_reg, k_reg)  # summed over heads: routing shared by heads
    aff = aff.masked_fill(~kvalid.any(-1)[:, None, :], float("-inf"))
    idx = stable_topk(aff, topk)  # (B, R, k)
    kk = idx.shape[-1]
    bi = torch.arange(b, device=qr.device)[:, None, None]
    kg = kr.permute(0, 2, 1, 3, 4)[bi, idx]  # (B, R, k, H, r, D)
    vg = vr.permute(0, 2, 1, 3, 4)[bi, idx]
    kg = kg.permute(0, 3, 1, 2, 4, 5).reshape(b, h, nr, kk * r, d)
    vg = vg.permute(0, 3, 1, 2, 4, 5).reshape(b, h, nr, kk * r, dv)
    mg = kvalid[bi, idx].reshape(b, 1, nr, 1, kk * r)
    s = torch.matmul(qr, kg.transpose(-1, -2)) * scale  # (B, H, R, r, k r)
    s = s.masked_fill(~mg, float("-inf"))
    return torch.matmul(safe_softmax(s), vg)  # (B, H, R, r, Dv)


def bilevel_routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    region_size: int = 16,
    topk: int = 4,
    scale_mode: str = "head_dim",
    lce_weight: Tensor | None = None,
    lce_bias: Tensor | None = None,
) -> Tensor:
    """1-D BRA on ``q, k, v (B, H, N, D)``: regions of ``region_size`` consecutive tokens, gathered."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(causal, cross, topk, scale_mode)
    if not isinstance(region_size, int) or region_size < 1:
        raise ValueError(f"{NAME}: region_size must be a positive int, got {region_size!r}")
    k, v = expand_kv(k, v, q.shape[1])
    b, h, n, d = q.shape
    r = region_size
    nr = -(-n // r)
    pad = nr * r - n
    # a padded token (key_padding_mask) is no token at all: out of the key set and of the query means
    real = torch.ones(b, n, dtype=torch.bool, device=q.device) if key_padding_mask is None else ~key_padding_mask
    real = F.pad(real, (0, pad)).view(b, nr, r)
    kvalid = real
    grp = lambda t: F.pad(t, (0, 0, 0, pad)).view(b, h, nr, r, t.shape[-1])  # noqa: E731
    out = _bra_core(grp(q), grp(k), grp(v), real, kvalid, topk, _scale(h, d, scale_mode))
    out = out.reshape(b, h, nr * r, -1)[:, :, :n]
    if lce_weight is not None:
        vm = v if key_padding_mask is None else v.masked_fill(key_padding_mask[:, None, :, None], 0.0)
        out = out + local_context_enhancement(vm, lce_weight, lce_bias)
    return out


def _reference_dense(q, k, v, region_of: Tensor, nr: int, kvalid: Tensor, topk: int, scale: float) -> Tensor:
    """Dense form: region means by one-hot averaging, rank-based top-k, masked softmax.

    ``kvalid (B, N)``: tokens that exist; padded ones are out of both region means and the key set.
    """
    onehot = F.one_hot(region_of, nr).to(q.dtype)  # (N, R)
    wk = onehot[None] * kvalid[:, :, None].to(q.dtype)  # (B, N, R): tokens that exist (not padded)
    qreg = torch.einsum("bnr,bhnd->bhrd", wk, q) / wk.sum(1).clamp_min(1)[:, None, :, None]
    kreg = torch.einsum("bnr,bhnd->bhrd", wk, k) / wk.sum(1).clamp_min(1)[:, None, :, None]
    aff = torch.einsum("bhid,bhjd->bij", qreg, kreg)
    nonempty = wk.sum(1) > 0  # (B, R)
    aff = aff.masked_fill(~nonempty[:, None, :], float("-inf"))
    ar = torch.arange(nr, device=q.device)
    better = (aff[:, :, None, :] > aff[:, :, :, None]) | (
        (aff[:, :, None, :] == aff[:, :, :, None]) & (ar[None, :] < ar[:, None])
    )
    chosen = better.sum(-1) < topk  # (B, R, R): region j routed for region i
    allowed = chosen[:, region_of][:, :, region_of] & kvalid[:, None, :]  # (B, N, N)
    return reference_attention(q, k, v, allowed[:, None], scale=scale)


def bilevel_routing_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    region_size: int = 16,
    topk: int = 4,
    scale_mode: str = "head_dim",
    lce_weight: Tensor | None = None,
    lce_bias: Tensor | None = None,
) -> Tensor:
    """1-D BRA written densely: region ids, one-hot means, rank-based routing, masked softmax."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(causal, cross, topk, scale_mode)
    k, v = expand_kv(k, v, q.shape[1])
    b, h, n, d = q.shape
    region_of = torch.arange(n, device=q.device) // region_size
    nr = -(-n // region_size)
    kvalid = torch.ones(b, n, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    out = _reference_dense(q, k, v, region_of, nr, kvalid, topk, _scale(h, d, scale_mode))
    if lce_weight is not None:
        out = out + _lce_reference(v * kvalid[:, None, :, None].to(v.dtype), lce_weight, lce_bias)
    return out


def _lce_reference(v: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The depthwise convolution as an explicit sum of shifted copies (1-D: the kernel's centre row)."""
    b, h = v.shape[:2]
    dv = v.shape[-1]
    ks = weight.shape[-1]
    c = ks // 2
    w = weight.to(v.dtype).view(h, dv, ks, ks)
    out = torch.zeros_like(v)
    if v.dim() == 4:  # (B, H, N, Dv)
        n = v.shape[2]
        for dx in range(-c, c + 1):
            shifted = torch.zeros_like(v)
            lo, hi = max(0, -dx), min(n, n - dx)
            shifted[:, :, lo:hi] = v[:, :, lo + dx : hi + dx]
            out = out + shifted * w[:, :, c, c + dx][None, :, None, :]
    else:  # (B, H, Hg, Wg, Dv)
        hg, wg = v.shape[2], v.shape[3]
        for dy in range(-c, c + 1):
            for dx in range(-c, c + 1):
                shifted = torch.zeros_like(v)
                y0, y1 = max(0, -dy), min(hg, hg - dy)
                x0, x1 = max(0, -dx), min(wg, wg - dx)
                shifted[:, :, y0:y1, x0:x1] = v[:, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
                out = out + shifted * w[:, :, c + dy, c + dx][None, :, None, None, :]
    if bias is not None:
        shape = (1, h) + (1,) * (v.dim() - 3) + (dv,)
        out = out + bias.to(v.dtype).view(shape)
    return out


# -- 2-D ----------------------------------------------------------------------------------------------
def _check_grid(q: Tensor, k: Tensor, v: Tensor, n_win: int) -> None:
    for t, nm in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor) or t.dim() != 5:
            raise ValueError(f"{NAME}: 2-D form takes (B, H, height, width, D) tensors; {nm} has shape {tuple(getattr(t, 'shape', ()))}")
    if q.shape[2:4] != k.shape[2:4] or k.shape[:4] != v.shape[:4] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{NAME}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if not isinstance(n_win, int) or n_win < 1:
        raise ValueError(f"{NAME}: n_win must be a positive int, got {n_win!r}")


def bilevel_routing_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_win: int = 7,
    topk: int = 4,
    scale_mode: str = "head_dim",
    lce_weight: Tensor | None = None,
    lce_bias: Tensor | None = None,
) -> Tensor:
    """2-D BRA on maps ``(B, H, Hg, Wg, D)`` split into ``n_win x n_win`` regions (padded bottom/right, masked)."""
    _check_grid(q, k, v, n_win)
    _check(False, False, topk, scale_mode)
    k, v = expand_kv(k, v, q.shape[1])
    b, h, hg, wg, d = q.shape
    dv = v.shape[-1]
    rh, rw = -(-hg // n_win), -(-wg // n_win)
    ph, pw = rh * n_win - hg, rw * n_win - wg

    def grp(t: Tensor) -> Tensor:  # (B, H, Hg, Wg, C) -> (B, H, S*S, rh*rw, C)
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
        c = t.shape[-1]
        t = t.view(b, h, n_win, rh, n_win, rw, c).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(b, h, n_win * n_win, rh * rw, c)

    real = F.pad(torch.ones(b, hg, wg, dtype=torch.bool, device=q.device), (0, pw, 0, ph))
    real = real.view(b, n_win, rh, n_win, rw).permute(0, 1, 3, 2, 4).reshape(b, n_win * n_win, rh * rw)
    out = _bra_core(grp(q), grp(k), grp(v), real, real, topk, _scale(h, d, scale_mode))
    out = out.view(b, h, n_win, n_win, rh, rw, dv).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, n_win * rh, n_win * rw, dv)
    out = out[:, :, :hg, :wg]
    if lce_weight is not None:
        out = out + local_context_enhancement(v, lce_weight, lce_bias)
    return out


def bilevel_routing_attention_2d_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    n_win: int = 7,
    topk: int = 4,
    scale_mode: str = "head_dim",
    lce_weight: Tensor | None = None,
    lce_bias: Tensor | None = None,
) -> Tensor:
    """2-D BRA, dense: each pixel's region id from its coordinates, then the 1-D dense form."""
    _check_grid(q, k, v, n_win)
    _check(False, False, topk, scale_mode)
    k, v = expand_kv(k, v, q.shape[1])
    b, h, hg, wg, d = q.shape
    rh, rw = -(-hg // n_win), -(-wg // n_win)
    yy, xx = torch.meshgrid(torch.arange(hg), torch.arange(wg), indexing="ij")
    region_of = ((yy // rh) * n_win + (xx // rw)).reshape(-1)
    flat = lambda t: t.reshape(b, h, hg * wg, t.shape[-1])  # noqa: E731
    kvalid = torch.ones(b, hg * wg, dtype=torch.bool)
    out = _reference_dense(flat(q), flat(k), flat(v), region_of, n_win * n_win, kvalid, topk, _scale(h, d, scale_mode))
    out = out.reshape(b, h, hg, wg, -1)
    if lce_weight is not None:
        out = out + _lce_reference(v, lce_weight, lce_bias)
    return out


@register(
    NAME,
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
    arxiv="2303.08810",
    family="sparse",
    capabilities={"noncausal_self", "spatial", "key_padding_mask", "trainable"},
    complexity="routing O(R^2 d) for R regions, attention O(N topk r d) with r tokens per region",
    functional=bilevel_routing_attention,
    reference=bilevel_routing_attention_reference,
    defaults={"region_size": 16, "n_win": 7, "topk": 4, "scale_mode": "head_dim", "side_dwconv": 5},
    summary="region-level affinity picks the top-k regions per region; token attention over the gathered "
    "regions; plus a depthwise-conv local context term on V (LCE)",
    deviations="1-D regions are runs of region_size tokens (the paper is 2-D); padded positions are masked "
    "(official auto_pad lets zero-padded tokens take part); no kv downsampling; scale_mode='qk_dim' = official code",
    test_config={"region_size": 8, "n_win": 3, "topk": 2, "side_dwconv": 3},
)
class BiLevelRoutingAttention(AttentionModule):
    """BRA + LCE. ``(B, N, C)`` sequences use ``region_size``; ``(B, H, W, C)`` maps use ``n_win``.

    LCE is a learned depthwise ``side_dwconv x side_dwconv`` convolution of the value map (0 = off);
    on a 1-D sequence (a ``1 x N`` map) only its centre row acts.
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        ks = self.settings["side_dwconv"]
        if not isinstance(ks, int) or ks < 0 or (ks and ks % 2 == 0):
            raise ValueError(f"{NAME}: side_dwconv must be 0 (no LCE) or an odd kernel size, got {ks!r}")
        c = self.num_heads * self.head_dim
        if ks:
            self.lce = nn.Conv2d(c, c, ks, padding=ks // 2, groups=c)
        else:
            self.lce = None

    def _lce_args(self) -> dict:
        if self.lce is None:
            return {"lce_weight": None, "lce_bias": None}
        return {"lce_weight": self.lce.weight, "lce_bias": self.lce.bias}

    def op_params(self):
        s = self.settings
        return {"region_size": s["region_size"], "topk": s["topk"], "scale_mode": s["scale_mode"], **self._lce_args()}

    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hg, wg, _ = x.shape
        h = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(b, hg, wg, h, -1).permute(0, 3, 1, 2, 4)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        fn = bilevel_routing_attention_2d_reference if self.impl == "reference" else bilevel_routing_attention_2d
        s = self.settings
        out = fn(q, k, v, n_win=s["n_win"], topk=s["topk"], scale_mode=s["scale_mode"], **self._lce_args())
        return self.out_proj(out.permute(0, 2, 3, 1, 4).reshape(b, hg, wg, -1))


__all__ = [
    "BiLevelRoutingAttention",
    "bilevel_routing_attention",
    "bilevel_routing_attention_2d",
    "bilevel_routing_attention_2d_reference",
    "bilevel_routing_attention_reference",
    "local_context_enhancement",
]

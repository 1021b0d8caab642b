"""HaloNet blocked local self-attention with a halo and relative-position logits (2-D and 1-D).

Paper: "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani, Ramachandran,
Srinivas, Parmar, Hechtman, Shlens; CVPR 2021, arXiv 2103.12731). No official code was released;
timm ``layers/halo_attn.py`` and lucidrains ``halonet-pytorch`` were read (not copied).

Equations (per head, ``b = block_size``, ``h = halo_size``, window ``w = b + 2h``):

* The map is cut into non-overlapping ``b x b`` query blocks. Block ``B`` attends to the
  ``w x w`` window of keys/values centred on it (the block plus ``h`` pixels on every side).
* ``logit(i, j) = q_i . k_j * d^{-1/2} + q_i . r^H[dy(i, j)] + q_i . r^W[dx(i, j)]`` with
  ``dy, dx`` the offset of key ``j`` from query ``i`` (``-(w-1) .. w-1``, tables of ``2w - 1``
  rows, the factorised relative logits of the paper); ``softmax`` over the window; ``y_i = sum A v``.
  The relative term is added *after* the content scaling (timm; ``scale_pos_embed=True`` scales it
  too, as lucidrains does by scaling ``q`` first).

Padding choice (documented, configurable): the maps are padded *after* the projection, so halo
positions outside the image (and the bottom/right padding that completes the last block) hold
zero keys and zero values. With ``mask_padding=False`` (the default, timm and the paper, which says
no masking is needed) those zero keys take part: their logit is the relative term alone and they add
weight but no value. ``mask_padding=True`` (lucidrains) masks them with ``-inf``; then a block plus
halo covering the whole map is exactly full attention (without relative logits). A grid that does
not divide into blocks is padded at the bottom/right; padded query rows are dropped.

1-D form: a sequence is a ``1 x N`` map with blocks of ``b`` tokens along it and no vertical
padding: block ``B`` attends to tokens ``[B b - h, B b + b + h)``; the logit gets
``q_i . r^W[j - i]`` and, from the vertical table, the constant ``q_i . r^H[0]`` (the 1 x N map has
no vertical offsets; the constant cancels in the softmax).

Deviations: stride 1 only (the paper's strided / downsampling blocks, timm's ``avg_down``, are not
provided); ``d_qk = d_v`` = head width; no key padding mask (the zero-key padding semantics of the
default would change under it). Cost ``O(N w^2 d)`` in 2-D (``O(N w d)`` in 1-D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv, validate_qkv
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register

NAME = "halo"


def _check_sizes(block_size: int, halo_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{NAME}: block_size must be a positive int, got {block_size!r}")
    if not isinstance(halo_size, int) or halo_size < 0:
        raise ValueError(f"{NAME}: halo_size must be a non-negative int, got {halo_size!r}")


def _check_table(t: Tensor | None, win: int, d: int, what: str) -> None:
    if t is not None and tuple(t.shape) != (2 * win - 1, d):
        raise ValueError(f"{NAME}: {what} must have shape (2 * (block_size + 2 * halo_size) - 1, head_dim) = ({2 * win - 1}, {d}), got {tuple(t.shape)}")


def _rel_logits(qb: Tensor, table: Tensor, b: int, halo: int, win: int) -> Tensor:
    """``q . table[key_window_pos - halo - query_block_pos]`` for every (query in block, key in window).

    ``qb (..., b, D)`` -> ``(..., b, win)``.
    """
    full = torch.matmul(qb, table.to(qb.dtype).transpose(-1, -2))  # (..., b, 2 win - 1)
    i = torch.arange(b, device=qb.device)[:, None]
    w = torch.arange(win, device=qb.device)[None, :]
    idx = (w - halo - i + win - 1).expand(*full.shape[:-1], win)
    return full.gather(-1, idx)


# -- 1-D ----------------------------------------------------------------------------------------------
def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 8,
    halo_size: int = 3,
    mask_padding: bool = False,
    scale_pos_embed: bool = False,
    rel_w: Tensor | None = None,
    rel_h: Tensor | None = None,
) -> Tensor:
    """1-D blocked halo attention on ``(B, H, N, D)``: unfolded key windows, ``O(N w d)``."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    if causal or cross or key_padding_mask is not None:
        raise ValueError(f"{NAME}: only non-causal self-attention without a padding mask is defined")
    _check_sizes(block_size, halo_size)
    k, v = expand_kv(k, v, q.shape[1])
    bsz, nh, n, d = q.shape
    dv = v.shape[-1]
    b, hl = block_size, halo_size
    win = b + 2 * hl
    _check_table(rel_w, win, d, "rel_w")
    _check_table(rel_h, win, d, "rel_h")
    nb = -(-n // b)
    extra = nb * b - n
    scale = 1.0 / math.sqrt(d)
    qb = F.pad(q, (0, 0, 0, extra)).view(bsz, nh, nb, b, d)
    kw = F.pad(k, (0, 0, hl, extra + hl)).unfold(2, win, b).transpose(-1, -2)  # (B, H, nB, win, D)
    vw = F.pad(v, (0, 0, hl, extra + hl)).unfold(2, win, b).transpose(-1, -2)
    s = torch.matmul(qb, kw.transpose(-1, -2)) * scale  # (B, H, nB, b, win)
    pscale = scale if scale_pos_embed else 1.0
    if rel_w is not None:
        s = s + pscale * _rel_logits(qb, rel_w, b, hl, win)
    if rel_h is not None:
        s = s + pscale * torch.matmul(qb, rel_h[win - 1].to(q.dtype))[..., None]
    if mask_padding:
        pos = torch.arange(nb, device=q.device)[:, None] * b - hl + torch.arange(win, device=q.device)[None, :]
        s = s.masked_fill(((pos < 0) | (pos >= n))[:, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vw)  # every window holds its own block, never empty
    return out.reshape(bsz, nh, nb * b, dv)[:, :, :n]


def halo_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 8,
    halo_size: int = 3,
    mask_padding: bool = False,
    scale_pos_embed: bool = False,
    rel_w: Tensor | None = None,
    rel_h: Tensor | None = None,
) -> Tensor:
    """Dense form over the zero-extended key sequence: window mask + relative bias, golden softmax."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    if causal or cross or key_padding_mask is not None:
        raise ValueError(f"{NAME}: only non-causal self-attention without a padding mask is defined")
    _check_sizes(block_size, halo_size)
    k, v = expand_kv(k, v, q.shape[1])
    n, d = q.shape[2], q.shape[3]
    b, hl = block_size, halo_size
    win = b + 2 * hl
    nb = -(-n // b)
    # key positions p = -hl .. nb*b + hl - 1; outside [0, n) the key and value are zero vectors
    p = torch.arange(-hl, nb * b + hl)
    inside = (p >= 0) & (p < n)
    k_ext = torch.zeros(*k.shape[:2], len(p), d, dtype=k.dtype)
    v_ext = torch.zeros(*v.shape[:2], len(p), v.shape[-1], dtype=v.dtype)
    k_ext[:, :, inside] = k
    v_ext[:, :, inside] = v
    i = torch.arange(n)[:, None]
    start = (i // b) * b
    allowed = (p[None, :] >= start - hl) & (p[None, :] < start + b + hl)
    if mask_padding:
        allowed = allowed & inside[None, :]
    pscale = 1.0 / math.sqrt(d) if scale_pos_embed else 1.0
    bias = torch.zeros(q.shape[0], q.shape[1], n, len(p), dtype=q.dtype)
    if rel_w is not None:
        rel = rel_w.to(q.dtype)[(p[None, :] - i + win - 1).clamp(0, 2 * win - 2)]  # (N, P, D)
        bias = bias + torch.einsum("bhnd,npd->bhnp", q, rel)
    if rel_h is not None:
        bias = bias + (q @ rel_h.to(q.dtype)[win - 1])[..., None]
    bias = (pscale * bias).masked_fill(~allowed, float("-inf"))
    return reference_attention(q, k_ext, v_ext, bias)


# -- 2-D ----------------------------------------------------------------------------------------------
def _check_grid(q: Tensor, k: Tensor, v: Tensor) -> None:
    for t, nm in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor) or t.dim() != 5:
            raise ValueError(f"{NAME}: the 2-D form takes (B, H, height, width, D); {nm} has shape {tuple(getattr(t, 'shape', ()))}")
    if q.shape[2:4] != k.shape[2:4] or k.shape[:4] != v.shape[:4] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{NAME}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")


def halo_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 8,
    halo_size: int = 3,
    mask_padding: bool = False,
    scale_pos_embed: bool = False,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
) -> Tensor:
    """2-D halo attention on maps ``(B, H, Hg, Wg, D)``: ``b x b`` query blocks, ``w x w`` key windows."""
    _check_grid(q, k, v)
    _check_sizes(block_size, halo_size)
    k, v = expand_kv(k, v, q.shape[1])
    bsz, nh, hg, wg, d = q.shape
    dv = v.shape[-1]
    b, hl = block_size, halo_size
    win = b + 2 * hl
    _check_table(rel_h, win, d, "rel_h")
    _check_table(rel_w, win, d, "rel_w")
    nby, nbx = -(-hg // b), -(-wg // b)
    ey, ex = nby * b - hg, nbx * b - wg
    scale = 1.0 / math.sqrt(d)
    qb = F.pad(q, (0, 0, 0, ex, 0, ey)).view(bsz, nh, nby, b, nbx, b, d).permute(0, 1, 2, 4, 3, 5, 6)  # (.., b, b, D)

    def windows(t: Tensor) -> Tensor:
        t = F.pad(t, (0, 0, hl, ex + hl, hl, ey + hl))
        t = t.unfold(2, win, b).unfold(3, win, b)  # (B, H, nBy, nBx, C, win, win)
        return t.permute(0, 1, 2, 3, 5, 6, 4).reshape(bsz, nh, nby, nbx, win * win, t.shape[4])

    kw, vw = windows(k), windows(v)
    q2 = qb.reshape(bsz, nh, nby, nbx, b * b, d)
    s = torch.matmul(q2, kw.transpose(-1, -2)) * scale  # (B, H, nBy, nBx, b*b, win*win)
    pscale = scale if scale_pos_embed else 1.0
    if rel_h is not None or rel_w is not None:
        rel = torch.zeros(bsz, nh, nby, nbx, b, b, win, win, dtype=q.dtype, device=q.device)
        if rel_h is not None:  # rows: query row iy, key row wy
            qt = qb.transpose(-2, -3)  # (.., ix, iy, D)
            ry = _rel_logits(qt, rel_h, b, hl, win)  # (.., ix, iy, wy)
            rel = rel + ry.transpose(-2, -3)[..., :, None]  # (.., iy, ix, wy, 1)
        if rel_w is not None:
            rx = _rel_logits(qb, rel_w, b, hl, win)  # (.., iy, ix, wx)
            rel = rel + rx[..., None, :]
        s = s + pscale * rel.reshape(bsz, nh, nby, nbx, b * b, win * win)
    if mask_padding:
        py = torch.arange(nby)[:, None] * b - hl + torch.arange(win)[None, :]  # (nBy, win)
        px = torch.arange(nbx)[:, None] * b - hl + torch.arange(win)[None, :]
        iny, inx = (py >= 0) & (py < hg), (px >= 0) & (px < wg)
        inside = (iny[:, None, :, None] & inx[None, :, None, :]).reshape(nby, nbx, 1, win * win)
        s = s.masked_fill(~inside.to(q.device), float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vw)  # (B, H, nBy, nBx, b*b, Dv)
    out = out.view(bsz, nh, nby, nbx, b, b, dv).permute(0, 1, 2, 4, 3, 5, 6).reshape(bsz, nh, nby * b, nbx * b, dv)
    return out[:, :, :hg, :wg]


def halo_attention_2d_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 8,
    halo_size: int = 3,
    mask_padding: bool = False,
    scale_pos_embed: bool = False,
    rel_h: Tensor | None = None,
    rel_w: Tensor | None = None,
) -> Tensor:
    """Dense 2-D form: every pixel against the zero-extended key grid, window mask and relative bias."""
    _check_grid(q, k, v)
    _check_sizes(block_size, halo_size)
    k, v = expand_kv(k, v, q.shape[1])
    bsz, nh, hg, wg, d = q.shape
    b, hl = block_size, halo_size
    win = b + 2 * hl
    nby, nbx = -(-hg // b), -(-wg // b)
    py, px = torch.arange(-hl, nby * b + hl), torch.arange(-hl, nbx * b + hl)
    ky, kx = torch.meshgrid(py, px, indexing="ij")
    ky, kx = ky.reshape(-1), kx.reshape(-1)
    inside = (ky >= 0) & (ky < hg) & (kx >= 0) & (kx < wg)
    qy, qx = torch.meshgrid(torch.arange(hg), torch.arange(wg), indexing="ij")
    qy, qx = qy.reshape(-1, 1), qx.reshape(-1, 1)
    flat = lambda t: t.reshape(bsz, nh, hg * wg, t.shape[-1])  # noqa: E731
    qf = flat(q)
    k_ext = torch.zeros(bsz, nh, len(ky), d, dtype=k.dtype)
    v_ext = torch.zeros(bsz, nh, len(ky), v.shape[-1], dtype=v.dtype)
    k_ext[:, :, inside] = flat(k)
    v_ext[:, :, inside] = flat(v)
    sy, sx = (qy // b) * b, (qx // b) * b
    allowed = (ky >= sy - hl) & (ky < sy + b + hl) & (kx >= sx - hl) & (kx < sx + b + hl)
    if mask_padding:
        allowed = allowed & inside[None, :]
    bias = torch.zeros(bsz, nh, hg * wg, len(ky), dtype=q.dtype)
    if rel_h is not None:
        bias = bias + torch.einsum("bhnd,npd->bhnp", qf, rel_h.to(q.dtype)[(ky - qy + win - 1).clamp(0, 2 * win - 2)])
    if rel_w is not None:
        bias = bias + torch.einsum("bhnd,npd->bhnp", qf, rel_w.to(q.dtype)[(kx - qx + win - 1).clamp(0, 2 * win - 2)])
    pscale = 1.0 / math.sqrt(d) if scale_pos_embed else 1.0
    bias = (pscale * bias).masked_fill(~allowed, float("-inf"))
    return reference_attention(qf, k_ext, v_ext, bias).reshape(bsz, nh, hg, wg, -1)


@register(
    NAME,
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
    arxiv="2103.12731",
    family="sparse",
    capabilities={"noncausal_self", "spatial", "trainable"},
    complexity="2-D: O(N (b + 2h)^2 d); 1-D: O(N (b + 2h) d)",
    functional=halo_attention,
    reference=halo_attention_reference,
    defaults={"block_size": 8, "halo_size": 3, "rel_pos": True, "mask_padding": False, "scale_pos_embed": False},
    summary="b x b query blocks attend to their (b + 2h)^2 window (block plus halo) with factorised relative logits",
    deviations="stride 1 only; zero keys of the padding take part unless mask_padding=True (timm default); "
    "1-D form (a 1 x N map) added",
    test_config={"block_size": 4, "halo_size": 2},
)
class HaloAttention(AttentionModule):
    """HaloNet attention. ``(B, H, W, C)`` maps: 2-D blocks; ``(B, N, C)`` sequences: the 1-D form.

    Learned relative tables ``rel_h``, ``rel_w`` of shape ``(2 (b + 2h) - 1, head_dim)`` (init
    ``N(0, head_dim^-1/2)`` as timm) when ``rel_pos=True``.
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        _check_sizes(s["block_size"], s["halo_size"])
        win = s["block_size"] + 2 * s["halo_size"]
        if s["rel_pos"]:
            std = self.head_dim**-0.5
            self.rel_h = nn.Parameter(torch.randn(2 * win - 1, self.head_dim) * std)
            self.rel_w = nn.Parameter(torch.randn(2 * win - 1, self.head_dim) * std)
        else:
            self.rel_h = self.rel_w = None

    def _args(self) -> dict:
        s = self.settings
        return {
            "block_size": s["block_size"],
            "halo_size": s["halo_size"],
            "mask_padding": s["mask_padding"],
            "scale_pos_embed": s["scale_pos_embed"],
            "rel_h": self.rel_h,
            "rel_w": self.rel_w,
        }

    def op_params(self):
        return self._args()

    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hg, wg, _ = x.shape
        h = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(b, hg, wg, h, -1).permute(0, 3, 1, 2, 4)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        fn = halo_attention_2d_reference if self.impl == "reference" else halo_attention_2d
        out = fn(q, k, v, **self._args())
        return self.out_proj(out.permute(0, 2, 3, 1, 4).reshape(b, hg, wg, -1))

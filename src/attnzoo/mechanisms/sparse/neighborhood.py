"""Neighborhood attention (NA) in 1-D, 2-D and 3-D, with NATTEN's window semantics.

Papers:
* "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock
  Level" (Hassani, Hwu, Hsu, Shi; arXiv 2403.04690), the GEMM-based and fused NA this file follows.
* "Neighborhood Attention Transformer" (arXiv 2204.07143) and "Dilated Neighborhood Attention
  Transformer" (arXiv 2209.15001) for the definition of the neighborhood and of dilation.
* Semantics checked against the official library SHI-Labs/NATTEN (``src/natten/backends/flex.py``
  ``get_na_flex_mask`` and ``src/natten/backends/torch_fna.py`` ``_axis_kv_positions``).

Definition, per axis of length ``L`` with kernel size ``k`` and dilation ``δ``. The axis is split into
``δ`` interleaved groups by residue ``r = i mod δ`` (group length ``L_r = ceil((L - r) / δ)``, local
index ``i' = i // δ``); a query only sees keys of its own group. Inside a group:

* non-causal: keys ``i'`` in ``[s, s + k)`` with ``s = clamp(i' - floor(k/2), 0, L_r - k)``. The window
  is *shifted*, never truncated, at the borders, so every query sees exactly ``k`` keys; for even
  ``k`` it holds ``floor(k/2)`` keys before the query and ``k/2 - 1`` after (NATTEN: window_left =
  k // 2, window_right = k // 2 + (k % 2 - 1)).
* causal: keys ``[max(i' - k + 1, 0), i']``: the window ends at the query; near the start it is
  shorter (there is no look-ahead).

The N-D mask is the AND of the per-axis masks over the row-major flattened grid; kernel size,
dilation and causality are per axis. Output ``softmax(q K_w^T * scale) V_w`` over the window ``w``.

Fast form (pure PyTorch, forward and backward, CPU or CUDA): queries are cut into tiles of
``block_size`` positions per axis; the union of the windows of one tile is a box of at most
``block + k - 1`` keys per axis (per dilation group), whose start is computed from the window-start
function, so one gathered key tile per query tile holds every key the tile needs. All tiles run in one
``scaled_dot_product_attention`` call with the tiles' masks as an additive 4-D bias (torch's fused CPU
flash kernel, forward and backward), so the cost is
``O(N * prod_a(block_a + k_a - 1) * d)``: linear in ``N`` and never an ``N x N`` tensor. Dilation runs
the same kernel on each residue group (gather, attend, scatter). An optional FlexAttention path
(``backend="flex"``, compiled, forward only on CPU) uses :func:`neighborhood_mask_fn`.

Deviations from NATTEN (all deliberate, documented in ``docs/mechanisms/neighborhood.md``):
* NATTEN rejects ``k * δ > L``; here a kernel larger than a dilation group is clipped to the group
  (the window is the whole group), so tiny inputs (N = 1) still run.
* ``key_padding_mask`` (1-D only) is read as variable sequence lengths, like NATTEN's varlen mode:
  padded tokens are removed, the windows are computed on the remaining tokens (so left or right
  padding changes nothing for the real tokens), and padded query rows output zeros.
* Causal 1-D self-attention accepts ``N < M`` (queries are the last ``N`` positions, as when decoding
  against a cache). Legacy NAT relative-position biases and GNA "stride" are not implemented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]


# ---------------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------------
def _tuple(x, n: int, what: str, kind=int) -> tuple:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(
                f"neighborhood: {what} has {len(x)} entries, expected one per spatial axis ({n})"
            )
        out = tuple(x)
    else:
        out = (x,) * n
    for v in out:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"neighborhood: {what} must be positive int(s), got {x!r}")
        if kind is bool and not isinstance(v, bool):
            raise TypeError(f"neighborhood: {what} must be bool(s), got {x!r}")
    return out


def _resolve(n: int, m: int, causal: bool, cross: bool, spatial_shape, kernel_size, dilation, axis_causal):
    if cross:
        raise ValueError(
            "neighborhood attention is self-attention: q, k and v share one token grid (cross=False)"
        )
    shape = (m,) if spatial_shape is None else tuple(int(s) for s in spatial_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"neighborhood: spatial_shape must be positive, got {spatial_shape!r}")
    if math.prod(shape) != m:
        raise ValueError(
            f"neighborhood: spatial_shape {shape} has {math.prod(shape)} positions, but k/v have {m}"
        )
    nd = len(shape)
    if nd > 3:
        raise ValueError(f"neighborhood: 1-D, 2-D or 3-D grids only, got spatial_shape {shape}")
    ks = _tuple(kernel_size, nd, "kernel_size")
    dil = _tuple(dilation, nd, "dilation")
    cz = _tuple(causal if axis_causal is None else axis_causal, nd, "axis_causal", kind=bool)
    if n != m:
        if nd != 1 or not cz[0] or n > m:
            raise ValueError(
                f"neighborhood: q has {n} positions and k/v {m}; only causal 1-D self-attention accepts fewer "
                "queries than keys (the queries are then the last positions)"
            )
    return shape, ks, dil, cz


def _group_len(length: int, r: int, d: int) -> int:
    return (length - r + d - 1) // d


# ---------------------------------------------------------------------------------------------------
# the mask, written from NATTEN's per-axis definition (used by the reference and the flex path)
# ---------------------------------------------------------------------------------------------------
def _axis_allowed(qi: Tensor, kj: Tensor, length, k: int, d: int, causal: bool, offset: int = 0) -> Tensor:
    """May query coordinate ``qi`` (key-axis coordinate ``qi + offset``) see key coordinate ``kj`` along one axis."""
    qi = qi + offset
    same = (qi % d) == (kj % d)
    r = qi % d
    lr = (length - r + d - 1) // d  # length of the query's dilation group (length: int or tensor)
    qa, ka = qi // d, kj // d
    if causal:
        return same & (ka <= qa) & (qa - ka < k)
    kk = torch.minimum(torch.full_like(lr, k), lr)  # kernel clipped to the group (deviation, see docstring)
    left = kk // 2
    right = kk // 2 + (kk % 2) - 1
    centre = torch.maximum(torch.minimum(qa, lr - 1 - right), left)  # clamp(qa, left, lr - 1 - right)
    return same & (ka >= centre - left) & (ka <= centre + right)


def _coords(idx: Tensor, shape: tuple[int, ...]) -> list[Tensor]:
    out = []
    for s in reversed(shape):
        out.append(idx % s)
        idx = idx // s
    return out[::-1]


def neighborhood_mask_fn(
    spatial_shape: IntOrTuple,
    kernel_size: IntOrTuple,
    dilation: IntOrTuple = 1,
    causal: BoolOrTuple = False,
    offset: int = 0,
):
    """The NA mask as a FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool`` on the flattened grid.

    ``offset`` (1-D causal only) shifts the query coordinates: query ``i`` sits at key position ``i + offset``.
    """
    shape = (spatial_shape,) if isinstance(spatial_shape, int) else tuple(spatial_shape)
    nd = len(shape)
    ks = _tuple(kernel_size, nd, "kernel_size")
    dil = _tuple(dilation, nd, "dilation")
    cz = _tuple(causal, nd, "causal", kind=bool)

    def mask(b, h, q_idx, kv_idx):
        qc, kc = _coords(q_idx, shape), _coords(kv_idx, shape)
        out = None
        for a in range(nd):
            m = _axis_allowed(qc[a], kc[a], shape[a], ks[a], dil[a], cz[a], offset if nd == 1 else 0)
            out = m if out is None else out & m
        return out

    mask.__name__ = f"neighborhood_{'x'.join(map(str, ks))}"
    return mask


def neighborhood_dense_mask(n: int, shape, kernel_size, dilation=1, causal=False, *, device=None) -> Tensor:
    """The boolean ``(N, M)`` NA mask (``M = prod(shape)``; ``N < M`` only for causal 1-D)."""
    m = math.prod(shape)
    fn = neighborhood_mask_fn(shape, kernel_size, dilation, causal, offset=m - n)
    qi = torch.arange(n, device=device)[:, None]
    kj = torch.arange(m, device=device)[None, :]
    z = torch.zeros((), dtype=torch.long, device=device)
    return fn(z, z, qi, kj)


def varlen_by_padding(fn, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor, **kw) -> Tensor:
    """Run a positional pattern ``fn`` on each sequence with its padded tokens removed ("varlen").

    ``key_padding_mask (B, M)`` marks tokens that are not part of the sequence. The queries are the last
    ``N`` of the ``M`` positions (``N == M`` for non-causal self-attention); rows of padded queries are
    zero. The real tokens keep their relative positions, so left or right padding changes nothing.
    (A shared helper for every position-dependent pattern; it could move to ``core``.)
    """
    bsz, heads, n, _ = q.shape
    m = k.shape[2]
    rows = []
    for b in range(bsz):
        valid = ~key_padding_mask[b]
        kidx = torch.nonzero(valid).squeeze(1)
        qidx = torch.nonzero(valid[m - n :]).squeeze(1)
        out_b = q.new_zeros(heads, n, v.shape[-1])
        if kidx.numel() and qidx.numel():
            o = fn(
                q[b : b + 1, :, qidx],
                k[b : b + 1, :, kidx],
                v[b : b + 1, :, kidx],
                key_padding_mask=None,
                **kw,
            )
            out_b = out_b.index_copy(1, qidx, o[0])
        rows.append(out_b)
    return torch.stack(rows)


def _varlen_ranks(key_padding_mask: Tensor, n: int, m: int):
    """Ranks of positions among the real tokens: ``(key_rank (B, M), key_valid, query_rank (B, N), query_valid, length (B,))``."""
    valid = ~key_padding_mask
    rank = valid.long().cumsum(1) - 1
    return rank, valid, rank[:, m - n :], valid[:, m - n :], valid.sum(1)


# ---------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------
def neighborhood_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    kernel_size: IntOrTuple = 7,
    dilation: IntOrTuple = 1,
    spatial_shape: Sequence[int] | None = None,
    axis_causal: Sequence[bool] | None = None,
    scale: float | None = None,
    block_size: IntOrTuple | None = None,
    backend: str = "blocked",
) -> Tensor:
    """Dense masked softmax attention with the NATTEN neighborhood mask (materialises ``N x M``)."""
    n, m = q.shape[2], k.shape[2]
    shape, ks, dil, cz = _resolve(n, m, causal, cross, spatial_shape, kernel_size, dilation, axis_causal)
    if key_padding_mask is None:
        mask = neighborhood_dense_mask(n, shape, ks, dil, cz, device=q.device)
        return reference_attention(q, k, v, mask, scale=scale)
    _padding_1d(shape)
    # varlen: the window rule applied to ranks among the real tokens of each sequence
    krank, kvalid, qrank, qvalid, length = _varlen_ranks(key_padding_mask, n, m)
    allowed = _axis_allowed(qrank[:, :, None], krank[:, None, :], length[:, None, None], ks[0], dil[0], cz[0])
    mask = allowed & qvalid[:, :, None] & kvalid[:, None, :]
    return reference_attention(q, k, v, mask[:, None], scale=scale)


def _padding_1d(shape) -> None:
    if len(shape) != 1:
        raise ValueError(
            f"neighborhood: key_padding_mask is defined for 1-D sequences only, not a {len(shape)}-D grid {shape}"
        )


# ---------------------------------------------------------------------------------------------------
# fast blocked form
# ---------------------------------------------------------------------------------------------------
def _axis_tiles(nq: int, length: int, k: int, causal: bool, offset: int, block: int, device):
    """Tiling of one (undilated) axis.

    Returns ``(key_index (nb, T), mask (nb, b, T), b)``: tile ``t`` holds the queries
    ``t*b .. t*b+b-1`` (clamped to the last query) and the keys ``key_index[t]``.
    """
    k = min(k, length) if not causal else k
    b = max(1, min(block, nq))
    nb = -(-nq // b)
    i = torch.arange(nb * b, device=device).view(nb, b).clamp(max=nq - 1) + offset  # key-axis position
    if causal:
        lo = (i - k + 1).clamp(min=0)
        hi = i + 1
    else:
        lo = (i - k // 2).clamp(min=0, max=length - k)
        hi = lo + k
    tlen = min(length, b + k - 1)
    first = i[:, 0]
    start = (first - (k - 1 if causal else k // 2)).clamp(min=0, max=length - tlen)
    j = start[:, None] + torch.arange(tlen, device=device)
    mask = (j[:, None, :] >= lo[:, :, None]) & (j[:, None, :] < hi[:, :, None])
    return j, mask, b


def _default_block(k: int, nd: int) -> int:
    """Query tile per axis (rough CPU timings: 1-D k=128 -> 128; 2-D 64x64 grid, k=7 or 13 -> 8; k=3 -> 4)."""
    if nd == 1:
        return max(32, min(128, 1 << max(0, (k - 1).bit_length())))
    if nd == 2:
        return max(4, min(8, k + 1))
    return max(2, min(4, k + 1))


def _na_undilated(
    q: Tensor, k: Tensor, v: Tensor, shape, qshape, ks, cz, offset: int, blocks, scale
) -> Tensor:
    """NA without dilation on ``q (B, H, Nq, D)``, ``k, v (B, H, M, D)`` laid out on ``shape`` (keys) / ``qshape`` (queries)."""
    bsz, heads, nq, dim = q.shape
    nd = len(shape)
    dev = q.device
    key_idx, masks, bs = [], [], []
    for a in range(nd):
        j, m, b = _axis_tiles(qshape[a], shape[a], ks[a], cz[a], offset if nd == 1 else 0, blocks[a], dev)
        key_idx.append(j)
        masks.append(m)
        bs.append(b)
    nbs = [j.shape[0] for j in key_idx]
    tls = [j.shape[1] for j in key_idx]
    # linear key index of every (tile, key-in-tile): shape (nb_1..nb_n, T_1..T_n)
    lin = torch.zeros((), dtype=torch.long, device=dev)
    stride = 1
    for a in reversed(range(nd)):
        view = [1] * (2 * nd)
        view[a], view[nd + a] = nbs[a], tls[a]
        lin = lin + key_idx[a].view(view) * stride
        stride *= shape[a]
    ntiles, tsize = math.prod(nbs), math.prod(tls)
    lin = lin.reshape(ntiles * tsize)
    # query tile layout: (nb_1..nb_n, b_1..b_n) -> original query index (clamped duplicates for padding)
    qlin = torch.zeros((), dtype=torch.long, device=dev)
    qvalid = torch.ones((), dtype=torch.bool, device=dev)
    stride = 1
    for a in reversed(range(nd)):
        view = [1] * (2 * nd)
        view[a], view[nd + a] = nbs[a], bs[a]
        pos = torch.arange(nbs[a] * bs[a], device=dev).view(nbs[a], bs[a])
        qvalid = qvalid & (pos < qshape[a]).view(view)
        qlin = qlin + pos.clamp(max=qshape[a] - 1).view(view) * stride
        stride *= qshape[a]
    qsize = math.prod(bs)
    qvalid = qvalid.expand([*nbs, *bs]).reshape(-1)
    qlin = qlin.expand([*nbs, *bs]).reshape(-1)
    # tile mask (nb.., b.., T..) -> (ntiles, qsize, tsize)
    mask = None
    for a in range(nd):
        view = [1] * (3 * nd)
        view[a], view[nd + a], view[2 * nd + a] = nbs[a], bs[a], tls[a]
        ma = masks[a].view(view)
        mask = ma if mask is None else mask & ma
    mask = mask.expand([*nbs, *bs, *tls]).reshape(ntiles, qsize, tsize)
    # additive 4-D bias: this is the form for which torch's CPU SDPA takes its fused flash kernel (a 3-D
    # boolean mask falls back to the unfused math path, about 4x slower); every row has >= 1 key
    bias = torch.zeros(1, ntiles, qsize, tsize, dtype=q.dtype, device=dev).masked_fill_(
        ~mask[None], float("-inf")
    )

    qt = q.index_select(2, qlin).view(bsz, heads, ntiles, qsize, dim)
    kt = k.index_select(2, lin).view(bsz, heads, ntiles, tsize, dim)
    vt = v.index_select(2, lin).view(bsz, heads, ntiles, tsize, v.shape[-1])
    out = F.scaled_dot_product_attention(
        qt.reshape(bsz * heads, ntiles, qsize, dim),
        kt.reshape(bsz * heads, ntiles, tsize, dim),
        vt.reshape(bsz * heads, ntiles, tsize, v.shape[-1]),
        attn_mask=bias,
        scale=scale,
    )
    out = out.reshape(bsz, heads, ntiles * qsize, v.shape[-1])
    # each original query appears once among the valid tile rows; pick those rows in query order
    order = torch.empty(nq, dtype=torch.long, device=dev)
    rows = torch.nonzero(qvalid).squeeze(1)
    order[qlin[rows]] = rows
    return out.index_select(2, order)


def _flat_sub(x: Tensor, shape, idx) -> Tensor:
    """Select the sub-grid ``idx`` (a tuple of slices per axis) of ``x (B, H, prod(shape), D)``."""
    g = x.view(x.shape[0], x.shape[1], *shape, x.shape[-1])[(slice(None), slice(None), *idx)]
    return g.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    kernel_size: IntOrTuple = 7,
    dilation: IntOrTuple = 1,
    spatial_shape: Sequence[int] | None = None,
    axis_causal: Sequence[bool] | None = None,
    scale: float | None = None,
    block_size: IntOrTuple | None = None,
    backend: str = "blocked",
) -> Tensor:
    """Neighborhood attention on ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)`` with NATTEN semantics.

    * ``spatial_shape``: the token grid, e.g. ``(H, W)`` or ``(T, H, W)`` (row-major flattening);
      default ``(M,)`` (1-D).
    * ``kernel_size``, ``dilation``: int or one per axis. ``causal`` applies to every axis unless
      ``axis_causal`` (one bool per axis) is given.
    * ``block_size``: query tile per axis of the blocked kernel (default from the kernel size).
    * ``backend``: ``"blocked"`` (pure PyTorch, forward+backward) or ``"flex"`` (compiled FlexAttention
      with :func:`neighborhood_mask_fn`; forward only on CPU).
    """
    n, m = q.shape[2], k.shape[2]
    shape, ks, dil, cz = _resolve(n, m, causal, cross, spatial_shape, kernel_size, dilation, axis_causal)
    nd = len(shape)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "flex":
        return _flex_na(q, k, v, key_padding_mask, shape, ks, dil, cz, n, scale)
    if backend != "blocked":
        raise ValueError(f"neighborhood: backend must be 'blocked' or 'flex', got {backend!r}")
    if key_padding_mask is not None:
        _padding_1d(shape)
        return varlen_by_padding(
            neighborhood_attention,
            q,
            k,
            v,
            key_padding_mask,
            causal=causal,
            cross=cross,
            kernel_size=ks,
            dilation=dil,
            axis_causal=cz,
            scale=scale,
            block_size=block_size,
        )
    k, v = expand_kv(k, v, q.shape[1])
    blocks = (
        _tuple(block_size, nd, "block_size")
        if block_size is not None
        else tuple(_default_block(x, nd) for x in ks)
    )
    offset = m - n
    if nd == 1 and dil == (1,) and cz == (True,) and block_size is None and scale == 1.0 / math.sqrt(q.shape[-1]):
        # 1-D causal, undilated: the window is the last kernel_size keys up to the query, exactly
        # sliding_window's causal band, whose blocked path is faster here (docs/mechanisms/neighborhood.md)
        from ..softmax.sliding_window import _blocked as _sliding_window_blocked

        return _sliding_window_blocked(q, k, v, None, ks[0], True, 32)
    if all(d == 1 for d in dil):
        qshape = (n,) if nd == 1 else shape
        return _na_undilated(q, k, v, shape, qshape, ks, cz, offset, blocks, scale)
    # dilation: run each residue group on its own and interleave the results back
    groups = list(_dilation_groups(dil))
    outs = []
    for grp in groups:
        idx = tuple(slice(r, None, d) for r, d in zip(grp, dil))
        gshape = tuple(_group_len(s, r, d) for s, r, d in zip(shape, grp, dil))
        if nd == 1:
            # queries are the last n key positions: those of residue r form the last entries of the group
            first_q = offset  # key position of query 0
            r0 = (grp[0] - first_q) % dil[0]  # first query index in this group
            qsel = q[:, :, r0 :: dil[0]]
            ksel, vsel = k[:, :, grp[0] :: dil[0]], v[:, :, grp[0] :: dil[0]]
            if qsel.shape[2] == 0:
                outs.append(qsel.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1]))
                continue
            o = _na_undilated(
                qsel, ksel, vsel, gshape, (qsel.shape[2],), ks, cz, gshape[0] - qsel.shape[2], blocks, scale
            )
        else:
            qsel, ksel, vsel = (_flat_sub(t, shape, idx) for t in (q, k, v))
            o = _na_undilated(qsel, ksel, vsel, gshape, gshape, ks, cz, 0, blocks, scale)
        outs.append(o)
    return _interleave(outs, groups, dil, (n,) if nd == 1 else shape, q, v, offset if nd == 1 else 0)


def _dilation_groups(dil):
    if len(dil) == 1:
        return [(r,) for r in range(dil[0])]
    if len(dil) == 2:
        return [(a, b) for a in range(dil[0]) for b in range(dil[1])]
    return [(a, b, c) for a in range(dil[0]) for b in range(dil[1]) for c in range(dil[2])]


def _interleave(outs, groups, dil, qshape, q, v, offset):
    """Put per-group outputs back at their positions (differentiable, no in-place writes)."""
    bsz, heads = q.shape[0], q.shape[1]
    dv = v.shape[-1]
    nd = len(qshape)
    if nd == 1:
        d = dil[0]
        # query index i belongs to group (i + offset) % d at local slot i // d after aligning
        ceil_len = -(-qshape[0] // d)
        cols = []
        for r in range(d):
            g = groups.index(((r + offset) % d,))
            o = outs[g]
            cols.append(F.pad(o, (0, 0, 0, ceil_len - o.shape[2])))
        stacked = torch.stack(cols, dim=3)  # (B, H, ceil, d, Dv): query i = slot*d + r
        return stacked.reshape(bsz, heads, ceil_len * d, dv)[:, :, : qshape[0]]
    ceil_shape = [-(-s // d) for s, d in zip(qshape, dil)]
    grid = []
    for grp, o in zip(groups, outs):
        gshape = [_group_len(s, r, d) for s, r, d in zip(qshape, grp, dil)]
        o = o.reshape(bsz, heads, *gshape, dv)
        pad = []
        for a in reversed(range(nd)):
            pad += [0, ceil_shape[a] - gshape[a]]
        grid.append(F.pad(o, [0, 0, *pad]))
    full = torch.stack(grid, dim=2).view(bsz, heads, *dil, *ceil_shape, dv)
    perm = [0, 1]
    for a in range(nd):
        perm += [2 + nd + a, 2 + a]
    full = full.permute(*perm, 2 + 2 * nd).reshape(bsz, heads, *[c * d for c, d in zip(ceil_shape, dil)], dv)
    full = full[(slice(None), slice(None), *[slice(0, s) for s in qshape])]
    return full.reshape(bsz, heads, -1, dv)


_FLEX_CACHE: dict = {}


def _flex_na(q, k, v, kpm, shape, ks, dil, cz, n, scale):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if kpm is not None:
        raise ValueError(
            "neighborhood: backend='flex' does not take a key_padding_mask; use backend='blocked'"
        )
    m = math.prod(shape)
    fn = neighborhood_mask_fn(shape, ks, dil, cz, offset=m - n)
    key = (shape, ks, dil, cz, n, str(q.device))
    if key not in _FLEX_CACHE:
        _FLEX_CACHE[key] = create_block_mask(fn, None, None, n, m, device=q.device)
    if "compiled" not in _FLEX_CACHE:
        _FLEX_CACHE["compiled"] = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return _FLEX_CACHE["compiled"](q, k, v, block_mask=_FLEX_CACHE[key], scale=scale, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------
@register(
    "neighborhood",
    paper="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    arxiv="2403.04690",
    family="sparse",
    capabilities={
        "noncausal_self",
        "causal_self",
        "decode",
        "spatial",
        "key_padding_mask",
        "trainable",
    },
    complexity="time O(N prod(block + k - 1) d) ~ O(N k d) per axis product, memory O(N k) (blocked tiles)",
    functional=neighborhood_attention,
    reference=neighborhood_attention_reference,
    defaults={
        "kernel_size": 7,
        "dilation": 1,
        "spatial_shape": None,
        "axis_causal": None,
        "scale": None,
        "block_size": None,
        "backend": "blocked",
    },
    summary="each query attends to its k nearest neighbours per axis (NATTEN semantics: window shifted at the borders, dilation, per-axis causal); 1-D, 2-D, 3-D",
    deviations=(
        "kernel larger than a dilation group is clipped to the group (NATTEN raises); key_padding_mask (1-D) means "
        "variable lengths: windows are computed on the real tokens; no legacy relative-position bias, no GNA stride"
    ),
    test_config={"kernel_size": 5, "dilation": 1},
)
class NeighborhoodAttention(AttentionModule):
    """Neighborhood attention layer: ``(B, N, C)`` sequences, or ``(B, H, W, C)`` grids via :meth:`forward_spatial`.

    For grids, ``kernel_size`` / ``dilation`` may be per axis; ``causal=True`` makes every axis causal
    unless ``axis_causal`` says otherwise. Decoding (1-D causal) keeps a rolling cache of the last
    ``kernel_size * dilation`` keys and values.
    """

    extra_settings = ("num_kv_heads",)

    def forward_spatial(self, x: Tensor) -> Tensor:
        bsz, hh, ww, c = x.shape
        tokens = x.reshape(bsz, hh * ww, c)
        q, k, v = self.project(tokens, None)
        s = dict(self.settings)
        s["spatial_shape"] = (hh, ww)
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        out = fn(q, k, v, causal=self.causal, cross=False, key_padding_mask=None, **s)
        return self.out_proj(merge_heads(out)).view(bsz, hh, ww, c)

    def _window(self) -> int:
        ks, dil = self.settings["kernel_size"], self.settings["dilation"]
        ks = ks[0] if isinstance(ks, (list, tuple)) else ks
        dil = dil[0] if isinstance(dil, (list, tuple)) else dil
        return ks * dil

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        if self.settings["spatial_shape"] is not None and len(self.settings["spatial_shape"]) != 1:
            raise ValueError("neighborhood: decoding is defined for 1-D causal attention only")
        return {"kv": KVCache(window=self._window())}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("neighborhood: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        cache: KVCache = state["kv"]
        q, k, v = self.project(x, None)
        if len(cache):
            keys, values = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
        else:
            keys, values = k, v
        settings = {**self.settings, "spatial_shape": None}
        out = self.attend_cached(q, keys, values, settings)
        cache.append(k, v)
        return self.out_proj(merge_heads(out)), state

    def attend_cached(self, q, keys, values, settings):
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        return fn(q, keys, values, causal=True, cross=False, key_padding_mask=None, **settings)

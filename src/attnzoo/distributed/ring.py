"""Exact softmax attention on a sequence sharded over ranks: ring passing of K/V blocks.

Background: "Ring Attention with Blockwise Transformers for Near-Infinite Context" (Liu, Zaharia,
Abbeel; arXiv 2310.01889) for the ring, "Blockwise Parallel Transformer" / FlashAttention for the
log-sum-exp merging of partial softmax results, and the zig-zag split of causal ring attention
(Llama 3 context parallelism, the ``ring-flash-attention`` project) for load balance. The issue cites
"A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies" (arXiv
2302.06218) as motivation; its distributed details are not published, so this is designed from the
math (see ``docs/distributed.md``).

Forward, on rank ``r`` of ``P`` holding ``q_r, k_r, v_r`` (``L`` tokens each)::

    for s = 0 .. P-1:                       # K/V block of rank j = r - s (mod P) is here
        start sending (k, v) to rank r+1, receiving the next block from rank r-1
        for each (query run, key run) of this pair that the mask does not fully hide:
            m_b = max_j S_ij,  l_b = sum_j exp(S_ij - m_b),  a_b = sum_j exp(S_ij - m_b) v_j
            merge: m = max(m, m_b); l = l e^{m_old - m} + l_b e^{m_b - m}; a likewise
    O = a / l,  lse = m + log l

``S_ij = scale q_i . k_j`` (``-inf`` where the causal, window or padding mask hides the pair). On
CPU, unmasked and causal-diagonal blocks use torch's fused flash-attention kernel, which returns
``(O_b, lse_b)``, i.e. the statistics ``(m, l, a) = (lse_b, 1, O_b)`` (see :data:`FUSED_BLOCKS`). The
result equals single-process softmax attention up to rounding: the merge is the associative
log-sum-exp combine, so the order of the blocks does not matter.

Backward (the gradient accumulators travel the ring home): with ``D_i = dO_i . O_i`` and
``P_ij = exp(S_ij - lse_i)``, every rank recomputes ``P`` block by block as the K/V blocks pass again,
adds ``dQ += dS K scale`` locally and adds ``dK += dS^T Q scale``, ``dV += P^T dO`` into an accumulator
that travels *with* the block; after ``P`` shifts each accumulator is back at the rank that owns
the block. Nothing of size ``N x N`` or ``N x d`` ever exists on one rank.

Sliding-window attention (``|i - j| < window``, causal adds ``j <= i``, the convention of
:mod:`attnzoo.mechanisms.softmax.sliding_window`) runs in one of two ways:

* ``window - 1 <= L`` and the contiguous layout: a halo exchange. Rank ``r`` receives the last
  ``window - 1`` keys/values of rank ``r - 1`` (and, non-causal, the first ``window - 1`` of rank
  ``r + 1``), attends locally, and the backward sends the halo gradients back the opposite way.
  Communication per rank: ``(window - 1)`` tokens per direction, independent of ``P``.
* otherwise (window longer than a shard, or the zigzag layout): the full ring with the window mask;
  blocks that the window hides are skipped (no compute), but every block still travels.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .comm import agree, dtype_code, exchange, group_info, ring_shift
from .sharding import LAYOUTS, check_layout, segments, shard_length


# ---------------------------------------------------------------------------------------------------
# masks between runs of positions
# ---------------------------------------------------------------------------------------------------
def allowed(qpos: Tensor, kpos: Tensor, *, causal: bool, window: int | None, seq_len: int) -> Tensor:
    """``(Lq, Lk)`` bool: may query at global position ``qpos[i]`` see key ``kpos[j]``."""
    kp = kpos[None, :]
    qp = qpos[:, None]
    ok = (kp < seq_len) & (kp >= 0)
    if causal:
        ok = ok & (kp <= qp)
    if window is not None:
        ok = ok & (qp - kp < window)
        if not causal:
            ok = ok & (kp - qp < window)
    return ok


@dataclass
class _Block:
    q: slice  # local query rows
    k: slice  # rows of the visiting K/V block
    partial: bool  # some pairs hidden: the mask is rebuilt when the block is computed (O(L) saved, not O(L^2))
    q0: int  # global position of the first query / key of the block
    k0: int
    rule: tuple  # (causal, window, seq_len)

    def mask(self, device) -> Tensor | None:
        if not self.partial:
            return None
        causal, window, seq_len = self.rule
        qpos = torch.arange(self.q0, self.q0 + self.q.stop - self.q.start, device=device)
        kpos = torch.arange(self.k0, self.k0 + self.k.stop - self.k.start, device=device)
        return allowed(qpos, kpos, causal=causal, window=window, seq_len=seq_len)


def _plan(seq_len: int, rank: int, world: int, layout: str, causal: bool, window: int | None, device) -> list[list[_Block]]:
    """For each ring step, the (query run, key run) pairs with at least one visible pair."""
    qsegs = segments(seq_len, rank, world, layout)
    rule = (causal, window, seq_len)
    steps = []
    for s in range(world):
        owner = (rank - s) % world
        blocks = []
        for qs, qg, ql in qsegs:
            qpos = torch.arange(qg, qg + ql, device=device)
            for ks, kg, kl in segments(seq_len, owner, world, layout):
                mask = allowed(qpos, torch.arange(kg, kg + kl, device=device), causal=causal, window=window, seq_len=seq_len)
                if not bool(mask.any()):
                    continue
                blocks.append(_Block(slice(qs, qs + ql), slice(ks, ks + kl), not bool(mask.all()), qg, kg, rule))
        steps.append(blocks)
    return steps


def work_per_step(seq_len: int, world: int, layout: str, causal: bool, window: int | None = None) -> list[list[int]]:
    """(query, key) pairs each rank computes at each ring step (``[rank][step]``): the load balance.

    A block that the mask hides entirely is skipped; a partly visible block is computed in full."""
    out = []
    for r in range(world):
        row = []
        for blocks in _plan(seq_len, r, world, layout, causal, window, "cpu"):
            row.append(sum((b.q.stop - b.q.start) * (b.k.stop - b.k.start) for b in blocks))
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------
# block math (q as (B, Hkv, G, L, D) so that grouped-query K/V is never expanded)
# ---------------------------------------------------------------------------------------------------
def _safe(m: Tensor) -> Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _scores(q5: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    s = torch.matmul(q5, k[:, :, None].transpose(-1, -2)) * scale  # (B, Hkv, G, Lq, Lk)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _block_stats(q5: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):
    s = _scores(q5, k, mask, scale)
    m = s.amax(-1)
    p = torch.exp(s - _safe(m)[..., None])
    return m, p.sum(-1), torch.matmul(p, v[:, :, None])


#: Run unmasked blocks and causal diagonal blocks through torch's fused CPU flash-attention kernel
#: (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward, which take the global
#: output and log-sum-exp); other blocks, other devices, or ``FUSED_BLOCKS = False``: the plain math above.
FUSED_BLOCKS = True
_FUSED_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def _fused_kind(blk, q: Tensor, dv: int) -> bool | None:
    """``None``: use the plain math; ``False``: a fused unmasked block; ``True``: a fused causal diagonal block."""
    if not FUSED_BLOCKS or q.device.type != "cpu" or dv != q.shape[-1] or q.dtype not in (torch.float32, torch.float64):
        return None
    if not all(hasattr(torch.ops.aten, name) for name in _FUSED_OPS):
        return None
    if not blk.partial:
        return False
    causal, window, seq_len = blk.rule
    length = blk.q.stop - blk.q.start
    if causal and window is None and blk.q0 == blk.k0 and blk.k.stop - blk.k.start == length and blk.k0 + length <= seq_len:
        return True  # the square on the diagonal: exactly the lower triangle
    return None


def _expand(t: Tensor, g: int) -> Tensor:
    return t if g == 1 else t.repeat_interleave(g, dim=1)


def _fused_stats(q5b: Tensor, kb: Tensor, vb: Tensor, is_causal: bool, scale: float):
    b, hkv, g, lq, d = q5b.shape
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q5b.reshape(b, hkv * g, lq, d), _expand(kb, g).contiguous(), _expand(vb, g).contiguous(), 0.0, is_causal,
        scale=scale,
    )
    # (m, l, a) = (lse, 1, out) describes the same partial softmax as the plain statistics
    lse = lse.reshape(b, hkv, g, lq).to(q5b.dtype)
    return lse, torch.ones_like(lse), out.reshape(b, hkv, g, lq, -1)


def _fused_grads(q5b, kb, vb, do5b, out5b, lse_b, is_causal: bool, scale: float):
    b, hkv, g, lq, d = q5b.shape
    lk = kb.shape[2]
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do5b.reshape(b, hkv * g, lq, d).contiguous(), q5b.reshape(b, hkv * g, lq, d).contiguous(),
        _expand(kb, g).contiguous(), _expand(vb, g).contiguous(), out5b.reshape(b, hkv * g, lq, d).contiguous(),
        lse_b.reshape(b, hkv * g, lq).contiguous(), 0.0, is_causal, scale=scale,
    )
    return (gq.reshape(b, hkv, g, lq, d), gk.reshape(b, hkv, g, lk, d).sum(2), gv.reshape(b, hkv, g, lk, d).sum(2))


def _merge(state, m_b: Tensor, l_b: Tensor, a_b: Tensor):
    m, l, a = state
    m_new = torch.maximum(m, m_b)
    ms = _safe(m_new)
    fa, fb = torch.exp(m - ms), torch.exp(m_b - ms)
    return m_new, l * fa + l_b * fb, a * fa[..., None] + a_b * fb[..., None]


def _check_inputs(q, k, v, *, seq_len, layout, causal, window, what, group):
    """Local validation, then agreement of every rank on shapes and settings."""
    rank, world = group_info(group)
    err = None
    try:
        for t, name in ((q, "q"), (k, "k"), (v, "v")):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{what}: {name} must be a floating-point tensor")
            if t.dim() != 4:
                raise ValueError(f"{what}: {name} must be (batch, heads, local_length, head_dim), got {tuple(t.shape)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"{what}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ValueError(
                f"{what}: local shards must be q (B, H, L, D), k (B, Hkv, L, D), v (B, Hkv, L, Dv) with one L "
                f"(self-attention); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )
        if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
            raise ValueError(f"{what}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
        check_layout(layout)
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ValueError(f"{what}: window must be a positive int, got {window!r}")
        length = q.shape[2]
        if seq_len is None:
            seq_len = length * world
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"{what}: seq_len must be a positive int, got {seq_len!r}")
        if shard_length(seq_len, world, layout) != length:
            raise ValueError(
                f"{what}: a sequence of {seq_len} tokens split {layout} over {world} ranks gives "
                f"{shard_length(seq_len, world, layout)} tokens per rank (padding included), but this rank holds "
                f"{length}; shard with attnzoo.distributed.shard(x, rank, world, layout={layout!r})"
            )
    except (TypeError, ValueError) as e:
        err = e
    if err is None:
        meta = {
            "operation": zlib.crc32(what.encode()),  # ranks calling different functions fail here, not in a transfer
            "batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1], "local_length": q.shape[2],
            "head_dim": q.shape[3], "value_dim": v.shape[3], "dtype": dtype_code(q.dtype), "seq_len": seq_len,
            "layout": LAYOUTS.index(layout), "causal": int(bool(causal)), "window": -1 if window is None else window,
        }
    else:
        meta = dict.fromkeys(("operation", "batch", "heads", "kv_heads", "local_length", "head_dim", "value_dim", "dtype",
                              "seq_len", "layout", "causal", "window"), -1)
    agree(meta, what=what, group=group, local_error=err)
    return seq_len


# ---------------------------------------------------------------------------------------------------
# the ring
# ---------------------------------------------------------------------------------------------------
class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq_len, layout, causal, window, scale, group):
        rank, world = group_info(group)
        b, h, length, d = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        g = h // hkv
        q5 = q.reshape(b, hkv, g, length, d)
        plan = _plan(seq_len, rank, world, layout, causal, window, q.device)
        kv = torch.cat([k, v], dim=-1).contiguous()
        neg_inf = torch.full((b, hkv, g, length), float("-inf"), dtype=q.dtype, device=q.device)
        m, l, a = neg_inf, torch.zeros_like(neg_inf), q.new_zeros(b, hkv, g, length, dv)
        for s in range(world):
            pending = ring_shift(kv, what=f"ring attention forward step {s}", group=group) if s < world - 1 else None
            kc, vc = kv[..., :d], kv[..., d:]
            for blk in plan[s]:
                fused = _fused_kind(blk, q, dv)
                qb, kb, vb = q5[:, :, :, blk.q], kc[:, :, blk.k], vc[:, :, blk.k]
                if fused is None:
                    stats = _block_stats(qb, kb, vb, blk.mask(q.device), scale)
                else:
                    stats = _fused_stats(qb, kb, vb, fused, scale)
                merged = _merge((m[..., blk.q], l[..., blk.q], a[:, :, :, blk.q]), *stats)
                m[..., blk.q], l[..., blk.q], a[:, :, :, blk.q] = merged
            if pending is not None:
                kv = pending.wait()[0]
        lpos = l > 0
        out = a / torch.where(lpos, l, torch.ones_like(l))[..., None]
        lse = torch.where(lpos, _safe(m) + torch.log(torch.where(lpos, l, torch.ones_like(l))), neg_inf)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.group = plan, scale, group
        return out.reshape(b, h, length, dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out5, lse = ctx.saved_tensors
        plan, scale, group = ctx.plan, ctx.scale, ctx.group
        rank, world = group_info(group)
        b, h, length, d = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        g = h // hkv
        q5 = q.reshape(b, hkv, g, length, d)
        do5 = dout.reshape(b, hkv, g, length, dv).to(q.dtype)
        delta = (do5 * out5).sum(-1)  # D_i = dO_i . O_i
        lse_s = _safe(lse)
        dq = torch.zeros_like(q5)
        kv = torch.cat([k, v], dim=-1).contiguous()
        dkv = torch.zeros_like(kv)
        for s in range(world):
            pending = ring_shift(kv, what=f"ring attention backward step {s} (K/V)", group=group) if s < world - 1 else None
            kc, vc = kv[..., :d], kv[..., d:]
            for blk in plan[s]:
                qb, dob = q5[:, :, :, blk.q], do5[:, :, :, blk.q]
                kb, vb = kc[:, :, blk.k], vc[:, :, blk.k]
                fused = _fused_kind(blk, q, dv)
                if fused is not None:
                    gq, gk, gv = _fused_grads(qb, kb, vb, dob, out5[:, :, :, blk.q], lse[..., blk.q], fused, scale)
                    dq[:, :, :, blk.q] += gq
                    dkv[:, :, blk.k, :d] += gk
                    dkv[:, :, blk.k, d:] += gv
                    continue
                p = torch.exp(_scores(qb, kb, blk.mask(q.device), scale) - lse_s[..., blk.q, None])  # (B, Hkv, G, Lq, Lk)
                dvb = torch.matmul(p.transpose(-1, -2), dob).sum(2)  # sum over the query heads of a group
                dp = torch.matmul(dob, vb[:, :, None].transpose(-1, -2))
                ds = p * (dp - delta[..., blk.q, None])
                dq[:, :, :, blk.q] += torch.matmul(ds, kb[:, :, None]) * scale
                dkv[:, :, blk.k, :d] += torch.matmul(ds.transpose(-1, -2), qb).sum(2) * scale
                dkv[:, :, blk.k, d:] += dvb
            # the accumulator follows its block; after the P-th shift each rank holds its own block's gradient
            dkv = ring_shift(dkv, what=f"ring attention backward step {s} (dK/dV)", group=group).wait()[0]
            if pending is not None:
                kv = pending.wait()[0]
        dk, dv_ = dkv[..., :d], dkv[..., d:]
        return dq.reshape(b, h, length, d), dk.contiguous(), dv_.contiguous(), None, None, None, None, None, None


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    seq_len: int | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    window: int | None = None,
    group=None,
) -> Tensor:
    """Exact softmax attention over a sequence sharded on the ranks of ``group``.

    Each rank passes its local shard: ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D|Dv)`` (``H`` a multiple
    of ``Hkv``: grouped-query K/V travel unexpanded), the tokens at the global positions
    :func:`attnzoo.distributed.local_positions` gives for ``layout``. ``seq_len`` is the true global
    length ``N`` (default ``L * P``: no padding); keys at positions ``>= N`` are masked. Returns the
    local output ``(B, H, L, Dv)``; rows at padded positions are meaningless. ``window`` adds the
    sliding-window mask (blocks it hides are skipped). Differentiable (ring backward).
    Every rank must call it with matching shapes and settings; a mismatch raises ``ValueError`` on
    every rank before any block moves.
    """
    seq_len = _check_inputs(q, k, v, seq_len=seq_len, layout=layout, causal=causal, window=window,
                            what="ring_attention", group=group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, seq_len, layout, bool(causal), window, scale, group)


# ---------------------------------------------------------------------------------------------------
# sliding window by halo exchange
# ---------------------------------------------------------------------------------------------------
class _Halo(torch.autograd.Function):
    """Forward: receive the neighbours' edge K/V rows; backward: send their gradients back."""

    @staticmethod
    def forward(ctx, kv, width, both, group):
        rank, world = group_info(group)
        b, hkv, length, c = kv.shape
        ctx.width, ctx.both, ctx.group, ctx.length = width, both, group, length
        prev = kv.new_zeros(b, hkv, width, c)
        nxt = kv.new_zeros(b, hkv, width if both else 0, c)
        if world == 1 or width == 0:
            return prev, nxt
        sends, recvs = [], []
        if rank < world - 1:
            sends.append((kv[:, :, length - width:], rank + 1))
        if rank > 0:
            recvs.append((prev, rank - 1))
        if both:
            if rank > 0:
                sends.append((kv[:, :, :width], rank - 1))
            if rank < world - 1:
                recvs.append((nxt, rank + 1))
        exchange(sends, recvs, what="sliding-window halo exchange (forward)", group=group).wait()
        return prev, nxt

    @staticmethod
    @once_differentiable
    def backward(ctx, dprev, dnext):
        rank, world = group_info(ctx.group)
        width, both, length = ctx.width, ctx.both, ctx.length
        b, hkv, _, c = dprev.shape
        dkv = dprev.new_zeros(b, hkv, length, c)
        if world == 1 or width == 0:
            return dkv, None, None, None
        from_next = dprev.new_zeros(b, hkv, width, c)  # gradient of my tail, computed by rank + 1
        from_prev = dprev.new_zeros(b, hkv, width, c)  # gradient of my head, computed by rank - 1
        sends, recvs = [], []
        if rank > 0:
            sends.append((dprev, rank - 1))
        if rank < world - 1:
            recvs.append((from_next, rank + 1))
        if both:
            if rank < world - 1:
                sends.append((dnext, rank + 1))
            if rank > 0:
                recvs.append((from_prev, rank - 1))
        exchange(sends, recvs, what="sliding-window halo exchange (backward)", group=ctx.group).wait()
        if rank < world - 1:
            dkv[:, :, length - width:] += from_next
        if both and rank > 0:
            dkv[:, :, :width] += from_prev
        return dkv, None, None, None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """Plain differentiable softmax attention with grouped-query K/V and a ``(Lq, Lk)`` mask; rows that
    see no key give zeros (and zero gradients), never NaN."""
    b, h, lq, d = q.shape
    hkv = k.shape[1]
    m, l, a = _block_stats(q.reshape(b, hkv, h // hkv, lq, d), k, v, mask, scale)
    out = a / torch.where(l > 0, l, torch.ones_like(l))[..., None]
    return out.reshape(b, h, lq, v.shape[-1])


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool = False,
    seq_len: int | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    group=None,
) -> Tensor:
    """Sliding-window softmax attention (``|i - j| < window``; causal adds ``j <= i``) on local shards.

    Contiguous layout and ``window - 1 <= L``: halo exchange with the neighbouring ranks only.
    Otherwise: :func:`ring_attention` with the window mask. Same arguments as :func:`ring_attention`.
    """
    seq_len = _check_inputs(q, k, v, seq_len=seq_len, layout=layout, causal=causal, window=window,
                            what="sliding_window_attention", group=group)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    rank, world = group_info(group)
    length, d = q.shape[2], q.shape[3]
    width = window - 1
    if layout != "contiguous" or width > length:
        return _RingAttention.apply(q, k, v, seq_len, layout, bool(causal), window, scale, group)
    kv = torch.cat([k, v], dim=-1)
    prev, nxt = _Halo.apply(kv, width, not causal, group)
    keys = torch.cat([prev, kv, nxt], dim=2)
    start = rank * length
    qpos = torch.arange(start, start + length, device=q.device)
    kpos = torch.arange(start - width, start + length + nxt.shape[2], device=q.device)
    mask = allowed(qpos, kpos, causal=bool(causal), window=window, seq_len=seq_len)
    return masked_attention(q, keys[..., :d], keys[..., d:], mask, scale)

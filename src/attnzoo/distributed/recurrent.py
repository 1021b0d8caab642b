"""The linear family on a sequence sharded over ranks: the recurrent state is passed as a prefix over ranks.

Causal linear attention ("Transformers are RNNs", Katharopoulos et al., arXiv 2006.16236, as in
:mod:`attnzoo.mechanisms.linear.linear`) and Lightning Attention's decayed recurrence (arXiv
2401.04658, as in :mod:`attnzoo.mechanisms.linear.lightning`) are both the state recurrence
``S_t = lambda S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t`` (``lambda = 1`` and ``[v, 1]`` values for
the normalised linear attention; ``lambda_h = exp(-s_h)`` per head for Lightning). Over ``P`` ranks
holding contiguous shards of ``L`` tokens:

1. every rank runs the chunked recurrence of :func:`attnzoo.core.scan.recurrence_chunked` on its own
   shard from a zero state, giving local outputs ``o^loc`` and its shard's state ``T_r`` (all ranks in
   parallel, no communication);
2. one ``all_gather`` of the ``T_r`` (``d x e`` per head: independent of ``L``), and each rank forms
   the state entering its shard, the exclusive prefix ``S_in(r) = sum_{j<r} lambda^{L (r-1-j)} T_j``;
3. ``o_i = o^loc_i + lambda^{i+1} q_i^T S_in(r)`` for the local index ``i``.

Backward: the local parts by autograd; the prefix by the reverse (suffix) scan
``dT_r = sum_{r'>r} lambda^{L (r'-1-r)} dS_in(r')``, again after one ``all_gather``.
Non-causal linear attention needs the global sums ``sum_j phi(k_j) v_j^T`` and ``sum_j phi(k_j)``:
one ``all_reduce`` (its backward is an ``all_reduce`` of the gradients).

The public functionals of the mechanisms normalise and take no initial state, so the per-rank math
is written here on the shared :func:`~attnzoo.core.scan.recurrence_chunked` (same feature map,
normalisation, ``eps`` and slopes as the mechanisms); tests compare against
``attnzoo.attention(..., mechanism="linear" | "lightning")`` on one process. Lightning's slopes are
constants (not trained): no gradient flows to them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.layout import expand_kv
from ..core.scan import recurrence_chunked
from ..mechanisms.linear.lightning import lightning_slopes
from ..mechanisms.linear.linear import elu_feature
from .comm import all_gather, all_reduce_sum, group_info
from .ring import _check_inputs


class _StatePrefix(torch.autograd.Function):
    """``S_in(r) = sum_{j<r} w^{r-1-j} T_j`` over ranks (``w = exp(g L)`` per head, 1 without decay)."""

    @staticmethod
    def forward(ctx, t, log_w, group):
        rank, world = group_info(group)
        ctx.log_w, ctx.group = log_w, group
        parts = all_gather(t, what="state prefix (forward)", group=group)
        return _weighted_sum(parts, log_w, rank, range(rank), lambda j: rank - 1 - j)

    @staticmethod
    @once_differentiable
    def backward(ctx, ds):
        rank, world = group_info(ctx.group)
        parts = all_gather(ds.contiguous(), what="state prefix (backward)", group=ctx.group)
        return _weighted_sum(parts, ctx.log_w, rank, range(rank + 1, world), lambda j: j - 1 - rank), None, None


def _weighted_sum(parts, log_w, rank, ranks, power) -> Tensor:
    out = torch.zeros_like(parts[0])
    for j in ranks:
        if log_w is None:
            out = out + parts[j]
        else:
            out = out + torch.exp(log_w * power(j)).view(1, -1, 1, 1) * parts[j]
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_reduce_sum(t, what="linear attention global sums (forward)", group=group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return all_reduce_sum(grad, what="linear attention global sums (backward)", group=ctx.group), None


def _divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    den = den + eps
    return num / torch.where(den != 0, den, torch.ones_like(den))[..., None]


def _valid(length: int, seq_len: int, group, device) -> Tensor:
    rank, _ = group_info(group)
    return (torch.arange(rank * length, (rank + 1) * length, device=device) < seq_len)[None, None, :, None]


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    seq_len: int | None = None,
    eps: float = 0.0,
    chunk: int = 64,
    group=None,
) -> Tensor:
    """Normalised linear attention (``phi = elu + 1``) on contiguous local shards ``(B, H, L, D)``.

    Equals ``attnzoo.attention(q, k, v, mechanism="linear", causal=causal, eps=eps)`` on the full
    sequence. ``seq_len``: the true global length (keys at positions ``>= seq_len`` are ignored).
    """
    seq_len = _check_inputs(q, k, v, seq_len=seq_len, layout="contiguous", causal=causal, window=None,
                            what="linear_attention", group=group)
    k, v = expand_kv(k, v, q.shape[1])
    valid = _valid(q.shape[2], seq_len, group, q.device)
    fq = elu_feature(q)
    fk = elu_feature(k) * valid.to(q.dtype)
    v1 = torch.cat([v, valid.to(v.dtype).expand(*v.shape[:-1], 1)], dim=-1)  # [v, 1]: numerator and denominator
    if causal:
        out, state = recurrence_chunked(fq, fk, v1, chunk=chunk)
        s_in = _StatePrefix.apply(state, None, group)
        out = out + torch.matmul(fq, s_in)
    else:
        total = _AllReduceSum.apply(torch.matmul(fk.transpose(-1, -2), v1), group)  # (B, H, d, e + 1)
        out = torch.matmul(fq, total)
    return _divide(out[..., :-1], out[..., -1], eps)


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    seq_len: int | None = None,
    slopes: float | Tensor | None = None,
    block_size: int = 64,
    group=None,
) -> Tensor:
    """Lightning Attention (causal, decayed, unnormalised) on contiguous local shards ``(B, H, L, D)``.

    Equals ``attnzoo.attention(q, k, v, mechanism="lightning", slopes=slopes)`` on the full sequence;
    ``slopes`` default to the mechanism's ALiBi-style slopes for ``H`` heads.
    """
    seq_len = _check_inputs(q, k, v, seq_len=seq_len, layout="contiguous", causal=True, window=None,
                            what="lightning_attention", group=group)
    h, length = q.shape[1], q.shape[2]
    if slopes is None:
        s = lightning_slopes(h, dtype=q.dtype, device=q.device)
    else:
        s = torch.as_tensor(slopes, device=q.device).to(q.dtype)
        s = s.expand(h) if s.dim() == 0 else s
        if s.shape != (h,):
            raise ValueError(f"lightning_attention: slopes must be a float or have one value per head ({h}), got {tuple(s.shape)}")
    s = s.detach()
    k, v = expand_kv(k, v, h)
    valid = _valid(length, seq_len, group, q.device).to(q.dtype)
    k, v = k * valid, v * valid
    out, state = recurrence_chunked(q, k, v, -s, chunk=block_size)
    s_in = _StatePrefix.apply(state, -s * length, group)
    i = torch.arange(1, length + 1, device=q.device, dtype=q.dtype)
    q_decay = torch.exp(-s.view(-1, 1) * i).view(1, h, length, 1)  # lambda^(i+1), local index i from 0
    return out + torch.matmul(q * q_decay, s_in)

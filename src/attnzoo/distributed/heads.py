"""Head-parallel attention: all-to-all from sequence shards to head shards and back.

This is the DeepSpeed-Ulysses scheme ("DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models", Jacobs et al., arXiv 2309.14509) and the
"distributed multi-head attention" reading of arXiv 2302.06218 (each device owns ``H / P`` heads of
the full sequence). On rank ``r`` of ``P``:

1. ``q, k, v`` arrive as sequence shards ``(B, H, L, D)``; one all-to-all per tensor turns them into
   head shards ``(B, H / P, P L, D)``: rank ``r`` now has heads ``[r H / P, (r + 1) H / P)`` of the
   whole sequence;
2. any registered mechanism runs on them unchanged (the padding is cut off first, so no mask is
   needed and every mechanism works, whatever it supports);
3. one all-to-all brings the output back to sequence shards. The backward is the same three steps
   in reverse (an all-to-all is inverted by the opposite all-to-all).

Requires ``H % P == 0``; grouped-query K/V with ``Hkv % P != 0`` are expanded to ``H`` heads first.
Per-head settings (Lightning's slopes, or anything passed in ``head_params``) are sliced to the
local heads.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.layout import expand_kv
from .comm import agree, all_to_all, group_info
from .sharding import LAYOUTS, check_layout, local_positions


def _seq_to_head(x: Tensor, group) -> Tensor:
    _, world = group_info(group)
    b, h, length, d = x.shape
    hp = h // world
    send = x.reshape(b, world, hp, length, d).transpose(0, 1)  # piece j: heads of rank j
    recv = all_to_all(send, what="head-parallel all-to-all (sequence -> heads)", group=group)  # piece j: tokens of rank j
    return recv.permute(1, 2, 0, 3, 4).reshape(b, hp, world * length, d)


def _head_to_seq(y: Tensor, group) -> Tensor:
    _, world = group_info(group)
    b, hp, total, d = y.shape
    length = total // world
    send = y.reshape(b, hp, world, length, d).permute(2, 0, 1, 3, 4)  # piece j: tokens of rank j
    recv = all_to_all(send, what="head-parallel all-to-all (heads -> sequence)", group=group)  # piece j: heads of rank j
    return recv.transpose(0, 1).reshape(b, world * hp, length, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _HeadToSeq.apply(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _head_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _SeqToHead.apply(grad, ctx.group), None


def seq_to_head(x: Tensor, group=None) -> Tensor:
    """``(B, H, L, D)`` sequence shard -> ``(B, H / P, P L, D)`` head shard (rank-major token order); differentiable."""
    return _SeqToHead.apply(x, group)


def head_to_seq(y: Tensor, group=None) -> Tensor:
    """Inverse of :func:`seq_to_head`; differentiable."""
    return _HeadToSeq.apply(y, group)


def head_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "softmax",
    *,
    causal: bool = False,
    seq_len: int | None = None,
    layout: str = "contiguous",
    head_params: dict[str, Tensor] | None = None,
    group=None,
    **params,
) -> Tensor:
    """Any registered ``mechanism`` on local sequence shards via head parallelism (Ulysses).

    ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D|Dv)`` are this rank's shard in ``layout``; ``seq_len`` is the
    true global length. ``params`` go to ``attnzoo.attention``; ``head_params`` maps setting names to
    per-head tensors ``(H, ...)`` that are sliced to this rank's heads (Lightning's ``slopes`` are
    handled automatically). Returns the local output shard ``(B, H, L, Dv)``.
    """
    import attnzoo

    from .ring import _check_inputs

    rank, world = group_info(group)
    seq_len = _check_inputs(q, k, v, seq_len=seq_len, layout=layout, causal=causal, window=None,
                            what="head_parallel_attention", group=group)
    h, length = q.shape[1], q.shape[2]
    err = None
    if h % world:
        err = ValueError(
            f"head_parallel_attention: {h} query heads cannot be split over {world} ranks (need H % P == 0); "
            "use the ring strategy instead"
        )
    agree({"mechanism_crc32": zlib.crc32(str(mechanism).encode()), "layout": LAYOUTS.index(check_layout(layout))},
          what="head_parallel_attention", group=group, local_error=err)
    if k.shape[1] % world:
        k, v = expand_kv(k, v, h)
    head_params = dict(head_params or {})
    if mechanism == "lightning" and params.get("slopes") is None and "slopes" not in head_params:
        from ..mechanisms.linear.lightning import lightning_slopes

        head_params["slopes"] = lightning_slopes(h, dtype=q.dtype, device=q.device)
        params.pop("slopes", None)
    hp = h // world
    local_params = dict(params)
    for name, t in head_params.items():
        t = torch.as_tensor(t)
        if t.shape[0] != h:
            raise ValueError(f"head_parallel_attention: head_params[{name!r}] must have {h} rows, got {tuple(t.shape)}")
        local_params[name] = t[rank * hp : (rank + 1) * hp]

    qh, kh, vh = (seq_to_head(t, group) for t in (q, k, v))
    total = world * length
    # rank-major order -> global order (the identity for the contiguous layout)
    order = torch.cat([local_positions(seq_len, r, world, layout, device=q.device) for r in range(world)])
    if layout != "contiguous":
        inv = torch.argsort(order)
        qh, kh, vh = (t.index_select(2, inv) for t in (qh, kh, vh))
    out = attnzoo.attention(
        qh[:, :, :seq_len], kh[:, :, :seq_len], vh[:, :, :seq_len], mechanism, causal=causal, cross=False, **local_params
    )
    out = F.pad(out, (0, 0, 0, total - seq_len))
    if layout != "contiguous":
        out = out.index_select(2, order)
    return head_to_seq(out, group)

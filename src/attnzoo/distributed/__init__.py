"""Context-parallel attention over ``torch.distributed``: a sequence sharded over ``P`` processes.

Each rank holds ``L = ceil(N / P)`` tokens of ``q, k, v`` (a contiguous or zig-zag shard, see
:mod:`~attnzoo.distributed.sharding`) and gets back the attention output for its own tokens, equal
(up to rounding) to single-process attention over the whole sequence, forward and backward.

Strategies:

* :func:`ring_attention`: exact softmax attention by passing K/V blocks around a ring and merging
  partial results by log-sum-exp (causal with the load-balanced ``layout="zigzag"``, or non-causal);
* :func:`sliding_window_attention`: a halo exchange with the neighbouring ranks when
  ``window - 1 <= L`` (otherwise the ring with the window mask);
* :func:`linear_attention` / :func:`lightning_attention`: the recurrent state passed as a prefix over
  ranks (one all-gather of ``d x e`` states);
* :func:`head_parallel_attention`: all-to-all to head shards, any registered mechanism, all-to-all back
  (DeepSpeed-Ulysses).

:func:`context_parallel_attention` picks one by mechanism; :class:`ContextParallel` wraps an attnzoo
layer so that its attention runs context-parallel. Set up with :func:`init_process_group` (under
``torchrun``) or :func:`attnzoo.distributed.launch.run` (P local processes). See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.layout import merge_heads
from ..core.module import AttentionModule
from .comm import (
    CommStats,
    DistributedAttentionError,
    comm_stats,
    count_comm,
    group_info,
    init_process_group,
)
from .heads import head_parallel_attention, head_to_seq, seq_to_head
from .recurrent import lightning_attention, linear_attention
from .ring import ring_attention, sliding_window_attention, work_per_step
from .sharding import (
    LAYOUTS,
    gather_sequence,
    local_positions,
    padded_length,
    shard,
    shard_length,
    unshard,
)

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "CommStats",
    "ContextParallel",
    "DistributedAttentionError",
    "comm_stats",
    "context_parallel_attention",
    "count_comm",
    "gather_sequence",
    "group_info",
    "head_parallel_attention",
    "head_to_seq",
    "init_process_group",
    "lightning_attention",
    "linear_attention",
    "local_positions",
    "padded_length",
    "ring_attention",
    "seq_to_head",
    "shard",
    "shard_length",
    "sliding_window_attention",
    "unshard",
    "work_per_step",
]

#: mechanisms with a sequence-parallel (``"ring"``) form; every mechanism has the ``"heads"`` form
RING_MECHANISMS = ("softmax", "sliding_window", "linear", "lightning")
STRATEGIES = ("auto", "ring", "heads")
_RING_SETTINGS = {
    "softmax": ("scale",),
    "sliding_window": ("window", "scale"),
    "linear": ("eps", "chunk"),
    "lightning": ("slopes", "block_size"),
}


def _inert(mechanism: str, name: str, value: Any, params: dict) -> bool:
    """Settings of the single-process mechanism that do not change the result when left at these values."""
    if mechanism == "softmax":
        if name in ("rope", "alibi"):
            return not value
        if name == "rope_base":
            return not params.get("rope")
        if name == "position_offset":
            return value == 0 or not params.get("rope")
    if mechanism == "sliding_window":
        return name in ("block_size", "backend")  # implementation choices of the single-process form
    return False


def context_parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "softmax",
    *,
    causal: bool = False,
    seq_len: int | None = None,
    layout: str = "contiguous",
    strategy: str = "auto",
    group=None,
    **params: Any,
) -> Tensor:
    """``attnzoo.attention`` on a sharded sequence: local shards in, local output shard out.

    ``strategy="ring"`` (sequence parallel: ring / halo / state prefix) exists for
    ``softmax`` (settings: ``scale``), ``sliding_window`` (``window``), ``linear`` (``eps``, ``chunk``) and
    ``lightning`` (``slopes``, ``block_size``); the linear family and the halo path need
    ``layout="contiguous"``. ``strategy="heads"`` runs any registered mechanism with any of its
    settings. ``"auto"``: ``"ring"`` where it exists, else ``"heads"``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"context_parallel_attention: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "auto":
        strategy = "ring" if mechanism in RING_MECHANISMS else "heads"
    if strategy == "heads":
        return head_parallel_attention(q, k, v, mechanism, causal=causal, seq_len=seq_len, layout=layout, group=group, **params)
    if mechanism not in RING_MECHANISMS:
        raise ValueError(
            f"context_parallel_attention: no ring form for {mechanism!r} (ring forms: {', '.join(RING_MECHANISMS)}); "
            "use strategy='heads'"
        )
    params = {n: p for n, p in params.items() if not _inert(mechanism, n, p, params)}
    unknown = set(params) - set(_RING_SETTINGS[mechanism])
    if unknown:
        raise ValueError(
            f"context_parallel_attention: the {mechanism} ring form does not take {sorted(unknown)}; it takes "
            f"{sorted(_RING_SETTINGS[mechanism])} (strategy='heads' takes every setting)"
        )
    if mechanism == "softmax":
        return ring_attention(q, k, v, causal=causal, seq_len=seq_len, layout=layout, scale=params.get("scale"), group=group)
    if mechanism == "sliding_window":
        return sliding_window_attention(q, k, v, window=params.get("window", 256), causal=causal, seq_len=seq_len,
                                        layout=layout, scale=params.get("scale"), group=group)
    if layout != "contiguous":
        raise ValueError(f"context_parallel_attention: the {mechanism} state prefix needs layout='contiguous'")
    if mechanism == "linear":
        return linear_attention(q, k, v, causal=causal, seq_len=seq_len, eps=params.get("eps", 0.0),
                                chunk=params.get("chunk", 64), group=group)
    if not causal:
        raise ValueError("context_parallel_attention: lightning is causal only (causal=True)")
    return lightning_attention(q, k, v, seq_len=seq_len, slopes=params.get("slopes"),
                               block_size=params.get("block_size", 64), group=group)


class ContextParallel(nn.Module):
    """Run an attnzoo layer (``attnzoo.create(...)``) with its attention context-parallel.

    The wrapped layer keeps its parameters (replicate them on every rank and all-reduce their
    gradients, as in data parallelism); ``forward(x_local)`` takes this rank's tokens ``(B, L, C)``
    and returns its output tokens. Works for layers whose forward is "project, attend, project"
    (softmax, sliding_window, linear and the other mechanisms that do not override ``forward``).
    """

    def __init__(self, layer: nn.Module, *, seq_len: int, layout: str = "contiguous", strategy: str = "auto", group=None):
        super().__init__()
        spec = getattr(layer, "spec", None)
        if spec is None:
            raise TypeError("ContextParallel wraps an attnzoo layer (attnzoo.create(...))")
        if type(layer).forward is not AttentionModule.forward:
            raise ValueError(
                f"ContextParallel: {spec.name} overrides forward (it is not project-attend-project); "
                "call context_parallel_attention on its per-head tensors instead"
            )
        self.layer, self.seq_len, self.layout, self.strategy, self.group = layer, seq_len, layout, strategy, group

    def forward(self, x: Tensor) -> Tensor:
        layer = self.layer
        q, k, v = layer.project(x, None)
        settings = dict(layer.op_params())
        out = context_parallel_attention(q, k, v, layer.spec.name, causal=layer.causal, seq_len=self.seq_len,
                                         layout=self.layout, strategy=self.strategy, group=self.group, **settings)
        return layer.out_proj(merge_heads(out))

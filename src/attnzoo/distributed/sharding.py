"""How a sequence of ``N`` tokens is split over ``P`` ranks.

Two layouts:

* ``"contiguous"``: the sequence is padded at the end to ``P * L`` tokens (``L = ceil(N / P)``) and
  rank ``r`` holds positions ``[r L, (r + 1) L)``;
* ``"zigzag"``: the sequence is padded to ``2 P c`` tokens and cut into ``2 P`` chunks of ``c``;
  rank ``r`` holds chunks ``r`` and ``2 P - 1 - r``. Under a causal mask every rank then has the same
  number of visible (query, key) pairs, so a causal ring does equal work on every rank (with the
  contiguous split, rank ``P - 1`` does ``2 P - 1`` times the work of rank 0).

Padding tokens sit at global positions ``>= N``; the attention functions mask them as keys and the
outputs at those positions are meaningless (drop them with :func:`unshard` / :func:`gather_sequence`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .comm import all_gather, group_info

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"attnzoo.distributed: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def padded_length(n: int, world: int, layout: str = "contiguous") -> int:
    """Total length after padding: a multiple of ``world`` (contiguous) or ``2 * world`` (zigzag)."""
    check_layout(layout)
    if n < 1 or world < 1:
        raise ValueError(f"attnzoo.distributed: need a sequence length >= 1 and world size >= 1, got {n}, {world}")
    unit = world * (2 if layout == "zigzag" else 1)
    return -(-n // unit) * unit


def shard_length(n: int, world: int, layout: str = "contiguous") -> int:
    """Tokens per rank (padding included)."""
    return padded_length(n, world, layout) // world


def local_positions(n: int, rank: int, world: int, layout: str = "contiguous", device=None) -> Tensor:
    """Global positions (``int64``, padding included) of the tokens rank ``rank`` holds."""
    length = shard_length(n, world, layout)
    if layout == "contiguous":
        return torch.arange(rank * length, (rank + 1) * length, device=device)
    c = length // 2
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)
    return torch.cat([first, second])


def segments(n: int, rank: int, world: int, layout: str = "contiguous") -> list[tuple[int, int, int]]:
    """The runs of consecutive positions of a rank's shard: ``(local_start, global_start, length)``."""
    length = shard_length(n, world, layout)
    if layout == "contiguous":
        return [(0, rank * length, length)]
    c = length // 2
    return [(0, rank * c, c), (c, (2 * world - 1 - rank) * c, c)]


def shard(x: Tensor, rank: int, world: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The part of the full tensor ``x`` (sequence along ``dim``) that rank ``rank`` holds, zero-padded."""
    n = x.shape[dim]
    total = padded_length(n, world, layout)
    if total > n:
        dim_ = dim % x.dim()
        pad = [0, 0] * (x.dim() - 1 - dim_) + [0, total - n]
        x = F.pad(x, pad)
    return x.index_select(dim, local_positions(n, rank, world, layout, device=x.device))


def unshard(parts: list[Tensor], n: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Inverse of :func:`shard`: the full tensor of length ``n`` from the shards of every rank."""
    world = len(parts)
    order = torch.cat([local_positions(n, r, world, layout, device=parts[0].device) for r in range(world)])
    full = torch.cat(parts, dim=dim)
    inverse = torch.argsort(order)
    return full.index_select(dim, inverse).narrow(dim, 0, n)


def gather_sequence(x: Tensor, n: int, *, layout: str = "contiguous", dim: int = 2, group=None) -> Tensor:
    """All-gather the shards of every rank and return the full sequence of length ``n`` (no autograd)."""
    return unshard(all_gather(x.detach(), what="gather_sequence", group=group), n, layout=layout, dim=dim)


def rank_local_positions(n: int, layout: str, group=None, device=None) -> Tensor:
    rank, world = group_info(group)
    return local_positions(n, rank, world, layout, device=device)

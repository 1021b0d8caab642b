"""Mask functions and combinators.

A *mask function* has FlexAttention's ``mask_mod`` signature ``(b, h, q_idx, kv_idx) -> bool tensor``
(True = the query may attend to the key) and is written with elementwise tensor ops only, so one
definition serves three consumers: :func:`dense_mask` (a boolean ``(N, M)`` tensor for
``scaled_dot_product_attention`` and the reference), :func:`block_mask` (a FlexAttention
``BlockMask``), and the blocked fast paths that evaluate it on index tiles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(offset: int = 0) -> MaskFn:
    """Key ``j`` visible to query ``i`` iff ``j <= i + offset`` (``offset = M - N`` aligns bottom-right)."""

    def mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    mask.__name__ = f"causal_{offset}" if offset else "causal"
    return mask


def sliding_window(window: int, causal: bool = True, offset: int = 0) -> MaskFn:
    """Keys within distance ``< window`` of the query (``|i + offset - j| < window``); causal adds ``j <= i + offset``.

    A causal window therefore holds ``window`` keys including the query's own position.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def mask(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        if causal:
            return (d >= 0) & (d < window)
        return (d < window) & (d > -window)

    mask.__name__ = f"{'causal_' if causal else ''}window_{window}"
    return mask


def block_diagonal(block: int) -> MaskFn:
    """Query and key in the same block of ``block`` consecutive positions."""

    def mask(b, h, q_idx, kv_idx):
        return (q_idx // block) == (kv_idx // block)

    mask.__name__ = f"block_{block}"
    return mask


def strided(stride: int) -> MaskFn:
    """Keys at a distance that is a multiple of ``stride`` (the Sparse Transformer's strided pattern)."""

    def mask(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) % stride) == 0

    mask.__name__ = f"strided_{stride}"
    return mask


def and_masks(*masks: MaskFn) -> MaskFn:
    """Intersection of mask functions."""
    if not masks:
        raise ValueError("and_masks needs at least one mask")

    def mask(b, h, q_idx, kv_idx):
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    mask.__name__ = "_and_".join(getattr(m, "__name__", "mask") for m in masks)
    return mask


def or_masks(*masks: MaskFn) -> MaskFn:
    """Union of mask functions."""
    if not masks:
        raise ValueError("or_masks needs at least one mask")

    def mask(b, h, q_idx, kv_idx):
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    mask.__name__ = "_or_".join(getattr(m, "__name__", "mask") for m in masks)
    return mask


def dense_mask(mask_fn: MaskFn, n: int, m: int, *, device: torch.device | str | None = None) -> Tensor:
    """The boolean ``(N, M)`` matrix of a head- and batch-independent mask function."""
    q_idx = torch.arange(n, device=device)[:, None]
    kv_idx = torch.arange(m, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    out = mask_fn(zero, zero, q_idx, kv_idx)
    return out.expand(n, m) if out.shape != (n, m) else out


def block_mask(mask_fn: MaskFn, n: int, m: int, *, device: torch.device | str = "cpu", block_size: int = 128):
    """A FlexAttention ``BlockMask`` for a head- and batch-independent mask function."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_fn, None, None, n, m, device=device, BLOCK_SIZE=block_size)

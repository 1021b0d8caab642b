"""FLOP counting that sees every attention kernel.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for matmuls and for the CUDA SDPA kernels,
but counts the CPU flash kernel of ``scaled_dot_product_attention`` as zero. :func:`flop_counter`
adds the CPU kernels (forward and backward) with the same shape-based formulas, so a dense or
blocked SDPA call is credited like the matmuls it replaces (``4 B H N M D`` forward, causal savings
not credited, as for the CUDA kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None:
        mapping[fwd] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    if bwd is not None:
        mapping[bwd] = lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    return mapping


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU SDPA kernels."""
    return FlopCounterMode(display=display, custom_mapping=_custom_mapping())


def count_flops(fn: Callable[..., Any], *args: Any, backward: bool = False, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (plus ``out.sum().backward()`` if ``backward``)."""
    with flop_counter() as fc:
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return fc.get_total_flops()

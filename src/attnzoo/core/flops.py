"""FLOP counting that sees every attention kernel.

``torch.utils.flop_counter.FlopCounterMode`` has formulas for matmuls and for the CUDA SDPA kernels,
but counts the CPU flash kernel of ``scaled_dot_product_attention`` as zero. :func:`flop_counter`
adds the CPU kernels (forward and backward) with torch's shape-based SDPA formulas
(``4 B H N M D`` forward, 2.5x that backward), scaled by the fraction of the score matrix that
``is_causal`` keeps, so a causal call is credited with the work it really does. Elementwise ops,
softmax and scans count zero, as in ``FlopCounterMode`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def causal_fraction(n: int, m: int) -> float:
    """Fraction of the ``N x M`` score matrix that SDPA's ``is_causal`` (top-left, ``j <= i``) keeps."""
    if n <= 0 or m <= 0:
        return 1.0
    full = min(n, m)  # rows 0..full-1 keep i+1 keys; rows beyond M keep all M
    kept = full * (full + 1) // 2 + max(n - m, 0) * m
    return kept / (n * m)


def _cpu_sdpa_mapping() -> dict:
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kw):
        causal = kw.get("is_causal", args[1] if len(args) > 1 else False)
        return int(sdpa_flop_count(q, k, v) * (causal_fraction(q[-2], k[-2]) if causal else 1.0))

    def bwd(g, q, k, v, *args, out_shape=None, **kw):
        causal = kw.get("is_causal", args[3] if len(args) > 3 else False)
        return int(sdpa_backward_flop_count(g, q, k, v) * (causal_fraction(q[-2], k[-2]) if causal else 1.0))

    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU SDPA kernels."""
    return FlopCounterMode(display=display, custom_mapping=_cpu_sdpa_mapping())


def count_flops(fn: Callable[..., Any], *args: Any, backward: bool = False, **kwargs: Any) -> int:
    """Total FLOPs of ``fn(*args, **kwargs)`` (plus ``out.sum().backward()`` if ``backward``)."""
    with flop_counter() as fc:
        out = fn(*args, **kwargs)
        if backward:
            out.sum().backward()
    return int(fc.get_total_flops())

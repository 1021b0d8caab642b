"""Positional schemes shared by many mechanisms: rotary embeddings (RoPE) and ALiBi biases.

* RoPE: "RoFormer: Enhanced Transformer with Rotary Position Embedding" (Su et al., arXiv 2104.09864),
  in the rotate-half layout used by GPT-NeoX and Llama.
* ALiBi: "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation"
  (Press et al., arXiv 2108.12409): a per-head linear penalty ``-slope_h * distance``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_angles(positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32):
    """``(cos, sin)`` of shape ``(len(positions), dim)`` for the rotate-half layout (``dim`` even)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, positions: Tensor | None = None, base: float = 10000.0, offset: int = 0) -> Tensor:
    """Rotate ``x (..., N, D)`` by positions ``offset + arange(N)`` (or explicit ``positions``)."""
    n, d = x.shape[-2], x.shape[-1]
    if positions is None:
        positions = torch.arange(offset, offset + n, device=x.device)
    cos, sin = rope_angles(positions, d, base, dtype=x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's geometric slopes ``2^(-8 h / H)``, with the paper's interleaving for non-powers of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(slopes: Tensor, n: int, m: int, *, offset: int | None = None, device=None, dtype=torch.float32) -> Tensor:
    """The ``(H, N, M)`` additive bias ``-slope_h * |i + offset - j|`` (``offset`` defaults to ``M - N``)."""
    offset = (m - n) if offset is None else offset
    i = torch.arange(n, device=device)[:, None] + offset
    j = torch.arange(m, device=device)[None, :]
    dist = (i - j).abs().to(torch.float64)
    return (-slopes.to(device=device)[:, None, None] * dist).to(dtype)

"""Head split/merge, grouped-query expansion and input validation.

Validation turns bad shapes and dtypes into ``ValueError``/``TypeError`` messages that name the
offending shapes, before anything reaches a matmul. It only reads shapes, dtypes and devices, so it
costs microseconds whatever the size of the tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

QKV_LAYOUT = "(batch, heads, length, head_dim)"


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point()):
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {t.dtype} with shape {_shape(t)}")
    return t


def validate_qkv(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, *, mechanism: str = "attention"
) -> None:
    """Check per-head tensors ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``.

    ``H`` must be a multiple of ``Hkv`` (grouped-query attention); ``key_padding_mask`` must be a
    boolean ``(B, M)`` tensor where ``True`` marks a padded key.
    """
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        check_tensor(t, f"{mechanism}: {n}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{mechanism}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{mechanism}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    shapes = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{mechanism}: expected 4-D q, k, v laid out as {QKV_LAYOUT}; got {shapes}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{mechanism}: batch sizes differ: {shapes}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{mechanism}: k and v must have the same number of heads: {shapes}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{mechanism}: the query heads ({q.shape[1]}) must be a multiple of the key/value heads "
            f"({k.shape[1]}): {shapes}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{mechanism}: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]}): {shapes}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{mechanism}: k and v lengths differ ({k.shape[2]} vs {v.shape[2]}): {shapes}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"{mechanism}: empty sequence: {shapes}")
    if q.shape[-1] == 0 or v.shape[-1] == 0 or q.shape[0] == 0:
        raise ValueError(f"{mechanism}: empty batch or head dimension: {shapes}")
    if key_padding_mask is not None:
        validate_key_padding_mask(key_padding_mask, q.shape[0], k.shape[2], mechanism=mechanism)


def validate_key_padding_mask(mask: object, batch: int, length: int, *, mechanism: str = "attention") -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{mechanism}: key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{mechanism}: key_padding_mask must be boolean (True = padded key), got dtype {mask.dtype} "
            f"with shape {_shape(mask)}"
        )
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"{mechanism}: key_padding_mask must have shape (batch, key_length) = ({batch}, {length}), "
            f"got {_shape(mask)}"
        )
    return mask


def validate_tokens(x: object, dim: int, what: str, *, mechanism: str = "attention") -> Tensor:
    """Check a token tensor ``(B, N, C)`` with ``C == dim``."""
    x = check_tensor(x, f"{mechanism}: {what}")
    if x.dim() != 3:
        raise ValueError(f"{mechanism}: {what} must be (batch, length, {dim}), got shape {_shape(x)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{mechanism}: {what} has {x.shape[-1]} channels, the module was built for {dim}: {_shape(x)}")
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{mechanism}: {what} is empty: shape {_shape(x)}")
    return x


def validate_grid(x: object, dim: int, what: str, *, mechanism: str = "attention") -> Tensor:
    """Check a 2-D token grid ``(B, H, W, C)`` with ``C == dim``."""
    x = check_tensor(x, f"{mechanism}: {what}")
    if x.dim() != 4:
        raise ValueError(f"{mechanism}: {what} must be (batch, height, width, {dim}), got shape {_shape(x)}")
    if x.shape[-1] != dim:
        raise ValueError(f"{mechanism}: {what} has {x.shape[-1]} channels, the module was built for {dim}: {_shape(x)}")
    if 0 in x.shape:
        raise ValueError(f"{mechanism}: {what} is empty: shape {_shape(x)}")
    return x


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``(B, N, H*D) -> (B, H, N, D)``."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, H, N, D) -> (B, N, H*D)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def expand_kv(k: Tensor, v: Tensor, num_q_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat key/value heads for grouped-query attention (no copy when there is nothing to repeat)."""
    rep = num_q_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

"""attnzoo: every attention mechanism from the literature behind one interface.

>>> import torch, attnzoo as az
>>> q = k = v = torch.randn(1, 4, 128, 32)
>>> out = az.attention(q, k, v, mechanism="softmax", causal=True)
>>> layer = az.create("sliding_window", dim=128, num_heads=4, causal=True, window=32)
>>> y = layer(torch.randn(2, 100, 128))
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

from torch import Tensor

from .core.layout import validate_qkv
from .core.module import AttentionModule
from .errors import UnsupportedError
from .registry import CAPABILITIES, FAMILIES, PATTERNS, Mechanism, get, list_mechanisms, pattern_name

__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "FAMILIES",
    "PATTERNS",
    "AttentionModule",
    "Mechanism",
    "UnsupportedError",
    "attention",
    "create",
    "info",
    "list_mechanisms",
]

_COMMON = ("causal", "cross", "key_padding_mask")


@cache
def _accepted_params(fn) -> tuple[frozenset[str], bool]:
    params = inspect.signature(fn).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = frozenset(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY) - set(_COMMON)
    return names, var_kw


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mechanism: str = "softmax",
    *,
    causal: bool = False,
    cross: bool | None = None,
    key_padding_mask: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Run mechanism ``mechanism`` on per-head tensors ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)``.

    ``cross`` says whether q and k/v come from different sequences (a CAB cross pattern); by default
    it is inferred as ``N != M``. For causal self-attention with ``N < M`` (decoding against a cache)
    pass ``cross=False``: query ``i`` then sees keys ``j <= i + M - N``. ``key_padding_mask (B, M)``
    marks padded keys with True. ``params`` are the mechanism's settings (``attnzoo info NAME``).
    Raises :class:`UnsupportedError` for an undeclared pattern, ``ValueError``/``TypeError`` for
    bad input.
    """
    spec = get(mechanism)
    validate_qkv(q, k, v, key_padding_mask, mechanism=spec.name)
    if cross is None:
        cross = q.shape[2] != k.shape[2]
    spec.require(pattern_name(bool(causal), bool(cross)))
    if key_padding_mask is not None:
        spec.require("key_padding_mask")
    if spec.functional is None:
        raise TypeError(f"mechanism {spec.name!r} has no functional form (it is a module only); use attnzoo.create")
    accepted, var_kw = _accepted_params(spec.functional)
    unknown = set(params) - accepted
    if unknown and not var_kw:
        raise TypeError(
            f"{spec.name}: unknown parameter(s) {sorted(unknown)}; accepted: {sorted(accepted) or 'none'}"
        )
    return spec.functional(q, k, v, causal=bool(causal), cross=bool(cross), key_padding_mask=key_padding_mask, **params)


def create(name: str, dim: int, num_heads: int, **cfg: Any) -> AttentionModule:
    """Build mechanism ``name`` as an ``nn.Module`` of width ``dim`` with ``num_heads`` heads.

    ``cfg`` takes ``causal`` and the mechanism's settings (see ``attnzoo info NAME``).
    """
    return get(name).module(dim, num_heads, **cfg)


def info(name: str) -> Mechanism:
    """The registry entry of ``name``: paper, family, capabilities, complexity, defaults (``print(info(name).describe())``)."""
    return get(name)

"""The base ``nn.Module`` every mechanism's module derives from.

It owns what every attention layer shares: input validation, the pattern check against the declared
capabilities, the q/k/v and output projections, head split/merge, and the switch between the fast
form and the reference form (``impl``) that the conformance suite uses to compare them. A mechanism
overrides :meth:`AttentionModule.attend` (per-head tensors in, per-head tensors out) or, when its
structure is not "project, attend, project", :meth:`AttentionModule.forward` itself.

Decoding (capability ``decode``): :meth:`init_state`, :meth:`step` and :meth:`prefill`. A state is a
plain ``dict`` of tensors, ints and :class:`~attnzoo.core.cache.KVCache` objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError
from ..registry import Mechanism, pattern_name
from .layout import merge_heads, split_heads, validate_grid, validate_key_padding_mask, validate_tokens


class AttentionModule(nn.Module):
    """Multi-head attention layer ``(B, N, C) -> (B, N, C)`` around one mechanism.

    Args:
        dim: model width ``C``.
        num_heads: number of query heads ``H``.
        causal: causal self-attention (or, with a ``context``, causal cross-attention).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``); only for
            mechanisms whose module accepts it.
        head_dim: per-head width (default ``dim // num_heads``).
        qkv_bias: bias in the q/k/v projections.
        **params: the mechanism's own settings (see ``attnzoo info NAME``); unknown names are an error.
    """

    spec: ClassVar[Mechanism]
    #: settings this module accepts beyond ``spec.defaults`` (e.g. ``num_kv_heads``)
    extra_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        num_kv_heads: int | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        name = self.spec.name
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{name}: dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"{name}: num_heads must be a positive int, got {num_heads!r}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{name}: dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads != num_heads and "num_kv_heads" not in self.extra_settings:
            raise ValueError(f"{name}: grouped-query attention (num_kv_heads != num_heads) is not offered by this module")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if causal and not (self.spec.supports("causal_self") or self.spec.supports("causal_cross")):
            self.spec.require("causal_self")
        if not causal and not (self.spec.supports("noncausal_self") or self.spec.supports("noncausal_cross")):
            if not self.spec.supports("spatial"):
                self.spec.require("noncausal_self")
        unknown = set(params) - set(self.spec.defaults)
        if unknown:
            raise TypeError(
                f"{name}: unknown setting(s) {sorted(unknown)}; this mechanism takes "
                f"{sorted(self.spec.defaults) or 'no settings'} besides dim, num_heads, causal, head_dim, qkv_bias"
                + (", num_kv_heads" if "num_kv_heads" in self.extra_settings else "")
            )
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = bool(causal)
        self.settings: dict[str, Any] = {**self.spec.defaults, **params}
        #: "fast" (the default) or "reference": which form :meth:`attend` runs.
        self.impl = "fast"
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(num_heads * head_dim, dim)

    # -- the parts a mechanism overrides ---------------------------------------------------------
    def op_params(self) -> Mapping[str, Any]:
        """Keyword arguments passed to the functional op (settings and, if any, learned tensors)."""
        return self.settings

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, cross: bool, key_padding_mask: Tensor | None) -> Tensor:
        """Per-head attention ``(B, H, N, D) -> (B, H, N, Dv)`` with the fast or reference form."""
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        if fn is None:
            raise TypeError(f"{self.spec.name}: no {self.impl} functional form; the module must override attend()")
        return fn(q, k, v, causal=self.causal, cross=cross, key_padding_mask=key_padding_mask, **self.op_params())

    # -- shared plumbing ---------------------------------------------------------------------------
    def check_inputs(self, x: Tensor, context: Tensor | None, key_padding_mask: Tensor | None) -> bool:
        """Validate inputs and the requested pattern; returns ``cross``.

        A 4-D ``x`` is a token grid: it needs the ``spatial`` capability (and no 1-D pattern) and takes
        neither a context nor a padding mask.
        """
        name = self.spec.name
        if isinstance(x, Tensor) and x.dim() == 4:
            self.spec.require("spatial")
            validate_grid(x, self.dim, "x", mechanism=name)
            if context is not None:
                raise ValueError(f"{name}: a grid input takes no context (2-D cross-attention is not offered)")
            if key_padding_mask is not None:
                raise ValueError(f"{name}: a grid input takes no key_padding_mask")
            return False
        validate_tokens(x, self.dim, "x", mechanism=name)
        cross = context is not None
        self.spec.require(pattern_name(self.causal, cross))
        if cross:
            validate_tokens(context, self.dim, "context", mechanism=name)
            if context.shape[0] != x.shape[0]:
                raise ValueError(f"{name}: x {tuple(x.shape)} and context {tuple(context.shape)} differ in batch size")
            if context.dtype != x.dtype:
                raise TypeError(f"{name}: x ({x.dtype}) and context ({context.dtype}) differ in dtype")
        if key_padding_mask is not None:
            self.spec.require("key_padding_mask")
            m = (context if cross else x).shape[1]
            validate_key_padding_mask(key_padding_mask, x.shape[0], m, mechanism=name)
        return cross

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        src = x if context is None else context
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(src), self.num_kv_heads)
        v = split_heads(self.v_proj(src), self.num_kv_heads)
        return q, k, v

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """Self-attention over ``x (B, N, C)``, or cross-attention to ``context (B, M, C)``.

        ``key_padding_mask (B, M)``: True marks a padded key (ignored).
        """
        cross = self.check_inputs(x, context, key_padding_mask)
        if x.dim() == 4:
            return self.forward_spatial(x)
        q, k, v = self.project(x, context)
        out = self.attend(q, k, v, cross=cross, key_padding_mask=key_padding_mask)
        return self.out_proj(merge_heads(out))

    def forward_spatial(self, x: Tensor) -> Tensor:
        """2-D input ``(B, H, W, C)``; spatial mechanisms override this."""
        raise UnsupportedError(self.spec.name, "spatial")

    # -- decoding ------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        """An empty decoding state for ``batch_size`` sequences."""
        self.spec.require("decode")
        raise TypeError(f"{self.spec.name} declares decode but its module does not override init_state")

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        """Decode one token ``x_t (B, C)`` (or ``(B, 1, C)``); returns the output of the same shape and the new state.

        The default runs :meth:`prefill` on the one token; mechanisms with a cheaper single-token
        recurrence override it.
        """
        self.spec.require("decode")
        x3, squeeze = self._check_step_input(x_t)
        y, state = self.prefill(x3, state)
        return (y[:, 0] if squeeze else y), state

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        """Run the full forward over ``x (B, N, C)`` (continuing ``state`` if given) and return the state after it."""
        self.spec.require("decode")
        raise TypeError(f"{self.spec.name} declares decode but its module does not override prefill")

    # helpers for subclasses
    def _check_step_input(self, x_t: Tensor) -> tuple[Tensor, bool]:
        """Accept ``(B, C)`` or ``(B, 1, C)``; return ``(B, 1, C)`` and whether to squeeze the output."""
        if not self.causal:
            raise ValueError(f"{self.spec.name}: step() decodes causally; build the module with causal=True")
        if isinstance(x_t, Tensor) and x_t.dim() == 2:
            x_t = validate_tokens(x_t[:, None], self.dim, "x_t", mechanism=self.spec.name)
            return x_t, True
        x_t = validate_tokens(x_t, self.dim, "x_t", mechanism=self.spec.name)
        if x_t.shape[1] != 1:
            raise ValueError(f"{self.spec.name}: step() takes one token, (B, C) or (B, 1, C); got {tuple(x_t.shape)}")
        return x_t, False

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}"
        if self.num_kv_heads != self.num_heads:
            s += f", num_kv_heads={self.num_kv_heads}"
        if self.settings:
            s += ", " + ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return s


def state_tensors(state: Any, prefix: str = "") -> dict[str, Tensor]:
    """Flatten a decoding state into ``{path: tensor}`` (ints become 0-d tensors) for comparisons."""
    from .cache import KVCache

    out: dict[str, Tensor] = {}
    if isinstance(state, Tensor):
        out[prefix or "."] = state
    elif isinstance(state, KVCache):
        out[prefix + ".keys"] = state.keys
        out[prefix + ".values"] = state.values
    elif isinstance(state, Mapping):
        for k in sorted(state):
            out.update(state_tensors(state[k], f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, s in enumerate(state):
            out.update(state_tensors(s, f"{prefix}[{i}]"))
    elif isinstance(state, (int, float, bool)):
        out[prefix] = torch.tensor(state)
    elif state is None:
        pass
    else:
        raise TypeError(f"state entry {prefix!r} has unsupported type {type(state).__name__}")
    return out

"""The registry: one :class:`Mechanism` spec per attention mechanism, the one source of truth.

A mechanism registers itself from its own file with the :func:`register` decorator placed on its
``nn.Module`` class; the package imports every file under ``attnzoo/mechanisms`` on first use, so
adding a mechanism means adding a file and nothing else.

The declared capabilities drive everything else: the dispatcher's error messages, the conformance
suite (``tests/conformance``), the capability matrix in the report and the benchmarks.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import UnsupportedError

#: The four attention patterns of the CAB benchmark (arXiv 2210.07661).
PATTERNS: tuple[str, ...] = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")

#: Every capability a mechanism can declare, with its meaning (shown by ``attnzoo info``).
CAPABILITIES: Mapping[str, str] = MappingProxyType(
    {
        "noncausal_self": "bidirectional self-attention (encoders)",
        "causal_self": "causal self-attention (decoder-only language models)",
        "noncausal_cross": "queries attend to a separate source, no mask",
        "causal_cross": "queries attend to a source; output i depends on queries <= i only (source never masked)",
        "decode": "init_state/step reproduce the full forward token by token",
        "spatial": "takes a 2-D token grid (B, H, W, C)",
        "key_padding_mask": "honours a (B, M) key padding mask (True = padded key, ignored)",
        "trainable": "has a backward pass",
        "exact": "equals softmax attention up to rounding",
    }
)

FAMILIES: tuple[str, ...] = ("softmax", "linear", "sparse", "vision")


def pattern_name(causal: bool, cross: bool) -> str:
    """The CAB pattern name for a (causal, cross) pair."""
    return f"{'causal' if causal else 'noncausal'}_{'cross' if cross else 'self'}"


@dataclass(frozen=True)
class Mechanism:
    """Everything the library knows about one mechanism.

    ``functional(q, k, v, *, causal, cross, key_padding_mask, **params)`` is the fast op on per-head
    tensors ``(B, H, N, D)``; ``reference`` has the same signature and is the readable form written
    from the paper's equations (float64-capable). ``module`` is the ``nn.Module`` class; it is built
    with ``module(dim, num_heads, causal=..., **cfg)``.
    """

    name: str
    paper: str
    arxiv: str | None
    family: str
    capabilities: frozenset[str]
    complexity: str
    module: type
    functional: Callable[..., Any] | None = None
    reference: Callable[..., Any] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    deviations: str = ""
    #: Config used by the conformance suite and quick benchmarks (small, fast, still meaningful,
    #: e.g. a window smaller than the test length so that the sparsity is exercised).
    test_config: Mapping[str, Any] = field(default_factory=dict)

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p for p in PATTERNS if p in self.capabilities)

    def require(self, capability: str) -> None:
        """Raise :class:`UnsupportedError` unless ``capability`` is declared."""
        if capability not in self.capabilities:
            others = [m.name for m in _REGISTRY.values() if capability in m.capabilities]
            raise UnsupportedError(self.name, capability, others)

    def describe(self) -> str:
        """A human-readable multi-line description (``attnzoo info``)."""
        lines = [
            f"{self.name}  ({self.family} family)",
            f"  paper:       {self.paper}" + (f"  (arXiv {self.arxiv})" if self.arxiv else ""),
        ]
        if self.summary:
            lines.append(f"  summary:     {self.summary}")
        lines.append(f"  complexity:  {self.complexity}")
        lines.append("  patterns:    " + (", ".join(self.patterns) or "none"))
        extra = [c for c in CAPABILITIES if c not in PATTERNS and c in self.capabilities]
        lines.append("  also:        " + (", ".join(extra) or "none"))
        missing = [c for c in CAPABILITIES if c not in self.capabilities]
        lines.append("  not:         " + (", ".join(missing) or "none"))
        if self.defaults:
            lines.append("  defaults:    " + ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()))
        lines.append(f"  module:      {self.module.__module__}.{self.module.__qualname__}")
        if self.functional is not None:
            lines.append(f"  functional:  {self.functional.__module__}.{self.functional.__qualname__}")
        if self.deviations:
            lines.append(f"  deviations:  {self.deviations}")
        return "\n".join(lines)


_REGISTRY: dict[str, Mechanism] = {}
_LOADED = False


def register(
    name: str,
    *,
    paper: str,
    arxiv: str | None,
    family: str,
    capabilities: Iterable[str],
    complexity: str,
    functional: Callable[..., Any] | None = None,
    reference: Callable[..., Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    summary: str = "",
    deviations: str = "",
    test_config: Mapping[str, Any] | None = None,
) -> Callable[[type], type]:
    """Class decorator that registers the decorated ``nn.Module`` as mechanism ``name``."""

    caps = frozenset(capabilities)
    unknown = caps - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"mechanism {name!r}: unknown capabilities {sorted(unknown)}; known: {list(CAPABILITIES)}")
    if family not in FAMILIES:
        raise ValueError(f"mechanism {name!r}: unknown family {family!r}; known: {FAMILIES}")
    if not any(p in caps for p in PATTERNS) and "spatial" not in caps:
        raise ValueError(f"mechanism {name!r} declares no attention pattern and is not spatial")

    def decorator(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].module is not cls:
            raise ValueError(f"mechanism {name!r} is registered twice ({_REGISTRY[name].module} and {cls})")
        spec = Mechanism(
            name=name,
            paper=paper,
            arxiv=arxiv,
            family=family,
            capabilities=caps,
            complexity=complexity,
            module=cls,
            functional=functional,
            reference=reference,
            defaults=MappingProxyType(dict(defaults or {})),
            summary=summary,
            deviations=deviations,
            test_config=MappingProxyType(dict(test_config or {})),
        )
        cls.spec = spec
        _REGISTRY[name] = spec
        return cls

    return decorator


def _load_all() -> None:
    """Import every module under ``attnzoo.mechanisms`` once (each registers itself)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import mechanisms

    for info in pkgutil.walk_packages(mechanisms.__path__, prefix=mechanisms.__name__ + "."):
        importlib.import_module(info.name)


def get(name: str) -> Mechanism:
    """The spec of mechanism ``name``; a ``KeyError`` lists the known names and close matches."""
    _load_all()
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown mechanism {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}") from None


def list_mechanisms(pattern: str | None = None, family: str | None = None, capability: str | None = None) -> list[str]:
    """Registered mechanism names, sorted, optionally filtered by pattern, family or capability."""
    _load_all()
    if pattern is not None and pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; one of {PATTERNS}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if capability is not None and capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}; one of {tuple(CAPABILITIES)}")
    out = []
    for name, spec in _REGISTRY.items():
        if pattern is not None and pattern not in spec.capabilities:
            continue
        if family is not None and spec.family != family:
            continue
        if capability is not None and capability not in spec.capabilities:
            continue
        out.append(name)
    return sorted(out)


def all_specs() -> list[Mechanism]:
    """Every registered spec, sorted by name."""
    _load_all()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]

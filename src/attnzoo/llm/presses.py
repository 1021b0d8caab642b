"""KV-cache presses: compress the key/value cache of a Hugging Face decoder during prefill.

A press is a context manager around ``model(...)`` / ``model.generate(...)``::

    press = SnapKVPress(compression_ratio=0.75)
    with press(model):
        model.generate(ids, max_new_tokens=20)
    press.report()          # what it kept, per layer

Mechanics (the same integration as NVIDIA kvpress, written from its description in
``shared/specs/llm-kv.md``): a forward hook (``with_kwargs=True``) on every ``self_attn`` runs after the
layer has attended over the full prompt; when the call is the prefill (the cache was empty:
``cache_position[-1] + 1 == q_len``) it replaces ``cache.layers[i].keys/values`` by the press's
selection. Attention during prefill is therefore exact; only what later tokens see is compressed.

* The cache stays grouped-query shaped ``(B, H_kv, T_kept, D)``: per-query-head scores are aggregated
  over each GQA group (mean by default, ``aggregate="max"`` as option) and never ``repeat_kv``'d.
* Keys keep the RoPE rotation of their original positions. ``model.generate`` continues positions from
  the original length (it counts the attention mask, not the cache); the helpers in
  :mod:`attnzoo.llm.generation` pass ``position_ids = original_length + i`` explicitly.
* Budget: ``compression_ratio`` r (fraction removed, ``n_kept = int(T * (1 - r))`` as kvpress) or
  ``budget`` (tokens kept). The protected tokens (sinks, observation window, recent window) are always
  kept, so the realized size is ``max(n_kept, protected)``, never 0; a prompt no longer than the
  protected part is left untouched. ``compression_ratio=0`` (and no budget) returns the cache unchanged.

Presses: ``snapkv`` (SnapKV, arXiv 2404.14469), ``streaming`` (StreamingLLM, arXiv 2309.17453),
``heavy_hitters`` (H2O, arXiv 2306.14048), ``s2`` (S2-Attention sharding at inference), ``saq``
(staircase adaptive quantization, arXiv 2410.18441), ``knorm`` (key-norm baseline, arXiv 2406.11430),
``random`` (baseline) and ``retrieval`` (RetrievalAttention, arXiv 2409.10516; in
:mod:`attnzoo.llm.retrieval`).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# model plumbing (isolates transformers API churn; could move to a shared core/hf.py)


def decoder_layers(model) -> list:
    """The list of decoder layers of a causal LM (Llama/Mistral/Qwen/Phi3 layouts)."""
    for path in ("model.layers", "layers", "model.language_model.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise TypeError(f"{type(model).__name__}: cannot find the decoder layers (expected model.model.layers)")


def attention_modules(model) -> list:
    return [layer.self_attn for layer in decoder_layers(model)]


def cache_layer_kv(cache, layer_idx: int) -> tuple[Tensor, Tensor]:
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        return layer.keys, layer.values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]  # transformers < 4.56


def set_cache_layer_kv(cache, layer_idx: int, keys: Tensor, values: Tensor) -> None:
    if hasattr(cache, "layers"):
        layer = cache.layers[layer_idx]
        if type(layer).__name__ not in ("DynamicLayer",):
            raise TypeError(f"presses need a DynamicCache; got a {type(layer).__name__} layer")
        layer.keys, layer.values = keys, values
    else:  # pragma: no cover - transformers < 4.56
        cache.key_cache[layer_idx], cache.value_cache[layer_idx] = keys, values


def cache_lengths(cache) -> list[int]:
    n = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
    return [cache_layer_kv(cache, i)[0].shape[-2] for i in range(n)]


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a (dynamic) cache, all layers."""
    n = len(cache.layers) if hasattr(cache, "layers") else len(cache.key_cache)
    total = 0
    for i in range(n):
        k, v = cache_layer_kv(cache, i)
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``(B, Hkv, T, D) -> (B, Hkv * groups, T, D)``; query head ``h`` reads kv head ``h // groups``."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Llama-convention RoPE: ``x (B, H, T, D)``, ``cos, sin (B, T, D)``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def recompute_queries(module, hidden_states: Tensor, position_embeddings, last: int | None = None) -> Tensor:
    """Post-RoPE queries ``(B, Hq, T', D)`` of the last ``last`` tokens (all if None), from ``q_proj``."""
    h = hidden_states if last is None else hidden_states[:, -last:]
    b, t, _ = h.shape
    d = module.head_dim
    q = module.q_proj(h).view(b, t, -1, d)
    if hasattr(module, "q_norm"):  # Qwen3 / Gemma3 normalize queries before RoPE
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    cos, sin = position_embeddings
    if last is not None:
        cos, sin = cos[:, -last:], sin[:, -last:]
    return apply_rope(q, cos, sin)


def group_reduce(scores: Tensor, num_kv_heads: int, how: str = "mean") -> Tensor:
    """``(B, Hq, T) -> (B, Hkv, T)`` over each GQA group."""
    b, hq, t = scores.shape
    s = scores.view(b, num_kv_heads, hq // num_kv_heads, t)
    if how == "mean":
        return s.mean(2)
    if how == "max":
        return s.amax(2)
    raise ValueError(f"aggregate must be 'mean' or 'max', got {how!r}")


# --------------------------------------------------------------------------------------------------
# base classes


@dataclass
class LayerRecord:
    layer: int
    original: int
    kept: int
    bytes_before: int
    bytes_after: int


@dataclass
class BasePress(abc.ABC):
    """A KV-cache press. Subclasses implement :meth:`compress`.

    ``compression_ratio`` in ``[0, 1)`` is the fraction of the prompt's cache removed; ``budget`` (if
    given) is the number of tokens kept per layer and head instead.
    """

    compression_ratio: float = 0.0
    budget: int | None = None
    records: list[LayerRecord] = field(default_factory=list, init=False, repr=False)

    name = "base"

    def __post_init__(self):
        if not 0.0 <= float(self.compression_ratio) < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.budget is not None and int(self.budget) < 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")

    # ---- budget -----------------------------------------------------------------------------------
    def protected(self, seq_len: int) -> int:
        """Tokens this press always keeps (sinks, windows); at least 1."""
        return 1

    def target(self, seq_len: int) -> int:
        """Tokens requested by the budget (before protection)."""
        if self.budget is not None:
            return min(seq_len, int(self.budget))
        return int(seq_len * (1.0 - float(self.compression_ratio)))

    def n_kept(self, seq_len: int) -> int:
        """Tokens kept per head for a prompt of ``seq_len`` tokens: ``clamp(target, protected, seq_len)``."""
        return max(min(seq_len, self.target(seq_len)), min(seq_len, self.protected(seq_len)), min(seq_len, 1))

    def is_noop(self, seq_len: int) -> bool:
        return (self.budget is None and float(self.compression_ratio) == 0.0) or self.n_kept(
            seq_len
        ) >= seq_len

    # ---- compression ------------------------------------------------------------------------------
    @abc.abstractmethod
    def compress(
        self, module, hidden_states: Tensor, keys: Tensor, values: Tensor, attentions, kwargs
    ) -> tuple[Tensor, Tensor]:
        """Return the compressed ``(keys, values)`` of one layer (``(B, Hkv, T, D)`` each)."""

    def _record(
        self, layer_idx: int, before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], bytes_after=None
    ):
        nb = sum(t.numel() * t.element_size() for t in before)
        na = sum(t.numel() * t.element_size() for t in after) if bytes_after is None else int(bytes_after)
        self.records.append(LayerRecord(layer_idx, before[0].shape[-2], after[0].shape[-2], nb, na))

    def compress_layer(
        self, module, hidden_states, keys, values, attentions, kwargs
    ) -> tuple[Tensor, Tensor]:
        """Compressed ``(keys, values)`` of one layer (the inputs themselves when there is nothing to do); records it."""
        idx = int(getattr(module, "layer_idx", len(self.records)))
        if self.is_noop(keys.shape[-2]):
            self._record(idx, (keys, values), (keys, values))
            return keys, values
        new_k, new_v = self.compress(module, hidden_states, keys, values, attentions, kwargs)
        self._record(idx, (keys, values), (new_k, new_v), bytes_after=self._bytes_after(new_k, new_v))
        return new_k, new_v

    def apply_to_layer(self, module, hidden_states, cache, attentions, kwargs) -> None:
        """Compress the cache layer of ``module`` in place (called from the hook)."""
        keys, values = cache_layer_kv(cache, module.layer_idx)
        new_k, new_v = self.compress_layer(module, hidden_states, keys, values, attentions, kwargs)
        if new_k is not keys:
            set_cache_layer_kv(cache, module.layer_idx, new_k, new_v)

    def _bytes_after(self, keys, values):
        return None

    @staticmethod
    def is_prefill(kwargs, q_len: int) -> bool:
        cp = kwargs.get("cache_position")
        if cp is None:
            return False
        return int(cp[-1]) + 1 == q_len

    def forward_hook(self, module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if hidden is None or cache is None or not self.is_prefill(kwargs, hidden.shape[1]):
            return output
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if getattr(module, "layer_idx", None) == 0:
            self.reset()  # a new prefill inside the same context: report only this one
        with torch.no_grad():
            self.apply_to_layer(module, hidden, cache, attentions, kwargs)
        return output

    def decode_context(self, model):
        """Context active while decoding from a compressed cache (retrieval needs one; others: none)."""
        return contextlib.nullcontext()

    def reset(self) -> None:
        """Forget the previous prefill (called when a new prefill starts)."""
        self.records = []

    @contextlib.contextmanager
    def __call__(self, model):
        self.reset()
        handles = []
        try:
            for mod in attention_modules(model):
                handles.append(mod.register_forward_hook(self.forward_hook, with_kwargs=True))
            with self.decode_context(model):
                yield self
        finally:
            for h in handles:
                h.remove()

    # ---- reporting --------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What the last prefill kept: per-layer original/kept lengths, bytes, realized ratio."""
        if not self.records:
            return {"press": self.name, "layers": 0}
        orig = sum(r.original for r in self.records)
        kept = sum(r.kept for r in self.records)
        nb = sum(r.bytes_before for r in self.records)
        na = sum(r.bytes_after for r in self.records)
        return {
            "press": self.name,
            "layers": len(self.records),
            "original_tokens": self.records[0].original,
            "kept_tokens": [r.kept for r in self.records],
            "kept_fraction": kept / max(orig, 1),
            "bytes_before": nb,
            "bytes_after": na,
            "memory_ratio": 1.0 - na / max(nb, 1),
        }


@dataclass
class ScorerPress(BasePress):
    """Keep the ``n_kept`` highest-scoring tokens per kv head (indices sorted, so cache order = position order)."""

    @abc.abstractmethod
    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        """``(B, Hkv, T)`` scores, higher = keep."""

    last_scores: Tensor | None = field(default=None, init=False, repr=False)
    keep_scores: bool = field(default=False, repr=False)

    def select(self, scores: Tensor, n_kept: int) -> Tensor:
        idx = scores.topk(n_kept, dim=-1).indices
        return idx.sort(dim=-1).values

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        t = keys.shape[-2]
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
        if self.keep_scores:
            self.last_scores = scores.detach().clone()
        idx = self.select(scores, self.n_kept(t))
        gidx = idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
        return keys.gather(2, gidx).contiguous(), values.gather(2, gidx).contiguous()


def _protect(scores: Tensor, positions: Tensor) -> Tensor:
    """Give ``positions`` a score above every other (max + 1; kvpress #226: plain max loses ties)."""
    out = scores.clone()
    out[..., positions] = scores.max() + 1.0
    return out


# --------------------------------------------------------------------------------------------------
# presses


@dataclass
class SnapKVPress(ScorerPress):
    """SnapKV: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., arXiv 2404.14469).

    The last ``window_size`` prompt tokens (observation window) vote: their softmax attention over the
    prefix is averaged over the window queries, smoothed by 1-D pooling (``kernel_size``, ``pooling``),
    aggregated over each GQA group, and the top prefix positions per kv head are kept together with
    the window itself. Paper defaults (LongBench configs ``c*_w32_k7_maxpool``): window 32, kernel 7,
    max pooling. kvpress's defaults are ``window_size=64, kernel_size=5, pooling="avg"``.
    Deviation: the official code repeats k/v to the query heads before selecting (cache x3 for
    SmolLM2); here scores are averaged over the group so the cache stays 3 kv heads (as kvpress).
    Queries of the window are recomputed from the layer's hidden states (works with SDPA).
    """

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    aggregate: str = "mean"

    name = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.window_size < 1 or self.kernel_size < 1:
            raise ValueError("window_size and kernel_size must be >= 1")

    @classmethod
    def kvpress_defaults(cls, compression_ratio: float = 0.0, **kw) -> SnapKVPress:
        """NVIDIA kvpress's ``SnapKVPress`` settings (window 64, kernel 5, average pooling)."""
        return cls(compression_ratio, window_size=64, kernel_size=5, pooling="avg", **kw)

    def protected(self, seq_len):
        return self.window_size

    def window_attention(self, module, hidden_states, keys, kwargs) -> Tensor:
        """Softmax attention ``(B, Hq, w, T)`` of the observation window over all prompt keys (fp32)."""
        w = self.window_size
        t = keys.shape[-2]
        q = recompute_queries(module, hidden_states, kwargs["position_embeddings"], last=w)
        groups = q.shape[1] // keys.shape[1]
        k = repeat_kv(keys, groups)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (module.head_dim**-0.5)
        qpos = torch.arange(t - w, t, device=keys.device)[:, None]
        kpos = torch.arange(t, device=keys.device)[None, :]
        logits = logits.masked_fill(kpos > qpos, float("-inf"))
        return logits.softmax(dim=-1)

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        w = self.window_size
        b, hkv, t, _ = keys.shape
        if attentions is not None and attentions.shape[-1] == t and attentions.shape[-2] == t:
            attn = attentions[..., -w:, :].float()
        else:
            attn = self.window_attention(module, hidden_states, keys, kwargs)
        vote = attn[..., : t - w].mean(dim=-2)  # (B, Hq, T - w); the paper sums (same ranking)
        k = self.kernel_size
        if k > 1:
            if self.pooling == "avg":
                pooled = F.avg_pool1d(vote, kernel_size=k, padding=k // 2, stride=1)
            else:
                pooled = F.max_pool1d(vote, kernel_size=k, padding=k // 2, stride=1)
            vote = pooled[..., : t - w]
        scores = group_reduce(vote, hkv, self.aggregate)
        window = torch.full((b, hkv, w), 0.0, dtype=scores.dtype, device=scores.device)
        scores = torch.cat([scores, window], dim=-1)
        return _protect(scores, torch.arange(t - w, t, device=keys.device))


@dataclass
class StreamingPress(ScorerPress):
    """StreamingLLM: "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., arXiv 2309.17453).

    Keeps the first ``n_sink`` tokens (attention sinks, paper: 4) and the most recent
    ``n_kept - n_sink`` tokens. Deviation (as kvpress): keys keep their original RoPE positions; the
    paper re-assigns positions within the cache (kvpress issue #158 reports no metric gain).
    """

    n_sink: int = 4

    name = "streaming"

    def protected(self, seq_len):
        return self.n_sink + 1

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, hkv, t, _ = keys.shape
        n = self.n_kept(t)
        s = torch.zeros(b, hkv, t, device=keys.device)
        recent = n - min(self.n_sink, n)
        s[..., : self.n_sink] = 2.0
        if recent > 0:
            s[..., t - recent :] = 1.0
        return s


@dataclass
class HeavyHittersPress(ScorerPress):
    """H2O: "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (Zhang et al., arXiv 2306.14048).

    Score of a key = attention it received, accumulated (summed) over every prompt query (the paper's
    ``hh_score``), aggregated over the GQA group; the most recent ``recent_fraction`` of the budget is
    always kept (paper scripts: heavy ratio = recent ratio, i.e. 0.5) and the rest goes to the highest
    scores. ``normalize=True`` divides by the number of queries that see each key (kvpress's
    ObservedAttention). With eager attention the layer's weights are used; otherwise the attention is
    recomputed from ``q_proj`` in blocks of ``chunk`` queries (never the full T x T matrix).
    Deviation: eviction happens once, after prefill; the paper also evicts greedily at every decode step.
    """

    recent_fraction: float = 0.5
    normalize: bool = False
    aggregate: str = "mean"
    chunk: int = 256

    name = "heavy_hitters"

    def n_recent(self, seq_len):
        return max(1, int(round(self.n_kept(seq_len) * self.recent_fraction)))

    def protected(self, seq_len):
        return 1

    def accumulated_attention(self, module, hidden_states, keys, attentions, kwargs) -> Tensor:
        b, hkv, t, d = keys.shape
        if attentions is not None and attentions.shape[-1] == t and attentions.shape[-2] == t:
            return attentions.float().sum(dim=-2)
        q = recompute_queries(module, hidden_states, kwargs["position_embeddings"])
        k = repeat_kv(keys, q.shape[1] // hkv).float()
        total = torch.zeros(b, q.shape[1], t, device=keys.device)
        kpos = torch.arange(t, device=keys.device)[None, :]
        for s in range(0, t, self.chunk):
            e = min(t, s + self.chunk)
            logits = torch.matmul(q[:, :, s:e].float(), k.transpose(-1, -2)) * (module.head_dim**-0.5)
            qpos = torch.arange(s, e, device=keys.device)[:, None]
            logits = logits.masked_fill(kpos > qpos, float("-inf"))
            total += logits.softmax(-1).sum(dim=-2)
        return total

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, hkv, t, _ = keys.shape
        acc = self.accumulated_attention(module, hidden_states, keys, attentions, kwargs)
        if self.normalize:
            acc = acc / torch.arange(t, 0, -1, device=acc.device, dtype=acc.dtype)
        scores = group_reduce(acc, hkv, self.aggregate)
        r = min(self.n_recent(t), t)
        return _protect(scores, torch.arange(t - r, t, device=keys.device))


@dataclass
class KnormPress(ScorerPress):
    """Key-norm baseline ("A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", arXiv 2406.11430): keep low-norm keys."""

    name = "knorm"

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        return -keys.float().norm(dim=-1)


@dataclass
class RandomPress(ScorerPress):
    """Baseline: keep a uniformly random subset (seeded)."""

    seed: int = 0
    name = "random"

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        g = torch.Generator(device="cpu").manual_seed(self.seed + 1000 * int(getattr(module, "layer_idx", 0)))
        return torch.rand(keys.shape[:-1], generator=g).to(keys.device)


@dataclass
class S2Press(ScorerPress):
    """S2-Attention's head-wise context sharding applied to a pretrained model's cache at inference.

    "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (arXiv 2407.17678): each head
    attends to a different strided shard of the context plus a local window. Here every kv head keeps
    ``n_sink`` sinks and the last ``window`` tokens, plus its own shard of the ``M`` middle tokens:
    the ``m`` positions ``start + floor((i + h / H_kv) * M / m)``, ``i = 0..m-1``, for kv head ``h`` (a
    stride of ``M / m`` with a head-dependent offset, so heads see different tokens and their union
    covers up to ``H_kv`` times more of the context than one head). Training-free (the paper trains
    with the pattern).
    """

    n_sink: int = 4
    window: int = 64

    name = "s2"

    def protected(self, seq_len):
        return min(seq_len, self.n_sink + self.window)

    def shard(self, seq_len: int, n_kept: int, head: int, num_heads: int) -> Tensor:
        """Middle positions kept by kv head ``head``."""
        start = min(self.n_sink, seq_len)
        middle = seq_len - self.protected(seq_len)
        m = n_kept - self.protected(seq_len)
        if m <= 0 or middle <= 0:
            return torch.zeros(0, dtype=torch.long)
        step = middle / m
        i = torch.arange(m, dtype=torch.float64)
        return start + torch.floor((i + head / num_heads) * step).long()

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, hkv, t, _ = keys.shape
        n = self.n_kept(t)
        scores = torch.zeros(b, hkv, t, device=keys.device)
        for h in range(hkv):
            scores[:, h, self.shard(t, n, h, hkv).to(keys.device)] = 1.0
        prot = torch.cat([torch.arange(min(self.n_sink, t)), torch.arange(t - min(self.window, t), t)]).to(
            keys.device
        )
        scores[..., prot] = 2.0
        return scores


# --------------------------------------------------------------------------------------------------
# SAQ


def quantize_dequantize(x: Tensor, bits: int, dim: int) -> Tensor:
    """Asymmetric uniform round-to-nearest with min/max over ``dim`` (``bits >= 16``: unchanged)."""
    if bits >= 16:
        return x
    xf = x.float()
    lo = xf.amin(dim=dim, keepdim=True)
    hi = xf.amax(dim=dim, keepdim=True)
    levels = 2**bits - 1
    scale = (hi - lo).clamp_min(1e-8) / levels
    q = ((xf - lo) / scale).round().clamp(0, levels)
    return (q * scale + lo).to(x.dtype)


def _value_groups(x: Tensor, group: int) -> tuple[Tensor, int]:
    d = x.shape[-1]
    g = group if d % group == 0 else d
    return x.reshape(*x.shape[:-1], d // g, g), g


@dataclass
class SAQPress(BasePress):
    """SAQ, staircase adaptive quantization of the KV cache, from "The Nature of Mathematical Modeling and
    Probabilistic Optimization Engineering in Generative AI" (Fulu Li, arXiv 2410.18441).

    Reading implemented (the paper body was not available; the abstract says SAQ builds on KIVI's
    grouped quantization with a full-precision residual "to have gradual quantization degradation";
    the staircase is our reading of its pseudo-code): the newest ``residual`` tokens stay in full
    precision; the older tokens are cut, from newest to oldest, into stairs of ``stair_tokens`` tokens;
    stair ``i`` (1 = newest) is stored at ``bits[min(i, len(bits)) - 1]`` bits, so precision only
    decreases with age and everything past the last stair uses the lowest width. Keys are quantized per
    channel over the tokens of a stair, values per token in groups of ``group_size`` channels (KIVI),
    asymmetric min/max round-to-nearest; scale and zero point count as 16-bit each.
    The cache holds the de-quantized values (simulated quantization: accuracy is exact, memory is
    accounted as the packed size in :meth:`report`). No tokens are dropped.
    Budget: ``compression_ratio`` r asks for ``bytes <= (1 - r) x`` full cache; ``stair_tokens`` is then
    the largest stair length meeting it (an explicit ``stair_tokens`` wins). Prefill only: tokens
    generated afterwards stay in full precision (the paper re-quantizes one stair lower at every push).
    """

    bits: tuple[int, ...] = (8, 4, 2)
    stair_tokens: int | None = None
    residual: int = 32
    group_size: int = 32

    name = "saq"

    def __post_init__(self):
        super().__post_init__()
        self.bits = tuple(int(b) for b in self.bits)
        if (
            not self.bits
            or any(b < 1 for b in self.bits)
            or list(self.bits) != sorted(self.bits, reverse=True)
        ):
            raise ValueError(f"bits must be a non-increasing sequence of positive widths, got {self.bits}")

    def is_noop(self, seq_len):
        if self.stair_tokens is None and self.budget is None and float(self.compression_ratio) == 0.0:
            return True
        return seq_len <= self.residual

    def layout(self, seq_len: int, stair: int) -> list[tuple[int, int, int]]:
        """``[(start, end, bits), ...]`` covering ``[0, seq_len)``, oldest first; full precision = 0 bits."""
        res = min(self.residual, seq_len)
        spans = []
        end = seq_len - res
        i = 1
        while end > 0:
            b = self.bits[min(i, len(self.bits)) - 1]
            start = 0 if i >= len(self.bits) else max(0, end - stair)
            spans.append((start, end, b))
            end = start
            i += 1
        spans.reverse()
        if res:
            spans.append((seq_len - res, seq_len, 0))
        return spans

    def packed_bytes(self, seq_len: int, stair: int, heads: int, dim: int, elem_bytes: int) -> int:
        total_bits = 0
        for s, e, b in self.layout(seq_len, stair):
            n = e - s
            if b == 0:
                total_bits += 2 * n * dim * elem_bytes * 8
                continue
            g = self.group_size if dim % self.group_size == 0 else dim
            total_bits += n * dim * b + dim * 2 * 16  # keys: data + per-channel scale/zero
            total_bits += n * dim * b + n * (dim // g) * 2 * 16  # values: data + per-token-group scale/zero
        return heads * total_bits // 8

    def choose_stair(self, seq_len: int, heads: int, dim: int, elem_bytes: int) -> int:
        if self.stair_tokens is not None:
            return max(1, int(self.stair_tokens))
        full = 2 * heads * seq_len * dim * elem_bytes
        allowed = (
            full * (1.0 - float(self.compression_ratio))
            if self.budget is None
            else 2 * heads * dim * elem_bytes * int(self.budget)
        )
        lo, hi = 1, max(1, seq_len)
        if self.packed_bytes(seq_len, lo, heads, dim, elem_bytes) > allowed:
            return lo
        while lo < hi:  # largest stair whose packed size fits (size grows with the stair)
            mid = (lo + hi + 1) // 2
            if self.packed_bytes(seq_len, mid, heads, dim, elem_bytes) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        b, h, t, d = keys.shape
        stair = self.choose_stair(t, h, d, keys.element_size())
        self._last = (t, stair, h, d, keys.element_size())
        nk, nv = keys.clone(), values.clone()
        for s, e, bits in self.layout(t, stair):
            if bits == 0:
                continue
            nk[:, :, s:e] = quantize_dequantize(keys[:, :, s:e], bits, dim=2)  # per channel over tokens
            vg, _ = _value_groups(values[:, :, s:e], self.group_size)
            nv[:, :, s:e] = quantize_dequantize(vg, bits, dim=-1).reshape(b, h, e - s, d)
        return nk, nv

    def _bytes_after(self, keys, values):
        t, stair, h, d, eb = self._last
        return keys.shape[0] * self.packed_bytes(t, stair, h, d, eb)


# --------------------------------------------------------------------------------------------------
# registry

PRESSES: dict[str, type] = {
    "snapkv": SnapKVPress,
    "streaming": StreamingPress,
    "heavy_hitters": HeavyHittersPress,
    "saq": SAQPress,
    "s2": S2Press,
    "knorm": KnormPress,
    "random": RandomPress,
}


def press(name: str, **settings) -> BasePress:
    """Build a press by name (``snapkv``, ``streaming``, ``heavy_hitters``, ``saq``, ``s2``, ``retrieval``, ``knorm``, ``random``)."""
    if name == "retrieval":
        from .retrieval import RetrievalPress

        return RetrievalPress(**settings)
    try:
        cls = PRESSES[name]
    except KeyError:
        raise KeyError(f"unknown press {name!r}; known: {sorted([*PRESSES, 'retrieval'])}") from None
    return cls(**settings)


def press_names() -> list[str]:
    return sorted([*PRESSES, "retrieval"])

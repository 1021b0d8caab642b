"""Softmax attention: multi-head, grouped-query and multi-query.

Papers:
* "Attention Is All You Need" (Vaswani et al., arXiv 1706.03762): scaled dot-product attention
  ``softmax(Q K^T / sqrt(d)) V`` and multi-head attention.
* "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
  (Ainslie et al., arXiv 2305.13245) and "Fast Transformer Decoding: One Write-Head is All You Need"
  (Shazeer, arXiv 1911.02150): several query heads share one key/value head (``num_kv_heads``).

Fast form: ``torch.nn.functional.scaled_dot_product_attention`` (fused, O(N) memory on CPU), with
``is_causal`` when nothing else is masked. Reference form: :func:`attnzoo.core.reference_attention`.
Options: RoPE (``rope=True``, arXiv 2104.09864) and ALiBi (``alibi=True``, arXiv 2108.12409) for self
attention. Causal cross-attention needs no mask: each query attends to the whole source on its own,
so output ``i`` never depends on later queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import merge_heads
from ...core.module import AttentionModule
from ...core.positional import alibi_bias, alibi_slopes, apply_rope
from ...core.reference import reference_attention
from ...registry import register


def _positions(q: Tensor, k: Tensor, cross: bool, rope: bool, alibi: bool) -> None:
    if cross and (rope or alibi):
        raise ValueError("rope and alibi are relative positions within one sequence; they are not defined for cross-attention")


def _rope(q: Tensor, k: Tensor, rope_base: float, position_offset: int) -> tuple[Tensor, Tensor]:
    n, m = q.shape[2], k.shape[2]
    return apply_rope(q, base=rope_base, offset=position_offset + m - n), apply_rope(k, base=rope_base, offset=position_offset)


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    rope: bool = False,
    rope_base: float = 10000.0,
    alibi: bool = False,
    position_offset: int = 0,
) -> Tensor:
    """Softmax attention on SDPA. ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)`` with ``H % Hkv == 0``.

    ``attn_mask``: boolean (True = attend) or additive, broadcastable to ``(B, H, N, M)``.
    For causal self-attention with ``N < M`` the queries are the last ``N`` positions.
    ``position_offset``: absolute position of key 0 (for RoPE when the cache does not start at 0).
    """
    _positions(q, k, cross, rope, alibi)
    n, m = q.shape[2], k.shape[2]
    if rope:
        q, k = _rope(q, k, rope_base, position_offset)
    self_causal = causal and not cross
    mask = attn_mask
    if alibi:
        bias = alibi_bias(alibi_slopes(q.shape[1]), n, m, device=q.device, dtype=q.dtype)
        mask = bias if mask is None else (bias + mask if mask.dtype != torch.bool else bias.masked_fill(~mask, float("-inf")))
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:
            mask = mask.masked_fill(~keep, float("-inf"))
    is_causal = False
    if self_causal and n > 1:
        if mask is None and n == m:
            is_causal = True
        else:
            i = torch.arange(n, device=q.device)[:, None]
            j = torch.arange(m, device=q.device)[None, :]
            tri = j <= i + (m - n)
            if mask is None:
                mask = tri
            elif mask.dtype == torch.bool:
                mask = mask & tri
            else:
                mask = mask.masked_fill(~tri, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    if mask is not None:
        out = torch.nan_to_num(out, nan=0.0)  # rows with every key masked give zeros on every torch version
    return out


def softmax_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
    rope: bool = False,
    rope_base: float = 10000.0,
    alibi: bool = False,
    position_offset: int = 0,
) -> Tensor:
    """The same on the golden reference (materialised scores, any dtype)."""
    _positions(q, k, cross, rope, alibi)
    if rope:
        q, k = _rope(q, k, rope_base, position_offset)
    if alibi:
        bias = alibi_bias(alibi_slopes(q.shape[1]), q.shape[2], k.shape[2], device=q.device, dtype=q.dtype)
        if attn_mask is None:
            attn_mask = bias
        elif attn_mask.dtype == torch.bool:
            attn_mask = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            attn_mask = bias + attn_mask
    return reference_attention(
        q, k, v, attn_mask, causal=causal and not cross, key_padding_mask=key_padding_mask, scale=scale
    )


@register(
    "softmax",
    paper="Attention Is All You Need",
    arxiv="1706.03762",
    family="softmax",
    capabilities={
        "noncausal_self",
        "causal_self",
        "noncausal_cross",
        "causal_cross",
        "decode",
        "key_padding_mask",
        "trainable",
        "exact",
    },
    complexity="time O(N M d), memory O(N d) (fused SDPA)",
    functional=softmax_attention,
    reference=softmax_attention_reference,
    defaults={"rope": False, "rope_base": 10000.0, "alibi": False, "scale": None},
    summary="scaled dot-product attention (MHA / GQA / MQA) on torch's fused SDPA kernel; the baseline of every comparison",
)
class SoftmaxAttention(AttentionModule):
    """Multi-head softmax attention; ``num_kv_heads`` < ``num_heads`` gives GQA (1 gives MQA).

    Decoding keeps a grouped-query shaped KV cache (``num_kv_heads`` heads, not expanded).
    """

    extra_settings = ("num_kv_heads",)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache()}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("softmax: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        cache: KVCache = state["kv"]
        q, k, v = self.project(x, None)
        if self.settings["rope"]:  # rotate by absolute position once; the cache keeps rotated keys
            q = apply_rope(q, base=self.settings["rope_base"], offset=cache.seen)
            k = apply_rope(k, base=self.settings["rope_base"], offset=cache.seen)
        keys, values = cache.append(k, v)
        out = softmax_attention(q, keys, values, causal=True, cross=False, **{**self.settings, "rope": False})
        return self.out_proj(merge_heads(out)), state

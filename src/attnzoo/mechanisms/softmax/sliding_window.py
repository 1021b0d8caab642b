"""Sliding-window (local) softmax attention.

Papers: "Longformer: The Long-Document Transformer" (Beltagy et al., arXiv 2004.05150) for the
sliding window of local attention, and the "local" attention of "Effective Approaches to
Attention-based Neural Machine Translation" (Luong et al., arXiv 1508.04025) that CAB benchmarks.

Definition used here: key ``j`` is visible to query ``i`` iff ``|i - j| < window``; causal adds
``j <= i``. A causal window thus holds ``window`` keys including the query itself (Mistral's
convention); a non-causal one ``2 * window - 1``. Longformer's dilation and global tokens are not
included (deviation: use ``core.masks`` combinators with the softmax mechanism for those).

Three forms, equal to each other:

* reference: :func:`attnzoo.core.reference_attention` with the dense ``N x M`` band mask;
* ``backend="blocked"`` (default, trains): queries in blocks of ``block_size``; each block attends to
  the ``block_size + window - 1`` (causal) keys that can reach it, gathered as a strided view of the
  padded keys, and all blocks go through one fused ``scaled_dot_product_attention`` call with the band
  mask. Memory and FLOPs grow as ``N * (block_size + window)``, never ``N^2``;
* ``backend="flex"``: FlexAttention with a ``BlockMask``, compiled with ``torch.compile`` (inference
  only on CPU: compiled FlexAttention has no CPU backward). Compiled kernels and block masks are cached
  per shape; the first call at a new shape compiles (tens of seconds on CPU), which the benchmark
  reports separately from run time.

Decoding keeps a rolling KV cache of the last ``window`` tokens: O(window) state.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads
from ...core.masks import block_mask, dense_mask, sliding_window
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register


def _check_window(window: int) -> int:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"sliding_window: window must be a positive int, got {window!r}")
    return window


def sliding_window_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    window: int = 256,
    block_size: int = 32,
    backend: str = "blocked",
) -> Tensor:
    """Dense-mask reference. For ``N < M`` (causal decoding) the queries are the last ``N`` positions."""
    window = _check_window(window)
    n, m = q.shape[2], k.shape[2]
    mask = dense_mask(sliding_window(window, causal=causal, offset=m - n), n, m, device=q.device)
    return reference_attention(q, k, v, mask, key_padding_mask=key_padding_mask)


def _blocked(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, window: int, causal: bool, block: int) -> Tensor:
    b, h, n, d = q.shape
    m = k.shape[2]
    offset = m - n  # absolute position of query row r is r + offset
    block = max(1, min(block, n))
    nb = -(-n // block)
    left = window - 1  # keys before the first query of a block
    right = 0 if causal else window - 1
    span = block + left + right
    # pad keys so that block c covers padded key positions [c*block, c*block + span)
    # i.e. absolute keys [c*block + offset - left, ...): pad `left - offset` in front (cut if negative)
    front = left - offset
    needed = (nb - 1) * block + span
    back = max(needed - (front + m), 0)

    def pad_keys(t: Tensor, value: float = 0.0) -> Tensor:
        if front >= 0:
            t = torch.nn.functional.pad(t, (0, 0, front, back), value=value)
        else:
            t = torch.nn.functional.pad(t[:, :, -front:], (0, 0, 0, back), value=value)
        return t[:, :, :needed]

    # (B*H, nb, span, D): block i's keys as a strided window of the padded keys
    kp = pad_keys(k).unfold(2, span, block).transpose(-1, -2).reshape(b * h, nb, span, d)
    vp = pad_keys(v).unfold(2, span, block).transpose(-1, -2).reshape(b * h, nb, span, v.shape[-1])
    qp = torch.nn.functional.pad(q, (0, 0, 0, nb * block - n)).reshape(b * h, nb, block, d)
    # validity of (row r, col c) in block i: key position j = i*block + offset - left + c (absolute)
    r = torch.arange(block, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    dist = r + left - c  # i - j
    band = (dist >= 0) & (dist < window) if causal else (dist < window) & (dist > -window)
    starts = torch.arange(nb, device=q.device)[:, None, None] * block + offset - left
    j = starts + c  # (nb, 1, span)
    valid = (band & (j >= 0) & (j < m))[None]  # (1, nb, block, span), shared by every batch element and head
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :].to(q.dtype)
        kpm = pad_keys(pad[:, :, :, None], value=1.0)[..., 0].unfold(2, span, block)  # (B, 1, nb, span)
        valid = valid & ~(kpm[:, :, :, None, :] > 0.5)  # (B, 1, nb, block, span)
        valid = valid.expand(b, h, nb, block, span).reshape(b * h, nb, block, span)
    # rows with no visible key (padding rows of the last block, or every key padded) attend to one
    # dummy key and are zeroed afterwards: no NaN forward or backward
    empty = ~valid.any(-1, keepdim=True)
    has_empty = bool(empty.any())
    if has_empty:
        valid = valid | (empty & (c == 0))
    # an additive 4-D bias is the form for which the CPU SDPA takes its fused kernel (a 3-D boolean mask
    # falls back to the unfused math path, several times slower)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    # one fused SDPA call over all blocks (the "heads" axis of the call enumerates the blocks)
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=d**-0.5)
    if has_empty:
        out = out.masked_fill(empty, 0.0)
    return out.reshape(b, h, nb * block, -1)[:, :, :n]


@functools.lru_cache(maxsize=32)
def _flex_block_mask(n: int, m: int, window: int, causal: bool, device: str):
    return block_mask(sliding_window(window, causal=causal, offset=m - n), n, m, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, window: int, causal: bool) -> Tensor:
    bm = _flex_block_mask(q.shape[2], k.shape[2], window, causal, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=bm)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    window: int = 256,
    block_size: int = 32,
    backend: str = "blocked",
) -> Tensor:
    """Sliding-window attention on ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)``; see the module docstring."""
    window = _check_window(window)
    if backend not in ("blocked", "flex"):
        raise ValueError(f"sliding_window: backend must be 'blocked' or 'flex', got {backend!r}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"sliding_window: block_size must be a positive int, got {block_size!r}")
    k, v = expand_kv(k, v, q.shape[1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend == "flex" and key_padding_mask is None and not needs_grad:
        try:
            return _flex(q, k, v, window, causal)
        except Exception as e:  # FlexAttention/inductor not usable here: say so once, then run the blocked path
            warnings.warn(f"sliding_window: FlexAttention backend failed ({type(e).__name__}: {e}); using the blocked path", stacklevel=2)
    return _blocked(q, k, v, key_padding_mask, window, causal, block_size)


@register(
    "sliding_window",
    paper="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    family="softmax",
    capabilities={"noncausal_self", "causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N w d), memory O(N (w + block))",
    functional=sliding_window_attention,
    reference=sliding_window_reference,
    defaults={"window": 256, "block_size": 32, "backend": "blocked"},
    summary="softmax attention restricted to keys within distance < window (causal: the last `window` keys)",
    deviations="no dilation and no global tokens (Longformer); window counts keys at distance < window",
    test_config={"window": 7, "block_size": 8},
)
class SlidingWindowAttention(AttentionModule):
    """Multi-head sliding-window attention; decoding keeps only the last ``window`` keys and values."""

    extra_settings = ("num_kv_heads",)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache(window=self.settings["window"])}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("sliding_window: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        cache: KVCache = state["kv"]
        q, k, v = self.project(x, None)
        if len(cache):
            keys, values = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
        else:
            keys, values = k, v
        fn = sliding_window_reference if self.impl == "reference" else sliding_window_attention
        out = fn(q, keys, values, causal=True, **self.settings)
        cache.append(k, v)
        return self.out_proj(merge_heads(out)), state

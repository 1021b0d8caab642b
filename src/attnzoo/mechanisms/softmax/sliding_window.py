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
  the ``block_size + window - 1`` (causal; ``block_size + 2 window - 2`` non-causal) keys that can reach
  it. Interior blocks read those keys as an overlapping strided view of ``k`` and ``v`` and share one
  band bias, many blocks per fused ``scaled_dot_product_attention`` call; the blocks at the two ends of
  the sequence (and all blocks when keys are padded) use a padded copy with a per-block mask. Memory
  and FLOPs grow as ``N * (block_size + window)``, never ``N^2``;
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


def _band(window: int, causal: bool, block: int, span: int, device) -> Tensor:
    """``(block, span)`` bool: may row ``r`` of a query block see column ``c`` of the block's key span?
    Column ``c`` holds key ``start + c`` with ``start = first query - (window - 1)``."""
    r = torch.arange(block, device=device)[:, None]
    c = torch.arange(span, device=device)[None, :]
    dist = r + window - 1 - c  # query - key
    return (dist >= 0) & (dist < window) if causal else (dist < window) & (dist > -window)


def _blocks_padded(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, window: int, causal: bool,
                   block: int, i0: int, i1: int) -> Tensor:
    """Query blocks ``i0 <= i < i1`` of the blocked form, ``(B*H, i1 - i0, block, Dv)``, for blocks whose key
    span leaves ``[0, M)`` (the sequence ends) or when keys are padded: the keys are gathered from a padded
    copy and masked per block."""
    b, h, n, d = q.shape
    m = k.shape[2]
    offset, left = m - n, window - 1
    span = block + left + (0 if causal else window - 1)
    nbr = i1 - i0
    a = i0 * block + offset - left  # absolute key of column 0 of block i0
    e = (i1 - 1) * block + offset - left + span  # one past the last key of block i1 - 1
    lo = min(max(a, 0), m)
    hi = min(max(e, lo), m)
    front, back = lo - a, (e - a) - (lo - a) - (hi - lo)

    def gather(t: Tensor, value: float = 0.0) -> Tensor:  # (B, H', e - a, X) -> (B*H', nbr, span, X)
        t = torch.nn.functional.pad(t[:, :, lo:hi], (0, 0, front, back), value=value)
        return t.reshape(-1, e - a, t.shape[-1]).unfold(1, span, block).transpose(-1, -2)

    kp, vp = gather(k), gather(v)
    qs = q[:, :, i0 * block : min(i1 * block, n)]
    qp = torch.nn.functional.pad(qs, (0, 0, 0, nbr * block - qs.shape[2])).reshape(b * h, nbr, block, d)
    j = torch.arange(i0, i1, device=q.device)[:, None, None] * block + offset - left + torch.arange(span, device=q.device)
    valid = (_band(window, causal, block, span, q.device) & (j >= 0) & (j < m))[None]  # (1, nbr, block, span)
    if key_padding_mask is not None:
        kpm = gather(key_padding_mask[:, None, :, None].to(q.dtype), value=1.0)[..., 0]  # (B, nbr, span)
        valid = valid & ~(kpm[:, None, :, None, :] > 0.5)  # (B, 1, nbr, block, span)
        valid = valid.expand(b, h, nbr, block, span).reshape(b * h, nbr, block, span)
    # rows with no visible key (padding rows of the last block, or every key padded) attend to one
    # dummy key and are zeroed afterwards: no NaN forward or backward
    empty = ~valid.any(-1, keepdim=True)
    has_empty = bool(empty.any())
    if has_empty:
        col0 = torch.zeros(span, dtype=torch.bool, device=q.device)
        col0[0] = True
        valid = valid | (empty & col0)
    # an additive 4-D bias is the form for which the CPU SDPA takes its fused kernel (a 3-D boolean mask
    # falls back to the unfused math path, several times slower)
    bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=bias, scale=d**-0.5)
    return out.masked_fill(empty, 0.0) if has_empty else out


#: Interior blocks go through SDPA in chunks of about this many output bytes, each copied into the one
#: output buffer and freed: the allocator then reuses one small buffer instead of mapping (and faulting
#: in) a fresh full-size one per call (at N = 16k, window 128, an unchunked version took up to ~8,000
#: page faults per call in some processes).
_CHUNK_BYTES = 2 * 2**20


def _blocked(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, window: int, causal: bool, block: int) -> Tensor:
    """The blocked form: query blocks of ``block`` rows, each against the ``span`` keys that can reach it,
    many blocks per fused SDPA call (the call's "heads" axis enumerates the blocks).

    Interior blocks, whose span lies inside the keys and whose rows are all real queries, take their keys
    as an overlapping strided view of ``k`` and ``v`` (no copy) and share one ``(block, span)`` band bias
    broadcast over blocks; the few blocks at the two ends (and every block when keys are padded) go
    through :func:`_blocks_padded`. Measured in docs/mechanisms/sliding_window.md."""
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    offset, left = m - n, window - 1
    block = max(1, min(block, n))
    nb = -(-n // block)
    span = block + left + (0 if causal else window - 1)
    e0 = max(0, -(-(left - offset) // block))  # first block whose span starts at a key >= 0
    e1 = min(n // block, (m - span - offset + left) // block + 1)  # blocks < e1 end inside the keys, rows all real
    if key_padding_mask is not None or e1 <= e0:
        return _blocks_padded(q, k, v, key_padding_mask, window, causal, block, 0, nb).reshape(b, h, nb * block, dv)[:, :, :n]
    out = torch.empty(b * h, nb, block, dv, dtype=q.dtype, device=q.device)
    if e0 > 0:
        out[:, :e0] = _blocks_padded(q, k, v, None, window, causal, block, 0, e0)
    band = _band(window, causal, block, span, q.device)
    bias = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill_(~band, float("-inf"))[None, None]
    k3, v3, q4 = k.reshape(b * h, m, d), v.reshape(b * h, m, dv), q[:, :, : e1 * block].reshape(b * h, e1, block, d)
    chunk = max(1, _CHUNK_BYTES // (b * h * block * dv * out.element_size()))
    for c0 in range(e0, e1, chunk):
        c1 = min(e1, c0 + chunk)
        s0, length = c0 * block + offset - left, (c1 - c0 - 1) * block + span
        kin = k3[:, s0 : s0 + length].unfold(1, span, block).transpose(-1, -2)  # (B*H, c1 - c0, span, D), a view
        vin = v3[:, s0 : s0 + length].unfold(1, span, block).transpose(-1, -2)
        out[:, c0:c1] = torch.nn.functional.scaled_dot_product_attention(q4[:, c0:c1], kin, vin, attn_mask=bias, scale=d**-0.5)
    if e1 < nb:
        out[:, e1:] = _blocks_padded(q, k, v, None, window, causal, block, e1, nb)
    return out.reshape(b, h, nb * block, dv)[:, :, :n]


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

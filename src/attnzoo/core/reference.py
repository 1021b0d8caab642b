"""The golden reference: softmax attention written out in full.

``softmax(Q K^T * scale + bias) V`` with any boolean or additive mask, in whatever dtype it is given
(float64 included). It materialises the ``N x M`` score matrix, so it is for tests and small inputs;
every exact mechanism is checked against it. Rows in which every key is masked give zeros, not NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import expand_kv


def _allowed(
    n: int,
    m: int,
    *,
    device: torch.device,
    attn_mask: Tensor | None,
    causal: bool,
    key_padding_mask: Tensor | None,
) -> Tensor | None:
    """The boolean "may attend" mask (broadcastable to ``(B, H, N, M)``), or None if all is allowed."""
    allowed = None
    if causal:
        i = torch.arange(n, device=device)[:, None]
        j = torch.arange(m, device=device)[None, :]
        allowed = j <= i + (m - n)  # bottom-right aligned: the last query sees every key
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = attn_mask if allowed is None else allowed & attn_mask
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return allowed


def safe_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax along ``dim`` in which all-masked (all ``-inf``) slices give zeros instead of NaN."""
    row_max = scores.amax(dim=dim, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=dim, keepdim=True)
    return p / torch.where(denom > 0, denom, torch.ones_like(denom))


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries along the last axis, ties going to the lower index.

    ``torch.topk`` does not promise an order among ties, so a fast form and its reference could pick
    different keys; a stable sort makes data-dependent selections reproducible.
    """
    k = min(k, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True)[1][..., :k]


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention on ``q (B, H, N, D)``, ``k (B, Hkv, M, D)``, ``v (B, Hkv, M, Dv)``.

    * ``attn_mask``: boolean (True = may attend) or additive float, broadcastable to ``(B, H, N, M)``;
      ``-inf`` entries of an additive mask count as masked.
    * ``causal``: key ``j`` is visible to query ``i`` when ``j <= i + (M - N)`` (bottom-right aligned,
      so a single decoding query sees the whole cache; for ``N == M`` it is the usual lower triangle).
    * ``key_padding_mask``: ``(B, M)`` boolean, True = padded key.
    * ``scale`` defaults to ``1/sqrt(D)``.

    Returns the ``(B, H, N, Dv)`` output, and the ``(B, H, N, M)`` weights if ``return_weights``.
    """
    k, v = expand_kv(k, v, q.shape[1])
    n, m = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask.to(scores.dtype)
    allowed = _allowed(n, m, device=q.device, attn_mask=attn_mask, causal=causal, key_padding_mask=key_padding_mask)
    finite = torch.isfinite(scores) if (attn_mask is not None and attn_mask.dtype != torch.bool) else None
    if finite is not None:
        allowed = finite if allowed is None else allowed & finite
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = safe_softmax(scores)  # empty rows stay all-zero
    out = torch.matmul(weights, v)
    return (out, weights) if return_weights else out

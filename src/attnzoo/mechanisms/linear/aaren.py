"""Aaren: attention as a many-to-many RNN computed by a parallel prefix scan.

Paper: "Attention as an RNN" (Feng, Tung, Hajimirsadeghi, Bengio, Ahmed; arXiv 2405.13956).

Attention of one fixed query ``q`` over tokens ``x_1..x_k`` (keys ``k_i = W_K x_i``, values
``v_i = W_V x_i``, scores ``s_i = q . k_i / sqrt(d)``) is an RNN: ``o_k = a_k / c_k`` with
``a_k = sum_{i<=k} exp(s_i) v_i`` and ``c_k = sum_{i<=k} exp(s_i)``. Kept stable with the running
maximum ``m_k = max(m_{k-1}, s_k)``::

    a_k = a_{k-1} exp(m_{k-1} - m_k) + v_k exp(s_k - m_k)      c_k = c_{k-1} exp(m_{k-1} - m_k) + exp(s_k - m_k)

All outputs ``o_1..o_N`` come from a prefix scan of the associative operator
``(m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^{m_A-m} + u_B e^{m_B-m}, w_A e^{m_A-m} + w_B e^{m_B-m})``,
``m = max(m_A, m_B)``, on the leaves ``(s_i, 1, v_i)``; ``o_k = w_k / u_k``.

The Aaren module: the query is a learned parameter (one ``d``-vector per head), not a function of the
input; keys and values are linear maps of the input; the heads are concatenated and projected, so
Aaren drops in where a causal attention layer was. Decoding keeps ``(m, u, w)`` per head: ``O(H e)``
memory and ``O(d e)`` work per token.

Fast form: the shared chunked scan :func:`attnzoo.core.scan.softmax_scan` (running max inside a chunk
of ``chunk`` tokens with ``C x C`` weights and one matmul, a Hillis-Steele scan over the chunk
summaries). Reference: softmax attention of the broadcast query over each causal prefix
(:func:`attnzoo.core.reference_attention`), i.e. the paper's identity that Aaren's output ``o_k`` is
``softmax(q K_{1..k}^T / sqrt(d)) V_{1..k}``.

Deviations: the paper's O(log N)-depth scan over all tokens is replaced by a chunked scan (same
values, ``O(N C e)`` work); ``scale`` (default ``1/sqrt(d)``) is a setting. Padded keys
(``key_padding_mask``) get the score ``-inf``. There is no per-position query, so Aaren has no
``(q, k, v)`` functional form: use the module, or :func:`aaren_attention` with an explicit query.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.layout import expand_kv, merge_heads, split_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...core.scan import softmax_scan, softmax_scan_init, softmax_scan_step
from ...registry import register


def _scores(query: Tensor, k: Tensor, scale: float | None, key_padding_mask: Tensor | None) -> Tensor:
    scale = 1.0 / math.sqrt(k.shape[-1]) if scale is None else scale
    s = torch.einsum("hd,bhnd->bhn", query.to(k.dtype), k) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    return s


def aaren_attention(
    query: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    chunk: int = 64,
    state: dict | None = None,
) -> tuple[Tensor, dict]:
    """Many-to-many attention of one query per head over every prefix (fast, chunked scan).

    ``query (H, d)``, ``k (B, Hkv, N, d)``, ``v (B, Hkv, N, e)``. Returns ``o (B, H, N, e)`` with
    ``o[:, h, t] = softmax(query_h . k_{<=t} * scale) v_{<=t}``, and the scan state after the last token.
    """
    k, v = expand_kv(k, v, query.shape[0])
    return softmax_scan(_scores(query, k, scale, key_padding_mask), v, chunk=chunk, state=state)


def aaren_attention_reference(
    query: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None = None, scale: float | None = None
) -> Tensor:
    """Reference: causal softmax attention with the query broadcast to every position."""
    b, _, n, d = k.shape
    q = query.to(k.dtype)[None, :, None, :].expand(b, -1, n, d)
    return reference_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=scale)


@register(
    "aaren",
    paper="Attention as an RNN",
    arxiv="2405.13956",
    family="linear",
    capabilities={"causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N C e) (chunked prefix scan, chunk C); memory O(N (C + e)); decode state O(e) per head",
    functional=None,
    reference=None,
    defaults={"scale": None, "chunk": 64},
    summary="softmax attention of a learned query over every prefix, as an RNN evaluated by a parallel prefix scan "
    "with a running max; O(1) state per token when decoding",
    deviations="chunked scan instead of a full-length Hillis-Steele scan (same values); no (q, k, v) functional form",
    test_config={"chunk": 16},
)
class Aaren(AttentionModule):
    """The Aaren layer: learned query per head, keys/values from the input, causal prefix attention.

    Decoding state: ``{"m": (B, H), "u": (B, H), "w": (B, H, e)}`` (running max, normaliser, weighted values).
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        self.q_proj = None  # the query is a parameter, not a projection of the input
        self.query = nn.Parameter(torch.randn(num_heads, self.head_dim) / math.sqrt(self.head_dim))

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(self.k_proj(x), self.num_kv_heads), split_heads(self.v_proj(x), self.num_kv_heads)

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        self.check_inputs(x, context, key_padding_mask)
        k, v = self._kv(x)
        scale = self.settings["scale"]
        if self.impl == "reference":
            o = aaren_attention_reference(self.query, k, v, key_padding_mask=key_padding_mask, scale=scale)
        else:
            o, _ = aaren_attention(self.query, k, v, key_padding_mask=key_padding_mask, scale=scale, chunk=self.settings["chunk"])
        return self.out_proj(merge_heads(o))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        return softmax_scan_init((batch_size, self.num_heads), self.head_dim, dtype=dtype, device=device)

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        self.check_inputs(x, None, None)
        k, v = self._kv(x)
        o, state = aaren_attention(self.query, k, v, scale=self.settings["scale"], chunk=self.settings["chunk"], state=state)
        return self.out_proj(merge_heads(o)), state

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        k, v = self._kv(x3)
        s = _scores(self.query, k, self.settings["scale"], None)[:, :, 0]
        o, state = softmax_scan_step(state, s, v[:, :, 0])
        y = self.out_proj(merge_heads(o[:, :, None]))
        return (y[:, 0] if squeeze else y), state

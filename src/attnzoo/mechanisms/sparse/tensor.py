"""Tensor (triple-wise) attention and its polynomial-method approximation.

Paper: "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker
Computation" (Alman & Song, arXiv 2310.04064, ICLR 2024). Theory paper, no official code.

Given ``Q, K1, K2, V1, V2`` (``n x d``), the output is ``D^{-1} A (V1 ⊘ V2)`` with
``A = exp(Q (K1 ⊘ K2)^T * scale)`` and ``D = diag(A 1_{n^2})``; ``⊘`` is the column-wise Kronecker
product (row ``(j1, j2)`` of ``K1 ⊘ K2`` is ``K1[j1] ⊙ K2[j2]``, stored at ``j1 * M + j2``). So every
query takes a softmax over all ordered key pairs, with the trilinear score
``sum_l Q[i,l] K1[j1,l] K2[j2,l]`` and the value ``V1[j1] ⊙ V2[j2]``.

* ``method="exact"`` (default): ``O(N M^2 d)`` time, streamed over ``j1`` in chunks with an online
  softmax so memory stays ``O(N * chunk * M)``. Reference: the literal column-wise Kronecker product
  (``M^2`` rows) fed to the golden softmax reference.
* ``method="poly"``: the paper's polynomial method for bounded entries. ``exp`` is replaced by its
  degree-``g`` Taylor polynomial, whose powers factor through tensor powers,
  ``s^t = <q^{⊗t}, k1^{⊗t} ⊙ k2^{⊗t}>``, so ``A ≈ U1 (U2 ⊘ U3)^T`` with ``r = sum_{t<=g} d^t`` features
  and, by ``(U2 ⊘ U3)^T (V1 ⊘ V2) = (U2^T V1) ⊙ (U3^T V2)``,
  ``T ≈ diag(U1[(U2^T 1) ⊙ (U3^T 1)])^{-1} U1[(U2^T V1) ⊙ (U3^T V2)]`` in ``O((N + M) r d)`` time:
  linear in the length, exponential in ``g`` (the paper's regime is ``d = O(log n)`` and entries
  ``o(log^{1/3} n)``). Reference: the Taylor polynomial applied entrywise to the materialised ``A``.
  Use an even degree: even Taylor polynomials of ``exp`` are positive, so the normaliser is too.

With ``K2 = 1`` and ``V2 = 1`` (all-ones) tensor attention is softmax attention ``softmax(Q K1^T * scale) V1``.

Choices and deviations (documented in ``docs/mechanisms/tensor.md``):
* Through the common ``(q, k, v)`` interface, ``k2``/``v2`` default to ``k``/``v`` (the pairs of one
  source); the module projects its own ``K2, V2``. ``scale`` defaults to ``1/d`` (the spec's reading of
  the paper's normalisation; the abstract writes no scale, which is ``scale=1``).
* Causal masking is not in the paper: here the pair ``(j1, j2)`` is visible to query ``i`` iff both
  keys are (``j1, j2 <= i``, bottom-right aligned); a padded key removes every pair that uses it. The
  polynomial method is non-causal only. Decoding keeps the four caches and runs the exact form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register


def _prepare(q, k, v, k2, v2, causal, cross, key_padding_mask, method, degree, scale):
    if k2 is None:
        k2 = k
    if v2 is None:
        v2 = v
    if k2.shape != k.shape or v2.shape[:3] != v.shape[:3] or v2.shape[-1] != v.shape[-1]:
        raise ValueError(
            f"tensor: k2 {tuple(k2.shape)} / v2 {tuple(v2.shape)} must match k {tuple(k.shape)} / v {tuple(v.shape)}"
        )
    if method not in ("exact", "poly"):
        raise ValueError(f"tensor: method must be 'exact' or 'poly', got {method!r}")
    if method == "poly":
        if causal and not cross:
            raise ValueError(
                "tensor: the polynomial method is non-causal (use method='exact' for causal attention)"
            )
        if not isinstance(degree, int) or degree < 0:
            raise ValueError(f"tensor: degree must be a non-negative int, got {degree!r}")
    k, v = expand_kv(k, v, q.shape[1])
    k2, v2 = expand_kv(k2, v2, q.shape[1])
    n, m = q.shape[2], k.shape[2]
    scale = 1.0 / q.shape[-1] if scale is None else float(scale)
    allowed = None  # (B or 1, 1, N, M): key j visible to query i
    if causal and not cross:
        allowed = (
            torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        )[None, None]
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    return k, v, k2, v2, scale, allowed


def _taylor(x: Tensor, degree: int) -> Tensor:
    out = torch.ones_like(x)
    term = torch.ones_like(x)
    for t in range(1, degree + 1):
        term = term * x / t
        out = out + term
    return out


def _features(x: Tensor, degree: int, coef: float | None = None) -> Tensor:
    """Tensor-power features ``[c_t x^{⊗t}]_{t<=g}`` of ``x (..., d)``: ``(..., sum_t d^t)``."""
    feats = [x.new_ones(*x.shape[:-1], 1)]
    cur = feats[0]
    for t in range(1, degree + 1):
        cur = (cur[..., :, None] * x[..., None, :]).flatten(-2)
        feats.append(cur if coef is None else cur * (coef**t / math.factorial(t)))
    return torch.cat(feats, dim=-1)


def tensor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    k2: Tensor | None = None,
    v2: Tensor | None = None,
    method: str = "exact",
    degree: int = 2,
    scale: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """Tensor attention on ``q (B, H, N, D)``, ``k = K1``, ``v = V1`` and ``k2``, ``v2`` (default ``k``, ``v``)."""
    k1, v1, k2, v2, scale, allowed = _prepare(
        q, k, v, k2, v2, causal, cross, key_padding_mask, method, degree, scale
    )
    if method == "poly":
        return _poly_fast(q, k1, v1, k2, v2, scale, degree, allowed)
    bsz, heads, n, d = q.shape
    m, dv = k1.shape[2], v1.shape[-1]
    if chunk is None:
        chunk = max(1, min(m, (1 << 22) // max(1, n * m)))
    acc = q.new_zeros(bsz, heads, n, dv)
    run_max = q.new_full((bsz, heads, n), float("-inf"))
    run_sum = q.new_zeros(bsz, heads, n)
    k2t = k2.transpose(-2, -1)  # (B, H, D, M)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        c = e - s
        qk = (q[:, :, :, None, :] * k1[:, :, None, s:e, :]).reshape(bsz, heads, n * c, d)  # q ⊙ K1[j1]
        sc = (qk @ k2t).view(bsz, heads, n, c, m) * scale  # trilinear scores of the pairs (j1 in chunk, j2)
        if allowed is not None:
            pair = allowed[..., s:e, None] & allowed[..., None, :]
            sc = sc.masked_fill(~pair, float("-inf"))
        cmax = sc.amax(dim=(-2, -1))
        new_max = torch.maximum(run_max, cmax)
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        p = torch.exp(sc - safe[..., None, None])
        corr = torch.exp(run_max - safe)
        run_sum = run_sum * corr + p.sum(dim=(-2, -1))
        pv = (p.reshape(bsz, heads, n * c, m) @ v2).view(bsz, heads, n, c, dv)  # P[i, j1, :] V2
        contrib = (pv * v1[:, :, None, s:e, :]).sum(-2)  # sum_j1 V1[j1] ⊙ (P[i, j1, :] V2)
        acc = acc * corr[..., None] + contrib
        run_max = new_max
    den = torch.where(run_sum > 0, run_sum, torch.ones_like(run_sum))
    return acc / den[..., None]


def _poly_fast(q, k1, v1, k2, v2, scale, degree, allowed):
    u1 = _features(q, degree, coef=scale)  # (B, H, N, r)
    u2 = _features(k1, degree)  # (B, H, M, r)
    u3 = _features(k2, degree)
    if allowed is not None:  # padding only (non-causal): drop pairs that use a padded key
        keep = allowed[:, :, 0, :, None].to(u2.dtype)
        u2, u3 = u2 * keep, u3 * keep
    num = (u2.transpose(-2, -1) @ v1) * (u3.transpose(-2, -1) @ v2)  # (r, Dv): (U2^T V1) ⊙ (U3^T V2)
    den = u2.sum(-2) * u3.sum(-2)  # (r,): (U2^T 1) ⊙ (U3^T 1)
    top = u1 @ num
    bot = (u1 @ den[..., None]).squeeze(-1)
    bot = torch.where(bot != 0, bot, torch.ones_like(bot))
    return top / bot[..., None]


def tensor_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    k2: Tensor | None = None,
    v2: Tensor | None = None,
    method: str = "exact",
    degree: int = 2,
    scale: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The paper's formula with the explicit column-wise Kronecker products (``M^2`` rows)."""
    k1, v1, k2, v2, scale, allowed = _prepare(
        q, k, v, k2, v2, causal, cross, key_padding_mask, method, degree, scale
    )
    bsz, heads, m, d = k1.shape
    kk = (k1[:, :, :, None, :] * k2[:, :, None, :, :]).reshape(bsz, heads, m * m, d)  # K1 ⊘ K2
    vv = (v1[:, :, :, None, :] * v2[:, :, None, :, :]).reshape(bsz, heads, m * m, v1.shape[-1])  # V1 ⊘ V2
    pair = None
    if allowed is not None:
        pair = (allowed[..., :, :, None] & allowed[..., :, None, :]).flatten(-2)  # (.., N, M*M)
    if method == "exact":
        return reference_attention(q, kk, vv, pair, scale=scale)
    a = _taylor((q @ kk.transpose(-2, -1)) * scale, degree)  # P(Q (K1 ⊘ K2)^T * scale), entrywise
    if pair is not None:
        a = a * pair.to(a.dtype)
    dsum = a.sum(-1, keepdim=True)
    return (a @ vv) / torch.where(dsum != 0, dsum, torch.ones_like(dsum))


@register(
    "tensor",
    paper="How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation",
    arxiv="2310.04064",
    family="sparse",
    capabilities={
        "noncausal_self",
        "causal_self",
        "noncausal_cross",
        "causal_cross",
        "decode",
        "key_padding_mask",
        "trainable",
    },
    complexity="exact: time O(N M^2 d), memory O(N M chunk); poly: time O((N + M) d^g d_v)",
    functional=tensor_attention,
    reference=tensor_attention_reference,
    defaults={"method": "exact", "degree": 2, "scale": None, "chunk": None},
    summary="triple-wise attention: each query takes a softmax over key pairs (j1, j2) with a trilinear score and value V1[j1] ⊙ V2[j2]; exact cubic form or the paper's polynomial approximation",
    deviations="causal masking (both keys <= query) is an extension; through (q, k, v) the second key/value default to k/v; scale defaults to 1/d",
    test_config={"method": "exact"},
)
class TensorAttention(AttentionModule):
    """Tensor attention layer with its own projections for ``K2`` and ``V2``."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        if self.settings["method"] not in ("exact", "poly"):
            raise ValueError(f"tensor: method must be 'exact' or 'poly', got {self.settings['method']!r}")
        bias = self.q_proj.bias is not None
        self.k2_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.v2_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)

    def _second(self, src: Tensor) -> tuple[Tensor, Tensor]:
        b, m, _ = src.shape
        k2 = self.k2_proj(src).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v2 = self.v2_proj(src).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        return k2, v2

    def _fn(self):
        return self.spec.reference if self.impl == "reference" else self.spec.functional

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        cross = self.check_inputs(x, context, key_padding_mask)
        q, k, v = self.project(x, context)
        k2, v2 = self._second(x if context is None else context)
        out = self._fn()(
            q,
            k,
            v,
            causal=self.causal,
            cross=cross,
            key_padding_mask=key_padding_mask,
            k2=k2,
            v2=v2,
            **self.settings,
        )
        return self.out_proj(merge_heads(out))

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache(), "kv2": KVCache()}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("tensor: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        q, k, v = self.project(x, None)
        k2, v2 = self._second(x)
        keys, values = state["kv"].append(k, v)
        keys2, values2 = state["kv2"].append(k2, v2)
        out = self._fn()(
            q,
            keys,
            values,
            causal=True,
            cross=False,
            key_padding_mask=None,
            k2=keys2,
            v2=values2,
            **self.settings,
        )
        return self.out_proj(merge_heads(out)), state

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        y, state = self.prefill(x3, state)
        return (y[:, 0] if squeeze else y), state

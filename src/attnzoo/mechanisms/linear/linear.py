"""Linear attention with the ``elu + 1`` feature map.

Paper: "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
(Katharopoulos, Vyas, Pappas, Fleuret; ICML 2020; arXiv 2006.16236).

Equations implemented (the paper's eqs. 4-7 and, causal, 8-12), per head, with ``phi(x) = elu(x) + 1``::

    V'_i = phi(Q_i)^T (sum_j phi(K_j) V_j^T) / (phi(Q_i)^T sum_j phi(K_j))          (non-causal)
    V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T z_i),  S_i = sum_{j<=i} phi(K_j) V_j^T,  z_i = sum_{j<=i} phi(K_j)

The causal form is the RNN of section 3.4: the state ``(S_i, z_i)`` (``d x e`` plus ``d`` per head) is
updated by ``S_i = S_{i-1} + phi(K_i) V_i^T``, ``z_i = z_{i-1} + phi(K_i)``; it is also the decoding
state. The fast causal form runs the shared chunked recurrence of :mod:`attnzoo.core.scan` once on
``[V, 1]`` (numerator and denominator together): ``C x C`` blocks inside a chunk, a state carried
across chunks, never an ``N x N`` tensor.

Patterns: all four. Causal cross-attention (CAB): every query sees the whole source on its own, so
output ``i`` depends on query ``i`` only. Causal self-attention with ``N != M`` is bottom-right
aligned (query ``i`` sees keys ``j <= i + M - N``). Padded keys get ``phi(K_j) = 0``.

Deviations: none in the equations. ``eps`` (default 0, as in the paper) is added to the denominator;
the official ``fast-transformers`` code uses ``eps = 1e-6`` (pass ``eps=1e-6`` for that behaviour).
The paper's ``phi`` is positive, so the denominator is positive whenever a key is visible; a query
that sees no key (all padded) gets a zero output instead of ``0/0``. No ``1/sqrt(d)`` scaling (none
in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.scan import recurrence_chunked, recurrence_step
from ...registry import register


def elu_feature(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1`` (positive)."""
    return F.elu(x) + 1.0


def _divide(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / (den + eps)``; rows with ``den == 0`` (no visible key) give 0."""
    den = den + eps
    return num / torch.where(den != 0, den, torch.ones_like(den))[..., None]


def align_causal(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Bottom-right causal alignment for ``N != M``: pad ``q`` (``N < M``) or ``k, v`` (``N > M``) in
    front with zeros so that query ``i`` of the result sees key ``i``. Returns ``(q, k, v, drop)``:
    drop the first ``drop`` output rows. Zero keys and values add nothing to a linear-attention state."""
    n, m = q.shape[2], k.shape[2]
    if n < m:
        return F.pad(q, (0, 0, m - n, 0)), k, v, m - n
    if n > m:
        return q, F.pad(k, (0, 0, n - m, 0)), F.pad(v, (0, 0, n - m, 0)), 0
    return q, k, v, 0


def _features(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    k, v = expand_kv(k, v, q.shape[1])
    fq, fk = elu_feature(q), elu_feature(k)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        fk = fk.masked_fill(pad, 0.0)
        v = v.masked_fill(pad, 0.0)
    return fq, fk, v


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 0.0,
    chunk: int = 64,
) -> Tensor:
    """Normalised linear attention (fast form). ``q (B, H, N, d)``, ``k, v (B, Hkv, M, d|e)``.

    Non-causal and causal cross: ``phi(Q) (phi(K)^T V)`` over the whole source, ``O((N + M) d e)``.
    Causal self: the chunked recurrence on ``[V, 1]`` with chunk length ``chunk``.
    """
    fq, fk, v = _features(q, k, v, key_padding_mask)
    if causal and not cross:
        fq, fk, v, drop = align_causal(fq, fk, v)
        ones = v.new_ones(*v.shape[:-1], 1)
        out, _ = recurrence_chunked(fq, fk, torch.cat([v, ones], dim=-1), chunk=chunk)
        out = out[:, :, drop:]
        return _divide(out[..., :-1], out[..., -1], eps)
    kv = torch.matmul(fk.transpose(-1, -2), v)  # (B, H, d, e)
    z = fk.sum(dim=2)  # (B, H, d)
    return _divide(torch.matmul(fq, kv), torch.einsum("bhnd,bhd->bhn", fq, z), eps)


def linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 0.0,
    chunk: int = 64,
) -> Tensor:
    """Reference: the similarity matrix ``phi(Q_i)^T phi(K_j)`` materialised, masked and row-normalised."""
    k, v = expand_kv(k, v, q.shape[1])
    sim = torch.matmul(elu_feature(q), elu_feature(k).transpose(-1, -2))  # (B, H, N, M)
    n, m = q.shape[2], k.shape[2]
    if causal and not cross:
        i = torch.arange(n, device=q.device)[:, None]
        j = torch.arange(m, device=q.device)[None, :]
        sim = sim * (j <= i + (m - n)).to(sim.dtype)
    if key_padding_mask is not None:
        sim = sim.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    return _divide(torch.matmul(sim, v), sim.sum(-1), eps)


@register(
    "linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    family="linear",
    capabilities={
        "noncausal_self",
        "causal_self",
        "noncausal_cross",
        "causal_cross",
        "decode",
        "key_padding_mask",
        "trainable",
    },
    complexity="time O((N + M) d e) (causal: O(N C (d + e) + N d e), chunk C); memory O(N (C + d + e) + d e); decode state O(d e)",
    functional=linear_attention,
    reference=linear_attention_reference,
    defaults={"eps": 0.0, "chunk": 64},
    summary="kernelised attention with phi = elu + 1, normalised; causal form is an RNN with a d x e state",
    deviations="none; eps (default 0 as in the paper, 1e-6 in the official code) guards the denominator",
    test_config={"chunk": 16},
)
class LinearAttention(AttentionModule):
    """Multi-head linear attention (Katharopoulos et al. 2020).

    Decoding state: ``{"kv": (B, H, d, e), "k_sum": (B, H, d)}`` (the sums of ``phi(K_j) V_j^T`` and ``phi(K_j)``).
    """

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        h, d = self.num_heads, self.head_dim
        return {
            "kv": torch.zeros(batch_size, h, d, d, dtype=dtype, device=device),
            "k_sum": torch.zeros(batch_size, h, d, dtype=dtype, device=device),
        }

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("linear: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype) if state is None else state
        q, k, v = self.project(x, None)
        fq, fk = elu_feature(q), elu_feature(k)
        initial = torch.cat([state["kv"], state["k_sum"][..., None]], dim=-1)
        ones = v.new_ones(*v.shape[:-1], 1)
        out, s = recurrence_chunked(fq, fk, torch.cat([v, ones], -1), chunk=self.settings["chunk"], initial=initial)
        out = _divide(out[..., :-1], out[..., -1], self.settings["eps"])
        return self.out_proj(merge_heads(out)), {"kv": s[..., :-1], "k_sum": s[..., -1]}

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        q, k, v = self.project(x3, None)
        fq, fk = elu_feature(q[:, :, 0]), elu_feature(k[:, :, 0])
        initial = torch.cat([state["kv"], state["k_sum"][..., None]], dim=-1)
        v1 = torch.cat([v[:, :, 0], v.new_ones(*v.shape[:2], 1)], dim=-1)
        o, s = recurrence_step(initial, fq, fk, v1)
        out = _divide(o[..., :-1], o[..., -1], self.settings["eps"])[:, :, None]
        y = self.out_proj(merge_heads(out))
        return (y[:, 0] if squeeze else y), {"kv": s[..., :-1], "k_sum": s[..., -1]}

"""Flow-Attention (Flowformer): linear attention normalised by flow conservation.

Paper: "Flowformer: Linearizing Transformers with Conservation Flows" (Wu, Wu, Xu, Wang, Long;
ICML 2022; arXiv 2202.06258). Official code: ``thuml/Flowformer`` (``Flow_Attention.py``).

Per head, ``phi = sigmoid``, ``eps = 1e-6`` added elementwise to vectors before a dot product; queries
are the sinks (``n`` of them), keys/values the sources (``m``). Non-causal (self and cross)::

    I_i = 1 / ((phi(Q_i)+eps) . (sum_j phi(K_j) + eps))           incoming flow of sink i
    O_j = 1 / ((phi(K_j)+eps) . (sum_i phi(Q_i) + eps))           outgoing flow of source j
    Ih_i = (phi(Q_i)+eps) . (sum_j phi(K_j) O_j + eps)            conserved incoming flow
    Oh_j = clamp((phi(K_j)+eps) . (sum_i phi(Q_i) I_i + eps), -1, 1)   conserved outgoing flow
    R_i  = sigmoid(Ih_i n/m) * (phi(Q_i) I_i)^T sum_j phi(K_j) (softmax_j(Oh) m V_j)^T
           (allocation)                             (competition)

Causal self-attention (the official ``Flow_Attention_Causal``): every sum becomes a prefix sum up to
the quantity's own position and the flows are rescaled by the count ``i`` (1-indexed)::

    I_i = i / ((phi(Q_i)+eps) . (sum_{j<=i} phi(K_j) + eps))     O_i = i / ((phi(K_i)+eps) . (sum_{j<=i} phi(Q_j) + eps))
    Ih_i = (phi(Q_i)+eps) . (sum_{j<=i} phi(K_j) O_j + eps) / i  Oh_i = clamp((phi(K_i)+eps) . (sum_{j<=i} phi(Q_j) I_j + eps) / i)
    c_i = exp(Oh_i) / sum_{j<=i} exp(Oh_j) * i                   R_i = sigmoid(Ih_i) (phi(Q_i) I_i / i)^T sum_{j<=i} phi(K_j) (c_j V_j)^T

Decoding (derived here; the official code has no incremental path): every quantity above is a prefix
sum, so the state ``{t, sum phi(K), sum phi(Q), sum phi(K) O, sum phi(Q) I, logsumexp(Oh), S}`` with
``S = sum phi(K_j) (c_j V_j)^T`` (``d x e``) is updated in ``O(d e)`` per token; ``c_j`` is fixed when
token ``j`` arrives (each position uses its own prefix denominator, as in the cumulative-sum code).
The fast causal form computes the vector prefix sums with ``cumsum`` (``O(N d)``) and the last,
matrix-valued one with the shared chunked recurrence (:func:`attnzoo.core.scan.recurrence_chunked`),
never the ``N x d x e`` cumulative sum of the official code.

Causal cross-attention (CAB pattern; not in the paper): output ``i`` is the non-causal flow network of
sinks ``1..i`` and all sources, read at sink ``i`` (so it depends on queries ``<= i`` only and on the
whole source). The sink sums become prefix sums, but the outgoing flow ``O_j`` then depends on the pair
``(i, j)`` through a dot product in a denominator, which does not factorise: this pattern costs
``O(N M d)`` (computed in query blocks, memory ``O(block M)``).

Deviations and options: ``clamp`` (default 1.0, the official root file; ``Flowformer_NLP`` uses 5.0;
``None`` disables it); the stable ``logsumexp`` form of the causal competition replaces
``exp / cumsum(exp)`` (same value); padded keys (``key_padding_mask``) are removed from every sum and
``n, m`` count only real tokens (in self-attention the padded positions are removed as sinks too); the
output dropout (0.05 in the code) belongs to the surrounding layer and is not applied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.scan import recurrence_chunked
from ...registry import register

NEG_INF = float("-inf")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _clamp(x: Tensor, clamp: float | None) -> Tensor:
    return x if clamp is None else x.clamp(-clamp, clamp)


def _masked_softmax(x: Tensor, keep: Tensor) -> Tensor:
    """Softmax over the last axis of the entries where ``keep``; an all-masked row gives zeros."""
    x = x.masked_fill(~keep, NEG_INF)
    mx = x.amax(-1, keepdim=True).detach()
    e = torch.exp(x - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    den = e.sum(-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def _valid(key_padding_mask: Tensor | None, like: Tensor) -> Tensor:
    """``(B, 1, M, 1)`` float, 1 for a real key."""
    if key_padding_mask is None:
        return like.new_ones(like.shape[0], 1, like.shape[2], 1)
    return (~key_padding_mask)[:, None, :, None].to(like.dtype)


def _prep(q, k, v, key_padding_mask):
    k, v = expand_kv(k, v, q.shape[1])
    return torch.sigmoid(q), torch.sigmoid(k), v, _valid(key_padding_mask, k)


# ---------------------------------------------------------------------------------------------------
# non-causal
def noncausal_flows(fq: Tensor, fk: Tensor, kval: Tensor, qval: Tensor | None, eps: float, clamp) -> dict[str, Tensor]:
    """The non-causal flow quantities: ``incoming (I)``, ``outgoing (O)``, their conserved versions,
    ``allocation`` (``(B, H, N)``) and ``competition`` (``(B, H, M)``, summing to ``m`` over real keys)."""
    fk = fk * kval
    fqm = fq if qval is None else fq * qval
    m_eff = kval.sum(2).clamp(min=1.0)  # (B, 1, 1)
    n_eff = fq.new_tensor(float(fq.shape[2])) if qval is None else qval.sum(2).clamp(min=1.0)
    inc = 1.0 / _dot(fq + eps, fk.sum(2, keepdim=True) + eps)  # I_i (B, H, N)
    out = 1.0 / _dot(fk + eps, fqm.sum(2, keepdim=True) + eps)  # O_j (B, H, M)
    inc_hat = _dot(fq + eps, (fk * out[..., None]).sum(2, keepdim=True) + eps)
    out_hat = _clamp(_dot(fk + eps, (fqm * inc[..., None]).sum(2, keepdim=True) + eps), clamp)
    return {
        "incoming": inc,
        "outgoing": out,
        "conserved_incoming": inc_hat,
        "conserved_outgoing": out_hat,
        "allocation": torch.sigmoid(inc_hat * (n_eff / m_eff)),
        "competition": _masked_softmax(out_hat, kval[..., 0] > 0) * m_eff,
    }


def _noncausal(fq: Tensor, fk: Tensor, v: Tensor, kval: Tensor, qval: Tensor | None, eps: float, clamp) -> Tensor:
    f = noncausal_flows(fq, fk, kval, qval, eps, clamp)
    fk, v = fk * kval, v * kval
    kv = torch.matmul(fk.transpose(-1, -2), v * f["competition"][..., None])  # (B, H, d, e): linear cost
    return torch.matmul(fq * f["incoming"][..., None], kv) * f["allocation"][..., None]


def _noncausal_reference(fq, fk, v, kval, qval, eps, clamp) -> Tensor:
    """The same with every sum written over explicit index sets and the n x m flow matrix materialised."""
    b, h, n, _ = fq.shape
    out = torch.empty(b, h, n, v.shape[-1], dtype=v.dtype, device=v.device)
    for bi in range(b):
        keys = kval[bi, 0, :, 0] > 0
        sinks = torch.ones(n, dtype=torch.bool, device=fq.device) if qval is None else qval[bi, 0, :, 0] > 0
        Q, K, V = fq[bi][:, sinks], fk[bi][:, keys], v[bi][:, keys]  # (H, n', d), (H, m', d)
        n_, m_ = Q.shape[1], K.shape[1]
        if m_ == 0:  # no source: no flow
            out[bi] = 0.0
            continue
        I_all = 1.0 / _dot(fq[bi] + eps, K.sum(1, keepdim=True) + eps)  # every query row gets an output
        I = 1.0 / _dot(Q + eps, K.sum(1, keepdim=True) + eps)
        O = 1.0 / _dot(K + eps, Q.sum(1, keepdim=True) + eps)
        Ih = _dot(fq[bi] + eps, (K * O[..., None]).sum(1, keepdim=True) + eps)
        Oh = _clamp(_dot(K + eps, (Q * I[..., None]).sum(1, keepdim=True) + eps), clamp)
        alloc = torch.sigmoid(Ih * n_ / m_)
        comp = torch.softmax(Oh, dim=-1) * m_
        flow = torch.matmul(fq[bi] * I_all[..., None], K.transpose(-1, -2))  # (H, n, m') sink-source weights
        out[bi] = torch.matmul(flow * comp[:, None, :], V) * alloc[..., None]
    return out


# ---------------------------------------------------------------------------------------------------
# causal self-attention
def flow_causal_init(b: int, h: int, d: int, e: int, *, dtype=None, device=None) -> dict:
    """The empty causal decoding state."""
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return {
        "t": 0,
        "k_sum": z(b, h, d),
        "q_sum": z(b, h, d),
        "ko_sum": z(b, h, d),
        "qi_sum": z(b, h, d),
        "lse": torch.full((b, h), NEG_INF, dtype=dtype, device=device),
        "kv": z(b, h, d, e),
    }


def flow_causal_chunked(
    fq: Tensor, fk: Tensor, v: Tensor, valid: Tensor, eps: float, clamp, chunk: int, state: dict | None = None
) -> tuple[Tensor, dict]:
    """Causal flow attention on features ``fq, fk (B, H, N, d)``, ``v (B, H, N, e)``; ``valid (B, 1, N, 1)``.

    Vector prefix sums by ``cumsum``, the matrix one by the chunked recurrence; continues ``state``.
    """
    b, h, n, d = fq.shape
    st = flow_causal_init(b, h, d, v.shape[-1], dtype=v.dtype, device=v.device) if state is None else state
    fqm, fkm = fq * valid, fk * valid
    cnt = st["t"] + valid[..., 0].cumsum(2)  # (B, 1, N) real tokens so far
    cnt_s = cnt.clamp(min=1.0)
    inc = cnt_s / _dot(fq + eps, st["k_sum"][:, :, None] + fkm.cumsum(2) + eps)
    out = cnt_s / _dot(fk + eps, st["q_sum"][:, :, None] + fqm.cumsum(2) + eps)
    ko = st["ko_sum"][:, :, None] + (fkm * out[..., None]).cumsum(2)
    qi = st["qi_sum"][:, :, None] + (fqm * inc[..., None]).cumsum(2)
    inc_hat = _dot(fq + eps, ko + eps) / cnt_s
    out_hat = _clamp(_dot(fk + eps, qi + eps) / cnt_s, clamp)
    real = valid[..., 0] > 0  # (B, 1, N)
    oh = out_hat.masked_fill(~real, NEG_INF)
    lse = torch.logaddexp(st["lse"][:, :, None], torch.logcumsumexp(oh, dim=2))
    lse_s = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    comp = torch.where(real, torch.exp(oh - lse_s), torch.zeros_like(oh)) * cnt_s  # c_i
    o, kv = recurrence_chunked(fq * (inc / cnt_s)[..., None], fkm, v * comp[..., None], chunk=chunk, initial=st["kv"])
    o = o * torch.sigmoid(inc_hat)[..., None]
    new = {
        "t": st["t"] + n,  # decoding never pads, so the count is shared by the batch
        "k_sum": st["k_sum"] + fkm.sum(2),
        "q_sum": st["q_sum"] + fqm.sum(2),
        "ko_sum": ko[:, :, -1],
        "qi_sum": qi[:, :, -1],
        "lse": lse[:, :, -1],
        "kv": kv,
    }
    return o, new


def flow_causal_step(state: dict, fq: Tensor, fk: Tensor, v: Tensor, eps: float, clamp) -> tuple[Tensor, dict]:
    """One token of causal flow attention, ``O(d e)``: features ``fq, fk (B, H, d)``, ``v (B, H, e)``."""
    t = state["t"] + 1
    k_sum = state["k_sum"] + fk
    q_sum = state["q_sum"] + fq
    inc = t / _dot(fq + eps, k_sum + eps)  # I_t
    out = t / _dot(fk + eps, q_sum + eps)  # O_t
    ko = state["ko_sum"] + fk * out[..., None]
    qi = state["qi_sum"] + fq * inc[..., None]
    inc_hat = _dot(fq + eps, ko + eps) / t
    out_hat = _clamp(_dot(fk + eps, qi + eps) / t, clamp)
    lse = torch.logaddexp(state["lse"], out_hat)
    comp = torch.exp(out_hat - lse) * t  # c_t, with its own prefix denominator
    kv = state["kv"] + fk[..., :, None] * (v * comp[..., None])[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", fq * (inc / t)[..., None], kv) * torch.sigmoid(inc_hat)[..., None]
    return o, {"t": t, "k_sum": k_sum, "q_sum": q_sum, "ko_sum": ko, "qi_sum": qi, "lse": lse, "kv": kv}


def _causal_reference(fq, fk, v, valid, eps, clamp) -> Tensor:
    """The official cumulative-sum form (``Flow_Attention_Causal``), with the ``N x d x e`` cumsum."""
    real = valid[..., 0] > 0
    fqm, fkm = fq * valid, fk * valid
    normal = valid[..., 0].cumsum(2).clamp(min=1.0)
    inc = normal / _dot(fq + eps, fkm.cumsum(2) + eps)
    out = normal / _dot(fk + eps, fqm.cumsum(2) + eps)
    inc_hat = _dot(fq + eps, (fkm * out[..., None]).cumsum(2) + eps) / normal
    out_hat = _clamp(_dot(fk + eps, (fqm * inc[..., None]).cumsum(2) + eps) / normal, clamp)
    e = torch.exp(out_hat) * real
    den = e.cumsum(2)
    comp = e / torch.where(den > 0, den, torch.ones_like(den)) * normal
    kv = torch.einsum("bhnd,bhne->bhnde", fkm, v * comp[..., None]).cumsum(2)
    o = torch.einsum("bhnd,bhnde->bhne", fq * (inc / normal)[..., None], kv)
    return o * torch.sigmoid(inc_hat)[..., None]


# ---------------------------------------------------------------------------------------------------
# causal cross-attention
def _causal_cross(fq, fk, v, kval, eps, clamp, block: int = 256) -> Tensor:
    fk, v = fk * kval, v * kval
    n = fq.shape[2]
    m_eff = kval.sum(2).clamp(min=1.0)  # (B, 1, 1)
    kmask = (kval[..., 0] == 0)[:, :, None, :]  # (B, 1, 1, M)
    inc = 1.0 / _dot(fq + eps, fk.sum(2, keepdim=True) + eps)  # I_i (B, H, N): whole source
    cq = fq.cumsum(2)  # sink prefix sums
    cqi = (fq * inc[..., None]).cumsum(2)
    sinks = torch.arange(1, n + 1, device=fq.device, dtype=fq.dtype)
    outs = []
    for i0 in range(0, n, block):
        sl = slice(i0, min(n, i0 + block))
        o_ij = 1.0 / torch.matmul(cq[:, :, sl] + eps, (fk + eps).transpose(-1, -2))  # (B, H, blk, M)
        inc_hat = _dot(fq[:, :, sl] + eps, torch.matmul(o_ij, fk) + eps)
        oh = _clamp(torch.matmul(cqi[:, :, sl] + eps, (fk + eps).transpose(-1, -2)), clamp)
        comp = _masked_softmax(oh, ~kmask) * m_eff[..., None]
        alloc = torch.sigmoid(inc_hat * sinks[sl] / m_eff)
        w = torch.matmul(fq[:, :, sl] * inc[:, :, sl, None], fk.transpose(-1, -2)) * comp
        outs.append(torch.matmul(w, v) * alloc[..., None])
    return torch.cat(outs, dim=2)


def _causal_cross_reference(fq, fk, v, kval, eps, clamp) -> Tensor:
    """Literally the non-causal flow network of sinks ``1..i`` and the whole source, read at sink ``i``."""
    rows = [_noncausal_reference(fq[:, :, : i + 1], fk, v, kval, None, eps, clamp)[:, :, i] for i in range(fq.shape[2])]
    return torch.stack(rows, dim=2)


# ---------------------------------------------------------------------------------------------------
def _check(q, k, causal, cross):
    if causal and not cross and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"flow: causal self-attention needs as many queries as keys (the flows of sink i and source i are "
            f"normalised together); got N={q.shape[2]}, M={k.shape[2]}"
        )


def flow_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-6,
    clamp: float | None = 1.0,
    chunk: int = 64,
) -> Tensor:
    """Flow-Attention (fast form) on ``q (B, H, N, d)``, ``k, v (B, Hkv, M, d|e)``; all four patterns."""
    _check(q, k, causal, cross)
    fq, fk, v, kval = _prep(q, k, v, key_padding_mask)
    if causal and not cross:
        return flow_causal_chunked(fq, fk, v, kval, eps, clamp, chunk)[0]
    if causal:
        return _causal_cross(fq, fk, v, kval, eps, clamp)
    return _noncausal(fq, fk, v, kval, None if cross or key_padding_mask is None else kval, eps, clamp)


def flow_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eps: float = 1e-6,
    clamp: float | None = 1.0,
    chunk: int = 64,
) -> Tensor:
    """Reference: materialised flow matrices (non-causal), the official cumsum form (causal self), the
    non-causal network per query prefix (causal cross)."""
    _check(q, k, causal, cross)
    fq, fk, v, kval = _prep(q, k, v, key_padding_mask)
    if causal and not cross:
        return _causal_reference(fq, fk, v, kval, eps, clamp)
    if causal:
        return _causal_cross_reference(fq, fk, v, kval, eps, clamp)
    return _noncausal_reference(fq, fk, v, kval, None if cross or key_padding_mask is None else kval, eps, clamp)


@register(
    "flow",
    paper="Flowformer: Linearizing Transformers with Conservation Flows",
    arxiv="2202.06258",
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
    complexity="time O((N + M) d e) (causal cross: O(N M d), exact prefix-of-sinks flow); memory O(N (d + e) + d e); "
    "decode state O(d e)",
    functional=flow_attention,
    reference=flow_attention_reference,
    defaults={"eps": 1e-6, "clamp": 1.0, "chunk": 64},
    summary="sigmoid-kernel linear attention with flow conservation: incoming/outgoing flows, source competition "
    "(softmax) and sink allocation (sigmoid); O(1)-state decoding derived for the causal form",
    deviations="causal cross is defined here (not in the paper) as the flow network of sinks <= i, O(N M d); "
    "no output dropout; padded tokens are removed from every sum",
    test_config={"chunk": 16},
)
class FlowAttention(AttentionModule):
    """Multi-head Flow-Attention. Decoding state: the prefix sums of :func:`flow_causal_init`."""

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        return flow_causal_init(batch_size, self.num_heads, self.head_dim, self.head_dim, dtype=dtype, device=device)

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("flow: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        q, k, v = self.project(x, None)
        fq, fk = torch.sigmoid(q), torch.sigmoid(k)
        st = self.settings
        o, state = flow_causal_chunked(fq, fk, v, fq.new_ones(x.shape[0], 1, x.shape[1], 1), st["eps"], st["clamp"], st["chunk"], state)
        return self.out_proj(merge_heads(o)), state

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        q, k, v = self.project(x3, None)
        o, state = flow_causal_step(
            state, torch.sigmoid(q[:, :, 0]), torch.sigmoid(k[:, :, 0]), v[:, :, 0], self.settings["eps"], self.settings["clamp"]
        )
        y = self.out_proj(merge_heads(o[:, :, None]))
        return (y[:, 0] if squeeze else y), state

"""RCMHA: relative convolutional multi-head attention.

Paper: "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
(Sugiharto et al., arXiv 2308.03429). Official code: hermansh-id/rcmha (``rcmha/attention.py``
``RelativeMultiHeadAttention`` and ``SpatialDepthWiseConvolution``, ``rcmha/util.py`` ``shift_right``),
read for the details below. It combines Primer's depthwise convolution on the projected heads
(multi-DConv-head attention) with Transformer-XL relative-position attention.

Per head, with ``d`` the head width and ``P`` the relative range (``max_distance``):

1. ``q, k, v`` = linear projections of the tokens, split into heads.
2. A causal depthwise convolution along the sequence on each of ``q``, ``k``, ``v`` (its own kernel per
   tensor, width ``conv_kernel`` = 3, one weight per channel shared by all heads, with bias):
   ``x'_t = b + sum_{s<kc} w_s * x_{t - kc + 1 + s}`` (zero before the sequence start).
3. Scores with learned relative terms (all zero-initialised), query ``i`` at position ``p_i``:
   ``s_ij = [(q_i + u) . k_j + q_i . R[P - (p_i - j)] + r[P - (p_i - j)]] / sqrt(d)``,
   ``u (H, d)``, ``R (2P, H, d)``, ``r (2P, H)``; softmax over the causal keys; ``out = A v``; ``W_o``.
   The official code builds the ``q . R`` term with ``shift_right`` on ``R[P - M : P + N]``; a test
   checks that this is exactly the gather above.

Fast form: ``conv1d`` with ``groups=d`` and the relative term as one ``q @ R_window^T`` product followed
by a gather (``O(N M d)`` like the content term; the ``N x M`` score matrix is materialised, this is an
``O(N^2)`` mechanism). Reference form: explicit sums over taps and an explicit ``R[P - (p_i - j)]``
gather per pair. Decoding keeps the KV cache of convolved keys/values plus the last ``kc - 1``
projected ``q, k, v`` for the convolution.

Deviations: Transformer-XL segment memory (``mem_len``) is not kept across forward calls (use
``prefill``/``step`` to continue a sequence); distances beyond ``P`` reuse the last table row (the
code would index out of range); padded tokens (``key_padding_mask``) are zeroed before the
convolution and masked as keys; the value projection has a bias only if ``qkv_bias`` (the code always
has one). Causal self-attention only, as in the paper's language model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...registry import register


# ---------------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------------
def causal_dwconv(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, history: Tensor | None = None
) -> Tensor:
    """Causal depthwise convolution of ``x (B, H, L, D)`` along ``L``: ``weight (D, kc)``, ``bias (D,)``.

    ``history (B, H, kc - 1, D)``: the inputs before ``x`` (zeros when None).
    """
    if weight is None:
        return x
    bsz, heads, length, dim = x.shape
    kc = weight.shape[-1]
    if history is None:
        history = x.new_zeros(bsz, heads, kc - 1, dim)
    xp = torch.cat([history.to(x.dtype), x], dim=2)  # (B, H, L + kc - 1, D)
    inp = xp.reshape(bsz * heads, length + kc - 1, dim).transpose(1, 2)
    out = F.conv1d(
        inp, weight.to(x.dtype)[:, None, :], None if bias is None else bias.to(x.dtype), groups=dim
    )
    return out.transpose(1, 2).reshape(bsz, heads, length, dim)


def _causal_dwconv_reference(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, history: Tensor | None = None
) -> Tensor:
    if weight is None:
        return x
    kc = weight.shape[-1]
    if history is None:
        history = x.new_zeros(x.shape[0], x.shape[1], kc - 1, x.shape[3])
    xp = torch.cat([history.to(x.dtype), x], dim=2)
    out = torch.zeros_like(x) + (0 if bias is None else bias.to(x.dtype))
    for t in range(x.shape[2]):
        for s in range(kc):  # x'_t = b + sum_s w_s x_{t-kc+1+s}
            out[:, :, t] = out[:, :, t] + weight[:, s].to(x.dtype) * xp[:, :, t + s]
    return out


def _rel_index(n: int, m: int, p: int, device) -> Tensor:
    """Table row ``P - (p_i - j)`` for query ``i`` (at position ``i + m - n``) and key ``j``, clamped to the table."""
    pos = torch.arange(n, device=device)[:, None] + (m - n)
    j = torch.arange(m, device=device)[None, :]
    return (p - (pos - j)).clamp(0, 2 * p - 1)


def _check_rel(rel_emb, rel_bias, query_bias, heads, dim):
    if rel_emb is not None and (
        rel_emb.dim() != 3 or rel_emb.shape[1:] != (heads, dim) or rel_emb.shape[0] % 2
    ):
        raise ValueError(f"rcmha: rel_emb must be (2P, {heads}, {dim}), got {tuple(rel_emb.shape)}")
    if rel_bias is not None and (rel_bias.dim() != 2 or rel_bias.shape[1] != heads):
        raise ValueError(f"rcmha: rel_bias must be (2P, {heads}), got {tuple(rel_bias.shape)}")
    if query_bias is not None and tuple(query_bias.shape) != (heads, dim):
        raise ValueError(f"rcmha: query_bias must be ({heads}, {dim}), got {tuple(query_bias.shape)}")


def _relative_scores(q, k, rel_emb, rel_bias, query_bias, fast: bool) -> Tensor:
    """Unscaled scores ``(q_i + u).k_j + q_i.R[idx] + r[idx]`` as ``(B, H, N, M)``."""
    n, m = q.shape[2], k.shape[2]
    qu = q if query_bias is None else q + query_bias.to(q.dtype)[None, :, None, :]
    scores = qu @ k.transpose(-2, -1)
    if rel_emb is None and rel_bias is None:
        return scores
    p = (rel_emb if rel_emb is not None else rel_bias).shape[0] // 2
    idx = _rel_index(n, m, p, q.device)
    if rel_emb is not None:
        if fast:
            lo, hi = int(idx.min()), int(idx.max()) + 1
            window = rel_emb[lo:hi].to(q.dtype).permute(1, 2, 0)  # (H, D, W)
            qr = q @ window  # (B, H, N, W): every query against every table row it can use
            scores = scores + qr.gather(-1, (idx - lo).expand(q.shape[0], q.shape[1], n, m))
        else:
            r = rel_emb.to(q.dtype)[idx]  # (N, M, H, D): R[P - (p_i - j)] per pair
            scores = scores + torch.einsum("bhid,ijhd->bhij", q, r)
    if rel_bias is not None:
        scores = scores + rel_bias.to(q.dtype)[idx].permute(2, 0, 1)[None]
    return scores


def _attend(q, k, v, *, causal, key_padding_mask, rel_emb, rel_bias, query_bias, scale, fast):
    k, v = expand_kv(k, v, q.shape[1])
    n, m = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = _relative_scores(q, k, rel_emb, rel_bias, query_bias, fast) * scale
    allowed = None
    if causal:
        i = torch.arange(n, device=q.device)[:, None] + (m - n)
        allowed = torch.arange(m, device=q.device)[None, :] <= i
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if fast:
        w = torch.softmax(scores, dim=-1)
        if key_padding_mask is not None:
            w = torch.nan_to_num(w, nan=0.0)
        return w @ v
    mx = scores.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(scores - mx)
    den = e.sum(-1, keepdim=True)
    return (e / torch.where(den > 0, den, torch.ones_like(den))) @ v


def _zero_padded(x: Tensor, kpm: Tensor | None, last: int) -> Tensor:
    """Zero the padded positions of ``x (B, H, L, D)``; ``kpm`` covers the last ``last`` == L positions."""
    if kpm is None:
        return x
    return x.masked_fill(kpm[:, None, -last:, None], 0.0)


def _rcmha(
    q,
    k,
    v,
    *,
    causal,
    cross,
    key_padding_mask,
    conv_q,
    conv_k,
    conv_v,
    conv_bias_q,
    conv_bias_k,
    conv_bias_v,
    rel_emb,
    rel_bias,
    query_bias,
    scale,
    fast,
):
    if cross or not causal:
        raise ValueError("rcmha: RCMHA is causal self-attention (causal=True, cross=False)")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"rcmha: more queries ({q.shape[2]}) than keys ({k.shape[2]})")
    _check_rel(rel_emb, rel_bias, query_bias, q.shape[1], q.shape[-1])
    conv = causal_dwconv if fast else _causal_dwconv_reference
    q = conv(_zero_padded(q, key_padding_mask, q.shape[2]), conv_q, conv_bias_q)
    k = conv(_zero_padded(k, key_padding_mask, k.shape[2]), conv_k, conv_bias_k)
    v = conv(_zero_padded(v, key_padding_mask, v.shape[2]), conv_v, conv_bias_v)
    return _attend(
        q,
        k,
        v,
        causal=True,
        key_padding_mask=key_padding_mask,
        rel_emb=rel_emb,
        rel_bias=rel_bias,
        query_bias=query_bias,
        scale=scale,
        fast=fast,
    )


def rcmha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    conv_q: Tensor | None = None,
    conv_k: Tensor | None = None,
    conv_v: Tensor | None = None,
    conv_bias_q: Tensor | None = None,
    conv_bias_k: Tensor | None = None,
    conv_bias_v: Tensor | None = None,
    rel_emb: Tensor | None = None,
    rel_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """RCMHA on per-head ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)`` (causal; queries are the last N positions).

    ``conv_* (D, kc)`` / ``conv_bias_* (D,)``: the depthwise kernels (None = identity); the queries'
    convolution starts from zeros (no earlier queries). ``rel_emb (2P, H, D)``, ``rel_bias (2P, H)``,
    ``query_bias (H, D)``: the relative terms (None = 0).
    """
    return _rcmha(
        q,
        k,
        v,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        conv_q=conv_q,
        conv_k=conv_k,
        conv_v=conv_v,
        conv_bias_q=conv_bias_q,
        conv_bias_k=conv_bias_k,
        conv_bias_v=conv_bias_v,
        rel_emb=rel_emb,
        rel_bias=rel_bias,
        query_bias=query_bias,
        scale=scale,
        fast=True,
    )


def rcmha_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    conv_q: Tensor | None = None,
    conv_k: Tensor | None = None,
    conv_v: Tensor | None = None,
    conv_bias_q: Tensor | None = None,
    conv_bias_k: Tensor | None = None,
    conv_bias_v: Tensor | None = None,
    rel_emb: Tensor | None = None,
    rel_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The same, with explicit tap sums and an explicit per-pair relative-embedding gather."""
    return _rcmha(
        q,
        k,
        v,
        causal=causal,
        cross=cross,
        key_padding_mask=key_padding_mask,
        conv_q=conv_q,
        conv_k=conv_k,
        conv_v=conv_v,
        conv_bias_q=conv_bias_q,
        conv_bias_k=conv_bias_k,
        conv_bias_v=conv_bias_v,
        rel_emb=rel_emb,
        rel_bias=rel_bias,
        query_bias=query_bias,
        scale=scale,
        fast=False,
    )


# ---------------------------------------------------------------------------------------------------
# module
# ---------------------------------------------------------------------------------------------------
@register(
    "rcmha",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    arxiv="2308.03429",
    family="sparse",
    capabilities={"causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N M d + N d k_conv), memory O(N M) scores",
    functional=rcmha_attention,
    reference=rcmha_attention_reference,
    defaults={"conv_kernel": 3, "max_distance": 4096, "scale": None},
    summary="causal depthwise convolution on q, k, v (Primer's MDHA) plus Transformer-XL relative-position attention",
    deviations="no Transformer-XL segment memory across calls (prefill/step continue a sequence); distances beyond "
    "max_distance reuse the last table row; padded tokens are zeroed before the convolution",
    test_config={"conv_kernel": 3, "max_distance": 64},
)
class RCMHAttention(AttentionModule):
    """RCMHA layer (causal). Relative parameters are zero-initialised and convolutions use PyTorch's
    ``Conv1d`` initialisation, as in the official code."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        kc, p = self.settings["conv_kernel"], self.settings["max_distance"]
        if not isinstance(kc, int) or kc < 1:
            raise ValueError(f"rcmha: conv_kernel must be a positive int, got {kc!r}")
        if not isinstance(p, int) or p < 1:
            raise ValueError(f"rcmha: max_distance must be a positive int, got {p!r}")
        d = self.head_dim
        self.convs = nn.ModuleList(nn.Conv1d(d, d, kc, groups=d) for _ in range(3))  # q, k, v
        self.rel_emb = nn.Parameter(torch.zeros(2 * p, num_heads, d))
        self.rel_bias = nn.Parameter(torch.zeros(2 * p, num_heads))
        self.query_bias = nn.Parameter(torch.zeros(num_heads, d))

    def op_params(self):
        c = self.convs
        return {
            "conv_q": c[0].weight[:, 0],
            "conv_k": c[1].weight[:, 0],
            "conv_v": c[2].weight[:, 0],
            "conv_bias_q": c[0].bias,
            "conv_bias_k": c[1].bias,
            "conv_bias_v": c[2].bias,
            "rel_emb": self.rel_emb,
            "rel_bias": self.rel_bias,
            "query_bias": self.query_bias,
            "scale": self.settings["scale"],
        }

    # -- decoding: KV cache of convolved keys/values + the last kc-1 projections for the convolution
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache(), "hist_q": None, "hist_k": None, "hist_v": None}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("rcmha: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        raw = self.project(x, None)
        fast = self.impl != "reference"
        conv = causal_dwconv if fast else _causal_dwconv_reference
        kc = self.settings["conv_kernel"]
        out = []
        for t, name, c in zip(raw, ("hist_q", "hist_k", "hist_v"), self.convs):
            hist = state[name]
            out.append(conv(t, c.weight[:, 0], c.bias, hist))
            full = t if hist is None else torch.cat([hist, t], dim=2)
            keep = full[:, :, full.shape[2] - (kc - 1) :] if kc > 1 else full[:, :, :0]
            if keep.shape[2] < kc - 1:  # fewer tokens than the kernel so far: left-pad with zeros
                keep = torch.cat(
                    [
                        keep.new_zeros(keep.shape[0], keep.shape[1], kc - 1 - keep.shape[2], keep.shape[3]),
                        keep,
                    ],
                    2,
                )
            state[name] = keep
        q, k, v = out
        keys, values = state["kv"].append(k, v)
        o = _attend(
            q,
            keys,
            values,
            causal=True,
            key_padding_mask=None,
            rel_emb=self.rel_emb,
            rel_bias=self.rel_bias,
            query_bias=self.query_bias,
            scale=self.settings["scale"],
            fast=fast,
        )
        return self.out_proj(merge_heads(o)), state

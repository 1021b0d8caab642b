"""MoH: multi-head attention as a mixture of heads (shared heads + top-k routed heads, weighted sum).

Paper: "MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin, Zhu, Yuan, Yan; arXiv 2410.11842).
Official code: SkyworkAI/MoH (``MoH-ViT/attention.py``, ``MoH-DiT/models.py``), read for the details.

Multi-head attention in summation form is ``O = sum_i H^i W_O^i`` (``H^i`` head ``i``'s attention output,
``W_O^i`` its rows of the output projection). MoH makes it a weighted sum with per-token gates,
``O_t = sum_i g_{t,i} H^i_t W_O^i``, where the ``h`` heads are ``h_s`` shared heads (always on) and
``h - h_s`` routed heads of which each token keeps its top ``k``::

    shared:  g_i = a1 * softmax(W_s x_t)_i                         i <  h_s
    routed:  g_i = a2 * softmax(W_r x_t)_i  if i in TopK else 0     i >= h_s
    [a1, a2] = softmax(W_h x_t)

Load balance (over the routed heads, ``E = h - h_s``, ``T`` tokens):
``f_i = (1/T) sum_t 1[t selects i]``, ``P_i = (1/T) sum_t softmax(W_r x_t)_i``; this module exposes
``load_balance_loss = E * sum_i f_i P_i`` (the code's ``E^2 * mean_i(f_i P_i)``; it equals ``k`` under
uniform routing) after every forward, to be added to the task loss with weight ``beta = 0.01``.
``active_head_fraction`` (heads with a non-zero gate per token, averaged) and ``head_load`` (``f_i``)
are reported too.

``gating="paper"`` (default) is the formula above. ``gating="code"`` is the official MoH-ViT code:
the kept routed probabilities are renormalised to sum to 1 and multiplied by ``k``; the shared gates
are ``h_s * softmax(W_s x)`` (ones * h_s when ``h_s = 1``); ``[a1, a2] = 2 * softmax(W_h x)``. With
``gating="code"``, ``W_s = 0`` and every head shared the gates are all 1 and MoH is exactly MHA.

Fast form: every head by ``scaled_dot_product_attention`` (any pattern, padding, GQA), head outputs
scaled by the gates, one output projection. Reference form: the explicit summation
``sum_i g_i H^i W_O^i`` with per-head output blocks. Like the official code this computes every head
and zeroes the unselected ones (no per-token head skipping); the gates depend on the current token
only, so decoding is a plain KV cache. Spatial input ``(B, H, W, C)`` is treated as ``H*W`` tokens with
full (non-causal) attention, as in MoH-ViT (no relative-position bias; the ViT code's cosine attention
with learned temperature is a backbone choice, not part of MoH, and is not reproduced).

Deviation: the paper's equations were taken from the spec (not re-read in the PDF during this work);
the code form was checked in SkyworkAI/MoH. Router weights have no bias, as in the code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.layout import merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register
from ..softmax.softmax import softmax_attention


def _apply_gates(out: Tensor, gates: Tensor | None) -> Tensor:
    if gates is None:
        return out
    if (
        gates.dim() != 3
        or gates.shape[0] != out.shape[0]
        or gates.shape[1] != out.shape[2]
        or gates.shape[2] != out.shape[1]
    ):
        raise ValueError(
            f"moh: gates must be (batch, queries, heads) = {(out.shape[0], out.shape[2], out.shape[1])}, got {tuple(gates.shape)}"
        )
    return out * gates.transpose(1, 2).unsqueeze(-1).to(out.dtype)


def moh_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    gates: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Per-head softmax attention with head outputs scaled by per-token ``gates (B, N, H)`` (None = all 1)."""
    out = softmax_attention(
        q, k, v, causal=causal, cross=cross, key_padding_mask=key_padding_mask, scale=scale
    )
    return _apply_gates(out, gates)


def moh_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    gates: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    out = reference_attention(
        q, k, v, causal=causal and not cross, key_padding_mask=key_padding_mask, scale=scale
    )
    if gates is None:
        return out
    bsz, heads, n, dv = out.shape
    res = torch.empty_like(out)
    for i in range(heads):  # g_{t,i} H^i_t, head by head
        res[:, i] = gates[:, :, i, None].to(out.dtype) * out[:, i]
    return res


@register(
    "moh",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    arxiv="2410.11842",
    family="sparse",
    capabilities={
        "noncausal_self",
        "causal_self",
        "noncausal_cross",
        "causal_cross",
        "decode",
        "spatial",
        "key_padding_mask",
        "trainable",
    },
    complexity="as multi-head attention, O(N M d) time, plus an O(N C h) router",
    functional=moh_attention,
    reference=moh_attention_reference,
    defaults={"shared_heads": None, "top_k": None, "gating": "paper", "scale": None},
    summary="heads as experts: shared heads always on, each token routes to its top-k other heads; weighted sum of head outputs; load-balance loss exposed",
    deviations="computes all heads and zeroes unselected ones (as the official code); paper equations from the spec, code form verified",
    test_config={"shared_heads": 1, "top_k": 1},
)
class MoHAttention(AttentionModule):
    """Mixture-of-Head attention.

    Settings: ``shared_heads`` (default ``num_heads // 2``), ``top_k`` routed heads per token (default
    half of the routed heads, at least 1), ``gating`` ``"paper"`` or ``"code"``. After each forward:
    ``load_balance_loss`` (scalar tensor, differentiable), ``head_load`` (fraction of tokens selecting
    each routed head), ``active_head_fraction`` (float) and ``last_gates`` (``(B, N, H)``, detached).
    """

    extra_settings = ("num_kv_heads",)

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        hs = num_heads // 2 if s["shared_heads"] is None else s["shared_heads"]
        if not isinstance(hs, int) or not 0 <= hs <= num_heads:
            raise ValueError(f"moh: shared_heads must be an int in [0, {num_heads}], got {hs!r}")
        routed = num_heads - hs
        topk = (max(1, routed // 2) if routed else 0) if s["top_k"] is None else s["top_k"]
        if not isinstance(topk, int) or not (0 <= topk <= routed) or (routed > 0 and topk == 0):
            raise ValueError(f"moh: top_k must be an int in [1, {routed}] (the routed heads), got {topk!r}")
        if s["gating"] not in ("paper", "code"):
            raise ValueError(f"moh: gating must be 'paper' or 'code', got {s['gating']!r}")
        self.shared_heads, self.routed_heads, self.top_k = hs, routed, topk
        self.w_shared = nn.Linear(dim, hs, bias=False) if hs > 0 else None
        self.w_routed = nn.Linear(dim, routed, bias=False) if routed > 0 else None
        self.w_mix = nn.Linear(dim, 2, bias=False) if (hs > 0 and routed > 0) else None
        self.load_balance_loss: Tensor | None = None
        self.head_load: Tensor | None = None
        self.active_head_fraction: float | None = None
        self.last_gates: Tensor | None = None

    # -- routing -----------------------------------------------------------------------------------
    def gates(self, x: Tensor) -> Tensor:
        """Per-token head gates ``(B, N, H)`` for tokens ``x (B, N, C)``; records the load statistics."""
        code = self.settings["gating"] == "code"
        hs, routed, topk = self.shared_heads, self.routed_heads, self.top_k
        parts = []
        a1 = a2 = None
        if self.w_mix is not None:
            alpha = F.softmax(self.w_mix(x), dim=-1) * (2.0 if code else 1.0)
            a1, a2 = alpha[..., :1], alpha[..., 1:]
        if hs > 0:
            if code and hs == 1:
                gs = x.new_ones(*x.shape[:-1], 1)
            else:
                gs = F.softmax(self.w_shared(x), dim=-1) * (hs if code else 1.0)
            parts.append(gs if a1 is None else gs * a1)
        if routed > 0:
            probs = F.softmax(self.w_routed(x), dim=-1)
            idx = probs.topk(topk, dim=-1).indices
            sel = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
            gr = probs * sel
            if code:
                gr = gr / gr.sum(-1, keepdim=True).clamp_min(torch.finfo(gr.dtype).eps) * topk
            parts.append(gr if a2 is None else gr * a2)
            f = sel.reshape(-1, routed).mean(0)
            p = probs.reshape(-1, routed).mean(0)
            self.load_balance_loss = routed * (f * p).sum()
            self.head_load = f.detach()
        else:
            self.load_balance_loss = x.new_zeros(())
            self.head_load = x.new_zeros(0)
        g = torch.cat(parts, dim=-1)
        self.active_head_fraction = float((g != 0).float().mean())
        self.last_gates = g.detach()
        return g

    # -- forward -----------------------------------------------------------------------------------
    def _mix(self, heads: Tensor, g: Tensor) -> Tensor:
        if self.impl == "reference":
            # explicit O_t = sum_i g_{t,i} H^i_t W_O^i + b
            d = self.head_dim
            w = self.out_proj.weight
            out = self.out_proj.bias.to(heads.dtype).expand(heads.shape[0], heads.shape[2], -1).clone()
            for i in range(self.num_heads):
                out = out + g[..., i : i + 1] * (heads[:, i] @ w[:, i * d : (i + 1) * d].T)
            return out
        return self.out_proj(merge_heads(_apply_gates(heads, g)))

    def _heads(self, q, k, v, *, causal, cross, key_padding_mask):
        fn = moh_attention_reference if self.impl == "reference" else moh_attention
        return fn(
            q,
            k,
            v,
            causal=causal,
            cross=cross,
            key_padding_mask=key_padding_mask,
            scale=self.settings["scale"],
        )

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        cross = self.check_inputs(x, context, key_padding_mask)
        if x.dim() == 4:
            return self.forward_spatial(x)
        q, k, v = self.project(x, context)
        heads = self._heads(q, k, v, causal=self.causal, cross=cross, key_padding_mask=key_padding_mask)
        return self._mix(heads, self.gates(x))

    def forward_spatial(self, x: Tensor) -> Tensor:
        bsz, hh, ww, c = x.shape
        t = x.reshape(bsz, hh * ww, c)
        q, k, v = self.project(t, None)
        heads = self._heads(q, k, v, causal=False, cross=False, key_padding_mask=None)
        return self._mix(heads, self.gates(t)).view(bsz, hh, ww, c)

    # -- decoding ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache()}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("moh: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        q, k, v = self.project(x, None)
        keys, values = state["kv"].append(k, v)
        heads = self._heads(q, keys, values, causal=True, cross=False, key_padding_mask=None)
        return self._mix(heads, self.gates(x)), state

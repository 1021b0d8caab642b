"""Lightning Attention: decayed linear attention computed by intra-block and inter-block parts.

Papers:
* "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
  Models" (Qin et al., arXiv 2401.04658): the operator and its tiled algorithm (Alg. 1).
* "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
  (Qin et al., ICML 2024, arXiv 2405.17381): the TNL model built on it (option ``variant="tnl"``).
* "TransNormerLLM: A Faster and Better Large Language Model with Improved TransNormer" (Qin et al.,
  arXiv 2307.14995): NormAttention with SRMSNorm, the default module (``variant="transnormer"``).

Operator (causal self-attention only), per head with decay ``lambda_h = exp(-s_h)``::

    o_t = sum_{s<=t} lambda^{t-s} (q_t . k_s) v_s          O = [(Q K^T) * M] V,  M[t,s] = lambda^{t-s} (t >= s)

no softmax and no denominator. The slopes ``s_h`` are ALiBi's ``2^{-8(h+1)/H}`` (interleaved for
non-powers of two); with ``layer_idx`` and ``num_layers`` they are scaled by
``1 - layer_idx/(num_layers-1) + 1e-5`` as in the TransNormerLLM/TNL code. ``slopes`` overrides them
(a float for every head or one value per head; ``slopes=0`` gives ``lambda = 1``).

Fast form (Lightning Attention-2): blocks of ``block_size`` tokens; inside a block
``[(Q_b K_b^T) * M] V_b`` (matmuls on ``C x C`` tiles), across blocks the ``d x e`` state
``KV <- lambda^C KV + (lambda^{C-1-j} K_b)^T V_b`` read by ``(lambda^{i+1} Q_b) KV``. It is the shared
chunked recurrence :func:`attnzoo.core.scan.recurrence_chunked` with a per-head log decay ``-s_h``
(hand-written backward that recomputes the blocks, as Lightning Attention-2's backward does; segments
of 2048 tokens keep the working set cache-sized, so the time per token does not grow with ``N``).
Decoding: ``KV_t = lambda KV_{t-1} + k_t v_t^T``, ``o_t = q_t KV_t``: an ``O(H d e)`` state.

Module (``variant="transnormer"``, TransNormerLLM ``NormLinearAttention``): ``q, k, v, u`` are linear
maps of ``x``; ``q, k = SiLU(q), SiLU(k)``; ``o = SRMSNorm(lightning(q, k, v))`` over the concatenated
heads (``x * rsqrt(mean(x^2) + 1e-6)``, no gain); ``out = W_o (u * o)``.
``variant="tnl"`` (TNL, arXiv 2405.17381): ``q, k, v = SiLU(.)``, ``o = LayerNorm(lightning(q, k, v))``,
``out = W_o (o * sigmoid(W_2 W_1 x))`` with the rank-``head_dim`` gate.

Deviations: TransNormerLLM's optional LRPE positional encoding is not included. The non-causal
two-sided decay variant is not offered (it is in neither paper's code). Padded keys (``key_padding_mask``)
get ``k = 0``; time still passes over them, so left padding leaves the real tokens' outputs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.positional import alibi_slopes
from ...core.scan import recurrence_chunked, recurrence_step
from ...registry import register
from .linear import align_causal


def lightning_slopes(
    num_heads: int, layer_idx: int | None = None, num_layers: int | None = None, dtype=torch.float64, device=None
) -> Tensor:
    """The per-head slopes ``s_h`` (``lambda_h = exp(-s_h)``), with the per-layer scaling if given."""
    s = alibi_slopes(num_heads)
    if layer_idx is not None and num_layers is not None and num_layers > 1:
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"lightning: layer_idx must be in [0, {num_layers}), got {layer_idx}")
        s = s * (1.0 - layer_idx / (num_layers - 1) + 1e-5)
    return s.to(dtype=dtype, device=device)


def _slopes(slopes: float | Tensor | None, q: Tensor) -> Tensor:
    h = q.shape[1]
    if slopes is None:
        return lightning_slopes(h, dtype=q.dtype, device=q.device)
    s = torch.as_tensor(slopes, device=q.device).to(q.dtype)
    if s.dim() == 0:
        s = s.expand(h)
    if s.shape != (h,):
        raise ValueError(f"lightning: slopes must be a float or have one value per head ({h}), got shape {tuple(s.shape)}")
    return s


def _prepare(q, k, v, causal, cross, key_padding_mask):
    if not causal or cross:
        raise ValueError("lightning: the operator is defined for causal self-attention only (causal=True, cross=False)")
    k, v = expand_kv(k, v, q.shape[1])
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, :, None]
        k = k.masked_fill(pad, 0.0)
        v = v.masked_fill(pad, 0.0)
    return k, v


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    slopes: float | Tensor | None = None,
    block_size: int = 64,
) -> Tensor:
    """Lightning Attention-2 (fast form): ``[(Q K^T) * M] V`` by blocks. ``q (B, H, N, d)``, ``k, v (B, Hkv, M, d|e)``.

    For ``N != M`` the queries are the last ``N`` positions (bottom-right causal alignment).
    """
    k, v = _prepare(q, k, v, causal, cross, key_padding_mask)
    s = _slopes(slopes, q)
    q, k, v, drop = align_causal(q, k, v)
    out, _ = recurrence_chunked(q, k, v, -s, chunk=block_size)
    return out[:, :, drop:]


def lightning_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    slopes: float | Tensor | None = None,
    block_size: int = 64,
) -> Tensor:
    """Reference: the masked quadratic form ``[(Q K^T) * M] V`` with ``M[t, s] = lambda^{t-s}`` (``t >= s``)."""
    k, v = _prepare(q, k, v, causal, cross, key_padding_mask)
    s = _slopes(slopes, q)
    n, m = q.shape[2], k.shape[2]
    dist = (torch.arange(n, device=q.device)[:, None] + (m - n)) - torch.arange(m, device=q.device)[None, :]
    dist = dist.to(q.dtype)
    decay = torch.exp(-s.view(-1, 1, 1) * dist.clamp(min=0)) * (dist >= 0).to(q.dtype)  # (H, N, M)
    return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)


def srms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """SRMSNorm of TransNormerLLM: ``x * rsqrt(mean(x^2) + eps)`` over the last axis, no gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register(
    "lightning",
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models; "
    "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention (arXiv 2405.17381)",
    arxiv="2401.04658",
    family="linear",
    capabilities={"causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N C d + N d e) (block C); memory O(N (C + d + e) + (N / C) d e); decode state O(d e) per head",
    functional=lightning_attention,
    reference=lightning_attention_reference,
    defaults={
        "slopes": None,
        "block_size": 64,
        "layer_idx": None,
        "num_layers": None,
        "variant": "transnormer",
        "norm_eps": 1e-6,
    },
    summary="decayed linear attention (per-head ALiBi-style decay), intra-block quadratic + inter-block state; "
    "TransNormerLLM NormAttention module (SiLU q,k; SRMSNorm; output gate u) or the TNL module",
    deviations="LRPE of TransNormerLLM not included; causal only (no two-sided decay variant)",
    test_config={"block_size": 16},
)
class LightningAttention(AttentionModule):
    """TransNormerLLM NormAttention (default) or TNL attention around the Lightning operator.

    Decoding state: ``{"kv": (B, H, d, e)}``.
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        variant = self.settings["variant"]
        if variant not in ("transnormer", "tnl"):
            raise ValueError(f"lightning: variant must be 'transnormer' or 'tnl', got {variant!r}")
        slopes = self.settings["slopes"]
        if slopes is None:
            s = lightning_slopes(num_heads, self.settings["layer_idx"], self.settings["num_layers"], dtype=torch.float32)
        else:
            s = torch.as_tensor(slopes, dtype=torch.float32)
            s = s.expand(num_heads).clone() if s.dim() == 0 else s
            if s.shape != (num_heads,):
                raise ValueError(f"lightning: slopes must be a float or have {num_heads} values, got {tuple(s.shape)}")
        self.register_buffer("slope_rate", s, persistent=False)
        hidden = num_heads * self.head_dim
        bias = kw.get("qkv_bias", False)
        if variant == "transnormer":
            self.u_proj = nn.Linear(dim, hidden, bias=bias)
        else:
            self.norm = nn.LayerNorm(hidden)
            self.gate = nn.Sequential(nn.Linear(dim, self.head_dim, bias=bias), nn.Linear(self.head_dim, hidden, bias=bias))

    def op_params(self):
        return {"slopes": self.slope_rate, "block_size": self.settings["block_size"]}

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x, None)
        q, k = F.silu(q), F.silu(k)
        if self.settings["variant"] == "tnl":
            v = F.silu(v)
        return q, k, v

    def _finish(self, x: Tensor, o: Tensor) -> Tensor:
        o = merge_heads(o)
        if self.settings["variant"] == "transnormer":
            o = self.u_proj(x) * srms_norm(o, self.settings["norm_eps"])
        else:
            o = self.norm(o) * torch.sigmoid(self.gate(x))
        return self.out_proj(o)

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        cross = self.check_inputs(x, context, key_padding_mask)
        q, k, v = self._qkv(x)
        o = self.attend(q, k, v, cross=cross, key_padding_mask=key_padding_mask)
        return self._finish(x, o)

    # -- decoding ----------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        return {"kv": torch.zeros(batch_size, self.num_heads, self.head_dim, self.head_dim, dtype=dtype, device=device)}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("lightning: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype) if state is None else state
        q, k, v = self._qkv(x)
        o, kv = recurrence_chunked(q, k, v, -self.slope_rate.to(x.dtype), chunk=self.settings["block_size"], initial=state["kv"])
        return self._finish(x, o), {"kv": kv}

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        q, k, v = self._qkv(x3)
        o, kv = recurrence_step(state["kv"], q[:, :, 0], k[:, :, 0], v[:, :, 0], -self.slope_rate.to(x3.dtype))
        y = self._finish(x3, o[:, :, None])
        return (y[:, 0] if squeeze else y), {"kv": kv}

"""Momentum attention and the dual form of attention as gradient descent.

Paper: "Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as
Meta-Optimizers" (Dai, Sun, Dong, Hao, Ma, Sui, Wei; arXiv 2212.10559, ACL Findings 2023).

**Momentum attention** (the paper's MoAttn, by analogy with SGD with momentum), causal position ``t``:

    MoAttn(V, K, q_t) = sum_{i<=t} softmax_i(q_t . k_i / sqrt(d)) v_i  +  sum_{i<t} eta^(t-i) v_i

The second term is an exponential moving average of the *past* values only (``v_t`` excluded; the
newest past value has weight ``eta``), added per head before the output projection. ``eta = 0`` gives
softmax attention exactly.

* Fast form: SDPA for the softmax term, and the EMA by the chunked scan of
  :func:`attnzoo.core.scan.decayed_cumsum` (O(N e), never an ``N x N`` tensor).
* Reference form: the golden softmax reference plus the explicit strictly-lower-triangular matrix
  ``L[t, i] = eta^(t-i)`` (``i < t``) times ``V``.
* Decoding: the EMA needs O(H e) extra state: ``h_t = eta h_{t-1} + v_t`` and the EMA term of the
  next token is ``eta h_t`` (so ``m_1 = 0``, ``m_{t+1} = eta (m_t + v_t)``), plus the usual KV cache.

**Dual form** (:func:`relaxed_linear_attention`, :func:`icl_dual_form`): with softmax and scaling
removed, attention of a query over demonstration tokens ``X'`` and context ``X`` equals a linear layer
``W_ZSL = W_V X (W_K X)^T`` updated by one gradient-descent step whose inputs are ``W_K x'_i`` and
error signals ``W_V x'_i``: ``F(q) = (W_ZSL + sum_i (W_V x'_i) (W_K x'_i)^T) q``. The test suite checks
this identity against an actual ``torch.optim.SGD`` step, to float64 rounding.

Deviations and choices: the paper defines MoAttn for causal self-attention only, and so does this
implementation (no cross or bidirectional variant). The paper does not pin ``eta`` in the text we
could check; ``eta`` is a setting (a float, or one value per head), default 0.1 (our choice: it keeps
the EMA term's weight ``sum eta^k = eta / (1 - eta)`` near 0.11, small next to the attention output).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...core.scan import decayed_cumsum, decayed_step
from ...registry import register
from .softmax import softmax_attention


def _eta(eta: float | Sequence[float] | Tensor, heads: int, like: Tensor) -> Tensor:
    e = torch.as_tensor(eta, dtype=like.dtype, device=like.device)
    if e.dim() == 0:
        e = e.expand(heads)
    if e.shape != (heads,):
        raise ValueError(f"momentum: eta must be a float or have one value per query head ({heads}), got shape {tuple(e.shape)}")
    if not bool(((e >= 0) & (e < 1)).all()):
        raise ValueError(f"momentum: eta must lie in [0, 1), got {e.tolist()}")
    return e


def _zero_padded(v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    if key_padding_mask is None:
        return v
    return v.masked_fill(key_padding_mask[:, None, :, None], 0.0)


def momentum_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eta: float | Sequence[float] | Tensor = 0.1,
    chunk_size: int = 64,
) -> Tensor:
    """Momentum attention (causal self). For ``N < M`` the queries are the last ``N`` positions."""
    n, m = q.shape[2], k.shape[2]
    e = _eta(eta, q.shape[1], q)
    attn = softmax_attention(q, k, v, causal=True, cross=False, key_padding_mask=key_padding_mask)
    _, vv = expand_kv(k, v, q.shape[1])
    ema, _ = decayed_cumsum(_zero_padded(vv, key_padding_mask), e, exclusive=True, chunk=chunk_size)
    return attn + ema[:, :, m - n :]


def momentum_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    eta: float | Sequence[float] | Tensor = 0.1,
    chunk_size: int = 64,
) -> Tensor:
    """Softmax reference plus the explicit ``L[t, i] = eta^(t - i)`` (``i < t``) matrix times ``V``."""
    n, m = q.shape[2], k.shape[2]
    e = _eta(eta, q.shape[1], q)
    attn = reference_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    _, vv = expand_kv(k, v, q.shape[1])
    t = torch.arange(m, device=q.device)
    dist = (t[:, None] - t[None, :]).to(q.dtype)
    lower = t[:, None] > t[None, :]
    L = torch.where(lower, e[:, None, None] ** dist.clamp(min=0), torch.zeros((), dtype=q.dtype))  # (H, M, M)
    ema = torch.matmul(L, _zero_padded(vv, key_padding_mask))
    return attn + ema[:, :, m - n :]


@register(
    "momentum",
    paper="Why Can GPT Learn In-Context? Language Models Implicitly Perform Gradient Descent as Meta-Optimizers",
    arxiv="2212.10559",
    family="softmax",
    capabilities={"causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N^2 d) (softmax) + O(N d) (EMA); decode state O(H d) besides the KV cache",
    functional=momentum_attention,
    reference=momentum_attention_reference,
    defaults={"eta": 0.1, "chunk_size": 64},
    summary="causal softmax attention plus an exponential moving average of past values (SGD-with-momentum analogy)",
    deviations="causal self-attention only, as in the paper; eta default 0.1 is our choice (not given in the paper's text)",
    test_config={"eta": 0.6, "chunk_size": 8},
)
class MomentumAttention(AttentionModule):
    """Multi-head momentum attention; ``eta`` is a float or a per-head sequence."""

    extra_settings = ("num_kv_heads",)

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, **kw) -> None:
        super().__init__(dim, num_heads, causal=causal, **kw)
        _eta(self.settings["eta"], num_heads, torch.zeros(()))  # validate early

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        return {"kv": KVCache(), "h": torch.zeros(batch_size, self.num_heads, self.head_dim, dtype=dtype, device=device)}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("momentum: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype) if state is None else state
        cache: KVCache = state["kv"]
        q, k, v = self.project(x, None)
        keys, values = cache.append(k, v)
        e = _eta(self.settings["eta"], self.num_heads, q)
        attn = softmax_attention(q, keys, values, causal=True, cross=False)
        _, vv = expand_kv(k, v, self.num_heads)
        if x.shape[1] == 1:  # one token: the O(1) recurrence
            ema = (e.view(1, -1, 1) * state["h"])[:, :, None]
            h = decayed_step(state["h"], vv[:, :, 0], e)
        else:
            ema, h = decayed_cumsum(vv, e, exclusive=True, chunk=self.settings["chunk_size"], initial=state["h"])
        state["h"] = h
        return self.out_proj(merge_heads(attn + ema)), state


# -- the dual form: attention as a gradient-descent step (paper section 3) ---------------------------
def relaxed_linear_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``sum_i v_i (k_i . q)``: attention with softmax and scaling removed (the paper's relaxation).

    ``q (..., N, d)``, ``k (..., M, d)``, ``v (..., M, e)`` -> ``(..., N, e)``.
    """
    return torch.matmul(torch.matmul(q, k.transpose(-2, -1)), v)


def icl_dual_form(
    w_k: Tensor, w_v: Tensor, demonstrations: Tensor, context: Tensor
) -> tuple[Tensor, Tensor]:
    """``(W_ZSL, dW_ICL)`` of the paper: ``W_V X (W_K X)^T`` and ``sum_i (W_V x'_i) (W_K x'_i)^T``.

    ``w_k (d_k, d_in)``, ``w_v (d_v, d_in)``, ``demonstrations (M', d_in)``, ``context (M, d_in)``;
    both results are ``(d_v, d_k)`` matrices acting on a query ``q = W_Q x``.
    """
    kx, vx = context @ w_k.T, context @ w_v.T
    kd, vd = demonstrations @ w_k.T, demonstrations @ w_v.T
    return vx.T @ kx, vd.T @ kd


def gradient_descent_step(w0: Tensor, inputs: Tensor, errors: Tensor, lr: float = 1.0) -> nn.Linear:
    """A linear layer with weight ``w0`` after one SGD step that makes its update ``sum_i e_i x_i^T``.

    The loss ``L = -(1/lr) sum_i e_i . (W x_i)`` has ``-lr dL/dW = sum_i e_i x_i^T``: exactly the
    paper's update with error signals ``e_i`` on inputs ``x_i``. Runs a real ``torch.optim.SGD`` step.
    """
    layer = nn.Linear(w0.shape[1], w0.shape[0], bias=False).to(w0.dtype)
    with torch.no_grad():
        layer.weight.copy_(w0)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    loss = -(errors * layer(inputs)).sum() / lr
    opt.zero_grad()
    loss.backward()
    opt.step()
    return layer

"""Momentum attention (arXiv 2212.10559): paper identities, EMA forms, and the ICL dual form."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.scan import decayed_cumsum_loop
from attnzoo.mechanisms.softmax.momentum import (
    gradient_descent_step,
    icl_dual_form,
    momentum_attention,
    momentum_attention_reference,
    relaxed_linear_attention,
)

F64 = torch.float64


def rand(*s):
    return torch.randn(*s, dtype=F64)


def test_eta_zero_is_softmax_attention():
    q, k, v = rand(2, 3, 31, 16), rand(2, 3, 31, 16), rand(2, 3, 31, 16)
    out = az.attention(q, k, v, "momentum", causal=True, eta=0.0)
    ref = az.attention(q, k, v, "softmax", causal=True)
    torch.testing.assert_close(out, ref, atol=1e-13, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_ema_term_is_the_paper_sum_over_past_values(chunk):
    """out - softmax = sum_{i<t} eta^(t-i) v_i, checked against a token loop; chunk size is irrelevant."""
    q, k, v = rand(1, 2, 23, 8), rand(1, 2, 23, 8), rand(1, 2, 23, 8)
    eta = torch.tensor([0.3, 0.9], dtype=F64)
    ema = momentum_attention(q, k, v, causal=True, eta=eta, chunk_size=chunk) - az.attention(q, k, v, "softmax", causal=True)
    expected = torch.zeros_like(v)
    for t in range(23):
        for i in range(t):
            expected[:, :, t] += eta.view(1, 2, 1) ** (t - i) * v[:, :, i]
    torch.testing.assert_close(ema, expected, atol=1e-12, rtol=0)
    # and it equals the scan's exclusive token loop: m_{t+1} = eta (m_t + v_t)
    torch.testing.assert_close(ema, decayed_cumsum_loop(v, eta, exclusive=True), atol=1e-12, rtol=0)


def test_newest_past_value_gets_weight_eta_and_current_value_none():
    v = torch.zeros(1, 1, 4, 1, dtype=F64)
    v[0, 0, 2, 0] = 1.0  # only v_3 (1-indexed) is non-zero
    q = k = torch.zeros(1, 1, 4, 1, dtype=F64)
    ema = momentum_attention(q, k, v, causal=True, eta=0.5) - az.attention(q, k, v, "softmax", causal=True)
    assert ema.flatten().tolist() == [0.0, 0.0, 0.0, 0.5]


def test_reference_and_fast_agree_with_gqa_and_per_head_eta():
    q, k, v = rand(2, 4, 40, 8), rand(2, 2, 40, 8), rand(2, 2, 40, 8)
    eta = [0.1, 0.5, 0.7, 0.95]
    torch.testing.assert_close(
        momentum_attention(q, k, v, eta=eta, chunk_size=7), momentum_attention_reference(q, k, v, eta=eta), atol=1e-11, rtol=0
    )


def test_module_decode_state_is_constant_size_besides_the_cache():
    layer = az.create("momentum", 32, 4, causal=True, eta=0.5).double()
    state = layer.init_state(2)
    for _ in range(5):
        _, state = layer.step(torch.randn(2, 32, dtype=F64), state)
    assert state["h"].shape == (2, 4, 8)
    assert len(state["kv"]) == 5


def test_bad_eta():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="eta"):
        az.attention(q, q, q, "momentum", causal=True, eta=1.0)
    with pytest.raises(ValueError, match="per query head"):
        az.attention(q, q, q, "momentum", causal=True, eta=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="eta"):
        az.create("momentum", 16, 2, causal=True, eta=-0.5)


# -- the dual form (spec section 1a) -------------------------------------------------------------------
def test_relaxed_attention_over_demonstrations_is_one_gradient_descent_step():
    """F_ICL(q) = W_V [X';X] (W_K [X';X])^T q  ==  (W_ZSL + dW_ICL) q  ==  GD-updated linear layer (q)."""
    g = torch.Generator().manual_seed(0)
    d_in, d_k, d_v = 12, 6, 5
    w_k = torch.randn(d_k, d_in, generator=g, dtype=F64)
    w_v = torch.randn(d_v, d_in, generator=g, dtype=F64)
    w_q = torch.randn(d_k, d_in, generator=g, dtype=F64)
    demos = torch.randn(7, d_in, generator=g, dtype=F64)  # X'
    context = torch.randn(4, d_in, generator=g, dtype=F64)  # X
    x_query = torch.randn(3, d_in, generator=g, dtype=F64)
    q = x_query @ w_q.T  # (3, d_k)

    # 1. relaxed linear attention of q over all keys/values [X'; X]
    tokens = torch.cat([demos, context])
    attn = relaxed_linear_attention(q, tokens @ w_k.T, tokens @ w_v.T)

    # 2. the paper's decomposition
    w_zsl, dw_icl = icl_dual_form(w_k, w_v, demos, context)
    torch.testing.assert_close(attn, q @ (w_zsl + dw_icl).T, atol=1e-12, rtol=0)

    # 3. one real SGD step on a linear layer initialised at W_ZSL, inputs W_K x'_i, errors W_V x'_i
    for lr in (1.0, 0.25):
        layer = gradient_descent_step(w_zsl, demos @ w_k.T, demos @ w_v.T, lr=lr)
        with torch.no_grad():
            torch.testing.assert_close(layer(q), attn, atol=1e-12, rtol=0)


def test_dual_form_fails_for_softmax_attention():
    """The identity is specific to the relaxed (linear) form: softmax attention does not satisfy it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=g, dtype=F64) for _ in range(3))
    lin = relaxed_linear_attention(q, k, v)
    soft = az.attention(q, k, v, "softmax")
    assert (lin - soft).abs().max() > 1e-2

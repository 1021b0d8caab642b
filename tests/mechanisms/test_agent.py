"""Agent attention (arXiv 2312.08874): reference == fast, the paper's identities, linear cost.

Tolerances: float64 comparisons at 1e-10 (the forms differ only in the order of sums; a wrong bias,
bin or conv offset shows up at 1e-2 or more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.mechanisms.linear.agent import (
    AgentAttention,
    agent_attention,
    agent_attention_reference,
    agent_attention_with_agents,
)

F64 = torch.float64
TOL = 1e-10


def _qkv(n, m, *, b=2, h=2, d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, length, d, generator=g, dtype=F64) for length in (n, m, m))


def _extras(h, d, n, m, agents, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        agent_bias=torch.randn(1, h, agents, m, generator=g, dtype=F64),
        query_bias=torch.randn(1, h, n, agents, generator=g, dtype=F64),
        dwc_weight=torch.randn(h * d, 1, 3, 3, generator=g, dtype=F64),
        dwc_bias=torch.randn(h * d, generator=g, dtype=F64),
    )


@pytest.mark.parametrize("n", [1, 63, 257])
@pytest.mark.parametrize("cross", [False, True])
def test_fast_matches_reference_sequences(n, cross):
    m = n + 5 if cross else n
    q, k, v = _qkv(n, m)
    for extras in ({}, _extras(2, 60, n, m, 9)):
        kw = dict(cross=cross, num_agents=9, **extras)
        diff = (agent_attention(q, k, v, **kw) - agent_attention_reference(q, k, v, **kw)).abs().max().item()
        assert diff < TOL, (n, cross, sorted(extras), diff)


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (5, 3)])
def test_fast_matches_reference_grids(grid):
    n = grid[0] * grid[1]
    q, k, v = _qkv(n, n)
    kw = dict(num_agents=16, grid=grid, **_extras(2, 60, n, n, 16))
    diff = (agent_attention(q, k, v, **kw) - agent_attention_reference(q, k, v, **kw)).abs().max().item()
    assert diff < TOL, (grid, diff)


def test_implicit_attention_is_row_stochastic_and_gives_the_linear_order_output():
    """Sanity (i)/(ii): softmax(QA^T) softmax(AK^T) has rows summing to 1, rank <= n, and
    materialised times V equals the linear-order fast form (no bias, no DWC)."""
    n, m, agents = 50, 70, 9
    q, k, v = _qkv(n, m)
    out_ref, weights = agent_attention_reference(q, k, v, cross=True, num_agents=agents, return_weights=True)
    assert weights.shape == (2, 2, n, m)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, n, dtype=F64), atol=1e-12, rtol=0)
    assert torch.linalg.matrix_rank(weights[0, 0]).item() <= agents
    fast = agent_attention(q, k, v, cross=True, num_agents=agents)
    torch.testing.assert_close(weights @ v, fast, atol=TOL, rtol=0)
    torch.testing.assert_close(out_ref, fast, atol=TOL, rtol=0)
    # the generalised linear attention phi_q(Q) phi_k(K)^T V with phi from the pooled agents
    pooled = (
        F.adaptive_avg_pool1d(q.reshape(4, n, 60).transpose(1, 2), agents)
        .transpose(1, 2)
        .reshape(2, 2, agents, 60)
    )
    s = 60**-0.5
    phi_q = torch.softmax(q @ pooled.transpose(-1, -2) * s, -1)
    phi_k = torch.softmax(pooled @ k.transpose(-1, -2) * s, -1).transpose(-1, -2)
    torch.testing.assert_close(phi_q @ (phi_k.transpose(-1, -2) @ v), fast, atol=TOL, rtol=0)


def test_permuting_agents_with_their_biases_leaves_output_unchanged():
    """Sanity (iii): the agents are a set; permuting them (with the rows of B1 and columns of B2)
    changes nothing, while permuting the agents alone (biases kept) does change the output."""
    n, m, na = 40, 33, 7
    q, k, v = _qkv(n, m)
    g = torch.Generator().manual_seed(4)
    agents = torch.randn(2, 2, na, 60, generator=g, dtype=F64)
    b1 = torch.randn(1, 2, na, m, generator=g, dtype=F64)
    b2 = torch.randn(1, 2, n, na, generator=g, dtype=F64)
    perm = torch.randperm(na, generator=g)
    base = agent_attention_with_agents(q, k, v, agents, agent_bias=b1, query_bias=b2)
    moved = agent_attention_with_agents(
        q, k, v, agents[:, :, perm], agent_bias=b1[:, :, perm], query_bias=b2[..., perm]
    )
    torch.testing.assert_close(moved, base, atol=TOL, rtol=0)
    wrong = agent_attention_with_agents(q, k, v, agents[:, :, perm], agent_bias=b1, query_bias=b2)
    assert (wrong - base).abs().max() > 1e-3


def test_dwc_branch_is_a_depthwise_conv_of_v():
    """Sanity (iv): the output with DWC minus the output without it is Conv2d(groups=C) of V."""
    grid = (6, 5)
    q, k, v = _qkv(30, 30)
    w = torch.randn(120, 1, 3, 3, dtype=F64)
    with_dwc = agent_attention(q, k, v, num_agents=4, grid=grid, dwc_weight=w)
    without = agent_attention(q, k, v, num_agents=4, grid=grid)
    img = v.permute(0, 1, 3, 2).reshape(2, 120, *grid)
    conv = F.conv2d(img, w, padding=1, groups=120).reshape(2, 2, 60, 30).transpose(-1, -2)
    torch.testing.assert_close(with_dwc - without, conv, atol=TOL, rtol=0)


def test_constant_values_pass_through():
    """Both softmaxes are normalised: if every row of V is the same vector, so is every output row
    (with the agent biases, without the DWC)."""
    q, k, _ = _qkv(25, 25)
    v = torch.randn(2, 2, 1, 60, dtype=F64).expand(2, 2, 25, 60)
    extras = _extras(2, 60, 25, 25, 4)
    out = agent_attention(
        q, k, v, num_agents=4, grid=(5, 5), agent_bias=extras["agent_bias"], query_bias=extras["query_bias"]
    )
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)


def test_cost_is_linear_in_n():
    """FLOPs of the fast form grow 4x when N grows 4x (the materialised reference grows ~16x)."""

    def flops(fn, n):
        q, k, v = (torch.randn(1, 2, n, 32) for _ in range(3))
        with FlopCounterMode(display=False) as counter:
            fn(q, k, v, num_agents=16)
        return counter.get_total_flops()

    fast = flops(agent_attention, 2048) / flops(agent_attention, 512)
    ref = flops(agent_attention_reference, 2048) / flops(agent_attention_reference, 512)
    assert 3.9 < fast < 4.1, fast
    assert ref > 12, ref  # the quadratic form is visibly quadratic: the count can tell them apart


def test_sequence_is_a_one_row_image():
    """One implementation for 1-D and 2-D: a sequence (B, N, C) equals the grid (B, 1, N, C)."""
    torch.manual_seed(0)
    mod = AgentAttention(64, 4, num_agents=5, bias_size=3, bias_window=6).double()
    x = torch.randn(2, 11, 64, dtype=F64)
    torch.testing.assert_close(mod(x), mod(x[:, None])[:, 0], atol=1e-12, rtol=0)


def test_module_2d_fast_matches_reference_and_uses_square_agent_grid():
    torch.manual_seed(0)
    mod = AgentAttention(64, 4, num_agents=9, bias_size=3, bias_window=8).double()
    x = torch.randn(2, 7, 9, 64, dtype=F64)
    y = mod(x)
    mod.impl = "reference"
    torch.testing.assert_close(mod(x), y, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="perfect square"):
        AgentAttention(64, 4, num_agents=8)(torch.randn(1, 4, 4, 64))


def test_module_biases_equal_code_layout_at_native_size():
    """At the native grid (side == bias_window) B1 = resize(an) + ah + aw exactly as the official code builds it."""
    torch.manual_seed(0)
    mod = AgentAttention(32, 2, num_agents=4, bias_size=3, bias_window=5).double()
    b1, b2 = mod.biases((5, 5), (5, 5))
    an = F.interpolate(mod.an_bias, size=(5, 5), mode="bilinear")
    want1 = (an + mod.ah_bias[..., :, None] + mod.aw_bias[..., None, :]).reshape(1, 2, 4, 25)
    torch.testing.assert_close(b1, want1, atol=1e-14, rtol=0)
    na = F.interpolate(mod.na_bias, size=(5, 5), mode="bilinear").reshape(1, 2, 4, 25).transpose(-1, -2)
    want2 = na + (mod.ha_bias[:, :, None, :] + mod.wa_bias[:, None, :, :]).reshape(1, 2, 25, 4)
    torch.testing.assert_close(b2, want2, atol=1e-14, rtol=0)


def test_switches_remove_parameters_and_terms():
    mod = AgentAttention(32, 2, num_agents=4, agent_bias=False, dwc=False)
    names = {n for n, _ in mod.named_parameters()}
    assert not any("bias" in n and "proj" not in n for n in names), names
    assert not any("dwc" in n for n in names), names
    x = torch.randn(1, 10, 32)
    q, k, v = (t for t in mod.project(x, None))
    want = mod.out_proj(agent_attention(q, k, v, num_agents=4).transpose(1, 2).reshape(1, 10, 32))
    torch.testing.assert_close(mod(x), want)


def test_causal_and_padding_are_refused():
    q, k, v = _qkv(8, 8)
    with pytest.raises(az.UnsupportedError):
        az.attention(q, k, v, "agent", causal=True)
    with pytest.raises(az.UnsupportedError):
        az.attention(q, k, v, "agent", key_padding_mask=torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError):
        agent_attention(q, k, v, num_agents=0)
    with pytest.raises(ValueError, match="grid"):
        agent_attention(q, k, v, grid=(3, 3))

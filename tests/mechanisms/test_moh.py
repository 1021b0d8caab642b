"""MoH: gates, load balance, reduction to MHA, fast == explicit summation form, decode.

float64 comparisons use 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az

F64 = torch.float64


def _layer(causal=False, **kw):
    torch.manual_seed(3)
    return az.create("moh", dim=24, num_heads=6, causal=causal, **kw).double()


@pytest.mark.parametrize("gating", ["paper", "code"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_fast_equals_summation_reference(gating, causal, cross):
    layer = _layer(causal, shared_heads=2, top_k=2, gating=gating)
    x = torch.randn(2, 63, 24, dtype=F64)
    ctx = torch.randn(2, 17, 24, dtype=F64) if cross else None
    kpm = torch.rand(2, 17 if cross else 63) < 0.2
    for mask in (None, kpm):
        y = layer(x, context=ctx, key_padding_mask=mask)
        layer.impl = "reference"
        torch.testing.assert_close(layer(x, context=ctx, key_padding_mask=mask), y, atol=1e-10, rtol=0)
        layer.impl = "fast"


@pytest.mark.parametrize("gating", ["paper", "code"])
def test_gate_structure(gating):
    layer = _layer(shared_heads=2, top_k=3, gating=gating)
    x = torch.randn(2, 40, 24, dtype=F64)
    g = layer.gates(x)
    assert g.shape == (2, 40, 6)
    assert (g[..., :2] > 0).all()  # shared heads always on
    assert ((g[..., 2:] != 0).sum(-1) == 3).all()  # exactly top_k routed heads per token
    assert layer.active_head_fraction == pytest.approx(5 / 6)
    alpha = torch.softmax(layer.w_mix(x), -1)
    if gating == "code":
        torch.testing.assert_close(g[..., :2].sum(-1), 2 * alpha[..., 0] * 2, atol=1e-12, rtol=0)
        torch.testing.assert_close(g[..., 2:].sum(-1), 2 * alpha[..., 1] * 3, atol=1e-12, rtol=0)
    else:
        torch.testing.assert_close(g[..., :2].sum(-1), alpha[..., 0], atol=1e-12, rtol=0)
        probs = torch.softmax(layer.w_routed(x), -1)
        top = probs.topk(3, -1).values.sum(-1)
        torch.testing.assert_close(g[..., 2:].sum(-1), alpha[..., 1] * top, atol=1e-12, rtol=0)


def test_all_shared_code_gating_is_mha():
    layer = _layer(shared_heads=6, top_k=0, gating="code")
    with torch.no_grad():
        layer.w_shared.weight.zero_()
    mha = az.create("softmax", dim=24, num_heads=6).double()
    mha.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("w_")})
    x = torch.randn(2, 31, 24, dtype=F64)
    torch.testing.assert_close(layer(x), mha(x), atol=1e-10, rtol=0)


def test_uniform_router_load_balance_equals_k():
    layer = _layer(shared_heads=2, top_k=3)
    with torch.no_grad():
        layer.w_routed.weight.zero_()
    layer(torch.randn(2, 20, 24, dtype=F64))
    assert layer.load_balance_loss.item() == pytest.approx(3.0, abs=1e-12)
    assert layer.head_load.sum().item() == pytest.approx(3.0, abs=1e-12)


def test_load_balance_loss_is_differentiable():
    layer = _layer(shared_heads=1, top_k=2)
    y = layer(torch.randn(2, 20, 24, dtype=F64))
    (y.square().mean() + 0.01 * layer.load_balance_loss).backward()
    assert layer.w_routed.weight.grad is not None and layer.w_routed.weight.grad.abs().sum() > 0
    assert layer.load_balance_loss.item() >= 0


def test_unselected_heads_do_not_matter():
    layer = _layer(shared_heads=2, top_k=1)
    x = torch.randn(1, 1, 24, dtype=F64)
    ctx = torch.randn(1, 10, 24, dtype=F64)
    y = layer(x, context=ctx)
    g = layer.last_gates[0]
    unused = [h for h in range(2, 6) if (g[:, h] == 0).all()]
    assert len(unused) == 3  # one query token, top_k=1 of 4 routed heads
    with torch.no_grad():  # change the value projection of an unused head: outputs unchanged
        d = layer.head_dim
        layer.v_proj.weight[unused[0] * d : (unused[0] + 1) * d] += 1.0
    torch.testing.assert_close(layer(x, context=ctx), y, atol=1e-12, rtol=0)


def test_decode_equals_forward():
    layer = _layer(causal=True, shared_heads=2, top_k=2)
    x = torch.randn(2, 21, 24, dtype=F64)
    full = layer(x)
    y, state = layer.prefill(x[:, :5])
    outs = [y]
    for t in range(5, 21):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)


def test_spatial():
    layer = _layer(shared_heads=3, top_k=1)
    x = torch.randn(2, 7, 9, 24, dtype=F64)
    y = layer(x)
    assert y.shape == x.shape
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer(x.reshape(2, 63, 24)).reshape(2, 7, 9, 24), y, atol=1e-10, rtol=0)


def test_functional_gates_and_errors():
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=F64) for _ in range(3))
    g = torch.rand(2, 9, 4, dtype=F64)
    out = az.attention(q, k, v, mechanism="moh", gates=g)
    base = az.attention(q, k, v, mechanism="softmax")
    torch.testing.assert_close(out, base * g.transpose(1, 2)[..., None], atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        az.attention(q, k, v, mechanism="moh", gates=g[:, :3])
    with pytest.raises(ValueError):
        az.create("moh", dim=24, num_heads=6, shared_heads=2, top_k=5)
    with pytest.raises(ValueError):
        az.create("moh", dim=24, num_heads=6, gating="magic")

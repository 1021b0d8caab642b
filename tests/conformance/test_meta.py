"""The conformance checks can fail: each is run on a deliberately broken mechanism and must raise.

Each fake is softmax attention with one defect; it is put in the registry only for the duration of
its test (``monkeypatch``), so the real registry is untouched.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnzoo import registry
from attnzoo.core.layout import merge_heads
from attnzoo.mechanisms.softmax.softmax import (
    SoftmaxAttention,
    softmax_attention,
    softmax_attention_reference,
)

from . import checks

SOFTMAX = registry.get("softmax")


def fake(monkeypatch, name, module=SoftmaxAttention, **changes):
    """A copy of the softmax spec named ``name`` with ``changes``, registered for this test only."""
    spec = dataclasses.replace(SOFTMAX, name=name, module=None, **changes)
    cls = type(f"Fake_{name}", (module,), {"spec": spec})
    spec = dataclasses.replace(spec, module=cls)
    cls.spec = spec
    monkeypatch.setitem(registry._REGISTRY, name, spec)
    return spec


def leaky(q, k, v, *, causal=False, cross=False, key_padding_mask=None, **kw):
    return softmax_attention(q, k, v, causal=False, cross=cross, key_padding_mask=key_padding_mask, **kw)


def test_future_leak_is_caught(monkeypatch):
    spec = fake(monkeypatch, "leaky", functional=leaky, reference=leaky)
    with pytest.raises(AssertionError, match="future leak"):
        checks.check_no_future_leak(spec, "causal_self")
    with pytest.raises(AssertionError, match="future leak"):
        checks.check_functional_no_future_leak(spec, "causal_self")


class WrongStep(SoftmaxAttention):
    def step(self, x_t, state):
        y, state = super().step(x_t, state)
        return y * 1.001, state


def test_decode_mismatch_is_caught(monkeypatch):
    spec = fake(monkeypatch, "wrong_step", module=WrongStep)
    with pytest.raises(AssertionError, match="differs from the full forward"):
        checks.check_decode(spec)


class StaleState(SoftmaxAttention):
    def prefill(self, x, state=None):
        y, state = super().prefill(x, state)
        state["count"] = x.shape[1]  # wrong: should accumulate
        return y, state

    def init_state(self, batch_size, **kw):
        return {**super().init_state(batch_size, **kw), "count": 0}


def test_state_mismatch_is_caught(monkeypatch):
    spec = fake(monkeypatch, "stale_state", module=StaleState)
    with pytest.raises(AssertionError, match="final state"):
        checks.check_decode(spec)


def ignores_padding(q, k, v, *, causal=False, cross=False, key_padding_mask=None, **kw):
    return softmax_attention(q, k, v, causal=causal, cross=cross, key_padding_mask=None, **kw)


def test_ignored_padding_is_caught(monkeypatch):
    spec = fake(monkeypatch, "no_padding", functional=ignores_padding)
    with pytest.raises(AssertionError, match="padded keys"):
        checks.check_key_padding(spec, "noncausal_self")


def off_by_scale(q, k, v, *, causal=False, cross=False, key_padding_mask=None, scale=None, **kw):
    s = 1.01 / q.shape[-1] ** 0.5
    return softmax_attention_reference(q, k, v, causal=causal, cross=cross, key_padding_mask=key_padding_mask, scale=s, **kw)


def test_fast_reference_mismatch_is_caught(monkeypatch):
    spec = fake(monkeypatch, "off_scale", reference=off_by_scale)
    with pytest.raises(AssertionError, match="differs from the reference"):
        checks.check_functional_matches_reference(spec, "noncausal_self")
    with pytest.raises(AssertionError, match="differs from the reference"):
        checks.check_module_matches_reference(spec, "noncausal_self")


def batch_mixing(q, k, v, *, causal=False, cross=False, key_padding_mask=None, **kw):
    out = softmax_attention(q, k, v, causal=causal, cross=cross, key_padding_mask=key_padding_mask, **kw)
    return out - out.mean(dim=0, keepdim=True) * 0.1


def test_batch_mixing_is_caught(monkeypatch):
    spec = fake(monkeypatch, "batch_mix", functional=batch_mixing)
    with pytest.raises(AssertionError, match="depends on the others"):
        checks.check_batch_independence(spec, "noncausal_self")


def noisy(q, k, v, *, causal=False, cross=False, key_padding_mask=None, **kw):
    import random  # Python's generator: not governed by torch's seed

    out = softmax_attention(q, k, v, causal=causal, cross=cross, key_padding_mask=key_padding_mask, **kw)
    return out + 1e-3 * random.random()


class Drifting(SoftmaxAttention):
    """Mutates hidden state on every forward, even in eval mode."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x, context=None, key_padding_mask=None):
        self.calls += 1
        return super().forward(x, context, key_padding_mask) * (1 + 1e-3 * self.calls)


def test_nondeterminism_is_caught(monkeypatch):
    spec = fake(monkeypatch, "noisy", functional=noisy)
    with pytest.raises(AssertionError, match="differ"):
        checks.check_determinism(spec, "noncausal_self")
    spec = fake(monkeypatch, "drifting", module=Drifting)
    with pytest.raises(AssertionError, match="differ"):
        checks.check_determinism(spec, "noncausal_self")


def masks_source(q, k, v, *, causal=False, cross=False, key_padding_mask=None, **kw):
    # the bug of benchmarks.md 6.1: a causal mask applied to the cross-attention source
    return softmax_attention(q, k, v, causal=causal, cross=False, key_padding_mask=key_padding_mask, **kw)


def test_masked_source_is_caught(monkeypatch):
    spec = fake(monkeypatch, "masked_source", functional=masks_source)
    with pytest.raises(AssertionError, match="does not depend on source"):
        checks.check_cross_sees_source(spec, "causal_cross")


class UnusedParam(SoftmaxAttention):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.extra = torch.nn.Parameter(torch.zeros(3))


def test_unused_parameter_is_caught(monkeypatch):
    spec = fake(monkeypatch, "unused_param", module=UnusedParam)
    with pytest.raises(AssertionError, match="got no gradient"):
        checks.check_gradients(spec, "noncausal_self")


class Unchecked(SoftmaxAttention):
    def forward(self, x, context=None, key_padding_mask=None):  # skips the capability check
        q, k, v = self.project(x, context)
        return self.out_proj(merge_heads(softmax_attention(q, k, v)))


def test_silent_unsupported_pattern_is_caught(monkeypatch):
    caps = SOFTMAX.capabilities - {"noncausal_cross", "causal_cross"}
    spec = fake(monkeypatch, "unchecked", module=Unchecked, capabilities=caps)
    with pytest.raises(pytest.fail.Exception):
        checks.check_unsupported(spec)


def test_unsupported_error_names_everything():
    spec = dataclasses.replace(SOFTMAX, name="selfonly", capabilities=frozenset({"noncausal_self"}))
    with pytest.raises(Exception) as info:
        spec.require("causal_cross")
    msg = str(info.value)
    assert "selfonly" in msg and "causal_cross" in msg and "softmax" in msg

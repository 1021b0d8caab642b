"""The conformance checks, as plain functions of a :class:`~attnzoo.registry.Mechanism` spec.

``test_conformance.py`` runs them over every registered mechanism, driven by its declared
capabilities; ``test_meta.py`` runs them over deliberately broken mechanisms to prove that each
check can fail. Nothing here names a particular mechanism.

Tolerances: float64 comparisons use ``atol = 1e-9`` (the fast forms reorder sums; rounding of O(1)
inputs stays near 1e-14 at these sizes, while a real bug shows up at 1e-3 or more); "unchanged"
checks (no leakage, padding, batch independence) use ``1e-10``.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import attnzoo as az
from attnzoo.core.module import state_tensors
from attnzoo.registry import PATTERNS, Mechanism

F64 = torch.float64
TOL_EQ = 1e-10
TOL_REF = 1e-9
HEADS = 2
HEAD_DIM = 60
DIM = HEADS * HEAD_DIM


def is_causal(pattern: str) -> bool:
    return pattern.startswith("causal")


def is_cross(pattern: str) -> bool:
    return pattern.endswith("cross")


def functional_params(spec: Mechanism) -> dict:
    """The test settings that the functional accepts."""
    if spec.functional is None:
        return {}
    sig = inspect.signature(spec.functional).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    return {k: v for k, v in spec.test_config.items() if var_kw or k in sig}


def build(spec: Mechanism, causal: bool, dtype=F64, seed: int = 0, **extra):
    torch.manual_seed(seed)
    m = spec.module(DIM, HEADS, causal=causal, **{**spec.test_config, **extra})
    return m.to(dtype).eval()


def qkv(n: int, m: int, *, b: int = 2, h: int = HEADS, hkv: int | None = None, d: int = HEAD_DIM, dtype=F64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hkv = h if hkv is None else hkv
    q = torch.randn(b, h, n, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, m, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, m, d, generator=g, dtype=dtype)
    return q, k, v


def tokens(b: int, n: int, dtype=F64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=dtype)


def run_module(m, x, pattern: str, context=None, key_padding_mask=None):
    if is_cross(pattern):
        return m(x, context=context, key_padding_mask=key_padding_mask)
    return m(x, key_padding_mask=key_padding_mask)


def cross_len(n: int) -> int:
    """A source length different from ``n`` for cross patterns."""
    return n + 5 if n < 100 else n - 50


# ---------------------------------------------------------------------------------------------------
def check_functional_shapes(spec: Mechanism, pattern: str, n: int, dtype=torch.float32) -> None:
    m = cross_len(n) if is_cross(pattern) else n
    q, k, v = qkv(n, m, dtype=dtype)
    out = az.attention(q, k, v, spec.name, causal=is_causal(pattern), cross=is_cross(pattern), **functional_params(spec))
    assert out.shape == (2, HEADS, n, HEAD_DIM), f"{spec.name}/{pattern}: output {tuple(out.shape)} for N={n}, M={m}"
    assert out.dtype == dtype, f"{spec.name}/{pattern}: output dtype {out.dtype}, input {dtype}"
    assert torch.isfinite(out).all(), f"{spec.name}/{pattern}: non-finite output at N={n}"


def check_functional_gqa(spec: Mechanism, pattern: str) -> None:
    """k/v with fewer heads than q are accepted and mean 'repeat each kv head'."""
    n = 19
    m = cross_len(n) if is_cross(pattern) else n
    q, k, v = qkv(n, m, h=4, hkv=2)
    kw = dict(causal=is_causal(pattern), cross=is_cross(pattern), **functional_params(spec))
    out = az.attention(q, k, v, spec.name, **kw)
    full = az.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), spec.name, **kw)
    torch.testing.assert_close(out, full, atol=TOL_EQ, rtol=0, msg=f"{spec.name}/{pattern}: GQA != repeated kv heads")


def check_module_shapes(spec: Mechanism, pattern: str, n: int, dtype=torch.float32) -> None:
    mod = build(spec, is_causal(pattern), dtype=dtype)
    x = tokens(2, n, dtype=dtype)
    ctx = tokens(2, cross_len(n), dtype=dtype, seed=2) if is_cross(pattern) else None
    y = run_module(mod, x, pattern, ctx)
    assert y.shape == x.shape, f"{spec.name}/{pattern}: module output {tuple(y.shape)} for input {tuple(x.shape)}"
    assert y.dtype == dtype and torch.isfinite(y).all(), f"{spec.name}/{pattern}: bad dtype or non-finite output"


def check_no_future_leak(spec: Mechanism, pattern: str, n: int = 40, t: int = 21) -> None:
    """Perturbing token t (and everything after it) leaves every output before t unchanged."""
    mod = build(spec, True)
    x = tokens(1, n)
    ctx = tokens(1, cross_len(n), seed=2) if is_cross(pattern) else None
    with torch.no_grad():
        y = run_module(mod, x, pattern, ctx)
        x2 = x.clone()
        x2[:, t:] += 3.0 * tokens(1, n - t, seed=7)
        y2 = run_module(mod, x2, pattern, ctx)
    diff = (y[:, :t] - y2[:, :t]).abs().max().item()
    assert diff <= TOL_EQ, f"{spec.name}/{pattern}: output before t={t} changed by {diff:.3e} when tokens >= t changed (future leak)"
    changed = (y[:, t:] - y2[:, t:]).abs().max().item()
    assert changed > 1e-6, f"{spec.name}/{pattern}: outputs from t on ignore the perturbed tokens (diff {changed:.2e})"


def check_functional_no_future_leak(spec: Mechanism, pattern: str, n: int = 40, t: int = 21) -> None:
    m = cross_len(n) if is_cross(pattern) else n
    q, k, v = qkv(n, m, b=1)
    kw = dict(causal=True, cross=is_cross(pattern), **functional_params(spec))
    out = az.attention(q, k, v, spec.name, **kw)
    q2 = q.clone()
    q2[:, :, t:] += 3.0
    k2, v2 = k.clone(), v.clone()
    if not is_cross(pattern):  # in cross attention the source is never masked
        k2[:, :, t:] -= 2.0
        v2[:, :, t:] += 5.0
    out2 = az.attention(q2, k2, v2, spec.name, **kw)
    diff = (out[:, :, :t] - out2[:, :, :t]).abs().max().item()
    assert diff <= TOL_EQ, f"{spec.name}/{pattern}: functional output before t={t} changed by {diff:.3e} (future leak)"


def check_cross_sees_source(spec: Mechanism, pattern: str, n: int = 12) -> None:
    """Every query position depends on every source position (the source is never masked)."""
    mod = build(spec, is_causal(pattern))
    x = tokens(1, n)
    ctx = tokens(1, cross_len(n), seed=2).requires_grad_(True)
    y = run_module(mod, x, pattern, ctx)
    for i in (0, n // 2, n - 1):
        (g,) = torch.autograd.grad(y[0, i].sum(), ctx, retain_graph=True)
        dead = (g[0].abs().sum(-1) == 0).nonzero().flatten().tolist()
        assert not dead, f"{spec.name}/{pattern}: output {i} does not depend on source positions {dead} (masked source?)"


def check_decode(spec: Mechanism, n: int = 14, prefill: int = 5) -> None:
    """``step`` token by token after an odd prefill == full forward; final states agree."""
    mod = build(spec, True)
    x = tokens(2, n)
    with torch.no_grad():
        full = mod(x)
        y0, state = mod.prefill(x[:, :prefill])
        outs = [y0]
        for t in range(prefill, n):
            yt, state = mod.step(x[:, t], state)
            assert yt.shape == (2, DIM), f"{spec.name}: step output {tuple(yt.shape)}, expected (2, {DIM})"
            outs.append(yt[:, None])
        stepped = torch.cat(outs, dim=1)
        _, state_full = mod.prefill(x)
        # (B, 1, C) input gives (B, 1, C) output
        y1, _ = mod.step(x[:, :1], mod.prefill(x[:, :prefill])[1])
        assert y1.shape == (2, 1, DIM), f"{spec.name}: step on (B, 1, C) returned {tuple(y1.shape)}"
    diff = (stepped - full).abs().max().item()
    assert diff <= TOL_REF, f"{spec.name}: prefill({prefill}) + step differs from the full forward by {diff:.3e}"
    a, b = state_tensors(state), state_tensors(state_full)
    assert a.keys() == b.keys(), f"{spec.name}: stepped state has entries {sorted(a)}, prefilled state {sorted(b)}"
    for key in a:
        assert a[key].shape == b[key].shape, f"{spec.name}: state {key}: shape {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
        d = (a[key].to(F64) - b[key].to(F64)).abs().max().item() if a[key].numel() else 0.0
        assert d <= TOL_REF, f"{spec.name}: final state {key} differs between stepping and prefill by {d:.3e}"


def check_key_padding(spec: Mechanism, pattern: str, n: int = 23, pad: int = 6) -> None:
    """Padded keys (filled with large garbage) change nothing.

    Right padding for non-causal patterns and causal cross; left padding for causal self (the real
    tokens keep their relative positions).
    """
    cross, causal = is_cross(pattern), is_causal(pattern)
    m = cross_len(n) if cross else n
    q, k, v = qkv(n, m)
    g = torch.Generator().manual_seed(5)
    garbage = lambda t: 10.0 * torch.randn(t.shape[0], t.shape[1], pad, t.shape[3], generator=g, dtype=t.dtype)  # noqa: E731
    left = causal and not cross
    cat = (lambda t: torch.cat([garbage(t), t], 2)) if left else (lambda t: torch.cat([t, garbage(t)], 2))
    kp, vp = cat(k), cat(v)
    qp = q if cross else cat(q)
    mask = torch.zeros(2, m + pad, dtype=torch.bool)
    if left:
        mask[:, :pad] = True
    else:
        mask[:, m:] = True
    kw = dict(causal=causal, cross=cross, **functional_params(spec))
    if spec.functional is not None:
        out_p = az.attention(qp, kp, vp, spec.name, key_padding_mask=mask, **kw)
        out = az.attention(q, k, v, spec.name, **kw)
        rows = out_p if cross else (out_p[:, :, pad:] if left else out_p[:, :, :n])
        diff = (rows - out).abs().max().item()
        assert diff <= TOL_REF, f"{spec.name}/{pattern}: padded keys changed the output by {diff:.3e}"
    # the module as well
    mod = build(spec, causal)
    x = tokens(2, n)
    gx = 10.0 * torch.randn(2, pad, DIM, generator=g, dtype=F64)
    with torch.no_grad():
        if cross:
            ctx = tokens(2, m, seed=2)
            y = mod(x, context=ctx)
            yp = mod(x, context=torch.cat([ctx, gx], 1), key_padding_mask=mask)
        else:
            xp = torch.cat([gx, x], 1) if left else torch.cat([x, gx], 1)
            y = mod(x)
            yp = mod(xp, key_padding_mask=mask)
            yp = yp[:, pad:] if left else yp[:, :n]
    diff = (yp - y).abs().max().item()
    assert diff <= TOL_REF, f"{spec.name}/{pattern}: padded keys changed the module output by {diff:.3e}"


def check_batch_independence(spec: Mechanism, pattern: str, n: int = 17) -> None:
    mod = build(spec, is_causal(pattern))
    x = tokens(3, n)
    ctx = tokens(3, cross_len(n), seed=2) if is_cross(pattern) else None
    with torch.no_grad():
        y = run_module(mod, x, pattern, ctx)
        for b in range(3):
            yb = run_module(mod, x[b : b + 1], pattern, None if ctx is None else ctx[b : b + 1])
            diff = (yb - y[b : b + 1]).abs().max().item()
            assert diff <= TOL_EQ, f"{spec.name}/{pattern}: batch element {b} depends on the others (diff {diff:.3e})"


def check_determinism(spec: Mechanism, pattern: str, n: int = 17) -> None:
    outs = []
    for _ in range(2):
        mod = build(spec, is_causal(pattern), dtype=torch.float32, seed=123)
        x = tokens(2, n, dtype=torch.float32)
        ctx = tokens(2, cross_len(n), dtype=torch.float32, seed=2) if is_cross(pattern) else None
        with torch.no_grad():
            outs.append(run_module(mod, x, pattern, ctx))
            again = run_module(mod, x, pattern, ctx)
        assert torch.equal(outs[-1], again), f"{spec.name}/{pattern}: two calls of one module (eval mode) differ"
    assert torch.equal(outs[0], outs[1]), f"{spec.name}/{pattern}: two runs with the same seed differ"


def check_gradients(spec: Mechanism, pattern: str, n: int = 19) -> None:
    mod = build(spec, is_causal(pattern), dtype=torch.float32).train()
    x = tokens(2, n, dtype=torch.float32).requires_grad_(True)
    ctx = tokens(2, cross_len(n), dtype=torch.float32, seed=2).requires_grad_(True) if is_cross(pattern) else None
    y = run_module(mod, x, pattern, ctx)
    loss = y.square().mean()
    loss.backward()
    inputs = [("x", x)] + ([("context", ctx)] if ctx is not None else [])
    for name, t in inputs:
        assert t.grad is not None and torch.isfinite(t.grad).all(), f"{spec.name}/{pattern}: gradient of {name} missing or non-finite"
        assert t.grad.abs().sum() > 0, f"{spec.name}/{pattern}: gradient of {name} is zero"
    for pname, p in mod.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"{spec.name}/{pattern}: parameter {pname} got no gradient (unused in this pattern?)"
        assert torch.isfinite(p.grad).all(), f"{spec.name}/{pattern}: parameter {pname} has a non-finite gradient"


def check_functional_matches_reference(spec: Mechanism, pattern: str) -> None:
    cross = is_cross(pattern)
    for n in (1, 37, 70):
        m = cross_len(n) if cross else n
        q, k, v = qkv(n, m)
        kw = dict(causal=is_causal(pattern), cross=cross, key_padding_mask=None, **functional_params(spec))
        fast = spec.functional(q, k, v, **kw)
        ref = spec.reference(q, k, v, **kw)
        diff = (fast - ref).abs().max().item()
        assert diff <= TOL_REF, f"{spec.name}/{pattern}: fast form differs from the reference by {diff:.3e} at N={n}, M={m}"
        if spec.supports("key_padding_mask"):
            mask = torch.zeros(2, m, dtype=torch.bool)
            mask[0, m // 3 :: 2] = True
            kw["key_padding_mask"] = mask
            diff = (spec.functional(q, k, v, **kw) - spec.reference(q, k, v, **kw)).abs().max().item()
            assert diff <= TOL_REF, f"{spec.name}/{pattern}: with a padding mask the fast form differs by {diff:.3e}"


def check_module_matches_reference(spec: Mechanism, pattern: str, n: int = 45) -> None:
    mod = build(spec, is_causal(pattern))
    x = tokens(2, n)
    ctx = tokens(2, cross_len(n), seed=2) if is_cross(pattern) else None
    with torch.no_grad():
        mod.impl = "fast"
        fast = run_module(mod, x, pattern, ctx)
        mod.impl = "reference"
        ref = run_module(mod, x, pattern, ctx)
    diff = (fast - ref).abs().max().item()
    assert diff <= TOL_REF, f"{spec.name}/{pattern}: module fast form differs from the reference form by {diff:.3e}"


def check_spatial(spec: Mechanism, shape: tuple[int, int]) -> None:
    """2-D grids: shape and dtype kept; fast == reference in float64; batch independence."""
    mod = build(spec, False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *shape, DIM, generator=g, dtype=F64)
    with torch.no_grad():
        mod.impl = "fast"
        y = mod(x)
        mod.impl = "reference"
        r = mod(x)
        mod.impl = "fast"
        y0 = mod(x[:1])
    assert y.shape == x.shape, f"{spec.name}: grid {tuple(x.shape)} gave {tuple(y.shape)}"
    assert torch.isfinite(y).all(), f"{spec.name}: non-finite output on grid {shape}"
    diff = (y - r).abs().max().item()
    assert diff <= TOL_REF, f"{spec.name}: spatial fast form differs from the reference by {diff:.3e} on grid {shape}"
    diff = (y0 - y[:1]).abs().max().item()
    assert diff <= TOL_EQ, f"{spec.name}: spatial batch element depends on the others ({diff:.3e})"


# ---------------------------------------------------------------------------------------------------
def check_unsupported(spec: Mechanism) -> None:
    """Undeclared capabilities raise UnsupportedError naming mechanism, capability and supporters."""

    def expect(capability: str, fn) -> None:
        with pytest.raises(az.UnsupportedError) as info:
            fn()
        msg = str(info.value)
        assert spec.name in msg and capability in msg, f"{spec.name}: unclear UnsupportedError message: {msg}"
        supporters = az.list_mechanisms(capability=capability)
        assert all(s in msg for s in supporters), f"{spec.name}: message does not list supporters {supporters}: {msg}"

    for pattern in PATTERNS:
        if spec.supports(pattern):
            continue
        n = 8
        m = cross_len(n) if is_cross(pattern) else n
        if spec.functional is not None:
            q, k, v = qkv(n, m, dtype=torch.float32)
            expect(pattern, lambda: az.attention(q, k, v, spec.name, causal=is_causal(pattern), cross=is_cross(pattern)))

        def module_call():
            mod = build(spec, is_causal(pattern), dtype=torch.float32)
            ctx = tokens(2, m, dtype=torch.float32) if is_cross(pattern) else None
            run_module(mod, tokens(2, n, dtype=torch.float32), pattern, ctx)

        cap = pattern
        # building a causal module for a mechanism with no causal pattern at all fails at construction
        if is_causal(pattern) and not (spec.supports("causal_self") or spec.supports("causal_cross")):
            cap = "causal_self"
        elif not is_causal(pattern) and not (spec.supports("noncausal_self") or spec.supports("noncausal_cross")) and not spec.supports("spatial"):
            cap = "noncausal_self"
        expect(cap, module_call)
    if not spec.supports("decode"):
        causal = spec.supports("causal_self") or spec.supports("causal_cross")
        mod = build(spec, causal, dtype=torch.float32)
        expect("decode", lambda: mod.init_state(2))
    if not spec.supports("spatial"):
        pattern = spec.patterns[0]
        mod = build(spec, is_causal(pattern), dtype=torch.float32)
        expect("spatial", lambda: mod(torch.randn(2, 4, 4, DIM)))
    if not spec.supports("key_padding_mask") and spec.patterns:
        pattern = spec.patterns[0]
        n = 8
        m = cross_len(n) if is_cross(pattern) else n
        mask = torch.zeros(2, m, dtype=torch.bool)
        if spec.functional is not None:
            q, k, v = qkv(n, m, dtype=torch.float32)
            expect(
                "key_padding_mask",
                lambda: az.attention(q, k, v, spec.name, causal=is_causal(pattern), cross=is_cross(pattern), key_padding_mask=mask),
            )
        mod = build(spec, is_causal(pattern), dtype=torch.float32)
        ctx = tokens(2, m, dtype=torch.float32) if is_cross(pattern) else None
        expect("key_padding_mask", lambda: run_module(mod, tokens(2, n, dtype=torch.float32), pattern, ctx, mask))


def bad_functional_inputs(n: int = 8):
    """(label, q, k, v, key_padding_mask, expected exception) for the functional form."""
    f = torch.float32
    r = lambda *s: torch.randn(*s, dtype=f)  # noqa: E731
    return [
        ("3-D q", r(2, n, 16), r(2, 2, n, 16), r(2, 2, n, 16), None, ValueError),
        ("5-D k", r(2, 2, n, 16), r(2, 2, n, 16, 1), r(2, 2, n, 16), None, ValueError),
        ("heads not a multiple", r(2, 3, n, 16), r(2, 2, n, 16), r(2, 2, n, 16), None, ValueError),
        ("k/v heads differ", r(2, 2, n, 16), r(2, 2, n, 16), r(2, 1, n, 16), None, ValueError),
        ("q/k dims differ", r(2, 2, n, 16), r(2, 2, n, 8), r(2, 2, n, 16), None, ValueError),
        ("k/v lengths differ", r(2, 2, n, 16), r(2, 2, n, 16), r(2, 2, n + 1, 16), None, ValueError),
        ("batch differs", r(2, 2, n, 16), r(3, 2, n, 16), r(3, 2, n, 16), None, ValueError),
        ("integer q", torch.ones(2, 2, n, 16, dtype=torch.long), r(2, 2, n, 16), r(2, 2, n, 16), None, TypeError),
        ("mixed dtypes", r(2, 2, n, 16), r(2, 2, n, 16).double(), r(2, 2, n, 16), None, TypeError),
        ("empty sequence", r(2, 2, 0, 16), r(2, 2, 0, 16), r(2, 2, 0, 16), None, ValueError),
        ("not a tensor", [[1.0]], r(2, 2, n, 16), r(2, 2, n, 16), None, TypeError),
        ("float padding mask", r(2, 2, n, 16), r(2, 2, n, 16), r(2, 2, n, 16), torch.zeros(2, n), TypeError),
        ("padding mask wrong shape", r(2, 2, n, 16), r(2, 2, n, 16), r(2, 2, n, 16), torch.zeros(2, n + 3, dtype=torch.bool), ValueError),
    ]


def check_bad_functional_input(spec: Mechanism, case) -> None:
    label, q, k, v, mask, exc = case
    pattern = spec.patterns[0]
    with pytest.raises(exc) as info:
        az.attention(q, k, v, spec.name, causal=is_causal(pattern), cross=is_cross(pattern), key_padding_mask=mask)
    assert spec.name in str(info.value), f"{spec.name}: error for {label} does not name the mechanism: {info.value}"


def check_bad_module_inputs(spec: Mechanism) -> None:
    pattern = spec.patterns[0] if spec.patterns else None
    causal = is_causal(pattern) if pattern else False
    mod = build(spec, causal, dtype=torch.float32)
    cases = [
        ("wrong width", torch.randn(2, 8, DIM + 1), ValueError),
        ("2-D input", torch.randn(8, DIM), ValueError),
        ("integer input", torch.ones(2, 8, DIM, dtype=torch.long), TypeError),
        ("empty sequence", torch.randn(2, 0, DIM), ValueError),
    ]
    for _label, x, exc in cases:
        with pytest.raises(exc):
            mod(x)
    if pattern and is_cross(pattern):
        with pytest.raises(ValueError):
            mod(torch.randn(2, 8, DIM), context=torch.randn(3, 8, DIM))
    with pytest.raises(TypeError):
        spec.module(DIM, HEADS, causal=causal, no_such_setting=1)
    with pytest.raises(ValueError):
        spec.module(DIM, 7, causal=causal)  # 120 is not divisible by 7

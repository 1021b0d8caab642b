"""Titans long-term memory (arXiv 2501.00663): chunk-parallel == token loop, b = 1 == the sequential
rule, the delta-rule and mini-batch identities, decoding, gradients, and the MAG/MAL/LMM layers.

Tolerances: float64 comparisons at 1e-10 (the chunk-parallel form reorders sums of O(1) terms;
observed differences are ~1e-14, a wrong coefficient or gradient is off by 1e-3 or more).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.module import state_tensors
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.linear.titans import (
    TitansAttention,
    default_memory_init,
    memory_apply,
    memory_dims,
    titans_memory,
    titans_memory_reference,
    window_attention,
    window_attention_reference,
)

F64 = torch.float64
TOL = 1e-10


def _inputs(n, *, b=2, h=2, d=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))
    theta = 0.02 * torch.rand(b, h, n, generator=g, dtype=F64)
    eta = torch.rand(b, h, n, generator=g, dtype=F64)
    alpha = 0.1 * torch.rand(b, h, n, generator=g, dtype=F64)
    return q, k, v, dict(theta=theta, eta=eta, alpha=alpha)


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------
# the memory rule
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 63, 257])
@pytest.mark.parametrize("chunk", [1, 16])
def test_chunk_parallel_matches_token_loop(n, chunk):
    """The chunk-parallel (dual) form == the token-by-token loop with autograd gradients at M_{t'}."""
    q, k, v, gates = _inputs(n)
    kw = dict(chunk_size=chunk, memory_depth=2, memory_expansion=1, **gates)
    diff = (titans_memory(q, k, v, **kw) - titans_memory_reference(q, k, v, **kw)).abs().max().item()
    assert diff < TOL, diff


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("chunk", [3, 8])
@pytest.mark.parametrize("momentum,forgetting", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("retrieve", ["current", "previous_chunk"])
def test_chunk_parallel_matches_token_loop_all_options(depth, chunk, momentum, forgetting, retrieve):
    q, k, v, gates = _inputs(29, d=12, seed=3)
    kw = dict(
        chunk_size=chunk,
        memory_depth=depth,
        memory_expansion=2,
        momentum=momentum,
        forgetting=forgetting,
        retrieve=retrieve,
        **gates,
    )
    out = titans_memory(q, k, v, **kw)
    assert out.abs().max() > 1e-3  # the memory is not trivially empty
    diff = (out - titans_memory_reference(q, k, v, **kw)).abs().max().item()
    assert diff < TOL, diff


def _sequential_rule(q, k, v, theta, eta, alpha, init):
    """Written independently of the library: per token, gradient at M_{t-1} by autograd (no chunks),
    S_t = eta S - theta grad, M_t = (1 - alpha) M + S, y_t = M_t(q_t)."""
    q, k = _unit(q), _unit(k)
    b, h, n, _ = q.shape
    mem = [w.expand(b, h, *w.shape[-2:]).clone() for w in init]
    mom = [torch.zeros_like(w) for w in mem]
    ys = []
    for t in range(n):
        leaf = [w.detach().requires_grad_(True) for w in mem]
        with torch.enable_grad():
            out = k[:, :, t : t + 1]
            for i, w in enumerate(leaf):
                out = out @ w
                if i < len(leaf) - 1:
                    out = torch.nn.functional.silu(out)
            loss = ((out - v[:, :, t : t + 1]) ** 2).sum()
            grads = torch.autograd.grad(loss, leaf)
        mom = [eta[:, :, t, None, None] * s - theta[:, :, t, None, None] * g for s, g in zip(mom, grads)]
        mem = [(1 - alpha[:, :, t, None, None]) * w + s for w, s in zip(mem, mom)]
        y = q[:, :, t : t + 1]
        for i, w in enumerate(mem):
            y = y @ w
            if i < len(mem) - 1:
                y = torch.nn.functional.silu(y)
        ys.append(y)
    return torch.cat(ys, dim=2)


def test_chunk_size_one_is_the_fully_sequential_rule():
    q, k, v, gates = _inputs(40, d=16, seed=5)
    init = default_memory_init(2, memory_dims(16, 16, 2, 2), dtype=F64, device="cpu")
    want = _sequential_rule(q, k, v, gates["theta"], gates["eta"], gates["alpha"], init)
    got = titans_memory(q, k, v, chunk_size=1, memory_depth=2, memory_expansion=2, **gates)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # with chunks the gradients are taken at the chunk start: a different (mini-batch) model
    chunked = titans_memory(q, k, v, chunk_size=8, memory_depth=2, memory_expansion=2, **gates)
    assert (chunked - want).abs().max() > 1e-4


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
    """Spec sanity (ii): L_M = 1, eta = alpha = 0: W_t = W_{t-1} - 2 theta k_t^T (k_t W_{t-1} - v_t)."""
    q, k, v, gates = _inputs(30, d=10, seed=2)
    theta = gates["theta"]
    qn, kn = _unit(q), _unit(k)
    w = torch.zeros(2, 2, 10, 10, dtype=F64)
    ys = []
    for t in range(30):
        kt, vt = kn[:, :, t : t + 1], v[:, :, t : t + 1]
        w = w - 2 * theta[:, :, t, None, None] * kt.transpose(-1, -2) @ (kt @ w - vt)
        ys.append(qn[:, :, t : t + 1] @ w)
    got = titans_memory(q, k, v, chunk_size=1, memory_depth=1, momentum=False, forgetting=False, theta=theta)
    torch.testing.assert_close(got, torch.cat(ys, 2), atol=TOL, rtol=0)


def test_one_chunk_is_batch_gradient_descent_at_m0():
    """Paper Eq. 16 for a linear memory: inside one chunk every gradient is taken at W_0, so with
    eta = alpha = 0, W_t = W_0 - sum_{i<=t} 2 theta_i k_i^T (k_i W_0 - v_i): a matmul."""
    q, k, v, gates = _inputs(12, d=8, seed=7)
    theta = gates["theta"]
    qn, kn = _unit(q), _unit(k)
    w0 = torch.randn(2, 8, 8, dtype=F64)
    resid = kn @ w0 - v  # (B, H, T, d) at W_0 for every token
    terms = (
        2 * theta[..., None, None] * (kn[..., :, None] * resid[..., None, :])
    )  # per-token gradient (B, H, T, d, d)
    w_t = w0[:, None] - torch.cumsum(terms, dim=2)  # (B, H, T, d, d)
    want = (qn[..., None, :] @ w_t)[..., 0, :]
    got = titans_memory(
        q,
        k,
        v,
        chunk_size=12,
        memory_depth=1,
        momentum=False,
        forgetting=False,
        theta=theta,
        memory_init=[w0],
    )
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_previous_chunk_retrieval_ignores_the_current_chunk():
    """retrieve='previous_chunk' reads M_{t'}: changing the keys/values of a token leaves every output
    of its own chunk unchanged and changes the next chunk."""
    q, k, v, gates = _inputs(24, d=12, seed=8)
    kw = dict(chunk_size=8, memory_depth=2, memory_expansion=1, retrieve="previous_chunk", **gates)
    base = titans_memory(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 10] += 1.0
    v2[:, :, 10] -= 2.0
    moved = titans_memory(q, k2, v2, **kw)
    assert (moved[:, :, :16] - base[:, :, :16]).abs().max() == 0
    assert (moved[:, :, 16:] - base[:, :, 16:]).abs().max() > 1e-4


def test_memory_memorises_a_repeated_pair():
    """The associative loss goes down: writing the same (k, v) pair over and over, reading k returns ~v."""
    d = 8
    g = torch.Generator().manual_seed(0)
    kk = _unit(torch.randn(1, 1, 1, d, generator=g, dtype=F64)).expand(1, 1, 40, d)
    vv = torch.randn(1, 1, 1, d, generator=g, dtype=F64).expand(1, 1, 40, d)
    y = titans_memory(
        kk, kk, vv, chunk_size=4, memory_depth=2, memory_expansion=2, theta=0.05, eta=0.5, alpha=0.0
    )
    err = (y - vv).norm(dim=-1)[0, 0]
    assert err[-1] < 0.05 * err[0], err


def test_gqa_and_bad_settings():
    q, k, v, _ = _inputs(9, h=4, d=8)
    out = az.attention(q, k[:, :2], v[:, :2], "titans", causal=True)
    full = az.attention(
        q, k[:, :2].repeat_interleave(2, 1), v[:, :2].repeat_interleave(2, 1), "titans", causal=True
    )
    torch.testing.assert_close(out, full, atol=TOL, rtol=0)
    with pytest.raises(az.UnsupportedError):
        az.attention(q, k, v, "titans", causal=False)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="retrieve"):
        titans_memory(q, k, v, retrieve="later")
    with pytest.raises(ValueError, match="memory_init"):
        titans_memory(q, k, v, memory_depth=1, memory_init=[torch.zeros(4, 3, 3)])


# ---------------------------------------------------------------------------------------------------
# sliding-window attention with a persistent prefix
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window,prefix", [(5, 0), (5, 3), (200, 0)])
def test_window_attention(window, prefix):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 150, 16, generator=g, dtype=F64) for _ in range(3))
    pos = torch.arange(150)
    fast = window_attention(q, k, v, pos, pos, window, prefix, block=32)
    ref = window_attention_reference(q, k, v, pos, pos, window, prefix)
    torch.testing.assert_close(fast, ref, atol=TOL, rtol=0)
    if window >= 150:  # a window covering everything is causal softmax attention
        torch.testing.assert_close(fast, reference_attention(q, k, v, causal=True), atol=TOL, rtol=0)
    if prefix:  # the last query still sees key 0 although it is far outside the window
        k2 = k.clone()
        k2[:, :, 0] += 5.0
        assert (
            window_attention(q, k2, v, pos, pos, window, prefix)[:, :, -1] - fast[:, :, -1]
        ).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------
# the layer: MAG, MAL, LMM
# ---------------------------------------------------------------------------------------------------
SMALL = dict(window=5, num_persistent=2, chunk_size=4, memory_expansion=1, conv_kernel=3)


def _module(variant, **kw):
    torch.manual_seed(0)
    return TitansAttention(32, 2, causal=True, **{**SMALL, "variant": variant, **kw}).double().eval()


@pytest.mark.parametrize("variant", ["mag", "mal", "lmm"])
def test_module_fast_matches_reference(variant):
    mod = _module(variant)
    x = torch.randn(2, 23, 32, dtype=F64)
    with torch.no_grad():
        fast = mod(x)
        mod.impl = "reference"
        ref = mod(x)
    torch.testing.assert_close(fast, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "variant,extra",
    [
        ("mag", {}),
        ("mal", {}),
        ("lmm", {}),
        ("mag", {"retrieve": "previous_chunk", "num_persistent": 0}),
        ("mal", {"momentum": False, "forgetting": False, "conv_kernel": 0}),
    ],
)
def test_decode_matches_forward_with_state(variant, extra):
    """prefill(odd) + step == forward, and the final states (plain dicts of tensors) agree."""
    mod = _module(variant, **extra)
    x = torch.randn(2, 17, 32, dtype=F64)
    with torch.no_grad():
        full, state_full = mod.prefill(x)
        torch.testing.assert_close(full, mod(x), atol=0, rtol=0)
        y, state = mod.prefill(x[:, :7])
        outs = [y]
        for t in range(7, 17):
            yt, state = mod.step(x[:, t], state)
            outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)
    a, b = state_tensors(state), state_tensors(state_full)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].double(), b[key].double(), atol=TOL, rtol=0, msg=key)


def test_decode_state_is_constant_size():
    mod = _module("mag")
    x = torch.randn(1, 40, 32, dtype=F64)
    with torch.no_grad():
        sizes = [
            sum(t.numel() for t in state_tensors(mod.prefill(x[:, :n])[1]).values()) for n in (10, 25, 40)
        ]
    assert sizes[0] == sizes[1] == sizes[2], sizes
    lmm = mod.prefill(x)[1]["lmm"]
    assert all(
        isinstance(w, torch.Tensor) and w.shape[:2] == (1, 2)
        for part in ("memory", "momentum", "anchor")
        for w in lmm[part]
    )


@pytest.mark.parametrize("variant", ["mal", "lmm"])
def test_no_future_leak_other_variants(variant):
    mod = _module(variant)
    x = torch.randn(1, 30, 32, dtype=F64)
    x2 = x.clone()
    x2[:, 13:] += torch.randn(1, 17, 32, dtype=F64)
    with torch.no_grad():
        y, y2 = mod(x), mod(x2)
    assert (y[:, :13] - y2[:, :13]).abs().max() == 0
    assert (y[:, 13:] - y2[:, 13:]).abs().max() > 1e-6


@pytest.mark.parametrize("variant", ["mag", "mal", "lmm"])
def test_gradients_reach_every_outer_parameter(variant):
    mod = _module(variant).float().train()
    x = torch.randn(2, 19, 32)
    mod(x).square().mean().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_of_fast_form_match_reference_form():
    """Backprop through the chunk-parallel dual form == backprop through the autograd token loop
    (which differentiates the inner gradients with create_graph): the outer gradients agree."""
    grads = {}
    for impl in ("fast", "reference"):
        mod = _module("mag")
        mod.impl = impl
        x = torch.randn(1, 14, 32, dtype=F64, generator=torch.Generator().manual_seed(3))
        mod(x).square().sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in mod.named_parameters()}
    for name, g in grads["fast"].items():
        torch.testing.assert_close(g, grads["reference"][name], atol=1e-9, rtol=1e-9, msg=name)


def test_variant_is_a_setting_and_bad_settings_fail():
    assert az.info("titans").defaults["variant"] == "mag"
    assert not hasattr(_module("lmm"), "norm_attn")
    with pytest.raises(ValueError, match="variant"):
        TitansAttention(32, 2, causal=True, variant="mac")
    with pytest.raises(ValueError, match="window"):
        TitansAttention(32, 2, causal=True, window=0)
    with pytest.raises(az.UnsupportedError):
        TitansAttention(32, 2, causal=False)


def test_memory_apply_shapes():
    dims = memory_dims(6, 5, 3, 2)
    assert dims == [(6, 12), (12, 12), (12, 5)]
    init = default_memory_init(2, dims, dtype=F64, device="cpu")
    assert memory_apply(torch.randn(1, 2, 4, 6, dtype=F64), init)[0].shape == (1, 2, 4, 5)


def test_cost_is_linear_in_n():
    """FLOPs (FlopCounterMode) grow 4x when N grows 4x: the memory costs a constant per chunk and the
    blocked window attention a constant per block; a window covering everything is visibly quadratic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def flops(
        fn,
    ):  # the math SDPA backend decomposes into counted matmuls (the CPU flash kernel is not counted)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def fn_flops(n):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        return flops(lambda: titans_memory(q, k, v, chunk_size=16, memory_expansion=2))

    ratio = fn_flops(1024) / fn_flops(256)
    assert 3.95 < ratio < 4.05, ratio
    torch.manual_seed(0)
    for window, lo, hi in ((16, 3.7, 4.3), (4096, 5.0, 16.5)):  # measured 4.00 and 5.62 (N 128 -> 512)
        mod = TitansAttention(
            32, 2, causal=True, window=window, num_persistent=4, chunk_size=16, memory_expansion=2
        )
        ratio = flops(lambda m=mod: m(torch.randn(1, 512, 32))) / flops(
            lambda m=mod: m(torch.randn(1, 128, 32))
        )
        assert lo < ratio < hi, (window, ratio)


def test_memory_branch_does_not_follow_the_input_scale():
    """The memory branch RMS-normalises its input, so the LMM layer is scale invariant and a large
    input cannot push the test-time step past its stability limit (without the norm, inputs of scale
    3 diverged to NaN near token 900 at width 256)."""
    mod = _module("lmm")
    x = torch.randn(1, 40, 32, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(mod(10.0 * x), mod(x), atol=1e-9, rtol=0)
    torch.manual_seed(0)
    mag = TitansAttention(64, 2, causal=True, window=16, chunk_size=16, memory_expansion=2)
    with torch.no_grad():
        assert torch.isfinite(mag(30.0 * torch.randn(1, 512, 64))).all()

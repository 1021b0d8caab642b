"""The shared recurrences of ``attnzoo.core.scan``: chunked == token loop == step, any chunk size;
linear cost in FLOPs and allocated bytes (no N x N tensor).

Tolerances: float64 throughout; the forms reorder sums of O(1) terms over <= 100 tokens, so they agree
to ~1e-13; 1e-11 leaves room for that and nothing else.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attnzoo.core.scan import (
    decayed_cumsum,
    decayed_cumsum_loop,
    hillis_steele_scan,
    recurrence_chunked,
    recurrence_reference,
    recurrence_step,
    softmax_scan,
    softmax_scan_combine,
    softmax_scan_loop,
    softmax_scan_reference,
)

F64 = torch.float64
TOL = 1e-11
B, H, N, DK, DV = 2, 3, 70, 5, 4


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


def decays():
    g = torch.Generator().manual_seed(1)
    return {
        "none": None,
        "scalar_float": -0.3,
        "head": -torch.rand(H, generator=g, dtype=F64),
        "lambda_one": 0.0,
        "per_step": -torch.rand(B, H, N, generator=g, dtype=F64),
        "elementwise": -torch.rand(B, H, N, DK, DV, generator=g, dtype=F64),
    }


@pytest.mark.parametrize("kind", list(decays()))
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 100])
@pytest.mark.parametrize("with_initial", [False, True])
@pytest.mark.parametrize("segment", [None, 21])
def test_chunked_equals_token_loop(kind, chunk, with_initial, segment):
    """Every decay kind, chunk size, initial state, and segmenting of long inputs (segment < N)."""
    q, k, v = rand(B, H, N, DK, seed=1), rand(B, H, N, DK, seed=2), rand(B, H, N, DV, seed=3)
    init = rand(B, H, DK, DV, seed=4) if with_initial else None
    g = decays()[kind]
    ref, s_ref = recurrence_reference(q, k, v, g, init)
    out, s = recurrence_chunked(q, k, v, g, chunk=chunk, initial=init, segment=segment)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=TOL, rtol=0)


def test_reference_is_the_written_out_sum():
    """o_t = sum_{s<=t} lambda^{t-s} (q_t . k_s) v_s for a constant per-head decay (independent check)."""
    q, k, v = rand(1, 2, 9, 3, seed=1), rand(1, 2, 9, 3, seed=2), rand(1, 2, 9, 2, seed=3)
    lam = torch.tensor([0.5, 0.9], dtype=F64)
    out, _ = recurrence_reference(q, k, v, torch.log(lam))
    expect = torch.zeros_like(out)
    for h in range(2):
        for t in range(9):
            for s in range(t + 1):
                expect[0, h, t] += lam[h] ** (t - s) * (q[0, h, t] @ k[0, h, s]) * v[0, h, s]
    torch.testing.assert_close(out, expect, atol=1e-13, rtol=0)


def test_continuation_and_step():
    """Chunked on [0, 30) then [30, N) with the carried state == one pass == steps."""
    q, k, v = rand(B, H, N, DK, seed=1), rand(B, H, N, DK, seed=2), rand(B, H, N, DV, seed=3)
    g = decays()["per_step"]
    full, s_full = recurrence_chunked(q, k, v, g, chunk=16)
    a, s_a = recurrence_chunked(q[:, :, :30], k[:, :, :30], v[:, :, :30], g[:, :, :30], chunk=16)
    b, s_b = recurrence_chunked(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], g[:, :, 30:], chunk=16, initial=s_a)
    torch.testing.assert_close(torch.cat([a, b], 2), full, atol=TOL, rtol=0)
    torch.testing.assert_close(s_b, s_full, atol=TOL, rtol=0)
    s = s_a
    for t in range(30, N):
        o, s = recurrence_step(s, q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t])
        torch.testing.assert_close(o, full[:, :, t], atol=TOL, rtol=0)


def test_bad_decay_shape_is_a_clear_error():
    q = rand(1, 2, 5, 3)
    with pytest.raises(ValueError, match="log_decay"):
        recurrence_chunked(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="initial"):
        recurrence_chunked(q, q, q, initial=torch.zeros(1, 2, 3, 4, dtype=F64))


def test_decayed_cumsum_api_still_works():
    """The vector EMA used by momentum attention is unchanged."""
    x = rand(2, 3, 41, 6)
    d = torch.tensor([0.0, 0.5, 0.99], dtype=F64)
    for excl in (False, True):
        y, last = decayed_cumsum(x, d, exclusive=excl, chunk=8)
        torch.testing.assert_close(y, decayed_cumsum_loop(x, d, exclusive=excl), atol=TOL, rtol=0)
    torch.testing.assert_close(last, decayed_cumsum_loop(x, d)[:, :, -1], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 128])
def test_softmax_scan_equals_prefix_softmax_and_rnn(chunk):
    s, v = 3.0 * rand(B, H, N, seed=5), rand(B, H, N, DV, seed=6)
    s[0, 0, :4] = float("-inf")  # ignored tokens (padding)
    ref = softmax_scan_reference(s, v)
    loop, st_loop = softmax_scan_loop(s, v)
    out, st = softmax_scan(s, v, chunk=chunk)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(loop, ref, atol=TOL, rtol=0)
    for key in ("m", "u", "w"):
        torch.testing.assert_close(st[key], st_loop[key], atol=TOL, rtol=0)
    assert (out[0, 0, :4] == 0).all()


def test_softmax_scan_is_stable_for_huge_logits():
    """Logits ~1e4 overflow exp() in float32 and float64; the running max keeps everything finite."""
    s, v = 1e4 * rand(1, 2, 50, seed=7).float(), rand(1, 2, 50, 3, seed=8).float()
    out, st = softmax_scan(s, v, chunk=8)
    assert torch.isfinite(out).all() and torch.isfinite(st["u"]).all()
    ref = softmax_scan_reference(s.double(), v.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)  # float32 rounding


def test_softmax_scan_continuation():
    s, v = rand(B, H, N, seed=5), rand(B, H, N, DV, seed=6)
    a, st = softmax_scan(s[..., :33], v[..., :33, :], chunk=8)
    b, _ = softmax_scan(s[..., 33:], v[..., 33:, :], chunk=8, state=st)
    torch.testing.assert_close(torch.cat([a, b], -2), softmax_scan_reference(s, v), atol=TOL, rtol=0)


def test_hillis_steele_equals_sequential_fold():
    m, u, w = rand(2, 37, seed=1), rand(2, 37, seed=2).abs(), rand(2, 37, 3, seed=3)
    hm, hu, hw = hillis_steele_scan(m, u, w)
    acc = (m[:, 0], u[:, 0], w[:, 0])
    for t in range(1, 37):
        acc = softmax_scan_combine(acc, (m[:, t], u[:, t], w[:, t]))
        torch.testing.assert_close(hm[:, t], acc[0], atol=0, rtol=0)
        torch.testing.assert_close(hw[:, t] / hu[:, t, None], acc[2] / acc[1][..., None], atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# linear cost, in counts: FLOPs (matmul-like ops) and bytes of every tensor created
class AllocCounter(TorchDispatchMode):
    """Sums the bytes of every tensor an op returns and records the largest one."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                nbytes = t.numel() * t.element_size()
                self.total += nbytes
                self.largest = max(self.largest, nbytes)
        return out


def costs(fn, n: int) -> tuple[int, int, int]:
    """(FLOPs, allocated bytes, largest tensor bytes) of ``fn(n)`` (forward only)."""
    flops = FlopCounterMode(display=False)
    alloc = AllocCounter()
    with torch.no_grad(), flops, alloc:
        fn(n)
    return flops.get_total_flops(), alloc.total, alloc.largest


def assert_linear(fn, sizes=(2048, 4096, 8192, 16384)):
    """Each doubling of N doubles FLOPs and allocated bytes (within 15%); a quadratic term would x4."""
    rows = [costs(fn, n) for n in sizes]
    for (f0, a0, l0), (f1, a1, l1), n in zip(rows, rows[1:], sizes[1:]):
        assert f0 > 0, "no matmul was counted"
        assert 1.7 < f1 / f0 < 2.3, f"FLOPs grew x{f1 / f0:.2f} at N={n}"
        assert 1.7 < a1 / a0 < 2.3, f"allocated bytes grew x{a1 / a0:.2f} at N={n}"
        assert l1 / l0 < 2.3, f"the largest tensor grew x{l1 / l0:.2f} at N={n}"
    n = sizes[-1]
    assert rows[-1][2] < n * n * 4 / 64, "a tensor of N x N / 64 floats or more was built"


def test_recurrence_chunked_is_linear_in_n():
    def run(n):
        x = torch.randn(1, 1, n, 16)
        recurrence_chunked(x, x, x, torch.tensor([-0.1]), chunk=64)
        recurrence_chunked(x, x, x, -torch.rand(1, 1, n), chunk=64)
        recurrence_chunked(x, x, x, None, chunk=64)

    assert_linear(run)


def test_softmax_scan_is_linear_in_n():
    def run(n):
        softmax_scan(torch.randn(1, 1, n), torch.randn(1, 1, n, 16), chunk=64)

    assert_linear(run)


def test_the_linearity_check_catches_a_quadratic_form():
    def quadratic(n):
        softmax_scan_reference(torch.randn(1, 1, n), torch.randn(1, 1, n, 16))

    with pytest.raises(AssertionError, match="grew"):
        assert_linear(quadratic, sizes=(256, 512, 1024))


@pytest.mark.parametrize("kind", list(decays()) + ["head_learned"])
@pytest.mark.parametrize("segment", [None, 40])
def test_chunked_gradients_equal_token_loop_gradients(kind, segment):
    """Backward through the chunked form == backward through the token loop, for q, k, v, the initial
    state and (when it is data or learned) the decay. Constant decays use the hand-written backward
    (``_ConstantDecayScan``), the others autograd; ``head_learned`` is a per-head decay that needs a
    gradient (autograd path)."""
    q, k, v = rand(B, H, N, DK, seed=1), rand(B, H, N, DK, seed=2), rand(B, H, N, DV, seed=3)
    g = decays()["head" if kind == "head_learned" else kind]
    g = g.clone() if isinstance(g, torch.Tensor) else g
    init = rand(B, H, DK, DV, seed=4)
    learn_g = kind in ("per_step", "elementwise", "head_learned")
    leaves = [t.requires_grad_(True) for t in (q, k, v, init) + ((g,) if learn_g else ())]
    w_out, w_state = rand(B, H, N, DV, seed=8), rand(B, H, DK, DV, seed=9)

    def loss(fn):
        o, s = fn()
        return (o * w_out).sum() + (s * w_state).sum()

    ref = torch.autograd.grad(loss(lambda: recurrence_reference(q, k, v, g, init)), leaves)
    fast = torch.autograd.grad(loss(lambda: recurrence_chunked(q, k, v, g, chunk=16, initial=init, segment=segment)), leaves)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_softmax_scan_gradients_equal_reference_gradients():
    """The running max carries no gradient; the gradient is still exact (it cancels in w / u)."""
    s, v = (3.0 * rand(B, H, N, seed=5)).requires_grad_(True), rand(B, H, N, DV, seed=6).requires_grad_(True)
    w = rand(B, H, N, DV, seed=7)
    ref = torch.autograd.grad((softmax_scan_reference(s, v) * w).sum(), (s, v))
    fast = torch.autograd.grad((softmax_scan(s, v, chunk=8)[0] * w).sum(), (s, v))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)

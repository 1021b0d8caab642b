"""Sliding-window attention: blocked fast form == dense reference, identities, linear cost, decode state."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.flops import flop_counter
from attnzoo.mechanisms.softmax.sliding_window import sliding_window_attention, sliding_window_reference

F64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=F64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,window,block", [(1, 1, 1), (1, 5, 64), (9, 1, 4), (37, 5, 8), (64, 16, 16), (63, 100, 8), (257, 33, 64)])
def test_blocked_equals_reference(n, window, block, causal):
    q, k, v = rand(2, 3, n, 20), rand(2, 3, n, 20), rand(2, 3, n, 12)
    fast = sliding_window_attention(q, k, v, causal=causal, window=window, block_size=block)
    ref = sliding_window_reference(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n,m", [(1, 40), (7, 40), (40, 41)])
def test_causal_queries_at_the_end_of_a_longer_cache(n, m):
    """Chunked prefill / decoding: N queries are the last N of M positions."""
    q, k, v = rand(1, 2, n, 16), rand(1, 2, m, 16), rand(1, 2, m, 16)
    fast = sliding_window_attention(q, k, v, causal=True, window=9, block_size=4)
    ref = sliding_window_reference(q, k, v, causal=True, window=9)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_everything_is_softmax(causal):
    q, k, v = rand(2, 2, 50, 16), rand(2, 2, 50, 16), rand(2, 2, 50, 16)
    out = az.attention(q, k, v, "sliding_window", causal=causal, window=50)
    full = az.attention(q, k, v, "softmax", causal=causal)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)


def test_window_one_causal_returns_own_value():
    q, k, v = rand(1, 2, 30, 8), rand(1, 2, 30, 8), rand(1, 2, 30, 8)
    out = az.attention(q, k, v, "sliding_window", causal=True, window=1)
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)


def test_each_query_sees_exactly_its_band():
    """The gradient of output i reaches exactly the keys at distance < window."""
    n, w = 30, 4
    q, v = rand(1, 1, n, 8), rand(1, 1, n, 8)
    k = rand(1, 1, n, 8).requires_grad_(True)
    out = sliding_window_attention(q, k, v, causal=False, window=w, block_size=8)
    for i in (0, 13, 29):
        (g,) = torch.autograd.grad(out[0, 0, i].sum(), k, retain_graph=True)
        seen = (g[0, 0].abs().sum(-1) > 0).nonzero().flatten().tolist()
        assert seen == [j for j in range(n) if abs(i - j) < w], (i, seen)


def flops(n, window=64):
    q = k = v = torch.randn(1, 2, n, 32)
    with flop_counter() as fc:
        sliding_window_attention(q, k, v, causal=True, window=window, block_size=64)
    return fc.get_total_flops()


def test_cost_grows_linearly_in_n():
    f1, f2, f4 = flops(1024), flops(2048), flops(4096)
    assert 1.9 < f2 / f1 < 2.1 and 1.9 < f4 / f2 < 2.1, (f1, f2, f4)
    dense = 4 * 2 * 4096 * 4096 * 32  # QK^T and PV of full attention
    assert f4 < dense / 10, (f4, dense)


def test_decode_state_is_bounded_by_the_window():
    layer = az.create("sliding_window", 32, 2, causal=True, window=5).double()
    x = torch.randn(1, 12, 32, dtype=F64)
    _, state = layer.prefill(x)
    assert state["kv"].keys.shape[2] == 5
    for _t in range(40):
        _, state = layer.step(torch.randn(1, 32, dtype=F64), state)
    assert state["kv"].keys.shape[2] == 5 and state["kv"].seen == 52


def test_bad_settings():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="window"):
        az.attention(q, q, q, "sliding_window", window=0)
    with pytest.raises(ValueError, match="backend"):
        az.attention(q, q, q, "sliding_window", backend="cuda-magic")


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_flex_backend_equals_reference(causal):
    """Compiled FlexAttention (inference) on CPU; compiles once per shape (tens of seconds)."""
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    with torch.no_grad():
        out = sliding_window_attention(q, k, v, causal=causal, window=37, backend="flex")
    ref = sliding_window_reference(q.double(), k.double(), v.double(), causal=causal, window=37)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("n,m,window,block,kv_heads,causal", [
    (100, 100, 6, 8, 3, False), (100, 100, 6, 8, 3, True), (101, 101, 9, 4, 1, False), (101, 101, 9, 4, 1, True),
    (64, 64, 16, 16, 3, False), (64, 64, 16, 16, 3, True),
    (50, 61, 5, 4, 3, True),  # queries at the end of a longer cache (chunked prefill)
])
def test_interior_blocks_and_ends_match_the_reference_with_gradients(n, m, window, block, kv_heads, causal, monkeypatch):
    """The fast path splits the query blocks: interior ones read their keys as a strided view of k/v with one
    shared band bias (in chunks of blocks), the blocks at both ends go through the padded path. Values and
    gradients (through the overlapping views) equal the dense reference; the padded path saw only the end
    blocks; one block per chunk gives the same result."""
    import attnzoo.mechanisms.softmax.sliding_window as sw

    ranges = []
    real = sw._blocks_padded
    monkeypatch.setattr(sw, "_blocks_padded", lambda *a: (ranges.append(a[-2:]), real(*a))[1])
    q = rand(2, 3, n, 8).requires_grad_()
    k, v = rand(2, kv_heads, m, 8).requires_grad_(), rand(2, kv_heads, m, 6).requires_grad_()
    out = sliding_window_attention(q, k, v, causal=causal, window=window, block_size=block)
    nb = -(-n // block)
    covered = sum(i1 - i0 for i0, i1 in ranges)
    assert 0 < covered < nb and all(i0 == 0 or i1 == nb for i0, i1 in ranges)  # only the two ends
    ref = sliding_window_reference(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    w = rand(*out.shape)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-11, rtol=0)
    # the interior in chunks of one block per SDPA call (as at long lengths) computes the same
    monkeypatch.setattr(sw, "_CHUNK_BYTES", 1)
    one = sliding_window_attention(q, k, v, causal=causal, window=window, block_size=block)
    assert torch.equal(one, out)
    for g, r in zip(torch.autograd.grad((one * w).sum(), (q, k, v)), got):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)

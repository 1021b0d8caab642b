"""Single-process checks of attnzoo.distributed: layouts, load balance, P = 1 equivalence, argument errors."""

from __future__ import annotations

import pytest
import torch

import attnzoo
import attnzoo.distributed as D
from attnzoo.distributed.ring import allowed


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_partition_the_sequence_and_unshard_inverts(layout, world):
    for n in (1, 5, 13, 16):
        total = D.padded_length(n, world, layout)
        pos = torch.cat([D.local_positions(n, r, world, layout) for r in range(world)])
        assert sorted(pos.tolist()) == list(range(total))
        x = torch.randn(2, 3, n, 4)
        parts = [D.shard(x, r, world, layout=layout) for r in range(world)]
        assert all(p.shape[2] == D.shard_length(n, world, layout) for p in parts)
        assert torch.equal(D.unshard(parts, n, layout=layout), x)
        for r, p in enumerate(parts):  # padding is zero and sits at positions >= n
            lp = D.local_positions(n, r, world, layout)
            assert torch.equal(p[:, :, lp >= n], torch.zeros_like(p[:, :, lp >= n]))


def test_zigzag_balances_causal_work_and_contiguous_does_not():
    world, n = 4, 64
    zig = [sum(r) for r in D.work_per_step(n, world, "zigzag", causal=True)]
    con = [sum(r) for r in D.work_per_step(n, world, "contiguous", causal=True)]
    length = n // world
    assert len(set(zig)) == 1  # every rank computes the same number of (query, key) pairs
    assert con == [(r + 1) * length * length for r in range(world)]  # rank r computes r + 1 blocks: P x imbalance
    assert sum(zig) < sum(con)  # the zigzag diagonal blocks are smaller, too
    assert sum(zig) >= n * (n + 1) // 2  # every visible pair is computed
    # per step too (after the diagonal step): equal work on every rank in every step
    steps = D.work_per_step(n, world, "zigzag", causal=True)
    for s in range(1, world):
        assert len({steps[r][s] for r in range(world)}) == 1


def test_allowed_matches_the_sliding_window_convention():
    n, w = 12, 3
    pos = torch.arange(n)
    ref = attnzoo.attention  # the registered mechanism defines the convention: |i - j| < w, causal adds j <= i
    q = torch.randn(1, 1, n, 4, dtype=torch.float64)
    for causal in (False, True):
        mask = allowed(pos, pos, causal=causal, window=w, seq_len=n)
        i, j = pos[:, None], pos[None, :]
        expect = ((i - j).abs() < w) & ((j <= i) if causal else torch.ones_like(mask))
        assert torch.equal(mask, expect)
        # and a one-hot value probe through the real mechanism shows the same visibility
        v = torch.eye(n, dtype=torch.float64)[None, None]
        probs = ref(q, q, v, "sliding_window", causal=causal, window=w)
        assert torch.equal(probs[0, 0] > 0, expect)


CASES = [
    ("softmax", True, {}), ("softmax", False, {}), ("sliding_window", True, {"window": 5}),
    ("sliding_window", False, {"window": 5}), ("linear", True, {}), ("linear", False, {}), ("lightning", True, {}),
]


@pytest.mark.parametrize("mechanism,causal,params", CASES)
@pytest.mark.parametrize("strategy", ["ring", "heads"])
def test_one_process_without_a_process_group_equals_the_mechanism(mechanism, causal, params, strategy):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 37, 6, generator=g, dtype=torch.float64)
    out = D.context_parallel_attention(q, k, v, mechanism, causal=causal, strategy=strategy, **params)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = attnzoo.attention(q, k, v, mechanism, causal=causal, **params)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert (out - ref).abs().max() <= 1e-12
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-12


def test_ring_backward_matches_autograd_through_a_padded_sequence():
    """One process, but with seq_len < L: the padded keys must be invisible and get zero gradient."""
    g = torch.Generator().manual_seed(2)
    n = 29
    full = [torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    q, k, v = (D.shard(t, 0, 1, layout="zigzag").requires_grad_(True) for t in full)  # padded to 30
    out = D.ring_attention(q, k, v, causal=False, seq_len=n, layout="zigzag")
    out[:, :, :n].sum().backward()
    ref = attnzoo.attention(*full, "softmax")
    assert (out[:, :, :n] - ref).abs().max() <= 1e-12
    assert k.grad[:, :, n:].abs().max() == 0 and v.grad[:, :, n:].abs().max() == 0


def test_clear_errors_for_bad_arguments():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="strategy"):
        D.context_parallel_attention(q, q, q, strategy="nope")
    with pytest.raises(ValueError, match="does not take"):
        D.context_parallel_attention(q, q, q, "softmax", rope=True)
    with pytest.raises(ValueError, match="no ring form"):
        D.context_parallel_attention(q, q, q, "flow", strategy="ring")
    with pytest.raises(ValueError, match="tokens per rank"):
        D.ring_attention(q, q, q, seq_len=20)
    with pytest.raises(ValueError, match="window"):
        D.sliding_window_attention(q, q, q, window=0)
    with pytest.raises(TypeError, match="floating-point"):
        D.ring_attention(q.long(), q, q)
    with pytest.raises(ValueError, match="layout"):
        D.shard(q, 0, 2, layout="diagonal")
    with pytest.raises(ValueError, match="causal only"):
        D.context_parallel_attention(q, q, q, "lightning", causal=False)


def test_context_parallel_module_on_one_process_equals_the_layer():
    torch.manual_seed(0)
    for name, cfg in (("softmax", {}), ("sliding_window", {"window": 4}), ("linear", {})):
        layer = attnzoo.create(name, 16, 2, causal=True, **cfg).double()
        x = torch.randn(2, 11, 16, dtype=torch.float64)
        cp = D.ContextParallel(layer, seq_len=11)
        assert (cp(x) - layer(x)).abs().max() <= 1e-12
    with pytest.raises(ValueError, match="overrides forward"):
        D.ContextParallel(attnzoo.create("lightning", 16, 2, causal=True), seq_len=11)


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_fused_blocks_equal_the_plain_block_math(layout, causal, monkeypatch):
    """Unmasked and causal-diagonal blocks go through torch's fused CPU kernel (forward and backward
    with the global log-sum-exp); the plain block math gives the same, and both equal SDPA."""
    import attnzoo.distributed.ring as R

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 32, 8, generator=g, dtype=torch.float64)
    blocks = [b for step in R._plan(32, 0, 1, layout, causal, None, "cpu") for b in step]
    assert all(R._fused_kind(b, q, 8) is not None for b in blocks)  # every block of this case is fused
    results = []
    for fused in (True, False):
        monkeypatch.setattr(R, "FUSED_BLOCKS", fused)
        out = D.ring_attention(q, k, v, causal=causal, layout=layout)
        results.append((out, *torch.autograd.grad((out * w).sum(), (q, k, v))))
    ref = attnzoo.attention(q, k, v, "softmax", causal=causal)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b, r in zip(results[0], results[1], (ref, *ref_grads)):
        assert (a - b).abs().max() <= 1e-12 and (a - r).abs().max() <= 1e-12

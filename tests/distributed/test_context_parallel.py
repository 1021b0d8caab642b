"""Distributed attention == single-process attention, on 2 (fast) and 4 (slow) gloo CPU processes.

Every case: the same global q, k, v on every rank; single-process output and gradients of
``sum(out * w)`` by autograd through ``attnzoo.attention``; the distributed output and gradients
gathered from the shards; both compared on every rank (float64: 1e-10, float32: 1e-5, in units of
the largest reference value). N = 61 is not divisible by P (padding), N = 64 is.
"""

from __future__ import annotations

import pytest

from attnzoo.distributed.launch import start

from .conftest import assert_close, spawn
from .workers import case_id, cases_and_misc, crash_one_rank, misc, run_cases


def _cases(ns: tuple[int, ...], dtypes: tuple[str, ...] = ("float64",)) -> list[dict]:
    cases = []
    for dtype in dtypes:
        for n in ns:
            for causal in (False, True):
                for layout in ("contiguous", "zigzag"):
                    cases.append(dict(strategy="ring", mechanism="softmax", causal=causal, layout=layout, n=n, dtype=dtype))
                    cases.append(dict(strategy="heads", mechanism="softmax", causal=causal, layout=layout, n=n, dtype=dtype,
                                      heads=4))
                # window 5 < shard length: halo exchange; window 40 > shard length: the ring with the window mask
                cases.append(dict(strategy="ring", mechanism="sliding_window", causal=causal, layout="contiguous", n=n,
                                  dtype=dtype, params={"window": 5}))
                cases.append(dict(strategy="ring", mechanism="sliding_window", causal=causal, layout="zigzag", n=n,
                                  dtype=dtype, params={"window": 40}))
                cases.append(dict(strategy="ring", mechanism="linear", causal=causal, layout="contiguous", n=n, dtype=dtype,
                                  params={"chunk": 16}))
            cases.append(dict(strategy="ring", mechanism="lightning", causal=True, layout="contiguous", n=n, dtype=dtype,
                              params={"block_size": 16}))
            # grouped-query K/V travel unexpanded around the ring
            cases.append(dict(strategy="ring", mechanism="softmax", causal=True, layout="zigzag", n=n, dtype=dtype,
                              heads=4, kv_heads=2))
            # any registered mechanism through the head-parallel strategy (per-head slopes sliced to the local heads)
            cases.append(dict(strategy="heads", mechanism="lightning", causal=True, layout="contiguous", n=n, dtype=dtype,
                              heads=4))
            cases.append(dict(strategy="heads", mechanism="s2", causal=True, layout="contiguous", n=n, dtype=dtype, heads=4,
                              params={"block_size": 4, "local_blocks": 2, "vert_stride": 2, "homo_head": True}))
            cases.append(dict(strategy="heads", mechanism="flow", causal=False, layout="zigzag", n=n, dtype=dtype, heads=4))
    return cases


FAST_CASES = _cases((61,)) + [c for c in _cases((64,), ("float32",)) if c["strategy"] == "ring"]
SLOW_CASES = _cases((61, 64, 130), ("float64", "float32")) + _cases((3,))  # N = 3 < P = 4: ranks of pure padding


def _failure_launches() -> dict:
    """Three launches at once (their ranks mostly wait): rank 1 raises before the ring, raises after
    the others entered it, or stops answering for 8 s (process-group timeout 3 s)."""
    launches = {
        "raise": start(crash_one_rank, 2, "raise", timeout_s=20.0, deadline_s=90.0),
        "raise_in_ring": start(crash_one_rank, 2, "raise_in_ring", timeout_s=20.0, deadline_s=90.0),
        "hang": start(crash_one_rank, 2, "hang:8", timeout_s=3.0, deadline_s=90.0),
    }
    return {name: launch.wait() for name, launch in launches.items()}


@pytest.fixture(scope="module")
def failure_results(shared):
    return shared("failures", _failure_launches)


@pytest.fixture(scope="module")
def fast_launch(shared):
    """One launch of 2 processes for every fast case and the cheap error/byte checks (start-up is the cost)."""
    return shared("fast", lambda: spawn(cases_and_misc, 2, FAST_CASES, timeout_s=30.0).values())


@pytest.fixture(scope="module")
def fast_results(fast_launch):
    return [r["cases"] for r in fast_launch]


@pytest.fixture(scope="module")
def misc_results(fast_launch):
    return [r["misc"] for r in fast_launch]


@pytest.mark.parametrize("case", FAST_CASES, ids=case_id)
def test_two_processes_equal_single_process(fast_results, case):
    for rank, per_rank in enumerate(fast_results):
        assert_close(case, per_rank[case_id(case)]), rank


def test_shape_mismatch_is_a_clear_error_on_every_rank(misc_results):
    msgs = [r["shape_mismatch"] for r in misc_results]
    for m in msgs:
        assert m.startswith("ValueError") and "disagree" in m and "local_length: 8/10" in m, m
    assert msgs[0] == msgs[1]  # the same diagnosis everywhere


def test_local_input_error_stops_every_rank(misc_results):
    rank0, rank1 = (r["local_error"] for r in misc_results)
    assert rank1.startswith("TypeError") and "floating-point" in rank1, rank1
    assert rank0.startswith("ValueError") and "rank(s) [1] rejected their inputs" in rank0, rank0


def test_ranks_calling_different_operations_fail_together(misc_results):
    for r in misc_results:
        assert r["different_operations"].startswith("ValueError") and "operation:" in r["different_operations"]


def test_group_still_usable_after_errors(misc_results):
    for r in misc_results:
        assert r["after_errors"] <= 1e-12


def test_bytes_per_step_match_the_analysis(misc_results):
    """B=1, H=2, N=64, d=8, float64, P=2 (L=32): the bytes each rank sends, from the formulas in docs/distributed.md."""
    p, length, h, d, b8 = 2, 32, 2, 8, 8
    kv = length * h * 2 * d * b8  # one K/V block
    shard = length * h * d * b8  # one of q, k, v, out on one rank
    state = h * d * (d + 1) * b8  # linear attention state [S, z] of one rank
    for r in misc_results:
        got = r["bytes"]
        assert got["ring_fwd"] == (p - 1) * kv
        assert got["ring_bwd"] == (p - 1) * kv + p * kv  # K/V again, plus the dK/dV accumulators home
        assert got["heads_fwd"] == 4 * shard * (p - 1) // p  # q, k, v to heads, out back
        assert got["heads_bwd"] == 4 * shard * (p - 1) // p
        assert got["linear_fwd"] == (p - 1) * state
        assert got["linear_bwd"] == (p - 1) * state


def _assert_all_failed_fast(res, limit_s: float, expect: str):
    assert not res.hung, res.describe()
    for r in res.ranks:
        assert not r.ok, res.describe()
        assert r.seconds < limit_s, res.describe()
    others = [r for r in res.ranks if r.rank != 1]
    for r in others:
        assert r.error.startswith("DistributedAttentionError"), r.error
        assert f"rank {r.rank}/" in r.error and expect in r.error, r.error
    assert "deliberate" in res.ranks[1].error


@pytest.mark.parametrize("mode", ["raise", "raise_in_ring"])
def test_failing_rank_ends_every_rank_with_an_error(failure_results, mode):
    """Rank 1 raises (before, or after the metadata check, i.e. while rank 0 is inside the ring); its
    process exits and rank 0 gets a DistributedAttentionError quickly (the peer closed), far below
    the 20 s process-group timeout (``seconds`` counts from each process's start)."""
    res = failure_results[mode]
    _assert_all_failed_fast(res, limit_s=10.0, expect="metadata check" if mode == "raise" else "ring attention forward step 0")


def test_unresponsive_rank_hits_the_timeout(failure_results):
    """Rank 1 stops answering for 8 s; rank 0 must fail by the 3 s process-group timeout, not hang."""
    res = failure_results["hang"]
    assert not res.hung, res.describe()
    rank0, rank1 = res.ranks
    assert not rank0.ok and rank0.error.startswith("DistributedAttentionError"), res.describe()
    # ended by the 3 s timeout (gloo says "Timed out waiting 3000ms"), not by rank 1 giving up after 8 s
    assert "timed out" in rank0.error.lower() and 2.5 <= rank0.seconds <= 12.0, res.describe()
    assert not rank1.ok and "deliberate hang" in rank1.error


# ---------------------------------------------------------------------------------------------------
# slow: 4 processes, more lengths and dtypes
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_results(shared):
    return shared("slow", lambda: spawn(run_cases, 4, SLOW_CASES, deadline_s=900.0).values())


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=case_id)
def test_four_processes_equal_single_process(slow_results, case):
    for per_rank in slow_results:
        assert_close(case, per_rank[case_id(case)])


@pytest.mark.slow
def test_four_processes_errors_and_bytes():
    res = spawn(misc, 4, timeout_s=30.0).values()
    for r in res:
        assert "disagree" in r["shape_mismatch"] and "8/10/8/8" in r["shape_mismatch"], r["shape_mismatch"]
        assert r["after_errors"] <= 1e-12
        b = r["bytes"]
        kv = 16 * 4 * 2 * 8 * 8  # L = 16, H = 4
        assert b["ring_fwd"] == 3 * kv and b["ring_bwd"] == 3 * kv + 4 * kv
    assert res[1]["local_error"].startswith("TypeError")
    assert all("rank(s) [1]" in r["local_error"] for i, r in enumerate(res) if i != 1)


@pytest.mark.slow
def test_four_processes_failure_ends_every_rank():
    res = spawn(crash_one_rank, 4, "raise_in_ring", timeout_s=20.0, deadline_s=90.0)
    _assert_all_failed_fast(res, limit_s=25.0, expect="rank")

"""Functions that run inside the spawned ranks of the distributed tests (module level: spawn imports them).

Every rank builds the same global inputs from a seed, computes the single-process result and its
gradients with autograd, runs the distributed version on its shard, gathers output and gradients
and returns the largest absolute differences. The parent test asserts on them.
"""

from __future__ import annotations

import time

import torch

import attnzoo
import attnzoo.distributed as D

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def case_id(c: dict) -> str:
    extra = ",".join(f"{k}={v}" for k, v in sorted(c.get("params", {}).items()))
    return (f"{c['strategy']}-{c['mechanism']}-{'causal' if c['causal'] else 'noncausal'}-{c['layout']}-N{c['n']}"
            f"-H{c.get('heads', 2)}kv{c.get('kv_heads', c.get('heads', 2))}-{c['dtype']}" + (f"-{extra}" if extra else ""))


def _inputs(c: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[c["dtype"]]
    b, h, n, d = c.get("batch", 2), c.get("heads", 2), c["n"], c.get("head_dim", 8)
    hkv = c.get("kv_heads", h)
    scale = 0.5 if c["mechanism"] == "lightning" else 1.0  # keep the undecayed sums of lightning O(1)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dt) * scale
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64).to(dt) * scale
    v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64).to(dt)
    w = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dt)  # loss = sum(out * w)
    return q, k, v, w


def run_case(rank: int, world: int, c: dict, seed: int = 0) -> dict[str, float]:
    """Max |distributed - single process| of the output and of dL/dq, dL/dk, dL/dv (L = sum(out * w))."""
    q, k, v, w = _inputs(c, seed)
    n, layout, mech, causal = c["n"], c["layout"], c["mechanism"], c["causal"]
    params = dict(c.get("params", {}))
    # single process, plain autograd through the registered mechanism
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = attnzoo.attention(qr, kr, vr, mech, causal=causal, cross=False, **params)
    ref_grads = torch.autograd.grad((ref * w).sum(), (qr, kr, vr))
    # distributed
    ql, kl, vl = (D.shard(t, rank, world, layout=layout).requires_grad_(True) for t in (q, k, v))
    wl = D.shard(w, rank, world, layout=layout)  # zero at padded positions: they do not enter the loss
    out = D.context_parallel_attention(ql, kl, vl, mech, causal=causal, seq_len=n, layout=layout,
                                       strategy=c["strategy"], **params)
    grads = torch.autograd.grad((out * wl).sum(), (ql, kl, vl))
    full_out = D.gather_sequence(out, n, layout=layout)
    full_grads = [D.gather_sequence(g_, n, layout=layout) for g_ in grads]
    res = {"out": (full_out - ref).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), full_grads, ref_grads):
        res[name] = (a - b).abs().max().item()
    res["finite"] = float(all(torch.isfinite(t).all() for t in (out, *grads)))
    res["ref_scale"] = max(ref.abs().max().item(), *(g_.abs().max().item() for g_ in ref_grads))
    return res


def run_cases(rank: int, world: int, cases: list[dict]) -> dict[str, dict[str, float]]:
    return {case_id(c): run_case(rank, world, c) for c in cases}


# ---------------------------------------------------------------------------------------------------
# error handling
# ---------------------------------------------------------------------------------------------------
def _small(rank, world, length=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(1, 2, length, 4, generator=g, dtype=dtype) for _ in range(3)]


def shape_mismatch(rank: int, world: int) -> str:
    """Rank 1 holds a longer shard than the others: every rank must raise the same ValueError."""
    q, k, v = _small(rank, world, length=8 + (2 if rank == 1 else 0))
    try:
        D.ring_attention(q, k, v, causal=True)
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


def local_error(rank: int, world: int) -> str:
    """Rank 1 passes integer tensors: it raises its TypeError, every other rank a ValueError naming it."""
    q, k, v = _small(rank, world)
    if rank == 1:
        q = q.to(torch.int64)
    try:
        D.ring_attention(q, k, v)
    except (TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def different_operations(rank: int, world: int) -> str:
    """Rank 0 calls ring attention, the others linear attention: a ValueError everywhere, no transfer."""
    q, k, v = _small(rank, world)
    try:
        if rank == 0:
            D.ring_attention(q, k, v, causal=True)
        else:
            D.linear_attention(q, k, v, causal=True)
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


def still_usable_after_errors(rank: int, world: int) -> float:
    """After the two checks above the process group still works (nothing was left half-sent)."""
    shape_mismatch(rank, world)
    local_error(rank, world)
    different_operations(rank, world)
    q, k, v = _small(0, world)  # the same full tensors on every rank
    ql, kl, vl = (D.shard(t, rank, world) for t in (q, k, v))
    out = D.gather_sequence(D.ring_attention(ql, kl, vl, causal=True), q.shape[2])
    return (out - attnzoo.attention(q, k, v, "softmax", causal=True)).abs().max().item()


def crash_one_rank(rank: int, world: int, mode: str) -> str:
    """Rank 1 fails (``mode="raise"``: raises and its process exits; ``"raise_in_ring"``: the same after
    the others have entered the ring; ``"hang:SECONDS"``: stops answering for longer than the
    process-group timeout, then raises); the other ranks are inside ring attention. Returns the
    time the rank took to fail — it must fail, so a normal return is a test failure."""
    q, k, v = _small(rank, world, length=16)
    if rank == 1:
        if mode == "raise":
            raise RuntimeError("deliberate failure on rank 1")
        if mode == "raise_in_ring":  # pass the metadata check with the others, then fail: they are inside the ring
            from attnzoo.distributed.ring import _check_inputs

            _check_inputs(q, k, v, seq_len=None, layout="contiguous", causal=True, window=None,
                          what="ring_attention", group=None)
            raise RuntimeError("deliberate failure on rank 1 inside the ring")
        time.sleep(float(mode.split(":")[1]))
        raise RuntimeError("deliberate hang on rank 1 ended")
    t0 = time.time()
    D.ring_attention(q, k, v, causal=True)
    out = D.ring_attention(q, k, v, causal=True)  # a second call: more traffic that cannot be answered
    out.sum().item()
    return f"rank {rank} finished after {time.time() - t0:.1f} s"


def comm_volume(rank: int, world: int) -> dict[str, int]:
    """Bytes sent by one forward and one backward of ring / head-parallel / linear (causal, N = 64)."""
    b, h, n, d = 1, max(2, world), 64, 8  # H divisible by P for the head-parallel strategy
    length = n // world
    res = {}
    for name in ("ring", "heads", "linear"):
        q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
        with D.count_comm() as fwd:
            if name == "ring":
                out = D.ring_attention(q, k, v, causal=True)
            elif name == "heads":
                out = D.head_parallel_attention(q, k, v, "softmax", causal=True)
            else:
                out = D.linear_attention(q, k, v, causal=True)
        with D.count_comm() as bwd:
            out.sum().backward()
        res[f"{name}_fwd"] = fwd.bytes_sent
        res[f"{name}_bwd"] = bwd.bytes_sent
    return res


def misc(rank: int, world: int) -> dict:
    """The cheap checks that share one launch: error agreement, reuse after errors, byte counts, balance."""
    return {
        "shape_mismatch": shape_mismatch(rank, world),
        "local_error": local_error(rank, world),
        "different_operations": different_operations(rank, world),
        "after_errors": still_usable_after_errors(rank, world),
        "bytes": comm_volume(rank, world),
    }


def cases_and_misc(rank: int, world: int, cases: list[dict]) -> dict:
    """One launch for the fast suite: every equivalence case, then the cheap error and byte checks."""
    return {"cases": run_cases(rank, world, cases), "misc": misc(rank, world)}

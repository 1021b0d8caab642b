"""Benchmark of context-parallel attention: time and communication volume per step for P processes.

``python -m attnzoo.distributed.bench --world 1 2 4 --seq-len 2048 --out results/distributed.json``

For each ``P`` it starts ``P`` CPU processes on *this machine* (gloo over the loopback device; one
torch thread each) and measures, for every strategy, one training step of the attention alone
(forward + backward of ``sum(out * w)``): the median over ``--repeats`` of the slowest rank's time
(ranks are synchronised by a barrier before and after), the bytes each rank sends (payload, from
:func:`attnzoo.distributed.comm_stats`; the few bytes of the shape agreement are reported apart),
and the compute balance of the ring (max / mean of the visible (query, key) pairs per rank).
The numbers describe processes sharing one machine's cores and memory bandwidth, not a cluster:
with more processes than cores they measure contention as much as the algorithm. Rows are
written atomically (temp file + rename) after every ``P``, so an interrupted run keeps what it had.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

SETTING = "P processes on one machine (CPU, gloo over 127.0.0.1), not a cluster"

#: (name, mechanism, strategy, causal, layout, params)
STRATEGIES = [
    ("ring causal contiguous", "softmax", "ring", True, "contiguous", {}),
    ("ring causal zigzag", "softmax", "ring", True, "zigzag", {}),
    ("ring non-causal", "softmax", "ring", False, "contiguous", {}),
    ("heads (Ulysses) causal", "softmax", "heads", True, "contiguous", {}),
    ("sliding window halo (w=256)", "sliding_window", "ring", True, "contiguous", {"window": 256}),
    ("linear causal (state prefix)", "linear", "ring", True, "contiguous", {}),
    ("lightning (state prefix)", "lightning", "ring", True, "contiguous", {}),
]


def _rank_main(rank: int, world: int, cfg: dict) -> list[dict]:
    import torch.distributed as dist

    import attnzoo.distributed as D

    dt = getattr(torch, cfg["dtype"])
    b, h, n, d = cfg["batch"], cfg["heads"], cfg["seq_len"], cfg["head_dim"]
    rows = []
    for name, mech, strategy, causal, layout, params in STRATEGIES:
        if cfg["only"] and not any(s in name for s in cfg["only"]):
            continue
        if strategy == "heads" and h % world:
            continue
        g = torch.Generator().manual_seed(cfg["seed"])
        full = [torch.randn(b, h, n, d, generator=g, dtype=dt) for _ in range(4)]
        q, k, v, w = (D.shard(t, rank, world, layout=layout) for t in full)
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        times, fwd_times = [], []
        for i in range(cfg["warmup"] + cfg["repeats"]):
            q.grad = k.grad = v.grad = None
            if world > 1:
                dist.barrier()
            with D.count_comm() as c_fwd:
                t0 = time.perf_counter()
                out = D.context_parallel_attention(q, k, v, mech, causal=causal, seq_len=n, layout=layout,
                                                   strategy=strategy, **params)
                t1 = time.perf_counter()
            with D.count_comm() as c_bwd:
                (out * w).sum().backward()
            if world > 1:
                dist.barrier()
            t2 = time.perf_counter()
            if i >= cfg["warmup"]:
                times.append(t2 - t0)
                fwd_times.append(t1 - t0)
        step = torch.tensor([statistics.median(times), statistics.median(fwd_times)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(step, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
        balance = None
        if mech == "softmax" and strategy == "ring":
            work = D.work_per_step(n, world, layout, causal, params.get("window"))
            per_rank = [sum(r) for r in work]
            balance = max(per_rank) / (sum(per_rank) / len(per_rank))
        rows.append({
            "strategy": name, "mechanism": mech, "kind": strategy, "causal": causal, "layout": layout,
            "params": params, "world": world, "seq_len": n, "batch": b, "heads": h, "head_dim": d,
            "dtype": cfg["dtype"], "seconds_step": step[0].item(), "seconds_forward": step[1].item(),
            "bytes_sent_forward": c_fwd.bytes_sent, "bytes_sent_step": c_fwd.bytes_sent + c_bwd.bytes_sent,
            "control_bytes_step": c_fwd.control_bytes + c_bwd.control_bytes,
            "messages_step": c_fwd.messages + c_bwd.messages, "ring_work_max_over_mean": balance,
            "repeats": cfg["repeats"], "seed": cfg["seed"],
        })
    return rows


def _write_atomic(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def table(rows: list[dict]) -> str:
    """A markdown table of the rows."""
    head = "| strategy | P | N | ms / step (fwd+bwd) | ms fwd | MiB sent / rank / step | ring work max/mean |\n|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['strategy']} | {r['world']} | {r['seq_len']} | {r['status']}: {r.get('error', '')[:60]} | | | |")
            continue
        bal = "" if r["ring_work_max_over_mean"] is None else f"{r['ring_work_max_over_mean']:.2f}"
        lines.append(f"| {r['strategy']} | {r['world']} | {r['seq_len']} | {1e3 * r['seconds_step']:.1f} | "
                     f"{1e3 * r['seconds_forward']:.1f} | {r['bytes_sent_step'] / 2**20:.3f} | {bal} |")
    return "\n".join(lines)


KEY_FIELDS = ("strategy", "world", "seq_len", "batch", "heads", "head_dim", "dtype")
CSV_FIELDS = KEY_FIELDS + ("status", "seconds_step", "seconds_forward", "bytes_sent_step", "bytes_sent_forward",
                           "ring_work_max_over_mean")


def run_benchmark(worlds=(1, 2, 4), *, seq_len=2048, batch=1, heads=8, head_dim=64, dtype="float32", repeats=5,
                  warmup=1, seed=0, only=(), out: str | None = None, store: str | None = None,
                  timeout_s=600.0) -> list[dict]:
    """Measure every strategy for each ``P`` in ``worlds``; returns the rows.

    ``out``: a JSON file rewritten atomically after each ``P``. ``store``: a directory holding an
    :class:`attnzoo.bench.results.ResultStore` (journal + ``results.json``/``results.csv``); a rerun
    skips the ``P`` whose cells are all there, and a failed launch is recorded as ``status="error"``.
    """
    from ..bench.results import ResultStore, machine_info, now_iso
    from .launch import run

    cfg = dict(seq_len=seq_len, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, repeats=repeats,
               warmup=warmup, seed=seed, only=list(only))
    names = [s[0] for s in STRATEGIES if not only or any(o in s[0] for o in only)]
    meta = {"setting": SETTING, "config": cfg, **machine_info()}
    rows: list[dict] = []
    db = ResultStore(store, KEY_FIELDS, CSV_FIELDS) if store else None
    try:
        if db is not None:
            db.set_meta(**meta)
        for world in worlds:
            cells = [dict(strategy=n, world=world, seq_len=seq_len, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype)
                     for n in names if not (n.startswith("heads") and heads % world)]
            if db is not None and cells and all(db.finished(c) for c in cells):
                rows.extend(db.get(c) for c in cells)
                continue
            res = run(_rank_main, world, cfg, timeout_s=timeout_s, deadline_s=timeout_s * 4)
            if res.ok:
                new = [{**r, "status": "ok", "measured_at": now_iso()} for r in res.values()[0]]
            else:
                err = next((r.error for r in res.ranks if not r.ok), "hung")
                new = [{**c, "status": "error", "error": err[:500], "measured_at": now_iso()} for c in cells]
            rows.extend(new)
            if db is not None:
                for r in new:
                    db.add(r)
                db.flush()
            if out:
                _write_atomic(out, {**meta, "rows": rows})
    finally:
        if db is not None:
            db.close()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="time and communication volume per step of context-parallel attention")
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=[], help="substrings of strategy names to run")
    p.add_argument("--out", default="", help="JSON file for the rows (written atomically after each P)")
    p.add_argument("--store", default="", help="result-store directory (resumable journal + results.json/csv)")
    a = p.parse_args(argv)
    rows = run_benchmark(a.world, seq_len=a.seq_len, batch=a.batch, heads=a.heads, head_dim=a.head_dim, dtype=a.dtype,
                         repeats=a.repeats, warmup=a.warmup, seed=a.seed, only=a.only, out=a.out or None,
                         store=a.store or None)
    print(f"{SETTING}; {os.cpu_count()} CPU cores; B={a.batch} H={a.heads} d={a.head_dim} {a.dtype}")
    print(table(rows))


if __name__ == "__main__":
    main()

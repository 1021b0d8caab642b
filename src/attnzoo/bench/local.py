"""``attnzoo bench local``: local attention against dense SDPA and compiled FlexAttention with the same mask.

For ``sliding_window`` (window ``w``) and ``neighborhood`` (1-D kernel ``w``), causal and not, one
table of forward times at one length (default N = 16,384, w = 128, B = 1, H = 4, D = 64, float32):

* ``scaled_dot_product_attention`` with the equivalent dense boolean ``N x N`` mask;
* the mechanism's default pure-PyTorch path (``backend="blocked"``), forward, and forward + backward;
* the same mechanism with ``backend="flex"``: FlexAttention with the same mask as a ``BlockMask``,
  ``torch.compile``d (forward only: compiled FlexAttention has no CPU backward). Its compilation is
  timed separately (first call) and excluded from the run time.

Each contestant runs in a fresh process (so none inherits another's allocator, thread or compiler
state: in one shared process the blocked path's fused SDPA kernel sometimes ran 1.2x slower after the
dense baseline and the compilation), three rounds in turn with the others so that a slow spell of a
shared machine hits all of them alike; the table gives the median and the minimum over all timed
calls (the dense baseline and forward + backward: one call per round). The first round's outputs
are checked against each other before anything is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .capabilities import write_text_atomic

DENSE, BLOCKED, FLEX, FWD_BWD = LABELS = (
    "SDPA, dense boolean mask", "blocked (default)", "FlexAttention, compiled", "blocked, forward + backward")


def _contestants(mechanism: str, causal: bool, window: int, q, k, v) -> dict[str, Callable]:
    """``{label: call}`` of one table row group. The dense ``N x N`` mask is built on the dense
    contestant's first call only (a worker timing another contestant never allocates it)."""
    import attnzoo as az

    n = q.shape[2]
    settings = {"window": window} if mechanism == "sliding_window" else {"kernel_size": window}
    mask: list = []

    def dense():
        if not mask:
            if mechanism == "sliding_window":
                from ..core.masks import dense_mask, sliding_window

                mask.append(dense_mask(sliding_window(window, causal=causal), n, n, device=q.device))
            else:
                from ..mechanisms.sparse.neighborhood import neighborhood_dense_mask

                mask.append(neighborhood_dense_mask(n, (n,), window, 1, causal, device=q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0])

    def run(backend):
        return lambda: az.attention(q, k, v, mechanism=mechanism, causal=causal, backend=backend, **settings)

    return {DENSE: dense, BLOCKED: run("blocked"), FLEX: run("flex")}


def _inputs(n: int, heads: int, head_dim: int):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, heads, n, head_dim, generator=gen) for _ in range(3))


def time_contestant(mech: str, causal: bool, label: str, *, n: int, window: int, heads: int, head_dim: int,
                    calls: int, save: str = "") -> dict:
    """Time one contestant in this process: the first call (compilation included), warm-up calls, then
    ``calls`` timed calls. ``label == "blocked, forward + backward"`` times forward + backward. With
    ``save``, the first output is written there (``torch.save``) for the cross-check."""
    q, k, v = _inputs(n, heads, head_dim)
    if label == "blocked, forward + backward":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = _contestants(mech, causal, window, q, k, v)[BLOCKED]

        def step():
            fn().sum().backward()

        ctx = torch.enable_grad()
    else:
        fn = _contestants(mech, causal, window, q, k, v)[label]
        step = fn
        ctx = torch.no_grad()
    with ctx:
        t0 = time.perf_counter()
        out = step()
        first = time.perf_counter() - t0
        if save and out is not None:
            torch.save(out.detach(), save)
        # warm-up: the allocator's pools grow over the first calls (the neighborhood path ran 0.08, 0.053,
        # then 0.047 s); the seconds-long dense baseline and forward + backward get one warm-up call
        for _ in range(1 if label in (DENSE, FWD_BWD) else 3):
            step()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "times": times}


def _run_isolated(job: dict, threads: int) -> dict:
    """:func:`time_contestant` in a fresh Python process (so no contestant inherits another's allocator,
    thread or compiler state), with ``threads`` torch threads."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = ("import json, sys, torch; from attnzoo.bench.local import time_contestant; "
            f"torch.set_num_threads({threads}); job = json.loads(sys.argv[1]); "
            "print('RESULT ' + json.dumps(time_contestant(**job)))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"bench local: {job['mech']} {job['label']} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])




def measure(*, n: int = 16384, window: int = 128, heads: int = 4, head_dim: int = 64, repeats: int = 15,
            mechanisms=("sliding_window", "neighborhood"), rounds: int = 3, isolate: bool = True,
            labels=LABELS, progress: bool = True) -> list[dict]:
    """One row per (mechanism, causal, contestant): median and minimum seconds over ``repeats`` calls
    (the dense baseline and forward + backward: one call per round), and the first call's seconds.

    Each contestant runs ``rounds`` times, in turn with the others, each time in a fresh process
    (``isolate``; in-process otherwise, for tests), ``repeats / rounds`` calls a time. The first
    round's outputs are compared with the blocked path's before any timing is reported."""
    import tempfile

    threads = torch.get_num_threads()
    rows = []
    for mech in mechanisms:
        for causal in (True, False):
            times = {label: [] for label in labels}
            first = {}
            with tempfile.TemporaryDirectory() as tmp:
                saved = {label: str(Path(tmp) / f"{i}.pt") for i, label in enumerate(labels) if label != FWD_BWD}
                for rnd in range(rounds):
                    for label in labels:
                        calls = 1 if label in (DENSE, FWD_BWD) else max(1, -(-repeats // rounds))
                        save = saved.get(label, "") if rnd == 0 else ""
                        job = dict(mech=mech, causal=causal, label=label, n=n, window=window, heads=heads,
                                   head_dim=head_dim, calls=calls, save=save)
                        res = _run_isolated(job, threads) if isolate else time_contestant(**job)
                        times[label] += res["times"]
                        first.setdefault(label, res["first_call_s"])
                    if rnd == 0:
                        ref = torch.load(saved[BLOCKED])
                        for label, path in saved.items():
                            err = float((torch.load(path) - ref).abs().max())
                            if not err <= 1e-4:
                                raise RuntimeError(f"{mech} causal={causal}: {label} differs from the blocked path by {err:.2e}")
            for label, ts in times.items():
                rows.append({"mechanism": mech, "causal": causal, "contestant": label, "median_s": statistics.median(ts),
                             "min_s": min(ts), "first_call_s": None if label == FWD_BWD else first[label], "n": n,
                             "window": window, "heads": heads, "head_dim": head_dim, "repeats": len(ts),
                             "threads": threads, "isolated": isolate, "rounds": rounds})
            if progress:
                print(f"local: {mech} {'causal' if causal else 'non-causal'} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per mechanism and pattern; speed-up vs dense SDPA and ratio to FlexAttention."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"N = {r0['n']}, window/kernel {r0['window']}, B = 1, H = {r0['heads']}, D = {r0['head_dim']}, float32, "
        f"{r0['threads']} threads; forward seconds, median (min) of {max(r['repeats'] for r in rows)} calls in "
        f"{r0.get('rounds', '–')} rounds of fresh processes per contestant (the dense baseline and forward + "
        "backward: one call per round).",
        "",
        "| mechanism | pattern | SDPA, dense mask | blocked (default) | speed-up vs SDPA | FlexAttention, compiled "
        "| blocked / Flex | blocked, fwd + bwd |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r["mechanism"], r["causal"]), {})[r["contestant"]] = r
    for (mech, causal), g in groups.items():
        sd, bl, fx, fb = (g.get(k) for k in LABELS)

        def cell(r):
            return "–" if r is None else f"{r['median_s']:.4f} ({r['min_s']:.4f})"

        speedup = f"{sd['median_s'] / bl['median_s']:.0f}×" if sd and bl else "–"
        ratio = f"{bl['median_s'] / fx['median_s']:.2f}" if bl and fx else "–"
        compile_s = f", first call {fx['first_call_s']:.1f} s" if fx and fx.get("first_call_s") else ""
        lines.append(f"| `{mech}` | {'causal' if causal else 'non-causal'} | {cell(sd)} | {cell(bl)} | {speedup} | "
                     f"{cell(fx)}{compile_s} | {ratio} | {cell(fb)} |")
    return "\n".join(lines) + "\n"


def _cmd(args) -> int:
    torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.repeats < 1:
        raise SystemExit("bench local: --rounds and --repeats must be >= 1")
    rows = measure(n=args.n, window=args.window, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats,
                   rounds=args.rounds, mechanisms=tuple(args.mechanisms), progress=not args.no_progress)
    md = table(rows)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "local.md", "## Local attention vs dense SDPA and FlexAttention\n\n" + md)
        write_text_atomic(out / "local.json", json.dumps({"rows": rows}, indent=1))
    return 0


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "local",
        help="sliding_window and neighborhood vs dense-mask SDPA and compiled FlexAttention (issue targets)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--n", type=int, default=16384, help="sequence length (default 16384)")
    p.add_argument("--window", type=int, default=128, help="sliding window / neighborhood kernel (default 128)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15, help="timed calls per contestant, over the rounds (default 15)")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per contestant, in turn with the others (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mechanisms", nargs="+", default=["sliding_window", "neighborhood"],
                   choices=["sliding_window", "neighborhood"])
    p.add_argument("--out", default="", help="also write OUT/local.md and OUT/local.json")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnzoo.bench.local")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register_bench(sub)
    args = parser.parse_args(["local", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

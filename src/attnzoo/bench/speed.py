"""``attnzoo bench speed``: time, peak memory and FLOPs of every registered mechanism, side by side.

For every mechanism in the registry (nothing here names one), every CAB pattern it declares and a
sweep of lengths, one *cell* = (mechanism, pattern, N, M, mode) with mode ``fwd`` (inference) or
``fwdbwd`` (forward + backward, for ``trainable`` mechanisms) is measured in a process of its own
(:mod:`attnzoo.bench.speed_worker`): first-call time, steady-state median and quartiles, peak
resident memory, FLOPs. In the same run: ``F.scaled_dot_product_attention`` with the same
projections for the same pattern (``torch.sdpa``; for causal self-attention also with a dense
boolean mask, ``torch.sdpa_dense_mask``), the GEMM roofline (``torch.mm`` GFLOP/s), and for
``decode`` mechanisms the time per generated token at several context lengths.

Cells are journaled as they finish (:class:`~attnzoo.bench.results.ResultStore`): re-running the
same command skips finished cells, so an interrupted run resumes where it stopped. Budgets: per
cell (adaptive repeats; cells predicted to exceed it are skipped), per mechanism (a fair share of the
whole-run budget in the quick default, so the quick run stays ~10 minutes as the registry grows),
and per run. Every skip is recorded with its reason. See ``docs/benchmark-speed.md``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from .capabilities import write_text_atomic
from .results import ResultStore, machine_info, now_iso
from .speed_worker import BASELINES, GEMM, SDPA, SDPA_DENSE

PATTERN_SHORT = {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC"}
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward", "fwdbwd": "forward+backward", "decode": "decode step", "gemm": "GEMM"}

#: Fields that identify a cell (a resumed run skips a cell whose key is already finished).
KEY_FIELDS = (
    "kind",
    "mechanism",
    "pattern",
    "mode",
    "n",
    "m",
    "batch",
    "heads",
    "head_dim",
    "dtype",
    "threads",
    "seed",
)
#: The CSV's leading columns, in order (every other measured field follows).
CSV_FIELDS = KEY_FIELDS + (
    "status",
    "reason",
    "median_ms",
    "spread_ms",
    "p25_ms",
    "p75_ms",
    "min_ms",
    "repeats",
    "first_call_ms",
    "compile_s",
    "recompile_s",
    "peak_mib",
    "flops",
    "gflops_per_s",
    "roofline_fraction",
    "ratio_to_sdpa",
    "memory_ratio_to_sdpa",
    "state_bytes",
    "prefill_ms",
    "config_used",
    "config",
    "torch_version",
    "cpu_model",
    "measured_at",
    "wall_s",
)


@dataclass
class SweepConfig:
    """Everything that defines a speed sweep; :meth:`quick` and :meth:`full` are the presets."""

    lengths: tuple[int, ...] = (256, 1024, 4096)
    decode_contexts: tuple[int, ...] = (1024, 4096)
    modes: tuple[str, ...] = MODES
    patterns: tuple[str, ...] = registry.PATTERNS
    mechanisms: tuple[str, ...] | None = None  # None = every registered mechanism
    cross_ratio: float = 0.5  # source length M = round(cross_ratio * N) for the cross patterns
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    dtype: str = "float32"
    seed: int = 0
    threads: int = 0  # 0 = the number of CPU cores this process may use
    min_repeats: int = 5
    max_repeats: int = 100
    min_time: float = 0.2  # seconds of steady-state calls per cell (at least)
    cell_budget: float = 10.0  # seconds of measurement per cell; larger predicted cells are skipped
    cell_timeout: float | None = None  # kill a cell's process after this; None = 3 x cell_budget + 30 s
    mechanism_budget: float | None = 45.0  # seconds per mechanism (all its cells); None = unlimited
    run_budget: float | None = 600.0  # seconds for the whole run (fair share per mechanism); None = unlimited
    roofline_size: int = 4096
    roofline_repeats: int = 3
    max_memory_gb: float | None = None  # per cell; None = half the memory available at start
    retry_failed: bool = False
    start_method: str = "forkserver"  # "fork" shares the caller's state (tests register fake mechanisms)
    imports: tuple[str, ...] = ()  # modules each worker imports first (out-of-tree mechanisms)
    progress: bool = True
    plots: bool = True

    @classmethod
    def quick(cls, **kw: Any) -> SweepConfig:
        return cls(**kw)

    @classmethod
    def full(cls, **kw: Any) -> SweepConfig:
        base = dict(
            lengths=tuple(256 * 2**i for i in range(9)),  # 256 ... 65536
            decode_contexts=(1024, 4096, 16384, 32768),
            min_repeats=7,
            min_time=1.0,
            cell_budget=120.0,
            mechanism_budget=None,
            run_budget=None,
            roofline_repeats=5,
        )
        base.update(kw)
        return cls(**base)

    def resolved_threads(self) -> int:
        if self.threads:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    def memory_cap_bytes(self) -> int | None:
        if self.max_memory_gb is not None:
            return int(self.max_memory_gb * 2**30) if self.max_memory_gb > 0 else None
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 // 2
        except OSError:
            pass
        return None

    def source_length(self, pattern: str, n: int) -> int:
        return max(1, round(self.cross_ratio * n)) if pattern.endswith("cross") else n


# -- planning ------------------------------------------------------------------------------------------
def benchmarked_specs(cfg: SweepConfig) -> tuple[list[registry.Mechanism], list[str]]:
    """(specs with at least one CAB pattern in ``cfg.patterns``, names of selected specs without one)."""
    if cfg.mechanisms is None:
        specs = registry.all_specs()
    else:
        specs = [registry.get(name) for name in cfg.mechanisms]
    keep, left_out = [], []
    for spec in specs:
        (keep if any(p in cfg.patterns for p in spec.patterns) else left_out).append(spec)
    return keep, [s.name for s in left_out]


def _base(cfg: SweepConfig, threads: int) -> dict[str, Any]:
    return {
        "batch": cfg.batch,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
        "threads": threads,
        "seed": cfg.seed,
    }


def plan_group(
    name: str, patterns: Iterable[str], modes: Iterable[str], decode: bool, cfg: SweepConfig, threads: int
) -> list[dict]:
    """The cells of one mechanism (or baseline) in run order: forward cells (CAB's efficiency length is
    forward-only) smallest length first, then forward+backward, then decode; a budget that runs out
    therefore cuts the least important cells (large backward, long decode contexts)."""
    base = _base(cfg, threads)
    cells = []
    pats = [p for p in registry.PATTERNS if p in set(patterns) and p in cfg.patterns]
    for n in cfg.lengths:
        for p in pats:
            for mode in modes:
                cells.append(
                    {
                        **base,
                        "kind": "attn",
                        "mechanism": name,
                        "pattern": p,
                        "mode": mode,
                        "n": n,
                        "m": cfg.source_length(p, n),
                    }
                )
    if decode and "causal_self" in cfg.patterns:
        for c in cfg.decode_contexts:
            cells.append(
                {
                    **base,
                    "kind": "decode",
                    "mechanism": name,
                    "pattern": "causal_self",
                    "mode": "decode",
                    "n": c,
                    "m": c,
                }
            )
    priority = {"fwd": 0, "fwdbwd": 1, "decode": 2}
    return sorted(
        cells, key=lambda c: (priority.get(c["mode"], 3), c["n"], registry.PATTERNS.index(c["pattern"]))
    )


def plan(cfg: SweepConfig, threads: int) -> list[tuple[str, list[dict]]]:
    """Groups of cells in run order: roofline, baselines, then one group per mechanism."""
    specs, _ = benchmarked_specs(cfg)
    groups: list[tuple[str, list[dict]]] = []
    roof = {
        **_base(cfg, threads),
        "kind": "roofline",
        "mechanism": GEMM,
        "pattern": "",
        "mode": "gemm",
        "n": cfg.roofline_size,
        "m": cfg.roofline_size,
    }
    groups.append((GEMM, [roof]))
    wanted = {p for s in specs for p in s.patterns}
    any_trainable = any(s.supports("trainable") for s in specs)
    any_decode = any(s.supports("decode") for s in specs)
    modes = tuple(m for m in cfg.modes if m == "fwd" or any_trainable)
    groups.append((SDPA, plan_group(SDPA, wanted, modes, any_decode, cfg, threads)))
    if "causal_self" in wanted:
        groups.append((SDPA_DENSE, plan_group(SDPA_DENSE, ["causal_self"], modes, False, cfg, threads)))
    for s in specs:
        modes = tuple(m for m in cfg.modes if m == "fwd" or s.supports("trainable"))
        groups.append((s.name, plan_group(s.name, s.patterns, modes, s.supports("decode"), cfg, threads)))
    return groups


def _series(cell: dict) -> tuple:
    return (cell["kind"], cell["mechanism"], cell["pattern"], cell["mode"])


def predict_seconds(points: Sequence[tuple[int, float]], n: int) -> float | None:
    """Per-call seconds at length ``n`` from earlier (length, seconds) points of the same series.

    Extrapolates with the local exponent of the last two points (clamped to [1, 2.5]; 2 with a single
    point, i.e. assume the worst usual case of quadratic growth).
    """
    pts = sorted(p for p in points if p[1] and p[1] > 0 and p[0] < n)
    if not pts:
        return None
    n1, t1 = pts[-1]
    if len(pts) >= 2:
        n0, t0 = pts[-2]
        expo = math.log(t1 / t0) / math.log(n1 / n0) if n1 != n0 else 2.0
        expo = min(max(expo, 1.0), 2.5)
    else:
        expo = 2.0
    return t1 * (n / n1) ** expo


# -- running -------------------------------------------------------------------------------------------
class CellRunner:
    """Runs each cell in a fresh child process; a crash, OOM or hang ends only that cell."""

    def __init__(self, start_method: str = "forkserver", imports: Sequence[str] = ()) -> None:
        from .speed_worker import preload_modules

        self.ctx = mp.get_context(start_method)
        preload = preload_modules(imports)
        if start_method == "forkserver":
            self.ctx.set_forkserver_preload(preload)
        elif start_method == "fork":  # children inherit this process: import here, once
            for name in preload:
                importlib.import_module(name)
        self._proc = None

    def run(self, job: dict, timeout: float) -> dict[str, Any]:
        from .speed_worker import child_main

        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=child_main, args=(job, writer), daemon=True)
        self._proc = proc
        t0 = time.perf_counter()
        proc.start()
        writer.close()
        result, timed_out = None, False
        try:
            if reader.poll(timeout):
                try:
                    result = reader.recv()
                except (EOFError, OSError):
                    result = None
            else:
                timed_out = True
        finally:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            reader.close()
            self._proc = None
        wall = time.perf_counter() - t0
        if result is None:
            if timed_out:
                result = {
                    "status": "timeout",
                    "reason": f"no result within {timeout:.0f} s; the process was killed",
                }
            elif proc.exitcode is not None and proc.exitcode < 0:
                sig = -proc.exitcode
                name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
                status = "oom" if sig == signal.SIGKILL else "error"
                result = {
                    "status": status,
                    "reason": f"worker killed by {name}"
                    + (" (likely the out-of-memory killer)" if status == "oom" else ""),
                }
            else:
                result = {
                    "status": "error",
                    "reason": f"worker exited with code {proc.exitcode} without a result",
                }
        result["wall_s"] = wall
        return result

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: a plain stderr line per cell
        tqdm = None
    if tqdm is not None:
        return tqdm(
            total=total,
            initial=initial,
            desc="bench speed",
            unit="cell",
            disable=not enabled,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    class _Plain:
        def __init__(self):
            self.n = initial

        def set_postfix_str(self, s, refresh=True):
            if enabled:
                print(f"[{self.n}/{total}] {s}", file=sys.stderr, flush=True)

        def update(self, k=1):
            self.n += k

        def close(self):
            pass

    return _Plain()


def describe_cell(cell: dict) -> str:
    if cell["kind"] == "roofline":
        return f"GEMM roofline {cell['n']}x{cell['n']}"
    if cell["kind"] == "decode":
        return f"{cell['mechanism']} decode @ context {cell['n']}"
    short = PATTERN_SHORT.get(cell["pattern"], cell["pattern"])
    nm = f"N={cell['n']}" + (f" M={cell['m']}" if cell["m"] != cell["n"] else "")
    return f"{cell['mechanism']} {short} {nm} {cell['mode']}"


@dataclass
class SweepSummary:
    measured: int = 0
    resumed: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    left_out: list[str] = field(default_factory=list)


def run_sweep(cfg: SweepConfig, out_dir: str | os.PathLike, runner: CellRunner | None = None) -> SweepSummary:
    """Measure every planned cell not already in ``out_dir``'s store; write results and return a summary."""
    out = Path(out_dir)
    threads = cfg.resolved_threads()
    machine = machine_info()
    groups = plan(cfg, threads)
    _, left_out = benchmarked_specs(cfg)
    summary = SweepSummary(left_out=left_out)
    store = ResultStore(out, KEY_FIELDS, CSV_FIELDS, derive=derive_rows)
    store.set_meta(last_run_started=now_iso(), machine=machine, config=_config_meta(cfg, threads))
    runner = runner or CellRunner(cfg.start_method, cfg.imports)
    mem_cap = cfg.memory_cap_bytes()
    total = sum(len(cells) for _, cells in groups)
    done_before = sum(store.finished(c, cfg.retry_failed) for _, cells in groups for c in cells)
    bar = _progress(total, done_before, cfg.progress)
    t_run = time.perf_counter()
    n_mech_groups = sum(1 for name, _ in groups if name not in (GEMM, *BASELINES))
    mech_groups_done = 0
    last_flush = time.perf_counter()

    def record(cell: dict, result: dict) -> None:
        row = {
            **cell,
            **result,
            "torch_version": machine["torch_version"],
            "cpu_model": machine["cpu_model"],
            "measured_at": now_iso(),
        }
        store.add(row)

    try:
        for name, cells in groups:
            is_mech = name not in (GEMM, *BASELINES)
            t_group = time.perf_counter()
            group_budget = None
            if is_mech:
                shares = []
                if cfg.mechanism_budget is not None:
                    shares.append(cfg.mechanism_budget)
                if cfg.run_budget is not None:
                    left = cfg.run_budget - (time.perf_counter() - t_run)
                    shares.append(max(left, 0.0) / max(n_mech_groups - mech_groups_done, 1))
                group_budget = min(shares) if shares else None
            series_points: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
            series_stop: dict[tuple, str] = {}
            for cell in cells:
                key = _series(cell)
                prev = store.get(cell)
                if store.finished(cell, cfg.retry_failed):
                    _note_series(prev, series_points, series_stop)
                    continue
                bar.set_postfix_str(describe_cell(cell))
                reason = None
                if key in series_stop:
                    reason = series_stop[key]
                elif cfg.run_budget is not None and time.perf_counter() - t_run > cfg.run_budget:
                    reason = f"run budget of {cfg.run_budget:.0f} s used up"
                elif group_budget is not None and time.perf_counter() - t_group > group_budget:
                    reason = f"mechanism budget of {group_budget:.0f} s used up"
                else:
                    guess = predict_seconds(series_points[key], cell["n"])
                    if guess is not None and guess * 3 > cfg.cell_budget:
                        reason = f"predicted {guess:.2f} s per call; 3 calls exceed the per-cell budget of {cfg.cell_budget:.0f} s"
                        series_stop[key] = reason.replace(
                            "predicted", f"after N={cell['n']} was predicted at", 1
                        )
                if reason is not None:
                    record(cell, {"status": "skipped", "reason": reason})
                    summary.skipped += 1
                    bar.update()
                    continue
                job = {
                    **cell,
                    "min_repeats": cfg.roofline_repeats if cell["kind"] == "roofline" else cfg.min_repeats,
                    "max_repeats": cfg.max_repeats,
                    "min_time": cfg.min_time,
                    "budget": cfg.cell_budget,
                    "max_memory_bytes": mem_cap,
                    "imports": list(cfg.imports),
                }
                timeout = cfg.cell_timeout if cfg.cell_timeout is not None else 3 * cfg.cell_budget + 30
                result = runner.run(job, timeout=timeout)
                record(cell, result)
                _note_series(store.get(cell), series_points, series_stop)
                if result["status"] == "ok":
                    summary.measured += 1
                else:
                    summary.failed += 1
                bar.update()
                if time.perf_counter() - last_flush > 10:
                    store.flush()
                    last_flush = time.perf_counter()
            if is_mech:
                mech_groups_done += 1
    except KeyboardInterrupt:
        runner.kill()
        summary.interrupted = True
    finally:
        bar.close()
        store.set_meta(last_run_finished=now_iso(), interrupted=summary.interrupted)
        store.close()
    summary.resumed = done_before
    summary.seconds = time.perf_counter() - t_run
    return summary


def _note_series(row: dict | None, points: dict, stop: dict) -> None:
    """Feed a finished row into its series' extrapolation points and stop rules."""
    if row is None:
        return
    key = _series(row)
    if row.get("status") == "ok" and row.get("median_ms"):
        # the fastest call: the least disturbed by other load, so one noisy cell does not skip the rest
        points[key].append((row["n"], (row.get("min_ms") or row["median_ms"]) / 1e3))
    elif row.get("status") in ("oom", "timeout"):
        stop.setdefault(key, f"larger than N={row['n']}, which ended in {row['status']}")


def _config_meta(cfg: SweepConfig, threads: int) -> dict[str, Any]:
    d = asdict(cfg)
    d["threads"] = threads
    d.pop("progress", None)
    return d


# -- derived columns and analysis ------------------------------------------------------------------------
def roofline_gflops(rows: Iterable[dict], threads: int | None = None, dtype: str = "float32") -> float | None:
    vals = [
        r["gflops_per_s"]
        for r in rows
        if r.get("kind") == "roofline"
        and r.get("status") == "ok"
        and r.get("gflops_per_s")
        and (threads is None or r.get("threads") == threads)
        and r.get("dtype") == dtype
    ]
    return max(vals) if vals else None


def _baseline_key(r: dict) -> tuple:
    return (
        r["kind"],
        r["pattern"],
        r["mode"],
        r["n"],
        r["m"],
        r["batch"],
        r["heads"],
        r["head_dim"],
        r["dtype"],
        r["threads"],
        r["seed"],
    )


def derive_rows(rows: list[dict]) -> list[dict]:
    """Add achieved GFLOP/s, fraction of the GEMM roofline and the ratios to SDPA to each row."""
    roof = {}
    for r in rows:
        if r.get("kind") == "roofline" and r.get("status") == "ok" and r.get("gflops_per_s"):
            k = (r["threads"], r["dtype"])
            roof[k] = max(roof.get(k, 0.0), r["gflops_per_s"])
    sdpa = {_baseline_key(r): r for r in rows if r.get("mechanism") == SDPA and r.get("status") == "ok"}
    for r in rows:
        if r.get("kind") not in ("attn", "decode") or r.get("status") != "ok":
            continue
        med = r.get("median_ms")
        if r.get("flops") and med:
            r["gflops_per_s"] = r["flops"] / (med / 1e3) / 1e9
            top = roof.get((r["threads"], r["dtype"]))
            if top:
                r["roofline_fraction"] = r["gflops_per_s"] / top
        base = sdpa.get(_baseline_key(r))
        if base is not None and med and base.get("median_ms"):
            r["ratio_to_sdpa"] = med / base["median_ms"]
            if r.get("peak_mib") is not None and base.get("peak_mib"):
                r["memory_ratio_to_sdpa"] = r["peak_mib"] / base["peak_mib"]
    return rows


def efficiency_length(
    lengths: Sequence[int], values: Sequence[float | None], baseline: Sequence[float | None]
) -> tuple[float | None, str]:
    """CAB's efficiency length from measured curves: the length from which the mechanism stays strictly
    below the baseline (time or memory), by log-log interpolation of the ratio between the two measured
    lengths around the last crossing.

    Returns ``(length, text)``: ``length`` is ``None`` when no length has both values, ``math.inf``
    when the mechanism is not below the baseline at the longest common length ("never within the
    sweep"), and the first common length when it is below everywhere (text "<= N").
    """
    pts = [
        (n, a / b)
        for n, a, b in sorted(zip(lengths, values, baseline))
        if a is not None and b is not None and a > 0 and b > 0
    ]
    if not pts:
        return None, "n/a"
    if pts[-1][1] >= 1:
        return math.inf, f"never (≤ {pts[-1][0]:,})"
    above = [i for i, (_, r) in enumerate(pts) if r >= 1]
    if not above:
        return float(pts[0][0]), f"≤ {pts[0][0]:,}"
    i = above[-1]
    (n1, r1), (n2, r2) = pts[i], pts[i + 1]
    if r1 == 1.0:
        return float(n1), f"{n1:,}"
    frac = math.log(r1) / (math.log(r1) - math.log(r2))
    length = math.exp(math.log(n1) + frac * (math.log(n2) - math.log(n1)))
    return length, f"{length:,.0f}"


def _select(rows: Iterable[dict], cfg: SweepConfig, threads: int) -> list[dict]:
    """The rows of this configuration (a store may also hold cells measured with other settings)."""
    want = _base(cfg, threads)
    return [r for r in rows if all(r.get(k) == v for k, v in want.items())]


def _curve(
    rows: Sequence[dict], mech: str, pattern: str, mode: str, metric: str, kind: str = "attn"
) -> dict[int, float]:
    return {
        r["n"]: r[metric]
        for r in rows
        if r.get("kind") == kind
        and r["mechanism"] == mech
        and r["pattern"] == pattern
        and r["mode"] == mode
        and r.get("status") == "ok"
        and r.get(metric) is not None
    }


def efficiency_table(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """One entry per (mechanism, pattern): efficiency lengths in time (fwd, fwd+bwd) and memory (fwd)."""
    mechs = sorted(
        {r["mechanism"] for r in rows if r.get("kind") == "attn" and r["mechanism"] not in BASELINES}
    )
    out = []
    for mech in mechs:
        for pattern in registry.PATTERNS:
            if not any(
                r["mechanism"] == mech and r["pattern"] == pattern and r.get("kind") == "attn" for r in rows
            ):
                continue
            entry: dict[str, Any] = {"mechanism": mech, "pattern": pattern}
            for label, mode, metric in (
                ("time_fwd", "fwd", "median_ms"),
                ("time_fwdbwd", "fwdbwd", "median_ms"),
                ("memory_fwd", "fwd", "peak_mib"),
                ("memory_fwdbwd", "fwdbwd", "peak_mib"),
            ):
                mine = _curve(rows, mech, pattern, mode, metric)
                base = _curve(rows, SDPA, pattern, mode, metric)
                ns = sorted(set(mine) & set(base))
                entry[label] = efficiency_length(ns, [mine[n] for n in ns], [base[n] for n in ns])
                if ns and mode == "fwd" and metric == "median_ms":
                    entry["ratio_at"] = (ns[-1], mine[ns[-1]] / base[ns[-1]])
            out.append(entry)
    return out


# -- the report ----------------------------------------------------------------------------------------
def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _status_text(r: dict | None) -> str:
    if r is None:
        return "·"
    st = r.get("status")
    return {"skipped": "skip", "oom": "OOM", "timeout": "timeout", "error": "error"}.get(st, st or "?")


def _sort_key(entry: dict) -> tuple:
    def v(x):
        return math.inf if x[0] is None else x[0]

    return (
        v(entry["time_fwd"]),
        v(entry["time_fwdbwd"]),
        v(entry["memory_fwd"]),
        entry["mechanism"],
        registry.PATTERNS.index(entry["pattern"]),
    )


def render_markdown(
    rows: Sequence[dict],
    meta: dict,
    cfg: SweepConfig,
    threads: int,
    plot_files: dict[str, str],
    summary: SweepSummary | None = None,
) -> str:
    """The report section: setup, plots, ranking by efficiency length, per-pattern tables, decode, failures."""
    rows = derive_rows([dict(r) for r in rows])
    machine = meta.get("machine", {})
    roof = roofline_gflops(rows, threads, cfg.dtype)
    attn = [r for r in rows if r.get("kind") == "attn"]
    lines = ["## Speed, memory and FLOPs", ""]
    lines += [
        f"Measured on **{machine.get('cpu_model', '?')}** ({machine.get('cpu_cores', '?')} cores available, "
        f"torch threads = {threads}), torch {machine.get('torch_version', '?')}, Python {machine.get('python_version', '?')}. "
        f"Modules with q/k/v/output projections, batch {cfg.batch}, {cfg.heads} heads of width {cfg.head_dim} "
        f"(model width {cfg.heads * cfg.head_dim}), {cfg.dtype}, seed {cfg.seed}; cross-attention source length "
        f"M = {cfg.cross_ratio:g}·N. Every mechanism runs with its registered defaults (its `test_config` only if "
        "the defaults fail; the `config_used` column says which).",
        "",
        "Method: one process per cell; a first call (reported separately as *first call*, it includes lazy "
        "initialisation and any compilation), then steady-state calls until "
        f"≥ {cfg.min_repeats} calls and ≥ {cfg.min_time:g} s; time = median, spread = interquartile range. Peak memory = "
        "resident-set high-water mark over one call above the level before it (`/proc/self/clear_refs` + `VmHWM`; "
        "includes allocator slack, an upper bound). FLOPs = `FlopCounterMode` (matmul-class ops only; CPU SDPA "
        "counted with its causal savings). Baselines in the same run: `torch.sdpa` = "
        "`F.scaled_dot_product_attention` with the same projections (`is_causal` for causal self-attention), "
        "`torch.sdpa_dense_mask` = the same with an explicit boolean causal mask.",
        "",
        f"GEMM roofline: **{_fmt_num(roof)} GFLOP/s** (`torch.mm`, {cfg.roofline_size}², {cfg.dtype}, torch threads = {threads}).",
        "",
    ]
    counts = defaultdict(int)
    for r in rows:
        counts[r.get("status")] += 1
    budget_bits = [f"per cell {cfg.cell_budget:g} s"]
    budget_bits.append(
        f"per mechanism {cfg.mechanism_budget:g} s"
        if cfg.mechanism_budget is not None
        else "per mechanism unlimited"
    )
    budget_bits.append(
        f"whole run {cfg.run_budget:g} s" if cfg.run_budget is not None else "whole run unlimited"
    )
    lines.append(
        f"Sweep: N ∈ {{{', '.join(f'{n:,}' for n in cfg.lengths)}}}, decode contexts {{{', '.join(f'{n:,}' for n in cfg.decode_contexts)}}}; "
        f"budgets: {', '.join(budget_bits)}. Cells: {counts['ok']} measured, {counts['skipped']} skipped, "
        f"{counts['error'] + counts['oom'] + counts['timeout']} failed (error {counts['error']}, out of memory {counts['oom']}, timeout {counts['timeout']})."
        + (
            f" This run: {summary.measured} measured, {summary.resumed} resumed from an earlier run, {summary.seconds / 60:.1f} min."
            if summary
            else ""
        )
    )
    if summary and summary.left_out:
        lines.append("")
        lines.append(
            "Not benchmarked here (no CAB attention pattern, e.g. spatial-only): "
            + ", ".join(f"`{n}`" for n in summary.left_out)
            + "."
        )
    lines.append("")
    for key, title in (
        ("time_fwd", "Forward time"),
        ("time_fwdbwd", "Forward+backward time"),
        ("memory_fwd", "Forward peak memory"),
        ("memory_fwdbwd", "Forward+backward peak memory"),
        ("decode", "Decode time per token"),
    ):
        if key in plot_files:
            lines += [f"![{title}]({plot_files[key]})", ""]

    # ranking
    table = efficiency_table(attn)
    if table:
        lines += [
            "### Efficiency length (vs `torch.sdpa`, measured curves)",
            "",
            "The length from which a mechanism stays faster (or leaner) than SDPA for the same pattern, by log-log "
            "interpolation between measured lengths (CAB's definition; not CAB's polynomial fits, which give "
            'meaningless roots when the baseline is itself O(N) in memory). "never (≤ N)": not below SDPA at the '
            "longest length measured for both. Ranked by forward time.",
            "",
            "| rank | mechanism | pattern | time, fwd | time, fwd+bwd | memory, fwd | memory, fwd+bwd | fwd time ×SDPA (at N) |",
            "|---:|---|---|---:|---:|---:|---:|---:|",
        ]
        for i, e in enumerate(sorted(table, key=_sort_key), 1):
            ratio = e.get("ratio_at")
            rtxt = f"{ratio[1]:.2f} ({ratio[0]:,})" if ratio else "–"
            lines.append(
                f"| {i} | `{e['mechanism']}` | {PATTERN_SHORT[e['pattern']]} | {e['time_fwd'][1]} | {e['time_fwdbwd'][1]} | {e['memory_fwd'][1]} | {e['memory_fwdbwd'][1]} | {rtxt} |"
            )
        lines.append("")

    # per pattern tables
    lengths = sorted({r["n"] for r in attn})
    for pattern in registry.PATTERNS:
        prow = [r for r in attn if r["pattern"] == pattern]
        if not prow:
            continue
        mechs = [m for m in (SDPA, SDPA_DENSE) if any(r["mechanism"] == m for r in prow)]
        mechs += sorted({r["mechanism"] for r in prow} - set(BASELINES))
        ns = [n for n in lengths if any(r["n"] == n for r in prow)]
        m_note = f", M = {cfg.cross_ratio:g}·N" if pattern.endswith("cross") else ""
        lines += [
            f"### {pattern.replace('_', ' ')} ({PATTERN_SHORT[pattern]}{m_note})",
            "",
            "Forward / forward+backward time in ms (×SDPA), peak MiB forward / forward+backward.",
            "",
            "| mechanism | " + " | ".join(f"N={n:,}" for n in ns) + " |",
            "|---|" + "---:|" * len(ns),
        ]
        index = {(r["mechanism"], r["n"], r["mode"]): r for r in prow}
        for mech in mechs:
            cells = []
            for n in ns:
                f, b = index.get((mech, n, "fwd")), index.get((mech, n, "fwdbwd"))
                cells.append(_cell_text(f, b))
            label = f"**`{mech}`**" if mech == SDPA else f"`{mech}`"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")

    # detail at the longest measured length of each (mechanism, pattern, mode)
    detail = [r for r in attn if r.get("status") == "ok"]
    if detail:
        lines += [
            "### Throughput and first-call cost (longest measured length per mechanism and pattern)",
            "",
            "*first call* includes lazy initialisation; *compile s* is the part `torch.compile` reports "
            "(Dynamo/Inductor, FlexAttention); a † marks recompilation during the timed calls.",
            "",
            "| mechanism | pattern | N | mode | median ms | spread ms | first call ms | compile s | peak MiB | GFLOP | GFLOP/s | % roofline | config |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        longest: dict[tuple, dict] = {}
        for r in detail:
            k = (r["mechanism"], r["pattern"], r["mode"])
            if k not in longest or r["n"] > longest[k]["n"]:
                longest[k] = r
        order = {m: i for i, m in enumerate(BASELINES)}
        for k in sorted(
            longest, key=lambda k: (registry.PATTERNS.index(k[1]), order.get(k[0], 9), k[0], k[2])
        ):
            r = longest[k]
            frac = r.get("roofline_fraction")
            lines.append(
                f"| `{r['mechanism']}` | {PATTERN_SHORT[r['pattern']]} | {r['n']:,} | {r['mode']} | {_fmt_ms(r.get('median_ms'))} | {_fmt_ms(r.get('spread_ms'))} | "
                f"{_fmt_ms(r.get('first_call_ms'))} | {_fmt_compile(r)} | {_fmt_num(r.get('peak_mib'))} | {_fmt_num((r.get('flops') or 0) / 1e9, 2) if r.get('flops') is not None else '–'} | "
                f"{_fmt_num(r.get('gflops_per_s'))} | {_fmt_num(100 * frac) if frac is not None else '–'} | {r.get('config_used', '')} |"
            )
        lines.append("")

    dec = [r for r in rows if r.get("kind") == "decode"]
    if dec:
        ctxs = sorted({r["n"] for r in dec})
        mechs = [m for m in (SDPA,) if any(r["mechanism"] == m for r in dec)] + sorted(
            {r["mechanism"] for r in dec} - {SDPA}
        )
        index = {(r["mechanism"], r["n"]): r for r in dec}
        lines += [
            "### Decode: time per generated token (ms) and state size",
            "",
            "After a prefill of the context, `step` per token (batch "
            f"{cfg.batch}); state = bytes of the decoding state (KV cache or recurrent state). A flat row is what a "
            "recurrent mechanism promises. `torch.sdpa` = one-token SDPA over a preallocated cache.",
            "",
            "| mechanism | " + " | ".join(f"ctx {c:,}" for c in ctxs) + " |",
            "|---|" + "---:|" * len(ctxs),
        ]
        for mech in mechs:
            cells = []
            for c in ctxs:
                r = index.get((mech, c))
                if r is None or r.get("status") != "ok":
                    cells.append(_status_text(r))
                else:
                    cells.append(f"{_fmt_ms(r['median_ms'])} ({_fmt_bytes(r.get('state_bytes'))})")
            lines.append(f"| `{mech}` | " + " | ".join(cells) + " |")
        lines.append("")

    bad = [r for r in rows if r.get("status") not in ("ok", None)]
    if bad:
        lines += ["### Skipped and failed cells", "", "| cell | status | reason |", "|---|---|---|"]
        for r in sorted(bad, key=lambda r: (r["mechanism"], r["kind"], r["pattern"], r["mode"], r["n"])):
            why = (r.get("reason") or r.get("error") or "").replace("|", "\\|").replace("\n", " ")[:160]
            lines.append(f"| {describe_cell(r)} | {r['status']} | {why} |")
        lines.append("")
    return "\n".join(lines)


def _fmt_compile(r: dict) -> str:
    c = r.get("compile_s")
    if c is None:
        return "–"
    text = f"{c:.2f}" if c else "0"
    return text + (" †" if (r.get("recompile_s") or 0) > 0 else "")


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.1f} {unit}"
    return f"{b} B"


def _cell_text(f: dict | None, b: dict | None) -> str:
    if f is None and b is None:
        return "·"

    def t(r):
        if r is None:
            return "·"
        if r.get("status") != "ok":
            return _status_text(r)
        s = _fmt_ms(r.get("median_ms"))
        if r.get("ratio_to_sdpa") is not None and r["mechanism"] != SDPA:
            s += f" ({r['ratio_to_sdpa']:.2f}×)"
        return s

    def mem(r):
        return _fmt_num(r.get("peak_mib")) if r is not None and r.get("status") == "ok" else "–"

    return f"{t(f)} / {t(b)}<br>{mem(f)} / {mem(b)} MiB"


def write_report(
    out_dir: str | os.PathLike, cfg: SweepConfig, summary: SweepSummary | None = None, link_prefix: str = ""
) -> str:
    """Plots + Markdown for the store in ``out_dir``; writes ``out_dir/README.md`` and returns the Markdown.

    ``link_prefix`` is prepended to the plot file names in the returned Markdown (for a report one
    folder up); ``out_dir/README.md`` itself links without it.
    """
    out = Path(out_dir)
    threads = cfg.resolved_threads()
    store = ResultStore(out, KEY_FIELDS, CSV_FIELDS, lock=False)
    rows = _select(store.rows(), cfg, threads)
    plot_files: dict[str, str] = {}
    if cfg.plots:
        from .plots import plot_all

        plot_files = plot_all(derive_rows([dict(r) for r in rows]), out)
    local = render_markdown(rows, store.meta, cfg, threads, plot_files, summary)
    write_text_atomic(out / "README.md", local + "\n")
    if link_prefix:
        return render_markdown(
            rows, store.meta, cfg, threads, {k: link_prefix + v for k, v in plot_files.items()}, summary
        )
    return local


# -- CLI and report hooks ---------------------------------------------------------------------------------
def _csv_list(text: str | None, conv=str) -> tuple | None:
    if text is None:
        return None
    return tuple(conv(x.strip()) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    over: dict[str, Any] = {}
    if args.mechanisms:
        over["mechanisms"] = _csv_list(args.mechanisms)
    if args.patterns:
        pats = _csv_list(args.patterns)
        inv = {v: k for k, v in PATTERN_SHORT.items()}
        over["patterns"] = tuple(inv.get(p.upper(), p) for p in pats)
        bad = set(over["patterns"]) - set(registry.PATTERNS)
        if bad:
            raise SystemExit(
                f"unknown pattern(s) {sorted(bad)}; use {', '.join(registry.PATTERNS)} or NS,CS,NC,CC"
            )
    if args.lengths:
        over["lengths"] = _csv_list(args.lengths, int)
    if args.decode_contexts is not None:
        over["decode_contexts"] = _csv_list(args.decode_contexts, int) or ()
    if args.modes:
        over["modes"] = _csv_list(args.modes)
    for name in (
        "batch",
        "heads",
        "head_dim",
        "threads",
        "seed",
        "cell_budget",
        "cross_ratio",
        "max_memory_gb",
        "dtype",
        "roofline_size",
    ):
        v = getattr(args, name)
        if v is not None:
            over[name] = v
    if args.budget is not None:
        over["run_budget"] = args.budget if args.budget > 0 else None
    if args.mechanism_budget is not None:
        over["mechanism_budget"] = args.mechanism_budget if args.mechanism_budget > 0 else None
    over["retry_failed"] = args.retry_failed
    over["progress"] = not args.no_progress
    over["plots"] = not args.no_plots
    if args.imports:
        over["imports"] = _csv_list(args.imports)
    return SweepConfig.full(**over) if args.full else SweepConfig.quick(**over)


def _cmd_speed(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out) / "speed"
    if cfg.mechanisms:
        for name in cfg.mechanisms:
            try:
                registry.get(name)
            except KeyError as e:
                print(e.args[0], file=sys.stderr)
                return 2
    summary = None
    if not args.report_only:
        summary = run_sweep(cfg, out)
    write_report(out, cfg, summary)
    if summary is not None:
        print(
            f"speed: {summary.measured} cells measured, {summary.resumed} already done, {summary.skipped} skipped, "
            f"{summary.failed} failed in {summary.seconds / 60:.1f} min; results in {out}/results.csv, report {out}/README.md",
            file=sys.stderr,
        )
        if summary.interrupted:
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130
    return 0


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "speed",
        help="time, peak memory and FLOPs of every mechanism vs SDPA (resumable)",
        description="Time, peak memory and FLOPs of every registered mechanism, every declared CAB pattern, a sweep of "
        "lengths, against SDPA and the GEMM roofline. Quick default ~10 min on 2 cores; re-running resumes.",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="the full sweep (N = 256 ... 65536, decode up to 32k, 120 s per cell, no run budget)",
    )
    p.add_argument(
        "--out", default="report", help="report folder; results go to OUT/speed/ (default: report)"
    )
    p.add_argument(
        "--mechanisms", help="comma-separated mechanism names (default: every registered mechanism)"
    )
    p.add_argument("--patterns", help="comma-separated patterns (NS,CS,NC,CC or full names)")
    p.add_argument("--lengths", help="comma-separated sequence lengths N")
    p.add_argument(
        "--decode-contexts",
        dest="decode_contexts",
        help="comma-separated decode context lengths ('' for none)",
    )
    p.add_argument("--modes", help="comma-separated among fwd,fwdbwd")
    p.add_argument(
        "--budget", type=float, help="whole-run budget in seconds (0 = unlimited; quick default 600)"
    )
    p.add_argument(
        "--mechanism-budget",
        dest="mechanism_budget",
        type=float,
        help="seconds per mechanism (0 = unlimited; quick default 45)",
    )
    p.add_argument(
        "--cell-budget",
        dest="cell_budget",
        type=float,
        help="seconds of measurement per cell (quick 10, full 120)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: all cores available)")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", dest="head_dim", type=int)
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--cross-ratio",
        dest="cross_ratio",
        type=float,
        help="source length M = ratio * N for cross patterns (default 0.5)",
    )
    p.add_argument(
        "--max-memory-gb",
        dest="max_memory_gb",
        type=float,
        help="memory cap per cell (default: half the available memory; 0 = none)",
    )
    p.add_argument(
        "--roofline-size", dest="roofline_size", type=int, help="GEMM size for the roofline (default 4096)"
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="measure again the cells that failed (error, OOM, timeout) before",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rewrite the report and plots from stored results"
    )
    p.add_argument(
        "--import",
        dest="imports",
        help="comma-separated modules each worker imports first (out-of-tree mechanisms)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.set_defaults(func=_cmd_speed)


def report_section(out_dir: Path, quick: bool) -> str:
    """``attnzoo report``: run (or resume) the quick default (``--full`` sweep if not quick) and return its section."""
    cfg = SweepConfig.quick() if quick else SweepConfig.full()
    speed_dir = Path(out_dir) / "speed"
    summary = run_sweep(cfg, speed_dir)
    return write_report(speed_dir, cfg, summary, link_prefix="speed/")

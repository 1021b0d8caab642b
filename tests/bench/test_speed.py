"""The speed benchmark's machinery: resumability, atomic writes, failure isolation, efficiency length,
the CSV fields, the plots, FLOP and memory measurement. Tiny sizes; no timing is asserted.

Fake mechanisms are put into the registry with ``monkeypatch`` (restored after each test, so the
conformance suite never sees them) and the cells run with the ``fork`` start method so the children
inherit them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F

from attnzoo import registry
from attnzoo.bench import speed, speed_worker
from attnzoo.bench.results import ResultStore, read_rows
from attnzoo.core.module import AttentionModule

# -- fake mechanisms ----------------------------------------------------------------------------------


class _Fake(AttentionModule):
    behaviour = "ok"

    def attend(self, q, k, v, *, cross, key_padding_mask):
        b = self.behaviour
        if b == "error":
            raise RuntimeError("deliberate failure")
        if b == "oom":
            torch.empty(8 * 2**30, dtype=torch.uint8)  # 8 GiB of address space: over the cap of the test
        if b == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if b == "hang":
            time.sleep(600)
        # non-causal linear attention with elu+1 features: O(N) and cheap
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        kv = fk.transpose(-1, -2) @ v
        z = fq @ fk.sum(-2, keepdim=True).transpose(-1, -2)
        return (fq @ kv) / z


def _fake_spec(
    name: str, behaviour: str, caps=("noncausal_self", "noncausal_cross", "trainable")
) -> registry.Mechanism:
    cls = type(f"Fake_{name}", (_Fake,), {"behaviour": behaviour})
    spec = registry.Mechanism(
        name=name,
        paper="test double",
        arxiv=None,
        family="linear",
        capabilities=frozenset(caps),
        complexity="O(N)",
        module=cls,
        defaults=MappingProxyType({}),
        test_config=MappingProxyType({}),
    )
    cls.spec = spec
    return spec


@pytest.fixture
def fakes(monkeypatch):
    registry.all_specs()  # load the real ones first, so nothing re-registers over the fakes later
    specs = {}
    for name, behaviour in (
        ("aaa_fake_lin", "ok"),
        ("aab_fake_error", "error"),
        ("aac_fake_oom", "oom"),
        ("aad_fake_kill", "kill"),
        ("aae_fake_hang", "hang"),
    ):
        specs[name] = _fake_spec(name, behaviour)
        monkeypatch.setitem(registry._REGISTRY, name, specs[name])
    return specs


def tiny(**kw) -> speed.SweepConfig:
    base = dict(
        lengths=(16, 32),
        decode_contexts=(16,),
        patterns=("noncausal_self", "causal_self", "noncausal_cross"),
        batch=1,
        heads=2,
        head_dim=8,
        threads=1,
        min_repeats=2,
        max_repeats=3,
        min_time=0.0,
        cell_budget=5.0,
        cell_timeout=4.0,
        mechanism_budget=None,
        run_budget=None,
        roofline_size=64,
        roofline_repeats=2,
        max_memory_gb=1.0,
        start_method="fork",
        progress=False,
    )
    base.update(kw)
    return speed.SweepConfig(**base)


class CountingRunner(speed.CellRunner):
    """Records every cell it runs; raises KeyboardInterrupt (a Ctrl-C) after ``stop_after`` cells."""

    def __init__(self, stop_after: int | None = None):
        super().__init__("fork")
        self.ran: list[tuple] = []
        self.stop_after = stop_after

    def run(self, job, timeout):
        if self.stop_after is not None and len(self.ran) >= self.stop_after:
            raise KeyboardInterrupt
        self.ran.append(tuple(job[k] for k in speed.KEY_FIELDS))
        return super().run(job, timeout)


def _keys(rows):
    return [tuple(r[k] for k in speed.KEY_FIELDS) for r in rows]


# -- efficiency length and extrapolation -------------------------------------------------------------------


def test_efficiency_length_recovers_a_known_crossing():
    ns = [256, 512, 1024, 2048, 4096]
    base = [(n / 1000) ** 2 for n in ns]  # quadratic
    mech = [n / 1000 for n in ns]  # linear: ratio 1000/N, crosses 1 at N = 1000 exactly
    length, text = speed.efficiency_length(ns, mech, base)
    assert length == pytest.approx(1000, rel=1e-9)
    assert text == "1,000"


def test_efficiency_length_edge_cases():
    ns = [256, 512, 1024]
    assert speed.efficiency_length(ns, [2, 3, 4], [1, 1, 1]) == (math.inf, "never (≤ 1,024)")
    assert speed.efficiency_length(ns, [1, 1, 1], [1, 1, 1])[0] == math.inf  # equal is not faster
    assert speed.efficiency_length(ns, [0.5, 0.5, 0.5], [1, 1, 1]) == (256.0, "≤ 256")
    assert speed.efficiency_length(ns, [None, None, None], [1, 1, 1]) == (None, "n/a")
    # below at 256, above at 512, below from 1024 on: the length from which it *stays* below
    length, _ = speed.efficiency_length(ns, [0.9, 1.2, 0.8], [1, 1, 1])
    assert 512 < length < 1024
    # a missing point is interpolated over: above at 256, (512 failed), below at 1024
    length, _ = speed.efficiency_length(ns, [2.0, None, 0.5], [1, 1, 1])
    assert length == pytest.approx(512, rel=1e-9)  # log-midpoint of 256 and 1024 for ratios 2 and 1/2


def test_predict_seconds_extrapolates_the_local_exponent():
    assert speed.predict_seconds([], 1024) is None
    assert speed.predict_seconds([(256, 1.0)], 512) == pytest.approx(4.0)  # one point: assume quadratic
    assert speed.predict_seconds([(256, 1.0), (512, 2.0)], 1024) == pytest.approx(4.0)  # linear
    assert speed.predict_seconds([(256, 1.0), (512, 64.0)], 1024) == pytest.approx(64 * 2**2.5)  # clamped


# -- the store ----------------------------------------------------------------------------------------------


def test_write_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    store = ResultStore(tmp_path, ("k",), ("k", "v"))
    store.add({"k": 1, "v": "first"})
    store.flush()
    before = (tmp_path / "results.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk gone")

    store.add({"k": 2, "v": "second"})
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        store.flush()
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == before  # the old file is intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    store.close()
    # the journal had the second row all along: a new store sees both
    assert sorted(r["k"] for r in ResultStore(tmp_path, ("k",), lock=False).rows()) == [1, 2]


def test_torn_journal_line_is_ignored_and_each_key_kept_once(tmp_path):
    with ResultStore(tmp_path, ("k",), ("k", "v")) as store:
        store.add({"k": 1, "v": 1, "status": "skipped"})
        store.add({"k": 1, "v": 2, "status": "ok"})  # measured again later: the last one wins
        store.add({"k": 2, "v": 3, "status": "ok"})
    with open(tmp_path / "cells.jsonl", "a") as f:
        f.write('{"k": 3, "v": 4, "sta')  # a crash in the middle of an append
    store = ResultStore(tmp_path, ("k",), ("k", "v"))
    assert sorted((r["k"], r["v"]) for r in store.rows()) == [(1, 2), (2, 3)]
    assert all(json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines())  # compacted
    assert store.finished({"k": 1}) and not store.finished({"k": 3})
    store.close()
    with open(tmp_path / "results.csv") as f:
        ks = [row["k"] for row in csv.DictReader(f)]
    assert ks == ["1", "2"]


def test_a_second_writer_is_refused(tmp_path):
    from attnzoo.bench.results import StoreLockedError

    with ResultStore(tmp_path, ("k",)):
        with pytest.raises(StoreLockedError):
            ResultStore(tmp_path, ("k",))


# -- measurement helpers ----------------------------------------------------------------------------------


def test_peak_memory_sees_a_64_mib_step_and_not_a_noop():
    if not Path("/proc/self/clear_refs").exists():
        # the benchmark's peak-memory method (clear_refs + VmHWM) exists only on Linux; on this project's
        # machines and in CI it always exists, so the test runs there
        pytest.skip("needs Linux /proc")

    def step():
        t = torch.ones(16 * 2**20)  # 64 MiB, touched
        del t

    peak, _ = speed_worker.measure_peak(step)
    assert 60 < peak < 80
    idle, _ = speed_worker.measure_peak(lambda: None)
    assert idle < 4


def test_flop_count_credits_causal_sdpa():
    q = torch.randn(1, 2, 64, 16)
    dense = speed_worker.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    causal = speed_worker.count_flops(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert dense == 4 * 2 * 64 * 64 * 16  # 2 matmuls of 2*N*M*D each, per head
    assert causal == int(dense * (64 * 65 / 2) / 64**2)
    from attnzoo.core.flops import causal_fraction

    assert causal_fraction(4, 2) == pytest.approx((1 + 2 + 2 + 2) / 8)


# -- whole sweeps ------------------------------------------------------------------------------------------


def test_sweep_records_failures_and_goes_on(tmp_path, fakes):
    cfg = tiny(
        mechanisms=tuple(fakes) + ("softmax",),
        lengths=(16,),
        patterns=("noncausal_self",),
        modes=("fwd",),
        decode_contexts=(),
        cell_timeout=2.0,
    )
    summary = speed.run_sweep(cfg, tmp_path)
    rows = {r["mechanism"]: r for r in read_rows(tmp_path) if r["kind"] == "attn"}
    assert rows["aaa_fake_lin"]["status"] == "ok"
    assert (
        rows["aab_fake_error"]["status"] == "error"
        and "deliberate failure" in rows["aab_fake_error"]["error"]
    )
    assert rows["aac_fake_oom"]["status"] == "oom"
    assert rows["aad_fake_kill"]["status"] == "oom" and "SIGKILL" in rows["aad_fake_kill"]["reason"]
    assert rows["aae_fake_hang"]["status"] == "timeout"
    # ... and the mechanisms after the failures (alphabetically later) were still measured
    assert rows["softmax"]["status"] == "ok" and rows["softmax"]["median_ms"] > 0
    assert rows[speed_worker.SDPA]["status"] == "ok"
    assert summary.failed == 4 and not summary.interrupted


def test_interrupted_sweep_resumes_without_remeasuring(tmp_path, fakes):
    cfg = tiny(mechanisms=("aaa_fake_lin", "softmax"), patterns=("noncausal_self",))
    first = CountingRunner(stop_after=7)
    summary = speed.run_sweep(cfg, tmp_path, runner=first)
    assert summary.interrupted and len(first.ran) == 7
    rows_after_kill = {k: r for k, r in zip(_keys(read_rows(tmp_path)), read_rows(tmp_path))}
    assert len(rows_after_kill) == 7  # everything finished before the interruption was kept

    second = CountingRunner()
    summary = speed.run_sweep(cfg, tmp_path, runner=second)
    assert not summary.interrupted
    assert not set(first.ran) & set(second.ran)  # nothing measured twice
    rows = read_rows(tmp_path)
    keys = _keys(rows)
    assert len(keys) == len(set(keys)) == len(first.ran) + len(second.ran)  # each cell exactly once
    planned = [tuple(c[k] for k in speed.KEY_FIELDS) for _, cells in speed.plan(cfg, 1) for c in cells]
    assert sorted(keys) == sorted(planned)
    for r in rows:  # the cells of the first run are untouched
        if tuple(r[k] for k in speed.KEY_FIELDS) in rows_after_kill:
            assert r["measured_at"] == rows_after_kill[tuple(r[k] for k in speed.KEY_FIELDS)]["measured_at"]

    third = CountingRunner()
    speed.run_sweep(cfg, tmp_path, runner=third)
    assert third.ran == []  # a finished sweep measures nothing


def test_csv_fields_plots_and_report(tmp_path, fakes):
    cfg = tiny(mechanisms=("aaa_fake_lin", "softmax"), patterns=("causal_self", "noncausal_cross"))
    summary = speed.run_sweep(cfg, tmp_path)
    assert summary.failed == 0, read_rows(tmp_path)
    with open(tmp_path / "results.csv") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    issue_fields = (
        "mechanism",
        "pattern",
        "n",
        "m",
        "batch",
        "heads",
        "head_dim",
        "dtype",
        "seed",
        "threads",
        "torch_version",
        "cpu_model",
        "median_ms",
        "spread_ms",
        "peak_mib",
        "flops",
    )
    assert set(issue_fields) <= set(header)
    assert {
        "first_call_ms",
        "gflops_per_s",
        "roofline_fraction",
        "ratio_to_sdpa",
        "status",
        "config_used",
        "compile_s",
        "recompile_s",
    } <= set(header)
    attn = [r for r in rows if r["kind"] == "attn"]
    assert {r["pattern"] for r in attn if r["mechanism"] == "softmax"} == {"causal_self", "noncausal_cross"}
    # only the patterns a mechanism declares
    assert {r["pattern"] for r in attn if r["mechanism"] == "aaa_fake_lin"} == {"noncausal_cross"}
    assert all(r["m"] != r["n"] for r in attn if r["pattern"].endswith("cross"))
    assert {r["mode"] for r in attn if r["mechanism"] == "softmax"} == {"fwd", "fwdbwd"}
    for r in attn:
        assert float(r["median_ms"]) > 0 and int(r["flops"]) > 0 and float(r["peak_mib"]) >= 0, r
        assert (
            float(r["gflops_per_s"]) > 0
            and float(r["roofline_fraction"]) > 0
            and float(r["ratio_to_sdpa"]) > 0
        )
        assert r["threads"] == "1" and r["torch_version"] == torch.__version__
    assert sorted(r["mechanism"] for r in rows if r["kind"] == "decode") == sorted(
        ["softmax", speed_worker.SDPA]
    )
    assert all(int(r["state_bytes"]) > 0 for r in rows if r["kind"] == "decode")
    roof = [r for r in rows if r["kind"] == "roofline"]
    assert len(roof) == 1 and float(roof[0]["gflops_per_s"]) > 0

    md = speed.write_report(tmp_path, cfg, summary, link_prefix="speed/")
    # a memory plot exists exactly when some cell of that mode measured a positive peak (tiny cells can
    # measure 0 MiB when the allocator reuses freed memory; a log axis cannot show 0)
    expected = ["time_fwd.png", "time_fwdbwd.png", "decode.png"]
    for mode in ("fwd", "fwdbwd"):
        has_memory = any(float(r["peak_mib"] or 0) > 0 for r in attn if r["mode"] == mode)
        assert (tmp_path / f"memory_{mode}.png").exists() == has_memory, mode
        if has_memory:
            expected.append(f"memory_{mode}.png")
    for name in expected:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"](speed/{name})" in md
    assert "### Efficiency length" in md and re.search(r"\| \d+ \| `aaa_fake_lin` \| NC \|", md)
    assert (tmp_path / "README.md").read_text().count("](time_fwd.png)") == 1


def test_budgets_skip_and_say_so(tmp_path, fakes):
    # a mechanism budget of 0 s skips every cell of every mechanism (baselines are not budgeted)
    cfg = tiny(mechanisms=("aaa_fake_lin",), mechanism_budget=0.0, decode_contexts=())
    summary = speed.run_sweep(cfg, tmp_path)
    rows = read_rows(tmp_path)
    mine = [r for r in rows if r["mechanism"] == "aaa_fake_lin"]
    assert mine and all(r["status"] == "skipped" and "mechanism budget" in r["reason"] for r in mine)
    assert summary.skipped == len(mine)
    assert all(r["status"] == "ok" for r in rows if r["mechanism"] == speed_worker.SDPA)
    # skipped cells are not "finished": a later run with budget measures them, and each cell stays once
    speed.run_sweep(replace_cfg(cfg, mechanism_budget=None), tmp_path)
    rows = read_rows(tmp_path)
    assert all(r["status"] == "ok" for r in rows if r["mechanism"] == "aaa_fake_lin")
    keys = _keys(rows)
    assert len(keys) == len(set(keys))


def test_predicted_slow_cells_are_skipped(tmp_path, fakes, monkeypatch):
    # pretend every call takes 1 s: at 4x the length (quadratic guess) that is 16 s per call
    real = speed_worker._stats

    def slow_stats(times):
        out = real(times)
        out["median_ms"] = out["min_ms"] = 1000.0
        return out

    monkeypatch.setattr(speed_worker, "_stats", slow_stats)
    cfg = tiny(
        mechanisms=("aaa_fake_lin",),
        lengths=(16, 64, 256),
        patterns=("noncausal_self",),
        modes=("fwd",),
        decode_contexts=(),
        cell_budget=20.0,
    )
    speed.run_sweep(cfg, tmp_path)
    rows = sorted((r for r in read_rows(tmp_path) if r["mechanism"] == "aaa_fake_lin"), key=lambda r: r["n"])
    assert [r["status"] for r in rows] == ["ok", "skipped", "skipped"]
    assert "predicted 16.00 s per call" in rows[1]["reason"]


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


# -- CLI ------------------------------------------------------------------------------------------------------


def test_cli_options_map_to_the_config():
    from attnzoo.cli import build_parser

    args = build_parser().parse_args(
        [
            "bench",
            "speed",
            "--mechanisms",
            "softmax",
            "--patterns",
            "CS,noncausal_cross",
            "--lengths",
            "64,128",
            "--budget",
            "0",
            "--threads",
            "1",
            "--decode-contexts",
            "",
        ]
    )
    cfg = speed.config_from_args(args)
    assert cfg.mechanisms == ("softmax",) and cfg.patterns == ("causal_self", "noncausal_cross")
    assert (
        cfg.lengths == (64, 128) and cfg.run_budget is None and cfg.threads == 1 and cfg.decode_contexts == ()
    )
    full = speed.config_from_args(build_parser().parse_args(["bench", "speed", "--full"]))
    assert (
        full.lengths[-1] == 65536
        and 16384 in full.lengths
        and full.decode_contexts == (1024, 4096, 16384, 32768)
    )


def test_report_section_runs_the_quick_sweep_in_out_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(
        speed.SweepConfig,
        "quick",
        classmethod(
            lambda cls, **kw: tiny(mechanisms=("softmax",), patterns=("causal_self",), modes=("fwd",))
        ),
    )
    md = speed.report_section(tmp_path, quick=True)
    assert "## Speed, memory and FLOPs" in md and "](speed/time_fwd.png)" in md
    assert (tmp_path / "speed" / "time_fwd.png").exists() and (tmp_path / "speed" / "results.csv").exists()


def test_forkserver_path_measures_a_real_mechanism(tmp_path):
    """The production start method (a fork server that preloads torch and the mechanisms)."""
    cfg = tiny(
        mechanisms=("softmax",),
        lengths=(16,),
        patterns=("causal_self",),
        modes=("fwd",),
        decode_contexts=(),
        start_method="forkserver",
        plots=False,
    )
    summary = speed.run_sweep(cfg, tmp_path)
    rows = read_rows(tmp_path)
    # the roofline, SDPA (is_causal and dense mask) and softmax
    assert summary.measured == len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    soft = next(r for r in rows if r["mechanism"] == "softmax")
    assert soft["threads_used"] == 1 and soft["flops"] > 0 and soft["config_used"] == "defaults"


class _Compiled(_Fake):
    """A fake mechanism whose attention runs through torch.compile (compiled on the first call)."""

    def attend(self, q, k, v, *, cross, key_padding_mask):
        if not hasattr(self, "_fn"):
            self._fn = torch.compile(super().attend, dynamic=False)
        return self._fn(q, k, v, cross=cross, key_padding_mask=key_padding_mask)


@pytest.mark.slow
def test_compile_time_is_reported_apart_from_run_time(tmp_path, monkeypatch):
    registry.all_specs()
    spec = _fake_spec("aaa_fake_compiled", "ok")
    cls = type("Fake_compiled", (_Compiled,), {"behaviour": "ok", "spec": spec})
    spec = registry.Mechanism(**{**spec.__dict__, "module": cls})
    cls.spec = spec
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    cfg = tiny(
        mechanisms=(spec.name,),
        lengths=(32,),
        patterns=("noncausal_self",),
        modes=("fwd",),
        cell_timeout=300.0,
    )
    speed.run_sweep(cfg, tmp_path)
    row = next(r for r in read_rows(tmp_path) if r["mechanism"] == spec.name)
    assert row["status"] == "ok", row
    assert row["compile_s"] > 0.1 and row["recompile_s"] == 0
    assert row["first_call_ms"] > 1e3 * row["compile_s"] * 0.9 > 10 * row["median_ms"]
    sdpa = next(r for r in read_rows(tmp_path) if r["mechanism"] == speed_worker.SDPA)
    assert sdpa["compile_s"] == 0


@pytest.mark.slow
def test_killing_the_real_command_loses_nothing(tmp_path):
    """SIGKILL the real ``attnzoo bench speed`` half way, run it again: finished cells are not measured again."""
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.cli",
        "bench",
        "speed",
        "--out",
        str(tmp_path),
        "--mechanisms",
        "softmax",
        "--lengths",
        "32,64,128",
        "--decode-contexts",
        "32",
        "--threads",
        "1",
        "--roofline-size",
        "128",
        "--no-progress",
        "--no-plots",
        "--heads",
        "2",
        "--head-dim",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    journal = tmp_path / "speed" / "cells.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if journal.exists() and journal.read_text().count('"status"') >= 8:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {
        tuple(json.loads(line).get(k) for k in speed.KEY_FIELDS): json.loads(line)["measured_at"]
        for line in journal.read_text().splitlines()
        if '"status"' in line and line.endswith("}")
    }
    assert 8 <= len(before)
    subprocess.run(
        cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
    )
    rows = read_rows(tmp_path / "speed")
    keys = _keys(rows)
    assert len(keys) == len(set(keys))
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        k = tuple(r[f] for f in speed.KEY_FIELDS)
        if k in before:
            assert r["measured_at"] == before[k]

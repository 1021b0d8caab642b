"""The torchrun example and the benchmark machinery (slow: they start several process groups)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnzoo.distributed.bench import run_benchmark, table

from .conftest import free_port_for_test

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "train_context_parallel.py"


def run_example(cmd: list[str]) -> None:
    """Run the example; on failure, fail with its own output (a bare exit status says nothing)."""
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, timeout=300, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"exit {r.returncode}: {' '.join(cmd)}\n--- stdout ---\n{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-8000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("mechanism,layout", [("softmax", "zigzag"), ("sliding_window", "contiguous"), ("linear", "contiguous")])
def test_example_two_processes_train_like_one(mechanism, layout, tmp_path):
    """P = 2 and P = 1 give the same loss trajectory (float64), and step 0 equals a single-process run."""
    losses = {}
    for world in (1, 2):
        out = tmp_path / f"p{world}.json"
        cmd = [sys.executable, str(EXAMPLE), "--spawn", str(world), "--steps", "4", "--seq-len", "29", "--batch", "2",
               "--dtype", "float64", "--mechanism", mechanism, "--layout", layout, "--window", "5", "--check",
               "--log-every", "0", "--json", str(out)]
        run_example(cmd)
        res = json.loads(out.read_text())
        assert res["check_max_abs_diff"] <= 1e-10
        losses[world] = res["losses"]
    assert max(abs(a - b) for a, b in zip(losses[1], losses[2])) <= 1e-10


@pytest.mark.slow
def test_example_under_torchrun(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "r.json"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port_for_test()),
           str(EXAMPLE), "--steps", "3", "--check", "--log-every", "0", "--json", str(out)]
    run_example(cmd)
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["check_max_abs_diff"] <= 1e-5  # float32
    assert res["comm_bytes_per_step"] > 0


@pytest.mark.slow
def test_benchmark_rows(tmp_path):
    out, store = tmp_path / "bench.json", tmp_path / "store"
    kw = dict(seq_len=64, heads=2, head_dim=8, repeats=1, warmup=0)
    rows = run_benchmark((1, 2), out=str(out), store=str(store), **kw)
    assert json.loads(out.read_text())["rows"] == rows
    assert all(r["status"] == "ok" for r in rows) and len(rows) == 2 * 7
    assert len(json.loads((store / "results.json").read_text())["rows"]) == len(rows)
    t0 = time.time()
    again = run_benchmark((1, 2), store=str(store), **kw)  # resumed: every cell is in the store, nothing runs
    assert time.time() - t0 < 5.0 and [r["seconds_step"] for r in again] == [r["seconds_step"] for r in rows]
    by = {(r["strategy"], r["world"]): r for r in rows}
    kv = 32 * 2 * 2 * 8 * 4  # one K/V block at P = 2 (L = 32, H = 2, k and v of d = 8, float32)
    assert by[("ring causal zigzag", 2)]["bytes_sent_forward"] == kv
    assert by[("ring causal zigzag", 2)]["bytes_sent_step"] == (3 * 2 - 2) * kv  # (3P - 2) blocks per step
    assert by[("ring causal zigzag", 1)]["bytes_sent_step"] == 0
    assert by[("ring causal zigzag", 2)]["ring_work_max_over_mean"] == pytest.approx(1.0)
    assert by[("ring causal contiguous", 2)]["ring_work_max_over_mean"] > 1.2
    assert all(r["seconds_step"] > 0 for r in rows)
    assert "| ring causal zigzag | 2 | 64 |" in table(rows)

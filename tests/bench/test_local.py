"""``attnzoo bench local``: the local-attention comparison runs end to end and its table is consistent.

Slow: the FlexAttention contestant compiles (seconds per shape on CPU). Timings themselves are not
asserted (they belong to the benchmark); the structure and the cross-check of outputs are.
"""

from __future__ import annotations

import json

import pytest

from attnzoo.bench import local
from attnzoo.cli import main as cli_main


@pytest.mark.slow
def test_bench_local_end_to_end(tmp_path, capsys):
    argv = ["bench", "local", "--n", "300", "--window", "9", "--repeats", "2", "--rounds", "1", "--heads", "2", "--head-dim", "16",
            "--mechanisms", "sliding_window", "neighborhood", "--threads", "1", "--out", str(tmp_path), "--no-progress"]
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "local.json").read_text())["rows"]
    got = {(r["mechanism"], r["causal"], r["contestant"]) for r in rows}
    for mech in ("sliding_window", "neighborhood"):
        for causal in (True, False):
            for label in ("SDPA, dense boolean mask", "blocked (default)", "FlexAttention, compiled", "blocked, forward + backward"):
                assert (mech, causal, label) in got
    assert all(r["median_s"] > 0 and r["min_s"] <= r["median_s"] for r in rows)
    md = (tmp_path / "local.md").read_text()
    assert md.count("| `sliding_window` |") == 2 and md.count("| `neighborhood` |") == 2
    assert "| `sliding_window` | causal |" in capsys.readouterr().out


def test_outputs_are_cross_checked_before_timing(monkeypatch):
    """A contestant that computes something else stops the benchmark instead of being timed."""
    real = local._contestants

    def broken(*a):
        calls = real(*a)
        fn = calls[local.DENSE]
        calls[local.DENSE] = lambda: fn() + 1.0
        return calls

    rows = local.measure(n=40, window=5, heads=1, head_dim=8, repeats=2, mechanisms=("sliding_window",), isolate=False,
                         labels=(local.DENSE, local.BLOCKED, local.FWD_BWD), progress=False)
    assert {r["contestant"] for r in rows} == {local.DENSE, local.BLOCKED, local.FWD_BWD} and len(rows) == 6
    assert all(r["repeats"] == 3 for r in rows)  # 3 rounds of one call each
    monkeypatch.setattr(local, "_contestants", broken)
    with pytest.raises(RuntimeError, match="differs from the blocked path"):
        local.measure(n=40, window=5, heads=1, head_dim=8, repeats=1, mechanisms=("sliding_window",), isolate=False,
                      labels=(local.DENSE, local.BLOCKED), progress=False)


def test_table_of_rows():
    base = {"n": 10, "window": 3, "heads": 1, "head_dim": 4, "repeats": 5, "threads": 1, "first_call_s": 1.5, "rounds": 3}
    rows = [dict(base, mechanism="sliding_window", causal=True, contestant=c, median_s=t, min_s=t)
            for c, t in (("SDPA, dense boolean mask", 1.0), ("blocked (default)", 0.1), ("FlexAttention, compiled", 0.2),
                         ("blocked, forward + backward", 0.3))]
    md = local.table(rows)
    assert "median (min) of 5 calls in 3 rounds" in md
    assert "| `sliding_window` | causal | 1.0000 (1.0000) | 0.1000 (0.1000) | 10× | 0.2000 (0.2000), first call 1.5 s | 0.50 |" in md

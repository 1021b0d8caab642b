"""Helpers of the distributed tests: start P gloo processes on this machine (127.0.0.1 only).

Each launch costs a few seconds of process start-up, so the fast tests run all their cases in one
launch per kind (module-scoped fixtures) and assert per case.
"""

from __future__ import annotations

import os
import pickle

import pytest
from filelock import FileLock

from attnzoo.distributed.launch import LaunchResult, run

#: float64 results must agree to 1e-10, float32 to 1e-5, in units of the largest reference value
#: (max(1, |out|, |grad|)): rounding errors of a sum scale with the size of its terms.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def spawn(fn, world: int, *args, timeout_s: float = 60.0, deadline_s: float = 240.0) -> LaunchResult:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo CPU processes (OMP_NUM_THREADS=1 in each)."""
    return run(fn, world, *args, timeout_s=timeout_s, deadline_s=deadline_s)


def assert_close(case: dict, errors: dict[str, float]) -> None:
    tol = TOLERANCE[case["dtype"]] * max(1.0, errors["ref_scale"])
    assert errors["finite"] == 1.0, f"non-finite output or gradient: {errors}"
    bad = {k: v for k, v in errors.items() if k in ("out", "dq", "dk", "dv") and not v <= tol}
    assert not bad, f"distributed != single process beyond {tol:.1e}: {bad} (all: {errors})"


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """``shared(name, compute)``: ``compute()`` once per test session, even with pytest-xdist workers
    (the first worker computes and pickles it under the session's base temp dir, the others load it),
    so a launch of P processes is not repeated by every worker."""

    def get(name: str, compute):
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            return compute()
        root = tmp_path_factory.getbasetemp().parent
        path = root / f"attnzoo-distributed-{name}.pkl"
        with FileLock(str(path) + ".lock"):
            if path.exists():
                return pickle.loads(path.read_bytes())
            value = compute()
            path.write_bytes(pickle.dumps(value))
            return value

    return get


def free_port_for_test() -> int:
    from attnzoo.distributed.launch import free_port

    return free_port()

"""Run a function on ``P`` local processes joined by a gloo process group (tests, benchmark, notebooks).

For real jobs use ``torchrun`` (see ``examples/train_context_parallel.py``); this helper is what the
tests and the benchmark use to start ``P`` CPU processes on *this* machine: it picks a free port on
127.0.0.1, starts ``P`` processes with the ``spawn`` method, sets ``OMP_NUM_THREADS=1`` and one torch
thread in each, joins them into a process group with a bounded timeout, runs ``fn(rank, world,
*args)`` and returns every rank's result. It never kills a rank that is still making progress because
another failed: each rank must end on its own (that is what the failure tests check); only after
``deadline_s`` are the remaining processes terminated, and that is reported as a hang.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None
    error: str = ""  # "ExceptionType: message" of a failed rank
    traceback: str = ""
    seconds: float = 0.0  # from process start to the result


@dataclass
class LaunchResult:
    ranks: list[RankResult] = field(default_factory=list)
    hung: list[int] = field(default_factory=list)  # ranks that had not ended by the deadline
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.hung and all(r.ok for r in self.ranks)

    def values(self) -> list[Any]:
        """The results in rank order; raises ``RuntimeError`` with every rank's error if any rank failed."""
        if not self.ok:
            raise RuntimeError(self.describe())
        return [r.value for r in self.ranks]

    def describe(self) -> str:
        lines = [f"{len(self.ranks)} rank(s) reported in {self.seconds:.1f} s; hung: {self.hung or 'none'}"]
        for r in self.ranks:
            lines.append(f"rank {r.rank}: " + ("ok" if r.ok else f"FAILED after {r.seconds:.1f} s: {r.error}\n{r.traceback}"))
        return "\n".join(lines)


def _dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
        return b"T" + buf.getvalue()
    except Exception:
        return b"P" + pickle.dumps(value)


def _loads(blob: bytes) -> Any:
    if blob[:1] == b"T":
        return torch.load(io.BytesIO(blob[1:]), weights_only=True)
    return pickle.loads(blob[1:])


def _worker(rank, world, port, backend, timeout_s, fn, args, results):
    start = time.time()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist  # noqa: F811

    from .comm import init_process_group

    ok = False
    try:
        init_process_group(backend, timeout_s=timeout_s, rank=rank, world_size=world)
        value = fn(rank, world, *args)
        results.put((rank, True, _dumps(value), "", "", time.time() - start))
        ok = True
    except BaseException as e:  # report everything, including KeyboardInterrupt
        results.put((rank, False, b"", f"{type(e).__name__}: {e}", traceback.format_exc(), time.time() - start))
    finally:
        if ok:
            try:  # every rank done before anyone leaves (bounded by the timeout)
                dist.barrier()
            except Exception:
                pass
        results.close()
        results.join_thread()  # the result is delivered to the parent
        # leave without tearing the process group down: a teardown can block on a peer that failed,
        # and the sockets close with the process anyway (which is what tells the peers)
        os._exit(0)


class Launch:
    """``P`` processes started by :func:`start`; :meth:`wait` collects them (see :func:`run`)."""

    def __init__(self, procs, results, world_size, t0, deadline_s):
        self._procs, self._results, self._world, self._t0, self._deadline = procs, results, world_size, t0, deadline_s
        self._result: LaunchResult | None = None

    def wait(self) -> LaunchResult:
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> LaunchResult:
        procs, results, world_size = self._procs, self._results, self._world
        got: dict[int, RankResult] = {}
        end = self._t0 + self._deadline
        while len(got) < world_size and time.time() < end:
            try:
                rank, ok, blob, err, tb, secs = results.get(timeout=0.2)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    time.sleep(0.5)  # let the queue's feeder threads deliver what is in flight
                    if results.empty():
                        break
                continue
            got[rank] = RankResult(rank, ok, _loads(blob) if ok else None, err, tb, secs)
        out = LaunchResult(seconds=time.time() - self._t0)
        for r, p in enumerate(procs):
            p.join(timeout=max(0.0, min(10.0, end - time.time())))
            if p.is_alive():
                out.hung.append(r)
                p.terminate()
                p.join(5)
            if r not in got:
                got[r] = RankResult(r, False, None, f"process ended without a result (exit code {p.exitcode})", "", 0.0)
        out.ranks = [got[r] for r in range(world_size)]
        return out


def start(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    deadline_s: float = 300.0,
) -> Launch:
    """Start ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes and return at once."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by the children at start
    try:
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout_s, fn, args, results), daemon=True)
                 for r in range(world_size)]
        t0 = time.time()
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Launch(procs, results, world_size, t0, deadline_s)


def run(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 60.0,
    deadline_s: float = 300.0,
) -> LaunchResult:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes (``fn`` must be importable:
    a module-level function). Returns a :class:`LaunchResult`; ``.values()`` gives the per-rank
    return values or raises with every rank's error. ``timeout_s`` bounds every collective inside
    (the process-group timeout); ``deadline_s`` bounds the whole run. If the rendezvous port was
    taken between choosing it and binding it (another program got it first), it retries once."""
    for attempt in range(2):
        res = start(fn, world_size, *args, backend=backend, timeout_s=timeout_s, deadline_s=deadline_s).wait()
        port_lost = any("address already in use" in r.error.lower() or "eaddrinuse" in r.error.lower() for r in res.ranks)
        if not port_lost or attempt == 1:
            return res
    return res

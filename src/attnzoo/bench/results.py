"""A resumable, crash-safe store of benchmark cells (shared by the speed and quality benchmarks).

Layout of a store directory:

* ``cells.jsonl``: the journal. One JSON object per finished cell, appended and ``fsync``-ed as soon
  as the cell ends, so a killed run loses at most the cell that was running. A line cut short by a
  crash is ignored when the journal is read back. When a cell is measured again (``--retry-failed``,
  or a skipped cell that now runs) the later line wins.
* ``results.json`` / ``results.csv``: every cell exactly once (the last journal entry of each key),
  rewritten through a temporary file and a rename (:func:`write_text_atomic`), so a reader never
  sees half a file. They are regenerated from the journal at every :meth:`ResultStore.flush`.
* ``.lock``: an advisory ``flock`` that stops two runs from writing the same store at once.

A cell is identified by the values of the store's ``key_fields``; :meth:`ResultStore.finished`
tells a resuming run which cells it can skip.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .capabilities import write_text_atomic

#: Statuses of a cell that a resumed run does not measure again (unless asked to retry failures).
FINISHED = frozenset({"ok", "error", "oom", "timeout"})


class StoreLockedError(RuntimeError):
    """Another process holds the store's lock."""


def _clean(value: Any) -> Any:
    """JSON-safe value: NaN/inf become None, tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return [_clean(v) for v in value]
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class ResultStore:
    """Cells keyed by ``key_fields``, journaled to ``<directory>/cells.jsonl``.

    Args:
        directory: where the journal, the JSON and the CSV live (created if missing).
        key_fields: the row fields whose values identify a cell.
        csv_fields: the CSV's leading columns, in order; any other row field follows, sorted.
        lock: take an exclusive advisory lock on the directory (released by :meth:`close`).
        derive: ``rows -> rows`` applied to copies of the rows when writing the JSON/CSV (derived columns).
    """

    JOURNAL = "cells.jsonl"
    JSON = "results.json"
    CSV = "results.csv"

    def __init__(
        self,
        directory: str | os.PathLike,
        key_fields: Sequence[str],
        csv_fields: Sequence[str] = (),
        *,
        lock: bool = True,
        derive=None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_fields = tuple(key_fields)
        self.csv_fields = tuple(csv_fields)
        self.derive = derive
        self.meta: dict[str, Any] = {}
        self._rows: dict[tuple, dict[str, Any]] = {}
        self._lock_fd: int | None = None
        if lock:
            self._lock()
        self._load()

    # -- locking ---------------------------------------------------------------------------------
    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, single-writer by convention
            return
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreLockedError(
                f"another run is writing {self.directory} (lock held on {self.directory / '.lock'})"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Write the JSON/CSV and release the lock."""
        self.flush()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------
    @property
    def journal_path(self) -> Path:
        return self.directory / self.JOURNAL

    def _load(self) -> None:
        path = self.journal_path
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            data = f.read()
        torn = False
        for line in data.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                torn = True  # the tail of a line a crash cut short; the cell will simply run again
                continue
            if isinstance(row, dict) and row.get("_meta"):
                self.meta.update(row["_meta"])
                continue
            if isinstance(row, dict) and all(k in row for k in self.key_fields):
                self._rows[self.key(row)] = row
        if torn or (data and not data.endswith("\n")):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the journal atomically with one line per cell (drops torn lines)."""
        lines = []
        if self.meta:
            lines.append(json.dumps({"_meta": _clean(self.meta)}, sort_keys=True))
        lines += [json.dumps(_clean(r), sort_keys=True) for r in self._rows.values()]
        write_text_atomic(self.journal_path, "".join(line + "\n" for line in lines))

    def key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(json.dumps(_clean(row.get(k)), sort_keys=True) for k in self.key_fields)

    def get(self, row_or_key: Mapping[str, Any]) -> dict[str, Any] | None:
        return self._rows.get(self.key(row_or_key))

    def finished(self, cell: Mapping[str, Any], retry_failed: bool = False) -> bool:
        """True if ``cell`` was measured before (and, with ``retry_failed``, measured successfully)."""
        row = self.get(cell)
        if row is None or row.get("status") not in FINISHED:
            return False
        return not (retry_failed and row.get("status") != "ok")

    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def __len__(self) -> int:
        return len(self._rows)

    # -- writing ---------------------------------------------------------------------------------
    def set_meta(self, **meta: Any) -> None:
        self.meta.update(meta)
        self._append({"_meta": meta})

    def add(self, row: Mapping[str, Any]) -> None:
        """Record one cell: append it to the journal (fsync-ed) and keep it in memory."""
        missing = [k for k in self.key_fields if k not in row]
        if missing:
            raise ValueError(f"row lacks key field(s) {missing}")
        row = _clean(dict(row))
        self._rows[self.key(row)] = row
        self._append(row)

    def _append(self, obj: Mapping[str, Any]) -> None:
        line = json.dumps(_clean(dict(obj)), sort_keys=True) + "\n"
        with open(self.journal_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def columns(self) -> list[str]:
        extra = sorted({k for r in self._rows.values() for k in r} - set(self.csv_fields))
        return list(self.csv_fields) + extra

    def sorted_rows(self) -> list[dict[str, Any]]:
        def order(r):
            return tuple(
                (v is None, str(type(v)), v if isinstance(v, (int, float)) else str(v))
                for v in (r.get(k) for k in self.key_fields)
            )

        return sorted(self._rows.values(), key=order)

    def flush(self, derive=None) -> None:
        """Rewrite ``results.json`` and ``results.csv`` atomically; ``derive(rows) -> rows`` (default: the
        store's) may add columns."""
        rows = self.sorted_rows()
        derive = derive or self.derive
        if derive is not None:
            rows = derive([dict(r) for r in rows])
        cols = list(self.csv_fields) + sorted({k for r in rows for k in r} - set(self.csv_fields))
        write_text_atomic(
            self.directory / self.JSON,
            json.dumps(
                {"meta": _clean(self.meta), "columns": cols, "rows": _clean(rows)}, indent=1, sort_keys=False
            )
            + "\n",
        )
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in cols})
        write_text_atomic(self.directory / self.CSV, buf.getvalue())


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return v


def read_rows(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``results.json`` in ``directory`` (empty list if there is none)."""
    path = Path(directory) / ResultStore.JSON
    if not path.exists():
        return []
    return json.loads(path.read_text(encoding="utf-8"))["rows"]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a results row should say about where it was measured."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    mem_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "mem_gib": mem_gib,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unique(items: Iterable[Any]) -> list[Any]:
    """Items in first-seen order without repeats."""
    seen: set = set()
    out = []
    for x in items:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out

"""Communication layer of :mod:`attnzoo.distributed`: thin wrappers around ``torch.distributed``.

Everything goes through PyTorch's own process groups (gloo on CPU, NCCL on GPU); nothing here opens a
socket. The wrappers add three things the attention code needs:

* **clear errors, never a hang**: every wait is bounded by the process group's timeout (set it with
  :func:`init_process_group`, default 120 s) and a failure is re-raised as
  :class:`DistributedAttentionError` naming this rank, the operation and the peer;
* **agreement before work**: :func:`agree` all-gathers a few integers of metadata (shapes, dtype,
  settings, and an "I failed" flag) so that a shape mismatch or a local input error becomes a
  ``ValueError`` on *every* rank before any ring starts;
* **accounting**: every byte this process sends or receives is counted in :func:`comm_stats`, which the
  benchmark reports as communication volume per step.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 120.0


class DistributedAttentionError(RuntimeError):
    """A collective or point-to-point transfer of the distributed attention failed or timed out."""


# ---------------------------------------------------------------------------------------------------
# accounting
# ---------------------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes this process sent and received through :mod:`attnzoo.distributed` since the last reset.

    Collectives are counted with the bytes a ring implementation moves per rank (all-gather of ``P``
    pieces of ``s`` bytes: ``(P - 1) s`` sent and received; all-reduce: ``2 (P - 1) / P`` times the
    buffer; all-to-all: the ``(P - 1) / P`` of the buffer that leaves the rank), so that numbers are
    comparable across strategies whatever algorithm the backend really uses.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages: int = 0
    control_bytes: int = 0  # the metadata agreement (a few int64 per call), kept apart from the payload

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.messages = self.control_bytes = 0

    def add(self, sent: int, received: int, messages: int = 1) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        self.messages += int(messages)

    def copy(self) -> CommStats:
        return CommStats(self.bytes_sent, self.bytes_received, self.messages, self.control_bytes)


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The running counters of this process (see :class:`CommStats`)."""
    return _STATS


@contextmanager
def count_comm():
    """``with count_comm() as c: ...`` gives in ``c`` the bytes moved inside the block."""
    before = _STATS.copy()
    delta = CommStats()
    try:
        yield delta
    finally:
        delta.bytes_sent = _STATS.bytes_sent - before.bytes_sent
        delta.bytes_received = _STATS.bytes_received - before.bytes_received
        delta.messages = _STATS.messages - before.messages
        delta.control_bytes = _STATS.control_bytes - before.control_bytes


def nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------
# process groups
# ---------------------------------------------------------------------------------------------------
def init_process_group(
    backend: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rank: int | None = None,
    world_size: int | None = None,
) -> None:
    """``torch.distributed.init_process_group`` with a bounded timeout and a backend per device.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise. Rank, world size and the
    rendezvous come from the environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless given. Every collective and transfer of this package
    raises :class:`DistributedAttentionError` after ``timeout_s`` seconds instead of hanging.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    if backend == "gloo" and os.environ.get("MASTER_ADDR", "") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep gloo on the loopback device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def group_info(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (1 process and rank 0 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _fail(what: str, group, err: BaseException) -> DistributedAttentionError:
    rank, world = group_info(group)
    return DistributedAttentionError(
        f"attnzoo.distributed: rank {rank}/{world}: {what} failed: {type(err).__name__}: {str(err).strip()[:500]}. "
        "Another rank probably failed, was killed, or is running a different operation (see its own error); "
        "waits are bounded by the process-group timeout (attnzoo.distributed.init_process_group(timeout_s=...))."
    )


def _wait_all(works: Sequence, what: str, group) -> None:
    try:
        for w in works:
            w.wait()
    except DistributedAttentionError:
        raise
    except Exception as e:  # gloo/NCCL raise RuntimeError (DistBackendError) on timeout or a closed peer
        raise _fail(what, group, e) from e


# ---------------------------------------------------------------------------------------------------
# point-to-point
# ---------------------------------------------------------------------------------------------------
class Pending:
    """An exchange in flight; :meth:`wait` returns the received tensors (None where nothing was received).

    It holds the send buffers until the wait, so a contiguous copy made for sending cannot be freed
    while the backend still reads it."""

    def __init__(self, works, received, what, group, keep=()):
        self._works, self._received, self._what, self._group, self._keep = works, received, what, group, keep

    def wait(self):
        _wait_all(self._works, self._what, self._group)
        self._keep = ()
        return self._received


def exchange(
    sends: Sequence[tuple[Tensor, int]], recvs: Sequence[tuple[Tensor, int]], *, what: str, group=None
) -> Pending:
    """Start ``sends`` (tensor, group rank) and ``recvs`` (buffer, group rank) at once; returns a :class:`Pending`.

    Each pair of ranks must post matching sends and receives (same order, shapes and dtypes); all
    transfers are started together by ``batch_isend_irecv`` so neighbours in a ring cannot deadlock.
    """
    ops, keep = [], []
    for t, peer in sends:
        t = t.contiguous()
        keep.append(t)
        ops.append(dist.P2POp(dist.isend, t, _global_rank(group, peer), group))
        _STATS.add(nbytes(t), 0)
    for buf, peer in recvs:
        ops.append(dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group))
        _STATS.add(0, nbytes(buf), 0)
    if not ops:
        return Pending([], [b for b, _ in recvs], what, group)
    try:
        works = dist.batch_isend_irecv(ops)
    except Exception as e:
        raise _fail(what, group, e) from e
    return Pending(works, [b for b, _ in recvs], what, group, keep=tuple(keep))


def ring_shift(t: Tensor, *, what: str, group=None) -> Pending:
    """Send ``t`` to the next rank of the ring and receive the previous rank's tensor of the same shape."""
    rank, world = group_info(group)
    if world == 1:
        return Pending([], [t], what, group)
    buf = torch.empty_like(t, memory_format=torch.contiguous_format)
    return exchange([(t, (rank + 1) % world)], [(buf, (rank - 1) % world)], what=what, group=group)


# ---------------------------------------------------------------------------------------------------
# collectives
# ---------------------------------------------------------------------------------------------------
def all_gather(t: Tensor, *, what: str, group=None, control: bool = False) -> list[Tensor]:
    """All-gather of equally shaped tensors (no autograd); bounded wait, counted bytes (as
    ``control_bytes`` if ``control``)."""
    rank, world = group_info(group)
    if world == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(world)]
    try:
        work = dist.all_gather(out, t, group=group, async_op=True)
    except Exception as e:
        raise _fail(what, group, e) from e
    _wait_all([work], what, group)
    if control:
        _STATS.control_bytes += (world - 1) * nbytes(t)
    else:
        _STATS.add((world - 1) * nbytes(t), (world - 1) * nbytes(t))
    return out


def all_reduce_sum(t: Tensor, *, what: str, group=None) -> Tensor:
    """Sum over ranks (no autograd), returned as a new tensor."""
    rank, world = group_info(group)
    if world == 1:
        return t.clone()
    out = t.contiguous().clone()
    try:
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group, async_op=True)
    except Exception as e:
        raise _fail(what, group, e) from e
    _wait_all([work], what, group)
    moved = 2 * (world - 1) * nbytes(out) // world
    _STATS.add(moved, moved)
    return out


def all_to_all(t: Tensor, *, what: str, group=None) -> Tensor:
    """``all_to_all_single`` on dim 0 of ``t`` (``world`` equal pieces): piece ``j`` goes to rank ``j``;
    piece ``j`` of the result came from rank ``j``."""
    rank, world = group_info(group)
    if world == 1:
        return t
    t = t.contiguous()
    out = torch.empty_like(t)
    try:
        work = dist.all_to_all_single(out, t, group=group, async_op=True)
    except Exception as e:
        raise _fail(what, group, e) from e
    _wait_all([work], what, group)
    moved = (world - 1) * nbytes(t) // world
    _STATS.add(moved, moved)
    return out


# ---------------------------------------------------------------------------------------------------
# agreement on shapes and settings
# ---------------------------------------------------------------------------------------------------
_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def agree(meta: Mapping[str, int], *, what: str, group=None, local_error: BaseException | None = None) -> None:
    """Check that every rank calls ``what`` with the same ``meta`` (a few ints: shapes, dtype, settings).

    One ``all_gather`` of ``len(meta) + 1`` int64 per rank. If a rank passes ``local_error`` (its own
    input check failed), every other rank raises a ``ValueError`` naming that rank, and that rank
    re-raises its own error; if the metadata differ, every rank raises the same ``ValueError`` with a
    table of the differing fields per rank. Nothing hangs waiting for a rank that gave up.
    """
    rank, world = group_info(group)
    if world == 1:
        if local_error is not None:
            raise local_error
        return
    keys = list(meta)
    local = torch.tensor([0 if local_error is None else 1] + [int(meta[k]) for k in keys], dtype=torch.int64)
    dev = _collective_device(group)
    rows = [r.cpu() for r in all_gather(local.to(dev), what=f"{what}: metadata check", group=group, control=True)]
    table = torch.stack(rows)  # (world, 1 + len(keys))
    failed = [r for r in range(world) if table[r, 0] != 0]
    if failed:
        if local_error is not None:
            raise local_error
        raise ValueError(
            f"attnzoo.distributed: {what}: rank(s) {failed} rejected their inputs (see their own error); "
            f"rank {rank} stops too"
        )
    differ = [i for i, k in enumerate(keys) if not bool((table[:, 1 + i] == table[0, 1 + i]).all())]
    if differ:
        lines = ", ".join(f"{keys[i]}: " + "/".join(str(int(table[r, 1 + i])) for r in range(world)) for i in differ)
        raise ValueError(
            f"attnzoo.distributed: {what}: the ranks disagree on shapes or settings (values for ranks 0..{world - 1}): "
            f"{lines}. Every rank must hold a shard of the same length and the same batch, heads, head dims and dtype."
        )


def _collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

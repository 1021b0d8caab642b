"""The child side of ``attnzoo bench speed``: measure one cell in a process of its own.

The driver (:mod:`attnzoo.bench.speed`) starts one process per cell (a fork of a small server that
has imported torch and the mechanisms, so starting a cell costs ~0.1 s instead of a torch import),
sends it a job ``dict`` and reads back a result ``dict`` through a pipe. A crash, an out-of-memory
kill or a hang therefore ends only that cell.

Per attention cell (mechanism, pattern, N, M, mode):

1. seed, build the module (``spec.module(dim, heads, causal=...)`` with the mechanism's defaults; its
   ``test_config`` only when the defaults cannot run) and the inputs ``x (B, N, C)`` (and the source
   ``(B, M, C)`` for cross patterns);
2. warm the libraries up on tiny tensors (thread pool, GEMM kernels), unrelated to the mechanism;
3. the **first call** at full size, timed on its own (it includes lazy initialisation and any
   compilation a mechanism does on first use; ``compile_s`` is the part ``torch.compile`` reports
   for itself, ``recompile_s`` what it compiled during the timed calls);
4. **peak memory** of the next call: free what can be freed (``gc``, ``malloc_trim``), reset the
   kernel's high-water mark (``/proc/self/clear_refs`` <- ``5``), run the call, read
   ``VmHWM - VmRSS_before`` from ``/proc/self/status``. In-process alternatives are blind or hide
   peaks (``tracemalloc`` sees no ATen allocation; ``ru_maxrss`` only moves above an earlier peak),
   see ``docs/benchmark-speed.md``;
5. **steady-state time**: more calls until ``min_repeats`` calls and ``min_time`` seconds (or
   ``max_repeats`` calls, or the cell's budget); the median, quartiles and minimum are reported;
6. **FLOPs** of one more call under ``torch.utils.flop_counter.FlopCounterMode``, with a formula
   for CPU SDPA (which has none in torch) that credits causal masking.

``fwd`` calls run under ``torch.no_grad()``; ``fwdbwd`` calls run the forward and
``out.backward(grad)`` with gradients for the parameters and the inputs.
Decode cells prefill a context of ``n`` tokens, then time ``step`` per generated token.
The roofline cell times ``torch.mm`` on two ``n x n`` float32 matrices.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from ..core.module import state_tensors

#: Names of the baselines measured in the same run as the mechanisms.
SDPA = "torch.sdpa"
SDPA_DENSE = "torch.sdpa_dense_mask"
GEMM = "torch.mm"
BASELINES = (SDPA, SDPA_DENSE)


def preload_modules(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Modules a cell's parent process should import once, so that forking a cell costs no imports:
    torch, ``torch._dynamo`` (``FlopCounterMode`` imports it on first use, ~1.5 s), numpy, this module
    and every mechanism file."""
    import pkgutil

    from .. import mechanisms

    mods = ["torch", "torch._dynamo", "numpy", __name__, "attnzoo.mechanisms"]
    mods += [
        info.name for info in pkgutil.walk_packages(mechanisms.__path__, prefix=mechanisms.__name__ + ".")
    ]
    return mods + list(extra)


# -- memory ---------------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``VmData`` of this process in bytes ({} where /proc is missing)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmData"):
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


_LIBC = None


def _release_free_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS, so they cannot hide the next peak."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def measure_peak(fn: Callable[[], Any]) -> tuple[float | None, float]:
    """Run ``fn`` once; return (peak resident memory above the level before the call in MiB, seconds).

    The peak is ``None`` where ``/proc/self/clear_refs`` cannot be written (not Linux).
    """
    _release_free_memory()
    before = _proc_status().get("VmRSS")
    ok = before is not None and _reset_high_water_mark()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if not ok:
        return None, dt
    st = _proc_status()
    peak = max(st.get("VmHWM", 0), st.get("VmRSS", 0))
    return max(peak - before, 0) / 2**20, dt


def limit_memory(nbytes: int | None) -> None:
    """Cap this process's data segment at its current size + ``nbytes`` (``RLIMIT_DATA``), so an
    allocation that would not fit raises a clean out-of-memory error instead of waking the kernel's
    OOM killer on a shared machine."""
    if not nbytes:
        return
    try:
        import resource
    except ImportError:
        return
    data = _proc_status().get("VmData")
    if data is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    new = data + int(nbytes)
    if hard != resource.RLIM_INFINITY:
        new = min(new, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (new, hard))


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in msg
        for s in ("can't allocate memory", "not enough memory", "out of memory", "cannot allocate memory")
    )


# -- FLOPs ----------------------------------------------------------------------------------------
def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul-class FLOPs of one call of ``fn`` (elementwise ops, softmax and scans count 0)."""
    from ..core.flops import flop_counter

    with flop_counter() as fc:
        fn()
    return int(fc.get_total_flops())


# -- the SDPA baseline ------------------------------------------------------------------------------
class SDPABaseline(nn.Module):
    """``F.scaled_dot_product_attention`` with the same projections as :class:`AttentionModule`.

    ``dense_mask=True`` passes causal self-attention as an explicit boolean ``(N, M)`` mask instead of
    ``is_causal`` (what a mechanism with an arbitrary mask would pay in SDPA). Decoding keeps a
    preallocated key/value buffer and attends the new token to the filled part (no mask needed).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, dense_mask: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.causal, self.dense_mask = (
            num_heads,
            dim // num_heads,
            causal,
            dense_mask,
        )
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, t: Tensor) -> Tensor:
        b, h, n, d = t.shape
        return self.out_proj(t.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        src = x if context is None else context
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(src)), self._heads(self.v_proj(src))
        mask, is_causal = None, False
        if self.causal and context is None:
            n, m = q.shape[2], k.shape[2]
            if self.dense_mask:
                i = torch.arange(n)[:, None]
                mask = torch.arange(m)[None, :] <= i + (m - n)
            else:
                is_causal = True
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal))

    def prefill(
        self, x: Tensor, state: dict | None = None, capacity: int | None = None
    ) -> tuple[Tensor, dict]:
        b, n, _ = x.shape
        cap = capacity or 2 * n
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        kb = x.new_empty(b, self.num_heads, cap, self.head_dim)
        vb = x.new_empty(b, self.num_heads, cap, self.head_dim)
        kb[:, :, :n], vb[:, :, :n] = k, v
        q = self._heads(self.q_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._merge(out), {"k": kb, "v": vb, "pos": n}

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3 = x_t[:, None]
        pos = state["pos"]
        state["k"][:, :, pos : pos + 1] = self._heads(self.k_proj(x3))
        state["v"][:, :, pos : pos + 1] = self._heads(self.v_proj(x3))
        state["pos"] = pos + 1
        q = self._heads(self.q_proj(x3))
        out = F.scaled_dot_product_attention(q, state["k"][:, :, : pos + 1], state["v"][:, :, : pos + 1])
        return self._merge(out)[:, 0], state

    @staticmethod
    def state_nbytes(state: dict) -> int:
        k = state["k"]
        return 2 * k.shape[0] * k.shape[1] * state["pos"] * k.shape[3] * k.element_size()


def state_nbytes(module: nn.Module, state: Any) -> int:
    """Bytes of a decoding state (live part of caches; ints count nothing)."""
    fn = getattr(module, "state_nbytes", None)
    if fn is not None:
        return int(fn(state))
    return sum(t.numel() * t.element_size() for t in state_tensors(state).values() if t.dim() > 0)


# -- building ------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def build_module(job: dict, config_name: str) -> tuple[nn.Module, dict]:
    """The module of a job with ``config_name`` in {"defaults", "test_config"}; returns (module, settings)."""
    name, dim, heads = job["mechanism"], job["heads"] * job["head_dim"], job["heads"]
    causal = job["pattern"].startswith("causal")
    torch.manual_seed(job["seed"])
    if name in BASELINES:
        module: nn.Module = SDPABaseline(dim, heads, causal=causal, dense_mask=name == SDPA_DENSE)
        settings: dict = {}
    else:
        spec = registry.get(name)
        settings = dict(spec.test_config) if config_name == "test_config" else {}
        module = spec.module(dim, heads, causal=causal, **settings)
        settings = dict(getattr(module, "settings", settings))
    return module.to(_dtype(job["dtype"])), settings


def _inputs(job: dict) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(job["seed"] + 1)
    dim, dt = job["heads"] * job["head_dim"], _dtype(job["dtype"])
    x = torch.randn(job["batch"], job["n"], dim, generator=g).to(dt)
    ctx = (
        torch.randn(job["batch"], job["m"], dim, generator=g).to(dt)
        if job["pattern"].endswith("cross")
        else None
    )
    return x, ctx


def _step_fn(module: nn.Module, x: Tensor, ctx: Tensor | None, mode: str) -> Callable[[], None]:
    if mode == "fwd":

        def fwd() -> None:
            with torch.no_grad():
                out = module(x) if ctx is None else module(x, ctx)
            del out

        return fwd
    if mode != "fwdbwd":
        raise ValueError(f"unknown mode {mode!r}")
    x = x.detach().requires_grad_(True)
    ctx = None if ctx is None else ctx.detach().requires_grad_(True)
    leaves = [p for p in module.parameters() if p.requires_grad] + [x] + ([] if ctx is None else [ctx])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(x.dtype)

    def fwdbwd() -> None:
        for t in leaves:
            t.grad = None
        out = module(x) if ctx is None else module(x, ctx)
        out.backward(grad)
        del out

    return fwdbwd


def compile_seconds() -> float:
    """Seconds ``torch.compile`` (Dynamo + Inductor, FlexAttention included) has spent compiling in this
    process so far; 0 when nothing was compiled."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", ())))


def _compile_fields(result: dict, c0: float, c1: float, c2: float) -> None:
    """``compile_s``: compilation inside the first call; ``recompile_s``: during the timed calls (a
    non-zero value means recompilations polluted the steady-state timing)."""
    result["compile_s"] = c1 - c0
    result["recompile_s"] = c2 - c1


def _warm_libraries(dtype: torch.dtype) -> None:
    """Start the thread pool and GEMM/SDPA kernels on tiny tensors (nothing mechanism-specific)."""
    a = torch.randn(64, 64, dtype=dtype, requires_grad=True)
    (a @ a).sum().backward()
    q = torch.randn(1, 2, 16, 8, dtype=dtype)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)


def _stats(times: list[float]) -> dict[str, Any]:
    import numpy as np

    t = np.asarray(times) * 1e3
    p25, med, p75 = (float(v) for v in np.percentile(t, [25, 50, 75]))
    return {
        "median_ms": med,
        "p25_ms": p25,
        "p75_ms": p75,
        "spread_ms": p75 - p25,
        "min_ms": float(t.min()),
        "repeats": len(times),
    }


def _repeat(fn: Callable[[], Any], times: list[float], job: dict, t_start: float) -> bool:
    """Append call times until the stopping rule; returns True if the cell's budget cut it short."""
    while len(times) < job["max_repeats"]:
        if len(times) >= job["min_repeats"] and sum(times) >= job["min_time"]:
            return False
        if time.perf_counter() - t_start > job["budget"]:
            return len(times) < job["min_repeats"]
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return False


# -- cells ---------------------------------------------------------------------------------------------
def run_attention(job: dict) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {}
    _warm_libraries(_dtype(job["dtype"]))
    x, ctx = _inputs(job)
    config_name = "defaults"
    first_error = None
    c0 = compile_seconds()
    for attempt in ("defaults", "test_config"):
        try:
            module, settings = build_module(job, attempt)
            step = _step_fn(module, x, ctx, job["mode"])
            t0 = time.perf_counter()
            step()
            first = time.perf_counter() - t0
            config_name = attempt
            break
        except Exception as e:  # defaults cannot run: fall back to the spec's test_config once
            if is_oom(e) or attempt == "test_config" or job["mechanism"] in BASELINES:
                raise
            if not registry.get(job["mechanism"]).test_config:
                raise
            first_error = f"{type(e).__name__}: {e}"[:300]
    c1 = compile_seconds()
    result.update(config_used=config_name, config=settings, first_call_ms=first * 1e3)
    if first_error:
        result["defaults_error"] = first_error
    peak, dt = measure_peak(step)
    times = [dt]
    result["peak_mib"] = peak
    result["budget_limited"] = _repeat(step, times, job, t_start)
    result.update(_stats(times))
    _compile_fields(result, c0, c1, compile_seconds())
    if time.perf_counter() - t_start < 2 * job["budget"]:
        try:
            result["flops"] = count_flops(step)
        except Exception as e:  # a mechanism whose ops the flop counter cannot trace
            result["flops_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


def run_decode(job: dict) -> dict[str, Any]:
    t_start = time.perf_counter()
    dt = _dtype(job["dtype"])
    _warm_libraries(dt)
    dim = job["heads"] * job["head_dim"]
    g = torch.Generator().manual_seed(job["seed"] + 1)
    context = torch.randn(job["batch"], job["n"], dim, generator=g).to(dt)
    steps = job["max_repeats"] + 8
    tokens = torch.randn(job["batch"], steps, dim, generator=g).to(dt)
    config_name, first_error = "defaults", None
    c0 = compile_seconds()
    for attempt in ("defaults", "test_config"):
        try:
            module, settings = build_module({**job, "pattern": "causal_self"}, attempt)
            module.eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                if isinstance(module, SDPABaseline):
                    _, state = module.prefill(context, capacity=job["n"] + steps)
                else:
                    _, state = module.prefill(context)
                prefill = time.perf_counter() - t0
            config_name = attempt
            break
        except Exception as e:  # defaults cannot run: fall back to the spec's test_config once
            if is_oom(e) or attempt == "test_config" or job["mechanism"] in BASELINES:
                raise
            if not registry.get(job["mechanism"]).test_config:
                raise
            first_error = f"{type(e).__name__}: {e}"[:300]
    holder = {"state": state, "i": 0}

    def step() -> None:
        with torch.no_grad():
            y, holder["state"] = module.step(tokens[:, holder["i"]], holder["state"])
        holder["i"] += 1
        del y

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    c1 = compile_seconds()
    result: dict[str, Any] = {
        "config_used": config_name,
        "config": settings,
        "prefill_ms": prefill * 1e3,
        "first_call_ms": first * 1e3,
    }
    if first_error:
        result["defaults_error"] = first_error
    result["state_bytes"] = state_nbytes(module, holder["state"])
    peak, t = measure_peak(step)
    times = [t]
    result["peak_mib"] = peak
    result["budget_limited"] = _repeat(step, times, job, t_start)
    result.update(_stats(times))
    _compile_fields(result, c0, c1, compile_seconds())
    try:
        result["flops"] = count_flops(step)
    except Exception as e:
        result["flops_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


def run_roofline(job: dict) -> dict[str, Any]:
    """GFLOP/s of a float32 ``n x n`` GEMM: the machine's practical roofline."""
    n, dt = job["n"], _dtype(job["dtype"])
    g = torch.Generator().manual_seed(job["seed"])
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    c = torch.empty(n, n, dtype=dt)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)
    first = time.perf_counter() - t0
    times: list[float] = []
    t_start = time.perf_counter()
    _repeat(lambda: torch.mm(a, b, out=c), times, job, t_start)
    stats = _stats(times)
    flops = 2 * n**3
    return {
        **stats,
        "first_call_ms": first * 1e3,
        "flops": flops,
        "gflops_per_s": flops / (stats["median_ms"] / 1e3) / 1e9,
    }


def run_cell(job: dict) -> dict[str, Any]:
    """Measure one cell in this process; returns the measured fields (``status`` included)."""
    for mod in job.get("imports", ()):
        importlib.import_module(mod)
    torch.set_num_threads(int(job["threads"]))
    gc.freeze()  # the imported world is permanent: later gc.collect() calls scan only the cell's objects
    t0 = time.perf_counter()
    kind = job["kind"]
    fn = {"attn": run_attention, "decode": run_decode, "roofline": run_roofline}[kind]
    result = fn(job)
    result["status"] = "ok"
    result["worker_s"] = time.perf_counter() - t0
    result["threads_used"] = torch.get_num_threads()
    return result


def child_main(job: dict, conn) -> None:
    """Entry point of a cell's process: run the cell, send the result dict, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's business; it ends this process
    try:
        limit_memory(job.get("max_memory_bytes"))
        result = run_cell(job)
    except BaseException as e:  # noqa: BLE001 - every failure is a result of the cell
        result = {"status": "oom" if is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:500]}
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(result)
        conn.close()

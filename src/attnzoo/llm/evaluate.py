"""Perplexity under a press, and the cost table (KV bytes, peak memory, time per generated token).

Perplexity protocol: the first ``prefix`` tokens of the generated text (:func:`attnzoo.llm.needle.haystack_text`)
are prefilled and compressed by the press; the next ``continuation`` tokens are scored teacher-forced
in one forward pass at their original positions. The NLL of the first continuation token comes from the
prefill's last logits. ``ratio 0`` gives exactly the full-cache perplexity.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time
from dataclasses import dataclass

import torch

from .generation import prefill_many
from .presses import kv_cache_bytes, press


def _labels(presses: dict, ratios) -> list[tuple[str, float]]:
    return [("full", 0.0)] + [(n, float(r)) for n in presses for r in ratios]


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    presses: dict | None = None,
    ratios=(0.5, 0.75),
    prefix: int = 1024,
    continuation: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """``{label: perplexity}`` of the continuation after a compressed prefix (label ``name@ratio``)."""
    from .needle import haystack_text, press_label

    presses = {"snapkv": {}, "streaming": {}} if presses is None else presses
    text = haystack_text(n_sentences=max(64, (prefix + continuation) // 8), seed=seed)
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] < prefix + continuation:
        text = text + "\n\n" + haystack_text(64, seed=seed + ids.shape[1])
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids[:, : prefix + continuation]
    ctx, cont = ids[:, :prefix], ids[:, prefix:]
    labels = _labels(presses, ratios)
    objs = [None if n == "full" else press(n, compression_ratio=r, **presses[n]) for n, r in labels]
    mp = prefill_many(model, ctx, objs)
    first = torch.log_softmax(mp.logits.float(), -1)[0, cont[0, 0]]
    out = {}
    for (n, r), p, cache in zip(labels, objs, mp.caches):
        pos = torch.arange(prefix, prefix + cont.shape[1] - 1)[None]
        ctxm = p.decode_context(model) if p is not None else contextlib.nullcontext()
        with ctxm:
            logits = model(
                input_ids=cont[:, :-1], past_key_values=cache, position_ids=pos, use_cache=True
            ).logits
        lp = torch.log_softmax(logits.float(), -1)[0].gather(-1, cont[0, 1:, None])[:, 0]
        nll = -(lp.sum() + first) / cont.shape[1]
        out[press_label(n, r)] = math.exp(float(nll))
    return out


class PeakRSS:
    """Peak resident set size (bytes) of this process while the block runs (sampled every 5 ms)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self.start = 0

    def _rss(self) -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # pragma: no cover
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(self.interval)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


@dataclass
class CostRow:
    context: int
    press: str
    kv_bytes: int
    kept_fraction: float
    ms_per_token: float
    decode_peak_rss_delta: int
    prefill_seconds: float


@torch.no_grad()
def cost(
    model,
    tokenizer,
    contexts=(2048,),
    presses: dict | None = None,
    ratio: float = 0.75,
    new_tokens: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> list[CostRow]:
    """KV-cache bytes, decode time per token (median over ``new_tokens`` steps after one warm-up step)
    and decode peak RSS growth, with and without each press."""
    from .needle import haystack_text, press_label

    presses = {"snapkv": {}, "streaming": {}} if presses is None else presses
    rows = []
    labels = _labels(presses, (ratio,))
    for L in contexts:
        text = haystack_text(n_sentences=L // 6 + 64, seed=seed)
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :L]
        objs = [None if n == "full" else press(n, compression_ratio=r, **presses[n]) for n, r in labels]
        t0 = time.perf_counter()
        mp = prefill_many(model, ids, objs)
        t_prefill = time.perf_counter() - t0
        for (n, r), p, cache in zip(labels, objs, mp.caches):
            rep = p.report() if p is not None else {}
            nbytes = int(rep.get("bytes_after", kv_cache_bytes(cache)))
            tok = mp.logits.argmax(-1, keepdim=True)
            ctxm = p.decode_context(model) if p is not None else contextlib.nullcontext()
            with ctxm, PeakRSS() as mem:
                pos = L
                model(
                    input_ids=tok, past_key_values=cache, position_ids=torch.tensor([[pos]]), use_cache=True
                )  # warm-up
                pos += 1
                steps = []
                for _ in range(new_tokens):
                    t1 = time.perf_counter()
                    logits = model(
                        input_ids=tok,
                        past_key_values=cache,
                        position_ids=torch.tensor([[pos]]),
                        use_cache=True,
                        logits_to_keep=1,
                    ).logits
                    tok = logits[:, -1].argmax(-1, keepdim=True)
                    steps.append(time.perf_counter() - t1)
                    pos += 1
                dt = statistics.median(steps)  # median: robust to other processes on a shared CPU
            rows.append(
                CostRow(
                    L,
                    press_label(n, r),
                    nbytes,
                    float(rep.get("kept_fraction", 1.0)),
                    1000 * dt,
                    mem.delta,
                    t_prefill,
                )
            )
            if progress:
                print(
                    f"cost {L} {press_label(n, r)}: {nbytes / 2**20:.1f} MiB, {1000 * dt:.1f} ms/token",
                    flush=True,
                )
        del mp
    return rows


def cost_markdown(rows: list[CostRow]) -> str:
    out = [
        "| context | press | KV cache | kept | ms / token | decode peak RSS + |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.context} | {r.press} | {r.kv_bytes / 2**20:.1f} MiB | {100 * r.kept_fraction:.0f}% | "
            f"{r.ms_per_token:.1f} | {r.decode_peak_rss_delta / 2**20:.1f} MiB |"
        )
    return "\n".join(out)

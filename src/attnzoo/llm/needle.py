"""Needle-in-a-haystack on a generated, license-clean haystack.

The haystack is prose generated from a small fixed grammar with a seeded ``random.Random`` (no text
from anywhere else). A needle is a fact "The special magic number for <city> is <number>." inserted at
a sentence boundary at a given depth (0 = start, 1 = end of the haystack); the question asks for the
number of that city, and an answer counts as correct when it contains the number's digits. The prompt
is prefilled once and compressed by each press (one prefill serves every press). Two protocols:
``query_aware`` (default; SnapKV paper): the question and the answer prefix are inside the compressed
prompt; ``query_agnostic`` (kvpress pipeline): only the context is compressed, the question follows
uncompressed (:mod:`attnzoo.llm.generation`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

_SUBJECTS = [
    "The old ferryman",
    "A quiet librarian",
    "The village baker",
    "Our neighbour",
    "The young painter",
    "A travelling merchant",
    "The harbour master",
    "My grandmother",
    "The night watchman",
    "A curious student",
    "The gardener",
    "The blacksmith",
    "A tired shepherd",
    "The schoolteacher",
    "The orchestra conductor",
]
_VERBS = [
    "carried",
    "repaired",
    "painted",
    "described",
    "counted",
    "collected",
    "cleaned",
    "measured",
    "borrowed",
    "planted",
    "sorted",
    "examined",
    "wrapped",
    "delivered",
    "polished",
]
_OBJECTS = [
    "a basket of apples",
    "the wooden chairs",
    "an old map",
    "seven blue lanterns",
    "the broken clock",
    "a bundle of letters",
    "the copper kettle",
    "a pile of firewood",
    "the spare sails",
    "a box of buttons",
    "the garden fence",
    "a set of brass keys",
    "the heavy curtains",
    "two loaves of bread",
    "the stone bench",
]
_PLACES = [
    "near the river",
    "behind the mill",
    "in the market square",
    "on the hill road",
    "beside the chapel",
    "at the train station",
    "under the bridge",
    "in the orchard",
    "by the lighthouse",
    "across the meadow",
]
_TIMES = [
    "before sunrise",
    "after the rain",
    "on a windy afternoon",
    "late in the evening",
    "during the festival",
    "at noon",
    "in early spring",
    "one foggy morning",
    "after supper",
    "on the first day of winter",
]
_EXTRAS = [
    "Nobody seemed to notice.",
    "It took longer than expected.",
    "The work was slow but steady.",
    "Everyone agreed it was a good idea.",
    "The weather stayed mild all day.",
    "A dog barked somewhere far away.",
    "Later that week the task was done again.",
    "Children watched from the window.",
]
_CITIES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Hanoi",
    "Tbilisi",
    "Quito",
    "Dakar",
    "Perth",
    "Riga",
    "Osaka",
    "Tunis",
    "Bergen",
    "Cusco",
    "Accra",
    "Turku",
]


def haystack_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` generated sentences (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}."
        out.append(s)
        if rng.random() < 0.3:
            out.append(rng.choice(_EXTRAS))
    return out[:n]


def haystack_text(n_sentences: int = 400, seed: int = 0) -> str:
    """A generated text (used for perplexity too): paragraphs of 6 sentences."""
    sents = haystack_sentences(n_sentences, seed)
    paras = [" ".join(sents[i : i + 6]) for i in range(0, len(sents), 6)]
    return "\n\n".join(paras)


@dataclass
class Needle:
    city: str
    number: str

    @property
    def sentence(self) -> str:
        return f"The special magic number for {self.city} is {self.number}."

    @property
    def question(self) -> str:
        return f"What is the special magic number for {self.city}? Answer with the number only."

    @property
    def answer_prefix(self) -> str:
        return f"The special magic number for {self.city} is"

    def correct(self, answer: str) -> bool:
        return self.number in re.sub(r"[^0-9]", "", answer)


def make_needle(seed: int) -> Needle:
    rng = random.Random(10_000 + seed)
    return Needle(rng.choice(_CITIES), str(rng.randint(10_000, 99_999)))


def build_context(tokenizer, n_tokens: int, depth: float, needle: Needle, seed: int = 0) -> str:
    """Haystack of about ``n_tokens`` tokens with ``needle`` at fractional ``depth`` (sentence boundary)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    sents: list[str] = []
    total = 0
    budget = max(16, n_tokens - len(tokenizer.encode(" " + needle.sentence, add_special_tokens=False)))
    chunk = 64
    k = 0
    while total < budget:
        new = haystack_sentences(k + chunk, seed)[k:]
        for s in new:
            nt = len(tokenizer.encode(" " + s, add_special_tokens=False))
            if total + nt > budget:
                total = budget
                break
            sents.append(s)
            total += nt
        k += chunk
    pos = round(depth * len(sents))
    sents.insert(pos, needle.sentence)
    return " ".join(sents)


@dataclass
class NeedleResult:
    length: int
    depth: float
    sample: int
    press: str
    ratio: float
    correct: bool
    answer: str
    context_tokens: int
    kept_fraction: float
    cache_bytes: int
    protocol: str = "query_aware"

    def key(self) -> str:
        return _key(self.length, self.depth, self.sample, self.press, self.ratio, self.protocol)


def _key(length, depth, sample, press_name, ratio, protocol) -> str:
    return f"{length}|{depth:.3f}|{sample}|{press_name}|{ratio:.3f}|{protocol}"


def press_label(name: str, ratio: float) -> str:
    return "full" if name == "full" else f"{name}@{ratio:g}"


def run_needle(
    model,
    tokenizer,
    lengths=(1024, 2048),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 2,
    presses: dict | None = None,
    ratios=(0.75,),
    out: str | Path | None = None,
    max_new_tokens: int = 10,
    progress: bool = True,
    seed: int = 0,
    protocol: str = "query_aware",
) -> list[NeedleResult]:
    """The grid: lengths x depths x samples; the full cache and every ``(press, ratio)`` on each prompt.

    ``protocol``: ``"query_aware"`` (SnapKV paper, kvpress ``query_aware``: the question and the answer
    prefix are part of the compressed prefill, the first answer token comes from the prefill) or
    ``"query_agnostic"`` (kvpress pipeline: only the context is compressed; question and answer follow).
    ``presses``: ``{name: settings}`` (default: snapkv, streaming). One prefill per prompt serves every
    press (:func:`attnzoo.llm.generation.prefill_many`). With ``out`` (a ``.jsonl`` path) finished rows
    are appended as they come and skipped on a rerun (resumable).
    """
    import torch

    from .generation import greedy_decode, prefill_many, split_chat
    from .loading import eos_token_ids
    from .presses import kv_cache_bytes, press

    if protocol not in ("query_aware", "query_agnostic"):
        raise ValueError(f"protocol must be 'query_aware' or 'query_agnostic', got {protocol!r}")
    presses = {"snapkv": {}, "streaming": {}} if presses is None else presses
    done: dict[str, NeedleResult] = {}
    path = Path(out) if out is not None else None
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = NeedleResult(**json.loads(line))
                done[r.key()] = r
    eos = eos_token_ids(model, tokenizer)
    jobs = [(L, d, s) for L in lengths for d in depths for s in range(samples)]
    labels = [("full", 0.0)] + [(n, float(r)) for n in presses for r in ratios]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="needle", unit="prompt")
        except ImportError:  # pragma: no cover
            bar = None
    results: list[NeedleResult] = []
    for L, d, s in jobs:
        keys = {_key(L, d, s, n, r, protocol): (n, r) for n, r in labels}
        if all(k in done for k in keys):
            results.extend(done[k] for k in keys)
            if bar is not None:
                bar.update(1)
            continue
        needle = make_needle(seed * 10**7 + L * 1000 + round(d * 100) * 10 + s)  # a different needle per cell
        c0, q0 = split_chat(tokenizer, "", needle.question, answer_prefix=needle.answer_prefix)
        overhead = c0.shape[1] + q0.shape[1]  # template + question: the whole prompt is about L tokens
        context = build_context(tokenizer, L - overhead, d, needle, seed=seed + s)
        c, q = split_chat(tokenizer, context, needle.question, answer_prefix=needle.answer_prefix)
        if protocol == "query_aware":
            c, q = torch.cat([c, q], dim=1), None
        objs = [None if n == "full" else press(n, compression_ratio=r, **presses[n]) for n, r in labels]
        with torch.no_grad():
            mp = prefill_many(model, c, objs)
        for (n, r), p, cache in zip(labels, objs, mp.caches):
            k = _key(L, d, s, n, r, protocol)
            if k in done:
                results.append(done[k])
                continue
            rep = p.report() if p is not None else {}
            nbytes = rep.get("bytes_after", kv_cache_bytes(cache))
            ctx = p.decode_context(model) if p is not None else _null()
            with ctx, torch.no_grad():
                if q is None:  # query-aware: the first answer token comes from the (exact) prefill logits
                    first = int(mp.logits.argmax(-1))
                    toks = [] if first in eos else [first]
                    if toks:
                        toks += greedy_decode(
                            model, cache, torch.tensor([[first]]), c.shape[1], max_new_tokens - 1, eos
                        )
                else:
                    toks = greedy_decode(model, cache, q, c.shape[1], max_new_tokens, eos)
            ans = tokenizer.decode(toks, skip_special_tokens=True).strip()
            res = NeedleResult(
                L,
                d,
                s,
                n,
                r,
                needle.correct(ans),
                ans,
                int(c.shape[1]),
                float(rep.get("kept_fraction", 1.0)),
                int(nbytes),
                protocol,
            )
            results.append(res)
            done[k] = res
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:
                    f.write(json.dumps(asdict(res)) + "\n")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _null():
    import contextlib

    return contextlib.nullcontext()


def accuracy_table(results: list[NeedleResult]) -> dict[str, dict[tuple[int, float], float]]:
    """``{press_label: {(length, depth): accuracy}}``."""
    acc: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for r in results:
        acc.setdefault(press_label(r.press, r.ratio), {}).setdefault((r.length, r.depth), []).append(
            r.correct
        )
    return {p: {k: sum(v) / len(v) for k, v in cells.items()} for p, cells in acc.items()}


def overall_accuracy(results: list[NeedleResult]) -> dict[str, float]:
    acc: dict[str, list[bool]] = {}
    for r in results:
        acc.setdefault(press_label(r.press, r.ratio), []).append(r.correct)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def markdown_table(results: list[NeedleResult]) -> str:
    tab = accuracy_table(results)
    lengths = sorted({r.length for r in results})
    rows = [
        "| press | " + " | ".join(f"{L} tok" for L in lengths) + " | all |",
        "|---|" + "---|" * (len(lengths) + 1),
    ]
    overall = overall_accuracy(results)
    for p, cells in tab.items():
        per_len = []
        for L in lengths:
            v = [a for (l2, _), a in cells.items() if l2 == L]
            per_len.append(f"{100 * sum(v) / len(v):.0f}%" if v else "-")
        rows.append(f"| {p} | " + " | ".join(per_len) + f" | {100 * overall[p]:.0f}% |")
    return "\n".join(rows)


def plot_heatmaps(results: list[NeedleResult], out_dir: str | Path) -> list[Path]:
    """One heatmap PNG per press label (x: context length, y: needle depth, colour: accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, cells in accuracy_table(results).items():
        lengths = sorted({k[0] for k in cells})
        depths = sorted({k[1] for k in cells})
        grid = [[cells.get((L, d), float("nan")) for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 0.9 * len(lengths)), 1.2 + 0.45 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle accuracy: {label}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / f"needle_{label.replace('@', '_')}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths

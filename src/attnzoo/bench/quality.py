"""``attnzoo bench quality``: every mechanism, one small model recipe, generated tasks, four patterns.

Each registered mechanism is trained with the same recipe (:mod:`attnzoo.bench.models`) on seeded
generated tasks (:mod:`attnzoo.bench.tasks`), at least one per attention pattern of CAB (Zhang et
al., "CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling", arXiv 2210.07661):

========================  =================  =====================================================
task                      pattern            what it measures
========================  =================  =====================================================
``mqar``                  causal self        multi-query associative recall (Zoology, arXiv 2312.04927),
                                             swept over the number of pairs (and length with ``--full``)
``selective_copy``        causal self        selective copying (MAD, arXiv 2403.17844), a sanity task
``story_lm``              causal self        next-token prediction on generated stories; scored on
                                             recall-determined tokens
``listops``               noncausal self     ListOps-style hierarchical classification (LRA)
``retrieval``             noncausal self     long-range retrieval: queries classify the value of a pre-bound pair
``lookup``                noncausal cross    associative lookup in a memory of pre-bound pairs
``stream``                causal cross       monotonic transduction (streaming copy), the source unmasked
``shapes``                spatial            generated shape images, tiny ViT (grid for ``spatial``
                                             mechanisms, flattened tokens for noncausal-self ones)
========================  =================  =====================================================

A mechanism enters a task only when it declares ``trainable`` and the pattern the task needs; other
cells say "not applicable (capability)". Mechanisms come from :func:`attnzoo.registry.all_specs`,
built with their ``test_config`` settings, so a mechanism registered later appears with no edit.

Results are stored one JSON file per (task setting, mechanism, settings, recipe, seed) cell under
``OUT/quality/cells/``, written atomically after the cell finishes: re-running skips finished cells
and an interrupted run loses only the cell in progress. Same seed, same thread count -> the same
numbers: data come from explicit generators (training seed ``s``, evaluation seed ``2**40 + s``,
model initialisation ``2**41 + s``), fresh training data every step, evaluation on 1,000 examples.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import registry
from . import tasks as T
from .capabilities import write_text_atomic
from .models import CrossModel, TokenModel, count_parameters

#: Bump when the harness changes in a way that changes numbers (old cells are then not reused).
VERSION = 2
EVAL_SEED_BASE = 2**40
INIT_SEED_BASE = 2**41
#: Mechanisms of the quick default (those registered); ``--full`` or ``--mechanisms all`` runs every one.
QUICK_MECHANISMS = ("softmax", "linear", "sliding_window")
REFERENCE = "softmax"
#: torch threads of a run (the machines have 2 cores); recorded in every cell.
DEFAULT_THREADS = 2
#: Patch side of the image task (16 x 16 images -> an 8 x 8 token grid).
SHAPES_PATCH = 2
_SHORT = {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC", "spatial": "2-D"}


@dataclass(frozen=True)
class Recipe:
    """The training recipe shared by every mechanism (per mode)."""

    dim: int
    heads: int
    layers: int
    mlp_ratio: int = 4
    batch: int = 64
    weight_decay: float = 0.1
    warmup: float = 0.1
    clip: float | None = None  # gradient-norm clipping (off, as in the calibration harness)
    eval_examples: int = 1000
    curve_points: int = 10
    curve_examples: int = 256


#: Quick: the small MQAR setting of benchmarks.md 6.1 (d=32, 1 head: softmax 1.000 by step 1,000 there;
#: here seed 0 left the ~0.15 plateau at step ~1,000 and reached 0.986 at 1,500, so quick MQAR trains
#: 2,000 steps). Mechanisms that need several heads fail to build here (recorded as errors); ``--full``
#: uses the calibrated d=64, 2 heads.
QUICK = Recipe(dim=32, heads=1, layers=2)
#: Full: the calibrated main setting (d=64, 2 heads, 2 layers; benchmarks.md 6.1 / 7.3).
FULL = Recipe(dim=64, heads=2, layers=2)


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    needs: tuple[str, ...]  # the mechanism must declare one of these (and ``trainable``)
    generator: str  # function in attnzoo.bench.tasks
    kind: str  # "lm" | "cls" | "cross" | "patch"
    params: Mapping[str, Any]
    steps: int
    quick_steps: int
    lr: float = 3e-3
    quick: bool = True  # part of the quick subset
    sweeps: tuple[tuple[str, tuple, tuple], ...] = ()  # (param, full values, quick values)
    knobs: tuple[str, ...] = ()  # params the --vocab / --length knobs set
    layers: int | None = None  # overrides the recipe's depth
    heads: int | None = None  # overrides the recipe's head count
    metric: str = "accuracy"
    about: str = ""


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "mqar", "MQAR", ("causal_self",), "mqar", "lm", {"vocab": 128, "length": 64, "num_pairs": 8},
            steps=1500, quick_steps=2000,
            sweeps=(("num_pairs", (2, 4, 8, 16), (4, 8, 16)), ("length", (32, 64, 128), ())),
            knobs=("vocab", "length"), metric="accuracy on query positions",
            about="multi-query associative recall (Zoology); keys [1,V/2), values [V/2,V), power_a 0.01, random fill",
        ),
        Task(
            "selective_copy", "selective copy", ("causal_self",), "selective_copy", "lm",
            {"vocab": 16, "length": 64, "num_tokens": 8}, steps=1000, quick_steps=1000, knobs=("vocab", "length"),
            metric="accuracy on copied tokens", about="MAD selective copying (sanity task: every mechanism should pass)",
        ),
        Task(
            "story_lm", "story LM", ("causal_self",), "story_lm", "lm", {"length": 64}, steps=1000, quick_steps=600,
            knobs=("length",), quick=False, metric="next-token accuracy on recall-determined tokens",
            about="next-token prediction on generated stories (trained on every token)",
        ),
        Task(
            "listops", "ListOps", ("noncausal_self",), "listops", "cls",
            {"max_depth": 5, "max_args": 5, "min_length": 16, "length": 64}, steps=1500, quick_steps=1000, lr=1e-3,
            quick=False, knobs=("length",), metric="10-way accuracy",
            about="ListOps-style hierarchical classification (LRA generator, small); CLS pooling",
        ),
        Task(
            "retrieval", "retrieval", ("noncausal_self",), "retrieval", "lm",
            {"vocab": 128, "num_values": 16, "length": 64, "num_queries": 16},
            steps=1000, quick_steps=600, knobs=("vocab", "length"), metric="accuracy per query (16-way)",
            about="48 pre-bound (key, value) tokens and 16 (key, ?) queries shuffled over the sequence; each query classifies its value",
        ),
        Task(
            "lookup", "cross lookup", ("noncausal_cross",), "lookup", "cross",
            {"vocab": 256, "num_pairs": 64, "num_queries": 32}, steps=1000, quick_steps=800, layers=1,
            sweeps=(("num_pairs", (16, 32, 64), (16, 64)),), knobs=("vocab",), metric="accuracy per query",
            about="queries attend to a memory of pre-bound pairs E[k]+E[v]; one decoder layer",
        ),
        Task(
            "stream", "streaming copy", ("causal_cross",), "stream", "cross", {"vocab": 10, "length": 64, "op": "copy"},
            steps=1000, quick_steps=400, knobs=("vocab", "length"), metric="accuracy per output token",
            about="causal cross: y_t = x_t (op=sum: running sum mod V), decoder fed y_<t; the source is never masked",
        ),
        Task(
            "shapes", "shapes", ("spatial", "noncausal_self"), "shapes", "patch", {"size": 16, "noise": 0.25},
            steps=1500, quick_steps=1000, heads=4, metric="4-way accuracy",
            about="generated 16x16 shape images (square, outline, disc, plus), `attnzoo.models.ViT`: 2x2 patches "
                  "(8x8 grid), 4 heads, mean pooling",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mech:
    """A mechanism of the run with its settings (``test_config`` + command-line overrides)."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> registry.Mechanism:
        return registry.get(self.name)

    @property
    def settings(self) -> dict[str, Any]:
        return {**self.spec.test_config, **self.overrides}

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))


@dataclass(frozen=True)
class Cell:
    task: Task
    params: Mapping[str, Any]
    mech: Mech
    seed: int
    recipe: Recipe
    steps: int
    lr: float

    def config(self) -> dict[str, Any]:
        spec = self.mech.spec
        return {
            "version": VERSION,
            "generator": self.task.generator,
            "kind": self.task.kind,
            "params": dict(sorted(self.params.items())),
            "mechanism": self.mech.name,
            "settings": {**spec.defaults, **self.mech.settings},
            "recipe": {**self.recipe.__dict__},
            "steps": self.steps,
            "lr": self.lr,
            "seed": self.seed,
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.config(), sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def path(self, root: Path) -> Path:
        folder = re.sub(r"[^A-Za-z0-9_.=-]", "_", self.mech.label)
        return root / "cells" / self.task.name / folder / f"s{self.seed}-{self.key}.json"

    @property
    def label(self) -> str:
        return f"{self.task.name}[{_fmt_params(self.params)}]/{self.mech.label}/s{self.seed}"


def _fmt_params(p: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(p.items()))


def applicable(task: Task, spec: registry.Mechanism) -> str | None:
    """``None`` if ``spec`` enters ``task``, else the missing capability."""
    if not spec.supports("trainable"):
        return "trainable"
    if not any(spec.supports(c) for c in task.needs):
        return " or ".join(task.needs)
    return None


def task_variants(task: Task, quick: bool, overrides: Mapping[str, Any], sweep_overrides: Mapping[str, Sequence]) -> tuple[dict, list[dict]]:
    """The main parameter set of ``task`` and every (deduplicated) variant its sweeps add."""
    main = dict(task.params)
    for k, v in overrides.items():
        if k in task.knobs and v is not None:
            main[k] = v
    variants = [main]
    for param, full_vals, quick_vals in task.sweeps:
        vals = sweep_overrides.get(param)
        if vals is None:
            if overrides.get(param) is not None and param in task.knobs:
                continue  # the knob fixed this parameter: no sweep over it
            vals = quick_vals if quick else full_vals
        else:
            vals = list(vals)
            if main.get(param) not in vals and vals:
                main[param] = vals[0]
        for v in vals:
            var = {**main, param: v}
            if var not in variants:
                variants.append(var)
    return main, variants


def _validate(task: Task, params: Mapping[str, Any]) -> str | None:
    try:
        getattr(T, task.generator)(torch.Generator().manual_seed(0), 2, **params)
    except ValueError as e:
        return str(e)
    return None


def plan(
    *,
    quick: bool,
    mechanisms: Sequence[Mech],
    tasks: Sequence[str],
    seeds: Sequence[int],
    steps: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    eval_examples: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    sweep_overrides: Mapping[str, Mapping[str, Sequence]] | None = None,
) -> tuple[list[Cell], dict[str, dict], list[str]]:
    """Every cell of a run; also ``{task: {"main": params, "variants": [...]}}`` and notes on skipped variants."""
    overrides = dict(overrides or {})
    sweep_overrides = dict(sweep_overrides or {})
    base = QUICK if quick else FULL
    if batch is not None:
        base = replace(base, batch=batch)
    if eval_examples is not None:
        if eval_examples < 1:
            raise ValueError(f"eval_examples must be >= 1, got {eval_examples}")
        base = replace(base, eval_examples=eval_examples, curve_examples=min(base.curve_examples, eval_examples))
    cells: list[Cell] = []
    layout: dict[str, dict] = {}
    notes: list[str] = []
    for tname in tasks:
        task = TASKS[tname]
        main, variants = task_variants(task, quick, overrides, sweep_overrides.get(tname, {}))
        err = _validate(task, main)
        if err:
            raise ValueError(f"task {tname}: {err}")
        kept = []
        for var in variants:
            err = _validate(task, var)
            if err:
                notes.append(f"{tname} [{_fmt_params(var)}] skipped: {err}")
            else:
                kept.append(var)
        layout[tname] = {"main": main, "variants": kept}
        recipe = replace(base, layers=task.layers or base.layers, heads=task.heads or base.heads)
        n_steps = steps if steps is not None else (task.quick_steps if quick else task.steps)
        if n_steps < 3:
            raise ValueError(f"steps must be >= 3, got {n_steps}")
        for mech in mechanisms:
            if applicable(task, mech.spec) is not None:
                continue
            for var in kept:
                for s in seeds:
                    cells.append(Cell(task, var, mech, int(s), recipe, n_steps, lr if lr is not None else task.lr))
    # drop duplicates (a sweep point equal to the main setting is one cell); run the main settings
    # first, seed by seed, softmax first, so that an interrupted run already has a comparable table
    seen, unique = set(), []
    for c in cells:
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    mech_rank = {m: i for i, m in enumerate(_order(m.label for m in mechanisms))}
    task_rank = {t: i for i, t in enumerate(tasks)}
    seed_rank = {s: i for i, s in enumerate(seeds)}
    unique.sort(key=lambda c: (c.params != layout[c.task.name]["main"], seed_rank[c.seed], task_rank[c.task.name],
                               mech_rank[c.mech.label]))
    return unique, layout, notes


# ---------------------------------------------------------------------------------------------------
# training one cell
# ---------------------------------------------------------------------------------------------------
def build_model(cell: Cell) -> nn.Module:
    t, p, r = cell.task, cell.params, cell.recipe
    common = dict(dim=r.dim, heads=r.heads, layers=r.layers, settings=cell.mech.settings, mlp_ratio=r.mlp_ratio)
    g = t.generator
    if g in ("mqar", "selective_copy", "story_lm"):
        vocab = len(T.STORY_VOCAB) if g == "story_lm" else p["vocab"]
        return TokenModel(cell.mech.name, vocab=vocab, length=p["length"], causal=True, head="lm", **common)
    if g == "listops":
        return TokenModel(cell.mech.name, vocab=T.LISTOPS_VOCAB, length=p["length"], causal=False, head="cls", num_classes=10, **common)
    if g == "retrieval":
        return TokenModel(cell.mech.name, vocab=[p["vocab"], p["num_values"] + 1], length=p["length"], causal=False, head="lm",
                          num_classes=p["num_values"], **common)
    if g == "lookup":
        v = p["vocab"]
        return CrossModel(cell.mech.name, memory_vocabs=[v, v], query_vocab=v, out_vocab=v, causal=False, tie_query_embedding=True, **common)
    if g == "stream":
        v, n = p["vocab"], p["length"]
        return CrossModel(cell.mech.name, memory_vocabs=[v, n], query_vocab=v + 1, out_vocab=v, query_length=n, causal=True,
                          tie_query_positions=1, **common)
    if g == "shapes":
        from ..models import ViT

        return ViT(cell.mech.name, img_size=p["size"], patch_size=SHAPES_PATCH, in_chans=1, num_classes=len(T.SHAPE_CLASSES),
                   dim=r.dim, depth=r.layers, num_heads=r.heads, mlp_ratio=r.mlp_ratio, mechanism_cfg=cell.mech.settings)
    raise ValueError(f"no model for generator {g!r}")


def forward_batch(kind: str, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, int, int]:
    """Loss, number of correct predictions and number of scored predictions on ``batch``."""
    if kind == "lm":
        logits = model(batch["inputs"])
        targets = batch["targets"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=T.IGNORE)
        scored = targets != T.IGNORE
        if "score_mask" in batch:
            scored = scored & batch["score_mask"]
        correct = (logits.argmax(-1) == targets) & scored
        return loss, int(correct.sum()), int(scored.sum())
    if kind == "cross":
        logits = model(batch["memory"], batch["queries"])
        targets = batch["targets"]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, int((logits.argmax(-1) == targets).sum()), targets.numel()
    x = batch["inputs"] if kind == "cls" else batch["images"]
    logits = model(x)
    loss = F.cross_entropy(logits, batch["labels"])
    return loss, int((logits.argmax(-1) == batch["labels"]).sum()), batch["labels"].numel()


@torch.no_grad()
def evaluate(kind: str, model: nn.Module, batches: Sequence[Mapping[str, Tensor]], limit: int | None = None) -> tuple[float, float]:
    """Accuracy and mean loss over ``batches`` (the first ``limit`` examples when given)."""
    was = model.training
    model.eval()
    correct = total = 0
    loss_sum, n_ex = 0.0, 0
    for b in batches:
        if limit is not None and n_ex >= limit:
            break
        loss, c, t = forward_batch(kind, model, b)
        size = next(iter(b.values())).shape[0]
        correct, total = correct + c, total + t
        loss_sum += float(loss) * size
        n_ex += size
    model.train(was)
    return (correct / total if total else float("nan")), loss_sum / max(n_ex, 1)


def forward_flops_per_example(kind: str, model: nn.Module, batch: Mapping[str, Tensor]) -> int | None:
    """Forward FLOPs of ``model`` on the first example of ``batch`` in eval mode (``attnzoo.core.flops``:
    matmuls, convolutions and attention kernels, a multiply-add = 2; element-wise work not counted);
    ``None`` if the counter cannot trace the model."""
    from ..core.flops import flop_counter

    one = {k: v[:1] for k, v in batch.items()}
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            forward_batch(kind, model, one)
        return int(counter.get_total_flops())
    except Exception:  # a count is optional; the cell's accuracy stands without it
        return None
    finally:
        model.train(was)


def one_cycle(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's ``OneCycleLR`` (cosine, momentum cycling as by default); the warm-up is at least two
    steps so that very short runs (tests) are defined."""
    if steps < 3:
        raise ValueError(f"steps must be >= 3, got {steps}")
    pct = max(warmup, 2.0 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=optimizer.param_groups[0]["lr"], total_steps=steps,
                                               pct_start=pct, anneal_strategy="cos")


def train_cell(cell: Cell, on_step: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Train and evaluate one cell; returns its record (``status`` "done" or "error")."""
    rec: dict[str, Any] = {
        "key": cell.key,
        "task": cell.task.name,
        "mechanism": cell.mech.name,
        "label": cell.mech.label,
        "params": dict(cell.params),
        "seed": cell.seed,
        "config": cell.config(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    done_steps = 0
    try:
        gen_fn = getattr(T, cell.task.generator)
        r = cell.recipe
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED_BASE + cell.seed)
            model = build_model(cell)
        rec["parameters"] = count_parameters(model)
        eval_gen = torch.Generator().manual_seed(EVAL_SEED_BASE + cell.seed)
        sizes = [min(r.batch, r.eval_examples - i) for i in range(0, r.eval_examples, r.batch)]
        eval_batches = [gen_fn(eval_gen, n, **cell.params) for n in sizes]
        train_gen = torch.Generator().manual_seed(cell.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cell.lr, weight_decay=r.weight_decay)
        sched = one_cycle(opt, cell.steps, r.warmup)
        every = max(1, cell.steps // r.curve_points)
        curve: list[list[float]] = []
        train_s = 0.0
        diverged = None
        model.train()
        for step in range(1, cell.steps + 1):
            batch = gen_fn(train_gen, r.batch, **cell.params)
            t0 = time.perf_counter()
            loss, _, _ = forward_batch(cell.task.kind, model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r.clip:
                nn.utils.clip_grad_norm_(model.parameters(), r.clip)
            opt.step()
            sched.step()
            train_s += time.perf_counter() - t0
            done_steps = step
            if on_step is not None:
                on_step(1)
            lv = float(loss.detach())
            if not math.isfinite(lv):
                diverged = step
                break
            if step % every == 0 or step == cell.steps:
                acc, _ = evaluate(cell.task.kind, model, eval_batches, limit=r.curve_examples)
                curve.append([step, round(train_s, 4), acc, lv])
        t0 = time.perf_counter()
        acc, eval_loss = evaluate(cell.task.kind, model, eval_batches)
        eval_s = time.perf_counter() - t0
        rec.update(
            status="done",
            accuracy=acc,
            eval_loss=eval_loss,
            train_seconds=round(train_s, 3),
            eval_seconds=round(eval_s, 3),
            seconds_per_example=eval_s / r.eval_examples,
            flops_per_example=forward_flops_per_example(cell.task.kind, model, eval_batches[0]),
            curve=curve,
            steps_to_099=next((int(c[0]) for c in curve if c[2] >= 0.99), None),
            diverged_at=diverged,
        )
    except Exception as e:  # a broken mechanism is a result of the benchmark, not a crash of it
        rec.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
    finally:
        if on_step is not None and done_steps < cell.steps:
            on_step(cell.steps - done_steps)
    return rec


# ---------------------------------------------------------------------------------------------------
# the store and the runner
# ---------------------------------------------------------------------------------------------------
def load_record(cell: Cell, root: Path) -> dict | None:
    path = cell.path(root)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == cell.key else None


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, unit="step", desc="quality", dynamic_ncols=True, mininterval=1.0)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return _Null()


def run_cells(cells: Sequence[Cell], root: Path, *, threads: int = 2, progress: bool = True, rerun: bool = False) -> dict[str, dict]:
    """Run every cell not finished yet; returns ``{key: record}`` for all cells."""
    records: dict[str, dict] = {}
    pending = []
    for c in cells:
        rec = None if rerun else load_record(c, root)
        if rec is not None and rec.get("status") == "done":
            records[c.key] = rec
        else:
            pending.append(c)
    bar = _progress(sum(c.steps for c in pending), progress and bool(pending))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for c in pending:
            bar.set_postfix_str(c.label)
            rec = train_cell(c, on_step=bar.update)
            write_text_atomic(c.path(root), json.dumps(rec, indent=1, default=repr))
            records[c.key] = rec
            if rec["status"] != "done":
                print(f"quality: {c.label} failed: {rec['error']}", file=sys.stderr)
    finally:
        torch.set_num_threads(old)
        bar.close()
    return records


# ---------------------------------------------------------------------------------------------------
# aggregation, tables, plots
# ---------------------------------------------------------------------------------------------------
def _stats(recs: Sequence[dict]) -> dict[str, Any]:
    accs = [r["accuracy"] for r in recs]
    return {
        "n": len(accs),
        "mean": sum(accs) / len(accs),
        "min": min(accs),
        "max": max(accs),
        "parameters": recs[0].get("parameters"),
        "train_seconds": sum(r["train_seconds"] for r in recs) / len(recs),
        "flops_per_example": recs[0].get("flops_per_example"),
        "seconds_per_example": (sum(r["seconds_per_example"] for r in recs) / len(recs)
                                if all(r.get("seconds_per_example") is not None for r in recs) else None),
        "steps_to_099": [r.get("steps_to_099") for r in recs],
        "diverged": any(r.get("diverged_at") for r in recs),
    }


def aggregate(cells: Sequence[Cell], records: Mapping[str, dict]) -> dict[tuple[str, str, str], dict]:
    """``{(task, mechanism label, params): stats}`` over seeds, with the errors of the run."""
    groups: dict[tuple[str, str, str], list] = {}
    for c in cells:
        groups.setdefault((c.task.name, c.mech.label, _fmt_params(c.params)), []).append(records.get(c.key))
    out = {}
    for k, recs in groups.items():
        done = [r for r in recs if r is not None and r.get("status") == "done"]
        errors = [r["error"] for r in recs if r is not None and r.get("status") == "error"]
        out[k] = {**(_stats(done) if done else {"n": 0}), "expected": len(recs), "errors": errors}
    return out


def _fmt_acc(st: Mapping[str, Any]) -> str:
    if st["n"] == 1:
        s = f"{st['mean']:.3f}"
    else:
        s = f"{st['mean']:.3f} ({st['min']:.2f}–{st['max']:.2f})"
    if st["n"] < st["expected"]:
        s += f" [{st['n']}/{st['expected']} seeds]"
    if st.get("diverged"):
        s += " (diverged)"
    return s


def _order(labels: Iterable[str]) -> list[str]:
    labels = sorted(set(labels))
    return sorted(labels, key=lambda s: (s != REFERENCE, s))


def render(
    *,
    quick: bool,
    cells: Sequence[Cell],
    records: Mapping[str, dict],
    mechanisms: Sequence[Mech],
    tasks: Sequence[str],
    layout: Mapping[str, dict],
    seeds: Sequence[int],
    notes: Sequence[str],
    plots: Mapping[str, str],
    link_prefix: str = "",
) -> str:
    """The Markdown section of the quality benchmark."""
    agg = aggregate(cells, records)
    selected = {m.label for m in mechanisms}
    rows = _order([s.name for s in registry.all_specs()] + [m.label for m in mechanisms])
    base = cells[0].recipe if cells else (QUICK if quick else FULL)
    lines = [
        "## Quality",
        "",
        f"{'Quick' if quick else 'Full'} setting: the same model for every mechanism: d={base.dim}, {base.heads} head(s), "
        f"{base.layers} pre-norm blocks (mechanism + 4x GELU MLP), learned positions, AdamW (wd {base.weight_decay}), "
        f"OneCycle ({base.warmup:.0%} warm-up, cosine), batch {base.batch}, fresh data every step; "
        f"accuracy on {base.eval_examples} held-out examples (evaluation seeds 2^40 + seed). "
        f"Seeds: {', '.join(map(str, seeds))}. Mechanisms use their `test_config` settings. "
        "Cells: mean over seeds (min–max); **bold** = best per task; softmax is the reference row.",
        "",
    ]
    header = "| mechanism | " + " | ".join(f"{TASKS[t].title} ({'/'.join(_SHORT[c] for c in TASKS[t].needs)})" for t in tasks) + " |"
    lines += [header, "|---|" + "---|" * len(tasks)]
    best = {}
    for t in tasks:
        key = _fmt_params(layout[t]["main"])
        vals = [st["mean"] for (tt, _, p), st in agg.items() if tt == t and p == key and st["n"]]
        best[t] = max(vals) if vals else None
    errors: list[str] = []
    for label in rows:
        name = label.split(":", 1)[0]
        try:
            spec = registry.get(name)
        except KeyError:
            continue
        row = []
        for t in tasks:
            task = TASKS[t]
            missing = applicable(task, spec)
            if missing is not None:
                row.append("not applicable (capability)")
                continue
            if label not in selected:
                row.append("not run" + (" (quick subset)" if quick else ""))
                continue
            st = agg.get((t, label, _fmt_params(layout[t]["main"])))
            if st is None:
                row.append("not run")
            elif st["n"] == 0:
                row.append("error" if st["errors"] else "not run")
                errors += [f"`{label}` on {t}: {e}" for e in st["errors"]]
            else:
                s = _fmt_acc(st)
                row.append(f"**{s}**" if best[t] is not None and st["mean"] >= best[t] - 1e-12 else s)
        ref = " (reference)" if label == REFERENCE else ""
        lines.append(f"| `{label}`{ref} | " + " | ".join(row) + " |")
    lines += [
        "",
        "*not applicable (capability)*: the mechanism does not declare the pattern in the column header "
        "(CS/NS/NC/CC = causal/noncausal self/cross, 2-D = spatial) or does not declare `trainable`. "
        + ("*not run (quick subset)*: the quick default trains " + ", ".join(f"`{m}`" for m in QUICK_MECHANISMS)
           + " only; `attnzoo bench quality --full` (or `--mechanisms all`) runs every mechanism." if quick else ""),
        "",
        "### Tasks",
        "",
        "| task | pattern | parameters (main) | steps | lr | metric | what |",
        "|---|---|---|---|---|---|---|",
    ]
    steps_of = {c.task.name: c.steps for c in cells}
    lr_of = {c.task.name: c.lr for c in cells}
    for t in tasks:
        task = TASKS[t]
        lines.append(
            f"| `{t}` | {' or '.join(task.needs)} | {_fmt_params(layout[t]['main'])} | {steps_of.get(t, '–')} | "
            f"{lr_of.get(t, task.lr)} | {task.metric} | {task.about} |"
        )
    for t in tasks:
        task = TASKS[t]
        for param, _, _ in task.sweeps:
            pts = sorted({v[param] for v in layout[t]["variants"] if all(v[k] == layout[t]["main"][k] for k in v if k != param)})
            if len(pts) < 2:
                continue
            lines += ["", f"### {task.title}: accuracy vs {param.replace('_', ' ')}", ""]
            lines += ["| mechanism | " + " | ".join(f"{param}={v}" for v in pts) + " |", "|---|" + "---|" * len(pts)]
            for label in _order(m.label for m in mechanisms):
                cells_row = []
                any_val = False
                for v in pts:
                    params = {**layout[t]["main"], param: v}
                    st = agg.get((t, label, _fmt_params(params)))
                    if st is None:
                        cells_row.append("–")
                    elif st["n"] == 0:
                        cells_row.append("error" if st["errors"] else "not run")
                    else:
                        any_val = True
                        cells_row.append(_fmt_acc(st))
                if any_val:
                    lines.append(f"| `{label}` | " + " | ".join(cells_row) + " |")
            plot = plots.get(f"{t}:{param}")
            if plot:
                lines += ["", f"![{task.title} accuracy vs {param}]({link_prefix}{plot})"]
    if plots.get("time"):
        lines += ["", "### Accuracy vs training time", "", f"![accuracy vs training time]({link_prefix}{plots['time']})"]
    lines += [
        "",
        "### Cost (main setting of each task)",
        "",
        f"Parameters and forward FLOPs of one example (matmuls, convolutions and attention kernels; a "
        f"multiply-add counts 2, element-wise work 0) describe the trained network itself; inference time is "
        f"the held-out evaluation's wall time per example (batches of {base.batch}, no gradient, torch threads: "
        f"{', '.join(str(t) for t in sorted({r.get('threads') for r in records.values() if r and r.get('threads')})) or '–'}).",
        "",
        "| task | mechanism | accuracy | seeds | parameters | MFLOPs / example | inference ms / example | train s / seed | steps to 0.99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        key = _fmt_params(layout[t]["main"])
        ref_params = None
        st_ref = agg.get((t, REFERENCE, key))
        if st_ref and st_ref["n"]:
            ref_params = st_ref["parameters"]
        for label in _order(m.label for m in mechanisms):
            st = agg.get((t, label, key))
            if not st or not st["n"]:
                continue
            flag = ""
            if ref_params and abs(st["parameters"] - ref_params) > 0.1 * ref_params:
                flag = f" (≠ softmax ±10 %: {st['parameters'] / ref_params - 1:+.0%})"
            s99 = ", ".join("–" if s is None else str(s) for s in st["steps_to_099"])
            mflops = "–" if st.get("flops_per_example") is None else f"{st['flops_per_example'] / 1e6:.2f}"
            ms = "–" if st.get("seconds_per_example") is None else f"{st['seconds_per_example'] * 1e3:.3f}"
            lines.append(
                f"| `{t}` | `{label}` | {st['mean']:.3f} | {st['n']} | {st['parameters']:,}{flag} | {mflops} | {ms} | "
                f"{st['train_seconds']:.1f} | {s99} |"
            )
    if plots.get("cost"):
        lines += ["", f"![accuracy vs inference time per example]({link_prefix}{plots['cost']})"]
    for (t, label, p), st in sorted(agg.items()):
        if st["errors"] and p != _fmt_params(layout[t]["main"]):
            errors += [f"`{label}` on {t} [{p}]: {e}" for e in st["errors"]]
    if errors:
        lines += ["", "### Errors", ""] + [f"- {e}" for e in errors]
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _save_fig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _panel_grid(plt, count: int, size: tuple[float, float]):
    """A figure of ``count`` panels, at most 3 a row, each ``size`` inches; unused axes hidden."""
    ncol = min(3, count)
    nrow = math.ceil(count / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(size[0] * ncol, size[1] * nrow), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes


def make_plots(
    root: Path,
    cells: Sequence[Cell],
    records: Mapping[str, dict],
    mechanisms: Sequence[Mech],
    tasks: Sequence[str],
    layout: Mapping[str, dict],
) -> dict[str, str]:
    """PNG plots under ``root``; returns ``{plot id: file name relative to root}`` (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return {}
    agg = aggregate(cells, records)
    labels = _order(m.label for m in mechanisms)
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    others = [lab for lab in labels if lab != REFERENCE]
    color = {lab: cmap(i % cmap.N) for i, lab in enumerate(others)}
    color[REFERENCE] = "black"
    style = {lab: ("-", ":", "-.")[(i // cmap.N) % 3] for i, lab in enumerate(others)}
    style[REFERENCE] = "--"
    out: dict[str, str] = {}
    for t in tasks:
        task = TASKS[t]
        main = layout[t]["main"]
        for param, _, _ in task.sweeps:
            pts = sorted({v[param] for v in layout[t]["variants"] if all(v[k] == main[k] for k in v if k != param)})
            if len(pts) < 2:
                continue
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            drawn = False
            for lab in labels:
                xs, ys, lo, hi = [], [], [], []
                for v in pts:
                    st = agg.get((t, lab, _fmt_params({**main, param: v})))
                    if st and st["n"]:
                        xs.append(v)
                        ys.append(st["mean"])
                        lo.append(st["mean"] - st["min"])
                        hi.append(st["max"] - st["mean"])
                if xs:
                    drawn = True
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=lab, color=color[lab],
                                linestyle=style[lab])
            if not drawn:
                plt.close(fig)
                continue
            fixed = ", ".join(f"{k}={v}" for k, v in sorted(main.items()) if k != param)
            ax.set(xlabel=param.replace("_", " "), ylabel="accuracy", ylim=(-0.02, 1.02), title=f"{task.title} ({fixed})")
            ax.set_xscale("log", base=2)
            ax.set_xticks(pts, [str(p) for p in pts])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
            name = f"{t}_{param}.png"
            _save_fig(fig, root / name)
            plt.close(fig)
            out[f"{t}:{param}"] = name
    # accuracy vs training time: learning curves of the main setting, one panel per task
    panels = []
    for t in tasks:
        key = _fmt_params(layout[t]["main"])
        curves = [(c.mech.label, records[c.key]["curve"]) for c in cells
                  if c.task.name == t and _fmt_params(c.params) == key and records.get(c.key, {}).get("status") == "done"]
        if curves:
            panels.append((t, curves))
    if panels:
        fig, axes = _panel_grid(plt, len(panels), (4.2, 3.2))
        handles = {}
        for ax, (t, curves) in zip(axes.flat, panels):
            for lab, curve in curves:
                (line,) = ax.plot([p[1] for p in curve], [p[2] for p in curve], color=color.get(lab, "grey"), alpha=0.85,
                                  linestyle=style.get(lab, "-"), marker=".", markersize=3)
                handles.setdefault(lab, line)
            ax.set(title=TASKS[t].title, xlabel="training seconds (log)", ylabel="accuracy", ylim=(-0.02, 1.02))
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.legend([handles[k] for k in labels if k in handles], [k for k in labels if k in handles],
                   loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        _save_fig(fig, root / "accuracy_vs_time.png")
        plt.close(fig)
        out["time"] = "accuracy_vs_time.png"
    # accuracy vs inference cost: one point per mechanism (main setting), a panel per task with >= 2 of them
    panels = []
    for t in tasks:
        key = _fmt_params(layout[t]["main"])
        pts = [(lab, st) for lab in labels if (st := agg.get((t, lab, key))) and st["n"] and st.get("seconds_per_example")]
        if len(pts) >= 2:
            panels.append((t, pts))
    if panels:
        fig, axes = _panel_grid(plt, len(panels), (4.6, 3.6))
        for ax, (t, pts) in zip(axes.flat, panels):
            for lab, st in pts:
                x = st["seconds_per_example"] * 1e3
                ax.errorbar([x], [st["mean"]], yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], marker="o",
                            capsize=3, color=color.get(lab, "grey"), linestyle="none")
                ax.annotate(lab, (x, st["mean"]), xytext=(4, 3), textcoords="offset points", fontsize=7)
            ax.set(title=TASKS[t].title, xlabel="inference ms / example (log)", ylabel="accuracy (mean, min–max over seeds)")
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
        fig.tight_layout()
        _save_fig(fig, root / "accuracy_vs_cost.png")
        plt.close(fig)
        out["cost"] = "accuracy_vs_cost.png"
    return out


def summary_json(cells: Sequence[Cell], records: Mapping[str, dict]) -> list[dict]:
    rows = []
    for (t, lab, p), st in sorted(aggregate(cells, records).items()):
        rows.append({"task": t, "mechanism": lab, "params": p, **{k: v for k, v in st.items() if k != "errors"}, "errors": st["errors"]})
    return rows


# ---------------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------------
def parse_mechanism(text: str) -> Mech:
    """``NAME`` or ``NAME:key=value,key=value`` (values are Python literals, else strings)."""
    name, _, rest = text.partition(":")
    registry.get(name)  # KeyError with close matches
    overrides = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"mechanism setting {item!r} must be key=value")
        try:
            overrides[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            overrides[k.strip()] = v.strip()
    return Mech(name, overrides)


def select_mechanisms(names: Sequence[str] | None, quick: bool) -> list[Mech]:
    if not names:
        specs = registry.all_specs()
        if quick:
            return [Mech(s.name) for s in specs if s.name in QUICK_MECHANISMS]
        return [Mech(s.name) for s in specs]
    if list(names) == ["all"]:
        return [Mech(s.name) for s in registry.all_specs()]
    return [parse_mechanism(n) for n in names]


def run_benchmark(
    out_dir: str | os.PathLike,
    *,
    quick: bool = True,
    mechanisms: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    seed_offset: int = 0,
    steps: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    eval_examples: int | None = None,
    vocab: int | None = None,
    length: int | None = None,
    mqar_pairs: Sequence[int] | None = None,
    lookup_pairs: Sequence[int] | None = None,
    threads: int | None = None,
    progress: bool = True,
    rerun: bool = False,
    link_prefix: str = "quality/",
) -> tuple[str, dict[str, Any]]:
    """Plan, run (resuming), plot and render; returns the Markdown (links prefixed) and a summary.

    Writes ``OUT/quality/quality.md``, ``OUT/quality/results.json``, the PNG plots and the cells.
    """
    root = Path(out_dir) / "quality"
    if tasks is None or list(tasks) == ["all"]:
        task_names = [t for t in TASKS if TASKS[t].quick or not quick] if tasks is None else list(TASKS)
    else:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
        task_names = list(tasks)
    mechs = select_mechanisms(mechanisms, quick)
    seed_list = [seed_offset + s for s in (seeds if seeds is not None else ((0,) if quick else (0, 1, 2)))]
    sweep_overrides: dict[str, dict] = {}
    if mqar_pairs:
        sweep_overrides["mqar"] = {"num_pairs": list(mqar_pairs)}
    if lookup_pairs:
        sweep_overrides["lookup"] = {"num_pairs": list(lookup_pairs)}
    cells, layout, notes = plan(
        quick=quick, mechanisms=mechs, tasks=task_names, seeds=seed_list, steps=steps, batch=batch, lr=lr,
        eval_examples=eval_examples, overrides={"vocab": vocab, "length": length}, sweep_overrides=sweep_overrides,
    )
    records = run_cells(cells, root, threads=threads or DEFAULT_THREADS, progress=progress, rerun=rerun)
    plots = make_plots(root, cells, records, mechs, task_names, layout)
    kw = dict(quick=quick, cells=cells, records=records, mechanisms=mechs, tasks=task_names, layout=layout,
              seeds=seed_list, notes=notes, plots=plots)
    write_text_atomic(root / "quality.md", render(**kw, link_prefix=""))
    summary = {"cells": len(cells), "errors": sum(r.get("status") == "error" for r in records.values()),
               "rows": summary_json(cells, records)}
    write_text_atomic(root / "results.json", json.dumps(summary, indent=1, default=repr))
    return render(**kw, link_prefix=link_prefix), summary


def report_section(out_dir: Path, quick: bool) -> str:
    """The quality part of ``attnzoo report`` (quick: the subset; ``--full``: everything)."""
    md, _ = run_benchmark(out_dir, quick=quick)
    return md


def _cmd_quality(args) -> int:
    try:
        md, summary = run_benchmark(
            args.out, quick=not args.full, mechanisms=args.mechanisms, tasks=args.tasks, seeds=args.seeds,
            seed_offset=args.seed_offset, steps=args.steps, batch=args.batch_size, lr=args.lr,
            eval_examples=args.eval_examples, vocab=args.vocab,
            length=args.length, mqar_pairs=args.mqar_pairs, lookup_pairs=args.lookup_pairs, threads=args.threads,
            progress=not args.no_progress, rerun=args.rerun,
        )
    except (ValueError, KeyError) as e:
        print(f"attnzoo bench quality: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    path = Path(args.out) / "quality" / "quality.md"
    print(f"quality benchmark: {summary['cells']} cells, {summary['errors']} errors; written to {path}")
    return 1 if summary["errors"] else 0


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "quality",
        help="train one small model per mechanism on generated tasks (MQAR, copying, ListOps, cross lookup, ...)",
        description="Quality benchmark: the same small model with each mechanism on seeded generated tasks, "
        "one or more per attention pattern. Resumable: finished cells are kept under OUT/quality/cells.",
    )
    p.add_argument("--full", action="store_true", help="every mechanism and task, d=64/2 heads, 3 seeds, full sweeps")
    p.add_argument("--out", default="report", help="output folder (default: report/); results go to OUT/quality/")
    p.add_argument("--mechanisms", nargs="+", metavar="NAME[:k=v,...]",
                   help=f"mechanisms ('all' for every one; default quick: {', '.join(QUICK_MECHANISMS)}; full: all)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help=f"tasks ('all' or from {', '.join(TASKS)})")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default quick: 0; full: 0 1 2)")
    p.add_argument("--seed-offset", type=int, default=0, help="added to every seed (held-out seed ranges)")
    p.add_argument("--steps", type=int, help="training steps for every task (default: per task)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate for every task (default: per task)")
    p.add_argument("--eval-examples", type=int, help="held-out examples per evaluation (default 1000)")
    p.add_argument("--vocab", type=int, help="vocabulary size for tasks that have one (held-out setting)")
    p.add_argument("--length", type=int, help="sequence length for tasks that have one (held-out setting)")
    p.add_argument("--mqar-pairs", type=int, nargs="+", help="MQAR numbers of key-value pairs to sweep")
    p.add_argument("--lookup-pairs", type=int, nargs="+", help="cross-lookup memory sizes to sweep")
    p.add_argument("--threads", type=int, help=f"torch threads (part of reproducibility; default {DEFAULT_THREADS})")
    p.add_argument("--rerun", action="store_true", help="recompute cells even if finished")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_quality)

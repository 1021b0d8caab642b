"""ACT head search on a small generated task (calibration split) and evaluation on a held-out split.

The task (generated, license-clean): short reviews built from a fixed grammar, labelled positive or
negative. A share of them (``contrast``, 0.7) contrast two clauses with "but" and take the label of the
second clause, which makes the task harder for a small model. The prompt is 4-shot (fixed
demonstrations; SmolLM2-135M is at chance zero-shot). Scoring is the ACT code's classification rule:
the log-softmax of the next-token logits at the last prompt position, compared over the label words
(first token of " positive" / " negative").

Cost: the per-head search re-runs only the layers from the calibrated layer on (the inputs of every
layer are cached once per batch), which is exact because a head edit in layer l cannot change layers
before l.

Search (official ``scripts/calibration.sh`` loop): calibrate one (layer, head) at a time (ACT, beta 0.4,
thres 0.1, first sink kept) and keep the heads that raise the calibration-split accuracy over the
unmodified model (ties broken by the mean log-probability margin of the correct label, which a
calibration set of a few dozen prompts needs). Then calibrate all kept heads together and report the
accuracy on the held-out split, with the baseline on the same split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import attach, num_layers_heads
from .interventions import ACTCalibration

_POS = [
    "delicious",
    "friendly",
    "wonderful",
    "cozy",
    "excellent",
    "charming",
    "fresh",
    "lovely",
    "quick",
    "generous",
]
_NEG = ["cold", "rude", "awful", "noisy", "terrible", "dirty", "slow", "poor", "horrible", "boring"]
_THINGS = [
    "food",
    "staff",
    "room",
    "soup",
    "service",
    "coffee",
    "music",
    "bread",
    "view",
    "bed",
    "hotel",
    "menu",
]
# every word is one token with a leading space in the SmolLM2 tokenizer, so the prompts of a template
# have equal lengths and batch without padding


@dataclass
class Example:
    text: str
    label: int  # 1 = positive, 0 = negative


def review_task(n: int, seed: int = 0, contrast: float = 0.7) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(_THINGS, 2)
        if rng.random() >= contrast:
            lab = rng.random() < 0.5
            adj = rng.choice(_POS if lab else _NEG)
            text = f"The {a} was {adj}."
        else:
            lab = rng.random() < 0.5
            first = rng.choice(_NEG if lab else _POS)
            second = rng.choice(_POS if lab else _NEG)
            text = f"The {a} was {first}, but the {b} was {second}."
        out.append(Example(text, int(lab)))
    return out


DEMOS = [
    Example("The soup was delicious.", 1),
    Example("The staff was rude.", 0),
    Example("The room was cold, but the bed was lovely.", 1),
    Example("The menu was charming, but the food was stale.", 0),
]
LABELS = ["negative", "positive"]


def prompt_ids(tokenizer, ex: Example) -> list[int]:
    demo = "".join(f"Review: {d.text}\nSentiment: {LABELS[d.label]}\n\n" for d in DEMOS)
    return tokenizer(demo + f"Review: {ex.text}\nSentiment:").input_ids


def label_ids(tokenizer) -> list[int]:
    return [
        tokenizer(" negative", add_special_tokens=False).input_ids[0],
        tokenizer(" positive", add_special_tokens=False).input_ids[0],
    ]


def batches_by_length(tokenizer, examples: list[Example], max_batch: int = 32) -> list[tuple[Tensor, Tensor]]:
    """Equal-length groups (no padding, so ACT's per-prompt column scores are exact): [(ids, labels)]."""
    groups: dict[int, list[tuple[list[int], int]]] = {}
    for ex in examples:
        ids = prompt_ids(tokenizer, ex)
        groups.setdefault(len(ids), []).append((ids, ex.label))
    out = []
    for _, items in sorted(groups.items()):
        for i in range(0, len(items), max_batch):
            chunk = items[i : i + max_batch]
            out.append((torch.tensor([c[0] for c in chunk]), torch.tensor([c[1] for c in chunk])))
    return out


class LayerInputs:
    """The inputs (hidden states and keyword arguments) of every decoder layer for one batch, so a run
    can restart at layer ``l`` (captured under the analysis attention, whose mask is the eager one)."""

    @torch.no_grad()
    def __init__(self, model, ids: Tensor):
        from .engine import decoder_layers

        self.model = model
        self.layers = decoder_layers(model)
        self.inputs: dict[int, tuple[Tensor, dict]] = {}

        def pre(i):
            def fn(mod, args, kwargs):
                h = kwargs.get("hidden_states", args[0] if args else None)
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.inputs[i] = (h, kw)

            return fn

        hs = [
            layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        try:
            with attach(model):
                self.full = model(input_ids=ids, use_cache=False).logits[:, -1]
        finally:
            for h in hs:
                h.remove()

    @torch.no_grad()
    def logits_from(self, layer: int) -> Tensor:
        h, kw = self.inputs[layer]
        for j in range(layer, len(self.layers)):
            out = self.layers[j](h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return self.model.lm_head(self.model.model.norm(h))[:, -1]


@torch.no_grad()
def evaluate(
    model, batches, labels: list[int], probes=(), cached: list[LayerInputs] | None = None, from_layer=0
):
    """``(accuracy, mean log-prob margin of the correct label)`` with ``probes`` attached.

    With ``cached`` (one :class:`LayerInputs` per batch) only layers ``from_layer..`` are run.
    """
    correct, margin, n = 0, 0.0, 0
    lab = torch.tensor(labels)
    with attach(model, *probes):
        for bi, (ids, y) in enumerate(batches):
            if cached is not None:
                last = cached[bi].logits_from(from_layer)
            else:
                last = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            lp = torch.log_softmax(last.float(), -1)
            s = lp[:, lab]  # (B, 2)
            pred = s.argmax(-1)
            correct += int((pred == y).sum())
            m = s.gather(1, y[:, None])[:, 0] - s.gather(1, (1 - y)[:, None])[:, 0]
            margin += float(m.sum())
            n += len(y)
    return correct / n, margin / n


def act_search(
    model,
    tokenizer,
    n_calibration: int = 48,
    n_heldout: int = 96,
    layers=None,
    heads=None,
    beta: float = 0.4,
    thres: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Per-head ACT search on the calibration split, then all kept heads on the held-out split."""
    nl, nh, _, _ = num_layers_heads(model)
    layers = list(range(2, nl)) if layers is None else list(layers)
    heads = list(range(nh)) if heads is None else list(heads)
    lab = label_ids(tokenizer)
    cal = batches_by_length(tokenizer, review_task(n_calibration, seed))
    held = batches_by_length(tokenizer, review_task(n_heldout, seed + 1))
    base_acc, base_margin = evaluate(model, cal, lab)
    cached = [LayerInputs(model, ids) for ids, _ in cal]
    per_head = {}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(layers) * len(heads), desc="ACT search")
        except ImportError:  # pragma: no cover
            bar = None
    for layer in layers:
        for h in heads:
            acc, mar = evaluate(model, cal, lab, [ACTCalibration([(layer, h)], beta, thres)], cached, layer)
            per_head[(layer, h)] = (acc, mar)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    kept = [k for k, (a, m) in per_head.items() if a > base_acc or (a == base_acc and m > base_margin)]
    kept_strict = [k for k, (a, m) in per_head.items() if a > base_acc]
    held_base = evaluate(model, held, lab)
    held_cal = evaluate(model, held, lab, [ACTCalibration(kept, beta, thres)]) if kept else held_base
    held_strict = (
        evaluate(model, held, lab, [ACTCalibration(kept_strict, beta, thres)]) if kept_strict else held_base
    )
    all_heads = [(layer, h) for layer in layers for h in heads]
    held_all = evaluate(model, held, lab, [ACTCalibration(all_heads, beta, thres)])
    return {
        "calibration_baseline": (base_acc, base_margin),
        "per_head": per_head,
        "kept": kept,
        "kept_strict": kept_strict,
        "heldout_baseline": held_base,
        "heldout_calibrated": held_cal,
        "heldout_calibrated_strict": held_strict,
        "heldout_all_heads": held_all,
        "n_calibration": n_calibration,
        "n_heldout": n_heldout,
    }

"""Retrieval heads: "Retrieval Head Mechanistically Explains Long-Context Factuality" (Wu et al., arXiv
2404.15574, ICLR 2025; protocol of the official ``retrieval_head_detection.py``), sized for a CPU.

Retrieval score (exact rule of the official code): the prompt minus its last token is prefilled; then
greedy decoding runs from the last prompt token for up to ``max_new_tokens`` steps (50 in the paper),
stopping at a newline or end-of-turn token. At every step, for every (layer, query head), the top-1
attended key ``i`` of the current query is a *copy-paste event* when ``needle_start <= i < needle_end``
and the prompt token at ``i`` equals the token just generated; each event adds ``1 / |needle span|``.
A sample counts only when the answer's ROUGE-1 recall against the reference answer is > 0.5; the head
score is the mean over the accepted samples. A head is a retrieval head when its score is > 0.1.

Masking (``needle_in_haystack_with_mask.py``): a masked head's logits are set to 0 on its visible keys
(uniform attention), during decoding only; top-K heads by score vs K random heads drawn outside the
top ``exclude_top`` heads, several seeds.

Deviations, all for the CPU: the haystack is the project's generated prose
(:func:`attnzoo.llm.needle.build_context`, needle at a sentence boundary, depth as a fraction) and the
three needles below are the project's own (the paper's three are a WMO report, Beijing and Mr Green);
lengths are a few hundred to a few thousand tokens (paper: 1K-50K); the prompt is the chat template
with an answer prefix (the start of the answer sentence), which a 135M model needs to answer at all.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import TopKey, attach, num_layers_heads
from .interventions import HeadAblation, random_heads


@dataclass
class RetrievalNeedle:
    sentence: str
    question: str
    answer_prefix: str
    answer: str  # the span the model should copy (the "real_needle")


NEEDLES = [
    RetrievalNeedle(
        "The best thing to do in Lisbon is to eat a custard tart and walk along the old harbour at dusk.",
        "What is the best thing to do in Lisbon?",
        "The best thing to do in Lisbon is to",
        "eat a custard tart and walk along the old harbour at dusk",
    ),
    RetrievalNeedle(
        "Mr Brown is avoided by everyone because he is a loud person who sings badly and never pays for coffee.",
        "Why is Mr Brown avoided by everyone?",
        "Mr Brown is avoided by everyone because he is",
        "a loud person who sings badly and never pays for coffee",
    ),
    RetrievalNeedle(
        "The secret recipe of the bakery uses purple carrots, smoked salt and a spoon of orange honey.",
        "What does the secret recipe of the bakery use?",
        "The secret recipe of the bakery uses",
        "purple carrots, smoked salt and a spoon of orange honey",
    ),
]


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def rouge1_recall(prediction: str, reference: str) -> float:
    """ROUGE-1 recall: clipped unigram overlap / number of reference unigrams (lower-cased words)."""
    ref = Counter(_words(reference))
    if not ref:
        return 0.0
    pred = Counter(_words(prediction))
    return sum(min(c, pred[w]) for w, c in ref.items()) / sum(ref.values())


def find_needle_span(
    prompt_ids: list[int], needle_ids: list[int], overlap: float = 0.9, exact_first: bool = True
) -> tuple[int, int]:
    """Token span of the needle answer in the prompt.

    With ``exact_first`` (default) an exact occurrence of ``needle_ids`` wins; otherwise (or when there is
    none) the official ``find_needle_idx`` rule: the first window of ``len(needle_ids)`` prompt tokens
    whose token-set overlap with the needle is > ``overlap`` (0.9). That rule can return a window shifted
    by one token (it is satisfied before the exact position); ``exact_first=False`` reproduces it.
    """
    n = len(needle_ids)
    target = set(needle_ids)
    if exact_first:
        for i in range(len(prompt_ids) - n + 1):
            if prompt_ids[i : i + n] == needle_ids:
                return i, i + n
    for i in range(len(prompt_ids) - n + 1):
        if len(set(prompt_ids[i : i + n]) & target) / len(target) > overlap:
            return i, i + n
    raise ValueError("needle span not found in the prompt")


def build_prompt(tokenizer, needle: RetrievalNeedle, n_tokens: int, depth: float, seed: int = 0):
    """``(input_ids (1, T), (span_start, span_end))``: haystack with the needle, chat turn, answer prefix."""
    ids, span, _ = build_prompt_parts(tokenizer, needle, n_tokens, depth, seed)
    return ids, span


def build_prompt_parts(tokenizer, needle: RetrievalNeedle, n_tokens: int, depth: float, seed: int = 0):
    """As :func:`build_prompt`, plus the number of context tokens (template start + haystack)."""
    from ..generation import split_chat
    from ..needle import build_context

    context = build_context(tokenizer, n_tokens, depth, needle, seed=seed)
    c, q = split_chat(tokenizer, context, needle.question, answer_prefix=needle.answer_prefix)
    ids = torch.cat([c, q], 1)
    nid = tokenizer(" " + needle.answer, add_special_tokens=False).input_ids
    span = find_needle_span(c[0].tolist(), nid)
    return ids, span, c.shape[1]


def _stop_ids(model, tokenizer) -> set[int]:
    from ..loading import eos_token_ids

    stop = set(eos_token_ids(model, tokenizer))
    for t in ("\n", "Ċ", "<0x0A>"):
        tid = tokenizer.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
            stop.add(tid)
    return stop


@torch.no_grad()
def decode_with_probes(model, ids: Tensor, max_new_tokens: int, stop: set[int], probes=(), cache=None):
    """Prefill ``ids[:, :-1]`` (plain attention) unless ``cache`` is given, then greedy decoding from the
    last prompt token with ``probes`` attached. Returns ``(tokens, cache_length_before)``; the cache is
    cropped back so it can be reused."""
    from ..generation import crop_cache, new_cache
    from ..presses import cache_lengths

    n = ids.shape[1]
    if cache is None:
        cache = new_cache(model)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    lengths = cache_lengths(cache)
    toks: list[int] = []
    cur = ids[:, -1:]
    try:
        with attach(model, *probes):
            for step in range(max_new_tokens):
                pos = torch.tensor([[n - 1 + step]])
                logits = model(
                    input_ids=cur, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1
                ).logits[:, -1]
                nxt = int(logits.argmax(-1))
                toks.append(nxt)
                if nxt in stop:
                    break
                cur = torch.tensor([[nxt]])
    finally:
        crop_cache(cache, lengths)
    return toks, cache


def copy_paste_score(
    prompt: list[int], span: tuple[int, int], generated: list[int], tops: list[Tensor], nl: int, nh: int
) -> Tensor:
    """Wu et al.'s per-sample score (L, H): for each step, +1/|span| when the head's top-1 key ``i``
    (``tops[step]`` (L, B=1, H) or (L, H)) lies in the needle span and ``prompt[i]`` is the generated token."""
    s, e = span
    score = torch.zeros(nl, nh, dtype=torch.float64)
    for tok, top in zip(generated, tops):
        idx = top[:, 0] if top.dim() == 3 else top
        inside = (idx >= s) & (idx < e)
        same = torch.tensor([[i < len(prompt) and prompt[i] == tok for i in row] for row in idx.tolist()])
        score += (inside & same).double() / (e - s)
    return score


@torch.no_grad()
def retrieval_trial(
    model, tokenizer, ids: Tensor, span: tuple[int, int], answer: str, max_new_tokens: int = 50
):
    """One sample: ``(per-head score (L, H), response text, ROUGE-1 recall)``."""
    nl, nh, _, _ = num_layers_heads(model)
    probe = TopKey(nl)
    stop = _stop_ids(model, tokenizer)
    toks, _ = decode_with_probes(model, ids, max_new_tokens, stop, [probe])
    gen = [t for t in toks if t not in stop]
    score = copy_paste_score(ids[0].tolist(), span, gen, probe.steps[: len(gen)], nl, nh)
    text = tokenizer.decode([t for t in toks if t not in stop], skip_special_tokens=True).strip()
    return score, text, rouge1_recall(text, answer)


def retrieval_scores(
    model,
    tokenizer,
    lengths=(256, 512),
    depths=(0.0, 0.33, 0.66, 1.0),
    needles=None,
    max_new_tokens: int = 24,
    accept: float = 0.5,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Mean retrieval score per head over the accepted samples: ``{"scores": (L, H), "accepted", "trials"}``."""
    needles = NEEDLES if needles is None else needles
    nl, nh, _, _ = num_layers_heads(model)
    acc: list[Tensor] = []
    trials = []
    jobs = [(L, d, k) for L in lengths for d in depths for k in range(len(needles))]
    bar = _bar(len(jobs), "retrieval score") if progress else None
    for L, d, k in jobs:
        nd = needles[k]
        ids, span = build_prompt(tokenizer, nd, L, d, seed=seed + k)
        score, text, rec = retrieval_trial(model, tokenizer, ids, span, nd.answer, max_new_tokens)
        ok = rec > accept
        trials.append({"length": L, "depth": d, "needle": k, "recall": rec, "accepted": ok, "answer": text})
        if ok:
            acc.append(score)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    scores = torch.stack(acc).mean(0) if acc else torch.zeros(nl, nh, dtype=torch.float64)
    return {"scores": scores, "accepted": len(acc), "trials": trials}


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    nh = scores.shape[1]
    idx = scores.flatten().argsort(descending=True)[:k].tolist()
    return [(i // nh, i % nh) for i in idx]


def share_above(scores: Tensor, thresholds=(0.05, 0.1, 0.2, 0.3)) -> dict[float, float]:
    return {t: float((scores > t).double().mean()) for t in thresholds}


@torch.no_grad()
def masking_experiment(
    model,
    tokenizer,
    scores: Tensor,
    k: int = 8,
    seeds=(0, 1, 2, 3, 4),
    exclude_top: int | None = None,
    lengths=(384,),
    depths=(0.25, 0.75),
    needles=None,
    max_new_tokens: int = 24,
    seed: int = 1000,
    progress: bool = False,
) -> dict:
    """Needle accuracy (ROUGE-1 recall, and recall > 0.5) with no mask, the top-``k`` heads masked and
    ``k`` random heads (outside the top ``exclude_top``, default ``3 k``) masked, per seed.

    One prefill per prompt serves every condition (masking acts during decoding only).
    """
    from ..generation import new_cache

    needles = NEEDLES if needles is None else needles
    nl, nh, _, _ = num_layers_heads(model)
    top = top_heads(scores, k)
    excl = top_heads(scores, exclude_top if exclude_top is not None else 3 * k)
    conds = {"none": [], f"top{k}": top}
    for s in seeds:
        conds[f"random{k}_seed{s}"] = random_heads(k, nl, nh, exclude=excl, seed=s)
    stop = _stop_ids(model, tokenizer)
    rec: dict[str, list[float]] = {c: [] for c in conds}
    jobs = [(L, d, j) for L in lengths for d in depths for j in range(len(needles))]
    bar = _bar(len(jobs), "masking") if progress else None
    for L, d, j in jobs:
        nd = needles[j]
        ids, _ = build_prompt(tokenizer, nd, L, d, seed=seed + j)
        cache = new_cache(model)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for c, heads in conds.items():
            probes = [HeadAblation(heads, mode="uniform", decode_only=True)] if heads else []
            toks, _ = decode_with_probes(model, ids, max_new_tokens, stop, probes, cache=cache)
            text = tokenizer.decode([t for t in toks if t not in stop], skip_special_tokens=True)
            rec[c].append(rouge1_recall(text, nd.answer))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = {
        c: {"recall": sum(v) / len(v), "accuracy": sum(x > 0.5 for x in v) / len(v), "n": len(v)}
        for c, v in rec.items()
    }
    rnd = [out[c]["recall"] for c in conds if c.startswith("random")]
    rnd_acc = [out[c]["accuracy"] for c in conds if c.startswith("random")]
    return {
        "conditions": out,
        "heads": {c: h for c, h in conds.items()},
        "random_mean_recall": sum(rnd) / max(len(rnd), 1),
        "random_mean_accuracy": sum(rnd_acc) / max(len(rnd_acc), 1),
        "k": k,
    }


def _bar(total, desc):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc)
    except ImportError:  # pragma: no cover
        return None

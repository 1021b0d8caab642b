"""Seeded generators for the quality benchmark (``attnzoo bench quality``).

Every generator takes an explicit :class:`torch.Generator` and a batch size and returns a dict of
CPU tensors; nothing touches the global random state, so the same generator seed gives the same
batch on every run. Training draws a fresh batch every step from one generator; evaluation draws
its examples from a generator seeded from a disjoint range (see ``attnzoo.bench.quality``).

Label convention: ``targets`` hold ``IGNORE`` (-100) where nothing is scored; an optional boolean
``score_mask`` narrows the reported accuracy to a subset of the labelled positions (the language
model task trains on every token but scores the tokens that need recall).

Tasks and their sources:

* :func:`mqar`: multi-query associative recall, after Zoology (Arora et al., arXiv 2312.04927,
  ``zoology/data/multiquery_ar.py`` semantics: keys from ``[1, V/2)``, values from ``[V/2, V)`` both
  without replacement, query gaps drawn without replacement with ``p(i) ~ i^(a-1)``, random fill).
* :func:`selective_copy`: selective copying, MAD semantics (Poli et al., arXiv 2403.17844), with the
  insertion positions drawn from the seeded generator (MAD's own generator uses the global RNG).
* :func:`story_lm`: next-token prediction on generated short stories (a fixed word list and a small
  grammar; objects, colours and owners introduced early are referred to later).
* :func:`listops`: ListOps-style hierarchical classification (LRA generator semantics, small sizes).
* :func:`retrieval`: long-range retrieval classification over pre-bound pairs (noncausal self).
* :func:`lookup`: cross-attention associative lookup over pre-bound key/value pairs (memory set).
* :func:`stream`: monotonic transduction for causal cross-attention (streaming copy / running sum).
* :func:`shapes`: generated small images of four shape classes for the spatial task.
"""

from __future__ import annotations

import random
import statistics

import torch
from torch import Tensor

IGNORE = -100


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _python_rng(gen: torch.Generator) -> random.Random:
    """A Python RNG seeded from ``gen`` (for generators that are natural as Python loops)."""
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=gen).item()))


def _sample_without_replacement(gen: torch.Generator, batch: int, population: int, k: int) -> Tensor:
    """``(batch, k)`` distinct indices from ``range(population)``, each row in random order."""
    return torch.rand(batch, population, generator=gen).argsort(dim=1)[:, :k]


# ---------------------------------------------------------------------------------------------------
# causal self-attention tasks
# ---------------------------------------------------------------------------------------------------
def mqar(
    gen: torch.Generator,
    batch: int,
    *,
    vocab: int = 128,
    length: int = 64,
    num_pairs: int = 8,
    power_a: float = 0.01,
    random_fill: bool = True,
) -> dict[str, Tensor]:
    """Multi-query associative recall.

    The sequence starts with ``k1 v1 k2 v2 ... kN vN``; each key then appears once more as a query at
    position ``2N + 2*gap`` and the model must predict its value as the next token there
    (``targets[query position] = value``). Gaps are drawn without replacement with probability
    ``~ power_a * i^(power_a - 1)`` (``i = 1..space``; small ``power_a`` puts queries soon after the
    context). With ``random_fill`` the empty positions get uniform random tokens from ``[0, V)``.
    """
    _check(length % 2 == 0, f"mqar: length must be even, got {length}")
    _check(num_pairs >= 1, f"mqar: num_pairs must be >= 1, got {num_pairs}")
    _check(4 * num_pairs <= length, f"mqar: needs 4 * num_pairs <= length (Zoology), got num_pairs={num_pairs}, length={length}")
    half = vocab // 2
    _check(half - 1 >= num_pairs, f"mqar: vocab {vocab} has {half - 1} keys, fewer than num_pairs={num_pairs}")
    _check(power_a > 0, f"mqar: power_a must be > 0, got {power_a}")
    n, ctx = num_pairs, 2 * num_pairs
    keys = _sample_without_replacement(gen, batch, half - 1, n) + 1  # [1, V/2)
    values = _sample_without_replacement(gen, batch, vocab - half, n) + half  # [V/2, V)
    space = (length - ctx) // 2
    i = torch.arange(1, space + 1, dtype=torch.float64)
    logp = torch.log(power_a * i ** (power_a - 1))
    gumbel = -torch.log(-torch.log(torch.rand(batch, space, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
    gaps = (logp + gumbel).topk(n, dim=1).indices  # sequential sampling without replacement (Gumbel top-k)
    x = torch.zeros(batch, length, dtype=torch.long)
    x[:, 0:ctx:2] = keys
    x[:, 1:ctx:2] = values
    qpos = ctx + 2 * gaps
    x.scatter_(1, qpos, keys)
    targets = torch.full((batch, length), IGNORE, dtype=torch.long)
    targets.scatter_(1, qpos, values)
    if random_fill:
        fill = torch.randint(0, vocab, (batch, length), generator=gen)
        x = torch.where(x == 0, fill, x)
    return {"inputs": x, "targets": targets}


def selective_copy(
    gen: torch.Generator, batch: int, *, vocab: int = 16, length: int = 64, num_tokens: int = 8
) -> dict[str, Tensor]:
    """Selective copying (MAD semantics).

    Token 0 is the blank, ``V - 1`` the copy token, data tokens come from ``[1, V - 1)``. The first
    ``length - num_tokens - 1`` positions hold the data tokens at random positions (in order) among
    blanks, then the copy token, then ``num_tokens`` blanks. The copy token and the blanks after it
    must predict the data tokens in order (next-token targets at positions ``copy .. L - 2``).
    """
    _check(vocab >= 3, f"selective_copy: vocab must be >= 3, got {vocab}")
    ctx = length - num_tokens - 1
    _check(num_tokens >= 1 and ctx >= num_tokens, f"selective_copy: length {length} too short for {num_tokens} tokens")
    pos = _sample_without_replacement(gen, batch, ctx, num_tokens).sort(dim=1).values
    data = torch.randint(1, vocab - 1, (batch, num_tokens), generator=gen)
    x = torch.zeros(batch, length, dtype=torch.long)
    x.scatter_(1, pos, data)
    x[:, ctx] = vocab - 1
    targets = torch.full((batch, length), IGNORE, dtype=torch.long)
    targets[:, ctx : ctx + num_tokens] = data
    return {"inputs": x, "targets": targets}


# A small closed world for the generated stories.
_NAMES = ("anna", "ben", "cleo", "dan", "eva", "finn", "gus", "hana", "ivan", "jo", "kim", "leo")
_OBJECTS = ("ball", "book", "cup", "hat", "kite", "lamp", "map", "pen", "ring", "shoe", "sock", "box")
_COLORS = ("red", "blue", "green", "black", "white", "pink", "gold", "grey")
_PLACES = ("park", "shop", "school", "garden", "beach", "house")
_FUNCTION = ("<bos>", ".", "has", "a", "the", "is", "gives", "to", "now", "goes", "with", "and", "finds", "in")
STORY_VOCAB: tuple[str, ...] = _FUNCTION + _NAMES + _OBJECTS + _COLORS + _PLACES
_ID = {w: i for i, w in enumerate(STORY_VOCAB)}


def _story(rng: random.Random, length: int) -> tuple[list[int], list[bool]]:
    """Word ids of one story (``length + 1`` tokens) and, per token, whether it is recall-determined."""
    words: list[str] = ["<bos>"]
    recall: list[bool] = [False]

    def say(*parts: tuple[str, bool]) -> None:
        for w, r in parts:
            words.append(w)
            recall.append(r)

    while len(words) < length + 1:
        people = rng.sample(_NAMES, 3)
        objs = rng.sample(_OBJECTS, 3)
        colors = {o: rng.choice(_COLORS) for o in objs}
        owner = {}
        for p, o in zip(people, objs):  # introductions: new facts, not predictable
            say((p, False), ("has", False), ("a", False), (colors[o], False), (o, False), (".", False))
            owner[o] = p
        for _ in range(rng.randint(3, 6)):
            kind = rng.randrange(4)
            o = rng.choice(objs)
            if kind == 0:  # "the OBJ is COLOR ." -> colour recalled
                say(("the", False), (o, False), ("is", False), (colors[o], True), (".", False))
            elif kind == 1:  # "GIVER gives the COLOR OBJ to P ." -> object recalled from a unique colour
                giver = owner[o]
                taker = rng.choice([p for p in people if p != giver])
                unique = sum(colors[x] == colors[o] for x in objs) == 1
                say((giver, False), ("gives", False), ("the", False), (colors[o], False), (o, unique))
                say(("to", False), (taker, False), (".", False))
                owner[o] = taker
            elif kind == 2:  # "P now has the COLOR OBJ ." -> object recalled from a unique colour
                p = rng.choice(people)
                mine = [x for x in objs if owner[x] == p]
                if not mine:
                    continue
                o = rng.choice(mine)
                unique = sum(colors[x] == colors[o] for x in objs) == 1
                say((p, False), ("now", False), ("has", False), ("the", False), (colors[o], False), (o, unique), (".", False))
            else:  # "P goes to the PLACE with the OBJ ." -> object recalled when P owns exactly one
                p = owner[o]
                single = sum(owner[x] == p for x in objs) == 1
                say((p, False), ("goes", False), ("to", False), ("the", False), (rng.choice(_PLACES), False))
                say(("with", False), ("the", False), (o, single), (".", False))
    return [_ID[w] for w in words[: length + 1]], recall[: length + 1]


def story_lm(gen: torch.Generator, batch: int, *, length: int = 64) -> dict[str, Tensor]:
    """Next-token prediction on generated short stories (word-level, ``len(STORY_VOCAB)`` tokens).

    Every position is a training target; ``score_mask`` marks the targets fixed by an earlier
    sentence of the same story (an object's colour, an object named by its unique colour), which is
    what the reported accuracy measures.
    """
    _check(length >= 8, f"story_lm: length must be >= 8, got {length}")
    rng = _python_rng(gen)
    seqs, masks = zip(*(_story(rng, length) for _ in range(batch)))
    full = torch.tensor(seqs, dtype=torch.long)
    rec = torch.tensor(masks, dtype=torch.bool)
    return {"inputs": full[:, :-1], "targets": full[:, 1:].clone(), "score_mask": rec[:, 1:].clone()}


# ---------------------------------------------------------------------------------------------------
# noncausal self-attention tasks (classification)
# ---------------------------------------------------------------------------------------------------
LISTOPS_OPS = ("[MIN", "[MAX", "[MED", "[SM")
#: ListOps tokens: 0 = pad, 1 = CLS, 2..5 operators, 6 = "]", 7..16 digits 0..9.
LISTOPS_VOCAB = 17


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int):
    r = rng.random() if depth < max_depth else 1.0
    if r > 0.25:  # LRA's VALUE_P: a leaf with probability 0.75 above max depth, always at max depth
        return rng.randint(0, 9)
    n = rng.randint(2, max_args)
    return (rng.choice(LISTOPS_OPS), [_listops_tree(rng, depth + 1, max_depth, max_args) for _ in range(n)])


def listops_eval(tree) -> int:
    """Value of a ListOps tree: MIN, MAX, MED (integer part of the median), SM (sum mod 10)."""
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [listops_eval(a) for a in args]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[MED":
        return int(statistics.median(vals))
    return sum(vals) % 10


def _listops_tokens(tree) -> list[int]:
    if isinstance(tree, int):
        return [7 + tree]
    op, args = tree
    out = [2 + LISTOPS_OPS.index(op)]
    for a in args:
        out += _listops_tokens(a)
    return out + [6]


def listops(
    gen: torch.Generator, batch: int, *, max_depth: int = 5, max_args: int = 5, min_length: int = 16, length: int = 64
) -> dict[str, Tensor]:
    """ListOps-style classification: ``inputs (B, length)`` = CLS, the expression, padding; ``labels (B,)`` in 0..9.

    Trees follow LRA's generator (operator with probability 0.25 above ``max_depth``, 2..``max_args``
    arguments); expressions whose token count is not in ``(min_length, length - 1]`` are redrawn.
    """
    _check(length - 1 > min_length + 1, f"listops: length {length} leaves no room above min_length {min_length}")
    rng = _python_rng(gen)
    x = torch.zeros(batch, length, dtype=torch.long)
    y = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        while True:
            tree = _listops_tree(rng, 1, max_depth, max_args)
            toks = _listops_tokens(tree)
            if min_length < len(toks) <= length - 1:
                break
        x[b, 0] = 1
        x[b, 1 : 1 + len(toks)] = torch.tensor(toks)
        y[b] = listops_eval(tree)
    return {"inputs": x, "labels": y}


def retrieval(
    gen: torch.Generator, batch: int, *, vocab: int = 128, num_values: int = 16, length: int = 64, num_queries: int = 16
) -> dict[str, Tensor]:
    """Long-range retrieval classification (noncausal self-attention).

    ``length - num_queries`` positions hold pre-bound pairs (key, value) with distinct keys from
    ``[0, vocab)`` and values from ``[0, num_values)``; ``num_queries`` positions hold (key, ``?``)
    with ``? = num_values`` and a key of one of the pairs. Pairs and queries are shuffled over the
    whole sequence, so a query may sit before or after its pair, at any distance. ``inputs (B, L, 2)``
    = (key, value-or-?); ``targets (B, L)`` = the bound value at query positions, ``IGNORE`` elsewhere.
    """
    pairs = length - num_queries
    _check(num_queries >= 1 and pairs >= 1, f"retrieval: needs 1 <= num_queries < length, got {num_queries}, {length}")
    _check(vocab >= pairs, f"retrieval: vocab {vocab} has fewer keys than the {pairs} pairs")
    _check(num_values >= 2, f"retrieval: num_values must be >= 2, got {num_values}")
    keys = _sample_without_replacement(gen, batch, vocab, pairs)
    values = torch.randint(0, num_values, (batch, pairs), generator=gen)
    pick = torch.randint(0, pairs, (batch, num_queries), generator=gen)
    all_keys = torch.cat([keys, keys.gather(1, pick)], dim=1)
    all_vals = torch.cat([values, torch.full((batch, num_queries), num_values, dtype=torch.long)], dim=1)
    labels = torch.cat([torch.full((batch, pairs), IGNORE, dtype=torch.long), values.gather(1, pick)], dim=1)
    perm = torch.rand(batch, length, generator=gen).argsort(dim=1)
    return {
        "inputs": torch.stack([all_keys.gather(1, perm), all_vals.gather(1, perm)], dim=2),
        "targets": labels.gather(1, perm),
    }


# ---------------------------------------------------------------------------------------------------
# cross-attention tasks
# ---------------------------------------------------------------------------------------------------
def lookup(
    gen: torch.Generator, batch: int, *, vocab: int = 256, num_pairs: int = 64, num_queries: int = 32
) -> dict[str, Tensor]:
    """Associative lookup with pre-bound pairs (noncausal cross-attention).

    The memory is a set of ``num_pairs`` pairs: ``memory (B, N, 2)`` = (key, value) with distinct keys
    from ``[1, V/2)`` and values from ``[V/2, V)`` (with replacement). ``queries (B, Q)`` are keys
    of the memory (uniform, with replacement); ``targets (B, Q)`` their values.
    """
    half = vocab // 2
    _check(half - 1 >= num_pairs, f"lookup: vocab {vocab} has {half - 1} keys, fewer than num_pairs={num_pairs}")
    _check(num_queries >= 1, f"lookup: num_queries must be >= 1, got {num_queries}")
    keys = _sample_without_replacement(gen, batch, half - 1, num_pairs) + 1
    values = torch.randint(half, vocab, (batch, num_pairs), generator=gen)
    idx = torch.randint(0, num_pairs, (batch, num_queries), generator=gen)
    return {
        "memory": torch.stack([keys, values], dim=2),
        "queries": keys.gather(1, idx),
        "targets": values.gather(1, idx),
    }


def stream(gen: torch.Generator, batch: int, *, vocab: int = 10, length: int = 64, op: str = "copy") -> dict[str, Tensor]:
    """Monotonic transduction for causal cross-attention.

    Source ``x (B, L)`` with tokens in ``[0, V)``; target ``y_t`` depends on ``x_0..x_t`` only:
    ``op="copy"``: ``y_t = x_t``; ``op="sum"``: ``y_t = (x_0 + ... + x_t) mod V`` (running sum). The
    decoder reads ``queries = [BOS, y_0, ..., y_{L-2}]`` (BOS = V, teacher forcing) and predicts
    ``targets = y``; the source is never masked, the task itself is monotonic.
    ``memory (B, L, 2)`` = (token, position) so the model embeds the source position as a token.
    """
    _check(op in ("copy", "sum"), f"stream: op must be 'copy' or 'sum', got {op!r}")
    _check(vocab >= 2 and length >= 2, f"stream: needs vocab >= 2 and length >= 2, got {vocab}, {length}")
    x = torch.randint(0, vocab, (batch, length), generator=gen)
    y = x.clone() if op == "copy" else x.cumsum(dim=1) % vocab
    q = torch.cat([torch.full((batch, 1), vocab, dtype=torch.long), y[:, :-1]], dim=1)
    pos = torch.arange(length).expand(batch, length)
    return {"memory": torch.stack([x, pos], dim=2), "queries": q, "targets": y}


# ---------------------------------------------------------------------------------------------------
# spatial task
# ---------------------------------------------------------------------------------------------------
SHAPE_CLASSES = ("square", "outline", "disc", "plus")


def shapes(gen: torch.Generator, batch: int, *, size: int = 16, noise: float = 0.25) -> dict[str, Tensor]:
    """Grey images ``(B, 1, size, size)`` (channels first, as ``attnzoo.models.ViT`` takes them) of one shape each; ``labels`` index :data:`SHAPE_CLASSES`.

    Filled square, square outline, disc, plus sign; half-size 2..size//4+1 pixels (at least 2),
    random centre fully inside the image, random intensity in [0.6, 1], Gaussian noise ``noise``.
    """
    _check(size >= 8, f"shapes: size must be >= 8, got {size}")
    smax = max(2, size // 4 + 1)
    s = torch.randint(2, smax + 1, (batch,), generator=gen).float()
    cx = torch.floor(torch.rand(batch, generator=gen) * (size - 2 * s)) + s
    cy = torch.floor(torch.rand(batch, generator=gen) * (size - 2 * s)) + s
    label = torch.randint(0, len(SHAPE_CLASSES), (batch,), generator=gen)
    ar = torch.arange(size, dtype=torch.float32)
    dy = (ar[None, :, None] - cy[:, None, None]).abs()
    dx = (ar[None, None, :] - cx[:, None, None]).abs()
    r = s[:, None, None]
    square = (dx <= r) & (dy <= r)
    outline = square & ~((dx <= r - 1) & (dy <= r - 1))
    disc = dx**2 + dy**2 <= (r + 0.5) ** 2
    plus = ((dx <= 0.5) & (dy <= r)) | ((dy <= 0.5) & (dx <= r))
    masks = torch.stack([square, outline, disc, plus], dim=1)  # (B, 4, S, S)
    m = masks[torch.arange(batch), label].float()
    amp = 0.6 + 0.4 * torch.rand(batch, 1, 1, generator=gen)
    img = m * amp + noise * torch.randn(batch, size, size, generator=gen)
    return {"images": img[:, None], "labels": label}

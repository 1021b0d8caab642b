"""Activation patching, token pruning by attention importance, and concentric positions (CCA).

* **Activation patching** (the tool of "Circuit Component Reuse Across Tasks in Transformer Language
  Models", Merullo et al., arXiv 2310.08744): record the per-head outputs ``z`` (``weights @ V``, before
  ``o_proj``) of a clean run, run the corrupted input and overwrite chosen heads' ``z`` (all positions or
  one) with the clean values; the effect is the normalized logit difference
  ``(LD_patched - LD_corrupt) / (LD_clean - LD_corrupt)``. Clean and corrupted prompts must have the same
  length (minimal pairs).
* **Token pruning by attention importance** over a designated span, the rule of "[CLS] Token Tells
  Everything Needed for Training-free Efficient MLLMs" (VTC-CLS, arXiv 2412.05819): importance of span
  token j = sum over layers ``start..L-2`` of the head-mean attention of the anchor query (the [CLS]
  token there; the last prompt token here) on j; keep the top ``keep`` tokens in their original order and
  with their original position ids. DAMRO (arXiv 2410.04514) contrastive decoding against an
  outlier-only run: ``(1 + alpha) * logits_full - alpha * logits_outliers``, where the outliers are the
  top-k tokens by the same importance, masked to ``-inf`` where ``p_full < beta * max p_full``.
* **Concentric causal attention** ("Mitigating Object Hallucination via Concentric Causal Attention",
  Xing et al., arXiv 2410.15926, code ``cca_utils/cca.py``): for an ``H x W`` grid of tokens at offset
  ``p0``, ring(i, j) = min(i, j, H-1-i, W-1-j); grid token position = p0 + ring, text after the grid
  continues at p0 + ceil(min(H, W) / 2); inside the grid, query q may attend key k iff ring(k) <= ring(q).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .engine import HeadOutputs, Probe, attach, num_layers_heads


class HeadPatch(Probe):
    """Overwrite the outputs ``z`` of ``heads`` with recorded ones (``source[layer]`` (B, H, Q, D)).

    ``position``: patch only that query position (None = every position).
    """

    def __init__(self, heads, source: dict[int, Tensor], position: int | None = None):
        self.by_layer: dict[int, list[int]] = {}
        for layer, h in heads:
            self.by_layer.setdefault(int(layer), []).append(int(h))
        self.layers = set(self.by_layer)
        self.source, self.position = source, position

    def edit_output(self, ctx, out):
        src = self.source[ctx.layer].to(out)
        out = out.clone()
        for h in self.by_layer[ctx.layer]:
            if self.position is None:
                out[:, h] = src[:, h]
            else:
                out[:, h, self.position] = src[:, h, self.position]
        return out


@torch.no_grad()
def record_head_outputs(model, ids: Tensor) -> dict[int, Tensor]:
    """Per-head outputs ``z`` of every layer at every position: ``{layer: (B, H, T, D)}``."""
    rec = HeadOutputs(all_positions=True)
    with attach(model, rec):
        model(input_ids=ids, use_cache=False)
    return rec.out


def logit_diff(logits: Tensor, good: int, bad: int) -> Tensor:
    """Last-position logit difference ``logit[good] - logit[bad]`` per batch element."""
    last = logits[:, -1]
    return last[:, good] - last[:, bad]


@torch.no_grad()
def patch_heads(
    model, clean: Tensor, corrupt: Tensor, good: int, bad: int, heads=None, position=None
) -> dict:
    """Normalized logit-difference recovery of patching each head (or the list ``heads`` jointly).

    Returns ``{"clean", "corrupt", "per_head": (L, H) normalized effect}`` (``per_head`` only when
    ``heads`` is None), or ``{"clean", "corrupt", "patched", "normalized"}`` for a joint patch.
    """
    if clean.shape != corrupt.shape:
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} must have the same shape"
        )
    src = record_head_outputs(model, clean)
    with attach(model):
        ld_clean = float(logit_diff(model(input_ids=clean).logits, good, bad).mean())
        ld_corr = float(logit_diff(model(input_ids=corrupt).logits, good, bad).mean())
    denom = ld_clean - ld_corr if abs(ld_clean - ld_corr) > 1e-12 else float("nan")

    def run(hs):
        with attach(model, HeadPatch(hs, src, position)):
            return float(logit_diff(model(input_ids=corrupt).logits, good, bad).mean())

    if heads is not None:
        p = run(heads)
        return {"clean": ld_clean, "corrupt": ld_corr, "patched": p, "normalized": (p - ld_corr) / denom}
    nl, nh, _, _ = num_layers_heads(model)
    eff = torch.zeros(nl, nh)
    for i in range(nl):
        for h in range(nh):
            eff[i, h] = (run([(i, h)]) - ld_corr) / denom
    return {"clean": ld_clean, "corrupt": ld_corr, "per_head": eff}


# --------------------------------------------------------------------------- pruning by attention importance


class _AnchorRows(Probe):
    def __init__(self):
        self.rows: dict[int, Tensor] = {}

    def observe(self, ctx, weights):
        self.rows[ctx.layer] = weights[:, :, -1].mean(1).detach().float()  # head mean of the last query


@torch.no_grad()
def attention_importance(model, ids: Tensor, span: tuple[int, int], start_layer: int = 0) -> Tensor:
    """VTC-CLS importance of the span tokens: sum over layers start..L-2 of the head-mean attention of the
    last prompt token on each span token: (B, span_len)."""
    probe = _AnchorRows()
    with attach(model, probe):
        model(input_ids=ids, use_cache=False)
    nl = num_layers_heads(model)[0]
    s = sum(probe.rows[i] for i in range(start_layer, nl - 1))
    return s[:, span[0] : span[1]]


def prune_span(ids: Tensor, span: tuple[int, int], keep_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Keep only the span tokens ``keep_idx`` (indices into the span, any order) and everything outside the
    span; returns ``(input_ids, position_ids)`` with the original positions (kept indices re-sorted)."""
    keep = torch.sort(keep_idx.flatten()).values + span[0]
    pos = torch.cat([torch.arange(span[0]), keep, torch.arange(span[1], ids.shape[1])])
    return ids[:, pos], pos[None]


def top_span_tokens(importance: Tensor, keep: int) -> Tensor:
    """Indices (into the span) of the ``keep`` most important tokens of the first prompt."""
    return importance[0].topk(min(keep, importance.shape[1])).indices


def damro_logits(full: Tensor, outliers: Tensor, alpha: float = 0.5, beta: float = 0.1) -> Tensor:
    """DAMRO contrastive logits ``(1 + alpha) full - alpha outliers`` with the plausibility cut ``beta``."""
    out = (1 + alpha) * full - alpha * outliers
    lp = torch.log_softmax(full.float(), -1)
    cut = lp < math.log(beta) + lp.max(-1, keepdim=True).values
    return out.masked_fill(cut, float("-inf"))


# --------------------------------------------------------------------------- concentric causal attention


def ring_index(h: int, w: int) -> Tensor:
    """ring(i, j) = min(i, j, h-1-i, w-1-j) of an h x w grid (0 = outermost), raster order (h*w,)."""
    i = torch.arange(h)[:, None].expand(h, w)
    j = torch.arange(w)[None, :].expand(h, w)
    return torch.minimum(torch.minimum(i, j), torch.minimum(h - 1 - i, w - 1 - j)).flatten()


def concentric_position_ids(p0: int, h: int, w: int, total: int) -> Tensor:
    """Position ids (total,) for a sequence with an h x w grid at offset p0 (CCA rule 2)."""
    ring = ring_index(h, w)
    n_rings = (min(h, w) + 1) // 2
    after = torch.arange(total - p0 - h * w) + p0 + n_rings
    return torch.cat([torch.arange(p0), p0 + ring, after])


def concentric_mask(p0: int, h: int, w: int, total: int) -> Tensor:
    """Bool (total, total): causal outside the grid; inside, q sees k iff ring(k) <= ring(q) (CCA rule 3)."""
    m = torch.ones(total, total, dtype=torch.bool).tril()
    ring = ring_index(h, w)
    blk = slice(p0, p0 + h * w)
    m[blk, blk] = ring[None, :] <= ring[:, None]
    return m


class ConcentricMask(Probe):
    """Replace the causal mask by :func:`concentric_mask` (full-prompt calls; decode calls see every key).

    The pre-mask scores are recomputed from ``ctx.query``/``ctx.key`` (the eager path has added the
    causal mask already). Pass :func:`concentric_position_ids` as ``position_ids`` to the model too.
    """

    def __init__(self, p0: int, h: int, w: int):
        self.p0, self.h, self.w = p0, h, w

    def edit_logits(self, ctx, logits):
        if not ctx.is_prefill:
            return logits
        from .engine import repeat_kv

        k = repeat_kv(ctx.key, ctx.query.shape[1] // ctx.key.shape[1])
        raw = torch.matmul(ctx.query, k.transpose(2, 3)) * ctx.module.scaling
        allowed = concentric_mask(self.p0, self.h, self.w, ctx.k_len).to(logits.device)
        return torch.where(allowed, raw, torch.full_like(raw, float("-inf")))

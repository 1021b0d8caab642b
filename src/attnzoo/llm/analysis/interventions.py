"""Training-free interventions as probes (use with :func:`attnzoo.llm.analysis.attach` or the helpers).

* :class:`ACTCalibration`: "Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention
  Calibration for Large Language Models" (Yu et al., ICML 2024, arXiv 2406.15765), rule of the official
  code (``llama_modelling_aug.py``): in each selected (layer, head) the sinks are the keys with column
  score ``s_j = sum_i A_ij / (N - j) > thres`` (0.1); the first detected sink is kept; for every row the
  other sinks keep ``beta`` (0.4) of their attention and the removed ``(1 - beta)`` mass goes to the
  non-sink keys in proportion to their attention (the kept first sink included, as in the code, whose
  ratio copy zeroes only the calibrated columns). Rows still sum to 1. Deviation: sinks are detected on
  full-prompt (prefill) calls; decode calls reuse the last prefill's sinks of that layer.
* :class:`VARRedistribution`: the VAR rule of "See What You Are Told: Visual Attention Sink in Large
  Multimodal Models" (Kang et al., ICLR 2025, arXiv 2503.03321), applied to a designated span (the
  image tokens in a multimodal model, the context here). Sink tokens: ``max_{d in D_sink} |x_hat[d]| > tau``
  on the layer input (``x_hat = x / RMS(x)``, tau 20). Head/query selection: attention on the span
  ``>= summ`` (0.2) and share of it on span sinks ``<= rho`` (0.5). Edit: attention to every sink token
  times ``p`` (0.6); the removed mass goes to the non-sink span tokens in proportion. Layers >= 2, the
  last layer skipped.
* :class:`HeadScale`: VHR head reinforcement ("Cracking the Code of Hallucination in LVLMs with
  Vision-aware Head Divergence", He et al., arXiv 2412.13949): the outputs of chosen heads times
  ``alpha`` (2) before ``o_proj``. :func:`vhd_scores` / :func:`select_vhr_heads` pick the heads from the
  divergence between runs with and without the span (text analogue; see the functions for deviations).
* :class:`HeadAblation`: ``zero`` (head output 0), ``mean`` (head output := a given mean vector),
  ``uniform`` (Retrieval_Head masking: logits 0 on the visible keys -> uniform attention), ``bos``
  (Active-Dormant ``MoveAttentionToBOSHook``: all attention on position 0). ``decode_only=True`` applies
  it only to single-token calls (the Retrieval_Head protocol).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable

import torch
from torch import Tensor

from .engine import Ctx, HeadOutputs, Probe, attach, decoder_layers, num_layers_heads
from .stats import act_sinks, hidden_sinks, rms_normalize


def _heads_by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, h in heads:
        out.setdefault(int(layer), []).append(int(h))
    return {k: sorted(set(v)) for k, v in out.items()}


def redistribute(weights: Tensor, remove: Tensor, receive: Tensor, keep: float) -> Tensor:
    """Scale the columns ``remove`` by ``keep`` and give the removed mass to ``receive`` in proportion.

    ``weights`` (..., Q, K) rows summing to 1; ``remove``/``receive`` bool broadcastable to it
    (disjoint). Rows where ``receive`` holds no attention are left unchanged (the mass has nowhere to
    go), so every row still sums to 1.
    """
    w = weights
    rem = remove.to(w.dtype)
    rec = receive.to(w.dtype)
    sink_mass = (w * rem).sum(-1, keepdim=True)
    base = w * rec
    tot = base.sum(-1, keepdim=True)
    ok = tot > 0
    ratio = torch.where(ok, base / torch.where(ok, tot, torch.ones_like(tot)), torch.zeros_like(base))
    removed = torch.where(ok, (1.0 - keep) * sink_mass, torch.zeros_like(sink_mass))
    scale = torch.where(ok & remove, torch.full_like(w, keep), torch.ones_like(w))
    return w * scale + removed * ratio


class ACTCalibration(Probe):
    """ACT attention calibration of the heads ``heads`` (list of (layer, head)); see the module docstring."""

    def __init__(self, heads: Iterable[tuple[int, int]], beta: float = 0.4, thres: float = 0.1, alpha=None):
        self.by_layer = _heads_by_layer(heads)
        self.layers = set(self.by_layer)
        self.beta, self.thres, self.alpha = float(beta), float(thres), alpha
        self.last_sinks: dict[int, Tensor] = {}

    def detect(self, ctx: Ctx, weights: Tensor) -> Tensor:
        """Bool (B, H, K) calibrated sinks (hidden sinks) for this call."""
        if ctx.is_prefill or ctx.layer not in self.last_sinks:
            vis = ctx.visible().to(weights.dtype)
            cnt = vis.sum(-2).clamp_min(1)  # number of queries that can see key j (= N - j in prefill)
            scores = weights.sum(-2) / cnt
            s = hidden_sinks(act_sinks(scores, self.thres, self.alpha))
            if ctx.is_prefill:
                self.last_sinks[ctx.layer] = s
            return s
        s = self.last_sinks[ctx.layer]
        k = weights.shape[-1]
        if s.shape[-1] < k:
            s = torch.cat([s, s.new_zeros(*s.shape[:-1], k - s.shape[-1])], -1)
        return s[..., :k]

    def edit_weights(self, ctx, weights):
        hs = self.by_layer[ctx.layer]
        s = self.detect(ctx, weights)  # (B, H, K)
        sel = torch.zeros(weights.shape[1], dtype=torch.bool, device=weights.device)
        sel[hs] = True
        remove = s[:, :, None, :] & sel[None, :, None, None]
        receive = ~s[:, :, None, :] & ctx.visible()
        return torch.where(
            sel[None, :, None, None], redistribute(weights, remove, receive, self.beta), weights
        )


class VARRedistribution(Probe):
    """VAR attention redistribution towards the non-sink tokens of ``span`` = (start, end) positions."""

    def __init__(
        self,
        span: tuple[int, int],
        sink_dims: list[int],
        p: float = 0.6,
        rho: float = 0.5,
        summ: float = 0.2,
        tau: float = 20.0,
        layers: Iterable[int] | None = None,
    ):
        self.span = (int(span[0]), int(span[1]))
        self.sink_dims = list(sink_dims)
        self.p, self.rho, self.summ, self.tau = float(p), float(rho), float(summ), float(tau)
        self._layers_arg = None if layers is None else set(int(x) for x in layers)
        self.flags: dict[int, Tensor] = {}
        self._handles = []
        self.selected_fraction: dict[int, float] = {}

    def install(self, model):
        nl = num_layers_heads(model)[0]
        self.layers = self._layers_arg if self._layers_arg is not None else set(range(2, nl - 1))
        self.flags = {}

        def pre(i):
            def fn(mod, args, kwargs):
                x = kwargs.get("hidden_states", args[0] if args else None)
                f = rms_normalize(x.float())[..., self.sink_dims].abs().amax(-1) > self.tau
                self.flags[i] = f if i not in self.flags else torch.cat([self.flags[i], f], 1)

            return fn

        self._handles = [
            layer.register_forward_pre_hook(pre(i), with_kwargs=True)
            for i, layer in enumerate(decoder_layers(model))
            if i in self.layers
        ]

    def uninstall(self, model):
        for h in self._handles:
            h.remove()
        self._handles = []

    def edit_weights(self, ctx, weights):
        k = weights.shape[-1]
        sink = self.flags[ctx.layer][:, :k]  # (B, K)
        pos = torch.arange(k, device=weights.device)
        in_span = (pos >= self.span[0]) & (pos < self.span[1])
        span_sink = sink & in_span
        w = weights
        span_mass = (w * in_span).sum(-1)  # (B, H, Q)
        sink_in_span = (w * span_sink[:, None, None, :]).sum(-1)
        portion = sink_in_span / span_mass.clamp_min(1e-30)
        select = (span_mass >= self.summ) & (portion <= self.rho)  # (B, H, Q)
        self.selected_fraction[ctx.layer] = float(select.double().mean())
        remove = sink[:, None, None, :].expand_as(w)
        receive = (in_span & ~sink[:, :])[:, None, None, :].expand_as(w) & ctx.visible()
        new = redistribute(w, remove, receive, self.p)
        return torch.where(select[..., None], new, w)


class HeadScale(Probe):
    """Multiply the outputs of chosen heads by ``alpha`` (VHR reinforcement); ``{(layer, head): alpha}``."""

    def __init__(self, heads: Iterable[tuple[int, int]], alpha: float = 2.0):
        self.by_layer = _heads_by_layer(heads)
        self.layers = set(self.by_layer)
        self.alpha = float(alpha)

    def edit_output(self, ctx, out):
        hs = self.by_layer[ctx.layer]
        scale = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
        scale[hs] = self.alpha
        return out * scale[None, :, None, None]


class HeadAblation(Probe):
    """Ablate heads ``[(layer, head), ...]`` with ``mode`` in zero | mean | uniform | bos."""

    MODES = ("zero", "mean", "uniform", "bos")

    def __init__(self, heads, mode: str = "zero", means: dict | None = None, decode_only: bool = False):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "mean" and means is None:
            raise ValueError("mode='mean' needs means={(layer, head): vector (D,)} (see mean_head_outputs)")
        self.by_layer = _heads_by_layer(heads)
        self.layers = set(self.by_layer)
        self.mode, self.means, self.decode_only = mode, means or {}, decode_only

    def _active(self, ctx):
        return not self.decode_only or ctx.q_len == 1

    def _sel(self, ctx, n):
        sel = torch.zeros(n, dtype=torch.bool, device=ctx.query.device)
        sel[self.by_layer[ctx.layer]] = True
        return sel

    def edit_logits(self, ctx, logits):
        if self.mode != "uniform" or not self._active(ctx):
            return logits
        sel = self._sel(ctx, logits.shape[1])[None, :, None, None]
        vis = ctx.visible()
        flat = torch.where(vis, torch.zeros_like(logits), torch.full_like(logits, float("-inf")))
        return torch.where(sel, flat, logits)

    def edit_weights(self, ctx, weights):
        if self.mode != "bos" or not self._active(ctx):
            return weights
        sel = self._sel(ctx, weights.shape[1])[None, :, None, None]
        bos = torch.zeros_like(weights)
        bos[..., 0] = 1.0
        return torch.where(sel, bos, weights)

    def edit_output(self, ctx, out):
        if self.mode not in ("zero", "mean") or not self._active(ctx):
            return out
        out = out.clone()
        for h in self.by_layer[ctx.layer]:
            out[:, h] = 0.0 if self.mode == "zero" else self.means[(ctx.layer, h)].to(out)
        return out


@torch.no_grad()
def mean_head_outputs(model, batches: list[Tensor]) -> dict[tuple[int, int], Tensor]:
    """Mean per-head output vector over every position of ``batches`` (for ``HeadAblation(mode='mean')``)."""
    nl, nh, _, hd = num_layers_heads(model)
    tot = torch.zeros(nl, nh, hd, dtype=torch.float64)
    cnt = 0
    for ids in batches:
        probe = HeadOutputs(all_positions=True)
        with attach(model, probe):
            model(input_ids=ids, use_cache=False)
        for i in range(nl):
            tot[i] += probe.out[i].double().sum((0, 2))
        cnt += ids.shape[0] * ids.shape[1]
    return {(i, h): (tot[i, h] / cnt).float() for i in range(nl) for h in range(nh)}


def random_heads(k: int, num_layers: int, num_heads: int, exclude=(), seed: int = 0) -> list[tuple[int, int]]:
    """``k`` distinct random (layer, head) pairs not in ``exclude``."""
    ex = {(int(a), int(b)) for a, b in exclude}
    pool = [(i, h) for i in range(num_layers) for h in range(num_heads) if (i, h) not in ex]
    return sorted(random.Random(seed).sample(pool, k))


@contextlib.contextmanager
def act_calibration(model, heads, beta: float = 0.4, thres: float = 0.1, alpha=None):
    """Context manager: ACT calibration of ``heads`` on ``model``."""
    with attach(model, ACTCalibration(heads, beta, thres, alpha)) as p:
        yield p


@contextlib.contextmanager
def var_redistribution(model, span, sink_dims, **kw):
    """Context manager: VAR redistribution towards the non-sink tokens of ``span``."""
    with attach(model, VARRedistribution(span, sink_dims, **kw)) as p:
        yield p


@contextlib.contextmanager
def head_reinforcement(model, heads, alpha: float = 2.0):
    """Context manager: VHR, outputs of ``heads`` times ``alpha``."""
    with attach(model, HeadScale(heads, alpha)) as p:
        yield p


@contextlib.contextmanager
def ablate_heads(model, heads, mode: str = "zero", means=None, decode_only: bool = False):
    """Context manager: ablate ``heads`` (zero | mean | uniform | bos)."""
    with attach(model, HeadAblation(heads, mode, means, decode_only)) as p:
        yield p


# --------------------------------------------------------------------------- VHR head selection


@torch.no_grad()
def vhd_scores(model, ids_with: Tensor, span: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(vhd, text_act)``, each (L, H): ``||o_h(with) - o_h(without span)||^2`` at the last position, and
    the text-only activation ``||o_h(without)||^2`` (for the outlier filter of :func:`select_vhr_heads`).

    The text analogue of the vision-aware head divergence: "without" removes the tokens of ``span``.
    Deviation: both runs are plain forwards (the paper's layer-by-layer recomputation with the earlier
    layers already reinforced is not done).
    """
    ids_without = torch.cat([ids_with[:, : span[0]], ids_with[:, span[1] :]], 1)
    a, b = HeadOutputs(), HeadOutputs()
    with attach(model, a):
        model(input_ids=ids_with, use_cache=False)
    with attach(model, b):
        model(input_ids=ids_without, use_cache=False)
    nl = num_layers_heads(model)[0]
    vhd = torch.stack([(a.out[i] - b.out[i]).pow(2).sum(-1).mean(0) for i in range(nl)])
    act = torch.stack([b.out[i].pow(2).sum(-1).mean(0) for i in range(nl)])
    return vhd, act


def select_vhr_heads(vhd: Tensor, text_act: Tensor | None = None, layers=None) -> list[tuple[int, int]]:
    """Per layer: heads with VHD > median (strict); outlier filter when std(VHD) > 1 (see vision spec §17)."""
    nl, nh = vhd.shape
    layers = range(nl) if layers is None else layers
    out = []
    for i in layers:
        v = vhd[i].clone()
        if text_act is not None and float(v.std()) > 1:
            bad = (v > v.mean() + v.std()) & (text_act[i] > text_act[i].mean() + text_act[i].std())
            v[bad] = 0
        med = v.median()
        out += [(i, h) for h in range(nh) if float(v[h]) > float(med)]
    return out

"""Per-(layer, head) attention statistics computed on the fly: sinks, hidden sinks, entropies, dormancy.

Definitions (the symbols are those of the papers; A is one head's post-softmax causal map, N x N):

* **Sink mass on position 0** (StreamingLLM, arXiv 2309.17453): mean over queries ``i >= 1`` of
  ``A[i, 0]`` (query 0 can only see key 0 and is left out). Also the mass on the first ``k`` positions,
  mean over queries ``i >= k`` (``k = 4`` = StreamingLLM's ``start_size``).
* **ACT sinks** ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML 2024, arXiv
  2406.15765, code ``atten_process_eval``): column score ``s_j = sum_i A[i, j] / (N - j)``, the mean
  attention key ``j`` receives from the queries that can see it; key ``j`` is a sink when
  ``s_j > THRES`` (``THRES = 0.1``, the official scripts' value). Option ``alpha``: the relative rule
  ``s_j > alpha / N`` (not verified against the paper's text; offered as an option only). The first
  detected sink (lowest position, normally position 0 / BOS) is the "visible" sink; the others are
  **hidden sinks**. Hidden-sink mass = mean over all queries of the attention on the hidden sinks.
* **Row / column normalized entropies** ("Active-Dormant Attention Heads", Guo et al., arXiv 2410.13835,
  code ``LLM/src/entropy.py``): row-tokenwise ``H(A[i, :]) / log(i + 1)`` (0 for row 0), averaged over
  all rows (``row_headwise_average``); column-tokenwise: column ``j`` normalized to a distribution over
  its queries, ``H / log(N - j)`` (0 for the last column), maximum over columns
  (``column_headwise_maximum``). A head is flagged **dormant** when ``row_H < row_threshold`` and
  ``col_H > col_threshold`` (thresholds are parameters; the report sweeps them). The second detector
  of the paper's toy code: a head is dormant at a query when its attention to BOS is ``>= 0.89``.

Everything is accumulated from three per-layer tensors of size (B, H, N) (column sums of A, column
sums of ``A log A``, and row entropies), so the memory is O(L H N), never O(L H N^2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .engine import Ctx, Probe


def xlogx(a: Tensor) -> Tensor:
    return torch.where(a > 0, a * torch.log(a.clamp_min(1e-38)), torch.zeros_like(a))


def act_column_scores(attn: Tensor) -> Tensor:
    """ACT column score ``s_j = sum_i A[i, j] / (N - j)`` of causal maps (..., N, N) -> (..., N)."""
    n = attn.shape[-1]
    return attn.sum(-2) / torch.arange(n, 0, -1, device=attn.device, dtype=attn.dtype)


def act_sinks(scores: Tensor, thres: float = 0.1, alpha: float | None = None) -> Tensor:
    """Bool sink flags from ACT column scores (..., N): ``s > thres`` or, with ``alpha``, ``s > alpha / N``."""
    n = scores.shape[-1]
    cut = thres if alpha is None else alpha / n
    return scores > cut


def first_sink_only(sinks: Tensor) -> Tensor:
    """Bool (..., N): True at the first (lowest-position) True of ``sinks`` along the last dim."""
    c = sinks.long().cumsum(-1)
    return sinks & (c == 1)


def hidden_sinks(sinks: Tensor) -> Tensor:
    """The ACT rule's calibrated set: every detected sink except the first one (``indices[1:]``)."""
    return sinks & ~first_sink_only(sinks)


def row_normalized_entropy(attn: Tensor) -> Tensor:
    """Active-Dormant ``row_tokenwise_normalized_entropy`` (..., N, N) -> (..., N); row 0 -> 0."""
    n = attn.shape[-1]
    h = -xlogx(attn).sum(-1)
    norm = torch.log(torch.arange(1, n + 1, device=attn.device, dtype=attn.dtype))
    return torch.where(norm > 0, h / norm.clamp_min(1e-30), torch.zeros_like(h))


def column_normalized_entropy(attn: Tensor) -> Tensor:
    """Active-Dormant ``column_tokenwise_normalized_entropy`` (..., N, N) -> (..., N); last column -> 0."""
    return _col_entropy(attn.sum(-2), xlogx(attn).sum(-2))


def _col_entropy(colsum: Tensor, col_xlogx: Tensor) -> Tensor:
    # H(p) with p_i = A_ij / c_j:  -sum p log p = log c_j - (1/c_j) sum_i A_ij log A_ij
    n = colsum.shape[-1]
    c = colsum.clamp_min(1e-30)
    h = torch.log(c) - col_xlogx / c
    h = torch.where(colsum > 0, h, torch.zeros_like(h))
    norm = torch.log(torch.arange(n, 0, -1, device=colsum.device, dtype=colsum.dtype))
    return torch.where(norm > 0, h / norm.clamp_min(1e-30), torch.zeros_like(h))


class AttentionStats(Probe):
    """Accumulate the per-layer statistics of full-prompt (prefill) calls; see the module docstring.

    Use one prompt batch per ``attach`` (B equal-length prompts, no padding); call :meth:`result`.
    """

    def __init__(self, layers=None):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.colsum: dict[int, Tensor] = {}
        self.colxlogx: dict[int, Tensor] = {}
        self.rowent: dict[int, Tensor] = {}

    def observe(self, ctx: Ctx, weights: Tensor) -> None:
        if not ctx.is_prefill:
            return
        w = weights.detach().double()
        self.colsum[ctx.layer] = w.sum(-2).cpu()
        self.colxlogx[ctx.layer] = xlogx(w).sum(-2).cpu()
        self.rowent[ctx.layer] = row_normalized_entropy(w).mean(-1).cpu()

    def result(self) -> HeadStats:
        ls = sorted(self.colsum)
        return HeadStats(
            colsum=torch.stack([self.colsum[i] for i in ls], 1),
            colxlogx=torch.stack([self.colxlogx[i] for i in ls], 1),
            row_entropy=torch.stack([self.rowent[i] for i in ls], 1),
            layers=ls,
        )


@dataclass
class HeadStats:
    """Column sums ``c`` (B, L, H, N), column sums of A log A (B, L, H, N), row entropies (B, L, H)."""

    colsum: Tensor
    colxlogx: Tensor
    row_entropy: Tensor
    layers: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.colsum.shape[-1]

    def pos0_mass(self) -> Tensor:
        """Mean attention on position 0 over queries 1..N-1, per prompt: (B, L, H)."""
        n = self.n
        return (self.colsum[..., 0] - 1.0) / max(n - 1, 1)

    def first_k_mass(self, k: int = 4) -> Tensor:
        """Mean attention on positions < k over queries k..N-1: (B, L, H) (rows < k sum to 1 there)."""
        n = self.n
        k = min(k, n - 1)
        return (self.colsum[..., :k].sum(-1) - k) / max(n - k, 1)

    def act_scores(self) -> Tensor:
        n = self.n
        return self.colsum / torch.arange(n, 0, -1, dtype=self.colsum.dtype)

    def sinks(self, thres: float = 0.1, alpha: float | None = None) -> Tensor:
        return act_sinks(self.act_scores(), thres, alpha)

    def hidden_sinks(self, thres: float = 0.1, alpha: float | None = None) -> Tensor:
        return hidden_sinks(self.sinks(thres, alpha))

    def hidden_sink_mass(self, thres: float = 0.1, alpha: float | None = None) -> Tensor:
        """Mean over all queries of the attention on the hidden sinks: (B, L, H)."""
        hs = self.hidden_sinks(thres, alpha)
        return (self.colsum * hs).sum(-1) / self.n

    def hidden_sink_count(self, thres: float = 0.1, alpha: float | None = None) -> Tensor:
        return self.hidden_sinks(thres, alpha).sum(-1)

    def column_entropy_max(self) -> Tensor:
        return _col_entropy(self.colsum, self.colxlogx).amax(-1)

    def dormant(self, row_threshold: float = 0.2, col_threshold: float = 0.9) -> Tensor:
        """Entropy detector: bool (B, L, H), dormant = low row entropy and high max column entropy."""
        return (self.row_entropy < row_threshold) & (self.column_entropy_max() > col_threshold)


def sink_token_counts(stats: HeadStats, tokens: list[list[str]], thres: float = 0.1) -> dict[str, int]:
    """How many (prompt, layer, head) flag each token string as a hidden sink."""
    hs = stats.hidden_sinks(thres)
    out: dict[str, int] = {}
    for b in range(hs.shape[0]):
        pos = hs[b].any(0).any(0).nonzero().flatten().tolist()
        cnt = hs[b].sum((0, 1))
        for p in pos:
            out[tokens[b][p]] = out.get(tokens[b][p], 0) + int(cnt[p])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def threshold_sweep(stats: HeadStats, thresholds=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5)) -> list[dict]:
    """ACT threshold sweep: share of heads with a hidden sink, mean count and mass per threshold."""
    rows = []
    for t in thresholds:
        cnt = stats.hidden_sink_count(t).double()
        rows.append(
            {
                "thres": t,
                "heads_with_hidden_sink": float((cnt > 0).double().mean()),
                "mean_hidden_sinks": float(cnt.mean()),
                "mean_hidden_sink_mass": float(stats.hidden_sink_mass(t).mean()),
                "heads_with_any_sink": float(stats.sinks(t).any(-1).double().mean()),
            }
        )
    return rows


def dormant_sweep(stats: HeadStats, row_thresholds=(0.1, 0.2, 0.3, 0.4), col_thresholds=(0.8, 0.9, 0.95)):
    rows = []
    for r in row_thresholds:
        for c in col_thresholds:
            rows.append(
                {"row_thr": r, "col_thr": c, "dormant_share": float(stats.dormant(r, c).double().mean())}
            )
    return rows


# --------------------------------------------------------------------------- residual / value states


@dataclass
class ResidualStats:
    """Massive activations and value-state drains for one prompt batch.

    ``top`` (L, 3): the three largest ``|h|`` of each decoder-layer output; ``median`` (L,); ``resid_norm``
    (L, B, T): ``||h_t||`` per token; ``value_norm`` (L, B, Hkv, T): ``||v_t||`` per kv head;
    ``massive``: list of (layer, batch, token, dim, value) with ``|h| > abs_threshold`` and
    ``|h| / median > ratio_threshold``.
    """

    top: Tensor
    median: Tensor
    resid_norm: Tensor
    value_norm: Tensor
    massive: list[tuple[int, int, int, int, float]]
    hidden: list[Tensor] | None = None

    def peak_ratio(self) -> Tensor:
        """Residual peak ``||h_0|| / median_{t>=1} ||h_t||`` per layer: (L, B)."""
        return self.resid_norm[..., 0] / self.resid_norm[..., 1:].median(-1).values

    def drain_ratio(self) -> Tensor:
        """Value drain ``||v_0|| / mean_{t>=1} ||v_t||`` per layer and kv head: (L, B, Hkv)."""
        return self.value_norm[..., 0] / self.value_norm[..., 1:].mean(-1)


@torch.no_grad()
def residual_stats(
    model, input_ids: Tensor, abs_threshold: float = 100.0, ratio_threshold: float = 1000.0, keep_hidden=False
) -> ResidualStats:
    """Decoder-layer outputs (raw residual stream, before the final norm) and value states, by hooks."""
    from .engine import decoder_layers, forward_hooks, num_layers_heads

    nl, nh, nkv, hd = num_layers_heads(model)
    hs: dict[int, Tensor] = {}
    vs: dict[int, Tensor] = {}

    def out_hook(i):
        def fn(mod, inp, out):
            hs[i] = (out[0] if isinstance(out, tuple) else out).detach().float()

        return fn

    def v_hook(i):
        def fn(mod, inp, out):
            b, t, _ = out.shape
            vs[i] = out.detach().float().view(b, t, nkv, hd).norm(dim=-1).transpose(1, 2)

        return fn

    layers = decoder_layers(model)
    pairs = [(layer, out_hook(i)) for i, layer in enumerate(layers)]
    pairs += [(layer.self_attn.v_proj, v_hook(i)) for i, layer in enumerate(layers)]
    with forward_hooks(pairs):
        model(input_ids=input_ids, use_cache=False)
    top, med, norms, massive = [], [], [], []
    for i in range(nl):
        a = hs[i].abs()
        top.append(a.flatten().topk(3).values)
        m = a.flatten().median()
        med.append(m)
        norms.append(hs[i].norm(dim=-1))
        flag = (a > abs_threshold) & (a / m > ratio_threshold)
        for b, t, d in flag.nonzero().tolist():
            massive.append((i, b, t, d, float(hs[i][b, t, d])))
    return ResidualStats(
        top=torch.stack(top),
        median=torch.stack(med),
        resid_norm=torch.stack(norms),
        value_norm=torch.stack([vs[i] for i in range(nl)]),
        massive=massive,
        hidden=[hs[i] for i in range(nl)] if keep_hidden else None,
    )


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / RMS(x)`` over the last dim (RMSNorm without weight), as VAR's ``DimProspector``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sink_dims_from_first_token(hidden: list[Tensor], k: int = 2, from_layer: int = 2) -> list[int]:
    """``D_sink``: the ``k`` dims with the largest mean ``|x_hat|`` at position 0 over layers >= from_layer."""
    xs = torch.stack([rms_normalize(h[:, 0]).abs().mean(0) for h in hidden[from_layer:]]).mean(0)
    return xs.topk(k).indices.tolist()


def var_sink_tokens(hidden: Tensor, dims: list[int], tau: float = 20.0) -> Tensor:
    """VAR rule (arXiv 2503.03321): ``max_{d in D_sink} |x_hat[d]| > tau`` -> bool (B, T)."""
    return rms_normalize(hidden)[..., dims].abs().amax(-1) > tau

"""Routing attention: online k-means routes queries to keys of their cluster (Routing Transformer).

Paper: "Efficient Content-Based Sparse Attention with Routing Transformers" (Roy, Saffar, Vaswani,
Grangier; TACL 2021, arXiv 2003.05997). Read (not copied): lucidrains/routing-transformer. The
official TensorFlow code was not read.

Per head, with ``C`` centroids ``mu_c`` (a buffer, not trained by backprop):

* Routing features: ``q~ = LayerNorm(q)``, ``k~ = LayerNorm(k)`` without affine parameters (the
  paper normalises before clustering). A vector's cluster is ``argmax_c cos(x~, mu_c)`` (the
  nearest centroid on the sphere; ties to the lower index).
* Online k-means, in training mode only, after the output is computed (so it never leaks):
  ``mu_c <- lambda mu_c + (1 - lambda)/2 sum_{i: c(q_i) = c} q~_i + (1 - lambda)/2 sum_{j: c(k_j) = c} k~_j``
  with ``lambda = ema_decay = 0.999`` (the paper's update; the cosine assignment makes it
  insensitive to the centroids' norms).
* Window per cluster. Causal: query ``i`` attends to the last ``window`` keys ``j <= i`` whose
  cluster is its own cluster (the cluster of a token depends on that token only, so the routing
  decision never looks at the future, and decoding can follow token by token). Non-causal
  (balanced routing, as the paper's and lucidrains' implementation): cluster ``c`` keeps the
  ``window`` keys closest to ``mu_c`` (highest cosine; ties to the earlier key) and query ``i``
  attends to the keys kept by its cluster. Attention inside the window is ordinary scaled softmax
  on the raw ``q, k``; a query whose window is empty outputs 0 (the paper's "unrouted" tokens).

Fast form: sort keys by (cluster, position) and ``searchsorted`` each query's window (causal), or
a top-``window`` per cluster (non-causal), then gather ``window`` keys per query: ``O(N C d)``
routing + ``O(N window d)`` attention. Reference form: the same assignments, the windows
re-derived densely from per-cluster running counts (causal) or pairwise ranks (non-causal), and
the golden masked softmax over all ``N x M`` pairs.

Deviations: no shared-QK / self-mask trick and no local-attention heads (the paper mixes local and
routing heads; combine with ``sliding_window`` for that); centroids start from a seeded random
draw (``seed``) instead of k-means on data; no commitment loss term is added to the output (the
module stores it in ``aux_loss`` in training mode). Without explicit ``centroids`` the functional
draws them from ``seed`` (a ``torch.Generator``), so it is deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads, validate_qkv
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register

NAME = "routing"


def default_centroids(num_heads: int, num_clusters: int, head_dim: int, seed: int = 0) -> Tensor:
    """Unit centroids ``(H, C, D)`` drawn from a seeded generator (float64)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(num_heads, num_clusters, head_dim, generator=g, dtype=torch.float64)
    return F.normalize(mu, dim=-1)


def route_features(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters over the head dim (the paper's pre-clustering norm)."""
    return F.layer_norm(x, (x.shape[-1],))


def assign_clusters(x: Tensor, centroids: Tensor) -> Tensor:
    """``argmax_c cos(LN(x), mu_c)`` for ``x (B, H, N, D)``, ``centroids (H, C, D)`` -> ``(B, H, N)`` long."""
    feats = F.normalize(route_features(x), dim=-1)
    mu = F.normalize(centroids.to(x.dtype), dim=-1)
    return torch.einsum("bhnd,hcd->bhnc", feats, mu).argmax(-1)


def _cluster_key_scores(k: Tensor, centroids: Tensor) -> Tensor:
    feats = F.normalize(route_features(k), dim=-1)
    return torch.einsum("bhmd,hcd->bhcm", feats, F.normalize(centroids.to(k.dtype), dim=-1))


def _prepare(q, k, v, causal, cross, key_padding_mask, num_clusters, window, centroids, seed):
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    if cross:
        raise ValueError(f"{NAME}: only self-attention is defined")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{NAME}: window must be a positive int, got {window!r}")
    if not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"{NAME}: num_clusters must be a positive int, got {num_clusters!r}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"{NAME}: causal self-attention needs N <= M, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    k, v = expand_kv(k, v, q.shape[1])
    h, d = q.shape[1], q.shape[3]
    if centroids is None:
        centroids = default_centroids(h, num_clusters, d, seed)
    if tuple(centroids.shape) != (h, num_clusters, d):
        raise ValueError(f"{NAME}: centroids must be (heads, num_clusters, head_dim) = ({h}, {num_clusters}, {d}), got {tuple(centroids.shape)}")
    return k, v, centroids.to(device=q.device)


def _attend_gathered(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Attention of each query to the keys at ``pos (B, H, N, w)`` where ``valid``."""
    b, h, n, w = pos.shape
    d, dv = k.shape[-1], v.shape[-1]
    flat = pos.clamp_min(0).reshape(b, h, n * w, 1)
    kg = k.gather(2, flat.expand(-1, -1, -1, d)).view(b, h, n, w, d)
    vg = v.gather(2, flat.expand(-1, -1, -1, dv)).view(b, h, n, w, dv)
    s = torch.einsum("bhnd,bhnwd->bhnw", q, kg) * scale
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    z = p.sum(-1, keepdim=True)
    p = p / torch.where(z > 0, z, torch.ones_like(z))
    return torch.einsum("bhnw,bhnwe->bhne", p, vg)


def routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    num_clusters: int = 16,
    window: int = 64,
    centroids: Tensor | None = None,
    seed: int = 0,
    scale: float | None = None,
    key_clusters: Tensor | None = None,
) -> Tensor:
    """Routing attention on ``(B, H, N, D)``; ``centroids (H, C, D)`` (default: drawn from ``seed``).

    ``key_clusters (B, H, M)``: precomputed key assignments (a decoding cache); computed if None.
    """
    k, v, mu = _prepare(q, k, v, causal, cross, key_padding_mask, num_clusters, window, centroids, seed)
    b, h, n, d = q.shape
    m = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qc = assign_clusters(q, mu)  # (B, H, N)
    if causal:
        kc = assign_clusters(k, mu) if key_clusters is None else key_clusters
        if key_padding_mask is not None:  # padded keys go to a sentinel cluster that no query has
            kc = kc.masked_fill(key_padding_mask[:, None, :], num_clusters)
        code = kc * m + torch.arange(m, device=q.device)  # sort by (cluster, position)
        sorted_code, order = torch.sort(code, dim=-1)
        a = torch.arange(m - n, m, device=q.device)  # absolute query positions
        end = torch.searchsorted(sorted_code, (qc * m + a).contiguous(), right=True)  # one past the last key <= a
        start = torch.searchsorted(sorted_code, (qc * m).contiguous(), right=False)  # first key of the cluster
        idx = end[..., None] - window + torch.arange(window, device=q.device)  # (B, H, N, w)
        valid = idx >= start[..., None]
        pos = order.gather(-1, idx.clamp_min(0).reshape(b, h, n * window)).view(b, h, n, window)
    else:
        w = min(window, m)
        sc = _cluster_key_scores(k, mu)  # (B, H, C, M)
        if key_padding_mask is not None:
            sc = sc.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        vals, sel = torch.sort(sc, dim=-1, descending=True, stable=True)
        sel, ok = sel[..., :w], torch.isfinite(vals[..., :w])  # (B, H, C, w)
        gidx = qc[..., None].expand(b, h, n, w)
        pos = sel.gather(2, gidx)  # (B, H, N, w)
        valid = ok.gather(2, gidx)
    return _attend_gathered(q, k, v, pos, valid, scale)


def routing_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    num_clusters: int = 16,
    window: int = 64,
    centroids: Tensor | None = None,
    seed: int = 0,
    scale: float | None = None,
    key_clusters: Tensor | None = None,
) -> Tensor:
    """Dense form: the routing as an ``(N, M)`` mask, then the golden masked softmax."""
    k, v, mu = _prepare(q, k, v, causal, cross, key_padding_mask, num_clusters, window, centroids, seed)
    b, h, n, d = q.shape
    m = k.shape[2]
    qc = assign_clusters(q, mu)
    keep = torch.ones(b, 1, m, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask[:, None, :]
    if causal:
        kc = assign_clusters(k, mu) if key_clusters is None else key_clusters
        onehot = F.one_hot(kc, num_clusters) * keep[..., None]  # (B, H, M, C) kept keys per cluster
        count = onehot.cumsum(2)  # keys of each cluster at positions <= t
        a = torch.arange(m - n, m)
        count_at_query = count[:, :, a].gather(-1, qc[..., None])[..., 0]  # (B, H, N): own cluster, up to a_i
        count_at_key = count.gather(-1, kc[..., None])[..., 0]  # (B, H, M): own cluster, up to j
        same = (qc[..., :, None] == kc[..., None, :]) & keep[:, :, None, :]
        before = torch.arange(m)[None, :] <= a[:, None]
        recent = (count_at_query[..., :, None] - count_at_key[..., None, :]) < window
        allowed = same & before & recent
    else:
        sc = _cluster_key_scores(k, mu).masked_fill(~keep[:, :, None, :], float("-inf"))  # (B, H, C, M)
        j = torch.arange(m)
        better = (sc[..., None, :] > sc[..., :, None]) | ((sc[..., None, :] == sc[..., :, None]) & (j[None, :] < j[:, None]))
        rank = better.sum(-1)  # (B, H, C, M): keys strictly ahead of key j in cluster c's order
        kept = (rank < window) & keep[:, :, None, :]
        allowed = kept.gather(2, qc[..., None].expand(b, h, n, m))  # (B, H, N, M)
    return reference_attention(q, k, v, allowed, scale=scale)


@register(
    NAME,
    paper="Efficient Content-Based Sparse Attention with Routing Transformers",
    arxiv="2003.05997",
    family="sparse",
    capabilities={"noncausal_self", "causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="routing O(N C d), attention O(N window d) (+ O(M log M) sort)",
    functional=routing_attention,
    reference=routing_attention_reference,
    defaults={"num_clusters": 16, "window": 64, "ema_decay": 0.999, "seed": 0, "scale": None},
    summary="online k-means (EMA centroids) routes each query to keys of its cluster; a window of keys per cluster",
    deviations="causal window = the last `window` same-cluster keys (causal-safe routing); non-causal = balanced "
    "top-`window` keys per cluster; no shared QK / local heads; seeded centroid init; cosine assignment",
    test_config={"num_clusters": 4, "window": 8},
)
class RoutingAttention(AttentionModule):
    """Routing attention layer; centroids ``(H, C, D)`` are a buffer updated by online k-means in training.

    After a training-mode forward, ``aux_loss`` holds the paper's commitment term
    ``mean ||x~ - mu(x~)||^2`` over queries and keys (unweighted; add it to the task loss with a
    small weight, the reference code uses 1e-4). Decoding keeps a KV cache and the cluster ids of
    the cached keys.
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        mu = default_centroids(num_heads, s["num_clusters"], self.head_dim, s["seed"]).float()
        self.register_buffer("centroids", mu)
        self.aux_loss: Tensor | None = None

    def op_params(self):
        s = self.settings
        return {"num_clusters": s["num_clusters"], "window": s["window"], "centroids": self.centroids, "scale": s["scale"]}

    @torch.no_grad()
    def update_centroids(self, q: Tensor, k: Tensor) -> None:
        """The paper's online k-means step on a batch of queries and keys."""
        lam = self.settings["ema_decay"]
        c = self.settings["num_clusters"]
        mu = self.centroids
        tot = torch.zeros_like(mu)
        for x in (q, k):
            feats = route_features(x).to(mu.dtype)
            ids = assign_clusters(x, mu)
            onehot = F.one_hot(ids, c).to(mu.dtype)  # (B, H, N, C)
            tot += 0.5 * (1 - lam) * torch.einsum("bhnc,bhnd->hcd", onehot, feats)
        hit = tot.abs().sum(-1, keepdim=True) > 0
        self.centroids.copy_(torch.where(hit, lam * mu + tot, mu))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, cross: bool, key_padding_mask: Tensor | None) -> Tensor:
        out = super().attend(q, k, v, cross=cross, key_padding_mask=key_padding_mask)
        if self.training:
            with torch.no_grad():
                mu = self.centroids
                loss = q.new_zeros(())
                for x in (q, expand_kv(k, v, q.shape[1])[0]):
                    feats = route_features(x)
                    ids = assign_clusters(x, mu)
                    near = F.normalize(mu.to(x.dtype), dim=-1)[torch.arange(x.shape[1])[None, :, None], ids]
                    loss = loss + (F.normalize(feats, dim=-1) - near).square().sum(-1).mean()
            self.aux_loss = loss
            self.update_centroids(q.detach(), expand_kv(k, v, q.shape[1])[0].detach())
        return out

    # -- decoding ------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache(), "clusters": torch.zeros(batch_size, self.num_heads, 0, dtype=torch.long, device=device)}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError(f"{NAME}: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0], device=x.device) if state is None else state
        q, k, v = self.project(x, None)
        keys, values = state["kv"].append(k, v)
        kx = expand_kv(k, v, self.num_heads)[0]
        clusters = torch.cat([state["clusters"], assign_clusters(kx, self.centroids)], dim=2)
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        out = fn(q, keys, values, causal=True, cross=False, key_clusters=clusters, **self.op_params())
        return self.out_proj(merge_heads(out)), {"kv": state["kv"], "clusters": clusters}

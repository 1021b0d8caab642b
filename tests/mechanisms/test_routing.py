"""Routing attention (Routing Transformer, arXiv 2003.05997): fast == dense reference, routing rules,
online k-means, decoding, cost.

Tolerances: float64, 1e-10 (gathered vs dense masked softmax differ only in summation order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.routing import (
    assign_clusters,
    default_centroids,
    route_features,
    routing_attention,
    routing_attention_reference,
)

F64 = torch.float64
TOL = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkv(n, m, b=2, h=2, d=12, seed=0):
    return rand(b, h, n, d, seed=seed), rand(b, h, m, d, seed=seed + 1), rand(b, h, m, d, seed=seed + 2)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("clusters,window", [(4, 8), (3, 5)])
@pytest.mark.parametrize("causal,n,m", [(False, 1, 1), (False, 63, 63), (False, 257, 257), (True, 1, 1), (True, 63, 63), (True, 257, 257), (True, 5, 70)])
def test_fast_matches_reference(causal, n, m, clusters, window, masked):
    q, k, v = qkv(n, m)
    kw = dict(causal=causal, num_clusters=clusters, window=window)
    if masked:
        kpm = torch.zeros(2, m, dtype=torch.bool)
        kpm[0, m // 3 :: 2] = True
        kw["key_padding_mask"] = kpm
    assert (routing_attention(q, k, v, **kw) - routing_attention_reference(q, k, v, **kw)).abs().max().item() < TOL


@pytest.mark.parametrize("causal", [False, True])
def test_one_cluster_whole_window_is_softmax(causal):
    q, k, v = qkv(30, 30)
    out = routing_attention(q, k, v, causal=causal, num_clusters=1, window=30)
    assert (out - reference_attention(q, k, v, causal=causal)).abs().max().item() < TOL


def _weights(q, k, **kw):
    m = k.shape[2]
    eye = torch.eye(m, dtype=F64).expand(q.shape[0], q.shape[1], m, m)
    return routing_attention(q, k, eye, **kw)


def test_causal_window_is_the_most_recent_same_cluster_keys():
    c, w = 3, 4
    q, k, _ = qkv(40, 40, b=1, h=1)
    mu = default_centroids(1, c, 12, seed=0)
    p = _weights(q, k, causal=True, num_clusters=c, window=w)[0, 0]
    qc, kc = assign_clusters(q, mu)[0, 0], assign_clusters(k, mu)[0, 0]
    for i in range(40):
        same = [j for j in range(i + 1) if kc[j] == qc[i]]
        expect = same[-w:]
        support = (p[i] > 0).nonzero().flatten().tolist()
        assert support == expect
        assert abs(p[i].sum().item() - (1.0 if expect else 0.0)) < TOL  # convex combination, or 0 (unrouted)


def test_noncausal_window_is_balanced_top_w_per_cluster():
    c, w = 3, 6
    q, k, _ = qkv(30, 30, b=1, h=1)
    mu = default_centroids(1, c, 12, seed=0)
    p = _weights(q, k, causal=False, num_clusters=c, window=w)[0, 0]
    qc = assign_clusters(q, mu)[0, 0]
    cos = F.normalize(route_features(k), dim=-1)[0, 0] @ mu[0].T  # (M, C)
    for i in range(30):
        top = set(cos[:, qc[i]].topk(w).indices.tolist())
        assert set((p[i] > 0).nonzero().flatten().tolist()) == top
        assert abs(p[i].sum().item() - 1.0) < TOL


def test_causal_routing_never_looks_ahead():
    q, k, v = qkv(50, 50, b=1)
    kw = dict(causal=True, num_clusters=4, window=6)
    out = routing_attention(q, k, v, **kw)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 30:] = rand(1, 2, 20, 12, seed=9)
    k2[:, :, 30:] = rand(1, 2, 20, 12, seed=10)
    v2[:, :, 30:] += 5.0
    out2 = routing_attention(q2, k2, v2, **kw)
    assert (out[:, :, :30] - out2[:, :, :30]).abs().max().item() < TOL


def test_decode_matches_forward_and_caches_clusters():
    torch.manual_seed(0)
    layer = az.create("routing", 32, 2, causal=True, num_clusters=3, window=4).to(F64).eval()
    x = rand(2, 25, 32, seed=3)
    with torch.no_grad():
        full = layer(x)
        y, state = layer.prefill(x[:, :9])
        outs = [y]
        for t in range(9, 25):
            yt, state = layer.step(x[:, t], state)
            outs.append(yt[:, None])
    assert (torch.cat(outs, 1) - full).abs().max().item() < TOL
    k = layer.k_proj(x).view(2, 25, 2, 16).transpose(1, 2)
    assert torch.equal(state["clusters"], assign_clusters(k, layer.centroids))


def test_online_kmeans_update_follows_the_paper_formula():
    layer = az.create("routing", 32, 2, num_clusters=3, window=4, ema_decay=0.9).double()
    x = rand(2, 20, 32, seed=4)
    before = layer.centroids.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.centroids, before)  # eval mode: no update
    layer.train()
    layer(x)
    q = layer.q_proj(x).view(2, 20, 2, 16).transpose(1, 2)
    k = layer.k_proj(x).view(2, 20, 2, 16).transpose(1, 2)
    expect = before.clone()
    for h in range(2):
        for c in range(3):
            tot = torch.zeros(16, dtype=F64)
            for t in (q, k):
                ids = assign_clusters(t, before)[:, h]
                tot += 0.5 * 0.1 * route_features(t)[:, h][ids == c].sum(0)
            if tot.abs().sum() > 0:
                expect[h, c] = 0.9 * before[h, c] + tot
    assert (layer.centroids - expect).abs().max().item() < TOL
    assert layer.aux_loss is not None and torch.isfinite(layer.aux_loss)


def test_deterministic_given_the_seed():
    q, k, v = qkv(33, 33)
    a = routing_attention(q, k, v, num_clusters=4, window=5, seed=3)
    assert torch.equal(a, routing_attention(q, k, v, num_clusters=4, window=5, seed=3))
    assert (a - routing_attention(q, k, v, num_clusters=4, window=5, seed=4)).abs().max() > 1e-3


def test_backward_runs_through_the_fast_form():
    for causal in (False, True):
        q, k, v = (t.float().requires_grad_(True) for t in qkv(45, 45))
        routing_attention(q, k, v, causal=causal, num_clusters=3, window=8).square().sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_cost_counts():
    """FLOPs = routing 4 N C d (queries and keys against C centroids) + attention 4 N w d: linear in N."""
    d, c, w = 16, 8, 32
    for causal in (False, True):
        for n in (512, 1024, 2048):
            q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
            with FlopCounterMode(display=False) as fc:
                routing_attention(q, k, v, causal=causal, num_clusters=c, window=w)
            assert fc.get_total_flops() == 4 * n * c * d + 4 * n * w * d

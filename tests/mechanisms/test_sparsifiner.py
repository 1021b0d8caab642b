"""Sparsifiner (arXiv 2303.13755): fast == dense reference, mask properties, predictor training, cost.

Tolerances: float64, 1e-10 (gathered vs dense masked softmax differ only in summation order).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.sparsifiner import (
    approximate_attention,
    default_predictor,
    sparsifiner_attention,
    sparsifiner_attention_reference,
)

F64 = torch.float64
TOL = 1e-10
SMALL = dict(num_basis=8, max_len=300)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkv(n, b=2, h=2, d=12, seed=0):
    return tuple(rand(b, h, n, d, seed=seed + i) for i in range(3))


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("keep_rate,coef_topk", [(0.25, 8), (0.5, 0)])
@pytest.mark.parametrize("n", [1, 63])
def test_fast_matches_reference(n, keep_rate, coef_topk, masked, cls_token):
    q, k, v = qkv(n)
    kw = dict(keep_rate=keep_rate, coef_topk=coef_topk, cls_token=cls_token, **SMALL)
    if masked:
        kpm = torch.zeros(2, n, dtype=torch.bool)
        kpm[0, n // 3 :: 2] = True
        kw["key_padding_mask"] = kpm
    a = sparsifiner_attention(q, k, v, **kw)
    b = sparsifiner_attention_reference(q, k, v, **kw)
    assert (a - b).abs().max().item() < TOL


def test_fast_matches_reference_long():
    q, k, v = qkv(257)
    kpm = torch.zeros(2, 257, dtype=torch.bool)
    kpm[1, 100::3] = True
    kw = dict(keep_rate=0.25, cls_token=True, key_padding_mask=kpm, **SMALL)
    assert (sparsifiner_attention(q, k, v, **kw) - sparsifiner_attention_reference(q, k, v, **kw)).abs().max().item() < TOL


def test_keep_rate_one_is_dense_attention():
    q, k, v = qkv(40)
    assert (sparsifiner_attention(q, k, v, keep_rate=1.0) - reference_attention(q, k, v)).abs().max().item() < TOL


def test_every_row_keeps_exactly_k_keys_and_cls_keeps_all():
    n, rate = 37, 0.25
    q, k, _ = qkv(n, b=1, h=2)
    eye = torch.eye(n, dtype=F64).expand(1, 2, n, n)
    p = sparsifiner_attention(q, k, eye, keep_rate=rate, cls_token=True, **SMALL)
    kk = math.ceil(rate * n)
    support = (p > 0).sum(-1)
    assert (support[..., 1:] == kk).all() and (support[..., 0] == n).all()
    assert torch.allclose(p.sum(-1), torch.ones(1, 2, n, dtype=F64), atol=TOL, rtol=0)
    # the kept keys are the top-K of the predictor's A^
    approx = approximate_attention(q, k, default_predictor(12, **SMALL))
    top = approx.topk(kk, dim=-1).indices
    assert torch.equal(torch.zeros_like(p).scatter(-1, top, 1.0)[..., 1:, :].bool(), (p > 0)[..., 1:, :])


def test_coefficients_are_convex_and_basis_thresholded():
    q, k, _ = qkv(20, b=1, h=1)
    pred = default_predictor(12, **SMALL)
    pred["proj_back"] = torch.full_like(pred["proj_back"], 0.01)  # every |P_back| entry <= tau = 0.02
    assert approximate_attention(q, k, pred).abs().max().item() == 0.0
    pred["proj_back"] = torch.ones_like(pred["proj_back"])  # Bs all ones: A^ rows = sum of Cf = 1
    approx = approximate_attention(q, k, pred, coef_topk=0)
    assert torch.allclose(approx, torch.ones_like(approx), atol=TOL, rtol=0)


def test_ties_broken_toward_the_lower_index():
    q, k, v = qkv(16, b=1, h=1)
    pred = default_predictor(12, **SMALL)
    pred["proj_back"] = torch.ones_like(pred["proj_back"])
    pred["wq"], pred["bq"] = torch.zeros_like(pred["wq"]), torch.zeros_like(pred["bq"])
    # q~ = 0: Cf = 1/R exactly, so A^ = 1 exactly for every key (a true tie whatever the BLAS order)
    eye = torch.eye(16, dtype=F64)[None, None]
    p = sparsifiner_attention(q, k, eye, keep_rate=0.25, predictor=pred)
    assert ((p > 0) == (torch.arange(16) < 4)).all()
    a = sparsifiner_attention(q, k, v, keep_rate=0.25, predictor=pred)
    assert (a - sparsifiner_attention_reference(q, k, v, keep_rate=0.25, predictor=pred)).abs().max() < TOL


def test_predictor_trains_through_the_attached_reconstruction_loss():
    torch.manual_seed(0)
    layer = az.create("sparsifiner", 32, 2, num_basis=8, max_len=64, keep_rate=0.5).double()
    x = rand(2, 30, 32, seed=3)
    layer.train()
    y = layer(x)
    assert torch.equal(y, layer.eval()(x))  # the attachment leaves the output unchanged
    layer.train()
    layer.zero_grad()
    layer(x).sum().backward()
    assert layer.proj.grad is not None and layer.proj.grad.abs().sum() > 0
    # the gradient is that of output.sum() + reconstruction loss
    g_attached = layer.proj_back.grad.clone()
    layer.zero_grad()
    layer.reconstruction_loss(x).backward()
    assert (g_attached - layer.proj_back.grad).abs().max().item() < TOL
    # minimising it brings A^ closer to dense attention
    opt = torch.optim.Adam([layer.proj, layer.proj_back, *layer.pred_q.parameters(), *layer.pred_k.parameters()], lr=1e-2)
    first = layer.reconstruction_loss(x).item()
    for _ in range(30):
        opt.zero_grad()
        layer.reconstruction_loss(x).backward()
        opt.step()
    assert layer.reconstruction_loss(x).item() < 0.5 * first
    # weight 0: the predictor gets no gradient from the output
    off = az.create("sparsifiner", 32, 2, num_basis=8, max_len=64, reconstruction_weight=0.0).double().train()
    off(x).sum().backward()
    assert off.proj.grad is None


def test_spatial_is_row_major_flattening():
    layer = az.create("sparsifiner", 32, 2, num_basis=8, max_len=64).double().eval()
    x = rand(2, 5, 7, 32, seed=2)
    assert (layer(x) - layer(x.reshape(2, 35, 32)).view(2, 5, 7, 32)).abs().max().item() < TOL


def test_backward_runs_through_the_fast_form():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(45))
    sparsifiner_attention(q, k, v, keep_rate=0.3, **SMALL).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_cost_counts():
    """FLOPs = predictor (4 N d d' + 4 N d' R + 2 N R M) + attention 4 N K d with K = keep_rate M.

    The attention part scales with N K; the predictor's A^ = Cf Bs is N x M (dense, as in the paper)."""
    d, r, rate = 16, 8, 0.125
    dr = d // 2
    for n in (256, 512, 1024):
        q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            sparsifiner_attention(q, k, v, keep_rate=rate, num_basis=r, max_len=1024)
        kk = math.ceil(rate * n)
        assert fc.get_total_flops() == 4 * n * d * dr + 4 * n * dr * r + 2 * n * r * n + 4 * n * kk * d
        assert fc.get_total_flops() < 0.45 * 4 * n * n * d  # -> R / 2d + keep_rate = 0.375 of dense

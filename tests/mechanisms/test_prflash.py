"""PrFlashAttention (arXiv 2410.18441, best reading): fast == dense reference, tile law, seeding,
RoPE + harmonic ALiBi, cost.

Tolerances: float64, 1e-10 (tile gather vs dense masked softmax differ only in summation order);
the empirical keep frequency is checked within 4 binomial standard deviations.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.positional import apply_rope
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.prflash import (
    harmonic_slopes,
    participation_probability,
    prflash_attention,
    prflash_attention_reference,
    tile_mask,
)

F64 = torch.float64
TOL = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def qkv(n, m, b=2, h=2, d=12, seed=0):
    return rand(b, h, n, d, seed=seed), rand(b, h, m, d, seed=seed + 1), rand(b, h, m, d, seed=seed + 2)


@pytest.mark.parametrize("positional", ["none", "rope_alibi"])
@pytest.mark.parametrize("block_size,alpha", [(8, 1.0), (5, 0.5)])
@pytest.mark.parametrize(
    "causal,n,m", [(True, 1, 1), (True, 63, 63), (True, 257, 257), (True, 5, 70), (False, 1, 1), (False, 63, 63), (False, 257, 257)]
)
def test_fast_matches_reference(causal, n, m, block_size, alpha, positional):
    q, k, v = qkv(n, m)
    kw = dict(causal=causal, block_size=block_size, alpha=alpha, positional=positional, seed=3)
    assert (prflash_attention(q, k, v, **kw) - prflash_attention_reference(q, k, v, **kw)).abs().max().item() < TOL


@pytest.mark.parametrize("causal", [True, False])
def test_certain_participation_is_exact_attention(causal):
    q, k, v = qkv(45, 45)
    out = prflash_attention(q, k, v, causal=causal, block_size=8, alpha=0.0)
    assert (out - reference_attention(q, k, v, causal=causal)).abs().max().item() < TOL
    out = prflash_attention(q, k, v, causal=causal, block_size=8, min_keep=100)
    assert (out - reference_attention(q, k, v, causal=causal)).abs().max().item() < TOL


def test_tile_mask_shape_and_law():
    nb = 12
    keep = tile_mask(3, torch.arange(nb), nb, causal=True, alpha=1.0, min_keep=1, seed=0)
    assert torch.equal(keep, keep & torch.tril(torch.ones(nb, nb, dtype=torch.bool)))  # lower triangle
    assert keep.diagonal(dim1=1, dim2=2).all()  # the diagonal tile always participates
    # empirical frequency of each distance over many heads == (1 + delta)^-1
    heads = 4000
    keep = tile_mask(heads, torch.tensor([8]), 9, causal=True, alpha=1.0, min_keep=1, seed=1)[:, 0]
    for delta in range(1, 9):
        p = participation_probability(torch.tensor(delta), 1.0, 1).item()
        freq = keep[:, 8 - delta].double().mean().item()
        assert abs(freq - p) < 4 * (p * (1 - p) / heads) ** 0.5


def test_deterministic_and_independent_of_length():
    q, k, v = qkv(100, 100)
    a = prflash_attention(q, k, v, block_size=8, seed=5)
    assert torch.equal(a, prflash_attention(q, k, v, block_size=8, seed=5))
    assert (a - prflash_attention(q, k, v, block_size=8, seed=6)).abs().max().item() > 1e-3
    # a tile's draw does not depend on the sequence length: a causal prefix gives the same rows
    short = prflash_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], block_size=8, seed=5)
    assert (short - a[:, :, :40]).abs().max().item() < TOL


def test_skipped_tiles_do_not_matter():
    b = 8
    q, k, v = qkv(64, 64, b=1, h=1)
    keep = tile_mask(1, torch.arange(8), 8, causal=True, alpha=1.0, min_keep=1, seed=2)[0]
    row = 7
    skipped = [j for j in range(8) if not keep[row, j]]
    assert skipped, "the draw should skip at least one tile of the last row"
    out = prflash_attention(q, k, v, block_size=b, seed=2)
    v2 = v.clone()
    for j in skipped:
        v2[:, :, j * b : (j + 1) * b] += 10.0
    out2 = prflash_attention(q, k, v2, block_size=b, seed=2)
    assert (out2[:, :, row * b :] - out[:, :, row * b :]).abs().max().item() < TOL


def test_rope_plus_harmonic_alibi():
    q, k, v = qkv(30, 30, h=4)
    assert torch.allclose(harmonic_slopes(4), torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=F64))
    out = prflash_attention(q, k, v, block_size=8, alpha=0.0, positional="rope_alibi", alibi_scale=0.5)
    i = torch.arange(30)
    bias = -0.5 * harmonic_slopes(4)[:, None, None] * (i[:, None] - i[None, :]).abs().double()
    expect = reference_attention(apply_rope(q), apply_rope(k), v, bias[None], causal=True)
    assert (out - expect).abs().max().item() < TOL
    # alibi_scale = 0 is plain RoPE (== the softmax mechanism with rope=True)
    out0 = prflash_attention(q, k, v, block_size=8, alpha=0.0, positional="rope_alibi", alibi_scale=0.0)
    assert (out0 - az.attention(q, k, v, "softmax", causal=True, rope=True)).abs().max().item() < TOL


def test_module_resample_rounds():
    layer = az.create("prflash", 32, 2, causal=True, block_size=4, resample=True).double()
    x = rand(2, 40, 32, seed=4)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert (layer(x) - layer(x)).abs().max().item() > 1e-6  # a new round, a new draw


def test_backward_runs_through_the_fast_form():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(45, 45))
    prflash_attention(q, k, v, block_size=8, positional="rope_alibi").square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_cost_counts():
    """FLOPs = 4 b^2 d * (#query blocks) * (most tiles kept in a row): the tile gather is padded to the
    fullest row, which grows like log(N / b) for the harmonic law; far below dense 4 N^2 d."""
    d, b = 16, 32
    for n in (1024, 4096):
        q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            prflash_attention(q, k, v, causal=True, block_size=b)
        nb = n // b
        kmax = int(tile_mask(1, torch.arange(nb), nb, causal=True, alpha=1.0, min_keep=1, seed=0).sum(-1).max())
        assert fc.get_total_flops() == 4 * b * b * d * nb * kmax
    assert fc.get_total_flops() < 0.1 * 4 * n * n * d  # 0.0625 at N = 4096

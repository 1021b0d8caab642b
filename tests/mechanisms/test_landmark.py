"""Landmark attention (arXiv 2305.16300): grouped softmax, retrieval, decoding, cost.

Tolerances: float64 throughout, 1e-10 (the forms differ only in summation order; values are O(1)).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.landmark import (
    insert_landmarks,
    landmark_attention,
    landmark_attention_reference,
    remove_landmarks,
)

F64 = torch.float64
TOL = 1e-10


def qkv(n, m, b=2, h=2, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, x, d, generator=g, dtype=F64) for x in (n, m, m))


@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("n,m", [(1, 1), (63, 63), (257, 257), (5, 70), (1, 64)])
def test_fast_matches_reference(n, m, top_k):
    q, k, v = qkv(n, m)
    a = landmark_attention(q, k, v, causal=True, block_size=7, top_k=top_k)
    b = landmark_attention_reference(q, k, v, causal=True, block_size=7, top_k=top_k)
    assert (a - b).abs().max().item() < TOL


def test_no_landmark_in_context_is_causal_softmax():
    q, k, v = qkv(40, 40)
    out = landmark_attention(q, k, v, causal=True, block_size=64)
    assert (out - reference_attention(q, k, v, causal=True)).abs().max().item() < TOL


def _probs(q, k, block_size, top_k=None):
    """The attention matrix, read off by attending to one-hot values."""
    m = k.shape[2]
    eye = torch.eye(m, dtype=F64).expand(q.shape[0], q.shape[1], m, m)
    return landmark_attention(q, k, eye, causal=True, block_size=block_size, top_k=top_k)


def test_rows_sum_to_one_landmarks_carry_no_mass_block_weights():
    bs, n = 5, 30
    p = bs + 1
    q, k, _ = qkv(n, n, b=1, h=1)
    probs = _probs(q, k, bs)[0, 0]
    assert torch.allclose(probs.sum(-1), torch.ones(n, dtype=F64), atol=TOL, rtol=0)
    lm_cols = torch.arange(p - 1, n, p)
    assert probs[:, lm_cols].abs().max().item() == 0.0
    assert torch.triu(probs, 1).abs().max().item() == 0.0  # causal
    # block weights = landmark probabilities: mass of block b for query i == exp(s_il_b) / Z_i
    s = (q[0, 0] @ k[0, 0].T) / q.shape[-1] ** 0.5
    i = n - 1  # last query, block 4; blocks 0..3 complete
    cur = [j for j in range(4 * p, i + 1) if j % p != p - 1]
    logits = torch.cat([s[i, lm_cols[:4]], s[i, cur]])
    g = torch.softmax(logits, 0)[:4]
    mass = torch.stack([probs[i, b * p : b * p + p - 1].sum() for b in range(4)])
    assert (mass - g).abs().max().item() < TOL


def test_retrieval_with_enough_blocks_equals_training_form():
    q, k, v = qkv(70, 70)
    full = landmark_attention(q, k, v, causal=True, block_size=7)
    assert (landmark_attention(q, k, v, causal=True, block_size=7, top_k=9) - full).abs().max().item() < TOL
    # and fewer blocks is a different (sparser) computation
    assert (landmark_attention(q, k, v, causal=True, block_size=7, top_k=1) - full).abs().max().item() > 1e-3


def test_retrieval_ignores_unselected_blocks():
    bs, p, n = 7, 8, 48  # 5 complete blocks before the last query block
    q, k, v = qkv(n, n, b=1, h=1, d=16)
    k = k * 0.1
    k[0, 0, 2 * p + p - 1] = 5.0 * q[0, 0, -1]  # block 2's landmark matches the last query
    out = landmark_attention(q, k, v, causal=True, block_size=bs, top_k=1)
    v2 = v.clone()
    v2[0, 0, 0 : 2 * p] += 10.0  # blocks 0 and 1 are not retrieved by the last query
    out2 = landmark_attention(q, k, v2, causal=True, block_size=bs, top_k=1)
    assert (out[..., -1, :] - out2[..., -1, :]).abs().max().item() < TOL
    v3 = v.clone()
    v3[0, 0, 2 * p] += 10.0  # block 2 is
    out3 = landmark_attention(q, k, v3, causal=True, block_size=bs, top_k=1)
    assert (out[..., -1, :] - out3[..., -1, :]).abs().max().item() > 1e-3


def test_ties_go_to_the_earlier_block():
    bs, p = 3, 4
    n = 4 * p
    q, k, v = qkv(n, n, b=1, h=1)
    k[0, 0, p - 1] = k[0, 0, 2 * p - 1]  # blocks 0 and 1 have identical landmark keys
    k[0, 0, 2 * p + p - 1] = -100 * q[0, 0, -1]  # block 2 is never chosen by the last query
    k[0, 0, p - 1] = k[0, 0, 2 * p - 1] = 100 * q[0, 0, -1] / q[0, 0, -1].norm() ** 2
    a = landmark_attention(q, k, v, causal=True, block_size=bs, top_k=1)
    b = landmark_attention_reference(q, k, v, causal=True, block_size=bs, top_k=1)
    assert (a - b).abs().max().item() < TOL
    v2 = v.clone()
    v2[0, 0, p : 2 * p - 1] += 10.0  # block 1 (the later of the tied pair) is not used
    assert (landmark_attention(q, k, v2, causal=True, block_size=bs, top_k=1) - a)[..., -1, :].abs().max() < TOL


@pytest.mark.parametrize("top_k", [None, 2])
def test_decode_matches_forward(top_k):
    torch.manual_seed(0)
    layer = az.create("landmark", 32, 2, causal=True, block_size=4, top_k=top_k).to(F64).eval()
    x = torch.randn(2, 31, 32, dtype=F64)
    with torch.no_grad():
        full = layer(x)
        y, state = layer.prefill(x[:, :7])
        outs = [y]
        for t in range(7, 31):
            yt, state = layer.step(x[:, t], state)
            outs.append(yt[:, None])
    assert (torch.cat(outs, 1) - full).abs().max().item() < TOL
    assert len(state["kv"]) == 31


def test_insert_and_remove_landmarks():
    x = torch.randn(2, 11, 4)
    lm = torch.full((4,), 7.0)
    y = insert_landmarks(x, lm, 3)
    assert y.shape == (2, 14, 4)
    assert (y[:, 3] == 7.0).all() and (y[:, 7] == 7.0).all() and (y[:, 11] == 7.0).all()
    assert torch.equal(remove_landmarks(y, 3), x)


def test_backward_runs_through_the_fast_form():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(45, 45))
    landmark_attention(q, k, v, causal=True, block_size=6, top_k=2).square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_retrieval_cost_counts():
    """FLOPs with top_k are exactly 2 N d (#blocks + 2k(P-1) + k + 2P): linear in N for the
    gathered part, N * M / P for the landmark scores; far below dense 4 N^2 d."""
    d, bs, top_k = 16, 15, 2
    p = bs + 1
    for n in (512, 1024, 2048):
        q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            landmark_attention(q, k, v, causal=True, block_size=bs, top_k=top_k)
        expected = 2 * n * d * (n // p + 2 * top_k * (p - 1) + top_k + 2 * p)
        assert fc.get_total_flops() == expected
        assert fc.get_total_flops() < 0.15 * 4 * n * n * d  # 0.12 at N=512, 0.05 at N=2048


def test_only_causal_self():
    q, k, v = qkv(8, 8)
    with pytest.raises(az.UnsupportedError):
        az.attention(q, k, v, "landmark", causal=False)
    with pytest.raises(ValueError):
        landmark_attention(q, k, v, causal=False)

"""Mask functions, their dense and FlexAttention forms; RoPE and ALiBi properties."""

from __future__ import annotations

import pytest
import torch

from attnzoo.core import masks
from attnzoo.core.positional import alibi_bias, alibi_slopes, apply_rope


def brute(fn, n, m):
    return torch.tensor([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(m)] for i in range(n)])


@pytest.mark.parametrize(
    "fn,rule",
    [
        (masks.causal(), lambda i, j: j <= i),
        (masks.causal(offset=3), lambda i, j: j <= i + 3),
        (masks.sliding_window(3, causal=True), lambda i, j: 0 <= i - j < 3),
        (masks.sliding_window(3, causal=False), lambda i, j: abs(i - j) < 3),
        (masks.block_diagonal(4), lambda i, j: i // 4 == j // 4),
        (masks.strided(3), lambda i, j: (i - j) % 3 == 0),
        (masks.and_masks(masks.causal(), masks.strided(2)), lambda i, j: j <= i and (i - j) % 2 == 0),
        (masks.or_masks(masks.block_diagonal(3), masks.sliding_window(2, causal=False)), lambda i, j: i // 3 == j // 3 or abs(i - j) < 2),
    ],
)
def test_dense_mask_follows_the_rule(fn, rule):
    n, m = 11, 13
    expected = torch.tensor([[rule(i, j) for j in range(m)] for i in range(n)])
    assert torch.equal(masks.dense_mask(fn, n, m), expected)
    assert torch.equal(brute(fn, n, m), expected)


def test_bad_window_and_empty_combinators():
    with pytest.raises(ValueError):
        masks.sliding_window(0)
    with pytest.raises(ValueError):
        masks.and_masks()


def test_block_mask_matches_dense():
    bm = masks.block_mask(masks.sliding_window(40, causal=True), 300, 300, block_size=128)
    dense = masks.dense_mask(masks.sliding_window(40, causal=True), 300, 300)
    # every (q block, kv block) pair with an allowed entry must be present in the block mask
    blocks = dense.reshape(1, 1, 300, 300)
    assert bm.shape[-2:] == (300, 300)
    assert torch.equal(bm.to_dense()[0, 0].bool().any(), blocks.any())
    need = torch.zeros(3, 3, dtype=torch.bool)
    for qi in range(3):
        for ki in range(3):
            need[qi, ki] = dense[qi * 128 : (qi + 1) * 128, ki * 128 : (ki + 1) * 128].any()
    assert torch.equal(bm.to_dense()[0, 0].bool(), need)


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    s = [float(apply_rope(q, offset=p + 5) @ apply_rope(k, offset=p).transpose(-1, -2)) for p in (0, 17, 400)]
    assert max(s) - min(s) < 1e-10
    assert abs(float(apply_rope(q, offset=9) @ apply_rope(k, offset=0).transpose(-1, -2)) - s[0]) > 1e-6
    assert torch.allclose(apply_rope(q, offset=0), q)  # position 0 is the identity
    assert torch.allclose(apply_rope(q, offset=33).norm(), q.norm())  # a rotation keeps norms
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(1, 1, 2, 5))


def test_alibi_slopes_and_bias():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    s12 = alibi_slopes(12)  # not a power of two: 8 geometric slopes + 4 interleaved from the 16-head series
    assert len(s12) == 12 and torch.allclose(s12[:8], alibi_slopes(8))
    assert torch.allclose(s12[8:], torch.tensor([2 ** -(0.5 + i) for i in range(4)], dtype=torch.float64))
    b = alibi_bias(alibi_slopes(2), 3, 3)
    assert b.shape == (2, 3, 3)
    assert torch.allclose(b[0], -0.0625 * torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]]))


def test_flop_counter_sees_cpu_sdpa():
    import torch.nn.functional as F

    from attnzoo.core.flops import count_flops

    q = k = v = torch.randn(2, 4, 256, 32)
    expected = 4 * 2 * 4 * 256 * 256 * 32  # QK^T and PV
    assert count_flops(F.scaled_dot_product_attention, q, k, v) == expected
    causal = count_flops(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    assert causal == int(expected * (256 * 257 / 2) / 256**2)  # the kept lower triangle
    manual = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # noqa: E731
    assert count_flops(manual, q, k, v) == expected
    qg = q.clone().requires_grad_(True)
    assert count_flops(F.scaled_dot_product_attention, qg, k, v, backward=True) == int(3.5 * expected)

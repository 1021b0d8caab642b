"""ConViT GPSA: fast == reference, the gate limits, the locality initialisation.

Tolerances: float64 comparisons use 1e-10 (same maths, different summation order / fused kernel).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.layout import merge_heads
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.vision.gpsa import (
    gpsa_attention,
    gpsa_attention_reference,
    head_offsets,
    local_init_weights,
    relative_encoding,
)

F64 = torch.float64
TOL = 1e-10


def _qkv(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1), (1, 63)])
def test_fast_matches_reference_with_learned_tensors(grid):
    n = grid[0] * grid[1]
    q, k, v = _qkv(2, 3, n, 60)
    pw = torch.randn(3, 3, dtype=F64)
    gate = torch.tensor([-2.0, 0.3, 4.0], dtype=F64)
    fast = gpsa_attention(q, k, v, grid=grid, pos_weight=pw, gate=gate)
    ref = gpsa_attention_reference(q, k, v, grid=grid, pos_weight=pw, gate=gate)
    assert fast.shape == q.shape
    assert (fast - ref).abs().max() < TOL


def test_gate_fully_on_content_is_softmax_attention():
    """sigmoid(lambda) = 0 (lambda = -inf): GPSA == softmax self-attention, module and functional."""
    q, k, v = _qkv(2, 4, 30, 16)
    gate = torch.full((4,), float("-inf"), dtype=F64)
    out = gpsa_attention(q, k, v, grid=(5, 6), gate=gate)
    assert (out - reference_attention(q, k, v)).abs().max() < TOL
    torch.manual_seed(0)
    m = az.create("gpsa", 64, 4).to(F64).eval()
    with torch.no_grad():
        m.gating_param.fill_(float("-inf"))
        x = torch.randn(2, 5, 6, 64, dtype=F64)
        t = x.reshape(2, 30, 64)
        qq, kk, vv = m.project(t, None)
        expected = m.out_proj(merge_heads(az.attention(qq, kk, vv, "softmax"))).view(2, 5, 6, 64)
        assert (m(x) - expected).abs().max() < TOL
        m.impl = "reference"
        assert (m(x) - expected).abs().max() < TOL


def test_gate_fully_on_position_ignores_content():
    """sigmoid(lambda) = 1: the output does not depend on q and k."""
    q, k, v = _qkv(1, 2, 20, 8)
    gate = torch.full((2,), float("inf"), dtype=F64)
    a = gpsa_attention(q, k, v, grid=(4, 5), gate=gate)
    b = gpsa_attention(q * 3 + 1, -k, v, grid=(4, 5), gate=gate)
    assert (a - b).abs().max() < TOL
    c = gpsa_attention(q, k, v, grid=(4, 5))  # default gate 1: content matters
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("gate", [-3.0, 0.0, 1.0, 5.0])
def test_rows_sum_to_one(gate):
    """With all-ones values the output is the row sums of A, i.e. ones, for any lambda."""
    q, k, _ = _qkv(1, 4, 35, 6)
    v = torch.ones_like(q)
    g = torch.full((4,), gate, dtype=F64)
    for fn in (gpsa_attention, gpsa_attention_reference):
        assert (fn(q, k, v, grid=(5, 7), gate=g) - 1).abs().max() < TOL


def test_locality_init_peaks_at_head_offsets():
    """9 heads: the positional attention of head p peaks exactly at query + Delta_p (a 3 x 3 conv)."""
    m = az.create("gpsa", 36, 9, locality_strength=2.0)
    off = head_offsets(9)
    assert sorted(map(tuple, off.tolist())) == [(dx, dy) for dx in (-1.0, 0.0, 1.0) for dy in (-1.0, 0.0, 1.0)]
    hh, ww = 7, 9
    a_pos = m.positional_attention((hh, ww)).detach()  # (9, N, N)
    for y in range(1, hh - 1):
        for x in range(1, ww - 1):
            i = y * ww + x
            for p in range(9):
                dx, dy = int(off[p, 0]), int(off[p, 1])
                assert int(a_pos[p, i].argmax()) == (y + dy) * ww + (x + dx)
    # the logit is -alpha |delta - Delta|^2 + const: the peak weight grows with alpha
    weak = az.create("gpsa", 36, 9, locality_strength=0.5).positional_attention((hh, ww)).detach()
    assert a_pos[4, 4 * ww + 4].max() > weak[4, 4 * ww + 4].max() + 0.1


def test_locality_init_weights_and_identity_values():
    w = local_init_weights(9, 1.5)
    assert torch.equal(w[:, 2], torch.full((9,), -1.5, dtype=F64))
    m = az.create("gpsa", 36, 9)
    assert torch.equal(m.v_proj.weight.detach(), torch.eye(36))
    assert torch.allclose(torch.sigmoid(m.gating_param.detach()), torch.full((9,), 0.7310585786))
    plain = az.create("gpsa", 36, 9, use_local_init=False)
    assert not torch.equal(plain.v_proj.weight.detach(), torch.eye(36))


def test_relative_encoding_symmetry():
    r = relative_encoding(4, 6, dtype=F64)
    assert torch.equal(r[..., 2], r[..., 2].T)
    assert torch.equal(r[..., :2], -r.transpose(0, 1)[..., :2])
    # token (row 1, col 2) -> token (row 3, col 0): dx = -2, dy = 2
    assert r[1 * 6 + 2, 3 * 6 + 0].tolist() == [-2.0, 2.0, 8.0]


def test_sequence_is_a_one_row_grid():
    torch.manual_seed(0)
    m = az.create("gpsa", 32, 4).to(F64).eval()
    x = torch.randn(2, 13, 32, dtype=F64)
    with torch.no_grad():
        assert (m(x) - m(x[:, None]).squeeze(1)).abs().max() < TOL


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
def test_grid_shapes_and_gradients(grid):
    m = az.create("gpsa", 32, 4)
    x = torch.randn(2, *grid, 32)
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    assert m.gating_param.grad is not None and m.pos_proj.weight.grad is not None
    assert torch.isfinite(m.gating_param.grad).all()


def test_bad_grid():
    q, k, v = _qkv(1, 1, 10, 4)
    with pytest.raises(ValueError):
        gpsa_attention(q, k, v, grid=(3, 3))
    with pytest.raises(az.UnsupportedError):
        gpsa_attention(q, k, v, causal=True)

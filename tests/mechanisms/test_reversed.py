"""DependencyViT reversed attention, message controller and the induced dependency forest.

Tolerances: float64 comparisons use 1e-10 (same maths, different summation order).
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.mechanisms.vision.reversed import (
    induce_forest,
    reversed_attention,
    reversed_attention_maps,
    reversed_attention_reference,
    tree_depth,
)

F64 = torch.float64
TOL = 1e-10


def _qkv(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))


@pytest.mark.parametrize("n", [1, 63, 257])
def test_fast_matches_reference_with_gates_and_padding(n):
    q, k, v = _qkv(2, 3, n, 60)
    p = torch.softmax(torch.randn(2, n, 3, dtype=F64), -1)
    m = torch.rand(2, n, dtype=F64)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 2 + 1 :] = True
    for kw in ({}, {"head_weights": p, "controller": m}, {"head_weights": p, "controller": m, "key_padding_mask": mask}):
        fast = reversed_attention(q, k, v, **kw)
        ref = reversed_attention_reference(q, k, v, **kw)
        assert (fast - ref).abs().max() < TOL


def test_message_conservation():
    """P = 1, M = 1: each child's message is split over parents with weights summing to 1, so the sum
    of all outputs equals the sum of all values (standard attention does not conserve this)."""
    q, k, v = _qkv(2, 2, 40, 8)
    out = reversed_attention(q, k, v)
    assert (out.sum(2) - v.sum(2)).abs().max() < TOL
    a_r = reversed_attention_maps(q, k)
    assert (a_r.sum(dim=2) - 1).abs().max() < TOL  # columns (children) sum to 1
    std = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    assert (std.sum(2) - v.sum(2)).abs().max() > 1e-3


def test_closed_controller_silences_a_token():
    """M_j = 0: token j's value reaches no output."""
    q, k, v = _qkv(1, 2, 12, 6)
    v = v.clone().requires_grad_(True)
    m = torch.ones(1, 12, dtype=F64)
    m[0, 5] = 0.0
    out = reversed_attention(q, k, v, controller=m)
    (g,) = torch.autograd.grad(out.sum(), v)
    assert g[0, :, 5].abs().max() == 0 and g[0, :, 4].abs().max() > 0


def test_gates_and_cumulative_controller():
    torch.manual_seed(0)
    mod = az.create("reversed", 32, 4).to(F64)
    x = torch.randn(2, 5, 6, 32, dtype=F64)
    t = x.reshape(2, 30, 32)
    p, m1 = mod.gates(t)
    assert (p.sum(-1) - 1).abs().max() < TOL and (p >= 0).all()
    assert ((m1 > 0) & (m1 < 1)).all()
    prev = torch.rand(2, 30, dtype=F64)
    _, m2 = mod.gates(t, prev)
    assert (m2 - m1 * prev).abs().max() < TOL
    y, mc = mod.forward_with_controller(x, prev)
    assert y.shape == x.shape and (mc - m2).abs().max() < TOL
    with torch.no_grad():
        assert (mod.forward_with_controller(x)[0] - mod(x)).abs().max() < TOL


def _is_forest(parent: torch.Tensor) -> bool:
    n = parent.shape[-1]
    for row in parent.tolist():
        for start in range(n):
            j, steps = start, 0
            while row[j] != j:
                j = row[j]
                steps += 1
                if steps > n:
                    return False
    return True


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dependency_tree_is_a_forest(grid, seed):
    torch.manual_seed(seed)
    mod = az.create("reversed", 32, 4).to(F64)
    x = torch.randn(2, *grid, 32, dtype=F64)
    tree = mod.dependency_tree(x)
    n = grid[0] * grid[1]
    assert tree.parent.shape == (2, n) and tree.parent.dtype == torch.long
    assert tree.grid == grid
    assert ((tree.parent >= 0) & (tree.parent < n)).all()
    assert _is_forest(tree.parent)
    assert tree.is_root.any(dim=1).all()  # every forest has a root
    assert torch.equal(tree.is_root, tree.depth == 0)
    # a non-root's parent is one level up
    nonroot = ~tree.is_root
    assert torch.equal(tree.depth[nonroot], (tree.depth.gather(1, tree.parent) + 1)[nonroot])
    # the dependency mask is A_M = sum_h A_R: every column sums to sum_h P[j, h] M_j = M_j
    assert (tree.dependency_mask.sum(1) - tree.controller).abs().max() < 1e-9
    # parents are the argmax of A_M wherever no cycle had to be broken
    argmax = tree.dependency_mask.argmax(dim=1)
    kept = tree.parent == argmax
    assert kept.float().mean() > 0.5
    assert torch.equal(tree.received, tree.dependency_mask.sum(-1))


def test_cycle_breaking_at_weakest_edge():
    # children 0 and 1 pick each other (a 2-cycle), 2 -> 0, 3 -> 3 (root)
    am = torch.zeros(1, 4, 4, dtype=F64)
    am[0, 1, 0] = 0.9  # parent 1 of child 0 (strong)
    am[0, 0, 1] = 0.6  # parent 0 of child 1 (weaker)
    am[0, 0, 2] = 0.8
    am[0, 3, 3] = 0.7
    raw = am.argmax(1)
    assert raw.tolist() == [[1, 0, 0, 3]]
    parent = induce_forest(am)
    assert parent.tolist() == [[1, 1, 0, 3]]  # the weaker edge 1 -> 0 is cut: 1 becomes a root
    assert tree_depth(parent).tolist() == [[1, 0, 2, 0]]
    with pytest.raises(ValueError):
        tree_depth(raw)
    # a closed controller makes a token a root when root_threshold is set
    ctrl = torch.tensor([[1.0, 1.0, 0.01, 1.0]], dtype=F64)
    assert induce_forest(am, ctrl, root_threshold=0.1).tolist() == [[1, 1, 2, 3]]


def test_module_sequence_and_padding():
    torch.manual_seed(0)
    mod = az.create("reversed", 24, 2).to(F64).eval()
    x = torch.randn(2, 10, 24, dtype=F64)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[:, 10:] = True
    xp = torch.cat([x, 5 * torch.randn(2, 3, 24, dtype=F64)], 1)
    with torch.no_grad():
        assert (mod(xp, key_padding_mask=mask)[:, :10] - mod(x)).abs().max() < TOL


@pytest.mark.parametrize("grid", [(7, 9), (14, 14), (1, 1)])
def test_grid_shapes_and_gradients(grid):
    mod = az.create("reversed", 32, 4)
    x = torch.randn(2, *grid, 32)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    y.square().mean().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name

"""The dynamical-systems framework (arXiv 2405.15731): running h_i = A_i h_{i-1} + B_i u_i,
y_i = C_i h_i + D_i u_i with the matrices returned by ``attnzoo.dsf.dsf`` reproduces the mechanisms'
own outputs (linear, lightning, s6, aaren); the convolutional form agrees; the mappings have the
paper's structure.

Tolerances: float64, sums of O(1) terms in different orders, ~1e-14.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.dsf import DynamicalSystem, dsf, mixer_output, readout

F64 = torch.float64
TOL = 1e-11


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


CASES = [
    ("linear", {}),
    ("linear", {"eps": 1e-3}),
    ("lightning", {}),
    ("lightning", {"slopes": 0.0}),
    ("s6", {"d_state": 3}),
    ("aaren", {}),
]


def build(name, cfg):
    torch.manual_seed(0)
    return az.create(name, 8, 2, causal=True, **cfg).double().eval()


@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_recurrence_reproduces_the_mechanism(name, cfg):
    m = build(name, cfg)
    x = rand(2, 13, 8, seed=1)
    with torch.no_grad():
        system = dsf(m, x)
        y = system.run(x)
        torch.testing.assert_close(y, mixer_output(m, x), atol=TOL, rtol=0)
        torch.testing.assert_close(readout(m, x, y), m(x), atol=TOL, rtol=0)  # and the module output
        m.impl = "reference"
        torch.testing.assert_close(readout(m, x, y), m(x), atol=TOL, rtol=0)  # and its reference form
        torch.testing.assert_close(system.run_convolution(x), y, atol=TOL, rtol=0)


def test_linear_attention_normaliser_is_a_scalar_transition():
    """Lambda_i = (eta_{i-1} / eta_i) I per head: diagonal, constant within each head's block."""
    m = build("linear", {})
    x = rand(1, 6, 8, seed=2)
    with torch.no_grad():
        a = dsf(m, x).A  # (1, 6, 2*4*4, 2*4*4)
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    torch.testing.assert_close(a, torch.diag_embed(diag), atol=0, rtol=0)
    per_head = diag.view(1, 6, 2, 16)
    torch.testing.assert_close(per_head, per_head[..., :1].expand_as(per_head), atol=0, rtol=0)
    # and it is eta_{i-1} / eta_i with eta_i = phi(q_i) . sum_{j<=i} phi(k_j)
    phi = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
    with torch.no_grad():
        q = phi(m.q_proj(x).view(1, 6, 2, 4))
        k = phi(m.k_proj(x).view(1, 6, 2, 4))
    eta = (q * k.cumsum(1)).sum(-1)  # (1, 6, 2)
    torch.testing.assert_close(per_head[:, 1:, :, 0], eta[:, :-1] / eta[:, 1:], atol=1e-14, rtol=0)


def test_lightning_transition_is_the_constant_decay():
    m = build("lightning", {})
    with torch.no_grad():
        a = dsf(m, rand(1, 5, 8, seed=3)).A
    lam = torch.exp(-m.slope_rate.double())
    expect = torch.diag_embed(lam.repeat_interleave(16)).expand(1, 5, 32, 32)
    torch.testing.assert_close(a, expect, atol=1e-15, rtol=0)


def test_s6_transition_is_selective_and_diagonal():
    m = build("s6", {"d_state": 3})
    x = rand(1, 5, 8, seed=4)
    with torch.no_grad():
        s = dsf(m, x)
    diag = torch.diagonal(s.A, dim1=-2, dim2=-1)
    torch.testing.assert_close(s.A, torch.diag_embed(diag), atol=0, rtol=0)
    assert (diag > 0).all() and (diag < 1).all()  # exp(Delta A) with Delta > 0, A < 0
    assert not torch.allclose(diag[:, 0], diag[:, 1])  # input dependent ("selective")
    assert s.D.abs().sum() > 0  # the skip connection D u


def test_hand_built_system():
    """A scalar system h_i = a h_{i-1} + u_i, y_i = h_i: the run is the geometric sum."""
    n = 6
    one = torch.ones(1, n, 1, 1, dtype=F64)
    sysm = DynamicalSystem(0.5 * one, one, one, 0 * one)
    u = rand(1, n, 1, seed=5)
    expect = torch.stack([sum(0.5 ** (i - j) * u[0, j, 0] for j in range(i + 1)) for i in range(n)])
    torch.testing.assert_close(sysm.run(u)[0, :, 0], expect, atol=1e-14, rtol=0)
    torch.testing.assert_close(sysm.run_convolution(u), sysm.run(u), atol=1e-14, rtol=0)


def test_unsupported_cases_are_clear_errors():
    x = rand(1, 4, 8)
    with pytest.raises(ValueError, match="infinite"):
        dsf(az.create("softmax", 8, 2, causal=True).double(), x)
    with pytest.raises(ValueError, match="not linear"):
        dsf(build("lightning", {"variant": "tnl"}), x)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="bias"):
        dsf(az.create("linear", 8, 2, causal=True, qkv_bias=True).double(), x)
    with pytest.raises(ValueError, match="causal"):
        dsf(az.create("linear", 8, 2, causal=False).double(), x)

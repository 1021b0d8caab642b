"""Flow-Attention (Flowformer, arXiv 2202.06258): conservation properties, permutation equivariance,
causal O(1)-state recurrence == cumulative-sum reference == chunked form, CAB causal cross, linear cost.

Tolerances: float64; ~1e-13 between reorderings of the same sums.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.mechanisms.linear.flow import (
    flow_attention,
    flow_attention_reference,
    flow_causal_chunked,
    flow_causal_init,
    flow_causal_step,
    noncausal_flows,
)

from .test_scan import assert_linear

F64 = torch.float64
TOL = 1e-11


def rand(*s, seed=0):
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("n", [1, 37, 70])
def test_fast_equals_reference_all_patterns(causal, cross, n):
    m = n + 9 if cross else n
    q, k, v = rand(2, 2, n, 60, seed=1), rand(2, 2, m, 60, seed=2), rand(2, 2, m, 60, seed=3)
    mask = torch.zeros(2, m, dtype=torch.bool)
    mask[1, m // 3 :: 2] = True
    for kpm in (None, mask):
        kw = dict(causal=causal, cross=cross, key_padding_mask=kpm)
        torch.testing.assert_close(flow_attention(q, k, v, chunk=16, **kw), flow_attention_reference(q, k, v, **kw), atol=TOL, rtol=0)


def test_competition_sums_to_m_and_allocation_in_unit_interval():
    q, k = rand(2, 3, 25, 8, seed=1), rand(2, 3, 40, 8, seed=2)
    kval = torch.ones(2, 1, 40, 1, dtype=F64)
    f = noncausal_flows(torch.sigmoid(q), torch.sigmoid(k), kval, None, 1e-6, 1.0)
    torch.testing.assert_close(f["competition"].sum(-1), torch.full((2, 3), 40.0, dtype=F64), atol=1e-12, rtol=0)
    assert ((f["allocation"] > 0) & (f["allocation"] < 1)).all()
    assert (f["conserved_outgoing"] <= 1.0).all()  # the stability clamp


def test_noncausal_self_is_permutation_equivariant_and_cross_source_invariant():
    q, k, v = rand(1, 2, 33, 8, seed=1), rand(1, 2, 33, 8, seed=2), rand(1, 2, 33, 8, seed=3)
    perm = torch.randperm(33, generator=torch.Generator().manual_seed(0))
    out = flow_attention(q, k, v)
    torch.testing.assert_close(flow_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm]), out[:, :, perm], atol=TOL, rtol=0)
    src = torch.randperm(33, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(flow_attention(q, k[:, :, src], v[:, :, src], cross=True), flow_attention(q, k, v, cross=True), atol=TOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_causal_recurrence_equals_cumsum_reference(chunk):
    """The derived O(1)-state step, token by token, == the official cumulative-sum form; states agree."""
    q, k, v = rand(2, 2, 45, 8, seed=1), rand(2, 2, 45, 8, seed=2), rand(2, 2, 45, 6, seed=3)
    ref = flow_attention_reference(q, k, v, causal=True)
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    st = flow_causal_init(2, 2, 8, 6, dtype=F64)
    for t in range(45):
        o, st = flow_causal_step(st, fq[:, :, t], fk[:, :, t], v[:, :, t], 1e-6, 1.0)
        torch.testing.assert_close(o, ref[:, :, t], atol=TOL, rtol=0)
    chunked, st_c = flow_causal_chunked(fq, fk, v, torch.ones(2, 1, 45, 1, dtype=F64), 1e-6, 1.0, chunk)
    torch.testing.assert_close(chunked, ref, atol=TOL, rtol=0)
    for key in st:
        torch.testing.assert_close(torch.as_tensor(st_c[key], dtype=F64), torch.as_tensor(st[key], dtype=F64), atol=TOL, rtol=0)
    # the state is O(d e): nothing in it grows with N
    assert st["kv"].shape == (2, 2, 8, 6) and st["t"] == 45


def test_causal_prefix_does_not_see_the_future():
    q, k, v = rand(1, 2, 30, 8, seed=1), rand(1, 2, 30, 8, seed=2), rand(1, 2, 30, 8, seed=3)
    out = flow_attention(q, k, v, causal=True)
    torch.testing.assert_close(flow_attention(q[:, :, :17], k[:, :, :17], v[:, :, :17], causal=True), out[:, :, :17], atol=TOL, rtol=0)


def test_causal_cross_is_the_noncausal_network_of_the_query_prefix():
    """CAB: out(q[:i+1], source)[i] == out(q, source)[i]; the last row is the non-causal cross output."""
    q, k, v = rand(1, 2, 15, 8, seed=1), rand(1, 2, 22, 8, seed=2), rand(1, 2, 22, 8, seed=3)
    out = flow_attention(q, k, v, causal=True, cross=True)
    for i in (0, 7, 14):
        torch.testing.assert_close(flow_attention(q[:, :, : i + 1], k, v, cross=True)[:, :, i], out[:, :, i], atol=TOL, rtol=0)
    torch.testing.assert_close(out[:, :, -1], flow_attention(q, k, v, cross=True)[:, :, -1], atol=TOL, rtol=0)


def test_module_decode_continues_prefill():
    torch.manual_seed(0)
    m = az.create("flow", 16, 2, causal=True, chunk=4).double().eval()
    x = rand(2, 12, 16, seed=4)
    with torch.no_grad():
        full = m(x)
        y, st = m.prefill(x[:, :5])
        y2, st = m.prefill(x[:, 5:9], st)  # a prefill can continue a state too
        outs = [y, y2]
        for t in range(9, 12):
            yt, st = m.step(x[:, t], st)
            outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=TOL, rtol=0)


def test_causal_self_needs_equal_lengths():
    q = rand(1, 1, 5, 4)
    with pytest.raises(ValueError, match="as many queries as keys"):
        flow_attention(q, rand(1, 1, 7, 4), rand(1, 1, 7, 4), causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_forms_are_linear_in_n(causal):
    def run(n):
        x = torch.randn(1, 1, n, 16)
        flow_attention(x, x, x, causal=causal, chunk=64)

    assert_linear(run)

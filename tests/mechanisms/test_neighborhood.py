"""Neighborhood attention: blocked fast form == dense reference, NATTEN semantics, decode, cost.

Tolerances: float64 comparisons use 1e-10 (the two forms differ only in summation order);
float32 comparisons use 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo.core.flops import flop_counter
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.neighborhood import (
    neighborhood_attention,
    neighborhood_attention_reference,
    neighborhood_dense_mask,
)

F64 = torch.float64


def _flop_counter():
    return flop_counter()


def _qkv(b, h, n, d, m=None, dtype=F64, hkv=None):
    m = n if m is None else m
    hkv = h if hkv is None else hkv
    return (
        torch.randn(b, h, n, d, dtype=dtype),
        torch.randn(b, hkv, m, d, dtype=dtype),
        torch.randn(b, hkv, m, d, dtype=dtype),
    )


# --- an independent transcription of NATTEN's window rule (spec 9, per-residue clamp), loop form ------
def _natten_keys_1d(i: int, length: int, k: int, d: int, causal: bool) -> list[int]:
    r, li = i % d, i // d
    lr = len(range(r, length, d))
    if causal:
        return [(t * d + r) for t in range(max(li - k + 1, 0), li + 1)]
    kk = min(k, lr)
    start = min(max(li - kk // 2, 0), lr - kk)
    return [(start + t) * d + r for t in range(kk)]


def _legacy_start(i: int, length: int, k: int, d: int) -> int:
    """NATTEN's legacy get_window_start (valid for odd k), as quoted in spec 9."""
    ns = k // 2
    if d == 1:
        return max(i - ns, 0) + (i + ns >= length) * (length - i - ns - 1)
    ni = i - ns * d
    if ni < 0:
        return i % d
    if i + ns * d >= length:
        r = i % d
        a = (length // d) * d
        b = length - a
        return (length - b + r - 2 * ns * d) if r < b else (a + r - k * d)
    return ni


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_mask_matches_natten_rule(k, d, causal):
    for length in (k * d, k * d + 1, 23, 40):
        if length < k * d:
            continue
        mask = neighborhood_dense_mask(length, (length,), k, d, causal)
        for i in range(length):
            expect = sorted(_natten_keys_1d(i, length, k, d, causal))
            assert torch.nonzero(mask[i]).squeeze(1).tolist() == expect, (i, length)
            if not causal:
                assert len(expect) == k  # shifted, never truncated
                if k % 2 == 1:
                    start = _legacy_start(i, length, k, d)
                    assert expect == [start + t * d for t in range(k)]
            else:
                assert expect[-1] == i  # the causal window ends at the query


def test_even_kernel_is_biased_left():
    mask = neighborhood_dense_mask(20, (20,), 4)
    assert torch.nonzero(mask[10]).squeeze(1).tolist() == [8, 9, 10, 11]
    assert torch.nonzero(mask[19]).squeeze(1).tolist() == [16, 17, 18, 19]  # shifted at the right border
    assert torch.nonzero(mask[0]).squeeze(1).tolist() == [0, 1, 2, 3]


def test_2d_mask_is_and_of_axes():
    shape = (6, 7)
    m2 = neighborhood_dense_mask(42, shape, (3, 4), (2, 1), (False, True))
    mh = neighborhood_dense_mask(6, (6,), 3, 2, False)
    mw = neighborhood_dense_mask(7, (7,), 4, 1, True)
    expect = (mh[:, None, :, None] & mw[None, :, None, :]).reshape(42, 42)
    assert torch.equal(m2, expect)


# --- fast == reference ----------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 63, 257])
def test_fast_equals_reference_1d(n, causal):
    q, k, v = _qkv(2, 2, n, 60)
    for ks, dil in ((5, 1), (8, 3), (64, 1)):
        a = neighborhood_attention(q, k, v, causal=causal, kernel_size=ks, dilation=dil, block_size=32)
        b = neighborhood_attention_reference(q, k, v, causal=causal, kernel_size=ks, dilation=dil)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n,m,ks,hkv", [(1, 1, 5, 2), (63, 63, 5, 2), (257, 257, 64, 1), (40, 40, 100, 2), (9, 29, 4, 2)])
def test_causal_1d_takes_the_sliding_window_path(n, m, ks, hkv, monkeypatch):
    """1-D causal undilated NA is sliding_window's causal band (the last kernel_size keys up to the query);
    with the default block size it runs sliding_window's blocked path: values and gradients == reference."""
    import attnzoo.mechanisms.softmax.sliding_window as sw

    calls = []
    real = sw._blocked
    monkeypatch.setattr(sw, "_blocked", lambda *a: (calls.append(a[4:]), real(*a))[1])
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, n, 12, m=m, hkv=hkv))
    a = neighborhood_attention(q, k, v, causal=True, kernel_size=ks)
    assert calls == [(ks, True, 32)]
    b = neighborhood_attention_reference(q, k, v, causal=True, kernel_size=ks)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    w = torch.randn_like(a)
    for ga, gb in zip(torch.autograd.grad((a * w).sum(), (q, k, v)), torch.autograd.grad((b * w).sum(), (q, k, v))):
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)
    calls.clear()
    neighborhood_attention(q, k, v, causal=True, kernel_size=ks, scale=0.5)  # another scale: NA's own path
    neighborhood_attention(q, k, v, causal=True, kernel_size=ks, block_size=4)  # an explicit tile: NA's own path
    assert calls == []


@pytest.mark.parametrize("dil", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_fast_equals_reference_causal_fewer_queries(n, dil):
    q, k, v = _qkv(1, 2, n, 8, m=29)
    a = neighborhood_attention(q, k, v, causal=True, kernel_size=4, dilation=dil, block_size=4)
    b = neighborhood_attention_reference(q, k, v, causal=True, kernel_size=4, dilation=dil)
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "shape,ks,dil,axc",
    [
        ((7, 9), (3, 3), (1, 1), (False, False)),
        ((7, 9), (4, 2), (2, 3), (False, False)),
        ((7, 9), (3, 5), (1, 2), (True, False)),
        ((14, 14), 7, 1, (False, False)),
        ((1, 1), 3, 1, (False, False)),
        ((3, 4, 5), (2, 3, 3), (1, 2, 1), (True, False, False)),
    ],
)
def test_fast_equals_reference_nd(shape, ks, dil, axc):
    n = math.prod(shape)
    q, k, v = _qkv(2, 2, n, 12)
    for bs in (None, 3):
        a = neighborhood_attention(
            q, k, v, kernel_size=ks, dilation=dil, spatial_shape=shape, axis_causal=axc, block_size=bs
        )
        b = neighborhood_attention_reference(
            q, k, v, kernel_size=ks, dilation=dil, spatial_shape=shape, axis_causal=axc
        )
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_and_gqa(causal):
    q, k, v = _qkv(2, 4, 37, 8, hkv=2)
    kpm = torch.rand(2, 37) < 0.4
    kpm[1, :] = True  # every key padded: zeros, not NaN
    for dil in (1, 2):
        a = neighborhood_attention(q, k, v, causal=causal, kernel_size=5, dilation=dil, key_padding_mask=kpm)
        b = neighborhood_attention_reference(
            q, k, v, causal=causal, kernel_size=5, dilation=dil, key_padding_mask=kpm
        )
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        assert torch.equal(a[1], torch.zeros_like(a[1]))


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_is_variable_length(causal):
    # padded tokens are removed: the real tokens get exactly the output of the unpadded sequence
    q, k, v = _qkv(1, 2, 30, 8)
    ref = neighborhood_attention(q, k, v, causal=causal, kernel_size=6, dilation=2)
    pad = torch.randn(1, 2, 5, 8, dtype=F64) * 10
    for where in ("left", "right", "middle"):
        cut = {"left": 0, "right": 30, "middle": 13}[where]
        cat = lambda t, cut=cut: torch.cat([t[:, :, :cut], pad, t[:, :, cut:]], 2)  # noqa: E731
        kpm = torch.zeros(1, 35, dtype=torch.bool)
        kpm[:, cut : cut + 5] = True
        for fn in (neighborhood_attention, neighborhood_attention_reference):
            out = fn(cat(q), cat(k), cat(v), causal=causal, kernel_size=6, dilation=2, key_padding_mask=kpm)
            torch.testing.assert_close(out[:, :, ~kpm[0]], ref, atol=1e-10, rtol=0)
            assert torch.equal(out[:, :, kpm[0]], torch.zeros_like(out[:, :, kpm[0]]))


def test_backward_matches_reference():
    q, k, v = _qkv(1, 2, 45, 8)
    grads = []
    for fn in (neighborhood_attention, neighborhood_attention_reference):
        t = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = fn(*t, causal=False, kernel_size=(4,), dilation=2, block_size=8)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads.append([x.grad for x in t])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)


def test_float32_close_to_float64():
    q, k, v = _qkv(1, 2, 300, 32)
    a = neighborhood_attention(q.float(), k.float(), v.float(), kernel_size=33)
    b = neighborhood_attention_reference(q, k, v, kernel_size=33)
    torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)


# --- paper / NATTEN identities --------------------------------------------------------------------------
def test_kernel_equal_length_is_full_attention():
    q, k, v = _qkv(2, 2, 50, 8)
    torch.testing.assert_close(
        neighborhood_attention(q, k, v, kernel_size=50), reference_attention(q, k, v), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        neighborhood_attention(q, k, v, kernel_size=50, causal=True),
        reference_attention(q, k, v, causal=True),
        atol=1e-10,
        rtol=0,
    )
    q, k, v = _qkv(1, 2, 7 * 9, 8)
    torch.testing.assert_close(
        neighborhood_attention(q, k, v, kernel_size=(7, 9), spatial_shape=(7, 9)),
        reference_attention(q, k, v),
        atol=1e-10,
        rtol=0,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_dilation_is_na_on_interleaved_groups(causal):
    q, k, v = _qkv(1, 2, 41, 8)
    out = neighborhood_attention(q, k, v, kernel_size=3, dilation=4, causal=causal)
    for r in range(4):
        sub = neighborhood_attention(
            q[:, :, r::4], k[:, :, r::4], v[:, :, r::4], kernel_size=3, causal=causal
        )
        torch.testing.assert_close(out[:, :, r::4], sub, atol=1e-10, rtol=0)


def test_causal_no_future_dependence():
    q, k, v = _qkv(1, 1, 40, 4)
    a = neighborhood_attention(q, k, v, kernel_size=6, dilation=2, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 25:] += 1.0
    v2[:, :, 25:] -= 2.0
    b = neighborhood_attention(q, k2, v2, kernel_size=6, dilation=2, causal=True)
    torch.testing.assert_close(a[:, :, :25], b[:, :, :25], atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 25:], b[:, :, 25:])


# --- module: spatial, decode ----------------------------------------------------------------------------
def test_spatial_module_fast_equals_reference():
    layer = az.create("neighborhood", dim=24, num_heads=2, kernel_size=(3, 5), dilation=(2, 1)).double()
    x = torch.randn(2, 7, 9, 24, dtype=F64)
    y = layer(x)
    assert y.shape == x.shape
    layer.impl = "reference"
    torch.testing.assert_close(y, layer(x), atol=1e-10, rtol=0)
    y1 = az.create("neighborhood", dim=24, num_heads=2, kernel_size=3).double()(
        torch.randn(1, 1, 1, 24, dtype=F64)
    )
    assert y1.shape == (1, 1, 1, 24) and torch.isfinite(y1).all()


@pytest.mark.parametrize("dil", [1, 2])
def test_decode_equals_forward(dil):
    torch.manual_seed(1)
    layer = az.create("neighborhood", dim=16, num_heads=2, causal=True, kernel_size=4, dilation=dil).double()
    x = torch.randn(2, 23, 16, dtype=F64)
    full = layer(x)
    y, state = layer.prefill(x[:, :5])
    outs = [y]
    for t in range(5, 23):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)
    assert len(state["kv"]) == 4 * dil  # rolling window of k * dilation keys
    y2, _ = layer.prefill(x[:, 13:], layer.prefill(x[:, :13])[1])
    torch.testing.assert_close(y2, full[:, 13:], atol=1e-10, rtol=0)


# --- cost -----------------------------------------------------------------------------------------------
def _flops(n, k, causal=False):
    q, k_, v = _qkv(1, 1, n, 16, dtype=torch.float32)
    with _flop_counter() as fc:
        neighborhood_attention(q, k_, v, kernel_size=k, causal=causal, block_size=32)
    return fc.get_total_flops()


@pytest.mark.parametrize("causal", [False, True])
def test_cost_grows_linearly(causal):
    f1, f2, f4 = _flops(1024, 32, causal), _flops(2048, 32, causal), _flops(4096, 32, causal)
    assert f1 > 0
    assert f2 == 2 * f1 and f4 == 2 * f2  # exactly linear in N at fixed kernel and tile
    dense = 2 * 2 * 4096 * 4096 * 16
    assert f4 < dense / 30  # blocked: N * (block + k - 1) * d, not N^2 d
    assert f4 <= 2 * 2 * 4096 * (32 + 32 - 1) * 16


def test_backward_peak_memory_is_linear():
    # the autograd graph saves tiles of size N x (block + k - 1), never N x N
    q, k, v = (torch.randn(1, 1, 8192, 16, requires_grad=True) for _ in range(3))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = neighborhood_attention(q, k, v, kernel_size=64, block_size=64)
    out.sum().backward()
    assert max(saved) <= 8192 * (64 + 63) * 2
    assert max(saved) < 8192 * 8192 // 32


def test_bad_arguments():
    q, k, v = _qkv(1, 1, 10, 4)
    with pytest.raises(ValueError):
        neighborhood_attention(q, k, v, kernel_size=0)
    with pytest.raises(ValueError):
        neighborhood_attention(q, k, v, kernel_size=3, spatial_shape=(3, 4))
    with pytest.raises(ValueError):
        neighborhood_attention(q, k, v, kernel_size=(3, 3))
    with pytest.raises(ValueError):
        neighborhood_attention(q, k, v, kernel_size=3, cross=True)
    with pytest.raises(ValueError):
        neighborhood_attention(q[:, :, :4], k, v, kernel_size=3)  # non-causal needs N == M
    with pytest.raises(ValueError):
        neighborhood_attention(q, k, v, kernel_size=3, backend="cuda-magic")


@pytest.mark.slow
def test_flex_backend_matches_blocked():
    q, k, v = _qkv(1, 2, 256, 16, dtype=torch.float32)
    for causal in (False, True):
        a = neighborhood_attention(q, k, v, kernel_size=17, dilation=2, causal=causal, backend="flex")
        b = neighborhood_attention(q, k, v, kernel_size=17, dilation=2, causal=causal)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

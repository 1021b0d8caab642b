"""RCMHA: fast == explicit reference, the official shift equals the gather, reduction to causal MHA, decode.

float64 comparisons use 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.core.reference import reference_attention
from attnzoo.mechanisms.sparse.rcmha import (
    _relative_scores,
    causal_dwconv,
    rcmha_attention,
    rcmha_attention_reference,
)

F64 = torch.float64


def _layer(**kw):
    torch.manual_seed(2)
    layer = az.create("rcmha", dim=24, num_heads=3, causal=True, max_distance=32, **kw).double()
    with torch.no_grad():  # non-zero relative parameters so that they are exercised
        layer.rel_emb.normal_()
        layer.rel_bias.normal_()
        layer.query_bias.normal_()
    return layer


def _params(h, d, p=16, kc=3):
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return dict(
        conv_q=r(d, kc),
        conv_k=r(d, kc),
        conv_v=r(d, kc),
        conv_bias_q=r(d),
        conv_bias_k=r(d),
        conv_bias_v=r(d),
        rel_emb=r(2 * p, h, d),
        rel_bias=r(2 * p, h),
        query_bias=r(h, d),
    )


@pytest.mark.parametrize("n,m", [(1, 1), (63, 63), (40, 40), (3, 29)])
def test_fast_equals_reference(n, m):
    q, k, v = (
        torch.randn(2, 4, n, 60, dtype=F64),
        torch.randn(2, 2, m, 60, dtype=F64),
        torch.randn(2, 2, m, 60, dtype=F64),
    )
    prm = _params(4, 60)
    kpm = torch.rand(2, m) < 0.2
    for mask in (None, kpm):
        a = rcmha_attention(q, k, v, key_padding_mask=mask, **prm)
        b = rcmha_attention_reference(q, k, v, key_padding_mask=mask, **prm)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def _official_shift_right(x):
    """Transcription of rcmha/util.py shift_right (labml's Transformer-XL relative shift)."""
    zero_pad = x.new_zeros(x.shape[0], 1, *x.shape[2:])
    x_padded = torch.cat([x, zero_pad], dim=1)
    x_padded = x_padded.view(x.shape[1] + 1, x.shape[0], *x.shape[2:])
    return x_padded[:-1].view_as(x)


@pytest.mark.parametrize("n,m", [(6, 6), (3, 9)])
def test_official_shift_equals_gather(n, m):
    p, h, d = 16, 2, 5
    q = torch.randn(1, h, n, d, dtype=F64)
    k = torch.zeros(1, h, m, d, dtype=F64)
    rel_emb = torch.randn(2 * p, h, d, dtype=F64)
    rel_bias = torch.randn(2 * p, h, dtype=F64)
    # official: b = q . R[P - M : P + N], d = r[...], bd = shift_right(b + d)[:, -M:]   (layout i, j, batch, head)
    qi = q[0].permute(1, 0, 2)[:, None]  # (N, 1, H, D)
    b = torch.einsum("ibhd,jhd->ijbh", qi, rel_emb[p - m : p + n])
    dd = rel_bias[p - m : p + n][None, :, None, :]
    bd = _official_shift_right(b + dd)[:, -m:]  # (N, M, 1, H)
    ours = _relative_scores(q, k, rel_emb, rel_bias, None, fast=True)[0].permute(1, 2, 0)  # (N, M, H)
    causal = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    torch.testing.assert_close(ours[causal], bd[:, :, 0][causal], atol=1e-12, rtol=0)


def test_conv_is_causal_depthwise_conv1d():
    x = torch.randn(2, 3, 11, 6, dtype=F64)
    conv = torch.nn.Conv1d(6, 6, 3, padding=2, groups=6).double()
    expect = (
        conv(x.reshape(6, 11, 6).transpose(1, 2))[:, :, :-2].transpose(1, 2).reshape(2, 3, 11, 6)
    )  # official crop
    torch.testing.assert_close(causal_dwconv(x, conv.weight[:, 0], conv.bias), expect, atol=1e-12, rtol=0)


def test_identity_conv_and_zero_relative_is_causal_mha():
    layer = az.create("rcmha", dim=24, num_heads=3, causal=True, max_distance=16).double()
    with torch.no_grad():
        for c in layer.convs:
            c.weight.zero_()
            c.weight[:, 0, -1] = 1.0  # identity tap [0, 0, 1]
            c.bias.zero_()
    mha = az.create("softmax", dim=24, num_heads=3, causal=True).double()
    mha.load_state_dict(
        {
            k: v
            for k, v in layer.state_dict().items()
            if k.split(".")[0] in ("q_proj", "k_proj", "v_proj", "out_proj")
        }
    )
    x = torch.randn(2, 19, 24, dtype=F64)
    torch.testing.assert_close(layer(x), mha(x), atol=1e-10, rtol=0)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=F64) for _ in range(3))
    torch.testing.assert_close(
        rcmha_attention(q, k, v), reference_attention(q, k, v, causal=True), atol=1e-12, rtol=0
    )


def test_module_fast_equals_reference_and_causality():
    layer = _layer()
    x = torch.randn(2, 30, 24, dtype=F64)
    y = layer(x)
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), y, atol=1e-10, rtol=0)
    layer.impl = "fast"
    x2 = x.clone()
    x2[:, 17:] += 1.0
    y2 = layer(x2)
    torch.testing.assert_close(
        y2[:, :17], y[:, :17], atol=1e-12, rtol=0
    )  # nothing leaks back through the conv
    assert (y2[:, 17:] - y[:, 17:]).abs().max() > 1e-3


def test_left_padding_changes_nothing():
    layer = _layer()
    x = torch.randn(2, 15, 24, dtype=F64)
    xp = torch.cat([10 * torch.randn(2, 4, 24, dtype=F64), x], 1)
    kpm = torch.zeros(2, 19, dtype=torch.bool)
    kpm[:, :4] = True
    torch.testing.assert_close(layer(xp, key_padding_mask=kpm)[:, 4:], layer(x)[:, :], atol=1e-10, rtol=0)


@pytest.mark.parametrize("kc", [1, 3, 5])
def test_decode_equals_forward(kc):
    layer = _layer(conv_kernel=kc)
    x = torch.randn(2, 17, 24, dtype=F64)
    full = layer(x)
    y, state = layer.prefill(x[:, :1])
    outs = [y]
    for t in range(1, 17):
        yt, state = layer.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=0)
    y2, _ = layer.prefill(x[:, 7:], layer.prefill(x[:, :7])[1])
    torch.testing.assert_close(y2, full[:, 7:], atol=1e-10, rtol=0)


def test_gradients_reach_every_parameter():
    layer = _layer()
    layer(torch.randn(2, 12, 24, dtype=F64)).square().mean().backward()
    for name, prm in layer.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), name
    assert layer.rel_emb.grad.abs().sum() > 0 and layer.convs[0].weight.grad.abs().sum() > 0


def test_errors():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError):
        rcmha_attention(q, q, q, causal=False)
    with pytest.raises(ValueError):
        rcmha_attention(q, q, q, rel_emb=torch.zeros(7, 2, 4))
    with pytest.raises(az.UnsupportedError):
        az.create("rcmha", dim=8, num_heads=2, causal=False)

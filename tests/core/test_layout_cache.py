"""Input validation messages and the KV cache."""

from __future__ import annotations

import pytest
import torch

from attnzoo.core.cache import KVCache
from attnzoo.core.layout import expand_kv, merge_heads, split_heads, validate_qkv, validate_tokens


def test_validation_names_the_shapes():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match=r"q \(2, 3, 5, 8\), k \(2, 2, 5, 8\)"):
        validate_qkv(q, k, k, mechanism="m")
    with pytest.raises(ValueError, match=r"m: expected 4-D"):
        validate_qkv(torch.randn(5, 8), k, k, mechanism="m")
    with pytest.raises(TypeError, match="floating-point"):
        validate_qkv(q.long(), k, k)
    with pytest.raises(ValueError, match="empty"):
        validate_qkv(torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8))
    with pytest.raises(ValueError, match=r"\(batch, key_length\) = \(2, 5\)"):
        validate_qkv(k, k, k, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for 16"):
        validate_tokens(torch.randn(2, 3, 15), 16, "x")


def test_split_merge_and_expand():
    x = torch.randn(2, 7, 12)
    assert torch.equal(merge_heads(split_heads(x, 3)), x)
    k = torch.randn(1, 2, 4, 3)
    ke, _ = expand_kv(k, k, 6)
    assert ke.shape == (1, 6, 4, 3) and torch.equal(ke[:, 2], k[:, 0]) and torch.equal(ke[:, 3], k[:, 1])
    assert expand_kv(k, k, 2)[0] is k


def test_cache_appends_and_grows():
    cache = KVCache()
    chunks = [torch.randn(1, 2, t, 4) for t in (3, 1, 1, 20, 1, 50)]
    for c in chunks:
        cache.append(c, c + 1)
    allk = torch.cat(chunks, 2)
    assert torch.equal(cache.keys, allk) and torch.equal(cache.values, allk + 1)
    assert len(cache) == cache.seen == 76
    assert cache.nbytes() == 2 * allk.numel() * 4


def test_rolling_window_keeps_the_last_tokens():
    cache = KVCache(window=5)
    seq = torch.arange(40.0).view(1, 1, 40, 1)
    for t in range(0, 40, 3):
        cache.append(seq[:, :, t : t + 3], seq[:, :, t : t + 3])
    assert cache.keys.flatten().tolist() == [35.0, 36.0, 37.0, 38.0, 39.0]
    assert cache.seen == 40
    with pytest.raises(ValueError):
        KVCache(window=0)
    with pytest.raises(RuntimeError, match="empty"):
        _ = KVCache().keys

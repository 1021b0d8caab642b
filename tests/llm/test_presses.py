"""KV-cache presses on a tiny randomly initialised Llama (GQA 3 query heads : 1 kv head).

Oracles are independent of the press code: eager attention weights from transformers
(``output_attentions``) for SnapKV / H2O scores, key matching against the full cache for the kept
positions, and a masked full-cache attention (original positions, evicted keys masked) for decoding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from attnzoo.llm import generation as gen  # noqa: E402
from attnzoo.llm.interface import attention_implementation, register_attention  # noqa: E402
from attnzoo.llm.presses import (  # noqa: E402
    HeavyHittersPress,
    KnormPress,
    RandomPress,
    S2Press,
    SAQPress,
    SnapKVPress,
    StreamingPress,
    cache_layer_kv,
    cache_lengths,
    press,
    quantize_dequantize,
)

T = 160  # prompt length
HKV = 2


def tiny_model(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=HKV,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
    cfg._attn_implementation = attn
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 96, (1, T), generator=g)


def all_presses(ratio, **kw):
    out = [
        SnapKVPress(ratio, **kw),
        SnapKVPress(ratio, window_size=16, kernel_size=5, pooling="avg", **kw),
        StreamingPress(ratio, **kw),
        HeavyHittersPress(ratio, **kw),
        S2Press(ratio, window=16, **kw),
        KnormPress(ratio, **kw),
        RandomPress(ratio, **kw),
        SAQPress(ratio, **kw),
    ]
    try:
        import faiss  # noqa: F401

        out.append(press("retrieval", compression_ratio=ratio, index="flat", top_k=8, **kw))
    except ImportError:
        pass
    return out


def kept_positions(full_keys, kept_keys):
    """``(B, H, n)`` original positions of the kept keys, by exact row matching against the full cache."""
    d = torch.cdist(kept_keys.double(), full_keys.double(), compute_mode="donot_use_mm_for_euclid_dist")
    val, idx = d.min(-1)
    assert float(val.max()) == 0.0, "a kept key is not a row of the full cache"
    return idx


def decode_logits(model, cache, tokens, start, press_obj=None):
    ctx = press_obj.decode_context(model) if press_obj is not None else gen.contextlib.nullcontext()
    pos = torch.arange(start, start + tokens.shape[1])[None]
    with ctx, torch.no_grad():
        return model(input_ids=tokens, past_key_values=cache, position_ids=pos).logits


# --------------------------------------------------------------------------------------------------


def test_ratio_zero_reproduces_full_cache_logits_exactly(model, ids):
    full, last = gen.prefill(model, ids)
    nxt = torch.tensor([[5, 7, 11]])
    ref = decode_logits(model, full, nxt, T)
    for p in all_presses(0.0):
        cache, last_p = gen.prefill(model, ids, p)
        assert cache_lengths(cache) == [T, T], p.name
        assert torch.equal(last, last_p)
        out = decode_logits(model, cache, nxt, T, p)
        assert torch.equal(out, ref), p.name


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_cache_stays_gqa_shaped_with_requested_size(model, ids, ratio):
    for p in all_presses(ratio):
        if p.name == "saq":
            continue  # quantizes, keeps every token (tested below)
        cache, _ = gen.prefill(model, ids, p)
        n = int(T * (1 - ratio))
        for i in range(2):
            k, v = cache_layer_kv(cache, i)
            assert k.shape == (1, HKV, max(n, min(T, p.protected(T))), 16), p.name
            assert v.shape == k.shape
        rep = p.report()
        assert rep["layers"] == 2 and rep["original_tokens"] == T


def _eager_attentions(ids):
    m = tiny_model("eager")
    with torch.no_grad():
        out = m(input_ids=ids, output_attentions=True, use_cache=True)
    return m, out.attentions, out.past_key_values


@pytest.mark.parametrize("setting", ["paper", "kvpress"])
def test_snapkv_keeps_topk_of_window_votes_and_the_window(ids, setting):
    ratio = 0.6
    if setting == "paper":  # paper's LongBench configs: max pooling, odd kernel; small window for T = 160
        w, kern, pool = 16, 7, F.max_pool1d
        p = SnapKVPress(ratio, window_size=w, kernel_size=kern, pooling="max")
    else:  # kvpress: window 64, kernel 5, average pooling (zero padding counted)
        w, kern, pool = 64, 5, F.avg_pool1d
        p = SnapKVPress.kvpress_defaults(ratio)
    m, atts, _ = _eager_attentions(ids)
    sdpa = tiny_model("sdpa")  # same seed: same weights; scores from recomputed window queries
    cache, _ = gen.prefill(sdpa, ids, p)
    full, _ = gen.prefill(sdpa, ids)  # same seed: same weights; scores from recomputed queries
    n = int(T * (1 - ratio))
    for layer in range(2):
        a = atts[layer].double()  # (1, 6, T, T) from transformers' eager attention
        vote = a[..., -w:, : T - w].mean(-2)
        pooled = pool(vote, kern, padding=kern // 2, stride=1)
        group = pooled.view(1, HKV, 3, T - w).mean(2)
        want = (
            torch.cat([group.topk(n - w, dim=-1).indices, torch.arange(T - w, T).expand(1, HKV, w)], -1)
            .sort(-1)
            .values
        )
        got = kept_positions(cache_layer_kv(full, layer)[0], cache_layer_kv(cache, layer)[0])
        assert torch.equal(got, want), layer
        assert got.shape[1] == HKV  # never expanded to the 6 query heads


def test_snapkv_uses_eager_weights_when_given(ids):
    eager, sdpa = tiny_model("eager"), tiny_model("sdpa")
    p1, p2 = SnapKVPress(0.5, window_size=8), SnapKVPress(0.5, window_size=8)
    c1, _ = gen.prefill(eager, ids, p1)  # eager: weights from the layer output
    c2, _ = gen.prefill(sdpa, ids, p2)  # sdpa: recomputed window queries
    f1, _ = gen.prefill(eager, ids)
    f2, _ = gen.prefill(sdpa, ids)
    for layer in range(2):
        k1 = kept_positions(cache_layer_kv(f1, layer)[0], cache_layer_kv(c1, layer)[0])
        k2 = kept_positions(cache_layer_kv(f2, layer)[0], cache_layer_kv(c2, layer)[0])
        assert torch.equal(k1, k2)


def test_streaming_keeps_sinks_and_recent(model, ids):
    p = StreamingPress(0.5, n_sink=4)
    full, _ = gen.prefill(model, ids)
    cache, _ = gen.prefill(model, ids, p)
    n = T // 2
    want = torch.cat([torch.arange(4), torch.arange(T - (n - 4), T)])
    for layer in range(2):
        got = kept_positions(cache_layer_kv(full, layer)[0], cache_layer_kv(cache, layer)[0])
        assert torch.equal(got, want.expand(1, HKV, n))


def test_heavy_hitters_accumulated_attention_and_recent_window(ids):
    m, atts, _ = _eager_attentions(ids)
    ratio = 0.5
    p = HeavyHittersPress(ratio, chunk=37)  # odd chunk: the blocked recomputation must not matter
    sdpa = tiny_model("sdpa")
    cache, _ = gen.prefill(sdpa, ids, p)
    full, _ = gen.prefill(sdpa, ids)
    n = int(T * (1 - ratio))
    r = round(n * 0.5)
    for layer in range(2):
        acc = atts[layer].double().sum(-2).view(1, HKV, 3, T).mean(2)  # column sums over all queries
        heavy = acc[..., : T - r].topk(n - r, dim=-1).indices
        want = torch.cat([heavy, torch.arange(T - r, T).expand(1, HKV, r)], -1).sort(-1).values
        got = kept_positions(cache_layer_kv(full, layer)[0], cache_layer_kv(cache, layer)[0])
        assert torch.equal(got, want), layer


def test_s2_each_kv_head_keeps_its_own_shard(model, ids):
    p = S2Press(0.5, n_sink=4, window=16)
    full, _ = gen.prefill(model, ids)
    cache, _ = gen.prefill(model, ids, p)
    got = kept_positions(cache_layer_kv(full, 0)[0], cache_layer_kv(cache, 0)[0])[0]
    protected = set(range(4)) | set(range(T - 16, T))
    n, middle = T // 2, T - 20
    m = n - 20
    shards = []
    for h in range(HKV):
        pos = set(got[h].tolist())
        assert protected <= pos
        shard = sorted(pos - protected)
        want = [4 + int((i + h / HKV) * middle / m) for i in range(m)]  # strided, head-dependent offset
        assert shard == want
        shards.append(set(shard))
    assert shards[0] != shards[1]


def _masked_oracle(model, ids, kept_by_layer, nxt):
    """Decode ``nxt`` over the FULL cache with evicted keys masked per layer/head, original positions."""

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        keep = kept_by_layer[module.layer_idx]  # (1, HKV, n) positions in [0, T)
        b, hq, q, d = query.shape
        t = key.shape[2]
        allowed = torch.zeros(1, HKV, t, dtype=torch.bool)
        allowed[..., T:] = True  # the new tokens
        allowed.scatter_(2, keep, True)
        allowed = allowed.repeat_interleave(hq // HKV, dim=1)[:, :, None, :].expand(b, hq, q, t).clone()
        causal = torch.arange(t)[None, :] <= torch.arange(q)[:, None] + (t - q)
        allowed &= causal
        k = key.repeat_interleave(hq // HKV, dim=1)
        v = value.repeat_interleave(hq // HKV, dim=1)
        s = (query @ k.transpose(-1, -2)) * scaling
        out = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        return out.transpose(1, 2), None

    register_attention("attnzoo_test_masked", fn)
    full, _ = gen.prefill(model, ids)
    with attention_implementation(model, "attnzoo_test_masked"):
        return decode_logits(model, full, nxt, T)


@pytest.mark.parametrize("name", ["snapkv", "streaming", "heavy_hitters", "s2", "knorm"])
def test_decoding_after_compression_uses_original_positions(model, ids, name):
    p = press(name, compression_ratio=0.5)
    full, _ = gen.prefill(model, ids)
    cache, _ = gen.prefill(model, ids, p)
    kept = {i: kept_positions(cache_layer_kv(full, i)[0], cache_layer_kv(cache, i)[0]) for i in range(2)}
    nxt = torch.tensor([[3, 9, 27, 81 % 96]])
    got = decode_logits(model, cache, nxt, T)
    want = _masked_oracle(model, ids, kept, nxt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32, different summation order
    # a shifted position (what HF does without explicit position_ids) gives different logits
    shifted = decode_logits(
        model, gen.prefill(model, ids, press(name, compression_ratio=0.5))[0], nxt, T // 2
    )
    assert (shifted - want).abs().max() > 1e-3


def test_budget_zero_and_short_prompts_never_empty(model, ids):
    for p in [
        SnapKVPress(budget=0),
        StreamingPress(budget=0),
        HeavyHittersPress(budget=0),
        S2Press(budget=0),
        KnormPress(budget=0),
    ]:
        cache, _ = gen.prefill(model, ids, p)
        lens = cache_lengths(cache)
        assert all(n >= 1 for n in lens), p.name
        out = decode_logits(model, cache, torch.tensor([[1]]), T)
        assert torch.isfinite(out).all(), p.name
    short = ids[:, :10]  # shorter than the SnapKV window: untouched
    full, _ = gen.prefill(model, short)
    cache, _ = gen.prefill(model, short, SnapKVPress(0.9))
    assert cache_lengths(cache) == [10, 10]
    assert torch.equal(cache_layer_kv(cache, 0)[0], cache_layer_kv(full, 0)[0])
    one = ids[:, :1]
    for p in all_presses(0.9):
        cache, _ = gen.prefill(model, one, p)
        assert cache_lengths(cache) == [1, 1], p.name


def test_budget_in_tokens(model, ids):
    p = SnapKVPress(budget=50, window_size=8)
    cache, _ = gen.prefill(model, ids, p)
    assert cache_lengths(cache) == [50, 50]
    assert p.report()["kept_fraction"] == pytest.approx(50 / T)


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        SnapKVPress(1.0)
    with pytest.raises(ValueError):
        SnapKVPress(-0.1)
    with pytest.raises(ValueError):
        SnapKVPress(0.5, pooling="median")
    with pytest.raises(ValueError):
        StreamingPress(budget=-1)
    with pytest.raises(KeyError):
        press("nope")
    with pytest.raises(ValueError):
        SAQPress(0.5, bits=(2, 4))


def test_hooks_removed_and_nothing_compressed_outside(model, ids):
    p = SnapKVPress(0.5)
    n_hooks = sum(len(layer.self_attn._forward_hooks) for layer in model.model.layers)
    with p(model):
        assert sum(len(layer.self_attn._forward_hooks) for layer in model.model.layers) == n_hooks + 2
    assert sum(len(layer.self_attn._forward_hooks) for layer in model.model.layers) == n_hooks
    cache, _ = gen.prefill(model, ids)
    assert cache_lengths(cache) == [T, T]


def test_generate_under_press_matches_explicit_decode(model, ids):
    p = SnapKVPress(0.5, window_size=8)
    with p(model), torch.no_grad():
        g = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, min_new_tokens=6
        )
    cache, last = gen.prefill(model, ids, SnapKVPress(0.5, window_size=8))
    first = int(last.argmax())
    rest = gen.greedy_decode(model, cache, torch.tensor([[first]]), T, 5)
    assert g[0, T:].tolist() == [first] + rest


def test_prefill_many_equals_separate_prefills(model, ids):
    presses_ = [None, SnapKVPress(0.5), StreamingPress(0.7), SAQPress(0.5)]
    mp = gen.prefill_many(model, ids, presses_)
    for p, c in zip(presses_, mp.caches):
        ref, _ = gen.prefill(model, ids, type(p)(p.compression_ratio) if p is not None else None)
        for i in range(2):
            assert torch.equal(cache_layer_kv(c, i)[0], cache_layer_kv(ref, i)[0])
            assert torch.equal(cache_layer_kv(c, i)[1], cache_layer_kv(ref, i)[1])


def test_greedy_decode_crops_cache_back(model, ids):
    cache, _ = gen.prefill(model, ids, SnapKVPress(0.5))
    before = [t.clone() for t in cache_layer_kv(cache, 0)]
    gen.greedy_decode(model, cache, torch.tensor([[1, 2, 3]]), T, 4)
    after = cache_layer_kv(cache, 0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# ---- SAQ ------------------------------------------------------------------------------------------


def test_quantize_dequantize_error_bound_and_identity():
    x = torch.randn(2, 3, 40, 16, dtype=torch.float64)
    for bits in (2, 4, 8):
        y = quantize_dequantize(x, bits, dim=2)
        step = (x.amax(2, keepdim=True) - x.amin(2, keepdim=True)) / (2**bits - 1)
        assert bool(((y - x).abs() <= step / 2 + 1e-12).all())
        assert len(torch.unique(y[0, 0, :, 0])) <= 2**bits
    assert torch.equal(quantize_dequantize(x, 16, dim=2), x)


def test_saq_staircase_bits_non_increasing_with_age():
    p = SAQPress(0.5, bits=(8, 4, 2), residual=16)
    lay = p.layout(200, 30)
    assert lay[0][0] == 0 and lay[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(lay, lay[1:]))  # contiguous
    widths = [16 if b == 0 else b for _, _, b in lay]
    assert widths == sorted(widths)  # oldest first: precision never decreases toward recent tokens
    assert (
        lay[-1] == (184, 200, 0)
        and lay[-2] == (154, 184, 8)
        and lay[-3] == (124, 154, 4)
        and lay[0] == (0, 124, 2)
    )


def test_saq_meets_budget_and_sixteen_bits_is_exact(model, ids):
    p = SAQPress(0.7, residual=16)
    cache, _ = gen.prefill(model, ids, p)
    rep = p.report()
    assert rep["memory_ratio"] >= 0.7 and rep["kept_fraction"] == 1.0
    full, _ = gen.prefill(model, ids)
    k, kf = cache_layer_kv(cache, 0)[0], cache_layer_kv(full, 0)[0]
    assert torch.equal(k[:, :, -16:], kf[:, :, -16:])  # residual in full precision
    assert not torch.equal(k[:, :, :16], kf[:, :, :16])  # oldest tokens quantized
    exact = SAQPress(0.5, bits=(16,), residual=16, stair_tokens=8)
    cache16, _ = gen.prefill(model, ids, exact)
    assert torch.equal(cache_layer_kv(cache16, 1)[1], cache_layer_kv(full, 1)[1])


def test_report_describes_the_last_prefill(model, ids):
    p = StreamingPress(0.5)
    with p(model), torch.no_grad():
        model(input_ids=ids, past_key_values=gen.new_cache(model))
        model(input_ids=ids[:, :100], past_key_values=gen.new_cache(model))
    rep = p.report()
    assert rep["original_tokens"] == 100 and rep["kept_tokens"] == [50, 50]

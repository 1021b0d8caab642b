"""Zoo mechanisms inside a (tiny random) Llama via AttentionInterface, and the RetrievalAttention press."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnzoo  # noqa: E402
from attnzoo.llm import generation as gen  # noqa: E402
from attnzoo.llm.interface import use_attention  # noqa: E402
from attnzoo.llm.presses import cache_lengths  # noqa: E402

T = 150


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
    )
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def run(model, ids, n_prefix=100):
    """Logits of a prefill of ``n_prefix`` tokens and of the rest decoded against the cache."""
    cache = gen.new_cache(model)
    a = model(input_ids=ids[:, :n_prefix], past_key_values=cache, use_cache=True).logits
    b = model(input_ids=ids[:, n_prefix:], past_key_values=cache, use_cache=True).logits
    return torch.cat([a, b], 1)


def test_softmax_through_the_interface_equals_sdpa(model, ids):
    ref = run(model, ids)
    impl = model.config._attn_implementation
    with use_attention(model, "softmax"):
        assert model.config._attn_implementation.startswith("attnzoo_softmax")
        got = run(model, ids)
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # float32, both on SDPA


def test_the_mechanism_is_really_used_and_masks_are_registered(model, ids):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    ref = run(model, ids)
    with use_attention(model, "softmax", alibi=True):
        name = model.config._attn_implementation
        got = run(model, ids)
    assert name in ALL_MASK_ATTENTION_FUNCTIONS
    assert (got - ref).abs().max() > 1e-3  # ALiBi changes the model: the call went through attnzoo


SPARSE = [
    ("sliding_window", {"window": 16}),
    ("neighborhood", {"kernel_size": 9}),
    ("s2", {"block_size": 16}),
    ("landmark", {"block_size": 16, "top_k": 2}),
    ("prflash", {"block_size": 16}),
]


@pytest.mark.parametrize("name,params", [("softmax", {})] + SPARSE)
def test_zoo_mechanisms_run_causally_in_a_pretrained_model(model, ids, name, params):
    if name not in attnzoo.list_mechanisms():
        pytest.fail(f"mechanism {name} required by issue 8 is not registered")
    with use_attention(model, name, **params):
        a = run(model, ids)
        changed = ids.clone()
        changed[0, 120] = (changed[0, 120] + 1) % 96
        b = run(model, changed)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:, :120], b[:, :120])  # no future leakage (prefill and decode parts)
    assert not torch.equal(a[:, 120:], b[:, 120:])


def test_sliding_window_with_large_window_is_full_attention(model, ids):
    ref = run(model, ids)
    with use_attention(model, "sliding_window", window=10_000):
        got = run(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- RetrievalAttention ---------------------------------------------------------------------------

faiss = pytest.importorskip("faiss")

from attnzoo.llm.retrieval import KeyIndex, RetrievalPress  # noqa: E402


def test_faiss_flat_equals_exact_topk_and_hnsw_recall():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(500, 16, generator=g)
    qs = torch.randn(20, 16, generator=g)
    exact = KeyIndex(keys, "exact").search(qs, 10)
    flat = KeyIndex(keys, "flat").search(qs, 10)
    assert torch.equal(exact.sort(-1).values, flat.sort(-1).values)
    hnsw = KeyIndex(keys, "hnsw", ef_search=64).search(qs, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, hnsw)) / exact.numel()
    assert recall >= 0.9


def test_retrieval_with_all_keys_retrieved_equals_full_cache(model, ids):
    full, _ = gen.prefill(model, ids)
    nxt = torch.tensor([[4, 8, 15]])
    pos = torch.arange(T, T + 3)[None]
    with torch.no_grad():
        ref = model(input_ids=nxt, past_key_values=full, position_ids=pos).logits
    p = RetrievalPress(0.6, n_sink=4, top_k=10_000, index="flat")
    cache, _ = gen.prefill(model, ids, p)
    n = int(T * 0.4)
    assert cache_lengths(cache) == [n, n]
    assert p.report()["offloaded_tokens"] == {0: T - n, 1: T - n}
    with p.decode_context(model), torch.no_grad():
        got = model(input_ids=nxt, past_key_values=cache, position_ids=pos).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_retrieval_topk_changes_output_and_hnsw_matches_flat_mostly(model, ids):
    outs = {}
    for kind in ("exact", "flat"):
        p = RetrievalPress(0.6, top_k=4, index=kind)
        cache, _ = gen.prefill(model, ids, p)
        with p.decode_context(model), torch.no_grad():
            outs[kind] = model(
                input_ids=ids[:, -2:], past_key_values=cache, position_ids=torch.tensor([[T, T + 1]])
            ).logits
    torch.testing.assert_close(outs["exact"], outs["flat"], atol=1e-5, rtol=1e-5)
    full, _ = gen.prefill(model, ids)
    with torch.no_grad():
        ref = model(
            input_ids=ids[:, -2:], past_key_values=full, position_ids=torch.tensor([[T, T + 1]])
        ).logits
    assert (outs["exact"] - ref).abs().max() > 1e-6  # only 4 of the offloaded keys are attended


def test_retrieval_decode_context_restores_attention(model, ids):
    p = RetrievalPress(0.5, index="exact")
    impl = model.config._attn_implementation
    with p(model):
        assert model.config._attn_implementation == "attnzoo_retrieval"
    assert model.config._attn_implementation == impl


def test_retrieval_under_generate_matches_explicit_decode(model, ids):
    p = RetrievalPress(0.5, top_k=8, index="exact")
    with p(model), torch.no_grad():
        g = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False
        )
    q = RetrievalPress(0.5, top_k=8, index="exact")
    cache, last = gen.prefill(model, ids, q)
    first = int(last.argmax())
    with q.decode_context(model):
        rest = gen.greedy_decode(model, cache, torch.tensor([[first]]), T, 4)
    assert g[0, T:].tolist() == [first] + rest

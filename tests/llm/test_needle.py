"""Needle-in-a-haystack machinery, perplexity/cost and the ``attnzoo llm`` CLI on a tiny random model.

The tokenizer is a byte-level BPE without merges built in memory (no download); the model is a tiny
random Llama saved to a temporary Hugging Face directory so the CLI loads it through ``load_model``.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnzoo.cli import main  # noqa: E402
from attnzoo.llm import generation as gen  # noqa: E402
from attnzoo.llm import needle as nd  # noqa: E402
from attnzoo.llm.evaluate import cost, perplexity  # noqa: E402
from attnzoo.llm.loading import load_model, resolve  # noqa: E402


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=258,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
    )
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_haystack_is_deterministic_and_seeded():
    assert nd.haystack_sentences(50, seed=1) == nd.haystack_sentences(50, seed=1)
    assert nd.haystack_sentences(50, seed=1) != nd.haystack_sentences(50, seed=2)
    assert nd.haystack_text(30, seed=0) == nd.haystack_text(30, seed=0)


def test_needle_inserted_at_depth_and_length(tok):
    needle = nd.make_needle(0)
    for depth in (0.0, 0.5, 1.0):
        ctx = nd.build_context(tok, 600, depth, needle)
        n = len(tok.encode(ctx, add_special_tokens=False))
        assert 500 <= n <= 620
        where = ctx.index(needle.sentence) / len(ctx)
        assert abs(where - depth) < 0.1
        assert ctx.count("special magic number") == 1
    assert needle.correct(f" {needle.number}.") and not needle.correct("12.")
    with pytest.raises(ValueError):
        nd.build_context(tok, 100, 1.5, needle)


def test_split_chat_without_template_concatenates_to_the_prompt(tok):
    c, q = gen.split_chat(tok, "some context", "why?", answer_prefix="Because")
    text = tok.decode(torch.cat([c, q], 1)[0])
    assert text == "<s>some context\nwhy?\nAnswer:Because"


def test_run_needle_grid_is_resumable_and_plots(model, tok, tmp_path, monkeypatch):
    out = tmp_path / "n.jsonl"
    kw = dict(
        lengths=(200,),
        depths=(0.0, 1.0),
        samples=1,
        presses={"snapkv": {"window_size": 8}, "streaming": {}},
        ratios=(0.5,),
        out=out,
        progress=False,
        max_new_tokens=3,
    )
    res = nd.run_needle(model, tok, **kw)
    assert len(res) == 2 * 3  # 2 prompts x (full + 2 presses)
    assert {nd.press_label(r.press, r.ratio) for r in res} == {"full", "snapkv@0.5", "streaming@0.5"}
    assert all(r.kept_fraction == 1.0 for r in res if r.press == "full")
    assert all(abs(r.kept_fraction - 0.5) < 0.02 for r in res if r.press != "full")
    assert len(out.read_text().splitlines()) == 6

    def boom(*a, **k):
        raise AssertionError("a finished grid must not be recomputed")

    monkeypatch.setattr(gen, "prefill_many", boom)
    again = nd.run_needle(model, tok, **kw)
    assert [r.key() for r in again] == [r.key() for r in res]
    paths = nd.plot_heatmaps(res, tmp_path / "png")
    assert len(paths) == 3 and all(p.stat().st_size > 0 for p in paths)
    assert "snapkv@0.5" in nd.markdown_table(res)


def test_query_agnostic_protocol(model, tok):
    res = nd.run_needle(
        model,
        tok,
        lengths=(150,),
        depths=(0.5,),
        samples=1,
        presses={"streaming": {}},
        ratios=(0.5,),
        progress=False,
        max_new_tokens=2,
        protocol="query_agnostic",
    )
    assert {r.protocol for r in res} == {"query_agnostic"}
    with pytest.raises(ValueError):
        nd.run_needle(model, tok, lengths=(150,), protocol="nope", progress=False)


def test_perplexity_ratio_zero_equals_full(model, tok):
    ppl = perplexity(
        model,
        tok,
        presses={"snapkv": {"window_size": 8}, "streaming": {}},
        ratios=(0.0, 0.5),
        prefix=128,
        continuation=32,
    )
    assert ppl["snapkv@0"] == ppl["full"] and ppl["streaming@0"] == ppl["full"]
    assert ppl["snapkv@0.5"] != ppl["full"]
    assert all(1.0 < v < 1e4 for v in ppl.values())


def test_cost_rows(model, tok):
    rows = cost(model, tok, contexts=(128,), presses={"streaming": {}}, ratio=0.75, new_tokens=2)
    full, st = rows
    assert full.press == "full" and st.press == "streaming@0.75"
    assert full.kv_bytes == 2 * 2 * 2 * 128 * 16 * 4  # layers x (k, v) x heads x tokens x dim x fp32
    assert st.kv_bytes == full.kv_bytes // 4
    assert full.ms_per_token > 0


def test_load_model_local_dir_and_cli(model, tok, tmp_path):
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    assert resolve(d) == (d, None)
    m2, t2 = load_model(d)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, model(ids).logits)
    out = tmp_path / "report"
    rc = main(
        [
            "llm",
            "needle",
            "--model",
            str(d),
            "--lengths",
            "160",
            "--depths",
            "0",
            "1",
            "--samples",
            "1",
            "--presses",
            "snapkv",
            "--set",
            "snapkv.window_size=8",
            "--ratios",
            "0.5",
            "--out",
            str(out),
            "--no-progress",
            "--max-new-tokens",
            "2",
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in (out / "needle_query_aware.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert (out / "needle_query_aware" / "needle_snapkv_0.5.png").exists()
    assert (
        main(
            [
                "llm",
                "perplexity",
                "--model",
                str(d),
                "--prefix",
                "64",
                "--continuation",
                "16",
                "--ratios",
                "0.5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert set(json.loads((out / "perplexity.json").read_text())) == {"full", "snapkv@0.5", "streaming@0.5"}
    assert main(["llm", "presses"]) == 0


def test_non_local_names_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path)  # an empty directory


def test_report_section(model, tok, tmp_path, monkeypatch):
    import attnzoo.llm.loading as loading
    from attnzoo.llm.cli import report_section

    def missing():
        raise FileNotFoundError("no model package")

    monkeypatch.setattr(loading, "default_model_path", missing)
    assert "Skipped: no model package" in report_section(tmp_path, quick=True)
    monkeypatch.setattr(loading, "default_model_path", lambda: tmp_path)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, tok))
    md = report_section(tmp_path, quick=True)
    assert "| snapkv@0.75 |" in md and "| full |" in md and "ms / token" in md
    assert (tmp_path / "llm" / "needle" / "needle_full.png").exists()

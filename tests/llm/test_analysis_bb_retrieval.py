"""Bigram-Backcopy task and model; the retrieval-score definitions (copy-paste rule, ROUGE-1, needle span)."""

from __future__ import annotations

import pytest
import torch

from attnzoo.llm.analysis.bigram_backcopy import BOS, VOCAB, BBModel, BBTask, bb_measures, train_bb
from attnzoo.llm.analysis.retrieval_heads import (
    copy_paste_score,
    find_needle_span,
    rouge1_recall,
    share_above,
    top_heads,
)


def test_bb_data_obeys_the_backcopy_rule():
    task = BBTask(seq_len=48, k=3)
    x = task.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 49) and bool((x[:, 0] == BOS).all())
    assert not bool(task.is_trigger(x[:, 1]).any())  # first token: marginal without the triggers
    assert int(x[:, 1:].max()) < VOCAB
    trig = task.is_trigger(x[:, 2:-1])
    assert bool(trig.any())
    assert torch.equal(x[:, 3:][trig], x[:, 1:-2][trig])  # x_{t+1} = x_{t-1} after a trigger x_t
    # triggers are the k most frequent tokens of the marginal
    assert sorted(task.marginal.topk(3).indices.tolist()) == task.triggers
    # non-trigger steps follow the bigram table: only transitions with positive probability occur
    nt = ~task.is_trigger(x[:, 1:-1])
    a, b = x[:, 1:-1][nt], x[:, 2:][nt]
    assert bool((task.cond[a, b] > 0).all())


def test_bb_model_attention_kinds():
    torch.manual_seed(0)
    x = BBTask(seq_len=16).sample(2, torch.Generator().manual_seed(1))[:, :-1]
    for kind in ("softmax", "relu"):
        m = BBModel(dim=16, seq_len=16, attn=kind)
        rec = [dict()]
        m(x, rec)
        a = rec[0]["attn"]
        assert float(a.triu(1).abs().max()) == 0.0 and float(a.min()) >= 0
        if kind == "softmax":
            assert torch.allclose(a.sum(-1), torch.ones(2, 16), atol=1e-6)
    with pytest.raises(ValueError):
        BBModel(attn="sigmoid")


class PlantedBB(torch.nn.Module):
    """Stands in for BBModel: an exact active/dormant head (previous token on triggers, BOS elsewhere),
    a value state of BOS 10x smaller than the others and a residual norm of BOS 5x larger."""

    def __init__(self, task):
        super().__init__()
        self.task = task
        self.blocks = [None]

    def forward(self, x, record=None):
        b, t = x.shape
        a = torch.zeros(b, t, t)
        a[:, 0, 0] = 1
        trig = self.task.is_trigger(x)
        for i in range(1, t):
            a[:, i, 0] = (~trig[:, i]).float()
            a[:, i, i - 1] += trig[:, i].float()
        v = torch.ones(b, t, 4)
        v[:, 0] = 0.1
        r = torch.ones(b, t, 4)
        r[:, 0] = 5.0
        record[0].update(attn=a, value=v, resid=r)
        return torch.zeros(b, t, VOCAB + 1)


def test_bb_measures_on_a_planted_active_dormant_head():
    task = BBTask(seq_len=32)
    x = task.sample(8, torch.Generator().manual_seed(2))[:, :-1]
    meas = bb_measures(PlantedBB(task), task, x)
    assert meas["bos_attn_nontrigger"] == 1.0 and meas["bos_attn_trigger"] == 0.0
    assert meas["prev_attn_trigger"] == 1.0
    assert meas["dormant_on_nontrigger"] == 1.0 and meas["active_on_trigger"] == 1.0
    assert abs(meas["value_drain"] - 0.1) < 1e-6 and abs(meas["resid_peak"] - 5.0) < 1e-6


@pytest.mark.slow
def test_bb_training_sink_emerges_and_relu_removes_it():
    sm = train_bb("softmax", steps=500, eval_every=250)
    rl = train_bb("relu", steps=500, eval_every=250)
    h0, h1 = sm["history"][0], sm["history"][-1]
    assert h1["icl_loss"] < 0.3 * h0["icl_loss"]  # the copy task is learned
    assert h1["bos_attn_nontrigger"] > 3 * h0["bos_attn_nontrigger"] and h1["bos_attn_nontrigger"] > 0.3
    assert h1["value_drain"] < 0.6  # ||v_BOS|| shrinks relative to the other tokens
    assert rl["history"][-1]["bos_attn_nontrigger"] < 0.1


def test_copy_paste_score_rule():
    prompt = [5, 6, 7, 8, 9, 10, 11]
    span = (2, 6)  # tokens 7, 8, 9, 10
    generated = [7, 8, 42]
    # (L=1, H=3) top-1 keys per step: head 0 copies correctly, head 1 attends the span but to the wrong
    # token, head 2 attends the right token outside the span (position 0 holds 5: no)
    tops = [torch.tensor([[2, 3, 0]]), torch.tensor([[3, 2, 6]]), torch.tensor([[4, 4, 4]])]
    s = copy_paste_score(prompt, span, generated, tops, 1, 3)
    assert s.tolist() == [[2 / 4, 0.0, 0.0]]
    # a generated token that is not in the prompt never counts; indices beyond the prompt are ignored
    assert copy_paste_score(prompt, span, [99], [torch.tensor([[9, 9, 9]])], 1, 3).abs().sum() == 0


def test_rouge_and_needle_span():
    assert rouge1_recall("eat a tart", "eat a custard tart") == 0.75
    assert rouge1_recall("", "x y") == 0.0
    assert rouge1_recall("Tart, TART!", "tart") == 1.0
    ids = [1, 2, 3, 4, 5, 6, 7, 3, 4]
    assert find_needle_span(ids, [4, 5, 6]) == (3, 6)
    # the official overlap rule (set overlap > 0.9) may match a window shifted by one token
    assert find_needle_span([9, 4, 5, 6, 4], [4, 5, 6, 4], exact_first=False) == (0, 4)
    assert find_needle_span([9, 4, 5, 6, 4], [4, 5, 6, 4]) == (1, 5)
    with pytest.raises(ValueError):
        find_needle_span(ids, [40, 50])


def test_top_heads_and_share():
    s = torch.tensor([[0.0, 0.5], [0.2, 0.05]])
    assert top_heads(s, 2) == [(0, 1), (1, 0)]
    assert share_above(s, (0.1,)) == {0.1: 0.5}


def test_cli_parser_and_bb_section(tmp_path):
    import argparse

    from attnzoo.llm.analysis.cli import SECTIONS, add_analyze_parser

    ap = argparse.ArgumentParser(prog="attnzoo")
    llm = ap.add_subparsers(dest="cmd").add_parser("llm").add_subparsers(dest="llm_command")
    add_analyze_parser(llm)
    args = ap.parse_args(["llm", "analyze", "bb", "--bb-steps", "20", "--out", str(tmp_path)])
    assert args.sections == ["bb"] and set(SECTIONS) >= {"sinks", "retrieval", "act", "bb"}
    assert args.func(args) == 0
    png = tmp_path / "llm_analysis_bb_training.png"
    assert png.is_file() and png.stat().st_size < 300_000
    assert "Bigram-Backcopy" in (tmp_path / "analysis.md").read_text()
    with pytest.raises(SystemExit):
        ap.parse_args(["llm", "analyze", "nonsense"])

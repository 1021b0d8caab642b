"""Analysis engine, statistics and interventions on a tiny random Llama (2 layers, 3 q heads : 1 kv head)."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnzoo.llm.analysis import (  # noqa: E402
    ACTCalibration,
    AttentionStats,
    Capture,
    HeadAblation,
    HeadOutputs,
    HeadScale,
    TopKey,
    VARRedistribution,
    act_column_scores,
    act_sinks,
    attach,
    column_normalized_entropy,
    hidden_sinks,
    recompute_attention,
    redistribute,
    residual_stats,
    row_normalized_entropy,
)
from attnzoo.llm.analysis.engine import IMPL  # noqa: E402
from attnzoo.llm.analysis.stats import HeadStats, xlogx  # noqa: E402

T = 24


def tiny_model(seed=0, impl="eager"):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- definitions on hand-built maps


def planted_map(n=10, sink_col=4, sink_w=0.5):
    """Causal map: every row puts 0.3 on key 0, ``sink_w`` on ``sink_col`` (when visible), rest uniform."""
    a = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        a[i, 0] = 1.0 if i == 0 else 0.3
        rest = 1.0 - a[i, 0]
        if i >= sink_col and i > 0:
            a[i, sink_col] += sink_w
            rest -= sink_w
        others = [j for j in range(1, i + 1) if not (j == sink_col and i >= sink_col)]
        for j in others:
            a[i, j] += rest / len(others) if others else 0
        if not others:
            a[i, 0] += rest
    return a


def test_planted_map_is_a_causal_attention_map():
    a = planted_map()
    assert torch.allclose(a.sum(-1), torch.ones(10, dtype=torch.float64), atol=1e-12)
    assert float(a.min()) >= 0
    assert float(a.triu(1).abs().max()) == 0.0


def test_act_rule_finds_the_planted_hidden_sink():
    n = 40
    a = planted_map(n)
    s = act_column_scores(a)
    # s_j = sum_i A_ij / (N - j): key 0 gets (1 + (N - 1) * 0.3) / N; every row >= 4 puts 0.5 on key 4
    assert math.isclose(float(s[0]), (1 + (n - 1) * 0.3) / n, rel_tol=1e-12)
    assert math.isclose(float(s[4]), 0.5, rel_tol=1e-12) and float(s[5:].max()) < 0.1
    sinks = act_sinks(s, thres=0.1)
    assert sinks[0] and sinks[4]
    hs = hidden_sinks(sinks)
    assert not hs[0] and hs[4] and int(hs[5:].sum()) == 0
    # the threshold is a parameter: a cut above the hidden sink's score keeps only tail keys/none
    assert not bool(hidden_sinks(act_sinks(s, thres=float(s[4]) + 1e-9))[4])
    # relative rule alpha / N
    assert bool(act_sinks(s, alpha=float(s[4]) * n - 1e-6)[4])
    assert not bool(act_sinks(s, alpha=float(s[4]) * n + 1e-6)[4])


def test_entropies_match_the_active_dormant_definitions():
    n = 6
    uni = torch.tril(torch.ones(n, n, dtype=torch.float64))
    uni = uni / uni.sum(-1, keepdim=True)
    r = row_normalized_entropy(uni)
    assert r[0] == 0 and torch.allclose(r[1:], torch.ones(n - 1, dtype=torch.float64), atol=1e-12)
    bos = torch.zeros(n, n, dtype=torch.float64)
    bos[:, 0] = 1
    assert float(row_normalized_entropy(bos).abs().max()) == 0.0
    c = column_normalized_entropy(bos)
    assert math.isclose(float(c[0]), 1.0, rel_tol=1e-12)  # BOS column: uniform over its N queries
    # streamed (column sums) form == direct form
    st = HeadStats(
        uni.sum(-2)[None, None, None], xlogx(uni).sum(-2)[None, None, None], r.mean()[None, None, None]
    )
    assert torch.allclose(st.column_entropy_max()[0, 0, 0], column_normalized_entropy(uni).max(), atol=1e-12)


def test_detector_on_planted_dormant_and_active_heads():
    n = 12
    bos = torch.zeros(n, n, dtype=torch.float64)
    bos[:, 0] = 1  # dormant: everything on BOS
    prev = torch.zeros(n, n, dtype=torch.float64)
    prev[0, 0] = 1
    for i in range(1, n):
        prev[i, i - 1] = 1  # active: previous-token head
    maps = torch.stack([bos, prev])[None]  # (B=1, L=2, N, N) with one head per layer
    maps = maps[:, :, None]
    st = HeadStats(maps.sum(-2), xlogx(maps).sum(-2), row_normalized_entropy(maps).mean(-1))
    d = st.dormant(row_threshold=0.2, col_threshold=0.9)[0, :, 0]
    assert d.tolist() == [True, False]
    assert torch.allclose(st.pos0_mass()[0, :, 0], torch.tensor([1.0, 1 / (n - 1)], dtype=torch.float64))


def test_redistribute_keeps_rows_normalized_and_is_identity_at_keep_1():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(2, 3, 5, 7), -1)
    remove = torch.zeros(7, dtype=torch.bool)
    remove[[2, 5]] = True
    receive = ~remove
    out = redistribute(w, remove, receive, keep=0.4)
    assert torch.allclose(out.sum(-1), torch.ones(2, 3, 5), atol=1e-6)
    assert torch.allclose(out[..., remove], 0.4 * w[..., remove], atol=1e-7)
    assert torch.equal(redistribute(w, remove, receive, keep=1.0), w)


# ---------------------------------------------------------------- engine on the tiny model


def test_engine_is_bit_identical_to_eager_and_restores(model, ids):
    base = logits(model, ids)
    before = state(model)
    with attach(model, AttentionStats()):
        assert model.config._attn_implementation == IMPL
        same = logits(model, ids)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(base, same)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "_az_probes") for m in model.modules())


def test_identity_interventions_reproduce_baseline_logits(model, ids):
    base = logits(model, ids)
    heads = [(0, 0), (0, 2), (1, 1)]
    for probe in (
        ACTCalibration(heads, beta=1.0),
        HeadScale(heads, alpha=1.0),
        HeadAblation([], mode="zero"),
        VARRedistribution((4, 16), sink_dims=[0, 1], p=1.0, layers=[0, 1]),
    ):
        with attach(model, probe):
            assert torch.equal(logits(model, ids), base), type(probe).__name__


def test_rows_sum_to_one_after_every_edit(model, ids):
    heads = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for probe in (
        ACTCalibration(heads, beta=0.4, thres=0.05),
        VARRedistribution((3, 20), sink_dims=[0, 1], tau=1.0, summ=0.0, rho=1.0, layers=[0, 1]),
        HeadAblation(heads[:2], mode="uniform"),
        HeadAblation(heads[2:4], mode="bos"),
    ):
        cap = Capture()
        with attach(model, probe), attach(model, cap):
            logits(model, ids)
        for _layer, w in cap.maps.items():
            assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-5), type(probe).__name__
            assert float(w.triu(1).abs().max()) == 0.0


def test_act_calibration_changes_exactly_the_selected_head(model, ids):
    a, b = Capture(), Capture()
    with attach(model, a):
        logits(model, ids)
    with attach(model, ACTCalibration([(1, 2)], beta=0.4, thres=0.05)), attach(model, b):
        logits(model, ids)
    assert torch.equal(a.maps[0], b.maps[0])  # layer 0 untouched
    assert torch.equal(a.maps[1][:, :2], b.maps[1][:, :2])  # other heads of layer 1 untouched
    w = a.maps[1][:, 2].double()
    s = act_column_scores(w)
    hs = hidden_sinks(act_sinks(s, 0.05))
    assert bool(hs.any()), "the random tiny model should have at least one column above 0.05"
    got = b.maps[1][:, 2].double()
    assert torch.allclose(
        got[..., hs[:, None, :].expand_as(w)], 0.4 * w[..., hs[:, None, :].expand_as(w)], atol=1e-6
    )


def test_masking_a_head_zeroes_its_contribution(model, ids):
    """Zero ablation of head h == zeroing the o_proj input slice of head h (an independent hook)."""
    layer, h, d = 1, 1, 16
    attn = model.model.layers[layer].self_attn

    def pre(mod, args):
        x = args[0].clone()
        x[..., h * d : (h + 1) * d] = 0
        return (x,)

    hd = attn.o_proj.register_forward_pre_hook(pre)
    try:
        want = logits(model, ids)
    finally:
        hd.remove()
    with attach(model, HeadAblation([(layer, h)], mode="zero")):
        got = logits(model, ids)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, logits(model, ids), atol=1e-4)
    # the head's output really is zero inside the run
    rec = HeadOutputs(layers=[layer], all_positions=True)
    with attach(model, HeadAblation([(layer, h)], mode="zero")), attach(model, rec):
        logits(model, ids)
    # HeadOutputs sits after the ablation in the probe order
    assert float(rec.out[layer][:, h].abs().max()) == 0.0


def test_uniform_and_bos_ablation_patterns(model, ids):
    cap = Capture(layers=[0])
    with attach(model, HeadAblation([(0, 0)], mode="uniform"), HeadAblation([(0, 1)], mode="bos"), cap):
        logits(model, ids)
    w = cap.maps[0]
    tri = torch.tril(torch.ones(T, T))
    assert torch.allclose(w[:, 0], (tri / tri.sum(-1, keepdim=True)).expand_as(w[:, 0]), atol=1e-6)
    assert torch.allclose(w[:, 1, :, 0], torch.ones(2, T))


def test_recomputed_attention_matches_captured(model, ids):
    cap = Capture()
    with attach(model, cap):
        logits(model, ids)
    for layer in (0, 1):
        ref = recompute_attention(model, ids, layer)
        assert torch.allclose(ref.float(), cap.maps[layer], atol=1e-5)


def test_stats_from_the_model_equal_stats_from_captured_maps(model, ids):
    st, cap = AttentionStats(), Capture()
    with attach(model, st, cap):
        logits(model, ids)
    r = st.result()
    maps = torch.stack([cap.maps[0], cap.maps[1]], 1).double()  # (B, L, H, N, N)
    assert torch.allclose(r.act_scores(), act_column_scores(maps), atol=1e-9)
    assert torch.allclose(r.pos0_mass(), maps[..., 1:, 0].mean(-1), atol=1e-9)
    assert torch.allclose(r.first_k_mass(4), maps[..., 4:, :4].sum(-1).mean(-1), atol=1e-9)
    assert torch.allclose(r.column_entropy_max(), column_normalized_entropy(maps).amax(-1), atol=1e-9)


def test_topkey_records_decode_steps(model, ids):
    from attnzoo.llm import generation as gen

    probe = TopKey(num_layers=2)
    cache = gen.new_cache(model)
    with torch.no_grad():
        model(input_ids=ids[:1, :10], past_key_values=cache, use_cache=True)
        with attach(model, probe):
            for t in range(10, 13):
                model(input_ids=ids[:1, t : t + 1], past_key_values=cache, use_cache=True)
    assert len(probe.steps) == 3 and probe.steps[0].shape == (2, 1, 3)
    assert int(probe.steps[2].max()) <= 12


def test_residual_stats_find_a_planted_massive_activation(model, ids):
    layer0 = model.model.layers[0]

    def plant(mod, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[:, 0, 7] = 5000.0
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    hd = layer0.register_forward_hook(plant)
    try:
        rs = residual_stats(model, ids)
    finally:
        hd.remove()
    flagged = {(layer, t, d) for layer, b, t, d, v in rs.massive if layer == 0}
    assert flagged == {(0, 0, 7)}
    assert float(rs.peak_ratio()[0].min()) > 10
    assert rs.value_norm.shape == (2, 2, 1, T)

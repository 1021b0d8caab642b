"""ACT, VAR and VHR rules on hand-built attention maps; VHR selection; the ACT search's layer restart."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnzoo.llm.analysis import (  # noqa: E402
    ACTCalibration,
    Capture,
    HeadAblation,
    VARRedistribution,
    attach,
    random_heads,
    select_vhr_heads,
    vhd_scores,
)
from attnzoo.llm.analysis.calibration import LayerInputs  # noqa: E402
from attnzoo.llm.analysis.engine import Ctx  # noqa: E402


def tiny_model(seed=0):
    """2 layers, 3 query heads : 1 kv head, head dim 16 (random weights)."""
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
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


def planted_map(n):
    """Causal map: 0.3 on key 0, 0.5 on key 4 for rows >= 4 (its own row included), the rest uniform."""
    a = torch.zeros(n, n, dtype=torch.float64)
    a[0, 0] = 1.0
    for i in range(1, n):
        a[i, 0] = 0.3
        rest = 0.7
        if i >= 4:
            a[i, 4] += 0.5
            rest -= 0.5
        others = [j for j in range(1, i + 1) if not (j == 4 and i >= 4)]
        for j in others:
            a[i, j] += rest / len(others)
    return a


def fake_ctx(layer, n_heads, q, k, d=4):
    return Ctx(
        layer, None, torch.zeros(1, n_heads, q, d), torch.zeros(1, 1, k, d), torch.zeros(1, 1, k, d), None
    )


def test_act_calibration_on_a_planted_map_matches_the_rule_by_hand():
    n = 40
    a = planted_map(n)  # sinks: key 0 (first, kept) and key 4 (hidden)
    w = torch.stack([a, a])[None]  # (1, H=2, N, N)
    probe = ACTCalibration([(3, 1)], beta=0.4, thres=0.1)
    out = probe.edit_weights(fake_ctx(3, 2, n, n), w)
    assert torch.equal(out[0, 0], a)  # head 0 not selected
    b = out[0, 1]
    assert torch.allclose(b.sum(-1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    # by hand for row i >= 4: key 4 keeps 0.4 * 0.5; the removed 0.3 goes to the other keys (key 0 included)
    # in proportion to their attention, which is 1 - 0.5 = 0.5 in total
    for i in (4, 10, 39):
        exp = a[i].clone()
        exp[4] = 0.4 * a[i, 4]
        others = torch.ones(n, dtype=torch.bool)
        others[4] = False
        others[i + 1 :] = False
        exp[others] = a[i, others] * (1 + 0.6 * a[i, 4] / a[i, others].sum())
        assert torch.allclose(b[i], exp, atol=1e-12)
    assert torch.equal(b[:4], a[:4])  # rows before the hidden sink only see non-hidden-sink keys


def test_var_redistribution_on_a_planted_map_matches_the_rule_by_hand():
    k = 8
    # tokens 0 (BOS) and 5 are sink tokens; the span is [2, 7)
    probe = VARRedistribution(span=(2, 7), sink_dims=[0], p=0.6, rho=0.5, summ=0.2, layers=[2])
    probe.flags = {2: torch.tensor([[True, False, False, False, False, True, False, False]])}
    row_sel = torch.tensor(
        [0.3, 0.05, 0.1, 0.1, 0.1, 0.15, 0.1, 0.1], dtype=torch.float64
    )  # span mass .55, sink share .27
    row_low = torch.tensor(
        [0.8, 0.1, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01], dtype=torch.float64
    )  # span mass .09 < summ
    row_sinky = torch.tensor(
        [0.1, 0.0, 0.05, 0.05, 0.0, 0.7, 0.1, 0.0], dtype=torch.float64
    )  # span sink share > rho
    # one decoding query (it sees every key)
    ctx = Ctx(2, None, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, k, 4), torch.zeros(1, 1, k, 4), None)
    out = [probe.edit_weights(ctx, r[None, None, None])[0, 0, 0] for r in (row_sel, row_low, row_sinky)]
    assert torch.equal(out[1], row_low) and torch.equal(out[2], row_sinky)
    exp = row_sel.clone()
    sinks = [0, 5]
    removed = 0.4 * (row_sel[0] + row_sel[5])
    exp[sinks] *= 0.6
    recv = [2, 3, 4, 6]  # non-sink span tokens
    exp[recv] += removed * row_sel[recv] / row_sel[recv].sum()
    assert torch.allclose(out[0], exp, atol=1e-12)
    assert abs(float(out[0].sum()) - 1.0) < 1e-12
    assert probe.selected_fraction[2] == 0.0  # the last call (row_sinky) was not selected


def test_vhr_selection_rule():
    vhd = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    assert select_vhr_heads(vhd) == [(0, 2), (0, 3)]  # strict > median; equal values -> none
    # outlier filter (std > 1): a head far above the mean in both VHD and text-only activation is dropped
    vhd = torch.tensor([[0.0, 0.1, 0.2, 9.0, 0.3]])
    act = torch.tensor([[1.0, 1.0, 1.0, 50.0, 1.0]])
    assert (0, 3) not in select_vhr_heads(vhd, act)
    assert (0, 3) in select_vhr_heads(vhd, torch.ones(1, 5))


def test_vhd_is_zero_without_a_span_and_selection_is_empty():
    model = tiny_model()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    vhd, act = vhd_scores(model, ids, (5, 5))
    assert float(vhd.abs().max()) == 0.0 and select_vhr_heads(vhd, act) == []
    vhd, _ = vhd_scores(model, ids, (3, 9))
    assert float(vhd.min()) >= 0 and float(vhd.max()) > 0


def test_layer_restart_equals_the_full_run_under_act():
    model = tiny_model()
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(2))
    li = LayerInputs(model, ids)
    assert torch.allclose(li.logits_from(0), li.full, atol=1e-6)
    probe = ACTCalibration([(1, 0), (1, 2)], beta=0.4, thres=0.05)
    with attach(model, probe):
        want = model(input_ids=ids, use_cache=False).logits[:, -1]
        got = li.logits_from(1)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, li.full, atol=1e-5)


def test_decode_only_ablation_leaves_the_prefill_alone():
    from attnzoo.llm import generation as gen

    model = tiny_model()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    cap = Capture(layers=[1])
    with attach(model, HeadAblation([(1, 0)], mode="uniform", decode_only=True), cap):
        with torch.no_grad():
            cache = gen.new_cache(model)
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
            pre = cap.maps[1].clone()
            model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
            dec = cap.maps[1]
    assert not torch.allclose(pre[0, 0, -1, :11], torch.full((11,), 1 / 11), atol=1e-3)
    assert torch.allclose(dec[0, 0, 0], torch.full((12,), 1 / 12), atol=1e-6)


def test_random_heads_exclude_and_seed():
    ex = [(0, 0), (1, 1)]
    a = random_heads(3, 2, 3, exclude=ex, seed=1)
    assert len(set(a)) == 3 and not set(a) & set(ex)
    assert a == random_heads(3, 2, 3, exclude=ex, seed=1)
    with pytest.raises(ValueError):
        HeadAblation([(0, 0)], mode="sideways")


# ---------------------------------------------------------------- patching, pruning, concentric positions


def test_activation_patching_identity_and_equivalence_with_an_o_proj_hook():
    from attnzoo.llm.analysis.patching import HeadPatch, patch_heads, record_head_outputs

    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 64, (1, 14), generator=g)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 7) % 64
    src = record_head_outputs(model, clean)
    with torch.no_grad(), attach(model):
        base_clean = model(input_ids=clean).logits
        base_corrupt = model(input_ids=corrupt).logits
    heads = [(i, h) for i in range(2) for h in range(3)]
    with torch.no_grad(), attach(model, HeadPatch(heads, src)):
        assert torch.equal(model(input_ids=clean).logits, base_clean)  # clean into clean: identity
    # independent implementation: overwrite the o_proj input slice of head 1 in layer 1 by a pre-hook
    attn = model.model.layers[1].self_attn
    want_slice = src[1][:, 1].transpose(0, 1).reshape(1, 14, 16)  # (B, T, D) of head 1

    def pre(mod, args):
        x = args[0].clone()
        x[..., 16:32] = want_slice
        return (x,)

    hd = attn.o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            want = model(input_ids=corrupt).logits
    finally:
        hd.remove()
    with torch.no_grad(), attach(model, HeadPatch([(1, 1)], src)):
        got = model(input_ids=corrupt).logits
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, base_corrupt, atol=1e-4)
    res = patch_heads(model, clean, corrupt, good=3, bad=4)
    assert res["per_head"].shape == (2, 3)
    joint = patch_heads(model, clean, clean, good=3, bad=4, heads=heads)
    assert joint["patched"] == joint["clean"]
    with pytest.raises(ValueError):
        patch_heads(model, clean, corrupt[:, :-1], 3, 4)


def test_concentric_positions_and_mask():
    from attnzoo.llm.analysis.patching import concentric_mask, concentric_position_ids, ring_index

    h = w = 6
    ring = ring_index(h, w)
    assert [int((ring == r).sum()) for r in range(3)] == [4 * (h - 2 * r) - 4 for r in range(3)]
    assert torch.equal(ring.view(h, w), ring.view(h, w).flip(0).flip(1))  # symmetric under 180 degrees
    pos = concentric_position_ids(p0=3, h=h, w=w, total=3 + 36 + 4)
    assert pos[:3].tolist() == [0, 1, 2] and int(pos[3:39].max()) == 3 + h // 2 - 1
    assert pos[39:].tolist() == [6, 7, 8, 9]
    m = concentric_mask(3, h, w, 43)
    i, j = 3 + 0, 3 + 5  # two outermost-ring tokens: see each other both ways
    assert m[i, j] and m[j, i]
    centre = 3 + 2 * 6 + 2  # ring 2
    assert not m[3 + 0, centre] and m[centre, 3 + 0]
    assert bool(m[40, :41].all()) and not bool(m[40, 41:].any())  # text after the grid: causal, sees the grid


def test_concentric_mask_probe_identity_for_a_1x1_grid_and_rows_sum_to_one():
    from attnzoo.llm.analysis.patching import ConcentricMask, concentric_position_ids

    model = tiny_model()
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), attach(model):
        base = model(input_ids=ids).logits
    with torch.no_grad(), attach(model, ConcentricMask(4, 1, 1)):
        assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-6)
    cap = Capture()
    pos = concentric_position_ids(2, 4, 4, 20)[None]
    with torch.no_grad(), attach(model, ConcentricMask(2, 4, 4), cap):
        model(input_ids=ids, position_ids=pos)
    w = cap.maps[0][0, 0]
    assert torch.allclose(w.sum(-1), torch.ones(20), atol=1e-5)
    assert float(w[2, 5]) > 0  # outer-ring query sees a later outer-ring key


def test_pruning_by_attention_importance_and_damro():
    from attnzoo.llm.analysis.patching import attention_importance, damro_logits, prune_span, top_span_tokens

    model = tiny_model()
    ids = torch.randint(0, 64, (1, 18), generator=torch.Generator().manual_seed(7))
    span = (2, 14)
    imp = attention_importance(model, ids, span)
    assert (
        imp.shape == (1, 12) and float(imp.min()) >= 0 and float(imp.sum()) <= 1 + 1e-5
    )  # one layer: 0..L-2
    keep = top_span_tokens(imp, 12)
    new, pos = prune_span(ids, span, keep)
    assert torch.equal(new, ids) and torch.equal(pos[0], torch.arange(18))  # keep all: identity
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=new, position_ids=pos).logits, model(input_ids=ids).logits, atol=1e-6
        )
    keep = top_span_tokens(imp, 4)
    new, pos = prune_span(ids, span, keep)
    assert new.shape == (1, 10) and bool((pos[0, 1:] > pos[0, :-1]).all())  # original order and positions
    assert set((pos[0, 2:6] - 2).tolist()) == set(keep.tolist())
    full = torch.tensor([[2.0, 1.0, -5.0]])
    out = damro_logits(full, torch.tensor([[1.0, 2.0, 0.0]]), alpha=1.0, beta=0.1)
    assert out[0, 0] == 3.0 and out[0, 1] == 0.0 and out[0, 2] == float("-inf")

"""The ViT backbone: every spatial mechanism by name, forward and backward on a tiny image batch;
parameters and FLOPs per mechanism; DependencyViT trees through the model."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo.models import ViT, default_config, profile
from attnzoo.models.vit import plot_dependency_tree

SPATIAL = az.list_mechanisms(capability="spatial")


def test_spatial_mechanisms_registered():
    assert {"channel_group", "spatial_window", "gpsa", "aggregated", "reversed", "ulsam"} <= set(SPATIAL)


@pytest.mark.parametrize("name", SPATIAL + ["softmax"])
def test_forward_backward_by_name(name):
    torch.manual_seed(0)
    model = ViT(name, img_size=16, patch_size=2, num_classes=5, dim=32, depth=2, num_heads=2)
    images = torch.rand(2, 3, 16, 16)
    logits = model(images)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3]))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    assert grads["patch_embed.weight"] is not None and grads["patch_embed.weight"].abs().sum() > 0
    mixer_grads = [g for n, g in grads.items() if ".mixer." in n and g is not None]
    assert mixer_grads and any(g.abs().sum() > 0 for g in mixer_grads), f"{name}: the token mixer got no gradient"


@pytest.mark.parametrize("name", ["gpsa", "channel_group", "spatial_window", "aggregated"])
def test_non_square_images_and_convglu(name):
    model = ViT(name, img_size=(12, 20), patch_size=4, dim=24, depth=1, num_heads=2, mlp="convglu")
    assert model.grid == (3, 5)
    assert model(torch.rand(1, 3, 12, 20)).shape == (1, 10)
    with pytest.raises(ValueError):
        model(torch.rand(1, 3, 20, 12))


def test_profile_reports_params_and_flops():
    rows = {}
    for name in SPATIAL + ["softmax"]:
        r = profile(name, img_size=16, patch_size=2, dim=32, depth=2, num_heads=2)
        assert r["params"] > 0 and r["flops"] > 0 and r["grid"] == (8, 8)
        assert 0 <= r["mixer_params"] < r["params"] and 0 < r["mixer_flops_per_image"] < r["flops"]
        rows[name] = r
    print("\nmechanism          params   mixer_params   GFLOPs/img  mixer MFLOPs/img")
    for name, r in rows.items():
        print(f"{name:18s} {r['params']:7d} {r['mixer_params']:12d} {r['flops_per_image'] / 1e9:12.5f} {r['mixer_flops_per_image'] / 1e6:12.3f}")
    # ULSAM has no projections: by far the cheapest mixer; the MLPs etc. are identical across rows
    assert rows["ulsam"]["mixer_params"] < rows["softmax"]["mixer_params"] / 10
    base = {k: rows["softmax"]["flops"] - rows["softmax"]["mixer_flops_per_image"] for k in rows}
    assert all(r["flops_per_image"] - r["mixer_flops_per_image"] == base[k] for k, r in rows.items())
    # batch scaling of the FLOP count (GPSA's positional map is computed once per call, not per image)
    two = profile("channel_group", img_size=16, patch_size=2, dim=32, depth=2, num_heads=2, batch_size=2)
    assert two["flops"] == 2 * rows["channel_group"]["flops"] and two["flops_per_image"] == rows["channel_group"]["flops"]
    two = profile("gpsa", img_size=16, patch_size=2, dim=32, depth=2, num_heads=2, batch_size=2)
    assert rows["gpsa"]["flops"] < two["flops"] < 2 * rows["gpsa"]["flops"]


def test_default_config_is_the_test_config():
    assert default_config("spatial_window") == {"window_size": 4}
    m = ViT("spatial_window", img_size=16, patch_size=2, dim=32, depth=1, num_heads=2)
    assert m.blocks[0].mixer.settings["window_size"] == 4
    m = ViT("spatial_window", img_size=16, patch_size=2, dim=32, depth=1, num_heads=2, mechanism_cfg={"window_size": 8})
    assert m.blocks[0].mixer.settings["window_size"] == 8


def test_reversed_model_threads_controller_and_gives_forest(tmp_path):
    torch.manual_seed(0)
    model = ViT("reversed", img_size=16, patch_size=2, dim=32, depth=3, num_heads=2).eval()
    images = torch.rand(2, 3, 16, 16)
    trees = [model.dependency_tree(images, layer=i) for i in range(3)]
    for t in trees:
        assert t.parent.shape == (2, 64) and t.grid == (8, 8)
        assert torch.equal(t.is_root, t.depth == 0)  # tree_depth raises on a cycle
    # the cumulative controller only shrinks from layer to layer
    assert (trees[2].controller <= trees[1].controller + 1e-7).all()
    assert (trees[1].controller <= trees[0].controller + 1e-7).all()
    path = tmp_path / "tree.png"
    plot_dependency_tree(images[0], trees[-1], str(path))
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError):
        ViT("gpsa", img_size=16, patch_size=2, dim=32, depth=1, num_heads=2).dependency_tree(images)


def test_rejects_unusable_mechanisms_and_sizes():
    with pytest.raises(ValueError):
        ViT("gpsa", img_size=15, patch_size=4)
    with pytest.raises(ValueError):
        ViT("gpsa", mlp="kan")

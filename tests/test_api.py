"""The public surface: attention, create, list_mechanisms, info, errors, the README table, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.capabilities import README_END, README_START, mechanism_table
from attnzoo.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_equals_sdpa(causal):
    q, k, v = (torch.randn(2, 8, 257, 64) for _ in range(3))
    out = az.attention(q, k, v, mechanism="softmax", causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - ref).abs().max() <= 1e-6


def test_cross_is_inferred_from_lengths_and_causal_cross_does_not_mask_the_source():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    out = az.attention(q, k, v, causal=True)  # N != M: causal cross, every query sees all 9 keys
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    # explicit cross=False with N < M: queries are the last N positions of a causal sequence
    out = az.attention(q, k, v, causal=True, cross=False)
    mask = torch.arange(9)[None, :] <= torch.arange(5)[:, None] + 4
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_list_and_filters():
    names = az.list_mechanisms()
    assert names == sorted(names) and "softmax" in names
    assert set(az.list_mechanisms(pattern="causal_self")) <= set(names)
    assert "momentum" in az.list_mechanisms(pattern="causal_self")
    assert "momentum" not in az.list_mechanisms(pattern="noncausal_cross")
    assert all(az.info(n).family == "softmax" for n in az.list_mechanisms(family="softmax"))
    with pytest.raises(ValueError, match="pattern"):
        az.list_mechanisms(pattern="sideways")
    with pytest.raises(ValueError, match="family"):
        az.list_mechanisms(family="quantum")


def test_info_and_unknown_names():
    spec = az.info("momentum")
    assert spec.arxiv == "2212.10559" and "decode" in spec.capabilities
    text = spec.describe()
    assert "2212.10559" in text and "causal_self" in text and "eta" in text
    with pytest.raises(KeyError, match="softmax"):
        az.info("softmx")  # a close match is suggested


def test_unknown_parameters_are_named():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="windw"):
        az.attention(q, q, q, "sliding_window", windw=3)
    with pytest.raises(TypeError, match="windw"):
        az.create("sliding_window", 16, 2, windw=3)


def test_create_builds_a_working_module():
    layer = az.create("sliding_window", dim=64, num_heads=4, causal=True, window=8)
    assert isinstance(layer, az.AttentionModule)
    y = layer(torch.randn(2, 30, 64))
    assert y.shape == (2, 30, 64)
    with pytest.raises(az.UnsupportedError, match="noncausal_cross"):
        layer_nc = az.create("sliding_window", dim=64, num_heads=4)
        layer_nc(torch.randn(2, 5, 64), context=torch.randn(2, 6, 64))


def test_gqa_module_keeps_fewer_kv_heads():
    layer = az.create("softmax", 64, 8, num_kv_heads=2, causal=True)
    assert layer.k_proj.out_features == 2 * 8
    state = layer.init_state(1)
    _, state = layer.prefill(torch.randn(1, 5, 64))
    assert state["kv"].keys.shape == (1, 2, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        az.create("softmax", 64, 8, num_kv_heads=3)


def test_readme_lists_every_mechanism_from_the_registry():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split(README_START, 1)[1].split(README_END, 1)[0].strip()
    assert block == mechanism_table(), "README's mechanism table is out of date: run `make readme`"
    assert "make test" in text.split("\n## ")[0] and "make report" in text.split("\n## ")[0]


def test_cli_list_info_report(tmp_path, capsys):
    assert cli_main(["list", "--pattern", "causal_self"]) == 0
    out = capsys.readouterr().out
    assert "momentum" in out and "2212.10559" in out
    assert cli_main(["info", "momentum"]) == 0
    assert "Why Can GPT Learn In-Context" in capsys.readouterr().out
    assert cli_main(["info", "nope"]) == 2
    capsys.readouterr()
    assert cli_main(["report", "--out", str(tmp_path), "--sections", "capabilities"]) == 0
    report = (tmp_path / "README.md").read_text()
    assert "## Capability matrix" in report
    for name in az.list_mechanisms():
        assert f"| `{name}` |" in report


def test_cli_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "attnzoo.cli", "info", "softmax"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1706.03762" in r.stdout, r.stderr

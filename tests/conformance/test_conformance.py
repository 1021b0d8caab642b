"""The conformance suite: every registered mechanism, every declared capability.

Parametrised over ``attnzoo.list_mechanisms()``; a mechanism added later is tested with no edit here.
The checks themselves are in ``checks.py``; ``test_meta.py`` shows that each one can fail.
"""

from __future__ import annotations

import pytest

from attnzoo.registry import PATTERNS, all_specs

from . import checks

SPECS = all_specs()


def _ids(spec):
    return spec.name


def _pattern_cases(pred=lambda spec, pattern: True):
    return [
        pytest.param(spec, pattern, id=f"{spec.name}-{pattern}")
        for spec in SPECS
        for pattern in PATTERNS
        if spec.supports(pattern) and pred(spec, pattern)
    ]


def _specs(pred=lambda spec: True):
    return [pytest.param(spec, id=spec.name) for spec in SPECS if pred(spec)]


def test_registry_is_populated():
    names = [s.name for s in SPECS]
    assert {"softmax", "sliding_window", "momentum"} <= set(names), names


@pytest.mark.parametrize("spec", _specs())
def test_declaration(spec):
    """Every spec cites a paper, has a reference form and consistent declarations."""
    assert spec.paper and spec.complexity, spec.name
    assert spec.module.__doc__ or spec.module.__module__, spec.name
    import sys

    doc = sys.modules[spec.module.__module__].__doc__ or ""
    assert spec.arxiv is None or spec.arxiv in doc, f"{spec.name}: the file's docstring must cite arXiv {spec.arxiv}"
    if spec.patterns:
        assert spec.functional is None or spec.reference is not None, f"{spec.name}: a functional form needs a reference form"
    assert set(spec.test_config) <= set(spec.defaults), f"{spec.name}: test_config keys must be settings: {set(spec.test_config) - set(spec.defaults)}"


@pytest.mark.parametrize("n", [1, 63, 257])
@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.functional is not None))
def test_functional_shapes(spec, pattern, n):
    checks.check_functional_shapes(spec, pattern, n)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.functional is not None))
def test_functional_float64_dtype(spec, pattern):
    import torch

    checks.check_functional_shapes(spec, pattern, 9, dtype=torch.float64)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.functional is not None))
def test_functional_gqa(spec, pattern):
    checks.check_functional_gqa(spec, pattern)


@pytest.mark.parametrize("n", [1, 63, 257])
@pytest.mark.parametrize("spec,pattern", _pattern_cases())
def test_module_shapes(spec, pattern, n):
    checks.check_module_shapes(spec, pattern, n)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: checks.is_causal(p)))
def test_no_future_leak(spec, pattern):
    checks.check_no_future_leak(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: checks.is_causal(p) and s.functional is not None))
def test_functional_no_future_leak(spec, pattern):
    checks.check_functional_no_future_leak(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: checks.is_cross(p)))
def test_cross_sees_whole_source(spec, pattern):
    checks.check_cross_sees_source(spec, pattern)


@pytest.mark.parametrize("spec", _specs(lambda s: s.supports("decode")))
def test_decode_matches_forward(spec):
    checks.check_decode(spec)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.supports("key_padding_mask")))
def test_key_padding(spec, pattern):
    checks.check_key_padding(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases())
def test_batch_independence(spec, pattern):
    checks.check_batch_independence(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases())
def test_determinism(spec, pattern):
    checks.check_determinism(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.supports("trainable")))
def test_gradients(spec, pattern):
    checks.check_gradients(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases(lambda s, p: s.functional is not None))
def test_functional_matches_reference(spec, pattern):
    checks.check_functional_matches_reference(spec, pattern)


@pytest.mark.parametrize("spec,pattern", _pattern_cases())
def test_module_matches_reference(spec, pattern):
    checks.check_module_matches_reference(spec, pattern)


@pytest.mark.parametrize("shape", [(7, 9), (14, 14), (1, 1)])
@pytest.mark.parametrize("spec", _specs(lambda s: s.supports("spatial")))
def test_spatial(spec, shape):
    checks.check_spatial(spec, shape)


@pytest.mark.parametrize("spec", _specs())
def test_unsupported_capabilities(spec):
    checks.check_unsupported(spec)


@pytest.mark.parametrize("case", checks.bad_functional_inputs(), ids=lambda c: c[0])
@pytest.mark.parametrize("spec", _specs(lambda s: s.functional is not None and bool(s.patterns)))
def test_bad_functional_input(spec, case):
    checks.check_bad_functional_input(spec, case)


@pytest.mark.parametrize("spec", _specs())
def test_bad_module_input(spec):
    checks.check_bad_module_inputs(spec)

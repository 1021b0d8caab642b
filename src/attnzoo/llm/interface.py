"""Zoo mechanisms inside a pretrained model, through transformers' ``AttentionInterface``.

``with use_attention(model, "sliding_window", window=256): model.generate(...)`` replaces the attention
computation of every layer by ``attnzoo.attention(q, k, v, mechanism=..., causal=True)`` (training-free;
q/k/v come from the model's own projections and RoPE; the cache is untouched). The function is
registered together with ``AttentionMaskInterface`` (``sdpa_mask``) so transformers keeps building the
causal mask for this implementation name (without it, recent transformers pass ``attention_mask=None``).
The zoo mechanism applies its own causal rule (query ``i`` of ``N`` sees keys ``j <= i + M - N``), so
batches must be unpadded (batch 1 or equal lengths); a padded 2-D attention mask raises.
"""

from __future__ import annotations

import contextlib

from .loading import require_transformers


def register_attention(name: str, fn) -> None:
    """Register ``fn(module, query, key, value, attention_mask, **kw) -> (out (B, N, H, D), weights)`` under ``name``."""
    require_transformers()
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53: masks are built for any name
        AttentionMaskInterface = None
    AttentionInterface.register(name, fn)
    if AttentionMaskInterface is not None:
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Temporarily switch ``model`` (and its sub-configs) to the registered attention ``name``."""
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield model
    finally:
        model.config._attn_implementation = old


def sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def zoo_attention_function(mechanism: str, **params):
    """The AttentionInterface function running attnzoo mechanism ``mechanism`` with ``params``."""
    import attnzoo

    spec = attnzoo.info(mechanism)
    accepted, var_kw = (
        attnzoo._accepted_params(spec.functional) if spec.functional is not None else (frozenset(), False)
    )

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        extra = dict(params)
        d = query.shape[-1]
        if scaling is not None and abs(float(scaling) - d**-0.5) > 1e-12:
            if "scale" not in accepted and not var_kw:
                raise ValueError(
                    f"{mechanism}: the model uses scaling {scaling}, the mechanism takes no 'scale'"
                )
            extra.setdefault("scale", float(scaling))
        out = attnzoo.attention(query, key, value, mechanism=mechanism, causal=True, cross=False, **extra)
        return out.transpose(1, 2).contiguous(), None

    return fn


@contextlib.contextmanager
def use_attention(model, mechanism: str, **params):
    """Run ``model`` with attnzoo mechanism ``mechanism`` (settings ``params``) in every attention layer."""
    import attnzoo

    spec = attnzoo.info(mechanism)
    spec.require("causal_self")
    name = f"attnzoo_{spec.name}_{abs(hash(tuple(sorted((k, repr(v)) for k, v in params.items())))):x}"
    register_attention(name, zoo_attention_function(spec.name, **params))
    with attention_implementation(model, name):
        yield model

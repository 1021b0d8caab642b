"""Looking inside a pretrained LLM's attention: sinks, massive activations, active/dormant heads,
retrieval heads, and training-free interventions (ACT, VAR, VHR, head ablation, activation patching,
attention-importance pruning, concentric positions) as probes / context managers.

>>> from attnzoo.llm import load_model
>>> from attnzoo.llm.analysis import attach, AttentionStats, ablate_heads
>>> model, tok = load_model()
>>> with attach(model, AttentionStats()) as st:
...     model(input_ids=ids)
>>> st.result().pos0_mass()                      # (B, layers, heads) attention mass on position 0

Every analysis works on any Hugging Face Llama-family decoder (fast tests use a tiny random Llama; the
default real model is SmolLM2-135M-Instruct). See ``docs/llm-analysis.md``.
"""

from .engine import (
    IMPL,
    Capture,
    Ctx,
    HeadOutputs,
    Probe,
    TopKey,
    attach,
    recompute_attention,
)
from .interventions import (
    ACTCalibration,
    HeadAblation,
    HeadScale,
    VARRedistribution,
    ablate_heads,
    act_calibration,
    head_reinforcement,
    mean_head_outputs,
    random_heads,
    redistribute,
    select_vhr_heads,
    var_redistribution,
    vhd_scores,
)
from .patching import (
    ConcentricMask,
    HeadPatch,
    attention_importance,
    concentric_mask,
    concentric_position_ids,
    damro_logits,
    patch_heads,
    prune_span,
    record_head_outputs,
)
from .stats import (
    AttentionStats,
    HeadStats,
    act_column_scores,
    act_sinks,
    column_normalized_entropy,
    hidden_sinks,
    residual_stats,
    row_normalized_entropy,
    sink_dims_from_first_token,
    var_sink_tokens,
)

__all__ = [
    "IMPL",
    "ACTCalibration",
    "ConcentricMask",
    "HeadPatch",
    "attention_importance",
    "concentric_mask",
    "concentric_position_ids",
    "damro_logits",
    "patch_heads",
    "prune_span",
    "record_head_outputs",
    "AttentionStats",
    "Capture",
    "Ctx",
    "HeadAblation",
    "HeadOutputs",
    "HeadScale",
    "HeadStats",
    "Probe",
    "TopKey",
    "VARRedistribution",
    "ablate_heads",
    "act_calibration",
    "act_column_scores",
    "act_sinks",
    "attach",
    "column_normalized_entropy",
    "head_reinforcement",
    "hidden_sinks",
    "mean_head_outputs",
    "random_heads",
    "recompute_attention",
    "redistribute",
    "residual_stats",
    "row_normalized_entropy",
    "select_vhr_heads",
    "sink_dims_from_first_token",
    "var_redistribution",
    "var_sink_tokens",
    "vhd_scores",
]

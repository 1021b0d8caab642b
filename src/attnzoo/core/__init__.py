"""Pieces shared by many mechanisms and owned by none."""

from .cache import KVCache
from .layout import expand_kv, merge_heads, split_heads, validate_qkv
from .masks import (
    and_masks,
    block_diagonal,
    block_mask,
    causal,
    dense_mask,
    or_masks,
    sliding_window,
    strided,
)
from .module import AttentionModule, state_tensors
from .positional import alibi_bias, alibi_slopes, apply_rope
from .reference import reference_attention

__all__ = [
    "AttentionModule",
    "KVCache",
    "alibi_bias",
    "alibi_slopes",
    "and_masks",
    "apply_rope",
    "block_diagonal",
    "block_mask",
    "causal",
    "dense_mask",
    "expand_kv",
    "merge_heads",
    "or_masks",
    "reference_attention",
    "sliding_window",
    "split_heads",
    "state_tensors",
    "strided",
    "validate_qkv",
]

"""Small models built from attnzoo mechanisms: :class:`ViT`, an isotropic vision transformer whose
token mixer is any ``spatial`` (or non-causal 1-D) mechanism, chosen by name."""

from __future__ import annotations

from .vit import ViT, default_config, profile

__all__ = ["ViT", "default_config", "profile"]

"""Pretrained Hugging Face models: loading, KV-cache presses, analysis, interventions."""

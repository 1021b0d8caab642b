"""The one small model recipe of the quality benchmark, with the mechanism under test plugged in.

Every model is pre-norm: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` (4x GELU MLP), learned
absolute positions, a final LayerNorm and a linear head. Only the attention layers change between
mechanisms; they are built with :func:`attnzoo.create` from the registry, so a mechanism registered
later needs no edit here.

* :class:`TokenModel`: token embedding (or a sum of per-channel embeddings), ``layers``
  self-attention blocks; head ``"lm"`` (logits per position) or ``"cls"`` (logits from position 0,
  the CLS token).
* :class:`CrossModel`: a decoder whose attention is the mechanism as *cross*-attention to a memory.
  The memory is the sum of per-channel token embeddings (e.g. key + value for pre-bound pairs,
  token + position for a source sequence; no encoder layers, so the cross-attention alone does the
  work); queries are token embeddings (optionally tied to memory channel 0) plus optional learned
  positions (optionally the source's position table, so position t of the target and of the source
  start out with the same embedding). Built with ``causal=True`` for the causal-cross pattern: the source is never masked,
  output ``i`` may only depend on queries ``<= i``.

The image task (``shapes``) uses the library's own :class:`attnzoo.models.ViT`, so that its accuracy,
parameters, FLOPs and time per image describe the same network that ``attnzoo.models.profile`` counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def make_attention(mechanism: str, dim: int, heads: int, *, causal: bool, settings: Mapping[str, Any] | None = None) -> nn.Module:
    """The attention layer of ``mechanism`` from the registry."""
    import attnzoo

    return attnzoo.create(mechanism, dim, heads, causal=causal, **dict(settings or {}))


#: Standard deviation of token and position embeddings: PyTorch's ``nn.Embedding`` default N(0, 1), as in
#: the calibration harness of benchmarks.md 6.1. It matters: with GPT-style 0.02 softmax attention stayed
#: on the MQAR plateau (~0.15) for 700+ steps at d=64 where N(0, 1) escaped it at step ~600.
EMBED_STD = 1.0


def _embedding(num: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(num, dim)
    nn.init.normal_(emb.weight, std=EMBED_STD)
    return emb


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(LN(x)[, LN(context)])`` then ``x + MLP(LN(x))``."""

    def __init__(self, attn: nn.Module, dim: int, *, cross: bool = False, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm_ctx = nn.LayerNorm(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        if self.norm_ctx is not None:
            x = x + self.attn(h, self.norm_ctx(context))
        else:
            x = x + self.attn(h)
        return x + self.mlp(self.norm2(x))


class TokenModel(nn.Module):
    """Token embedding + learned positions + ``layers`` blocks + LN + head (``"lm"`` or ``"cls"``)."""

    def __init__(
        self,
        mechanism: str,
        *,
        vocab: int | Sequence[int],
        length: int,
        dim: int,
        heads: int,
        layers: int,
        causal: bool,
        head: str = "lm",
        num_classes: int | None = None,
        settings: Mapping[str, Any] | None = None,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        if head not in ("lm", "cls"):
            raise ValueError(f"head must be 'lm' or 'cls', got {head!r}")
        self.head_kind = head
        vocabs = [vocab] if isinstance(vocab, int) else list(vocab)
        self.channels = None if isinstance(vocab, int) else len(vocabs)
        self.embed = nn.ModuleList(_embedding(v, dim) for v in vocabs)
        self.pos = nn.Parameter(torch.randn(length, dim) * EMBED_STD)
        self.blocks = nn.ModuleList(
            Block(make_attention(mechanism, dim, heads, causal=causal, settings=settings), dim, mlp_ratio=mlp_ratio)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, int(num_classes or vocabs[0]) if head == "lm" else int(num_classes or 0))

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs (B, N)`` token ids, or ``(B, N, channels)`` when built with a list of vocabularies
        (the channel embeddings are summed)."""
        n = inputs.shape[1]
        if n > self.pos.shape[0]:
            raise ValueError(f"sequence of {n} tokens is longer than the model's {self.pos.shape[0]} positions")
        if self.channels is None:
            x = self.embed[0](inputs)
        else:
            if inputs.dim() != 3 or inputs.shape[2] != self.channels:
                raise ValueError(f"inputs must be (B, N, {self.channels}), got {tuple(inputs.shape)}")
            x = sum(emb(inputs[..., c]) for c, emb in enumerate(self.embed))
        x = x + self.pos[:n]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x if self.head_kind == "lm" else x[:, 0])


class CrossModel(nn.Module):
    """Decoder of ``layers`` cross-attention blocks (the mechanism) over an embedded memory."""

    def __init__(
        self,
        mechanism: str,
        *,
        memory_vocabs: Sequence[int],
        query_vocab: int,
        out_vocab: int,
        dim: int,
        heads: int,
        layers: int,
        causal: bool,
        query_length: int | None = None,
        tie_query_embedding: bool = False,
        tie_query_positions: int | None = None,
        settings: Mapping[str, Any] | None = None,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.memory_embed = nn.ModuleList(_embedding(v, dim) for v in memory_vocabs)
        if tie_query_embedding:
            if query_vocab > memory_vocabs[0]:
                raise ValueError("a tied query embedding needs query_vocab <= memory_vocabs[0]")
            self.query_embed = None
        else:
            self.query_embed = _embedding(query_vocab, dim)
        self.tie_query_positions = tie_query_positions
        self.query_pos = nn.Parameter(torch.randn(query_length, dim) * EMBED_STD) if query_length and tie_query_positions is None else None
        self.blocks = nn.ModuleList(
            Block(make_attention(mechanism, dim, heads, causal=causal, settings=settings), dim, cross=True, mlp_ratio=mlp_ratio)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_vocab)

    def forward(self, memory: Tensor, queries: Tensor) -> Tensor:
        """``memory (B, M, channels)`` token ids per channel, ``queries (B, Q)`` -> logits ``(B, Q, out_vocab)``."""
        if memory.dim() != 3 or memory.shape[2] != len(self.memory_embed):
            raise ValueError(f"memory must be (B, M, {len(self.memory_embed)}), got {tuple(memory.shape)}")
        mem = sum(emb(memory[..., c]) for c, emb in enumerate(self.memory_embed))
        q_emb = self.memory_embed[0] if self.query_embed is None else self.query_embed
        x = q_emb(queries)
        if self.tie_query_positions is not None:  # the source's position table (memory channel) for the queries too
            x = x + self.memory_embed[self.tie_query_positions].weight[: queries.shape[1]]
        elif self.query_pos is not None:
            x = x + self.query_pos[: queries.shape[1]]
        for blk in self.blocks:
            x = blk(x, mem)
        return self.head(self.norm(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

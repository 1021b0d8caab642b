"""PrFlashAttention: probabilistic block participation by block distance, plus a RoPE+ALiBi option.

Paper: "The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in
Generative AI" (Fulu Li, arXiv 2410.18441). No code was released. The abstract says: "a
probabilistic FlashAttention (PrFlashAttention) method with a probability distribution over block
distances in the matrix to decide which block is likely to participate in a given round of
attention computation while maintaining the lower triangle shape of the tensor for autoregressive
language models by re-shaping the tensors", and proposes "a factored combination of rotary
positional encoding (RoPE) and attention with linear biases (ALiBi) with a harmonic series".
The paper's details could not be read; **this file implements the documented best reading**
(the library spec's proposal), not a verified reproduction:

* Tiles: queries and keys are cut into blocks of ``block_size`` positions (FlashAttention tiles).
  For query block ``I`` and key block ``J`` at block distance ``delta = I - J`` (``|I - J|`` when
  non-causal), the tile participates with probability
  ``p(delta) = 1`` for ``delta < min_keep`` and ``p(delta) = (1 + delta)^(-alpha)`` otherwise
  (``alpha = 1``: the harmonic law, the paper's recurring series). The diagonal tile is always kept,
  so every row has keys. Causal: only ``J <= I`` tiles exist (the lower-triangle shape) and the
  diagonal tile is masked causally inside.
* Skipped tiles are left out of the softmax, which renormalises over the kept ones (what an online
  softmax that never visits the tile computes). The fast form gathers, per query block, only its
  kept key tiles (the "re-shaping": the lower triangle packed into ``(blocks, kept tiles)``), so the
  expected cost is ``sum_delta p(delta) * #tiles(delta)``, ``O(N b log(N / b))`` for ``alpha = 1``.
* Randomness: tile ``(h, I, J)`` is kept iff ``u < p(delta)`` with ``u`` drawn from a
  ``torch.Generator`` seeded by ``(seed, I)``, so the draw for a tile does not depend on the
  sequence length, the batch or the call: the mechanism is deterministic given ``seed``. A module
  built with ``resample=True`` advances the seed at every training-mode forward ("a given round");
  in eval mode the pattern is fixed.
* ``positional="rope_alibi"``: RoPE on q and k (absolute positions) and an ALiBi-style bias
  ``-alibi_scale * (1 / h) * distance`` for head ``h = 1..H`` (harmonic slopes instead of ALiBi's
  geometric ones). Which heads/dims get which part ("factored") is not known; here every head gets
  both. With ``alibi_scale = 0`` it is plain RoPE; distance 0 has no bias.

No key padding mask (the tiling is positional) and no decoding. The reference form expands the
same tile draw into a dense ``(N, M)`` mask and runs the golden masked softmax.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...core.layout import expand_kv, validate_qkv
from ...core.module import AttentionModule
from ...core.positional import apply_rope
from ...core.reference import reference_attention
from ...registry import register

NAME = "prflash"


def harmonic_slopes(num_heads: int, alibi_scale: float = 1.0) -> Tensor:
    """Slopes ``alibi_scale / h`` for ``h = 1..H`` (float64)."""
    return alibi_scale / torch.arange(1, num_heads + 1, dtype=torch.float64)


def participation_probability(delta: Tensor, alpha: float = 1.0, min_keep: int = 1) -> Tensor:
    """``p(delta)``: 1 for ``delta < min_keep``, ``(1 + delta)^-alpha`` beyond."""
    p = (1.0 + delta.to(torch.float64)) ** (-alpha)
    return torch.where(delta < min_keep, torch.ones_like(p), p)


def tile_mask(
    num_heads: int, q_blocks: Tensor, k_blocks: int, *, causal: bool, alpha: float, min_keep: int, seed: int
) -> Tensor:
    """Kept tiles ``(H, len(q_blocks), k_blocks)`` for query block ids ``q_blocks`` (absolute).

    Row ``I`` draws its uniforms from a generator seeded by ``(seed, I)``: a tile's fate does not
    depend on how many blocks the sequence has.
    """
    rows = []
    nmax = k_blocks
    for blk in q_blocks.tolist():
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(blk)) % (2**63 - 1))
        # drawn key-block-major, so the uniform of tile (I, J, h) does not depend on how many key blocks exist
        u = torch.rand(nmax, num_heads, generator=g, dtype=torch.float64).T
        rows.append(u)
    u = torch.stack(rows, dim=1) if rows else torch.zeros(num_heads, 0, nmax, dtype=torch.float64)
    qb = q_blocks[:, None].cpu()
    kb = torch.arange(nmax)[None, :]
    delta = (qb - kb) if causal else (qb - kb).abs()
    keep = u < participation_probability(delta, alpha, min_keep)[None]
    keep = keep | (delta == 0)[None]
    if causal:
        keep = keep & (kb <= qb)[None]
    return keep


def _check(q, k, causal, cross, block_size, alpha, min_keep, positional):
    if cross:
        raise ValueError(f"{NAME}: only self-attention is defined")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{NAME}: block_size must be a positive int, got {block_size!r}")
    if alpha < 0 or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"{NAME}: need alpha >= 0 and min_keep >= 1, got alpha={alpha!r}, min_keep={min_keep!r}")
    if positional not in ("none", "rope_alibi"):
        raise ValueError(f"{NAME}: positional must be 'none' or 'rope_alibi', got {positional!r}")
    if q.shape[2] > k.shape[2] and causal:
        raise ValueError(f"{NAME}: causal self-attention needs N <= M, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"{NAME}: non-causal self-attention needs N == M, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def _positions(q, k, positional, rope_base):
    n, m = q.shape[2], k.shape[2]
    if positional == "rope_alibi":
        q = apply_rope(q, base=rope_base, offset=m - n)
        k = apply_rope(k, base=rope_base)
    return q, k


def prflash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 64,
    alpha: float = 1.0,
    min_keep: int = 1,
    seed: int = 0,
    positional: str = "none",
    rope_base: float = 10000.0,
    alibi_scale: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """Probabilistic block-sparse attention on ``(B, H, N, D)``: gathers each query block's kept key tiles."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(q, k, causal, cross, block_size, alpha, min_keep, positional)
    if key_padding_mask is not None:
        raise ValueError(f"{NAME}: key_padding_mask is not supported (the tiling is positional)")
    k, v = expand_kv(k, v, q.shape[1])
    q, k = _positions(q, k, positional, rope_base)
    bsz, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    b = block_size
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    off = m - n
    nbk = -(-m // b)
    b0 = off // b
    lead = off - b0 * b
    nbq = (m - 1) // b - b0 + 1
    qblocks = torch.arange(b0, b0 + nbq)
    keep = tile_mask(h, qblocks, nbk, causal=causal, alpha=alpha, min_keep=min_keep, seed=seed).to(q.device)
    kmax = int(keep.sum(-1).max())
    # kept tiles first (in block order), then padding: a stable sort of "not kept"
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True)[1][..., :kmax]  # (H, nbq, kmax)
    tvalid = keep.gather(-1, order)
    # gather key positions of the kept tiles
    kpos = (order[..., None] * b + torch.arange(b, device=q.device)).reshape(h, nbq, kmax * b)  # (H, nbq, T)
    kvalid = tvalid[..., None].expand(h, nbq, kmax, b).reshape(h, nbq, kmax * b) & (kpos < m)
    kpos_c = kpos.clamp_max(m - 1)
    tq = nbq * b
    qp = torch.nn.functional.pad(q, (0, 0, lead, tq - lead - n)).view(bsz, h, nbq, b, d)
    idx = kpos_c.reshape(1, h, nbq * kmax * b, 1)
    kg = k.gather(2, idx.expand(bsz, -1, -1, d)).view(bsz, h, nbq, kmax * b, d)
    vg = v.gather(2, idx.expand(bsz, -1, -1, dv)).view(bsz, h, nbq, kmax * b, dv)
    s = torch.matmul(qp, kg.transpose(-1, -2)) * scale  # (B, H, nbq, b, T)
    qpos = (qblocks.to(q.device)[:, None] * b + torch.arange(b, device=q.device)[None, :])  # (nbq, b) absolute
    allowed = kvalid[:, :, None, :]
    if causal:
        allowed = allowed & (kpos[:, :, None, :] <= qpos[None, :, :, None])
    if positional == "rope_alibi":
        slopes = harmonic_slopes(h, alibi_scale).to(q.dtype).to(q.device)
        dist = (qpos[None, :, :, None] - kpos[:, :, None, :]).abs().to(q.dtype)
        s = s - slopes[:, None, None, None] * dist
    s = s.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vg)  # the diagonal tile always holds the query itself
    return out.reshape(bsz, h, tq, dv)[:, :, lead : lead + n]


def prflash_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 64,
    alpha: float = 1.0,
    min_keep: int = 1,
    seed: int = 0,
    positional: str = "none",
    rope_base: float = 10000.0,
    alibi_scale: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """Dense form: the tile draw expanded to an ``(N, M)`` mask (+ harmonic ALiBi), golden softmax."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(q, k, causal, cross, block_size, alpha, min_keep, positional)
    if key_padding_mask is not None:
        raise ValueError(f"{NAME}: key_padding_mask is not supported (the tiling is positional)")
    k, v = expand_kv(k, v, q.shape[1])
    q, k = _positions(q, k, positional, rope_base)
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    nbk = -(-m // block_size)
    all_rows = torch.arange(nbk)
    keep = tile_mask(h, all_rows, nbk, causal=causal, alpha=alpha, min_keep=min_keep, seed=seed)  # (H, nbk, nbk)
    allowed = keep[:, i // block_size, j // block_size]  # (H, N, M)
    if causal:
        allowed = allowed & (j <= i)[None]
    bias = torch.zeros(h, n, m, dtype=q.dtype)
    if positional == "rope_alibi":
        bias = -harmonic_slopes(h, alibi_scale).to(q.dtype)[:, None, None] * (i - j).abs().to(q.dtype)[None]
    bias = bias.masked_fill(~allowed, float("-inf"))
    return reference_attention(q, k, v, bias[None], scale=scale)


@register(
    NAME,
    paper="The Nature of Mathematical Modeling and Probabilistic Optimization Engineering in Generative AI",
    arxiv="2410.18441",
    family="sparse",
    capabilities={"causal_self", "noncausal_self", "trainable"},
    complexity="expected O(N b d sum_delta p(delta)) = O(N b d log(N/b)) for the harmonic law",
    functional=prflash_attention,
    reference=prflash_attention_reference,
    defaults={
        "block_size": 64,
        "alpha": 1.0,
        "min_keep": 1,
        "seed": 0,
        "resample": False,
        "positional": "none",
        "rope_base": 10000.0,
        "alibi_scale": 1.0,
        "scale": None,
    },
    summary="each (query block, key block) tile participates with probability (1 + distance)^-alpha (seeded); "
    "lower-triangle kept; optional RoPE + harmonic-slope ALiBi",
    deviations="the paper's details are unavailable: best reading of the abstract (tile law, seeding, harmonic slopes "
    "and the RoPE/ALiBi split are design choices, documented in the module docstring)",
    test_config={"block_size": 8},
)
class PrFlashAttention(AttentionModule):
    """PrFlashAttention layer; ``resample=True`` draws a new tile pattern at every training-mode forward."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        self.round = 0

    def op_params(self):
        s = {k: v for k, v in self.settings.items() if k != "resample"}
        if self.settings["resample"] and self.training:
            self.round += 1
            s["seed"] = s["seed"] + self.round
        return s

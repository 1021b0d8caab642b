"""S2-Attention: per-head strided block-sparse context shards plus local blocks.

Paper: "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" / "Efficient LLM
Training and Serving with Heterogeneous Context Sharding among Attention Heads" (Lin et al., 2024,
arXiv 2407.17678). Official code: linxihui/dkernel (``dkernel/utils.py`` ``get_sparse_attn_mask``),
whose block pattern this file reproduces.

Padding. ``key_padding_mask`` marks tokens that are not part of the sequence (variable lengths, as in
dkernel's left-padding / varlen inference): the pattern is laid on the real tokens only, so padding
changes nothing for them; padded query rows are zero.

Pattern. The sequence is cut into blocks of ``block_size`` tokens. For pattern head ``h`` (``H`` of them),
query block ``i`` and key block ``j``::

    step      = max(1, int(vert_stride / H))
    vert[h,j] = (j + h*step + head_sliding_offset) % vert_stride == 0       (dense heads: always)
    block[h,i,j] = (i >= j) and ((i - j < local_blocks) or vert[h,j])

and token ``p`` sees token ``q`` iff ``block[h, p // bs, q // bs]`` and ``q <= p`` (causal inside the
diagonal block). Each head thus sees its local window plus one of every ``vert_stride`` remote blocks,
with the phase shifted per head so that different heads shard the context. The union of the heads
covers every remote block iff the phases ``{h*step + offset mod vert_stride}`` hit every residue,
which fails when there are fewer (sparse) pattern heads than ``vert_stride``; :func:`s2_coverage`
reports it and the module warns once and keeps the report in ``coverage``.

Fast form (pure PyTorch, forward and backward): for every (head, query block) the key blocks it may
see are listed (local blocks first, then the strided remote blocks, padded to the longest list), the
key/value blocks are gathered, and one ``scaled_dot_product_attention`` call runs on the gathered tiles
with the token mask. Cost ``O(N (local_blocks * bs + N / vert_stride) d)`` per head, which is the
paper's ``~N^2 / vert_stride``; the ``N x N`` mask is never built. Decoding keeps a full KV cache
(the strided pattern is KV-cache friendly: blocks a later token needs were needed before, so a
server may evict the rest; this module does not evict).

Grouped-query attention: by default (``gqa_pattern="query"``) every query head has its own shard, so
GQA is exactly "repeat each key/value head" (what the conformance suite checks). dkernel instead gives
one pattern per key/value head shared by its query group, with ``step`` still computed from the number
of *query* heads; that is ``gqa_pattern="kv"`` (it lets a server evict per KV head). Without GQA the two
are identical. Causal self-attention only, as in the paper's kernels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import merge_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register
from .neighborhood import _varlen_ranks, varlen_by_padding


@dataclass(frozen=True)
class S2Coverage:
    """Which remote residues ``j mod vert_stride`` the union of the sparse heads sees."""

    covered: bool
    phases: tuple[int, ...]
    missing: tuple[int, ...]
    vert_stride: int

    def __str__(self) -> str:
        if self.covered:
            return f"the heads' strided shards cover every block residue mod {self.vert_stride}"
        return (
            f"the heads' strided shards cover residues {sorted(set(self.phases))} mod {self.vert_stride} only; "
            f"remote blocks j with j mod {self.vert_stride} in {list(self.missing)} are seen by no head outside "
            "the local window (use at least vert_stride sparse heads, head_sliding_offset, or dense heads)"
        )


def _check(block_size, local_blocks, vert_stride, num_dense_heads, heads):
    for name, val in (
        ("block_size", block_size),
        ("local_blocks", local_blocks),
        ("vert_stride", vert_stride),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"s2: {name} must be a positive int, got {val!r}")
    if not isinstance(num_dense_heads, int) or not 0 <= num_dense_heads <= heads:
        raise ValueError(f"s2: num_dense_heads must be in [0, {heads}], got {num_dense_heads!r}")


def s2_vertical(
    heads: int,
    num_blocks: int,
    vert_stride: int,
    *,
    homo_head: bool = False,
    head_sliding_offset: int = 0,
    num_dense_heads: int = 0,
    step_heads: int | None = None,
    device=None,
) -> Tensor:
    """``vert (heads, num_blocks)``: which remote key blocks each pattern head sees.

    ``step_heads`` (default ``heads``) is the head count in ``step = max(1, int(vert_stride / step_heads))``.
    """
    step = 0 if homo_head else max(1, int(vert_stride / (step_heads or heads)))
    h = torch.arange(heads, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    vert = (j + h * step + head_sliding_offset) % vert_stride == 0
    if num_dense_heads:
        vert[heads - num_dense_heads :] = True
    return vert


def s2_coverage(
    heads: int,
    vert_stride: int,
    *,
    homo_head: bool = False,
    head_sliding_offset: int = 0,
    num_dense_heads: int = 0,
    step_heads: int | None = None,
) -> S2Coverage:
    """Does the union of the heads' strided shards cover every key block? (spec 8, sanity property iii)."""
    if num_dense_heads > 0:
        return S2Coverage(True, tuple(range(vert_stride)), (), vert_stride)
    step = 0 if homo_head else max(1, int(vert_stride / (step_heads or heads)))
    phases = tuple(sorted({(-(h * step + head_sliding_offset)) % vert_stride for h in range(heads)}))
    missing = tuple(r for r in range(vert_stride) if r not in phases)
    return S2Coverage(not missing, phases, missing, vert_stride)


def _query_head_vertical(heads, hkv, nbk, vert_stride, gqa_pattern, device, **kw) -> Tensor:
    """``(heads, nbk)`` vertical pattern of every query head."""
    if gqa_pattern == "query":
        return s2_vertical(heads, nbk, vert_stride, device=device, **kw)
    if gqa_pattern == "kv":  # dkernel: one pattern per kv head, step from the query-head count
        return s2_vertical(hkv, nbk, vert_stride, step_heads=heads, device=device, **kw).repeat_interleave(
            heads // hkv, 0
        )
    raise ValueError(f"s2: gqa_pattern must be 'query' or 'kv', got {gqa_pattern!r}")


def s2_block_mask(
    heads, q_blocks, k_blocks, local_blocks, vert_stride, *, vert: Tensor | None = None, **kw
) -> Tensor:
    """``(heads, q_blocks, k_blocks)`` block mask; query blocks are the last ``q_blocks`` of ``k_blocks``."""
    vert = s2_vertical(heads, k_blocks, vert_stride, **kw) if vert is None else vert
    i = torch.arange(k_blocks - q_blocks, k_blocks, device=vert.device)[None, :, None]
    j = torch.arange(k_blocks, device=vert.device)[None, None, :]
    return (i >= j) & ((i - j < local_blocks) | vert[:, None, :])


def _prepare(q, k, causal, cross, block_size, local_blocks, vert_stride, num_dense_heads, gqa_pattern):
    if cross or not causal:
        raise ValueError("s2: S2-Attention is causal self-attention (causal=True, cross=False)")
    n, m = q.shape[2], k.shape[2]
    if n > m:
        raise ValueError(f"s2: more queries ({n}) than keys ({m}) in causal self-attention")
    _check(
        block_size,
        local_blocks,
        vert_stride,
        num_dense_heads,
        q.shape[1] if gqa_pattern == "query" else k.shape[1],
    )


def s2_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 64,
    local_blocks: int = 4,
    vert_stride: int = 4,
    homo_head: bool = False,
    head_sliding_offset: int = 0,
    num_dense_heads: int = 0,
    gqa_pattern: str = "query",
    scale: float | None = None,
) -> Tensor:
    """Dense softmax attention with dkernel's token mask ``kron(block_mask, ones) AND tril`` (``N x M``)."""
    _prepare(q, k, causal, cross, block_size, local_blocks, vert_stride, num_dense_heads, gqa_pattern)
    n, m, heads, hkv = q.shape[2], k.shape[2], q.shape[1], k.shape[1]
    nbk = -(-m // block_size)
    vert = _query_head_vertical(
        heads,
        hkv,
        nbk,
        vert_stride,
        gqa_pattern,
        q.device,
        homo_head=homo_head,
        head_sliding_offset=head_sliding_offset,
        num_dense_heads=num_dense_heads,
    )
    blocks = s2_block_mask(heads, nbk, nbk, local_blocks, vert_stride, vert=vert)
    if key_padding_mask is None:
        ones = torch.ones(block_size, block_size, dtype=torch.uint8, device=q.device)
        dense = torch.kron(blocks.to(torch.uint8), ones).bool()[:, :m, :m]
        dense = dense[None, :, m - n :]  # query rows are the last n positions
        return reference_attention(q, k, v, dense, causal=True, scale=scale)
    # varlen: the pattern on ranks among the real tokens of each sequence
    krank, kvalid, qrank, qvalid, _ = _varlen_ranks(key_padding_mask, n, m)
    qb, kb = qrank.clamp(min=0) // block_size, krank.clamp(min=0) // block_size  # (B, N), (B, M)
    allowed = blocks[:, qb[:, :, None], kb[:, None, :]].transpose(0, 1)  # (B, H, N, M)
    allowed = allowed & (krank[:, None, None, :] <= qrank[:, None, :, None])
    allowed = allowed & qvalid[:, None, :, None] & kvalid[:, None, None, :]
    return reference_attention(q, k, v, allowed, scale=scale)


def _key_block_lists(vert, q_block_ids, local_blocks):
    """For every (query head, query block): key blocks to visit, padded with -1, as ``(heads, nq_blocks, R)``."""
    nbk = vert.shape[1]
    i = q_block_ids[None, :, None]
    j = torch.arange(nbk, device=vert.device)[None, None, :]
    allowed = (i >= j) & (
        (i - j < local_blocks) | vert[:, None, :]
    )  # (heads, nqb, nbk): per block, not per token
    counts = allowed.sum(-1)
    r = int(counts.max())
    order = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True)[..., :r]  # allowed blocks, in order
    valid = torch.arange(r, device=vert.device)[None, None, :] < counts[..., None]
    return torch.where(valid, order, torch.full_like(order, -1))


def s2_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 64,
    local_blocks: int = 4,
    vert_stride: int = 4,
    homo_head: bool = False,
    head_sliding_offset: int = 0,
    num_dense_heads: int = 0,
    gqa_pattern: str = "query",
    scale: float | None = None,
) -> Tensor:
    """S2-Attention on ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)``; query ``i`` sits at position ``i + M - N``."""
    _prepare(q, k, causal, cross, block_size, local_blocks, vert_stride, num_dense_heads, gqa_pattern)
    if key_padding_mask is not None:
        return varlen_by_padding(
            s2_attention,
            q,
            k,
            v,
            key_padding_mask,
            causal=causal,
            cross=cross,
            block_size=block_size,
            local_blocks=local_blocks,
            vert_stride=vert_stride,
            homo_head=homo_head,
            head_sliding_offset=head_sliding_offset,
            num_dense_heads=num_dense_heads,
            gqa_pattern=gqa_pattern,
            scale=scale,
        )
    bsz, heads, n, dim = q.shape
    hkv, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    bs = block_size
    dev = q.device
    nbk = -(-m // bs)
    first = m - n  # position of query 0
    qb0, qb1 = first // bs, (m - 1) // bs + 1
    nqb = qb1 - qb0
    vert = _query_head_vertical(
        heads,
        hkv,
        nbk,
        vert_stride,
        gqa_pattern,
        dev,
        homo_head=homo_head,
        head_sliding_offset=head_sliding_offset,
        num_dense_heads=num_dense_heads,
    )
    lists = _key_block_lists(vert, torch.arange(qb0, qb1, device=dev), local_blocks)  # (H, nqb, R)
    r = lists.shape[-1]
    # queries: pad to whole blocks aligned on absolute positions
    lpad, rpad = first - qb0 * bs, qb1 * bs - m
    qp = F.pad(q, (0, 0, lpad, rpad)).view(bsz, heads, nqb, bs, dim)
    # keys/values in blocks, plus one zero block that the -1 padding points to
    kpad = nbk * bs - m
    kb = F.pad(k, (0, 0, 0, kpad + bs)).view(bsz, hkv, nbk + 1, bs, dim)
    vb = F.pad(v, (0, 0, 0, kpad + bs)).view(bsz, hkv, nbk + 1, bs, dv)
    idx = torch.where(lists < 0, torch.full_like(lists, nbk), lists)  # (H, nqb, R)
    kv_head = (torch.arange(heads, device=dev) // (heads // hkv))[:, None, None]
    kt = kb[:, kv_head, idx].reshape(bsz, heads, nqb, r * bs, dim)
    vt = vb[:, kv_head, idx].reshape(bsz, heads, nqb, r * bs, dv)
    # token mask: block listed, key position <= query position, key inside the sequence
    kpos = (idx[..., None] * bs + torch.arange(bs, device=dev)).reshape(heads, nqb, r * bs)
    qpos = torch.arange(qb0, qb1, device=dev)[:, None] * bs + torch.arange(bs, device=dev)  # (nqb, bs)
    ok = (lists >= 0)[..., None].expand(heads, nqb, r, bs).reshape(heads, nqb, r * bs)
    mask = ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[None, :, :, None]) & (kpos[:, :, None, :] < m)
    # 4-D inputs with an additive bias take torch's fused CPU flash kernel (5-D / boolean masks do not);
    # every row sees at least its own key, so no row is empty
    bias = torch.zeros(1, heads * nqb, bs, r * bs, dtype=q.dtype, device=dev)
    bias.masked_fill_(~mask.reshape(1, heads * nqb, bs, r * bs), float("-inf"))
    out = F.scaled_dot_product_attention(
        qp.reshape(bsz, heads * nqb, bs, dim),
        kt.reshape(bsz, heads * nqb, r * bs, dim),
        vt.reshape(bsz, heads * nqb, r * bs, dv),
        attn_mask=bias,
        scale=scale,
    )
    return out.reshape(bsz, heads, nqb * bs, dv)[:, :, lpad : lpad + n]


@register(
    "s2",
    paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads (Efficient LLM Training and Serving "
    "with Heterogeneous Context Sharding among Attention Heads)",
    arxiv="2407.17678",
    family="sparse",
    capabilities={"causal_self", "decode", "key_padding_mask", "trainable"},
    complexity="time O(N (local_blocks*block_size + N/vert_stride) d) per head, memory of the gathered tiles",
    functional=s2_attention,
    reference=s2_attention_reference,
    defaults={
        "block_size": 64,
        "local_blocks": 4,
        "vert_stride": 4,
        "homo_head": False,
        "head_sliding_offset": 0,
        "num_dense_heads": 0,
        "gqa_pattern": "query",
        "scale": None,
    },
    summary="each head sees its local blocks plus one of every vert_stride remote blocks, with a per-head phase so the heads shard the context",
    deviations="GQA: by default each query head has its own shard (gqa_pattern='query'); dkernel's one-pattern-per-kv-head is gqa_pattern='kv'",
    test_config={"block_size": 4, "local_blocks": 2, "vert_stride": 2},
)
class S2Attention(AttentionModule):
    """S2-Attention layer (causal). ``coverage`` says whether the heads' shards cover the whole context."""

    extra_settings = ("num_kv_heads",)

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        if s["gqa_pattern"] not in ("query", "kv"):
            raise ValueError(f"s2: gqa_pattern must be 'query' or 'kv', got {s['gqa_pattern']!r}")
        pattern_heads = num_heads if s["gqa_pattern"] == "query" else self.num_kv_heads
        _check(s["block_size"], s["local_blocks"], s["vert_stride"], s["num_dense_heads"], pattern_heads)
        self.coverage = s2_coverage(
            pattern_heads,
            s["vert_stride"],
            homo_head=s["homo_head"],
            head_sliding_offset=s["head_sliding_offset"],
            num_dense_heads=s["num_dense_heads"],
            step_heads=num_heads,
        )
        if not self.coverage.covered:
            warnings.warn(f"s2 ({pattern_heads} pattern heads): {self.coverage}", stacklevel=2)

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache()}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError("s2: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        q, k, v = self.project(x, None)
        keys, values = state["kv"].append(k, v)
        out = self.attend(q, keys, values, cross=False, key_padding_mask=None)
        return self.out_proj(merge_heads(out)), state


def covered_fraction(heads: int, vert_stride: int, **kw) -> float:
    """Fraction of block residues ``mod vert_stride`` seen by at least one head."""
    cov = s2_coverage(heads, vert_stride, **kw)
    return 1.0 - len(cov.missing) / vert_stride if vert_stride else math.nan

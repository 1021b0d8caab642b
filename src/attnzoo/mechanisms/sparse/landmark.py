"""Landmark attention: grouped softmax over blocks with landmark tokens, top-k block retrieval.

Paper: "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(Mohtashami & Jaggi, arXiv 2305.16300); official code epfml/landmark-attention (read, not copied).

Layout. The token stream already contains the landmark tokens: after every ``block_size`` regular
tokens comes one landmark token, so position ``j`` is a landmark iff ``j % (block_size + 1) ==
block_size`` and block ``b`` is positions ``[b P, (b + 1) P)`` with ``P = block_size + 1``.
:func:`insert_landmarks` / :func:`remove_landmarks` build and strip that layout at the embedding
level (the paper inserts a special landmark token id; its hidden state at a given layer is whatever
the previous layers made of it).

Grouped softmax (causal self-attention; ``s_ij = q_i . k_j * scale``; ``cur(i)`` is the block of
query ``i``; ``S(i)`` the set of *complete* earlier blocks it may use)::

    Z_i  = sum_{b in S(i)} exp(s_{i, l_b}) + sum_{j in cur(i), j <= i, j not a landmark} exp(s_ij)
    p_ij = exp(s_ij) / Z_i                                             j in the current block
    p_ij = exp(s_{i, l_b}) / Z_i * exp(s_ij) / sum_{j' in b, regular} exp(s_ij')   j in block b in S(i)
    landmark columns get no value mass; y_i = sum_j p_ij v_j

The landmark of the current block is never used, even by the landmark itself. ``top_k = None``
(the default, the paper's training form) takes ``S(i)`` = every earlier block, which costs
``O(N^2)`` like the paper's training. ``top_k = k`` is the paper's inference-time retrieval: each
query (per head, the official ``per_token_and_head`` selection) scores the landmark keys of the
earlier blocks, keeps the ``k`` best and attends to [those blocks (grouped) | its own block]; cost
per query ``O(#blocks + k * block_size)``. Ties in the landmark scores go to the earlier block.
Decoding keeps every key/value in a :class:`~attnzoo.core.cache.KVCache` and runs the same retrieval
for each new token, so ``step`` reproduces the full forward exactly (with either ``top_k``).

Deviations from the paper / official code (deliberate):

* No positional encoding inside the mechanism (the paper uses RoPE and re-maps the positions of
  retrieved blocks, "stingy" mapping); with no positional encoding retrieval with
  ``k >= #blocks`` equals the training-form grouped softmax exactly (the paper's own sanity
  property), which the tests check.
* The official inference code keeps a window of recent tokens dense and retrieves only from older,
  evicted blocks, with a ring buffer of ``mem_cache_size`` blocks; here every earlier complete block
  is a retrieval candidate and nothing is evicted. ``group_dropout`` is not offered.
* ``top_k`` applies in the full forward as well, so that the forward and the decode agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads, validate_qkv
from ...core.module import AttentionModule
from ...core.reference import safe_softmax
from ...registry import register

NAME = "landmark"


def _check(q: Tensor, k: Tensor, causal: bool, cross: bool, block_size: int, top_k: int | None) -> None:
    if not causal or cross:
        raise ValueError(f"{NAME}: only causal self-attention is defined (got causal={causal}, cross={cross})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{NAME}: block_size must be a positive int, got {block_size!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{NAME}: top_k must be None or a positive int, got {top_k!r}")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"{NAME}: causal self-attention needs N <= M, got q {tuple(q.shape)}, k {tuple(k.shape)}")


def insert_landmarks(x: Tensor, landmark: Tensor, block_size: int) -> Tensor:
    """Insert ``landmark (C,)`` after every ``block_size`` tokens of ``x (B, N, C)`` (a complete last block gets one too)."""
    b, n, c = x.shape
    nb = n // block_size
    head = x[:, : nb * block_size].reshape(b, nb, block_size, c)
    lm = landmark.to(x).expand(b, nb, 1, c)
    body = torch.cat([head, lm], dim=2).reshape(b, nb * (block_size + 1), c)
    return torch.cat([body, x[:, nb * block_size :]], dim=1)


def remove_landmarks(y: Tensor, block_size: int) -> Tensor:
    """Drop the landmark positions of ``y (B, N, C)`` (the inverse of :func:`insert_landmarks`)."""
    n = y.shape[1]
    keep = (torch.arange(n, device=y.device) % (block_size + 1)) != block_size
    return y[:, keep]


def _select_blocks(scores: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """The ``top_k`` best blocks per row of ``scores (..., nB)`` (``-inf`` = unavailable).

    Returns ``(indices, values)``; ties go to the lower block index (stable sort).
    """
    k = min(top_k, scores.shape[-1])
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return idx[..., :k], vals[..., :k]


def landmark_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 50,
    top_k: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """Grouped-softmax landmark attention, blocked; ``top_k`` retrieves blocks by landmark score.

    ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)``; query ``i`` sits at absolute position ``i + M - N``.
    """
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(q, k, causal, cross, block_size, top_k)
    if key_padding_mask is not None:
        raise ValueError(f"{NAME}: key_padding_mask is not supported (the landmark layout is positional)")
    k, v = expand_kv(k, v, q.shape[1])
    bsz, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    p = block_size + 1
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    off = m - n
    pos = torch.arange(off, m, device=q.device)
    qblk = pos // p  # (N,) block of each query
    nb_full = m // p  # complete blocks (their landmark exists)

    # -- landmark logits against every complete earlier block ------------------------------------
    if nb_full > 0:
        kl = k[:, :, p - 1 : nb_full * p : p]  # (B, H, nBf, D) landmark keys (strided view)
        sl = torch.matmul(q, kl.transpose(-1, -2)) * scale  # (B, H, N, nBf)
        avail = torch.arange(nb_full, device=q.device)[None, :] < qblk[:, None]  # (N, nBf)
        sl = sl.masked_fill(~avail, float("-inf"))
    else:
        sl = q.new_full((bsz, h, n, 0), float("-inf"))

    # -- the contribution of earlier blocks: landmark logit and the block's own softmax average ---
    if top_k is None:
        lm_logits = sl
        if nb_full > 0:
            kr = k[:, :, : nb_full * p].reshape(bsz, h, nb_full, p, d)[:, :, :, : p - 1]
            vr = v[:, :, : nb_full * p].reshape(bsz, h, nb_full, p, dv)[:, :, :, : p - 1]
            s_in = torch.einsum("bhnd,bhcpd->bhncp", q, kr) * scale  # (B, H, N, nBf, P-1)
            ctx = torch.einsum("bhncp,bhcpe->bhnce", safe_softmax(s_in), vr)  # (B, H, N, nBf, Dv)
        else:
            ctx = q.new_zeros(bsz, h, n, 0, dv)
    else:
        idx, lm_logits = _select_blocks(sl, top_k)  # (B, H, N, kk)
        kk = idx.shape[-1]
        if kk > 0:
            valid = torch.isfinite(lm_logits)
            # unavailable picks point at block 0 (any complete block would do); their weight is 0
            idx = torch.where(valid, idx, torch.zeros_like(idx))
            gpos = (idx[..., None] * p + torch.arange(p - 1, device=q.device)).reshape(bsz, h, n * kk * (p - 1), 1)
            kg = k.gather(2, gpos.expand(-1, -1, -1, d)).view(bsz, h, n, kk, p - 1, d)
            vg = v.gather(2, gpos.expand(-1, -1, -1, dv)).view(bsz, h, n, kk, p - 1, dv)
            s_in = torch.einsum("bhnd,bhnkpd->bhnkp", q, kg) * scale
            ctx = torch.einsum("bhnkp,bhnkpe->bhnke", safe_softmax(s_in), vg)
        else:
            ctx = q.new_zeros(bsz, h, n, 0, dv)

    # -- the current block, computed blockwise on the queries' own blocks -------------------------
    b0 = off // p  # first query block
    lead = off - b0 * p
    nqb = (m - 1) // p - b0 + 1
    tot = nqb * p
    qpad = F.pad(q, (0, 0, lead, tot - lead - n)).view(bsz, h, nqb, p, d)
    kend = min(m, (b0 + nqb) * p)
    kloc = F.pad(k[:, :, b0 * p : kend], (0, 0, 0, tot - (kend - b0 * p))).view(bsz, h, nqb, p, d)
    vloc = F.pad(v[:, :, b0 * p : kend], (0, 0, 0, tot - (kend - b0 * p))).view(bsz, h, nqb, p, dv)
    s_loc = torch.matmul(qpad, kloc.transpose(-1, -2)) * scale  # (B, H, nqb, P, P)
    r = torch.arange(p, device=q.device)
    allowed = (r[None, :] <= r[:, None]) & (r[None, :] != p - 1)  # causal, landmark column off
    s_loc = s_loc.masked_fill(~allowed, float("-inf"))

    # joint normaliser over [current block tokens | landmark logits of the used blocks]
    lse_loc = torch.logsumexp(s_loc, dim=-1).reshape(bsz, h, tot)[:, :, lead : lead + n]
    lse_lm = torch.logsumexp(lm_logits, dim=-1) if lm_logits.shape[-1] else torch.full_like(lse_loc, float("-inf"))
    z = torch.logaddexp(lse_loc, lse_lm)
    z = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    zpad = F.pad(z, (lead, tot - lead - n)).view(bsz, h, nqb, p, 1)
    out_loc = torch.matmul(torch.exp(s_loc - zpad), vloc).reshape(bsz, h, tot, dv)[:, :, lead : lead + n]
    if ctx.shape[3]:
        g = torch.exp(lm_logits - z[..., None])  # block weights (0 for unavailable blocks)
        out_lm = torch.einsum("bhnk,bhnke->bhne", g, ctx)
        return out_loc + out_lm
    return out_loc


def landmark_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    block_size: int = 50,
    top_k: int | None = None,
    scale: float | None = None,
) -> Tensor:
    """The grouped softmax written out on the dense ``(N, M)`` score matrix, block by block."""
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(q, k, causal, cross, block_size, top_k)
    if key_padding_mask is not None:
        raise ValueError(f"{NAME}: key_padding_mask is not supported (the landmark layout is positional)")
    k, v = expand_kv(k, v, q.shape[1])
    n, m, d = q.shape[2], k.shape[2], q.shape[3]
    p = block_size + 1
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, N, M)
    i_abs = torch.arange(n, device=q.device)[:, None] + (m - n)
    j = torch.arange(m, device=q.device)[None, :]
    blk_i, blk_j = i_abs // p, j // p
    is_lm = (j % p) == p - 1
    nb = m // p  # complete blocks
    lm_pos = torch.arange(nb, device=q.device) * p + p - 1
    # landmark logits s_{i, l_b} of complete earlier blocks
    s_lm = s[..., lm_pos]  # (B, H, N, nb)
    avail = torch.arange(nb, device=q.device)[None, :] < blk_i  # (N, nb)
    if top_k is None:
        chosen = avail.expand_as(s_lm)
    else:
        # rank of block b among the available ones: strictly better, or equal and earlier
        a = s_lm.masked_fill(~avail, float("-inf"))
        better = (a[..., None, :] > a[..., :, None]) | (
            (a[..., None, :] == a[..., :, None]) & (torch.arange(nb)[None, :] < torch.arange(nb)[:, None])
        )
        rank = (better & avail[:, None, :]).sum(-1)  # (B, H, N, nb)
        chosen = avail & (rank < top_k)
    cur = (blk_j == blk_i) & (j <= i_abs) & ~is_lm  # (N, M) current-block regular keys
    neg = torch.tensor(float("-inf"), dtype=s.dtype)
    # normaliser Z_i, in a max-shifted form
    lm_terms = torch.where(chosen, s_lm, neg)
    cur_terms = torch.where(cur, s, neg)
    shift = torch.cat([lm_terms, cur_terms], dim=-1).amax(-1, keepdim=True)
    zsum = torch.exp(lm_terms - shift).sum(-1, keepdim=True) + torch.exp(cur_terms - shift).sum(-1, keepdim=True)
    probs = torch.exp(cur_terms - shift) / zsum  # current-block part
    for b in range(nb):
        in_b = (blk_j == b) & ~is_lm  # (1, M)
        sb = torch.where(in_b, s, neg)
        within = torch.exp(sb - sb.amax(-1, keepdim=True))
        within = within / within.sum(-1, keepdim=True)  # softmax inside block b
        gb = torch.exp(lm_terms[..., b : b + 1] - shift) / zsum  # block weight
        probs = probs + torch.where(in_b, gb * within, torch.zeros_like(within))
    return torch.matmul(probs, v)


@register(
    NAME,
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers",
    arxiv="2305.16300",
    family="sparse",
    capabilities={"causal_self", "decode", "trainable"},
    complexity="top_k=None: time O(N M d) (training form); top_k=k: O(N (M/P + k P) d), decode O(M/P + k P) per token",
    functional=landmark_attention,
    reference=landmark_attention_reference,
    defaults={"block_size": 50, "top_k": None, "scale": None},
    summary="a landmark token closes every block; grouped softmax gates each block by its landmark; "
    "top-k retrieval of blocks by landmark score at inference (KV cache)",
    deviations="no RoPE / position re-mapping inside; every earlier block is a retrieval candidate (no recent-token "
    "window, no eviction); top_k also applies in the full forward; the stream must already contain the landmarks "
    "(every (block_size+1)-th position; insert_landmarks helps)",
    test_config={"block_size": 7, "top_k": 2},
)
class LandmarkAttention(AttentionModule):
    """Causal landmark attention; decoding keeps a KV cache and retrieves ``top_k`` blocks per token.

    Positions ``j`` with ``j % (block_size + 1) == block_size`` are landmark tokens (see
    :func:`insert_landmarks`).
    """

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        return {"kv": KVCache()}

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.spec.require("decode")
        if not self.causal:
            raise ValueError(f"{NAME}: prefill/step decode causally; build the module with causal=True")
        self.check_inputs(x, None, None)
        state = self.init_state(x.shape[0]) if state is None else state
        q, k, v = self.project(x, None)
        keys, values = state["kv"].append(k, v)
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        out = fn(q, keys, values, causal=True, cross=False, **self.settings)
        return self.out_proj(merge_heads(out)), state

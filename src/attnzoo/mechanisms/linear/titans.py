"""Titans: a neural long-term memory that learns at test time, alone or with sliding-window attention.

Paper: "Titans: Learning to Memorize at Test Time" (Behrouz, Zhong, Mirrokni; arXiv 2501.00663).
Non-official reference read for orientation only: ``lucidrains/titans-pytorch``.

Long-term memory (LMM), per head. The memory ``M`` is an MLP with ``memory_depth`` layers (its weights
are the state); ``k_t, v_t, q_t`` are projections of token ``x_t``::

    loss       l(M; x_t) = || M(k_t) - v_t ||_2^2                       (paper Eq. 12)
    surprise   S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; x_t)        (Eq. 10, momentum)
    forget     M_t = (1 - alpha_t) M_{t-1} + S_t                        (Eq. 13, weight decay)
    retrieve   y_t = M_t(q_t)                                            (Eq. 15, forward pass only)

Chunk-parallel training (paper Sec. 3.2, Eq. 16): the sequence is cut into chunks of ``chunk_size`` b;
every gradient inside a chunk is taken at the memory of the chunk start, ``t' = t - (t mod b)``
(0-indexed tokens: the memory after all tokens before the chunk). Then the per-token gradients are
independent, momentum is a linear recurrence and the decay a cumulative product, so a whole chunk is
a few matmuls: with ``beta_t = prod (1 - alpha)`` and ``E_t = prod eta`` inside the chunk,
``M_t = beta_t M_0 + m_t S_0 - sum_{i<=t} C[t, i] u_i`` where ``u_i = grad l(M_{t'}; x_i)`` and
``C[t, i] = theta_i sum_{r=i..t} (beta_t / beta_r)(E_r / E_i)``. Each ``u_i`` of an MLP layer is an
outer product (layer input x output gradient), so ``M_t(q_t)`` for every t of the chunk is computed
without materialising per-token weights (the "dual form" of TTT, arXiv 2407.04620). With b = 1 this
is exactly the fully sequential rule. The chunk size is part of the model (mini-batch GD), not only
a speed knob: outputs depend on it, as in the paper.

Architectures (persistent memory ``P``: ``num_persistent`` learned tokens prepended, ``x~ = P || x``):

* ``variant="mag"`` (memory as a gate): ``y = SW-Attn*(x~)`` (causal sliding window, the persistent
  prefix always visible), ``o = y (x) M(x~)``: each branch normalised (RMSNorm with a learned
  vector), the memory branch through a sigmoid, multiplied.
* ``variant="mal"`` (memory as a layer): ``y = M(x~)``, ``o = SW-Attn(y)`` (plain causal window).
* ``variant="lmm"``: the memory alone as the sequence layer.

Memory branch details from the paper's architecture section (after an RMSNorm of its input, see
below): q/k/v projections, a causal depthwise
1-D convolution after each projection, SiLU, l2-normalised q and k; data-dependent gates
``theta_t = max_lr * sigmoid(.)``, ``eta_t = sigmoid(.)``, ``alpha_t = sigmoid(.)`` (linear in x_t,
one per head). Decoding carries, per memory, the weights ``M``, the momentum ``S`` and the chunk-start
weights (O(1) in length), plus the attention's rolling window KV cache and the conv tail.

Deviations / choices (see ``docs/mechanisms/titans.md``): MAC (memory as context) is not implemented;
the memory MLP has no residual/LayerNorm wrapper and uses SiLU between layers (the paper leaves the
MLP's activation open; lucidrains wraps the MLP in LayerNorm + residual and uses GELU); the "depthwise
separable" conv is depthwise only (the pointwise part is the projection); no positional encoding in
the attention branch; gates are per token (the paper allows per-chunk constants for speed); the memory
branch RMS-normalises its input (as lucidrains does): with the paper's summed squared loss the stable
step size falls like ``1/||v||^2``, and without it inputs of scale 3 made the memory diverge. Option
``retrieve="previous_chunk"`` reads ``M_{t'}`` instead of ``M_t`` (lucidrains' behaviour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.cache import KVCache
from ...core.layout import expand_kv, merge_heads, split_heads
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register

_LOG_FLOOR = -60.0  # gates below e^-60 count as e^-60 (keeps log-space ratios finite; effect < 1e-26)
_VARIANTS = ("mag", "mal", "lmm")
_RETRIEVE = ("current", "previous_chunk")


# =================================================================================================
# The memory MLP (per head, batched weights)
# =================================================================================================
def _l2norm(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _act(z: Tensor) -> Tensor:
    return F.silu(z)


def _act_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def memory_dims(head_dim: int, value_dim: int, depth: int, expansion: int) -> list[tuple[int, int]]:
    """(in, out) of each memory layer: ``d -> e*d -> ... -> e*d -> dv``."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"titans: memory_depth must be a positive int, got {depth!r}")
    if not isinstance(expansion, int) or expansion < 1:
        raise ValueError(f"titans: memory_expansion must be a positive int, got {expansion!r}")
    hidden = expansion * head_dim
    sizes = [head_dim] + [hidden] * (depth - 1) + [value_dim]
    return list(zip(sizes[:-1], sizes[1:]))


def default_memory_init(heads: int, dims: Sequence[tuple[int, int]], *, dtype, device) -> list[Tensor]:
    """Deterministic initial memory for the functional form: zeros for a linear memory, otherwise
    ``N(0, 1/fan_in)`` weights from a fixed-seed generator (a zero MLP would never learn)."""
    if len(dims) == 1:
        return [torch.zeros(heads, *dims[0], dtype=dtype, device=device)]
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(heads, i, o, generator=g, dtype=torch.float64) / math.sqrt(i)).to(
            dtype=dtype, device=device
        )
        for i, o in dims
    ]


def memory_apply(x: Tensor, weights: Sequence[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``M(x)`` for ``x (B, H, T, d)``; returns the output, each layer's input and pre-activation."""
    ins, zs = [], []
    h = x
    for i, w in enumerate(weights):
        ins.append(h)
        z = torch.matmul(h, w)
        zs.append(z)
        h = _act(z) if i < len(weights) - 1 else z
    return h, ins, zs


def _surprise_factors(k: Tensor, v: Tensor, weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-token gradients of ``||M(k_i) - v_i||^2`` as outer products: ``grad_{W_l} = ins_l[i]^T gout_l[i]``."""
    p, ins, zs = memory_apply(k, weights)
    g = 2.0 * (p - v)
    gouts: list[Tensor] = [g] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        gouts[i] = g
        if i > 0:
            g = torch.matmul(g, weights[i].transpose(-1, -2)) * _act_grad(zs[i - 1])
    return ins, gouts


# =================================================================================================
# Chunk-parallel form (fast)
# =================================================================================================
def _segment(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    log_eta: Tensor | None,
    log_keep: Tensor | None,
    anchor: list[Tensor],
    mem: list[Tensor],
    mom: list[Tensor],
    retrieve: str,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Tokens that share one gradient point ``anchor`` (one chunk, or the part of it in this call).

    ``mem``/``mom`` are ``M`` and ``S`` before the first token; gates are ``(B, H, T)``
    (``log_eta`` None = no momentum, ``log_keep = log(1 - alpha)`` None = no forgetting).
    """
    t = q.shape[2]
    ins, gouts = _surprise_factors(k, v, anchor)
    tri = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    lb = torch.zeros_like(theta) if log_keep is None else torch.cumsum(log_keep, dim=-1)
    decay = torch.exp(
        (lb[..., :, None] - lb[..., None, :]).masked_fill(~tri, float("-inf"))
    )  # D[t, r] = beta_t / beta_r
    beta = torch.exp(lb)
    if log_eta is not None:
        le = torch.cumsum(log_eta, dim=-1)
        carry = torch.exp(
            (le[..., :, None] - le[..., None, :]).masked_fill(~tri, float("-inf"))
        )  # G[r, i] = E_r / E_i
        coef = torch.matmul(decay, carry) * theta[..., None, :]  # C[t, i]
        e = torch.exp(le)
        m_s = torch.matmul(decay, e[..., None])[..., 0]  # coefficient of S_0 in M_t
        s_end = carry[..., -1, :] * theta  # S_T = E_T S_0 - sum_i s_end[i] u_i
        e_end = e[..., -1]
    else:
        coef = decay * theta[..., None, :]
        m_s = None
        s_end = torch.zeros_like(theta)
        s_end[..., -1] = theta[..., -1]
        e_end = None
    # memory and momentum after the segment
    new_mem, new_mom = [], []
    for w, s, x_in, g in zip(mem, mom, ins, gouts):
        upd = torch.matmul((x_in * coef[..., -1, :, None]).transpose(-1, -2), g)
        w_new = beta[..., -1, None, None] * w - upd
        if m_s is not None:
            w_new = w_new + m_s[..., -1, None, None] * s
        s_new = -torch.matmul((x_in * s_end[..., None]).transpose(-1, -2), g)
        if e_end is not None:
            s_new = s_new + e_end[..., None, None] * s
        new_mem.append(w_new)
        new_mom.append(s_new)
    # retrieval
    if retrieve == "previous_chunk":
        y = memory_apply(q, anchor)[0]
    else:  # y_t = M_t(q_t), layer by layer with W_t = beta_t W + m_t S - sum_i C[t,i] in_i^T g_i
        h = q
        for i, (w, s, x_in, g) in enumerate(zip(mem, mom, ins, gouts)):
            z = beta[..., None] * torch.matmul(h, w)
            if m_s is not None:
                z = z + m_s[..., None] * torch.matmul(h, s)
            z = z - torch.matmul(coef * torch.matmul(h, x_in.transpose(-1, -2)), g)
            h = _act(z) if i < len(mem) - 1 else z
        y = h
    return y, new_mem, new_mom


def _gate_logs(eta: Tensor | None, alpha: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    log_eta = None if eta is None else torch.log(eta).clamp_min(_LOG_FLOOR)
    log_keep = None if alpha is None else torch.log1p(-alpha).clamp_min(_LOG_FLOOR)
    return log_eta, log_keep


def memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None,
    alpha: Tensor | None,
    state: dict,
    chunk_size: int,
    retrieve: str = "current",
) -> tuple[Tensor, dict]:
    """Chunk-parallel LMM over ``q, k, v (B, H, T, d)`` continuing ``state`` (``memory``, ``momentum``,
    ``anchor`` lists of ``(B, H, din, dout)``, ``pos``). Gates ``(B, H, T)``; ``eta``/``alpha`` None
    switch momentum/forgetting off. Returns ``y (B, H, T, dv)`` and the new state."""
    log_eta, log_keep = _gate_logs(eta, alpha)
    pos = int(state["pos"])
    mem, mom, anchor = list(state["memory"]), list(state["momentum"]), list(state["anchor"])
    n = q.shape[2]
    outs = []
    s = 0
    while s < n:
        if pos % chunk_size == 0:
            anchor = mem
        e = min(n, s + chunk_size - pos % chunk_size)
        sl = slice(s, e)
        y, mem, mom = _segment(
            q[:, :, sl],
            k[:, :, sl],
            v[:, :, sl],
            theta[..., sl],
            None if log_eta is None else log_eta[..., sl],
            None if log_keep is None else log_keep[..., sl],
            anchor,
            mem,
            mom,
            retrieve,
        )
        outs.append(y)
        pos += e - s
        s = e
    if pos % chunk_size == 0:
        anchor = mem
    return torch.cat(outs, dim=2), {"memory": mem, "momentum": mom, "anchor": anchor, "pos": pos}


# =================================================================================================
# Reference: token by token, gradients by autograd
# =================================================================================================
def memory_scan_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor | None,
    alpha: Tensor | None,
    state: dict,
    chunk_size: int,
    retrieve: str = "current",
) -> tuple[Tensor, dict]:
    """The paper's rule one token at a time: ``u_t = grad l(M_{t'}; x_t)`` by ``torch.autograd``,
    ``S_t = eta_t S_{t-1} - theta_t u_t``, ``M_t = (1 - alpha_t) M_{t-1} + S_t``, ``y_t = M_t(q_t)``."""
    outer_grad = torch.is_grad_enabled()
    pos = int(state["pos"])
    mem, mom, anchor = list(state["memory"]), list(state["momentum"]), list(state["anchor"])
    outs = []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if pos % chunk_size == 0:
                anchor = mem
            point = [
                a if (outer_grad and a.requires_grad) else a.detach().requires_grad_(True) for a in anchor
            ]
            pred = memory_apply(k[:, :, t : t + 1], point)[0]
            loss = (
                (pred - v[:, :, t : t + 1]).square().sum()
            )  # each (b, h) slice of the weights sees only its own loss
            grads = torch.autograd.grad(loss, point, create_graph=outer_grad)
            th = theta[:, :, t, None, None]
            if eta is None:
                mom = [-th * g for g in grads]
            else:
                mom = [eta[:, :, t, None, None] * s - th * g for s, g in zip(mom, grads)]
            keep = 1.0 if alpha is None else 1.0 - alpha[:, :, t, None, None]
            mem = [keep * w + s for w, s in zip(mem, mom)]
            read = anchor if retrieve == "previous_chunk" else mem
            outs.append(memory_apply(q[:, :, t : t + 1], read)[0])
            pos += 1
    if pos % chunk_size == 0:
        anchor = mem
    out = torch.cat(outs, dim=2)
    if not outer_grad:
        out = out.detach()
        mem, mom, anchor = ([x.detach() for x in lst] for lst in (mem, mom, anchor))
    return out, {"memory": mem, "momentum": mom, "anchor": anchor, "pos": pos}


# =================================================================================================
# Functional forms (the LMM on per-head q, k, v)
# =================================================================================================
def _functional_setup(
    q,
    k,
    v,
    causal,
    cross,
    key_padding_mask,
    chunk_size,
    theta,
    eta,
    alpha,
    momentum,
    forgetting,
    memory_depth,
    memory_expansion,
    memory_init,
    retrieve,
    normalize_qk,
):
    if not causal or cross:
        raise ValueError(
            "titans: the long-term memory is causal self-attention only (causal=True, cross=False)"
        )
    if key_padding_mask is not None:
        raise ValueError("titans: key_padding_mask is not supported")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"titans: chunk_size must be a positive int, got {chunk_size!r}")
    if retrieve not in _RETRIEVE:
        raise ValueError(f"titans: retrieve must be one of {_RETRIEVE}, got {retrieve!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"titans: queries and keys must have the same length (self-attention), got {q.shape[2]} and {k.shape[2]}"
        )
    k, v = expand_kv(k, v, q.shape[1])
    if normalize_qk:
        q, k = _l2norm(q), _l2norm(k)
    b, h, n, d = q.shape

    def gate(x, what):
        t = torch.as_tensor(x, dtype=q.dtype, device=q.device)
        try:
            return t.expand(b, h, n) if t.dim() <= 3 else t
        except RuntimeError:
            raise ValueError(
                f"titans: {what} must broadcast to (batch, heads, length) = {(b, h, n)}, got {tuple(t.shape)}"
            ) from None

    th = gate(theta, "theta")
    et = gate(eta, "eta") if momentum else None
    al = gate(alpha, "alpha") if forgetting else None
    dims = memory_dims(d, v.shape[-1], memory_depth, memory_expansion)
    init = (
        default_memory_init(h, dims, dtype=q.dtype, device=q.device)
        if memory_init is None
        else list(memory_init)
    )
    if len(init) != len(dims) or any(tuple(w.shape[-2:]) != dd for w, dd in zip(init, dims)):
        raise ValueError(f"titans: memory_init must be {len(dims)} tensors of shapes (..., in, out) = {dims}")
    init = [w.expand(b, h, *w.shape[-2:]) for w in init]
    state = {"memory": init, "momentum": [torch.zeros_like(w) for w in init], "anchor": init, "pos": 0}
    return q, k, v, th, et, al, state


def titans_memory(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 16,
    theta: float | Tensor = 0.01,
    eta: float | Tensor = 0.9,
    alpha: float | Tensor = 0.01,
    momentum: bool = True,
    forgetting: bool = True,
    memory_depth: int = 2,
    memory_expansion: int = 4,
    memory_init: Sequence[Tensor] | None = None,
    retrieve: str = "current",
    normalize_qk: bool = True,
) -> Tensor:
    """The Titans long-term memory as a causal token mixer, chunk-parallel.

    ``q, k, v (B, H, N, d)`` are the memory's queries, keys and values (the module l2-normalises q, k).
    ``theta`` (learning rate), ``eta`` (momentum decay), ``alpha`` (forgetting) are scalars or
    ``(B, H, N)`` per-token gates. ``memory_init``: per-layer initial weights ``(H, in, out)``
    (default: :func:`default_memory_init`). ``momentum=False`` / ``forgetting=False`` drop S / the decay.
    ``normalize_qk`` l2-normalises q and k per head as the paper does (an unnormalised key makes the
    gradient step ``2 theta ||k||^2`` unstable).
    """
    q, k, v, th, et, al, state = _functional_setup(
        q,
        k,
        v,
        causal,
        cross,
        key_padding_mask,
        chunk_size,
        theta,
        eta,
        alpha,
        momentum,
        forgetting,
        memory_depth,
        memory_expansion,
        memory_init,
        retrieve,
        normalize_qk,
    )
    return memory_scan(q, k, v, th, et, al, state, chunk_size, retrieve)[0]


def titans_memory_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 16,
    theta: float | Tensor = 0.01,
    eta: float | Tensor = 0.9,
    alpha: float | Tensor = 0.01,
    momentum: bool = True,
    forgetting: bool = True,
    memory_depth: int = 2,
    memory_expansion: int = 4,
    memory_init: Sequence[Tensor] | None = None,
    retrieve: str = "current",
    normalize_qk: bool = True,
) -> Tensor:
    """Token-by-token reference of :func:`titans_memory` (autograd gradients, explicit recurrences)."""
    q, k, v, th, et, al, state = _functional_setup(
        q,
        k,
        v,
        causal,
        cross,
        key_padding_mask,
        chunk_size,
        theta,
        eta,
        alpha,
        momentum,
        forgetting,
        memory_depth,
        memory_expansion,
        memory_init,
        retrieve,
        normalize_qk,
    )
    return memory_scan_reference(q, k, v, th, et, al, state, chunk_size, retrieve)[0]


# =================================================================================================
# Sliding-window attention with an optional always-visible prefix (SW-Attn / SW-Attn*)
# =================================================================================================
def _visible(q_pos: Tensor, k_pos: Tensor, window: int, prefix: int) -> Tensor:
    """Key visible to query: causal and (within ``window``, self included, or one of the first ``prefix`` positions)."""
    d = q_pos[:, None] - k_pos[None, :]
    return (d >= 0) & ((d < window) | (k_pos[None, :] < prefix))


def window_attention(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, prefix: int, block: int = 64
) -> Tensor:
    """Blocked causal sliding-window attention: each block of queries attends to the prefix keys and the
    keys that can reach it (``k_pos`` sorted); memory and work ``O(N (block + window + prefix))``."""
    outs = []
    n = q.shape[2]
    for s in range(0, n, block):
        qp = q_pos[s : s + block]
        lo = int(qp[0]) - window + 1
        hi = int(qp[-1])
        sel = ((k_pos >= lo) & (k_pos <= hi)) | (k_pos < prefix)
        idx = sel.nonzero().flatten()
        kp = k_pos[idx]
        mask = _visible(qp, kp, window, prefix)
        outs.append(
            F.scaled_dot_product_attention(q[:, :, s : s + block], k[:, :, idx], v[:, :, idx], attn_mask=mask)
        )
    return torch.cat(outs, dim=2)


def window_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, prefix: int
) -> Tensor:
    """Dense-mask golden reference of :func:`window_attention`."""
    return reference_attention(q, k, v, _visible(q_pos, k_pos, window, prefix))


# =================================================================================================
# Module
# =================================================================================================


@register(
    "titans",
    paper="Titans: Learning to Memorize at Test Time",
    arxiv="2501.00663",
    family="linear",
    capabilities={"causal_self", "decode", "trainable"},
    complexity="time O(N (b d_h d + b^2 d_h) + N w d) (chunk b, memory width d_h, window w); state O(depth d d_h) per memory + O(w d) KV window",
    functional=titans_memory,
    reference=titans_memory_reference,
    defaults={
        "variant": "mag",
        "window": 64,
        "num_persistent": 4,
        "chunk_size": 16,
        "memory_depth": 2,
        "memory_expansion": 4,
        "max_lr": 0.1,
        "momentum": True,
        "forgetting": True,
        "retrieve": "current",
        "conv_kernel": 4,
    },
    summary="neural long-term memory (an MLP trained at test time by surprise with momentum and weight decay, chunk-parallel) gated with sliding-window attention (MAG), as a layer before it (MAL), or alone (LMM)",
    deviations=(
        "no MAC variant; memory MLP without residual/LayerNorm, SiLU; RMSNorm on the memory input; depthwise conv; "
        "no positional encoding in the attention branch; per-token gates; option retrieve='previous_chunk' = lucidrains' read"
    ),
    test_config={"window": 6, "num_persistent": 2, "chunk_size": 4, "memory_expansion": 1, "conv_kernel": 3},
)
class TitansAttention(AttentionModule):
    """Titans layer ``(B, N, C) -> (B, N, C)``, causal self-attention with decoding.

    Settings: ``variant`` ("mag", "mal", "lmm"), ``window`` (sliding-window size, self included),
    ``num_persistent`` (learned prefix tokens), ``chunk_size`` (b of the mini-batch memory update),
    ``memory_depth`` / ``memory_expansion`` (MLP layers / hidden width factor), ``max_lr`` (theta's
    ceiling), ``momentum`` / ``forgetting`` (switch S and the decay), ``retrieve`` ("current" reads
    M_t as in the paper; "previous_chunk" reads M_{t'}), ``conv_kernel`` (0 = no conv).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = True, **kw) -> None:
        super().__init__(dim, num_heads, causal=causal, **kw)
        st = self.settings
        if not self.causal:
            self.spec.require("noncausal_self")
        if st["variant"] not in _VARIANTS:
            raise ValueError(f"titans: variant must be one of {_VARIANTS}, got {st['variant']!r}")
        if st["retrieve"] not in _RETRIEVE:
            raise ValueError(f"titans: retrieve must be one of {_RETRIEVE}, got {st['retrieve']!r}")
        for key in ("window", "chunk_size"):
            if not isinstance(st[key], int) or isinstance(st[key], bool) or st[key] < 1:
                raise ValueError(f"titans: {key} must be a positive int, got {st[key]!r}")
        for key in ("num_persistent", "conv_kernel"):
            if not isinstance(st[key], int) or isinstance(st[key], bool) or st[key] < 0:
                raise ValueError(f"titans: {key} must be a non-negative int, got {st[key]!r}")
        h, d = num_heads, self.head_dim
        inner = h * d
        self.dims = memory_dims(d, d, st["memory_depth"], st["memory_expansion"])
        variant = st["variant"]
        if variant == "lmm":  # the memory uses the base q/k/v projections; no attention branch
            self.mem_q, self.mem_k, self.mem_v = self.q_proj, self.k_proj, self.v_proj
        else:
            self.mem_q = nn.Linear(dim, inner, bias=False)
            self.mem_k = nn.Linear(dim, inner, bias=False)
            self.mem_v = nn.Linear(dim, inner, bias=False)
        # the memory's input is RMS-normalised (lucidrains' store/retrieve norm; Titans blocks are pre-norm):
        # the stable step size of the summed squared loss scales like 1/||v||^2, so it must not follow the input scale
        self.mem_norm = nn.RMSNorm(dim)
        if st["conv_kernel"] > 0:
            self.mem_conv = nn.Conv1d(3 * inner, 3 * inner, st["conv_kernel"], groups=3 * inner, bias=True)
        self.gate_theta = nn.Linear(dim, h)
        self.gate_eta = nn.Linear(dim, h) if st["momentum"] else None
        self.gate_alpha = nn.Linear(dim, h) if st["forgetting"] else None
        for lin, bias in ((self.gate_theta, -2.0), (self.gate_eta, 2.0), (self.gate_alpha, -4.0)):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.constant_(lin.bias, bias)
        self.memory_init = nn.ParameterList(
            [nn.Parameter(torch.randn(h, i, o) / math.sqrt(i)) for i, o in self.dims]
        )
        self.persistent = (
            nn.Parameter(0.02 * torch.randn(st["num_persistent"], dim)) if st["num_persistent"] else None
        )
        if variant == "mag":
            self.norm_attn = nn.RMSNorm(inner)
            self.norm_mem = nn.RMSNorm(inner)
        elif variant == "mal":
            self.mem_out = nn.Linear(inner, dim, bias=False)

    # -- pieces ------------------------------------------------------------------------------------
    def _conv(self, u: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Causal depthwise conv over time of ``u (B, T, 3C')`` continuing ``tail (B, K-1, 3C')``."""
        if not hasattr(self, "mem_conv"):
            return u, None
        kk = self.settings["conv_kernel"]
        if tail is None:
            tail = u.new_zeros(u.shape[0], kk - 1, u.shape[2])
        full = torch.cat([tail, u], dim=1)
        out = F.conv1d(
            full.transpose(1, 2), self.mem_conv.weight, self.mem_conv.bias, groups=u.shape[2]
        ).transpose(1, 2)
        return out, full[:, full.shape[1] - (kk - 1) :]

    def _memory_branch(
        self, x: Tensor, mstate: dict, conv_tail: Tensor | None
    ) -> tuple[Tensor, dict, Tensor | None]:
        """LMM over stream tokens ``x (B, T, C)``: returns merged heads ``(B, T, H*D)``."""
        x = self.mem_norm(x)
        u = torch.cat([self.mem_q(x), self.mem_k(x), self.mem_v(x)], dim=-1)
        u, conv_tail = self._conv(u, conv_tail)
        q, k, v = F.silu(u).chunk(3, dim=-1)
        h = self.num_heads
        q, k, v = _l2norm(split_heads(q, h)), _l2norm(split_heads(k, h)), split_heads(v, h)
        theta = self.settings["max_lr"] * torch.sigmoid(self.gate_theta(x)).transpose(1, 2)
        eta = None if self.gate_eta is None else torch.sigmoid(self.gate_eta(x)).transpose(1, 2)
        alpha = None if self.gate_alpha is None else torch.sigmoid(self.gate_alpha(x)).transpose(1, 2)
        scan = memory_scan_reference if self.impl == "reference" else memory_scan
        y, mstate = scan(
            q, k, v, theta, eta, alpha, mstate, self.settings["chunk_size"], self.settings["retrieve"]
        )
        return merge_heads(y), mstate, conv_tail

    def _attention(self, a_in: Tensor, state: dict) -> Tensor:
        """SW-Attn (MAL) or SW-Attn* (MAG, persistent prefix always visible) of stream tokens ``a_in``."""
        pos0 = int(state["pos"])
        t = a_in.shape[1]
        q, k, v = (split_heads(p(a_in), self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        np_ = self.settings["num_persistent"]
        prefix = np_ if self.settings["variant"] == "mag" else 0
        cache: KVCache = state["kv"]
        new_pos = torch.arange(pos0, pos0 + t, device=a_in.device)
        parts_k, parts_v, parts_p = [], [], []
        if prefix and pos0 >= prefix:  # the persistent keys were computed earlier and are kept apart
            parts_k.append(state["prefix_k"])
            parts_v.append(state["prefix_v"])
            parts_p.append(torch.arange(prefix, device=a_in.device))
        if len(cache):
            parts_k.append(cache.keys)
            parts_v.append(cache.values)
            parts_p.append(torch.arange(pos0 - len(cache), pos0, device=a_in.device))
        keys = torch.cat(parts_k + [k], dim=2)
        values = torch.cat(parts_v + [v], dim=2)
        k_pos = torch.cat(parts_p + [new_pos])
        w = self.settings["window"]
        if self.impl == "reference":
            out = window_attention_reference(q, keys, values, new_pos, k_pos, w, prefix)
        else:
            out = window_attention(q, keys, values, new_pos, k_pos, w, prefix)
        # bookkeeping: persistent keys (MAG) stay apart, the rest enters the rolling window
        if prefix and pos0 < prefix:
            cut = prefix - pos0
            state["prefix_k"], state["prefix_v"] = k[:, :, :cut], v[:, :, :cut]
            k, v = k[:, :, cut:], v[:, :, cut:]
        if k.shape[2]:
            cache.append(k, v)
        return out

    def _advance(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        """Run stream tokens ``x (B, T, C)`` through the layer from ``state``; returns ``(B, T, C)``."""
        variant = self.settings["variant"]
        state = dict(state)
        m, state["lmm"], state["conv"] = self._memory_branch(x, state["lmm"], state.get("conv"))
        if variant == "lmm":
            y = self.out_proj(m)
        elif variant == "mag":
            a = merge_heads(self._attention(x, state))
            y = self.out_proj(self.norm_attn(a) * torch.sigmoid(self.norm_mem(m)))
        else:  # mal
            y = self.out_proj(merge_heads(self._attention(self.mem_out(m), state)))
        state["pos"] = int(state["pos"]) + x.shape[1]
        return y, state

    def _fresh_state(self, batch: int, device, dtype) -> dict:
        init = [w.to(device=device, dtype=dtype).expand(batch, *w.shape) for w in self.memory_init]
        lmm = {"memory": init, "momentum": [torch.zeros_like(w) for w in init], "anchor": init, "pos": 0}
        state = {"lmm": lmm, "pos": 0}
        if hasattr(self, "mem_conv"):
            state["conv"] = torch.zeros(
                batch, self.settings["conv_kernel"] - 1, self.mem_conv.in_channels, device=device, dtype=dtype
            )
        if self.settings["variant"] != "lmm":
            state["kv"] = KVCache(window=self.settings["window"])
        return state

    def _start(self, batch: int, device, dtype) -> dict:
        """A state that has consumed the persistent tokens."""
        state = self._fresh_state(batch, device, dtype)
        if self.persistent is not None:
            p = self.persistent.to(dtype=dtype, device=device).expand(batch, *self.persistent.shape)
            _, state = self._advance(p, state)
        return state

    # -- public API ----------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        self.check_inputs(x, context, key_padding_mask)
        return self.prefill(x)[0]

    def init_state(self, batch_size: int, *, device=None, dtype=None) -> dict:
        self.spec.require("decode")
        ref = self.memory_init[0]
        return self._start(batch_size, device or ref.device, dtype or ref.dtype)

    def prefill(self, x: Tensor, state: dict | None = None) -> tuple[Tensor, dict]:
        self.check_inputs(x, None, None)
        if state is None:
            state = self._start(x.shape[0], x.device, x.dtype)
        return self._advance(x, state)

    def step(self, x_t: Tensor, state: dict) -> tuple[Tensor, dict]:
        x3, squeeze = self._check_step_input(x_t)
        y, state = self._advance(x3, state)
        return (y[:, 0] if squeeze else y), state

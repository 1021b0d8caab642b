"""Chunked linear recurrences and prefix scans shared by the linear / recurrent family.

Three recurrences live here, each written three ways that must agree: a readable token loop (the
reference), a chunk-parallel form (matmul-heavy ``C x C`` blocks inside each chunk plus a carry across
chunks, never an ``N x N`` tensor), and a single step for decoding.

1. ``h_t = decay * h_{t-1} + x_t`` on vectors (:func:`decayed_cumsum`, :func:`decayed_cumsum_loop`,
   :func:`decayed_step`): the momentum / EMA terms.
2. The state-matrix recurrence of linear attention, Lightning Attention and selective SSMs, i.e. the
   dynamical-systems form of "Understanding the differences in Foundation Models: Attention, State
   Space Models, and Recurrent Neural Networks" (Sieber et al., arXiv 2405.15731)::

       S_t = exp(g_t) * S_{t-1} + k_t v_t^T          S_t in R^{dk x dv} per (batch, head)
       o_t = S_t^T q_t

   (:func:`recurrence_reference`, :func:`recurrence_chunked`, :func:`recurrence_step`). The log-decay
   ``g`` may be absent (plain linear attention), one constant per head (Lightning / RetNet,
   ``(H,)``), one value per head and step (data-dependent scalar gates, SSD / Mamba-2, ``(B, H, N)``)
   or one value per state entry and step (S6 / Mamba-1, ``(B, H, N, dk, dv)``). Constant decays (none
   or per head) run a hand-written autograd function that recomputes the ``C x C`` blocks in backward
   and walks over cache-sized segments (:class:`_ConstantDecayScan`); the others use autograd.
3. The softmax prefix scan with a running maximum of "Attention as an RNN" (Feng et al., arXiv
   2405.13956): ``o_k = sum_{j<=k} exp(s_j) v_j / sum_{j<=k} exp(s_j)`` for scores ``s`` of one fixed
   query (:func:`softmax_scan_reference`, :func:`softmax_scan`, :func:`softmax_scan_step`), with the
   associative combine :func:`softmax_scan_combine` and a Hillis-Steele scan :func:`hillis_steele_scan`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _decay_per_head(decay: float | Tensor, x: Tensor) -> Tensor:
    """Decay as a ``(H, 1, 1)`` tensor in ``x``'s dtype (``x`` is ``(B, H, N, E)``)."""
    d = torch.as_tensor(decay, dtype=x.dtype, device=x.device)
    if d.dim() == 0:
        d = d.expand(x.shape[1])
    if d.shape != (x.shape[1],):
        raise ValueError(f"decay must be a scalar or have one value per head ({x.shape[1]}), got {tuple(d.shape)}")
    return d.view(-1, 1, 1)


def decayed_cumsum_loop(x: Tensor, decay: float | Tensor, exclusive: bool = False) -> Tensor:
    """Reference: ``h_t = decay * h_{t-1} + x_t`` token by token on ``x (B, H, N, E)``.

    With ``exclusive`` it returns ``sum_{i<t} decay^(t-i) x_i`` (``= decay * h_{t-1}``) instead.
    """
    d = _decay_per_head(decay, x).squeeze(-1)  # (H, 1)
    h = torch.zeros_like(x[:, :, 0])
    out = []
    for t in range(x.shape[2]):
        if exclusive:
            out.append(d * h)
        h = d * h + x[:, :, t]
        if not exclusive:
            out.append(h)
    return torch.stack(out, dim=2)


def decayed_cumsum(
    x: Tensor, decay: float | Tensor, exclusive: bool = False, chunk: int = 64, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel ``h_t = decay * h_{t-1} + x_t`` on ``x (B, H, N, E)``, per-head decay in ``[0, 1]``.

    Returns ``(y, h_N)``: ``y_t = h_t`` (or ``decay * h_{t-1}`` if ``exclusive``) and the final state
    ``(B, H, E)``. ``initial`` is ``h_0`` (zeros if None). Cost ``O(N C E)``; memory ``O(N E + C^2)``.
    """
    b, h, n, e = x.shape
    d = _decay_per_head(decay, x)  # (H, 1, 1)
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    pad = nc * c - n
    xc = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
    xc = xc.view(b, h, nc, c, e)
    r = torch.arange(c, device=x.device)
    diff = (r[:, None] - r[None, :]).to(x.dtype)  # (C, C)
    tri = r[:, None] >= r[None, :]
    # decay^(r - s) for r >= s; 0 elsewhere. decay = 0 gives the identity (0^0 = 1).
    intra_w = torch.where(tri, d.pow(diff.clamp(min=0)), torch.zeros((), dtype=x.dtype, device=x.device))  # (H,C,C)
    intra = torch.einsum("hrs,bhcse->bhcre", intra_w, xc)
    powers = d.pow((r + 1).to(x.dtype)).view(1, h, 1, c, 1)  # decay^(r+1), (1,H,1,C,1)
    # carry into each chunk: the state at the end of the previous chunk, by a short loop over chunks
    state = torch.zeros(b, h, e, dtype=x.dtype, device=x.device) if initial is None else initial.to(x.dtype)
    totals = intra[:, :, :, -1]  # (B, H, nc, E): each chunk's own contribution at its last position
    dc = d.view(1, h, 1).pow(c)
    carries = []
    for total in totals.unbind(2):  # unbind, not totals[:, :, i]: indexing would make backward quadratic
        carries.append(state)
        state = dc * state + total
    carry = torch.stack(carries, dim=2)  # (B, H, nc, E) state before each chunk
    y = intra + powers * carry[:, :, :, None, :]
    y = y.reshape(b, h, nc * c, e)[:, :, :n]
    final = y[:, :, -1]
    if exclusive:
        h0 = torch.zeros_like(final) if initial is None else initial.to(x.dtype)
        y = d * torch.cat([h0[:, :, None], y[:, :, :-1]], dim=2)
    return y, final


def decayed_step(h: Tensor, x_t: Tensor, decay: float | Tensor) -> Tensor:
    """One step ``h_t = decay * h_{t-1} + x_t`` on ``h, x_t (B, H, E)``."""
    d = torch.as_tensor(decay, dtype=h.dtype, device=h.device)
    if d.dim() == 1:
        d = d.view(1, -1, 1)
    return d * h + x_t


# ---------------------------------------------------------------------------------------------------
# 2. The state-matrix recurrence  S_t = exp(g_t) * S_{t-1} + k_t v_t^T,  o_t = S_t^T q_t
# ---------------------------------------------------------------------------------------------------
DECAY_KINDS = ("none", "head", "scalar", "elementwise")


def _decay_kind(log_decay: float | Tensor | None, q: Tensor, v: Tensor) -> tuple[str, Tensor | None]:
    """Classify ``log_decay`` for ``q (B, H, N, dk)``, ``v (B, H, N, dv)``; returns ``(kind, g)``."""
    if log_decay is None:
        return "none", None
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    g = torch.as_tensor(log_decay, device=q.device).to(q.dtype)
    if g.dim() == 0:
        return "head", g.expand(h)
    if g.shape == (h,):
        return "head", g
    if g.shape == (b, h, n):
        return "scalar", g
    if g.shape == (b, h, n, dk, dv):
        return "elementwise", g
    raise ValueError(
        f"log_decay must be a scalar, (H,) = ({h},), (B, H, N) = ({b}, {h}, {n}) or (B, H, N, dk, dv) = "
        f"({b}, {h}, {n}, {dk}, {dv}); got {tuple(g.shape)}"
    )


def _check_qkv_state(q: Tensor, k: Tensor, v: Tensor, initial: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"recurrence: expected q, k (B, H, N, dk) and v (B, H, N, dv) with equal B, H, N; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if initial is not None and initial.shape != (q.shape[0], q.shape[1], q.shape[3], v.shape[3]):
        raise ValueError(
            f"recurrence: initial state must be (B, H, dk, dv) = {(q.shape[0], q.shape[1], q.shape[3], v.shape[3])}, "
            f"got {tuple(initial.shape)}"
        )


def recurrence_step(
    state: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, log_decay_t: float | Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One step: ``S = exp(g_t) * S + k_t v_t^T``; ``o_t = S^T q_t``.

    ``state (B, H, dk, dv)``, ``q_t, k_t (B, H, dk)``, ``v_t (B, H, dv)``; ``log_decay_t`` is None, a
    scalar, ``(H,)``, ``(B, H)`` or ``(B, H, dk, dv)``. Returns ``(o_t (B, H, dv), new state)``.
    """
    if log_decay_t is not None:
        g = torch.as_tensor(log_decay_t, device=state.device).to(state.dtype)
        if g.dim() == 1:
            g = g.view(1, -1, 1, 1)
        elif g.dim() == 2:
            g = g[:, :, None, None]
        state = torch.exp(g) * state
    state = state + k_t[..., :, None] * v_t[..., None, :]
    return torch.einsum("bhd,bhde->bhe", q_t, state), state


def recurrence_reference(
    q: Tensor, k: Tensor, v: Tensor, log_decay: float | Tensor | None = None, initial: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence token by token. Returns ``(o (B, H, N, dv), S_N (B, H, dk, dv))``."""
    _check_qkv_state(q, k, v, initial)
    kind, g = _decay_kind(log_decay, q, v)
    b, h, n, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial is None else initial.to(q.dtype)
    outs = []
    for t in range(n):
        g_t = None if g is None else (g if kind == "head" else g[:, :, t])
        o_t, s = recurrence_step(s, q[:, :, t], k[:, :, t], v[:, :, t], g_t)
        outs.append(o_t)
    return torch.stack(outs, dim=2), s


def recurrence_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: float | Tensor | None = None,
    *,
    chunk: int = 64,
    initial: Tensor | None = None,
    segment: int | None = 2048,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form of :func:`recurrence_reference` (same outputs and final state).

    Long inputs are processed ``segment`` tokens at a time (rounded to whole chunks), each segment
    starting from the previous one's state, so that the working set stays cache-sized and the time
    per token does not grow with ``N``; ``segment=None`` processes everything in one pass.
    See :func:`_recurrence_chunked_pass` for the algorithm.
    """
    _check_qkv_state(q, k, v, initial)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    kind, g = _decay_kind(log_decay, q, v)
    n = q.shape[2]
    if kind in ("none", "head") and not (g is not None and g.requires_grad):
        # constant decay: the hand-written forward/backward (recomputes the C x C blocks in backward)
        gh = q.new_zeros(q.shape[1]) if g is None else g
        s0 = q.new_zeros(q.shape[0], q.shape[1], q.shape[3], v.shape[3]) if initial is None else initial.to(q.dtype)
        seg = n if segment is None else max(chunk, segment // chunk * chunk)
        return _ConstantDecayScan.apply(q, k, v, s0, gh.detach(), min(chunk, n), seg)
    if kind == "elementwise" or segment is None or n <= segment:
        return _recurrence_chunked_pass(q, k, v, log_decay, chunk=chunk, initial=initial)
    seg = max(chunk, segment // chunk * chunk)
    pieces = [t.split(seg, dim=2) for t in (q, k, v)]
    gs = g.split(seg, dim=2) if kind == "scalar" else [g] * len(pieces[0])
    state, outs = initial, []
    for qs, ks, vs, g_s in zip(*pieces, gs):
        o, state = _recurrence_chunked_pass(qs, ks, vs, g_s, chunk=chunk, initial=state)
        outs.append(o)
    return torch.cat(outs, dim=2), state


class _ConstantDecayScan(torch.autograd.Function):
    """Chunked ``S_t = lambda_h S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t`` with a hand-written backward.

    Forward and backward both walk over segments of ``seg`` tokens (whole chunks) so that the working
    set stays cache-sized; inside a segment everything is batched matmuls over its chunks. Only
    ``q, k, v`` and the state before each chunk (``(N / C) dk dv``) are saved; the ``C x C`` blocks are
    recomputed in backward (as Lightning Attention-2 does). Gradients (per chunk, ``A = (Q K^T) * M``)::

        dA = (dO V^T) * M,  dQ = dA K + (dO S^T) * q_decay,  dK = dA^T Q,  dV = A^T dO
        G_i = (Q * q_decay)^T dO + lambda^C G_{i+1}   (gradient of the state before chunk i, reverse carry)
        dK += (V G_{i+1}^T) * k_decay,  dV += (K * k_decay) G_{i+1}
    """

    @staticmethod
    def _consts(g: Tensor, c: int, m_last: int):
        """Masks and decays for chunk length ``c``; the last chunk holds ``m_last`` real tokens."""
        dt, dev = g.dtype, g.device
        h = g.shape[0]
        r = torch.arange(c, device=dev, dtype=dt)
        gh = g.view(h, 1, 1)
        tri = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
        mask = torch.exp(torch.where(tri, gh * (r[:, None] - r[None, :]), torch.tensor(float("-inf"), dtype=dt, device=dev)))
        q_decay = torch.exp(g.view(h, 1) * (r + 1))  # lambda^(i+1)
        k_decay = torch.exp(g.view(h, 1) * (c - 1 - r))  # lambda^(C-1-j)
        # a partial last chunk: decays to its last real token, zero on the padding
        k_last = torch.where(r < m_last, torch.exp(g.view(h, 1) * (m_last - 1 - r).clamp(min=0)), torch.zeros((), dtype=dt, device=dev))
        return mask, q_decay, k_decay, torch.exp(g * c), k_last, torch.exp(g * m_last)

    @staticmethod
    def _segments(n: int, seg: int) -> list[tuple[int, int]]:
        return [(s0, min(n, s0 + seg)) for s0 in range(0, n, seg)]

    @staticmethod
    def _blocks(t: Tensor, c: int) -> Tensor:
        b, h, L, d = t.shape
        nc = -(-L // c)
        if nc * c != L:
            t = torch.nn.functional.pad(t, (0, 0, 0, nc * c - L))
        return t.reshape(b, h, nc, c, d)

    @staticmethod
    def forward(ctx, q, k, v, s0, g, c, seg):
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        m_last = n - (n - 1) // c * c  # real tokens in the very last chunk
        mask, q_decay, k_decay, chunk_decay, k_last, last_decay = _ConstantDecayScan._consts(g, c, m_last)
        mask_b = mask.view(1, h, 1, c, c)
        qd = q_decay.view(1, h, 1, c, 1)
        state = s0
        outs, befores = [], []
        segs = _ConstantDecayScan._segments(n, seg)
        for si, (a, e) in enumerate(segs):
            qc, kc, vc = (_ConstantDecayScan._blocks(t[:, :, a:e], c) for t in (q, k, v))
            nc = qc.shape[2]
            kd = k_decay.view(1, h, 1, c, 1).expand(1, h, nc, c, 1)
            cd = chunk_decay.view(1, h, 1, 1, 1).expand(1, h, nc, 1, 1)
            if si == len(segs) - 1 and m_last != c:
                kd = torch.cat([kd[:, :, :-1], k_last.view(1, h, 1, c, 1)], dim=2)
                cd = torch.cat([cd[:, :, :-1], last_decay.view(1, h, 1, 1, 1)], dim=2)
            contrib = torch.matmul((kc * kd).transpose(-1, -2), vc)  # (B, H, nc, dk, dv)
            bef = []
            for i in range(nc):
                bef.append(state)
                state = cd[:, :, i] * state + contrib[:, :, i]
            bef = torch.stack(bef, dim=2)
            out = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * mask_b, vc) + torch.matmul(qc * qd, bef)
            outs.append(out.reshape(b, h, -1, dv)[:, :, : e - a])
            befores.append(bef)
        ctx.save_for_backward(q, k, v, g, *befores)
        ctx.c, ctx.seg = c, seg
        return torch.cat(outs, dim=2), state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_state):
        q, k, v, g, *befores = ctx.saved_tensors
        c, seg = ctx.c, ctx.seg
        b, h, n, dk = q.shape
        dv = v.shape[-1]
        m_last = n - (n - 1) // c * c
        mask, q_decay, k_decay, chunk_decay, k_last, last_decay = _ConstantDecayScan._consts(g, c, m_last)
        mask_b = mask.view(1, h, 1, c, c)
        qd = q_decay.view(1, h, 1, c, 1)
        if d_out is None:
            d_out = torch.zeros(b, h, n, dv, dtype=q.dtype, device=q.device)
        d_out = d_out.contiguous()  # e.g. the expanded gradient of a sum(): bmm is slow on stride-0 inputs
        grad = torch.zeros(b, h, dk, dv, dtype=q.dtype, device=q.device) if d_state is None else d_state
        segs = _ConstantDecayScan._segments(n, seg)
        dqs, dks, dvs = [], [], []
        for si in range(len(segs) - 1, -1, -1):
            a, e = segs[si]
            qc, kc, vc, doc = (_ConstantDecayScan._blocks(t[:, :, a:e], c) for t in (q, k, v, d_out))
            nc = qc.shape[2]
            kd = k_decay.view(1, h, 1, c, 1).expand(1, h, nc, c, 1)
            cd = chunk_decay.view(1, h, 1, 1, 1).expand(1, h, nc, 1, 1)
            if si == len(segs) - 1 and m_last != c:
                kd = torch.cat([kd[:, :, :-1], k_last.view(1, h, 1, c, 1)], dim=2)
                cd = torch.cat([cd[:, :, :-1], last_decay.view(1, h, 1, 1, 1)], dim=2)
            bef = befores[si]
            attn = torch.matmul(qc, kc.transpose(-1, -2)) * mask_b
            d_attn = torch.matmul(doc, vc.transpose(-1, -2)) * mask_b
            dq = torch.matmul(d_attn, kc) + torch.matmul(doc, bef.transpose(-1, -2)) * qd
            dk_ = torch.matmul(d_attn.transpose(-1, -2), qc)
            dv_ = torch.matmul(attn.transpose(-1, -2), doc)
            local = torch.matmul((qc * qd).transpose(-1, -2), doc)  # dL/d(state before chunk i), direct part
            d_contrib = []  # gradient of each chunk's own contribution = gradient of the state after it
            for i in range(nc - 1, -1, -1):
                d_contrib.append(grad)
                grad = local[:, :, i] + cd[:, :, i] * grad
            d_contrib = torch.stack(d_contrib[::-1], dim=2)  # (B, H, nc, dk, dv)
            kdk = kc * kd
            dk_ = dk_ + torch.matmul(vc, d_contrib.transpose(-1, -2)) * kd
            dv_ = dv_ + torch.matmul(kdk, d_contrib)
            dqs.append(dq.reshape(b, h, -1, dk)[:, :, : e - a])
            dks.append(dk_.reshape(b, h, -1, dk)[:, :, : e - a])
            dvs.append(dv_.reshape(b, h, -1, dv)[:, :, : e - a])
        cat = lambda xs: torch.cat(xs[::-1], dim=2)  # noqa: E731
        return cat(dqs), cat(dks), cat(dvs), grad, None, None, None


def _recurrence_chunked_pass(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: float | Tensor | None = None,
    *,
    chunk: int = 64,
    initial: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One vectorised pass of the chunked recurrence over the whole input.

    Inside a chunk of ``C`` tokens the outputs are ``[(Q K^T) * M] V`` with the ``C x C`` decay mask
    ``M[i, j] = exp(G_i - G_j)`` (``i >= j``; ``G`` the within-chunk cumulative log decay); the state
    before the chunk adds ``(Q * exp(G)) S``; the state is carried over chunks by a short loop
    (``N / C`` small ``dk x dv`` updates). This is the Lightning Attention-2 intra/inter split
    (arXiv 2401.04658, Alg. 1). Every exponent is ``<= 0`` when ``g <= 0``, so nothing overflows.
    Cost ``O(N C (dk + dv) + N dk dv)``; memory ``O(N (C + dk dv / C))``; no ``N x N`` tensor.
    The per-state-entry (``elementwise``) decay of S6 uses ``C x C x dk x dv`` blocks in a loop over
    chunks (pick a small chunk, e.g. 16).
    """
    _check_qkv_state(q, k, v, initial)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    kind, g = _decay_kind(log_decay, q, v)
    if kind == "elementwise":
        return _chunked_elementwise(q, k, v, g, chunk, initial)
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    dt, dev = q.dtype, q.device
    c = min(chunk, n)
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        if kind == "scalar":
            g = torch.nn.functional.pad(g, (0, pad))  # log decay 0 on padding: the state passes unchanged
    qc = q.reshape(b, h, nc, c, dk)
    kc = k.reshape(b, h, nc, c, dk)
    vc = v.reshape(b, h, nc, c, dv)
    tri = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    q_decay = k_decay = chunk_decay = None
    if kind == "none":
        mask = tri.to(dt)
    elif kind == "head":
        r = torch.arange(c, device=dev, dtype=dt)
        gh = g.view(h, 1, 1)
        mask = torch.exp(torch.where(tri, gh * (r[:, None] - r[None, :]), neg_inf)).view(1, h, 1, c, c)
        q_decay = torch.exp(gh * (r + 1).view(1, c, 1)).view(1, h, 1, c, 1)  # lambda^(i+1)
        k_decay = torch.exp(gh * (c - 1 - r).view(1, c, 1)).view(1, h, 1, c, 1)  # lambda^(C-1-j)
        chunk_decay = torch.exp(g * c).view(1, h, 1, 1).expand(b, h, 1, 1)
        chunk_decay = chunk_decay[:, :, :, None].expand(b, h, nc, 1, 1)
    else:  # scalar: one log decay per (batch, head, step)
        gg = g.reshape(b, h, nc, c).cumsum(-1)  # within-chunk cumulative log decay G_i
        mask = torch.exp(torch.where(tri, gg[..., :, None] - gg[..., None, :], neg_inf))
        q_decay = torch.exp(gg)[..., None]
        k_decay = torch.exp(gg[..., -1:] - gg)[..., None]
        chunk_decay = torch.exp(gg[..., -1])[..., None, None]  # (B, H, nc, 1, 1)
    out = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * mask, vc)  # intra-chunk
    kx = kc if k_decay is None else kc * k_decay
    contrib = torch.matmul(kx.transpose(-1, -2), vc)  # (B, H, nc, dk, dv): each chunk's own state
    state = q.new_zeros(b, h, dk, dv) if initial is None else initial.to(dt)
    if kind == "none":
        csum = contrib.cumsum(dim=2)
        before = torch.cat([state[:, :, None], csum[:, :, :-1] + state[:, :, None]], dim=2)
        final = csum[:, :, -1] + state
    else:
        befores = []
        # unbind once: indexing contrib[:, :, i] in the loop would make autograd allocate a full-size
        # zero gradient per chunk (quadratic backward)
        decays = chunk_decay.unbind(2)
        for i, x_i in enumerate(contrib.unbind(2)):
            befores.append(state)
            state = decays[i] * state + x_i
        before = torch.stack(befores, dim=2)
        final = state
        if kind == "head" and pad:  # the last chunk is partial: do not decay over the padding
            m = c - pad
            r = torch.arange(m, device=dev, dtype=dt)
            kd = torch.exp(g.view(h, 1, 1) * (m - 1 - r).view(1, m, 1))
            last_k = k[:, :, n - m : n] * kd
            final = torch.exp(g * m).view(1, h, 1, 1) * before[:, :, -1] + torch.matmul(
                last_k.transpose(-1, -2), v[:, :, n - m : n]
            )
    qx = qc if q_decay is None else qc * q_decay
    out = out + torch.matmul(qx, before)  # inter-chunk
    return out.reshape(b, h, nc * c, dv)[:, :, :n], final


def _chunked_elementwise(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk: int, initial: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-state-entry decay ``g (B, H, N, dk, dv)``: ``C x C x dk x dv`` blocks, loop over chunks."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    state = q.new_zeros(b, h, dk, dv) if initial is None else initial.to(q.dtype)
    c = min(chunk, n)
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()[:, :, None, None]
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    outs = []
    # split (not slicing in the loop, whose backward would allocate a full-size gradient per chunk)
    for qs, ks, vs, gs in zip(q.split(c, 2), k.split(c, 2), v.split(c, 2), g.split(c, 2)):
        gs = gs.cumsum(2)  # (B, H, L, dk, dv)
        L = qs.shape[2]
        w = torch.exp(torch.where(tri[:L, :L], gs[:, :, :, None] - gs[:, :, None, :], neg_inf))  # (B,H,L,L,dk,dv)
        qk = qs[:, :, :, None, :] * ks[:, :, None, :, :]  # (B, H, L, L, dk)
        intra = torch.einsum("bhtsn,bhtsnc,bhsc->bhtc", qk, w, vs)
        inter = torch.einsum("bhtn,bhtnc,bhnc->bhtc", qs, torch.exp(gs), state)
        outs.append(intra + inter)
        tail = torch.exp(gs[:, :, -1:] - gs)  # decay from each step to the chunk end
        state = torch.exp(gs[:, :, -1]) * state + torch.einsum("bhsn,bhsc,bhsnc->bhnc", ks, vs, tail)
    return torch.cat(outs, dim=2), state


# ---------------------------------------------------------------------------------------------------
# 3. Softmax prefix scan with a running maximum ("Attention as an RNN", arXiv 2405.13956)
# ---------------------------------------------------------------------------------------------------
def _safe(m: Tensor) -> Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def softmax_scan_combine(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The associative operator ``(m_A, u_A, w_A) + (m_B, u_B, w_B)`` of Aaren's prefix scan.

    ``m = max(m_A, m_B)``, ``u = u_A e^{m_A - m} + u_B e^{m_B - m}``, ``w = w_A e^{m_A - m} + w_B e^{m_B - m}``.
    ``m, u`` are ``(...)``, ``w`` is ``(..., E)``. ``m = -inf`` (nothing seen) is the identity. The
    maximum only keeps the exponentials in range and cancels in ``w / u``, so it carries no gradient.
    """
    ma, ua, wa = a
    mb, ub, wb = b
    m = torch.maximum(ma, mb).detach()
    ms = _safe(m)
    fa = torch.exp(ma - ms)
    fb = torch.exp(mb - ms)
    return m, ua * fa + ub * fb, wa * fa[..., None] + wb * fb[..., None]


def hillis_steele_scan(m: Tensor, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inclusive Hillis-Steele scan of :func:`softmax_scan_combine` along the last axis of ``m, u``
    (``(..., T)``) and the second-to-last of ``w`` (``(..., T, E)``): ``log2 T`` vectorised steps."""
    t = m.shape[-1]
    off = 1
    while off < t:
        cm, cu, cw = softmax_scan_combine(
            (m[..., :-off], u[..., :-off], w[..., :-off, :]), (m[..., off:], u[..., off:], w[..., off:, :])
        )
        m = torch.cat([m[..., :off], cm], dim=-1)
        u = torch.cat([u[..., :off], cu], dim=-1)
        w = torch.cat([w[..., :off, :], cw], dim=-2)
        off *= 2
    return m, u, w


def _ratio(w: Tensor, u: Tensor) -> Tensor:
    return w / torch.where(u > 0, u, torch.ones_like(u))[..., None]


def softmax_scan_init(batch_shape: tuple[int, ...], e: int, *, dtype=None, device=None) -> dict[str, Tensor]:
    """The empty scan state ``{"m": -inf, "u": 0, "w": 0}`` for ``batch_shape`` (e.g. ``(B, H)``)."""
    return {
        "m": torch.full(batch_shape, float("-inf"), dtype=dtype, device=device),
        "u": torch.zeros(batch_shape, dtype=dtype, device=device),
        "w": torch.zeros(*batch_shape, e, dtype=dtype, device=device),
    }


def softmax_scan_step(state: dict[str, Tensor], s_t: Tensor, v_t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One token: combine the state with the leaf ``(s_t, 1, v_t)``; returns ``(o_t, new state)``.

    ``s_t (...)`` (``-inf`` = ignore the token), ``v_t (..., E)``."""
    m, u, w = softmax_scan_combine((state["m"], state["u"], state["w"]), (s_t, torch.ones_like(s_t), v_t))
    return _ratio(w, u), {"m": m, "u": u, "w": w}


def softmax_scan_loop(s: Tensor, v: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The sequential stable RNN: :func:`softmax_scan_step` token by token on ``s (B, H, N)``, ``v (B, H, N, E)``."""
    if state is None:
        state = softmax_scan_init(s.shape[:-1], v.shape[-1], dtype=v.dtype, device=v.device)
    outs = []
    for t in range(s.shape[-1]):
        o, state = softmax_scan_step(state, s[..., t], v[..., t, :])
        outs.append(o)
    return torch.stack(outs, dim=-2), state


def softmax_scan_reference(s: Tensor, v: Tensor) -> Tensor:
    """``o_k = softmax(s_{1..k}) v_{1..k}`` with a materialised ``N x N`` causal mask (tests only)."""
    n = s.shape[-1]
    tri = torch.ones(n, n, dtype=torch.bool, device=s.device).tril()
    scores = torch.where(tri, s[..., None, :], torch.tensor(float("-inf"), dtype=s.dtype, device=s.device))
    mx = _safe(scores.amax(-1, keepdim=True))
    p = torch.exp(scores - mx)
    den = p.sum(-1, keepdim=True)
    return torch.matmul(p / torch.where(den > 0, den, torch.ones_like(den)), v)


def softmax_scan(
    s: Tensor, v: Tensor, *, chunk: int = 64, state: dict[str, Tensor] | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Chunked parallel prefix scan: ``o_k = sum_{j<=k} e^{s_j} v_j / sum_{j<=k} e^{s_j}``.

    ``s (B, H, N)`` scores of one fixed query per (batch, head) (``-inf`` = ignored token),
    ``v (B, H, N, E)``. Inside a chunk the running maximum ``m_i`` (``cummax``) gives the ``C x C``
    weights ``exp(s_j - m_i)`` (``j <= i``) and one matmul; the chunk summaries ``(m, u, w)`` are
    combined by a Hillis-Steele scan over chunks (:func:`hillis_steele_scan`), then merged into each
    position. ``state`` continues a previous scan; returns ``(o (B, H, N, E), final state)``.
    Work ``O(N C E)``; memory ``O(N (C + E))``.
    """
    if s.dim() < 1 or v.shape[:-1] != s.shape:
        raise ValueError(f"softmax_scan: s (..., N) and v (..., N, E) must agree; got {tuple(s.shape)}, {tuple(v.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    *lead, n = s.shape
    e = v.shape[-1]
    if state is None:
        state = softmax_scan_init(tuple(lead), e, dtype=v.dtype, device=v.device)
    c = min(chunk, n)
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    sc = s.reshape(*lead, nc, c)
    vc = v.reshape(*lead, nc, c, e)
    mloc = torch.cummax(sc.detach(), dim=-1).values  # running max inside the chunk
    tri = torch.ones(c, c, dtype=torch.bool, device=s.device).tril()
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    wts = torch.exp(torch.where(tri, sc[..., None, :] - _safe(mloc)[..., :, None], neg_inf))  # exp(s_j - m_i)
    uloc = wts.sum(-1)
    wloc = torch.matmul(wts, vc)
    # chunk summaries with the incoming state in front, scanned over chunks
    cm = torch.cat([state["m"][..., None], mloc[..., -1]], dim=-1)
    cu = torch.cat([state["u"][..., None], uloc[..., -1]], dim=-1)
    cw = torch.cat([state["w"][..., None, :], wloc[..., -1, :]], dim=-2)
    cm, cu, cw = hillis_steele_scan(cm, cu, cw)
    carry = (cm[..., :-1, None], cu[..., :-1, None], cw[..., :-1, None, :])  # state before each chunk
    m, u, w = softmax_scan_combine(carry, (mloc, uloc, wloc))
    out = _ratio(w, u).reshape(*lead, nc * c, e)[..., :n, :]
    return out, {"m": cm[..., -1], "u": cu[..., -1], "w": cw[..., -1, :]}

"""Chunked linear recurrences shared by recurrent mechanisms.

``h_t = decay * h_{t-1} + x_t`` evaluated three ways that must agree: a readable token loop
(:func:`decayed_cumsum_loop`, the reference), a chunk-parallel form (:func:`decayed_cumsum`:
a small ``C x C`` decay matrix inside each chunk plus a carry across chunks, never an ``N x N``
tensor), and a single step (:func:`decayed_step`) for decoding.
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
    for i in range(nc):
        carries.append(state)
        state = dc * state + totals[:, :, i]
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

"""Agent attention: a few pooled agent tokens aggregate from the keys, then broadcast to the queries.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (Han, Ye, Han, Xia, Pan,
Wan, Song, Huang; ECCV 2024; arXiv 2312.08874). Official code: ``LeapLabTHU/Agent-Attention``
(``agent_transformer/models/agent_pvt.py``, class ``AgentAttention``).

Per head, with queries ``Q (N x d)``, keys/values ``K, V (M x d)`` and ``n`` agent tokens ``A (n x d)``::

    A   = Pool(Q)                                   agents = adaptive average pool of the queries
    V_A = softmax(A K^T * s + B1) V                 agent aggregation   (n x M attention)
    O   = softmax(Q A^T * s + B2) V_A + DWC(V)      agent broadcast     (N x n attention)

``s = d^-1/2``; ``B1 (n x M)`` and ``B2 (N x n)`` are the agent biases; ``DWC`` is a depthwise
convolution over the token grid (3 x 3 in the paper), the "diversity restoration" term. Without
biases and DWC this is the generalised linear attention ``phi_q(Q) phi_k(K)^T V`` with
``phi_q(Q) = softmax(Q A^T)`` and ``phi_k(K) = softmax(A K^T)^T``: the implicit ``N x M`` attention
``softmax(QA^T) softmax(AK^T)`` has rows summing to 1 and rank <= n, and evaluating
``softmax(QA^T) (softmax(AK^T) V)`` costs ``O(N n d)``: linear in N.

One implementation for sequences and images (shared with the vision issue):

* everything runs on a token *grid* ``(h, w)``. An image is its own grid; a sequence of N tokens is a
  ``1 x N`` image. Pooling is ``adaptive_avg_pool2d`` to an agent grid (``sqrt(n) x sqrt(n)`` for
  images as in the code; ``1 x n`` for sequences), the DWC is ``Conv2d(groups=C)`` with zero padding
  (on a ``1 x N`` image a ``k x k`` kernel acts through its middle row: a 1-D depthwise conv).
* biases follow the official code's decomposition: ``B1[a, (y, x)] = resize(an_bias[a] (s x s) ->
  h x w)[y, x] + ah_bias[a, y] + aw_bias[a, x]`` and ``B2[(y, x), a]`` likewise from ``na_bias``,
  ``ha_bias``, ``wa_bias`` (bilinear resize of the ``bias_size x bias_size`` table as in the code).

Fast form: pool, two small softmaxes, ``softmax(QA^T) @ (softmax(AK^T) @ V)``, ``conv2d``. Reference
form: the bins of the pooling written out, the implicit ``N x M`` attention materialised, the
depthwise convolution written as a sum over kernel offsets.

Deviations from the paper/code (all deliberate, documented in ``docs/mechanisms/agent.md``):

* the code's row/column biases (``ah/aw/ha/wa``) have a fixed length (the training feature-map
  side); here they are stored at length ``bias_window`` and linearly resized to the actual grid, so
  any grid size works (identical to the code when the grid side equals ``bias_window``).
* cross-attention (queries pooled into agents, keys/values from the context) is not in the code;
  there the DWC runs on V resized (bilinearly) to the query grid, exactly like the code's
  ``sr_ratio > 1`` path that resizes a downsampled V back to the query grid.
* no CLS-token handling (DeiT variant), no spatial reduction (``sr_ratio``) of K/V.
* no key padding mask: pooled agents, biases and the DWC are defined on the full grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv, merge_heads, split_heads
from ...core.module import AttentionModule
from ...registry import register

Grid = tuple[int, int]


# -- shared helpers -------------------------------------------------------------------------------
def _as_grid(grid, n: int, what: str) -> Grid:
    if grid is None:
        return (1, n)
    if not (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(isinstance(g, int) and g >= 1 for g in grid)
    ):
        raise ValueError(f"agent: {what} must be a pair of positive ints (height, width), got {grid!r}")
    if grid[0] * grid[1] != n:
        raise ValueError(
            f"agent: {what} {tuple(grid)} holds {grid[0] * grid[1]} tokens, but the sequence has {n}"
        )
    return (int(grid[0]), int(grid[1]))


def agent_grid_for(grid: Grid, num_agents: int) -> Grid:
    """The agent grid: ``1 x n`` for a sequence (grid height 1), ``sqrt(n) x sqrt(n)`` for an image."""
    if not isinstance(num_agents, int) or isinstance(num_agents, bool) or num_agents < 1:
        raise ValueError(f"agent: num_agents must be a positive int, got {num_agents!r}")
    if grid[0] == 1:
        return (1, num_agents)
    side = math.isqrt(num_agents)
    if side * side != num_agents:
        raise ValueError(
            f"agent: on a 2-D grid num_agents must be a perfect square (pooled to side x side), got {num_agents}"
        )
    return (side, side)


def _to_grid(x: Tensor, grid: Grid) -> Tensor:
    """``(B, H, L, D)`` -> ``(B, H*D, h, w)`` (channel = head * D + d, as in merged heads)."""
    b, h, n, d = x.shape
    return x.permute(0, 1, 3, 2).reshape(b, h * d, grid[0], grid[1])


def _from_grid(x: Tensor, heads: int) -> Tensor:
    """``(B, H*D, h, w)`` -> ``(B, H, h*w, D)``."""
    b, c, gh, gw = x.shape
    return x.reshape(b, heads, c // heads, gh * gw).transpose(-1, -2)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Tensor | None) -> None:
    if causal:
        raise ValueError(
            "agent: causal attention is not defined (agents pool queries over the whole sequence)"
        )
    if key_padding_mask is not None:
        raise ValueError(
            "agent: key_padding_mask is not supported (agents, biases and DWC live on the full grid)"
        )


def _grids(q: Tensor, k: Tensor, cross: bool, grid, kv_grid) -> tuple[Grid, Grid]:
    n, m = q.shape[2], k.shape[2]
    g = _as_grid(grid, n, "grid")
    if kv_grid is None:
        kv_grid = (1, m) if (cross or n != m) else g
    return g, _as_grid(kv_grid, m, "kv_grid")


def _dwc_input(v: Tensor, kv_grid: Grid, grid: Grid) -> Tensor:
    """V as an image on the query grid (resized bilinearly if the key grid differs, as the code's sr path)."""
    img = _to_grid(v, kv_grid)
    if kv_grid != grid:
        img = F.interpolate(img, size=grid, mode="bilinear", align_corners=False)
    return img


# -- fast form ------------------------------------------------------------------------------------
def agent_attention_with_agents(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    agents: Tensor,
    *,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """The agent-attention core for given agents ``A (B, H, n, D)``, linear order, no DWC:
    ``softmax(Q A^T s + B2) (softmax(A K^T s + B1) V)``; ``k, v`` already have ``H`` heads."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    agg = torch.matmul(agents * s, k.transpose(-1, -2))
    if agent_bias is not None:
        agg = agg + agent_bias
    agent_v = torch.matmul(agg.softmax(dim=-1), v)  # (B, H, n, Dv): cost O(n M d)
    brd = torch.matmul(q * s, agents.transpose(-1, -2))
    if query_bias is not None:
        brd = brd + query_bias
    return torch.matmul(brd.softmax(dim=-1), agent_v)  # (B, H, N, Dv): cost O(N n d)


def agent_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    num_agents: int = 49,
    grid: Grid | None = None,
    kv_grid: Grid | None = None,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    dwc_weight: Tensor | None = None,
    dwc_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Agent attention, linear order: ``softmax(QA^T s + B2) (softmax(AK^T s + B1) V) + DWC(V)``.

    ``q (B, H, N, D)``, ``k, v (B, Hkv, M, D)``. ``grid (h, w)`` lays the N queries out as an image
    (default ``(1, N)``: a sequence); ``kv_grid`` does the same for the M keys (default: ``grid`` for
    self-attention, ``(1, M)`` for cross). ``agent_bias`` (B1) broadcasts to ``(B, H, n, M)``,
    ``query_bias`` (B2) to ``(B, H, N, n)``. ``dwc_weight`` is a depthwise ``Conv2d`` weight
    ``(H*Dv, 1, kh, kw)`` (odd kernel, zero padding) with optional ``dwc_bias (H*Dv,)``; None = no DWC.
    """
    _check_inputs(q, k, v, causal, key_padding_mask)
    k, v = expand_kv(k, v, q.shape[1])
    g, kg = _grids(q, k, cross, grid, kv_grid)
    ag = agent_grid_for(g, num_agents)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    heads = q.shape[1]
    agents = _from_grid(F.adaptive_avg_pool2d(_to_grid(q, g), ag), heads)  # (B, H, n, D)
    out = agent_attention_with_agents(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=s)
    if dwc_weight is not None:
        kh, kw = dwc_weight.shape[-2:]
        conv = F.conv2d(
            _dwc_input(v, kg, g), dwc_weight, dwc_bias, padding=(kh // 2, kw // 2), groups=dwc_weight.shape[0]
        )
        out = out + _from_grid(conv, heads)
    return out


# -- reference form -------------------------------------------------------------------------------
def _pool_bins(length: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling bins: bin i covers [floor(i L / n), ceil((i + 1) L / n))."""
    return [((i * length) // out, -(-((i + 1) * length) // out)) for i in range(out)]


def _pool_reference(q: Tensor, grid: Grid, agent_grid: Grid) -> Tensor:
    """Agents ``(B, H, n, D)``: the mean of the queries in each 2-D bin, written out."""
    b, h, n, d = q.shape
    img = q.reshape(b, h, grid[0], grid[1], d)
    rows, cols = _pool_bins(grid[0], agent_grid[0]), _pool_bins(grid[1], agent_grid[1])
    agents = [img[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for (r0, r1) in rows for (c0, c1) in cols]
    return torch.stack(agents, dim=2)


def _dwc_reference(img: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Depthwise convolution with zero padding as a sum over kernel offsets: ``y[c,i,j] = sum w[c,a,b] x[c,i+a-ph,j+b-pw]``."""
    c, _, kh, kw = weight.shape
    ph, pw = kh // 2, kw // 2
    padded = F.pad(img, (pw, pw, ph, ph))
    hh, ww = img.shape[-2:]
    out = torch.zeros_like(img)
    for a in range(kh):
        for bb in range(kw):
            out = out + weight[:, 0, a, bb].view(1, c, 1, 1) * padded[:, :, a : a + hh, bb : bb + ww]
    if bias is not None:
        out = out + bias.view(1, c, 1, 1)
    return out


def agent_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    num_agents: int = 49,
    grid: Grid | None = None,
    kv_grid: Grid | None = None,
    agent_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
    dwc_weight: Tensor | None = None,
    dwc_bias: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The paper's equations with the implicit ``N x M`` attention ``softmax(QA^T s + B2) softmax(AK^T s + B1)`` materialised.

    With ``return_weights`` also returns that ``(B, H, N, M)`` matrix.
    """
    _check_inputs(q, k, v, causal, key_padding_mask)
    k, v = expand_kv(k, v, q.shape[1])
    g, kg = _grids(q, k, cross, grid, kv_grid)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    agents = _pool_reference(q, g, agent_grid_for(g, num_agents))
    b1 = 0.0 if agent_bias is None else agent_bias
    b2 = 0.0 if query_bias is None else query_bias
    aggregate = torch.softmax(agents @ k.transpose(-1, -2) * s + b1, dim=-1)  # (B, H, n, M)
    broadcast = torch.softmax(q @ agents.transpose(-1, -2) * s + b2, dim=-1)  # (B, H, N, n)
    weights = broadcast @ aggregate  # (B, H, N, M), the implicit attention matrix
    out = weights @ v
    if dwc_weight is not None:
        out = out + _from_grid(_dwc_reference(_dwc_input(v, kg, g), dwc_weight, dwc_bias), q.shape[1])
    return (out, weights) if return_weights else out


# -- module ---------------------------------------------------------------------------------------
def _resize1d(t: Tensor, size: int, dim: int) -> Tensor:
    """Linear resize of ``t`` along ``dim`` to ``size`` (identity when the size already matches)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    shape = moved.shape
    out = F.interpolate(moved.reshape(-1, 1, shape[-1]), size=size, mode="linear", align_corners=False)
    return out.reshape(*shape[:-1], size).movedim(-1, dim)


def _resize2d(t: Tensor, size: Grid) -> Tensor:
    """Bilinear resize of ``t (..., s, s)`` to ``size`` (as the code's ``interpolate(..., mode='bilinear')``)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    lead = t.shape[:-2]
    out = F.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


@register(
    "agent",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    family="linear",
    capabilities={"noncausal_self", "noncausal_cross", "spatial", "trainable"},
    complexity="time O(N n d) with n agents, memory O(N n); linear in N",
    functional=agent_attention,
    reference=agent_attention_reference,
    defaults={
        "num_agents": 49,
        "agent_bias": True,
        "dwc": True,
        "dwc_kernel": 3,
        "bias_size": 7,
        "bias_window": 14,
        "scale": None,
    },
    summary="pooled agent tokens aggregate from K/V with softmax and broadcast back to Q with softmax (a generalised linear attention), plus agent biases and a depthwise-conv term; sequences and 2-D grids",
    deviations=(
        "row/column agent biases are resized to the grid (code: fixed feature-map size); cross-attention "
        "(not in the code) applies the DWC to V resized to the query grid; a sequence is a 1 x N image; "
        "no CLS handling, no K/V spatial reduction, no key padding"
    ),
    test_config={"num_agents": 9, "bias_size": 3, "bias_window": 8},
)
class AgentAttention(AttentionModule):
    """Agent attention layer on sequences ``(B, N, C)`` (self or cross) and grids ``(B, H, W, C)``.

    Settings: ``num_agents`` (n; a perfect square for 2-D grids), ``agent_bias`` (the B1/B2 biases),
    ``dwc`` (the depthwise-conv term, kernel ``dwc_kernel``), ``bias_size`` (side of the low-resolution
    bias table, 7 in the code), ``bias_window`` (stored length of the row/column biases, the
    feature-map side in the code: 14 for DeiT-224), ``scale`` (default ``head_dim ** -0.5``).
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, **kw) -> None:
        super().__init__(dim, num_heads, causal=causal, **kw)
        st = self.settings
        n = st["num_agents"]
        agent_grid_for((1, 1), n)  # validates num_agents
        for key in ("dwc_kernel", "bias_size", "bias_window"):
            if not isinstance(st[key], int) or st[key] < 1:
                raise ValueError(f"agent: {key} must be a positive int, got {st[key]!r}")
        if st["dwc_kernel"] % 2 == 0:
            raise ValueError(
                f"agent: dwc_kernel must be odd (same-size zero-padded conv), got {st['dwc_kernel']}"
            )
        h, s, w = num_heads, st["bias_size"], st["bias_window"]
        if st["agent_bias"]:
            self.an_bias = nn.Parameter(torch.empty(h, n, s, s))
            self.na_bias = nn.Parameter(torch.empty(h, n, s, s))
            self.ah_bias = nn.Parameter(torch.empty(h, n, w))
            self.aw_bias = nn.Parameter(torch.empty(h, n, w))
            self.ha_bias = nn.Parameter(torch.empty(h, w, n))
            self.wa_bias = nn.Parameter(torch.empty(h, w, n))
            for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
                nn.init.trunc_normal_(p, std=0.02)
        if st["dwc"]:
            c = num_heads * self.head_dim
            kk = st["dwc_kernel"]
            self.dwc_conv = nn.Conv2d(c, c, kernel_size=kk, padding=kk // 2, groups=c)

    def biases(self, grid: Grid, kv_grid: Grid) -> tuple[Tensor | None, Tensor | None]:
        """Dense ``B1 (1, H, n, M)`` and ``B2 (1, H, N, n)`` for a query grid and a key grid."""
        if not self.settings["agent_bias"]:
            return None, None
        kh, kw = kv_grid
        b1 = (
            _resize2d(self.an_bias, kv_grid)
            + _resize1d(self.ah_bias, kh, 2)[..., :, None]
            + _resize1d(self.aw_bias, kw, 2)[..., None, :]
        )
        h, w = grid
        b2 = (
            _resize2d(self.na_bias, grid)
            + _resize1d(self.ha_bias, h, 1).transpose(1, 2)[..., :, None]
            + _resize1d(self.wa_bias, w, 1).transpose(1, 2)[..., None, :]
        )
        heads, n = self.num_heads, self.settings["num_agents"]
        return b1.reshape(1, heads, n, kh * kw), b2.reshape(1, heads, n, h * w).transpose(-1, -2)

    def run(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, kv_grid: Grid, cross: bool) -> Tensor:
        b1, b2 = self.biases(grid, kv_grid)
        fn = agent_attention_reference if self.impl == "reference" else agent_attention
        conv = getattr(self, "dwc_conv", None)
        return fn(
            q,
            k,
            v,
            causal=False,
            cross=cross,
            num_agents=self.settings["num_agents"],
            grid=grid,
            kv_grid=kv_grid,
            agent_bias=b1,
            query_bias=b2,
            scale=self.settings["scale"],
            dwc_weight=None if conv is None else conv.weight,
            dwc_bias=None if conv is None else conv.bias,
        )

    def forward(
        self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        cross = self.check_inputs(x, context, key_padding_mask)
        if x.dim() == 4:
            return self.forward_spatial(x)
        q, k, v = self.project(x, context)
        out = self.run(q, k, v, (1, x.shape[1]), (1, k.shape[2]), cross)
        return self.out_proj(merge_heads(out))

    def forward_spatial(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` grid: 2-D pooling to ``sqrt(n) x sqrt(n)`` agents, 2-D biases, 2-D DWC."""
        b, gh, gw, c = x.shape
        t = x.reshape(b, gh * gw, c)
        q = split_heads(self.q_proj(t), self.num_heads)
        k = split_heads(self.k_proj(t), self.num_kv_heads)
        v = split_heads(self.v_proj(t), self.num_kv_heads)
        out = self.run(q, k, v, (gh, gw), (gh, gw), False)
        return self.out_proj(merge_heads(out)).reshape(b, gh, gw, c)

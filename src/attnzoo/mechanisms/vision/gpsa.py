"""ConViT gated positional self-attention (``gpsa``).

Paper: "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (d'Ascoli,
Touvron, Leavitt, Morcos, Biroli, Sagun; ICML 2021, arXiv 2103.10697). Official code read (not
copied): ``facebookresearch/convit``, ``convit.py`` (``GPSA``, ``local_init``, ``get_rel_indices``).

Equations, per head ``h`` (tokens on an ``H x W`` grid, ``pos(i) = (x_i, y_i)`` = (column, row)):

* content attention ``A_c = softmax(Q K^T / sqrt(d))``;
* relative encoding ``r_ij = (dx, dy, dx^2 + dy^2)`` with ``(dx, dy) = pos(j) - pos(i)``;
* positional attention ``A_p[i, j] = softmax_j( v_pos^h . r_ij )`` (``v_pos`` = ``pos_weight``, ``(heads, 3)``);
* gate ``g_h = sigmoid(lambda_h)``: ``A = (1 - g_h) A_c + g_h A_p``, ``out = A V`` -> output projection.

Locality initialisation (``use_local_init=True``, strength ``alpha = locality_strength``): the heads
are laid out on a ``k x k`` grid, ``k = floor(sqrt(heads))``, centre ``c = (k - 1) / 2``; head
``p = a + k b`` (``a, b < k``) gets the offset ``Delta_p = (b - c, a - c)`` and the weights
``v_pos = alpha (2 Delta_x, 2 Delta_y, -1)``, i.e. the logit ``-alpha |delta - Delta_p|^2 + const``:
the positional attention of each head peaks at its offset like one tap of a ``k x k`` convolution.
``W_V`` starts as the identity. ``lambda`` starts at ``gate_init = 1`` (``g = 0.731``).

Fast form: ``A`` is linear in its two parts, so ``out = (1 - g) SDPA(q, k, v) + g (A_p v)`` with the
fused kernel for the content part and the input-independent ``A_p`` computed once per call. The
reference materialises ``A`` (and renormalises its rows, as the official code does; a no-op in exact
arithmetic).

1-D form (``noncausal_self`` on ``(B, N, C)``): the sequence is a ``1 x N`` grid (``dy = 0``).
The functional ``gpsa_attention`` takes the learned tensors as arguments (``pos_weight``, ``gate``);
without them it is GPSA at its locality initialisation.

Deviations: heads beyond ``k^2`` (when ``heads`` is not a perfect square) are initialised at offset
0 (the official code leaves them at random); ``v_pos`` has no bias (a per-head constant logit does not
change a softmax); no CLS token inside GPSA (as in ConViT, where the CLS token joins only after the
GPSA layers; the model wrapper is not part of this module).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv
from ...core.module import AttentionModule
from ...registry import get, register
from .davit import require_pattern

NAME = "gpsa"


def relative_encoding(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``r (N, N, 3)`` with ``r[i, j] = (dx, dy, dx^2 + dy^2)``, ``(dx, dy) = pos(j) - pos(i)``, row-major grid."""
    ys = torch.arange(height, device=device).repeat_interleave(width).to(dtype)
    xs = torch.arange(width, device=device).repeat(height).to(dtype)
    dx = xs[None, :] - xs[:, None]
    dy = ys[None, :] - ys[:, None]
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


def head_offsets(num_heads: int) -> Tensor:
    """The locality-init offsets ``Delta_p = (dx, dy)`` of every head, ``(heads, 2)``."""
    k = int(math.isqrt(num_heads))
    c = (k - 1) / 2
    out = torch.zeros(num_heads, 2, dtype=torch.float64)
    for a in range(k):
        for b in range(k):
            out[a + k * b] = torch.tensor([b - c, a - c], dtype=torch.float64)
    return out


def local_init_weights(num_heads: int, locality_strength: float = 1.0) -> Tensor:
    """``v_pos (heads, 3)`` of the locality initialisation: logit ``-alpha |delta - Delta_h|^2 + const``."""
    off = head_offsets(num_heads)
    w = torch.empty(num_heads, 3, dtype=torch.float64)
    w[:, 0] = 2 * off[:, 0]
    w[:, 1] = 2 * off[:, 1]
    w[:, 2] = -1.0
    return w * locality_strength


def positional_attention(num_heads: int, grid: tuple[int, int], pos_weight: Tensor | None, locality_strength: float, *, device, dtype) -> Tensor:
    """``A_p (heads, N, N)``."""
    if pos_weight is None:
        pos_weight = local_init_weights(num_heads, locality_strength)
    if tuple(pos_weight.shape) != (num_heads, 3):
        raise ValueError(f"{NAME}: pos_weight must have shape (heads, 3) = ({num_heads}, 3), got {tuple(pos_weight.shape)}")
    rel = relative_encoding(*grid, device=device, dtype=dtype)
    logits = torch.einsum("ijc,hc->hij", rel, pos_weight.to(device=device, dtype=dtype))
    return torch.softmax(logits, dim=-1)


def _prepare(q: Tensor, k: Tensor, v: Tensor, causal: bool, cross: bool, key_padding_mask, grid, gate):
    require_pattern(NAME, causal, cross)
    if key_padding_mask is not None:
        get(NAME).require("key_padding_mask")
    n = q.shape[2]
    grid = (1, n) if grid is None else tuple(int(g) for g in grid)
    if len(grid) != 2 or grid[0] * grid[1] != n:
        raise ValueError(f"{NAME}: grid {grid} does not hold the {n} tokens of q {tuple(q.shape)}")
    k, v = expand_kv(k, v, q.shape[1])
    h = q.shape[1]
    lam = torch.ones(h, dtype=q.dtype, device=q.device) if gate is None else gate.to(q.dtype)
    if lam.shape != (h,):
        raise ValueError(f"{NAME}: gate must have shape (heads,) = ({h},), got {tuple(lam.shape)}")
    return k, v, grid, torch.sigmoid(lam)[:, None, None]


def gpsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    pos_weight: Tensor | None = None,
    gate: Tensor | None = None,
    locality_strength: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """GPSA on per-head tensors ``(B, H, N, D)``; ``grid`` = ``(height, width)`` of the tokens (default ``(1, N)``).

    ``pos_weight (H, 3)``: positional weights ``v_pos`` (default: locality init with ``locality_strength``);
    ``gate (H,)``: the gating parameters ``lambda`` (default 1, i.e. ``sigmoid(1)`` on the positional part).
    """
    k, v, grid, g = _prepare(q, k, v, causal, cross, key_padding_mask, grid, gate)
    a_pos = positional_attention(q.shape[1], grid, pos_weight, locality_strength, device=q.device, dtype=q.dtype)
    content = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return (1 - g) * content + g * torch.matmul(a_pos, v)


def gpsa_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    grid: tuple[int, int] | None = None,
    pos_weight: Tensor | None = None,
    gate: Tensor | None = None,
    locality_strength: float = 1.0,
    scale: float | None = None,
) -> Tensor:
    """The paper's equations with every attention matrix materialised."""
    k, v, grid, g = _prepare(q, k, v, causal, cross, key_padding_mask, grid, gate)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    a_content = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * s, dim=-1)
    a_pos = positional_attention(q.shape[1], grid, pos_weight, locality_strength, device=q.device, dtype=q.dtype)
    a = (1 - g) * a_content + g * a_pos
    a = a / a.sum(dim=-1, keepdim=True)
    return torch.matmul(a, v)


@register(
    NAME,
    paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
    arxiv="2103.10697",
    family="vision",
    capabilities={"noncausal_self", "spatial", "trainable"},
    complexity="time O(N^2 d), memory O(N^2) per head for the positional map (content part fused)",
    functional=gpsa_attention,
    reference=gpsa_attention_reference,
    defaults={"locality_strength": 1.0, "use_local_init": True, "gate_init": 1.0, "scale": None},
    summary="softmax attention gated per head with a learned relative-position attention initialised as a convolution",
    deviations="heads beyond floor(sqrt(h))^2 start at offset 0; v_pos has no bias; 1-D sequences are 1 x N grids",
    test_config={},
)
class GPSA(AttentionModule):
    """Gated positional self-attention. Parameters: ``pos_proj.weight`` (``v_pos``, ``(heads, 3)``) and
    ``gating_param`` (``lambda``, ``(heads,)``); ``(B, N, C)`` is a ``1 x N`` grid, ``(B, H, W, C)`` a grid."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        self.pos_proj = nn.Linear(3, num_heads, bias=False)
        self.gating_param = nn.Parameter(torch.full((num_heads,), float(s["gate_init"])))
        if s["use_local_init"]:
            self.local_init()

    @torch.no_grad()
    def local_init(self) -> None:
        """The paper's locality initialisation: ``v_pos`` as conv taps, ``W_V = I``."""
        self.pos_proj.weight.copy_(local_init_weights(self.num_heads, self.settings["locality_strength"]))
        if self.v_proj.weight.shape[0] == self.v_proj.weight.shape[1]:
            self.v_proj.weight.copy_(torch.eye(self.dim))

    def op_params(self):
        return {"pos_weight": self.pos_proj.weight, "gate": self.gating_param, "scale": self.settings["scale"]}


    def positional_attention(self, grid: tuple[int, int]) -> Tensor:
        """The current positional attention ``A_p (heads, N, N)`` on a grid (for inspection)."""
        w = self.pos_proj.weight
        return positional_attention(self.num_heads, grid, w, 0.0, device=w.device, dtype=w.dtype)

    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        t = x.reshape(b, hh * ww, c)
        q, k, v = self.project(t, None)
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        out = fn(q, k, v, causal=False, cross=False, key_padding_mask=None, grid=(hh, ww), **self.op_params())
        return self.out_proj(out.transpose(1, 2).reshape(b, hh, ww, -1))


__all__ = ["GPSA", "gpsa_attention", "gpsa_attention_reference", "head_offsets", "local_init_weights", "relative_encoding"]

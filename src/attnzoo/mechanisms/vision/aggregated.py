"""TransNeXt aggregated attention (``aggregated``) and the Convolutional GLU channel mixer (:class:`ConvGLU`).

Paper: "TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (Dai Shi; CVPR 2024,
arXiv 2311.17132). Official code read (not copied): ``DaiShiResearch/TransNeXt``,
``classification/transnext_native.py`` (``AggregatedAttention``, ``ConvolutionalGLU``).

Aggregated attention, per head (``d`` = head width, ``k x k`` sliding window, ``P`` pooled tokens):

* query: ``q^ = L2norm(W_q x)``, ``q_s = (q^ + QE) * softplus(tau) * log(n_i)`` with the learned query
  embedding ``QE (heads, 1, d)``, the learned temperature ``tau (heads,)`` (``softplus(tau) = 1/0.24``
  at init) and the *length scale* ``n_i`` = number of in-image positions of the window of pixel ``i``
  plus ``P`` (length-scaled cosine attention; no ``1/sqrt(d)``);
* foveal path: ``K_loc = L2norm(W_k x)``, ``V_loc = W_v x`` over the ``k x k`` window of each pixel
  (zero padding, padded slots masked); ``logits_loc = q_s . K_loc + B_loc`` with ``B_loc (heads, k^2)``;
* peripheral path: ``x_p = LayerNorm(AvgPool_P(GELU(Linear(x))))`` (adaptive average pooling to a
  ``P = p_h x p_w`` grid), ``K_p = L2norm(W_k' x_p)``, ``V_p = W_v' x_p``; ``logits_pool = q_s . K_p + B_pool``
  where ``B_pool`` comes from a continuous position-bias MLP (``Linear(2, 512) - ReLU - Linear(512, heads)``)
  of the log-spaced relative offset between pixel ``i`` and the centre of pooled cell ``j``;
* one softmax over the ``k^2 + P`` logits: ``[A_loc | A_pool] = softmax([logits_loc | logits_pool])``;
* learnable tokens (dynamic local weights): ``out = (q^ T + b_T + A_loc) V_loc + A_pool V_p``, with
  ``T (heads, d, k^2)`` and ``b_T (heads, 1, k^2)`` (note the un-scaled ``q^``), then the output projection.

Official-code quirk, offered as ``shared_kv=True``: the code uses the *same* key/value projection for
the sliding-window and the pooled tokens (``W_k' = W_k``, ``W_v' = W_v``). The default
``shared_kv=False`` gives the pooled path its own projection, as the issue/spec describe the shared
projection as a code-only shortcut. [Not re-checked against the paper's text in this session.]

Deviations (documented): the pooled grid is ``min(pool_size, H) x min(pool_size, W)`` for any input
(the code fixes it from the training resolution, ``H / sr``); the CPB offsets are normalised by the
current grid extent (the code normalises by the pre-training grid size); the stage-4 full-attention
variant and the CUDA kernels are not included; ``learnable_tokens=False`` drops ``T, b_T`` (plain
pixel-focused attention). ``window_size`` must be odd.

Fast form: unfolded windows and batched matmuls; reference form: one pixel at a time, its window
gathered by coordinates and the pooled cells averaged explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.module import AttentionModule
from ...registry import register

NAME = "aggregated"


def _pool_grid(h: int, w: int, pool_size: int) -> tuple[int, int]:
    return min(pool_size, h), min(pool_size, w)


def _cell_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """Adaptive average pooling cells along one axis: ``[floor(i n / p), ceil((i + 1) n / p))``."""
    return [((i * n) // p, -((-(i + 1) * n) // p)) for i in range(p)]


def cpb_offsets(h: int, w: int, ph: int, pw: int, *, device=None, dtype=torch.float32) -> Tensor:
    """Log-spaced relative offsets ``(H W, P, 2)`` between every pixel and every pooled-cell centre."""
    cy = torch.tensor([(a + b - 1) / 2 for a, b in _cell_bounds(h, ph)], device=device, dtype=dtype)
    cx = torch.tensor([(a + b - 1) / 2 for a, b in _cell_bounds(w, pw)], device=device, dtype=dtype)
    ys = torch.arange(h, device=device, dtype=dtype).repeat_interleave(w)
    xs = torch.arange(w, device=device, dtype=dtype).repeat(h)
    dy = (ys[:, None, None] - cy[None, :, None]).expand(h * w, ph, pw) / max(h - 1, 1) * 8
    dx = (xs[:, None, None] - cx[None, None, :]).expand(h * w, ph, pw) / max(w - 1, 1) * 8
    rel = torch.stack([dy, dx], dim=-1).reshape(h * w, ph * pw, 2)
    return torch.sign(rel) * torch.log2(rel.abs() + 1.0) / math.log2(8)


def _l2(t: Tensor) -> Tensor:
    return F.normalize(t, dim=-1)


@register(
    NAME,
    paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
    arxiv="2311.17132",
    family="vision",
    capabilities={"spatial", "trainable"},
    complexity="time O(N (k^2 + P) d), memory O(N (k^2 + P)) per head",
    defaults={"window_size": 3, "pool_size": 7, "shared_kv": False, "learnable_tokens": True, "cpb_hidden": 512},
    summary="pixel-focused attention: a k x k sliding window and a pooled global grid under one softmax, "
    "length-scaled cosine logits, learnable tokens",
    deviations="shared_kv=True reproduces the official code's shared K/V projection; pooled grid min(pool_size, H/W); "
    "CPB offsets normalised by the current grid",
    test_config={"pool_size": 3, "cpb_hidden": 32},
)
class AggregatedAttention(AttentionModule):
    """TransNeXt aggregated attention on ``(B, H, W, C)`` grids."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        ks = s["window_size"]
        if not isinstance(ks, int) or ks < 1 or ks % 2 == 0:
            raise ValueError(f"{NAME}: window_size must be a positive odd int, got {ks!r}")
        if not isinstance(s["pool_size"], int) or s["pool_size"] < 1:
            raise ValueError(f"{NAME}: pool_size must be a positive int, got {s['pool_size']!r}")
        h, d = num_heads, self.head_dim
        bias = self.q_proj.bias is not None
        self.sr = nn.Linear(dim, dim)  # the 1x1 convolution of the pooling branch
        self.pool_norm = nn.LayerNorm(dim)
        if s["shared_kv"]:
            self.k_pool_proj = self.v_pool_proj = None
        else:
            self.k_pool_proj = nn.Linear(dim, h * d, bias=bias)
            self.v_pool_proj = nn.Linear(dim, h * d, bias=bias)
        self.query_embedding = nn.Parameter(nn.init.trunc_normal_(torch.empty(h, 1, d), std=0.02))
        self.temperature = nn.Parameter(torch.full((h,), math.log(math.expm1(1 / 0.24))))
        self.rel_bias_local = nn.Parameter(nn.init.trunc_normal_(torch.empty(h, ks * ks), std=4e-4))
        if s["learnable_tokens"]:
            self.learnable_tokens = nn.Parameter(nn.init.trunc_normal_(torch.empty(h, d, ks * ks), std=0.02))
            self.learnable_bias = nn.Parameter(torch.zeros(h, 1, ks * ks))
        else:
            self.learnable_tokens = self.learnable_bias = None
        self.cpb = nn.Sequential(nn.Linear(2, s["cpb_hidden"]), nn.ReLU(), nn.Linear(s["cpb_hidden"], h))


    # -- pieces shared by both forms (projections and biases; no attention in them) --------------
    def _heads(self, t: Tensor) -> Tensor:  # (B, ..., C) -> (B, h, ..., d)
        b = t.shape[0]
        return t.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def _pooled_input(self, x: Tensor, reference: bool) -> Tensor:
        """``x_p = LayerNorm(AvgPool(GELU(Linear(x))))``, ``(B, P, C)``."""
        b, hh, ww, c = x.shape
        ph, pw = _pool_grid(hh, ww, self.settings["pool_size"])
        t = F.gelu(self.sr(x))
        if reference:
            cells = [
                t[:, y0:y1, x0:x1].mean(dim=(1, 2))
                for (y0, y1) in _cell_bounds(hh, ph)
                for (x0, x1) in _cell_bounds(ww, pw)
            ]
            pooled = torch.stack(cells, dim=1)
        else:
            pooled = F.adaptive_avg_pool2d(t.permute(0, 3, 1, 2), (ph, pw)).flatten(2).transpose(1, 2)
        return self.pool_norm(pooled)

    def _pool_kv(self, xp: Tensor) -> tuple[Tensor, Tensor]:
        kp = self.k_proj if self.k_pool_proj is None else self.k_pool_proj
        vp = self.v_proj if self.v_pool_proj is None else self.v_pool_proj
        return _l2(self._heads(kp(xp))), self._heads(vp(xp))

    def _pool_bias(self, hh: int, ww: int, dtype) -> Tensor:
        ph, pw = _pool_grid(hh, ww, self.settings["pool_size"])
        rel = cpb_offsets(hh, ww, ph, pw, device=self.temperature.device, dtype=dtype)
        return self.cpb(rel).permute(2, 0, 1)  # (h, N, P)

    def _query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        qh = _l2(self._heads(self.q_proj(x)))  # (B, h, N, d)
        return qh, (qh + self.query_embedding) * F.softplus(self.temperature)[:, None, None]

    # -- the two forms ------------------------------------------------------------------------------
    def forward_spatial(self, x: Tensor) -> Tensor:
        fn = self._attend_reference if self.impl == "reference" else self._attend_fast
        out = fn(x)  # (B, h, N, d)
        b, hh, ww, _ = x.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, hh, ww, -1))

    def _attend_fast(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        h, d, ks = self.num_heads, self.head_dim, self.settings["window_size"]
        n, kk = hh * ww, ks * ks
        qh, qs = self._query(x)
        k = _l2(self._heads(self.k_proj(x)))
        v = self._heads(self.v_proj(x))

        def unfold(t: Tensor) -> Tensor:  # (B, h, N, d) -> (B, h, N, k^2, d), zeros outside the image
            g = t.transpose(-1, -2).reshape(b * h, d, hh, ww)
            u = F.unfold(g, ks, padding=ks // 2).view(b, h, d, kk, n)
            return u.permute(0, 1, 4, 3, 2)

        valid = F.unfold(torch.ones(1, 1, hh, ww, dtype=x.dtype, device=x.device), ks, padding=ks // 2)[0].T > 0.5  # (N, k^2)
        xp = self._pooled_input(x, reference=False)
        kp, vp = self._pool_kv(xp)
        p = kp.shape[2]
        scale = torch.log(valid.sum(-1).to(x.dtype) + p)[:, None]  # (N, 1) length scaling
        qs = qs * scale
        ku, vu = unfold(k), unfold(v)
        logits_loc = torch.einsum("bhnd,bhnkd->bhnk", qs, ku) + self.rel_bias_local[:, None, :]
        logits_loc = logits_loc.masked_fill(~valid, float("-inf"))
        logits_pool = torch.matmul(qs, kp.transpose(-1, -2)) + self._pool_bias(hh, ww, x.dtype)
        attn = torch.softmax(torch.cat([logits_loc, logits_pool], dim=-1), dim=-1)
        a_loc, a_pool = attn[..., :kk], attn[..., kk:]
        if self.learnable_tokens is not None:
            a_loc = a_loc + torch.matmul(qh, self.learnable_tokens) + self.learnable_bias
        return torch.einsum("bhnk,bhnkd->bhnd", a_loc, vu) + torch.matmul(a_pool, vp)

    def _attend_reference(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        h, d, ks = self.num_heads, self.head_dim, self.settings["window_size"]
        r = ks // 2
        qh, qs = self._query(x)
        k = _l2(self._heads(self.k_proj(x)))
        v = self._heads(self.v_proj(x))
        kp, vp = self._pool_kv(self._pooled_input(x, reference=True))
        p = kp.shape[2]
        bias_pool = self._pool_bias(hh, ww, x.dtype)
        out = torch.zeros(b, h, hh * ww, d, dtype=x.dtype, device=x.device)
        offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        for y in range(hh):
            for xx in range(ww):
                i = y * ww + xx
                slots = [(s, (y + dy) * ww + (xx + dx)) for s, (dy, dx) in enumerate(offsets) if 0 <= y + dy < hh and 0 <= xx + dx < ww]
                sl = [s for s, _ in slots]
                js = [j for _, j in slots]
                q_i = qs[:, :, i] * math.log(len(js) + p)  # (B, h, d)
                loc = torch.einsum("bhd,bhjd->bhj", q_i, k[:, :, js]) + self.rel_bias_local[:, sl]
                pool = torch.einsum("bhd,bhpd->bhp", q_i, kp) + bias_pool[:, i]
                a = torch.softmax(torch.cat([loc, pool], dim=-1), dim=-1)
                a_loc, a_pool = a[..., : len(js)], a[..., len(js) :]
                if self.learnable_tokens is not None:
                    a_loc = a_loc + torch.einsum("bhd,hdj->bhj", qh[:, :, i], self.learnable_tokens[:, :, sl]) + self.learnable_bias[:, 0, sl]
                out[:, :, i] = torch.einsum("bhj,bhjd->bhd", a_loc, v[:, :, js]) + torch.einsum("bhp,bhpd->bhd", a_pool, vp)
        return out


class ConvGLU(nn.Module):
    """TransNeXt's Convolutional GLU channel mixer (paper Sec. 3.3).

    ``hidden' = int(2 hidden / 3)`` with ``hidden = mlp_ratio * dim``; ``[a, g] = split(Linear(dim, 2 hidden'))``;
    ``y = Linear(hidden', dim)( GELU(DWConv3x3(a)) * g )`` (depthwise convolution with bias on the grid).
    Input ``(B, H, W, C)``, or ``(B, N, C)`` with ``size=(H, W)``; output of the same shape.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, hidden_dim: int | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim) if hidden_dim is None else hidden_dim
        hidden = int(2 * hidden / 3)
        if hidden < 1:
            raise ValueError(f"ConvGLU: hidden width {hidden} < 1 for dim={dim}, mlp_ratio={mlp_ratio}")
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        grid = x.dim() == 4
        if not grid:
            if size is None or x.dim() != 3 or size[0] * size[1] != x.shape[1]:
                raise ValueError(f"ConvGLU: (B, N, C) input needs size=(H, W) with H*W = N; got {tuple(x.shape)}, size={size}")
            x = x.reshape(x.shape[0], size[0], size[1], x.shape[-1])
        a, g = self.fc1(x).chunk(2, dim=-1)
        a = self.dwconv(a.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(a) * g)
        return y if grid else y.reshape(y.shape[0], -1, y.shape[-1])


__all__ = ["AggregatedAttention", "ConvGLU", "cpb_offsets"]

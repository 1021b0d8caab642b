"""Sparsifiner: a learned low-rank connectivity predictor chooses a top-k sparse attention mask.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers"
(Wei, Wang, Fan, Zhang, Lin, Shen, Yuan, Hui; CVPR 2023, arXiv 2303.13755); official code
lim142857/Sparsifiner ``src/models/sparsifiner.py`` (read, not copied).

Per head, ``q, k (N, d)``; the predictor's parameters are shared by the heads:

1. Reduce channels: ``q~ = q W_q^T + b_q``, ``k~ = k W_k^T + b_k`` (``d -> d / reduce_c``).
2. Low-rank token projection: ``k^ = k~^T P`` with ``P (max_len x R)`` learned (``R = num_basis``;
   the first ``M`` rows are used for ``M`` keys).
3. Basis coefficients ``Cf = softmax(q~ k^ * s_c)`` (``N x R``), optionally sparsified to the
   ``coef_topk`` largest entries per row (the released default keeps 8).
4. Sparse basis ``Bs = threshold_tau(|P_back^T|)`` (``R x M``, entries ``<= tau`` set to 0).
5. Approximate attention ``A^ = Cf Bs``; connectivity mask ``M_ij = 1`` for the ``K`` largest
   entries of row ``i`` with ``K = ceil(keep_rate * M)`` (the mask is not differentiable).
   With ``cls_token=True`` the first query (CLS) keeps every key.
6. Sparse attention ``softmax(q k^T / sqrt(d) masked by M) v``.

Ties in ``A^`` (and in the coefficient top-k) go to the lower index, in both forms. The fast
form sorts ``A^`` once and gathers the ``K`` selected keys per query (in query chunks), so the
attention costs ``O(N K d)``; the reference form builds the mask from pairwise ranks and runs the
golden masked softmax. The predictor itself costs ``O(N R M)`` (it is dense in ``N x M``, as in
the paper, which counts on the sparse basis).

Settings: ``keep_rate = 0.25`` (default yaml), ``num_basis = 32``, ``reduce_c = 2``,
``basis_threshold = 0.02``, ``coef_topk = 8`` (0 = off), ``max_len = 1024``.
``coef_scale = "dim"`` scales the coefficient logits by ``(d / reduce_c)^{-1/2}``; the official code
uses ``num_heads^{-1/2}`` (``coef_scale = "heads"``). The paper's own choice could not be checked,
so the standard scaled dot product is the default and the code's behaviour is the named option.

Key padding: padded keys are removed from the token projection ``k^`` and from the candidates,
and ``K = ceil(keep_rate * #valid keys)`` per sequence, so padding changes nothing.

Training: the mask is detached, so the predictor's parameters receive no gradient from the
attention output. The paper trains them with the attention-reconstruction loss
``reconstruction_weight * sum (A^ - A_dense)^2`` (weight 0.01, dense attention detached). The
module computes it in training mode (:meth:`SparsifinerAttention.reconstruction_loss`, also kept
in ``aux_loss``) and attaches it to the output's autograd graph (forward returns the output
unchanged; backward adds the loss's gradient, as if it had been added to the task loss: the
"auxiliary-loss attachment" used by e.g. DeepSeek's MoE gates), so one ``backward`` trains the
predictor too. ``reconstruction_weight = 0`` turns that off (the predictor then gets no gradient).
Training mode therefore also pays for one dense ``N x M`` attention map. Token pruning (disabled in the released default) is not implemented. Without an
explicit ``predictor`` the functional draws one from ``seed`` (a ``torch.Generator``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.layout import expand_kv, validate_qkv
from ...core.module import AttentionModule
from ...core.reference import reference_attention
from ...registry import register

NAME = "sparsifiner"
_CHUNK = 1 << 22  # elements of gathered keys per query chunk


def default_predictor(head_dim: int, *, reduce_c: int = 2, num_basis: int = 32, max_len: int = 1024, seed: int = 0) -> dict:
    """Predictor parameters drawn from a seeded generator (float64), as the module initialises them."""
    g = torch.Generator().manual_seed(seed)
    dr = max(1, head_dim // reduce_c)
    bound = 1.0 / math.sqrt(head_dim)
    u = lambda *s: (torch.rand(*s, generator=g, dtype=torch.float64) * 2 - 1) * bound  # noqa: E731
    return {
        "wq": u(dr, head_dim),
        "bq": u(dr),
        "wk": u(dr, head_dim),
        "bk": u(dr),
        "proj": (torch.randn(max_len, num_basis, generator=g, dtype=torch.float64) * 0.02).clamp(-0.04, 0.04),
        "proj_back": (torch.randn(max_len, num_basis, generator=g, dtype=torch.float64) * 0.02).clamp(-0.04, 0.04),
    }


def _keep_counts(m: int, b: int, key_padding_mask: Tensor | None, keep_rate: float, device) -> Tensor:
    valid = torch.full((b,), m, device=device) if key_padding_mask is None else (~key_padding_mask).sum(-1)
    return torch.ceil(keep_rate * valid.to(torch.float64)).long().clamp(min=1)  # (B,)


def approximate_attention(
    q: Tensor,
    k: Tensor,
    predictor: dict,
    *,
    key_padding_mask: Tensor | None = None,
    coef_scale: str = "dim",
    basis_threshold: float = 0.02,
    coef_topk: int = 8,
) -> Tensor:
    """The predictor's ``A^ = Cf Bs`` of shape ``(B, H, N, M)``; padded key columns are ``-inf``."""
    h, m = q.shape[1], k.shape[2]
    dt = q.dtype
    if m > predictor["proj"].shape[0]:
        raise ValueError(f"{NAME}: {m} keys but the token projection holds max_len = {predictor['proj'].shape[0]} rows")
    qr = F.linear(q, predictor["wq"].to(dt), predictor["bq"].to(dt))
    kr = F.linear(k, predictor["wk"].to(dt), predictor["bk"].to(dt))
    if key_padding_mask is not None:
        kr = kr.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    khat = torch.einsum("bhmc,mr->bhcr", kr, predictor["proj"][:m].to(dt))  # (B, H, d', R)
    s_c = (qr.shape[-1] if coef_scale == "dim" else h) ** -0.5
    coef = torch.softmax(torch.matmul(qr, khat) * s_c, dim=-1)  # (B, H, N, R)
    if coef_topk and coef_topk < coef.shape[-1]:
        idx = torch.sort(coef, dim=-1, descending=True, stable=True)[1][..., :coef_topk]
        coef = torch.zeros_like(coef).scatter(-1, idx, coef.gather(-1, idx))
    basis = predictor["proj_back"][:m].to(dt).abs().T  # (R, M)
    basis = torch.where(basis > basis_threshold, basis, torch.zeros_like(basis))
    approx = torch.matmul(coef, basis)
    if key_padding_mask is not None:
        approx = approx.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return approx


def _check(causal: bool, cross: bool, keep_rate: float, coef_scale: str) -> None:
    if causal or cross:
        raise ValueError(f"{NAME}: only non-causal self-attention is defined (got causal={causal}, cross={cross})")
    if not (0 < keep_rate <= 1):
        raise ValueError(f"{NAME}: keep_rate must be in (0, 1], got {keep_rate!r}")
    if coef_scale not in ("dim", "heads"):
        raise ValueError(f"{NAME}: coef_scale must be 'dim' or 'heads' (official code), got {coef_scale!r}")


def _setup(q, k, v, key_padding_mask, causal, cross, keep_rate, coef_scale, predictor, reduce_c, num_basis, max_len, seed):
    validate_qkv(q, k, v, key_padding_mask, mechanism=NAME)
    _check(causal, cross, keep_rate, coef_scale)
    k, v = expand_kv(k, v, q.shape[1])
    if predictor is None:
        predictor = default_predictor(q.shape[-1], reduce_c=reduce_c, num_basis=num_basis, max_len=max_len, seed=seed)
    return k, v, predictor


def sparsifiner_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    keep_rate: float = 0.25,
    cls_token: bool = False,
    coef_scale: str = "dim",
    basis_threshold: float = 0.02,
    coef_topk: int = 8,
    num_basis: int = 32,
    reduce_c: int = 2,
    max_len: int = 1024,
    seed: int = 0,
    predictor: dict | None = None,
    scale: float | None = None,
) -> Tensor:
    """Sparsifiner on ``(B, H, N, D)``: predictor mask, then attention over the gathered top-K keys."""
    k, v, predictor = _setup(q, k, v, key_padding_mask, causal, cross, keep_rate, coef_scale, predictor, reduce_c, num_basis, max_len, seed)
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    with torch.no_grad():
        approx = approximate_attention(
            q, k, predictor, key_padding_mask=key_padding_mask, coef_scale=coef_scale,
            basis_threshold=basis_threshold, coef_topk=coef_topk,
        )
        kb = _keep_counts(m, b, key_padding_mask, keep_rate, q.device)  # (B,)
        kmax = int(kb.max())
        top, order = torch.sort(approx, dim=-1, descending=True, stable=True)
        top, order = top[..., :kmax], order[..., :kmax]  # (B, H, N, K)
        valid = torch.arange(kmax, device=q.device)[None, :] < kb[:, None]  # (B, K)
        valid = valid[:, None, None, :] & torch.isfinite(top)  # padded keys are never valid
    rows = max(1, _CHUNK // max(1, kmax * max(d, dv)))
    outs = []
    for s0 in range(0, n, rows):
        sl = slice(s0, min(n, s0 + rows))
        nc = sl.stop - sl.start
        pos = order[:, :, sl].reshape(b, h, nc * kmax, 1)
        kg = k.gather(2, pos.expand(-1, -1, -1, d)).view(b, h, nc, kmax, d)
        vg = v.gather(2, pos.expand(-1, -1, -1, dv)).view(b, h, nc, kmax, dv)
        sc = torch.einsum("bhnd,bhnkd->bhnk", q[:, :, sl], kg) * scale
        sc = sc.masked_fill(~valid[:, :, sl], float("-inf"))
        p = torch.softmax(sc, dim=-1).nan_to_num(0.0)  # a row with no valid key gives zeros
        outs.append(torch.einsum("bhnk,bhnke->bhne", p, vg))
    out = torch.cat(outs, dim=2)
    if cls_token:  # the CLS query keeps every (unpadded) key
        out0 = reference_attention(q[:, :, :1], k, v, key_padding_mask=key_padding_mask, scale=scale)
        out = torch.cat([out0, out[:, :, 1:]], dim=2)
    return out


def sparsifiner_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    keep_rate: float = 0.25,
    cls_token: bool = False,
    coef_scale: str = "dim",
    basis_threshold: float = 0.02,
    coef_topk: int = 8,
    num_basis: int = 32,
    reduce_c: int = 2,
    max_len: int = 1024,
    seed: int = 0,
    predictor: dict | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense form: the top-K mask from pairwise ranks of ``A^``, then the golden masked softmax."""
    k, v, predictor = _setup(q, k, v, key_padding_mask, causal, cross, keep_rate, coef_scale, predictor, reduce_c, num_basis, max_len, seed)
    b, h, n, _ = q.shape
    m = k.shape[2]
    approx = approximate_attention(
        q, k, predictor, key_padding_mask=key_padding_mask, coef_scale=coef_scale,
        basis_threshold=basis_threshold, coef_topk=coef_topk,
    )
    kb = _keep_counts(m, b, key_padding_mask, keep_rate, q.device)[:, None, None, None]
    j = torch.arange(m)
    earlier = j[None, :] < j[:, None]  # [j, j']: j' comes before j
    mask = torch.zeros(b, h, n, m, dtype=torch.bool)
    for s0 in range(0, n, 16):  # rows in chunks: the rank tensor is (rows x M x M)
        a = approx[:, :, s0 : s0 + 16]
        ahead = (a[..., None, :] > a[..., :, None]) | ((a[..., None, :] == a[..., :, None]) & earlier)
        mask[:, :, s0 : s0 + 16] = ahead.sum(-1) < kb
    if key_padding_mask is not None:
        mask &= ~key_padding_mask[:, None, None, :]
    if cls_token:
        mask[:, :, 0] = True
    return reference_attention(q, k, v, mask, key_padding_mask=key_padding_mask, scale=scale)


@register(
    NAME,
    paper="Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers",
    arxiv="2303.13755",
    family="sparse",
    capabilities={"noncausal_self", "spatial", "key_padding_mask", "trainable"},
    complexity="predictor O(N R M + N M log M), attention O(N K d) with K = keep_rate * M",
    functional=sparsifiner_attention,
    reference=sparsifiner_attention_reference,
    defaults={
        "keep_rate": 0.25,
        "cls_token": False,
        "coef_scale": "dim",
        "basis_threshold": 0.02,
        "coef_topk": 8,
        "num_basis": 32,
        "reduce_c": 2,
        "max_len": 1024,
        "seed": 0,
        "scale": None,
        "reconstruction_weight": 0.01,
    },
    summary="a low-rank predictor (reduced q, k and a learned token basis) estimates attention; each query keeps its top-K keys",
    deviations="coefficient scale (d/reduce_c)^-1/2 by default (official code: num_heads^-1/2 via coef_scale='heads'); "
    "no token pruning; the predictor learns from the reconstruction loss, attached to the output's graph in "
    "training mode (reconstruction_weight, 0 = off)",
    test_config={"keep_rate": 0.3, "num_basis": 8, "coef_topk": 4, "max_len": 300},
)
class SparsifinerAttention(AttentionModule):
    """Sparsifiner attention on ``(B, N, C)`` sequences and ``(B, H, W, C)`` maps (flattened, row-major).

    The predictor (``W_q, W_k`` reducing the head dim, token projections ``P, P_back`` of
    ``max_len`` rows) is shared by the heads and learned through :meth:`reconstruction_loss`.
    """

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        s = self.settings
        dr = max(1, self.head_dim // s["reduce_c"])
        self.pred_q = nn.Linear(self.head_dim, dr)
        self.pred_k = nn.Linear(self.head_dim, dr)
        self.proj = nn.Parameter(nn.init.trunc_normal_(torch.empty(s["max_len"], s["num_basis"]), std=0.02))
        self.proj_back = nn.Parameter(nn.init.trunc_normal_(torch.empty(s["max_len"], s["num_basis"]), std=0.02))
        self.aux_loss: Tensor | None = None

    def predictor(self) -> dict:
        return {
            "wq": self.pred_q.weight,
            "bq": self.pred_q.bias,
            "wk": self.pred_k.weight,
            "bk": self.pred_k.bias,
            "proj": self.proj,
            "proj_back": self.proj_back,
        }

    def op_params(self):
        s = self.settings
        keys = ("keep_rate", "cls_token", "coef_scale", "basis_threshold", "coef_topk", "scale")
        return {**{k: s[k] for k in keys}, "predictor": self.predictor()}

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, cross: bool, key_padding_mask: Tensor | None) -> Tensor:
        out = super().attend(q, k, v, cross=cross, key_padding_mask=key_padding_mask)
        w = self.settings["reconstruction_weight"]
        if self.training and w and torch.is_grad_enabled():
            aux = self._reconstruction(q, k, key_padding_mask, w)
            self.aux_loss = aux.detach()
            out = _AttachAuxLoss.apply(out, aux)
        return out

    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hg, wg, c = x.shape
        return self.forward(x.reshape(b, hg * wg, c)).view(b, hg, wg, c)

    def reconstruction_loss(self, x: Tensor, weight: float = 0.01) -> Tensor:
        """The paper's predictor loss ``weight * sum (A^ - A_dense)^2`` (dense attention detached)."""
        if x.dim() == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        q, k, _ = self.project(x, None)
        return self._reconstruction(q, k, None, weight)

    def _reconstruction(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None, weight: float) -> Tensor:
        k = expand_kv(k, k, self.num_heads)[0]
        s = self.settings
        approx = approximate_attention(
            q.detach(), k.detach(), self.predictor(), key_padding_mask=key_padding_mask,
            coef_scale=s["coef_scale"], basis_threshold=s["basis_threshold"], coef_topk=s["coef_topk"],
        )
        scale = s["scale"] if s["scale"] is not None else self.head_dim**-0.5
        logits = torch.matmul(q, k.transpose(-1, -2)).detach() * scale
        keep = torch.ones_like(logits, dtype=torch.bool)
        if key_padding_mask is not None:
            keep = keep & ~key_padding_mask[:, None, None, :]
            logits = logits.masked_fill(~keep, float("-inf"))
            approx = approx.masked_fill(~keep, 0.0)
        dense = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        if s["cls_token"]:
            approx, dense = approx[:, :, 1:], dense[:, :, 1:]
        return weight * (approx - dense).square().sum()


class _AttachAuxLoss(torch.autograd.Function):
    """Returns ``out`` unchanged; in backward, ``aux`` receives gradient 1 (as if added to the loss)."""

    @staticmethod
    def forward(ctx, out: Tensor, aux: Tensor) -> Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)

"""The dynamical-systems view of a token mixer: its matrices ``(A, B, C, D)`` for a given input.

Paper: "Understanding the differences in Foundation Models: Attention, State Space Models, and
Recurrent Neural Networks" (Sieber, Amo Alonso, Didier, Zeilinger, Orvieto; NeurIPS 2024;
arXiv 2405.15731). Every causal mixer there is written as the linear time-varying system::

    h_i = A_i h_{i-1} + B_i u_i          (the paper's Lambda_i is A_i here), h_0 = 0
    y_i = C_i h_i + D_i u_i

whose matrices may depend on the input ("selective"). Its convolutional form is ``y_i = sum_j Phi_ij u_j``
with ``Phi_ij = C_i A_i ... A_{j+1} B_j`` (``j < i``) and ``Phi_ii = C_i B_i + D_i``.

Here ``u_i`` is the layer's input token (``dim`` channels) and ``y_i`` the mixer output: the heads'
outputs concatenated, before the output projection (and, for Lightning, before its normalisation and
gate). :func:`readout` applies those per-token maps, so ``readout(m, x, system.run(x)) == m(x)``.
The state is the heads' state matrices stacked (``H * dk * dv`` entries, row-major over
``(head, dk, dv)``); the matrices are dense and meant for small inputs (inspection and tests).

Mappings (section 3 of the paper):

* ``linear`` (normalised, ``phi = elu + 1``): ``A_i = (eta_{i-1} / eta_i) I``, ``B_i = (1/eta_i) phi(k_i) (x) W_V``,
  ``C_i = I (x) phi(q_i)^T``, ``D_i = 0``, with ``eta_i = phi(q_i)^T sum_{j<=i} phi(k_j) + eps``: the
  normaliser acts as a time-varying scalar transition.
* ``lightning`` (``variant="transnormer"``): ``A_i = lambda_h I`` per head, ``B_i = k_i (x) W_V``,
  ``C_i = I (x) q_i^T`` (``q, k`` after SiLU; the TNL variant's SiLU on ``v`` is not linear and is rejected).
* ``s6``: ``A_i = diag(exp(Delta_{i,c} A_{c,n}))``, ``B_i = b_i (x) diag(Delta_i) W_in``, ``C_i = I (x) c_i^T``,
  ``D_i = diag(D) W_in``.
* ``aaren`` (softmax of a fixed learned query over the prefix): ``A_i = (Z_{i-1} / Z_i) I``,
  ``B_i = (e^{s_i} / Z_i) W_V``, ``C_i = I``, ``D_i = 0`` with ``Z_i = sum_{j<=i} e^{s_j}`` (state size ``e``
  per head: a fixed query makes softmax attention a finite-state system).
* ``softmax`` attention with a query per position needs an infinite state (``exp(q.k)`` has no finite
  feature map): :func:`dsf` raises ``ValueError`` for it.

Value projections with a bias make ``B_i u_i`` affine, not linear, and are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .core.layout import merge_heads, split_heads

__all__ = ["DynamicalSystem", "dsf", "readout", "SUPPORTED"]

SUPPORTED = ("linear", "lightning", "s6", "aaren")


@dataclass
class DynamicalSystem:
    """``h_i = A_i h_{i-1} + B_i u_i``, ``y_i = C_i h_i + D_i u_i`` for one input sequence batch.

    ``A (B, N, S, S)``, ``B (B, N, S, U)``, ``C (B, N, Y, S)``, ``D (B, N, Y, U)``.
    """

    A: Tensor
    B: Tensor
    C: Tensor
    D: Tensor

    @property
    def state_size(self) -> int:
        return self.A.shape[-1]

    def run(self, u: Tensor) -> Tensor:
        """The recurrence on ``u (B, N, U)``; returns ``y (B, N, Y)``."""
        h = u.new_zeros(u.shape[0], self.state_size)
        ys = []
        for i in range(u.shape[1]):
            h = torch.einsum("bst,bt->bs", self.A[:, i], h) + torch.einsum("bsu,bu->bs", self.B[:, i], u[:, i])
            ys.append(torch.einsum("bys,bs->by", self.C[:, i], h) + torch.einsum("byu,bu->by", self.D[:, i], u[:, i]))
        return torch.stack(ys, dim=1)

    def kernel(self) -> Tensor:
        """The convolution kernel ``Phi (B, N, N, Y, U)``: ``y_i = sum_j Phi[:, i, j] u_j`` (zero for ``j > i``)."""
        b, n, s, _ = self.A.shape
        y, u = self.C.shape[2], self.B.shape[3]
        phi = self.A.new_zeros(b, n, n, y, u)
        for j in range(n):
            prop = self.B[:, j]  # A_i ... A_{j+1} B_j, built up over i
            phi[:, j, j] = torch.matmul(self.C[:, j], prop) + self.D[:, j]
            for i in range(j + 1, n):
                prop = torch.matmul(self.A[:, i], prop)
                phi[:, i, j] = torch.matmul(self.C[:, i], prop)
        return phi

    def run_convolution(self, u: Tensor) -> Tensor:
        """``y_i = sum_{j<=i} Phi_ij u_j`` (the convolutional form)."""
        return torch.einsum("bijyu,bju->biy", self.kernel(), u)


def _value_weight(proj, name: str) -> Tensor:
    if proj.bias is not None:
        raise ValueError(f"dsf: {name} has a bias, so B_i u_i would be affine, not linear; build the module with qkv_bias=False")
    return proj.weight


def _heads_b(feat: Tensor, wv: Tensor, h: int) -> Tensor:
    """``B_i = feat_i (x) W_V`` per head: ``feat (B, H, N, dk)``, ``W_V (H*dv, U)`` -> ``(B, N, H*dk*dv, U)``."""
    wvh = wv.view(h, -1, wv.shape[-1])  # (H, dv, U)
    bm = torch.einsum("bhna,hcu->bnhacu", feat, wvh)
    return bm.reshape(*bm.shape[:2], -1, wv.shape[-1])


def _heads_c(feat: Tensor, dv: int) -> Tensor:
    """``C_i = I_dv (x) feat_i^T`` per head, block-diagonal over heads -> ``(B, N, H*dv, H*dk*dv)``."""
    b, h, n, dk = feat.shape
    eye_h = torch.eye(h, dtype=feat.dtype, device=feat.device)
    eye_v = torch.eye(dv, dtype=feat.dtype, device=feat.device)
    cm = torch.einsum("bgna,gh,ce->bngchae", feat, eye_h, eye_v)  # output (g, c) reads state (h, a, e)
    return cm.reshape(b, n, h * dv, h * dk * dv)


def _diag(values: Tensor) -> Tensor:
    """``(B, N, S)`` -> ``(B, N, S, S)`` diagonal matrices."""
    return torch.diag_embed(values)


def dsf(module, x: Tensor) -> DynamicalSystem:
    """The DSF matrices of ``module`` (an attnzoo module of a supported mechanism) for input ``x (B, N, C)``."""
    name = getattr(getattr(module, "spec", None), "name", None)
    if name in ("softmax", "sliding_window", "momentum"):
        raise ValueError(f"dsf: {name} attention has an infinite-dimensional state (exp(q.k) has no finite feature map)")
    if name not in SUPPORTED:
        raise ValueError(f"dsf: no DSF mapping for mechanism {name!r}; supported: {SUPPORTED}")
    if not module.causal:
        raise ValueError("dsf: the dynamical-systems form is causal; build the module with causal=True")
    if name == "lightning" and module.settings["variant"] != "transnormer":
        raise ValueError("dsf: lightning variant 'tnl' applies SiLU to v, so B_i u_i is not linear in u; use variant='transnormer'")
    b, n, _ = x.shape
    h, e = module.num_heads, module.head_dim
    u_dim = x.shape[-1]
    zeros_d = x.new_zeros(b, n, h * e, u_dim)
    if name in ("linear", "lightning"):
        wv = _value_weight(module.v_proj, "v_proj")
        q = split_heads(module.q_proj(x), h)
        k = split_heads(module.k_proj(x), h)
        if name == "linear":
            fq, fk = F.elu(q) + 1, F.elu(k) + 1
            eta = torch.einsum("bhnd,bhnd->bhn", fq, fk.cumsum(2)) + module.settings["eps"]  # (B, H, N)
            prev = torch.cat([torch.ones_like(eta[:, :, :1]), eta[:, :, :-1]], dim=2)
            ratio = (prev / eta).permute(0, 2, 1)  # (B, N, H); A_1 multiplies h_0 = 0
            a = _diag(ratio[..., None].expand(b, n, h, e * e).reshape(b, n, -1))
            bm = _heads_b(fk / eta[..., None], wv, h)
            cm = _heads_c(fq, e)
        else:
            q, k = F.silu(q), F.silu(k)
            lam = torch.exp(-module.slope_rate.to(x.dtype))  # (H,)
            a = _diag(lam[:, None].expand(h, e * e).reshape(1, 1, -1).expand(b, n, -1))
            bm = _heads_b(k, wv, h)
            cm = _heads_c(q, e)
        return DynamicalSystem(a, bm, cm, zeros_d)
    if name == "aaren":
        wv = _value_weight(module.v_proj, "v_proj")
        k = split_heads(module.k_proj(x), h)
        scale = module.settings["scale"]
        scale = e**-0.5 if scale is None else scale
        s = torch.einsum("hd,bhnd->bhn", module.query.to(x.dtype), k) * scale
        lz = torch.logcumsumexp(s, dim=2)  # log Z_i
        prev = torch.cat([torch.zeros_like(lz[:, :, :1]), lz[:, :, :-1]], dim=2)
        ratio = torch.exp(prev - lz).permute(0, 2, 1)  # Z_{i-1} / Z_i  (A_1 multiplies h_0 = 0)
        a = _diag(ratio[..., None].expand(b, n, h, e).reshape(b, n, -1))
        w = torch.exp(s - lz).permute(0, 2, 1)  # (B, N, H): e^{s_i} / Z_i
        bm = (w[..., None, None] * wv.view(h, e, u_dim)).reshape(b, n, h * e, u_dim)
        cm = torch.eye(h * e, dtype=x.dtype, device=x.device).expand(b, n, h * e, h * e)
        return DynamicalSystem(a, bm, cm, zeros_d)
    # s6
    w_in = _value_weight(module.v_proj, "v_proj")  # (E, U)
    sel = module.selection(x)
    dstate = module.d_state
    delta = split_heads(sel["delta"], h)  # (B, H, N, e)
    a_mat = sel["A"].view(h, e, dstate).transpose(-1, -2)  # (H, n, e)
    lam = torch.exp(delta[:, :, :, None, :] * a_mat[None, :, None])  # (B, H, N, n, e)
    a = _diag(lam.permute(0, 2, 1, 3, 4).reshape(b, n, -1))
    bsel = split_heads(sel["b"][:, :, None, :].expand(b, n, h, dstate).reshape(b, n, h * dstate), h)  # (B, H, N, n)
    # B_i = b_i (x) diag(Delta_i) W_in  per head
    w_in_h = w_in.view(h, e, u_dim)
    bm = torch.einsum("bhna,bhnc,hcu->bnhacu", bsel, delta, w_in_h).reshape(b, n, -1, u_dim)
    csel = split_heads(sel["c"][:, :, None, :].expand(b, n, h, dstate).reshape(b, n, h * dstate), h)
    cm = _heads_c(csel, e)
    dm = (module.D.to(x.dtype)[:, None] * w_in)[None, None].expand(b, n, h * e, u_dim)
    return DynamicalSystem(a, bm, cm, dm)


def readout(module, x: Tensor, y: Tensor) -> Tensor:
    """The module's output from the mixer output ``y (B, N, H*e)``: the per-token maps after the mixer."""
    name = module.spec.name
    if name == "lightning":
        return module._finish(x, split_heads(y, module.num_heads))
    if name in SUPPORTED:
        return module.out_proj(y)
    raise ValueError(f"dsf: no DSF mapping for mechanism {name!r}; supported: {SUPPORTED}")


def mixer_output(module, x: Tensor) -> Tensor:
    """The mechanism's own mixer output ``y (B, N, H*e)`` (fast form), to compare with ``dsf(module, x).run(x)``."""
    name = module.spec.name
    if name == "s6":
        return module.mix(x)[0]
    if name == "lightning":
        q, k, v = module._qkv(x)
        return merge_heads(module.attend(q, k, v, cross=False, key_padding_mask=None))
    if name == "aaren":
        from .mechanisms.linear.aaren import aaren_attention

        k, v = module._kv(x)
        return merge_heads(aaren_attention(module.query, k, v, scale=module.settings["scale"])[0])
    if name == "linear":
        q, k, v = module.project(x, None)
        return merge_heads(module.attend(q, k, v, cross=False, key_padding_mask=None))
    raise ValueError(f"dsf: no DSF mapping for mechanism {name!r}; supported: {SUPPORTED}")

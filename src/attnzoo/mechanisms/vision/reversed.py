"""DependencyViT reversed attention (``reversed``) and the dependency tree it induces.

Paper: "Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention" (Ding, Shen,
Fan, Chen, Chen, Luo, Tenenbaum, Gan; CVPR 2023, arXiv 2304.03282). The official repository
(``dingmyu/DependencyViT``) holds no code; an unofficial timm port was consulted through the spec.

Equations, per head ``h`` (tokens ``X (N, C)``, no CLS token):

* forward attention ``A_F = softmax(Q K^T / sqrt(d))`` (row ``j`` = child ``j``'s distribution over
  parents ``i``; rows sum to 1);
* reversed attention ``A_R = A_F^T``: child ``j`` *sends* its message to the parents ``i`` following
  ``A_F[j, :]``; column ``j`` of ``A_R`` sums to 1 (the "softmax over the other axis" of the paper);
* head selector ``P = softmax_heads(X W_p / tau)`` ``(N, heads)``, ``tau = head_tau`` (0.1): ``A_R[h, i, j] *= P[j, h]``;
* message controller ``m_j = sigmoid(MLP(X_j))`` (``C -> C/2 -> 1``, GELU), cumulative over layers:
  ``M^l_j = prod_{l' <= l} m^{l'}_j``; ``A_R[h, i, j] *= M^l_j`` (a token whose controller closes stops
  sending);
* ``X_out[i] = sum_j A_R[h, i, j] V[h, j]`` per head -> concat -> output projection;
* soft dependency mask ``A_M = sum_h A_R`` ``(N, N)``; the parent of patch ``j`` is ``argmax_i A_M[i, j]``.

The dependency tree (:meth:`ReversedAttention.dependency_tree`, returned as data): ``parent[j] =
argmax_i A_M[i, j]``; a patch whose argmax is itself is a root, and (optional ``root_threshold``) so is
a patch whose cumulative controller ``M_j`` is below the threshold (it sends (almost) nothing). An
argmax map can contain cycles longer than one; the paper does not say how they are resolved, so this
implementation breaks each such cycle at its weakest edge (smallest ``A_M[parent(j), j] * M_j``),
which becomes a root. The result is always a forest (checked in the tests).

1-D form: ``(B, N, C)`` sequences (``noncausal_self``); grids ``(B, H, W, C)`` are flattened
row-major (the mechanism has no positional term; the paper's model adds absolute position
embeddings). The cumulative controller crosses layers: :meth:`ReversedAttention.forward_with_controller`
takes the previous layer's ``M`` and returns the new one (:class:`attnzoo.models.ViT` threads it).
``key_padding_mask``: padded tokens are neither parents (masked in ``A_F``) nor senders (column zeroed).

Deviations: the cycle-breaking rule above (paper: unspecified); ``head_tau = 0.1`` is taken from the
unofficial port (unverified against the paper's appendix); DependencyViT-Lite token pruning is not
part of the module (the pruning score ``s_i = sum_h sum_j A_R[h, i, j]`` is returned by
:meth:`ReversedAttention.dependency_tree` as ``received``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.layout import expand_kv, merge_heads, validate_grid
from ...core.module import AttentionModule
from ...registry import register
from .davit import require_pattern

NAME = "reversed"


def _weights(q: Tensor, head_weights: Tensor | None, controller: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
    """Per (batch, head, sender ``j``) weight ``P[j, h] M_j`` (zero for padded senders), ``(B, H, N)``."""
    b, h, n, _ = q.shape
    w = torch.ones(b, h, n, dtype=q.dtype, device=q.device)
    if head_weights is not None:
        if tuple(head_weights.shape) != (b, n, h):
            raise ValueError(f"{NAME}: head_weights must be (batch, length, heads) = ({b}, {n}, {h}), got {tuple(head_weights.shape)}")
        w = w * head_weights.transpose(1, 2).to(q.dtype)
    if controller is not None:
        if tuple(controller.shape) != (b, n):
            raise ValueError(f"{NAME}: controller must be (batch, length) = ({b}, {n}), got {tuple(controller.shape)}")
        w = w * controller[:, None, :].to(q.dtype)
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, :], 0.0)
    return w


def reversed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    head_weights: Tensor | None = None,
    controller: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reversed attention on ``(B, H, N, D)``: ``out[i] = sum_j A_F[j, i] P[j] M[j] v[j]``.

    ``head_weights (B, N, H)``: the head selector ``P`` (default 1); ``controller (B, N)``: ``M`` (default 1).
    """
    require_pattern(NAME, causal, cross)
    k, v = expand_kv(k, v, q.shape[1])
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * s  # (B, H, child j, parent i)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    a_f = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    w = _weights(q, head_weights, controller, key_padding_mask)
    return torch.matmul(a_f.transpose(-1, -2), w[..., None] * v)


def reversed_attention_maps(
    q: Tensor, k: Tensor, *, key_padding_mask: Tensor | None = None, head_weights=None, controller=None, scale=None
) -> Tensor:
    """The reversed attention matrices ``A_R (B, H, N parents, N children)`` written out from the equations."""
    k = expand_kv(k, k, q.shape[1])[0]
    s = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhjd,bhid->bhji", q, k) * s
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    a_f = e / e.sum(dim=-1, keepdim=True)  # (B, H, child, parent), rows sum to 1
    a_r = a_f.transpose(-1, -2)  # columns (children) sum to 1
    return a_r * _weights(q, head_weights, controller, key_padding_mask)[:, :, None, :]


def reversed_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    cross: bool = False,
    key_padding_mask: Tensor | None = None,
    head_weights: Tensor | None = None,
    controller: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``X_out = A_R V`` with ``A_R`` materialised."""
    require_pattern(NAME, causal, cross)
    a_r = reversed_attention_maps(q, k, key_padding_mask=key_padding_mask, head_weights=head_weights, controller=controller, scale=scale)
    v = expand_kv(v, v, q.shape[1])[0]
    out = torch.einsum("bhij,bhjd->bhid", a_r, v)
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return out


# -- the dependency tree ----------------------------------------------------------------------------
@dataclass
class DependencyTree:
    """The tree induced by one reversed-attention layer (batched; ``N`` patches, row-major on a grid).

    * ``parent (B, N)`` long: the parent of each patch; a root is its own parent.
    * ``is_root (B, N)`` bool; ``depth (B, N)`` long (roots 0).
    * ``dependency_mask (B, N, N)``: ``A_M[i, j] = sum_h A_R[h, i, j]`` (parent ``i``, child ``j``).
    * ``controller (B, N)``: cumulative message controller ``M``; ``received (B, N)``: ``sum_j A_M[i, j]``
      (the DependencyViT-Lite pruning score; leaves receive little).
    * ``grid``: ``(H, W)`` when computed from a grid, else ``None``.
    """

    parent: Tensor
    is_root: Tensor
    depth: Tensor
    dependency_mask: Tensor
    controller: Tensor
    received: Tensor
    grid: tuple[int, int] | None = None


def induce_forest(dependency_mask: Tensor, controller: Tensor | None = None, root_threshold: float | None = None) -> Tensor:
    """Parents ``(B, N)`` from ``A_M (B, N parents, N children)``: argmax, then cycles broken at the weakest edge."""
    am = dependency_mask.detach().double().cpu()
    b, n, _ = am.shape
    ctrl = torch.ones(b, n, dtype=torch.float64) if controller is None else controller.detach().double().cpu()
    parents = am.argmax(dim=1)  # (B, N): for child j, argmax over parents i
    strength = am.gather(1, parents[:, None, :])[:, 0] * ctrl  # weight of the chosen edge
    out = parents.clone()
    for bi in range(b):
        par = out[bi].tolist()
        if root_threshold is not None:
            for j in range(n):
                if ctrl[bi, j] < root_threshold:
                    par[j] = j
        state = [0] * n  # 0 unvisited, 1 on the current path, 2 done
        for start in range(n):
            path = []
            j = start
            while state[j] == 0:
                state[j] = 1
                path.append(j)
                j = par[j]
            if state[j] == 1 and par[j] != j:  # a cycle j -> ... -> j of length > 1
                cyc = path[path.index(j) :]
                weakest = min(cyc, key=lambda t: (float(strength[bi, t]), t))
                par[weakest] = weakest
            for t in path:
                state[t] = 2
        out[bi] = torch.tensor(par)
    return out.to(dependency_mask.device)


def tree_depth(parent: Tensor) -> Tensor:
    """Depth of every node of a forest ``parent (B, N)`` (roots, their own parents, have depth 0).

    Raises ``ValueError`` if the map has a cycle longer than one (i.e. it is not a forest).
    """
    b, n = parent.shape
    out = torch.zeros(b, n, dtype=torch.long)
    for bi in range(b):
        par = parent[bi].tolist()
        depth = [-1] * n
        for start in range(n):
            path = []
            j = start
            while depth[j] < 0 and par[j] != j:
                path.append(j)
                if len(path) > n:
                    raise ValueError(f"{NAME}: the parent map has a cycle through node {start}")
                j = par[j]
            base = 0 if par[j] == j and depth[j] < 0 else depth[j]
            depth[j] = base
            for t in reversed(path):
                base += 1
                depth[t] = base
        out[bi] = torch.tensor(depth)
    return out.to(parent.device)


@register(
    NAME,
    paper="Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention",
    arxiv="2304.03282",
    family="vision",
    capabilities={"noncausal_self", "spatial", "key_padding_mask", "trainable"},
    complexity="time O(N^2 d), memory O(N^2) per head",
    functional=reversed_attention,
    reference=reversed_attention_reference,
    defaults={"head_tau": 0.1, "root_threshold": None, "scale": None},
    summary="children send messages to parents along the transposed attention, gated by a head selector and a "
    "cumulative message controller; induces a dependency tree over patches",
    deviations="cycles of the argmax parent map are broken at their weakest edge (unspecified in the paper); "
    "head_tau from the unofficial port; no DependencyViT-Lite pruning inside the module",
    test_config={},
)
class ReversedAttention(AttentionModule):
    """DependencyViT reversed attention with head selector ``head_selector`` (``Linear(C, heads)``) and
    message controller ``controller_mlp`` (``C -> C/2 -> 1``)."""

    def __init__(self, dim: int, num_heads: int, **kw) -> None:
        super().__init__(dim, num_heads, **kw)
        if not self.settings["head_tau"] > 0:
            raise ValueError(f"{NAME}: head_tau must be > 0, got {self.settings['head_tau']!r}")
        self.head_selector = nn.Linear(dim, num_heads)
        hidden = max(dim // 2, 1)
        self.controller_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, context: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 3 and context is None:
            self.check_inputs(x, None, key_padding_mask)
            return self._run(x, None, key_padding_mask)[0]
        return super().forward(x, context, key_padding_mask)

    def forward_spatial(self, x: Tensor) -> Tensor:
        b, hh, ww, c = x.shape
        return self._run(x.reshape(b, hh * ww, c), None, None)[0].view(b, hh, ww, c)

    def gates(self, x: Tensor, prev_controller: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Head selector ``P (B, N, heads)`` and cumulative controller ``M (B, N)`` for tokens ``x (B, N, C)``."""
        p = torch.softmax(self.head_selector(x) / self.settings["head_tau"], dim=-1)
        m = torch.sigmoid(self.controller_mlp(x))[..., 0]
        if prev_controller is not None:
            m = m * prev_controller
        return p, m

    def _run(self, x: Tensor, prev_controller: Tensor | None, key_padding_mask: Tensor | None, want_maps: bool = False):
        q, k, v = self.project(x, None)
        p, m = self.gates(x, prev_controller)
        kw = dict(key_padding_mask=key_padding_mask, head_weights=p, controller=m, scale=self.settings["scale"])
        fn = self.spec.reference if self.impl == "reference" else self.spec.functional
        out = fn(q, k, v, causal=False, cross=False, **kw)
        y = self.out_proj(merge_heads(out))
        maps = reversed_attention_maps(q, k, **kw) if want_maps else None
        return y, m, maps

    def forward_with_controller(self, x: Tensor, prev_controller: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One layer with the cumulative controller: ``(y, M)`` for ``x`` ``(B, N, C)`` or ``(B, H, W, C)``.

        ``prev_controller (B, N)`` is the previous layer's ``M`` (``None`` for the first layer).
        """
        if isinstance(x, Tensor) and x.dim() == 4:
            validate_grid(x, self.dim, "x", mechanism=NAME)
            b, hh, ww, c = x.shape
            y, m, _ = self._run(x.reshape(b, hh * ww, c), prev_controller, None)
            return y.view(b, hh, ww, c), m
        self.check_inputs(x, None, None)
        y, m, _ = self._run(x, prev_controller, None)
        return y, m

    @torch.no_grad()
    def dependency_tree(self, x: Tensor, prev_controller: Tensor | None = None) -> DependencyTree:
        """The dependency tree this layer induces on ``x`` ``(B, N, C)`` or ``(B, H, W, C)``, as data."""
        grid = None
        if isinstance(x, Tensor) and x.dim() == 4:
            validate_grid(x, self.dim, "x", mechanism=NAME)
            grid = (x.shape[1], x.shape[2])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            self.check_inputs(x, None, None)
        _, m, maps = self._run(x, prev_controller, None, want_maps=True)
        am = maps.sum(dim=1)  # (B, parents, children)
        parent = induce_forest(am, m, self.settings["root_threshold"])
        idx = torch.arange(parent.shape[1], device=parent.device)
        return DependencyTree(
            parent=parent,
            is_root=parent == idx,
            depth=tree_depth(parent),
            dependency_mask=am,
            controller=m,
            received=am.sum(dim=-1),
            grid=grid,
        )


__all__ = [
    "DependencyTree",
    "ReversedAttention",
    "induce_forest",
    "reversed_attention",
    "reversed_attention_maps",
    "reversed_attention_reference",
    "tree_depth",
]

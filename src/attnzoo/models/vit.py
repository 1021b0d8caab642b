"""A small isotropic vision transformer whose token mixer is any attnzoo mechanism, chosen by name.

``ViT("gpsa")`` builds: patch embedding (a ``p x p`` convolution with stride ``p``) -> learned absolute
position embedding on the ``H/p x W/p`` grid -> ``depth`` pre-norm blocks
``x = x + mixer(LN(x)); x = x + MLP(LN(x))`` -> LayerNorm -> global average pool -> linear head.

The tokens stay a grid ``(B, h, w, C)`` throughout; a ``spatial`` mechanism gets the grid
(``forward_spatial``), a mechanism that only declares ``noncausal_self`` (e.g. ``softmax``, the
baseline) gets the row-major flattened sequence. ``mlp="convglu"`` swaps the MLP for TransNeXt's
:class:`~attnzoo.mechanisms.vision.aggregated.ConvGLU`. For ``reversed`` (DependencyViT) the
cumulative message controller is threaded from block to block, and :meth:`ViT.dependency_tree`
returns the tree a layer induces on an image batch.

:func:`profile` reports parameters and forward FLOPs (``torch.utils.flop_counter``: matmuls,
convolutions and fused attention; element-wise work such as softmax is not counted) per mechanism,
for the benchmark and the docs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import create, get

__all__ = ["ViT", "default_config", "profile"]


def default_config(name: str) -> dict[str, Any]:
    """Settings of ``name`` suited to the small grids of this backbone (its registry ``test_config``)."""
    return dict(get(name).test_config)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with a named token mixer."""

    def __init__(self, dim: int, num_heads: int, mechanism: str, cfg: Mapping[str, Any], mlp_ratio: float, mlp: str) -> None:
        super().__init__()
        spec = get(mechanism)
        if not (spec.supports("spatial") or spec.supports("noncausal_self")):
            raise ValueError(f"ViT: mechanism {mechanism!r} is neither spatial nor non-causal self-attention")
        self.spatial = spec.supports("spatial")
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = create(mechanism, dim, num_heads, **dict(cfg))
        self.norm2 = nn.LayerNorm(dim)
        if mlp == "mlp":
            self.mlp = _MLP(dim, int(dim * mlp_ratio))
        elif mlp == "convglu":
            from ..mechanisms.vision.aggregated import ConvGLU

            self.mlp = ConvGLU(dim, mlp_ratio=mlp_ratio)
        else:
            raise ValueError(f"ViT: mlp must be 'mlp' or 'convglu', got {mlp!r}")

    def mix(self, x: Tensor, controller: Tensor | None) -> tuple[Tensor, Tensor | None]:
        h = self.norm1(x)
        if hasattr(self.mixer, "forward_with_controller"):
            return self.mixer.forward_with_controller(h, controller)
        if self.spatial:
            return self.mixer(h), controller
        b, gh, gw, c = h.shape
        return self.mixer(h.reshape(b, gh * gw, c)).view(b, gh, gw, c), controller

    def forward(self, x: Tensor, controller: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        y, controller = self.mix(x, controller)
        x = x + y
        return x + self.mlp(self.norm2(x)), controller


class ViT(nn.Module):
    """Isotropic ViT with a named token mixer.

    Args:
        mechanism: registry name of the token mixer (``attnzoo.list_mechanisms(capability="spatial")``,
            or any ``noncausal_self`` mechanism, which then sees the flattened grid).
        img_size: image side (int) or ``(height, width)``; must be divisible by ``patch_size``.
        patch_size, in_chans, num_classes, dim, depth, num_heads, mlp_ratio: the usual.
        mechanism_cfg: settings of the mechanism (default: :func:`default_config`).
        mlp: ``"mlp"`` (GELU MLP) or ``"convglu"`` (TransNeXt ConvGLU).
    """

    def __init__(
        self,
        mechanism: str = "softmax",
        *,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        mechanism_cfg: Mapping[str, Any] | None = None,
        mlp: str = "mlp",
    ) -> None:
        super().__init__()
        ih, iw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if ih % patch_size or iw % patch_size:
            raise ValueError(f"ViT: image {ih}x{iw} is not divisible by patch_size {patch_size}")
        self.mechanism = mechanism
        self.grid = (ih // patch_size, iw // patch_size)
        self.in_chans = in_chans
        self.img_size = (ih, iw)
        cfg = default_config(mechanism) if mechanism_cfg is None else dict(mechanism_cfg)
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, *self.grid, dim), std=0.02))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mechanism, cfg, mlp_ratio, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, images: Tensor) -> Tensor:
        """``(B, in_chans, H, W)`` images -> ``(B, h, w, dim)`` token grid with position embedding."""
        if images.dim() != 4 or images.shape[1] != self.in_chans or tuple(images.shape[2:]) != self.img_size:
            raise ValueError(f"ViT: expected images (B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]}), got {tuple(images.shape)}")
        return self.patch_embed(images).permute(0, 2, 3, 1) + self.pos_embed

    def features(self, images: Tensor) -> Tensor:
        """The final token grid ``(B, h, w, dim)`` (after the last LayerNorm)."""
        x = self.embed(images)
        controller = None
        for blk in self.blocks:
            x, controller = blk(x, controller)
        return self.norm(x)

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.features(images).mean(dim=(1, 2)))

    @torch.no_grad()
    def dependency_tree(self, images: Tensor, layer: int = -1):
        """The :class:`~attnzoo.mechanisms.vision.reversed.DependencyTree` block ``layer`` induces (``reversed`` only)."""
        if not hasattr(self.blocks[0].mixer, "dependency_tree"):
            raise ValueError(f"ViT: dependency trees need the 'reversed' mechanism, this model uses {self.mechanism!r}")
        layer = layer % len(self.blocks)
        x = self.embed(images)
        controller = None
        for i, blk in enumerate(self.blocks):
            if i == layer:
                return blk.mixer.dependency_tree(blk.norm1(x), controller)
            x, controller = blk(x, controller)
        raise AssertionError("unreachable")


def profile(
    name: str,
    *,
    mechanism_cfg: Mapping[str, Any] | None = None,
    batch_size: int = 1,
    **vit_kwargs: Any,
) -> dict[str, Any]:
    """Parameters and forward FLOPs of ``ViT(name, **vit_kwargs)``.

    The fused CPU attention kernel is counted with ``2 N M (D + Dv)`` (torch counts it as 0).
    Returns ``{"mechanism", "params", "mixer_params", "flops", "flops_per_image", "mixer_flops_per_image",
    "grid"}``; FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv/attention kernels; a
    multiply-add counts as 2), measured on a zero image batch in eval mode.
    """
    from ..core.flops import flop_counter

    model = ViT(name, mechanism_cfg=mechanism_cfg, **vit_kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    mixer_params = sum(p.numel() for b in model.blocks for p in b.mixer.parameters())
    images = torch.zeros(batch_size, model.in_chans, *model.img_size)
    with torch.no_grad(), flop_counter() as counter:
        model(images)
    flops = int(counter.get_total_flops())
    # everything that is not the patch embedding, an MLP or the head is token mixing (LayerNorm counts 0);
    # computed by difference because some mixers are called through a method rather than __call__
    per_module = counter.get_flop_counts()
    other = sum(
        int(sum(counts.values()))
        for key, counts in per_module.items()
        if key in ("ViT.patch_embed", "ViT.head") or (key.startswith("ViT.blocks.") and key.endswith(".mlp"))
    )
    mixer_flops = flops - other
    return {
        "mechanism": name,
        "params": params,
        "mixer_params": mixer_params,
        "flops": flops,
        "flops_per_image": flops // batch_size,
        "mixer_flops_per_image": mixer_flops // batch_size,
        "grid": model.grid,
    }


def plot_dependency_tree(image: Tensor, tree, path: str, *, index: int = 0, title: str | None = None) -> None:
    """Draw the parent map of a :class:`~attnzoo.mechanisms.vision.reversed.DependencyTree` over ``image``.

    ``image (C, H, W)`` in ``[0, 1]`` (or ``(H, W)``); each patch is a dot at its centre with an arrow to
    its parent; roots are drawn as stars; dots are coloured by the root of their subtree. Needs matplotlib.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if tree.grid is None:
        raise ValueError("plot_dependency_tree: the tree was not computed on a grid")
    gh, gw = tree.grid
    img = image.detach().cpu()
    img = img.permute(1, 2, 0) if img.dim() == 3 else img
    ih, iw = img.shape[0], img.shape[1]
    sy, sx = ih / gh, iw / gw
    parent = tree.parent[index].cpu().tolist()
    n = len(parent)

    def root_of(j: int) -> int:
        while parent[j] != j:
            j = parent[j]
        return j

    roots = sorted({root_of(j) for j in range(n)})
    colour = {r: plt.cm.tab10(i % 10) for i, r in enumerate(roots)}
    centre = [((j % gw + 0.5) * sx - 0.5, (j // gw + 0.5) * sy - 0.5) for j in range(n)]
    fig, ax = plt.subplots(figsize=(4.2, 4.2 * ih / iw), dpi=100)
    ax.imshow(img.numpy(), cmap=None if img.dim() == 3 else "gray", interpolation="nearest")
    for j in range(n):
        x0, y0 = centre[j]
        c = colour[root_of(j)]
        if parent[j] == j:
            ax.plot(x0, y0, marker="*", markersize=14, color=c, markeredgecolor="black")
        else:
            x1, y1 = centre[parent[j]]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color=c, lw=1.0, alpha=0.9))
            ax.plot(x0, y0, marker="o", markersize=3, color=c)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

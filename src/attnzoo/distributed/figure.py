"""The figure of ``docs/distributed.md``: how blocks flow between ranks.

``python -m attnzoo.distributed.figure docs/img/distributed_blocks.png`` (needs matplotlib).

Panels: (a, b) the causal attention matrix of a sequence split over ``P = 4`` ranks, contiguous and
zig-zag; each computed block is coloured by the rank that computes it (the owner of the queries) and
labelled with the ring step at which the key/value block arrives there; blank blocks are skipped.
The block structure is computed by :func:`attnzoo.distributed.ring._plan`, the same plan the ring
executes, so the picture cannot drift from the code. (c) the ring: what travels in forward and
backward. (d) head parallelism: the two all-to-alls.
"""

from __future__ import annotations

import sys

from .ring import _plan
from .sharding import local_positions


def _matrix_panel(ax, world: int, n: int, layout: str, colors) -> None:
    import matplotlib.patches as mpatches

    owner_pos = {r: local_positions(n, r, world, layout).tolist() for r in range(world)}
    total = 0
    for r in range(world):
        for s, blocks in enumerate(_plan(n, r, world, layout, True, None, "cpu")):
            kv_rank = (r - s) % world
            for b in blocks:
                q0 = owner_pos[r][b.q.start]
                k0 = owner_pos[kv_rank][b.k.start]
                hq, wk = b.q.stop - b.q.start, b.k.stop - b.k.start
                ax.add_patch(mpatches.Rectangle((k0, q0), wk, hq, facecolor=colors[r], edgecolor="black", lw=0.8,
                                                alpha=0.55 if b.partial else 0.85))
                ax.text(k0 + wk / 2, q0 + hq / 2, f"s{s}", ha="center", va="center", fontsize=7)
                total += hq * wk
    ax.plot([0, n], [0, n], color="black", lw=0.6, ls=":")
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(f"{layout}, causal, P={world}\n(colour: rank that computes it; s0..s3: ring step; pale: masked block)", fontsize=8)
    ax.set_xticks(range(0, n + 1, n // (2 * world)))
    ax.set_yticks(range(0, n + 1, n // (2 * world)))
    ax.tick_params(labelsize=6)


def draw(path: str, world: int = 4, n: int = 32) -> None:
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    _matrix_panel(axes[0], world, n, "contiguous", colors)
    _matrix_panel(axes[1], world, n, "zigzag", colors)

    ax = axes[2]  # the ring
    ax.set_title("ring: what travels from rank r to rank r+1", fontsize=8)
    pts = [(math.cos(math.pi / 2 - 2 * math.pi * r / world), math.sin(math.pi / 2 - 2 * math.pi * r / world)) for r in range(world)]
    for r, (x, y) in enumerate(pts):
        ax.add_patch(plt.Circle((x, y), 0.22, color=colors[r]))
        ax.text(x, y, f"rank {r}\nq,k,v\nshard {r}", ha="center", va="center", fontsize=7, color="white")
    for r in range(world):
        (x0, y0), (x1, y1) = pts[r], pts[(r + 1) % world]
        ax.annotate("", xy=(x0 + 0.75 * (x1 - x0), y0 + 0.75 * (y1 - y0)), xytext=(x0 + 0.25 * (x1 - x0), y0 + 0.25 * (y1 - y0)),
                    arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(0, 0.05, "forward: K,V block\n(P-1 shifts, overlapped\nwith the block compute)", ha="center", va="center", fontsize=7)
    ax.text(0, -0.45, "backward: K,V again + dK,dV\naccumulator (P shifts:\nit ends at its owner)", ha="center",
            va="center", fontsize=7, color="#8b0000")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")

    ax = axes[3]  # head parallel
    ax.set_title("head parallel (Ulysses): two all-to-alls", fontsize=8)
    for r in range(world):
        for hgrp in range(world):
            ax.add_patch(plt.Rectangle((hgrp * 0.2, 1 - (r + 1) * 0.2), 0.19, 0.19, color=colors[r], alpha=0.85))
            ax.add_patch(plt.Rectangle((1.2 + hgrp * 0.2, 1 - (r + 1) * 0.2), 0.19, 0.19, color=colors[hgrp], alpha=0.85))
    ax.text(0.4, 1.05, "before: rank r has all heads\nof tokens shard r (rows)", ha="center", fontsize=7)
    ax.text(1.6, 1.05, "after: rank r has heads group r\n(columns) of all tokens", ha="center", fontsize=7)
    ax.annotate("", xy=(1.15, 0.6), xytext=(0.85, 0.6), arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(1.0, 0.66, "q,k,v", ha="center", fontsize=7)
    ax.annotate("", xy=(0.85, 0.35), xytext=(1.15, 0.35), arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(1.0, 0.25, "out", ha="center", fontsize=7)
    ax.text(1.0, -0.12, "columns: head groups, rows: token shards;\ncolour = rank holding the tile", ha="center", fontsize=7)
    ax.set_xlim(-0.1, 2.1)
    ax.set_ylim(-0.25, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")

    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    draw(sys.argv[1] if len(sys.argv) > 1 else "docs/img/distributed_blocks.png")

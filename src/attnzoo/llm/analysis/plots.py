"""Matplotlib (Agg) pictures of the analyses: layer x head grids, query x key maps with token labels,
per-layer activation lines, per-token norm bars, training curves, masking bars. All PNG."""

from __future__ import annotations

from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi=100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def _tok(t: str) -> str:
    t = t.replace("Ġ", "␣").replace("Ċ", "\\n").replace("\n", "\\n")
    return t if len(t) <= 10 else t[:9] + "…"


def _wrap(title: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.fill(part, width) for part in title.split("\n"))


def layer_head_grid(
    values,
    path,
    title: str,
    cbar: str,
    cmap: str = "viridis",
    vmin=None,
    vmax=None,
    annotate=False,
    marks=None,
):
    """Heatmap of a per-(layer, head) scalar: rows = layers (0 at the top), columns = heads."""
    plt = _plt()
    v = torch.as_tensor(values).double().numpy()
    nl, nh = v.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.42 * nh, 1.2 + 0.2 * nl))
    cm = plt.get_cmap(cmap).copy()
    cm.set_bad("white")  # NaN = not measured
    im = ax.imshow(v, cmap=cm, aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(nh), [str(h) for h in range(nh)])
    step = 1 if nl <= 16 else 2
    ax.set_yticks(range(0, nl, step), [str(i) for i in range(0, nl, step)])
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(_wrap(title, 46), fontsize=10)
    if annotate:
        for i in range(nl):
            for j in range(nh):
                ax.text(
                    j,
                    i,
                    f"{v[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="w" if v[i, j] < (v.max() + v.min()) / 2 else "k",
                )
    for i, j in marks or []:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    fig.colorbar(im, ax=ax, label=_wrap(cbar, 40))
    return _save(fig, path)


def qk_maps(maps, tokens, heads, path, title: str, log: bool = True, max_tokens: int = 40):
    """Query x key maps for ``heads`` = [(layer, head)] (``maps[(layer, head)]`` (N, N)) with token labels."""
    plt = _plt()
    from matplotlib.colors import LogNorm, Normalize

    n = min(len(tokens), max_tokens)
    labels = [_tok(t) for t in tokens[:n]]
    cols = min(3, len(heads))
    rows = (len(heads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    norm = LogNorm(vmin=1e-3, vmax=1.0) if log else Normalize(vmin=0.0, vmax=1.0)
    im = None
    for ax, (layer, h) in zip(axes.flat, heads):
        a = torch.as_tensor(maps[(layer, h)])[:n, :n].double().clamp_min(1e-3 if log else 0).numpy()
        im = ax.imshow(a, cmap="magma", norm=norm, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=5.5)
        ax.set_yticks(range(n), labels, fontsize=5.5)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    if im is not None:
        fig.colorbar(
            im, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight" + (" (log)" if log else "")
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def massive_lines(top, median, path, title: str):
    """Per layer: top-1/2/3 |h| and median |h| of the decoder-layer outputs (log y)."""
    plt = _plt()
    top = torch.as_tensor(top).double()
    med = torch.as_tensor(median).double()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = range(1, len(med) + 1)
    for k, st in zip(range(3), ["-o", "-s", "-^"]):
        ax.plot(x, top[:, k].numpy(), st, ms=3, label=f"top-{k + 1} |h|")
    ax.plot(x, med.numpy(), "-", color="grey", label="median |h|")
    ax.set_yscale("log")
    ax.set_xlabel("layer (output of decoder layer)")
    ax.set_ylabel("|activation|")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def token_norms(resid, value, tokens, path, title: str, max_tokens: int = 40):
    """Per-token bars: residual norm ||h_t|| (one layer) and value norm ||v_t|| (one layer, kv head)."""
    plt = _plt()
    n = min(len(tokens), max_tokens)
    labels = [_tok(t) for t in tokens[:n]]
    fig, axes = plt.subplots(2, 1, figsize=(8, 4.6), sharex=True)
    axes[0].bar(range(n), torch.as_tensor(resid)[:n].numpy(), color="tab:red")
    axes[0].set_ylabel("‖h_t‖ (residual)")
    axes[0].set_yscale("log")
    axes[1].bar(range(n), torch.as_tensor(value)[:n].numpy(), color="tab:blue")
    axes[1].set_ylabel("‖v_t‖ (value)")
    axes[1].set_xticks(range(n), labels, rotation=90, fontsize=6)
    axes[0].set_title(title, fontsize=10)
    return _save(fig, path)


def ratio_lines(series: dict, path, title: str, ylabel: str, xlabel: str = "layer", logy=True):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for name, ys in series.items():
        ax.plot(range(len(ys)), list(ys), "-o", ms=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def bb_curves(histories: dict, path, title: str = "Bigram-Backcopy: sink, drain and peak during training"):
    """``histories``: {label: [measures per eval step]} from :func:`train_bb`."""
    plt = _plt()
    keys = [
        ("bos_attn_nontrigger", "attention on BOS\n(non-trigger queries)"),
        ("prev_attn_trigger", "attention on previous token\n(trigger queries)"),
        ("value_drain", "‖v_BOS‖ / mean ‖v‖"),
        ("resid_peak", "‖h_BOS‖ / median ‖h‖"),
        ("icl_loss", "loss on triggers (copy)"),
        ("markov_loss", "loss elsewhere (bigram)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(11, 5.6))
    for ax, (k, lab) in zip(axes.flat, keys):
        for name, hist in histories.items():
            ax.plot([h["step"] for h in hist], [h[k] for h in hist], "-o", ms=2.5, label=name)
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def sweep_lines(rows: list[dict], x: str, ys: dict, path, title: str, xlabel: str, logx=False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for key, label in ys.items():
        ax.plot([r[x] for r in rows], [r[key] for r in rows], "-o", ms=3, label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def masking_bars(result: dict, path, title: str):
    """Needle recall with no mask, top-K masked and random-K masked (one bar per seed)."""
    plt = _plt()
    conds = result["conditions"]
    names = list(conds)
    vals = [conds[c]["recall"] for c in names]
    colors = ["tab:green" if c == "none" else "tab:red" if c.startswith("top") else "tab:blue" for c in names]
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(names), 3.6))
    ax.bar(range(len(names)), vals, color=colors)
    ax.set_xticks(range(len(names)), [c.replace("_seed", "\nseed ") for c in names], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("needle ROUGE-1 recall")
    for i, v in enumerate(vals):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)

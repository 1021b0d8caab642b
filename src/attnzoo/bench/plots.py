"""PNG plots of the speed benchmark (matplotlib, Agg backend: no display needed).

Time and memory against sequence length on log-log axes, one panel per CAB pattern, every mechanism
a line, the SDPA baseline a thick black line (its dense-mask variant dashed grey); decode time per
token against context length. Units on every axis, one shared legend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..registry import PATTERNS
from .speed_worker import SDPA, SDPA_DENSE

PATTERN_TITLE = {
    "noncausal_self": "noncausal self-attention (NS)",
    "causal_self": "causal self-attention (CS)",
    "noncausal_cross": "noncausal cross-attention (NC)",
    "causal_cross": "causal cross-attention (CC)",
}
MARKERS = "osD^v<>pPX*hH"
LINESTYLES = ("-", "--", "-.", ":")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _styles(mechanisms: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A stable, distinguishable style per mechanism (colour x marker x line style)."""
    plt = _pyplot()
    colours = (
        list(plt.get_cmap("tab10").colors)
        + list(plt.get_cmap("Dark2").colors)
        + list(plt.get_cmap("Set1").colors)
    )
    out = {}
    for i, name in enumerate(sorted(m for m in mechanisms if m not in (SDPA, SDPA_DENSE))):
        out[name] = {
            "color": colours[i % len(colours)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(colours)) % len(LINESTYLES)],
            "linewidth": 1.4,
            "markersize": 5,
            "label": name,
            "zorder": 3,
        }
    out[SDPA] = {
        "color": "black",
        "marker": "o",
        "linestyle": "-",
        "linewidth": 3.2,
        "markersize": 6,
        "label": "torch.sdpa (baseline)",
        "zorder": 1,
        "alpha": 0.85,
    }
    out[SDPA_DENSE] = {
        "color": "0.45",
        "marker": "s",
        "linestyle": "--",
        "linewidth": 2.2,
        "markersize": 5,
        "label": "torch.sdpa, dense causal mask",
        "zorder": 1.5,
    }
    return out


def _length_axis(ax, values: Sequence[int]) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(values))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(
        FuncFormatter(lambda v, _: f"{int(v) // 1024}k" if v >= 1024 and int(v) % 1024 == 0 else f"{int(v)}")
    )


def _value_axis(ax, values: Sequence[float]) -> None:
    """Log y axis with plain numbers (0.5, 1, 20) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    vals = [v for v in values if v and v > 0]
    few_decades = bool(vals) and max(vals) / min(vals) < 30
    ax.yaxis.set_minor_formatter(fmt if few_decades else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _subtitle(rows: Sequence[dict]) -> str:
    r = next((r for r in rows if r.get("status") == "ok"), None) or (rows[0] if rows else {})
    if not r:
        return ""
    return f"B={r.get('batch')}, H={r.get('heads')}, d_head={r.get('head_dim')}, {r.get('dtype')}, torch threads={r.get('threads')}, {r.get('cpu_model', '')}"


def plot_metric(
    rows: Sequence[dict], metric: str, mode: str, path: str | os.PathLike, *, ylabel: str, title: str
) -> bool:
    """One figure, one panel per pattern present in ``rows``; returns False if there is nothing to plot."""
    attn = [
        r
        for r in rows
        if r.get("kind") == "attn"
        and r.get("mode") == mode
        and r.get("status") == "ok"
        and (r.get(metric) or 0) > 0
    ]
    patterns = [p for p in PATTERNS if any(r["pattern"] == p for r in attn)]
    if not patterns:
        return False
    plt = _pyplot()
    styles = _styles(sorted({r["mechanism"] for r in attn}))
    ncols = 1 if len(patterns) == 1 else 2
    nrows = (len(patterns) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, pattern in zip(axes.flat, patterns):
        prow = [r for r in attn if r["pattern"] == pattern]
        mechs = sorted({r["mechanism"] for r in prow}, key=lambda m: (m in (SDPA, SDPA_DENSE), m))
        for mech in mechs:
            pts = sorted((r["n"], r[metric]) for r in prow if r["mechanism"] == mech)
            st = dict(styles[mech])
            label = st.pop("label")
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **st)
            handles.setdefault(label, line)
        _length_axis(ax, [r["n"] for r in prow])
        _value_axis(ax, [r[metric] for r in prow])
        ax.set_title(
            PATTERN_TITLE[pattern]
            + (" — source M = " + _ratio_text(prow) if pattern.endswith("cross") else ""),
            fontsize=11,
        )
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", axis="y", alpha=0.12)
    for ax in list(axes.flat)[len(patterns) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n{_subtitle(attn)}", fontsize=12)
    ordered = sorted(k for k in handles if k.startswith("torch.sdpa")) + sorted(
        k for k in handles if not k.startswith("torch.sdpa")
    )
    ncol = 1 if len(ordered) <= 18 else 2
    fig.legend(
        [handles[k] for k in ordered],
        ordered,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=9,
        ncol=ncol,
        title="mechanism",
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _ratio_text(rows: Sequence[dict]) -> str:
    r = rows[0]
    ratio = r["m"] / r["n"] if r.get("n") else 0
    return f"{ratio:g}·N"


def plot_decode(rows: Sequence[dict], path: str | os.PathLike) -> bool:
    dec = [
        r
        for r in rows
        if r.get("kind") == "decode" and r.get("status") == "ok" and (r.get("median_ms") or 0) > 0
    ]
    if not dec:
        return False
    plt = _pyplot()
    styles = _styles(sorted({r["mechanism"] for r in dec}))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for mech in sorted({r["mechanism"] for r in dec}, key=lambda m: (m == SDPA, m)):
        pts = sorted((r["n"], r["median_ms"]) for r in dec if r["mechanism"] == mech)
        st = dict(styles[mech])
        label = st.pop("label")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **st)
    _length_axis(ax, [r["n"] for r in dec])
    _value_axis(ax, [r["median_ms"] for r in dec])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.grid(True, alpha=0.35)
    ax.set_title(f"Decode: time per token after a prefill (log-log)\n{_subtitle(dec)}", fontsize=11)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9, frameon=False, title="mechanism")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_all(rows: Sequence[dict], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write every plot there is data for into ``out_dir``; returns {key: file name}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    specs = (
        ("time_fwd", "median_ms", "fwd", "time per call (ms)", "Forward time vs sequence length (log-log)"),
        (
            "time_fwdbwd",
            "median_ms",
            "fwdbwd",
            "time per forward+backward (ms)",
            "Forward+backward time vs sequence length (log-log)",
        ),
        (
            "memory_fwd",
            "peak_mib",
            "fwd",
            "peak memory (MiB)",
            "Peak memory of one forward call vs sequence length (log-log)",
        ),
        (
            "memory_fwdbwd",
            "peak_mib",
            "fwdbwd",
            "peak memory (MiB)",
            "Peak memory of one forward+backward vs sequence length (log-log)",
        ),
    )
    for key, metric, mode, ylabel, title in specs:
        name = f"{key}.png"
        if plot_metric(rows, metric, mode, out / name, ylabel=ylabel, title=title):
            files[key] = name
    if plot_decode(rows, out / "decode.png"):
        files["decode"] = "decode.png"
    return files

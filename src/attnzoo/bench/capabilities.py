"""The capability matrix of the registry (every mechanism x the four patterns + decode + spatial),
and the small file helpers every report writer shares."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import registry

COLUMNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross", "decode", "spatial", "key_padding_mask", "exact")
HEADERS = ("NS", "CS", "NC", "CC", "decode", "2-D", "padding", "exact")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def mechanism_table() -> str:
    """Markdown table of every mechanism: name, paper, family, patterns (used in the README)."""
    rows = ["| mechanism | paper | arXiv | family | NS | CS | NC | CC | decode | 2-D |", "|---|---|---|---|---|---|---|---|---|---|"]
    for spec in registry.all_specs():
        marks = ["✓" if c in spec.capabilities else "" for c in COLUMNS[:6]]
        arxiv = spec.arxiv or ""
        rows.append(f"| `{spec.name}` | {spec.paper} | {arxiv} | {spec.family} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def capability_matrix() -> str:
    """The report's capability section: every mechanism x patterns, decode, spatial, padding, exact."""
    specs = registry.all_specs()
    lines = [
        "## Capability matrix",
        "",
        f"{len(specs)} registered mechanisms. NS/CS/NC/CC are the four attention patterns of CAB "
        "(noncausal/causal x self/cross); a mark means the mechanism declares the capability and the "
        "conformance suite checks it.",
        "",
        "| mechanism | family | " + " | ".join(HEADERS) + " | complexity |",
        "|---|---|" + "---|" * len(HEADERS) + "---|",
    ]
    for spec in specs:
        marks = ["✓" if c in spec.capabilities else "·" for c in COLUMNS]
        lines.append(f"| `{spec.name}` | {spec.family} | " + " | ".join(marks) + f" | {spec.complexity} |")
    counts = {h: sum(c in s.capabilities for s in specs) for h, c in zip(HEADERS, COLUMNS)}
    lines.append("| **total** | | " + " | ".join(str(counts[h]) for h in HEADERS) + " | |")
    return "\n".join(lines)

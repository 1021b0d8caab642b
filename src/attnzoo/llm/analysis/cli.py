"""``attnzoo llm analyze [SECTION ...]``: the analyses of :mod:`attnzoo.llm.analysis` as a report.

Wire it with ``add_analyze_parser(llm_subparsers)`` inside the ``llm`` plug-in. Imports nothing heavy at
module level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SECTIONS = ["sinks", "massive", "dormant", "bb", "retrieval", "act", "interventions", "patching"]
NEEDS_MODEL = {"sinks", "massive", "dormant", "retrieval", "act", "interventions", "patching"}


def _cmd_analyze(args) -> int:
    import torch

    from .report import Report

    torch.set_num_threads(max(1, args.threads))
    sections = args.sections or SECTIONS
    model = tok = None
    if NEEDS_MODEL & set(sections):
        from ..loading import load_model

        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        model, tok = load_model(args.model)
    rep = (
        Report(model, tok, args.out, prefix=args.prefix)
        if model is not None
        else _BBOnly(args.out, args.prefix)
    )
    kw = {
        "sinks": {"length": args.length, "thres": args.thres},
        "dormant": {"length": args.length, "row_thr": args.row_thr, "col_thr": args.col_thr},
        "bb": {"steps": args.bb_steps, "relu_steps": args.bb_steps},
        "retrieval": {
            "lengths": tuple(args.retrieval_lengths),
            "depths": tuple(args.depths),
            "k": args.k,
            "seeds": tuple(range(args.seeds)),
        },
        "act": {"layers": args.act_layers, "n_calibration": args.n_calibration, "n_heldout": args.n_heldout},
        "massive": {},
        "interventions": {},
        "patching": {},
    }
    parts = []
    for s in sections:
        parts.append(getattr(rep, s)(**kw[s]))
        print(f"[analysis] {s} done", file=sys.stderr, flush=True)
    md = "\n\n".join(parts) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.md").write_text(md)
    import json

    from .report import _json

    (out / "analysis.json").write_text(json.dumps(rep.results, indent=1, default=_json))
    print(md)
    print(f"pictures and tables in {out}", file=sys.stderr)
    return 0


class _BBOnly:
    """The Bigram-Backcopy section needs no pretrained model."""

    def __init__(self, out, prefix):
        from .report import Report

        self._r = Report.__new__(Report)
        self._r.out = Path(out)
        self._r.out.mkdir(parents=True, exist_ok=True)
        self._r.prefix = prefix
        self._r.results = {}
        self.results = self._r.results

    def bb(self, **kw):
        from .report import Report

        return Report.bb(self._r, **kw)


def add_analyze_parser(llm_subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` to the ``attnzoo llm`` sub-commands; returns the new parser."""
    p = llm_subparsers.add_parser(
        "analyze",
        help="attention sinks, massive activations, active/dormant and retrieval heads, ACT/VAR/VHR interventions",
        description="Run the chosen analysis sections (default: all) and write Markdown, JSON and PNG files.",
    )
    p.add_argument(
        "sections", nargs="*", choices=SECTIONS, help=f"sections to run (default: all of {SECTIONS})"
    )
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="default model, local HF directory or .gguf file"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="report/llm-analysis")
    p.add_argument("--prefix", default="llm_analysis_", help="file-name prefix of the PNGs")
    p.add_argument(
        "--length", type=int, default=160, help="prompt length (tokens) of the sink/dormant statistics"
    )
    p.add_argument("--thres", type=float, default=0.1, help="ACT sink threshold on the column score")
    p.add_argument("--row-thr", type=float, default=0.2, help="dormant detector: row-entropy threshold")
    p.add_argument("--col-thr", type=float, default=0.9, help="dormant detector: column-entropy threshold")
    p.add_argument("--bb-steps", type=int, default=800, help="Bigram-Backcopy training steps")
    p.add_argument("--retrieval-lengths", nargs="+", type=int, default=[256, 512])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    p.add_argument("--k", type=int, default=8, help="number of top / random heads to mask")
    p.add_argument("--seeds", type=int, default=5, help="random-head seeds")
    p.add_argument(
        "--act-layers", nargs="+", type=int, default=None, help="layers searched by ACT (default 2..L-1)"
    )
    p.add_argument("--n-calibration", type=int, default=32)
    p.add_argument("--n-heldout", type=int, default=96)
    p.set_defaults(func=_cmd_analyze)
    return p


def report_section(out_dir, quick: bool) -> str:
    """Markdown section for ``attnzoo report`` (same shape as :func:`attnzoo.llm.cli.report_section`).

    quick: sinks, massive activations and dormant heads on the default model (about 2 min on a shared
    CPU); full: every section (about 20 min, the ACT search dominates).
    """
    try:
        from ..loading import default_model_path, load_model

        default_model_path()
    except (ImportError, FileNotFoundError) as e:
        return f"## LLM attention analysis\n\nSkipped: {e}"
    import torch

    from .report import Report

    torch.set_num_threads(1)
    out = Path(out_dir) / "llm-analysis"
    model, tok = load_model()
    rep = Report(model, tok, out)
    sections = ["sinks", "massive", "dormant"] if quick else SECTIONS
    parts = ["## LLM attention analysis (SmolLM2-135M-Instruct, CPU)"]
    for s in sections:
        parts.append(getattr(rep, s)())
    return "\n\n".join(parts)

"""``attnzoo llm ...``: generate, needle, perplexity, cost, presses (plug-in of :mod:`attnzoo.cli`).

Imports nothing from transformers at module level, so ``attnzoo`` works without the ``llm`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

PRESS_CHOICES = ["snapkv", "streaming", "heavy_hitters", "saq", "s2", "retrieval", "knorm", "random"]


def _value(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    if "," in s:
        return tuple(_value(x) for x in s.split(","))
    return s


def _press_settings(names: list[str], sets: list[str]) -> dict[str, dict]:
    out = {n: {} for n in names}
    for item in sets or []:
        key, _, val = item.partition("=")
        name, _, field = key.partition(".")
        if not field or name not in out:
            raise SystemExit(f"--set expects PRESS.FIELD=VALUE with PRESS in {names}, got {item!r}")
        out[name][field] = _value(val)
    return out


def _mechanism_context(args, model):
    if not getattr(args, "mechanism", None):
        return contextlib.nullcontext()
    from .interface import use_attention

    params = {}
    for item in args.mech_param or []:
        k, _, v = item.partition("=")
        params[k] = _value(v)
    return use_attention(model, args.mechanism, **params)


def _load(args):
    import torch

    torch.set_num_threads(max(1, args.threads))
    from .loading import load_model

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    return load_model(args.model)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="default model, local HF directory or .gguf file"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _cmd_generate(args) -> int:
    from .generation import answer
    from .presses import press

    model, tok = _load(args)
    p = press(args.press, compression_ratio=args.ratio) if args.press else None
    ctx = Path(args.context_file).read_text() if args.context_file else (args.context or "")
    with _mechanism_context(args, model):
        text = answer(model, tok, ctx, args.prompt, press=p, max_new_tokens=args.max_new_tokens)
    print(text)
    if p is not None:
        rep = p.report()
        print(
            f"[{rep['press']}] kept {100 * rep.get('kept_fraction', 1):.0f}% of {rep.get('original_tokens', 0)} tokens; "
            f"KV {rep.get('bytes_after', 0) / 2**20:.2f} MiB (was {rep.get('bytes_before', 0) / 2**20:.2f})",
            file=sys.stderr,
        )
    return 0


def _cmd_needle(args) -> int:
    from .needle import markdown_table, plot_heatmaps, run_needle

    model, tok = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.protocol}" + (f"_{args.mechanism}" if args.mechanism else "")
    jsonl = out / f"needle{tag}.jsonl"
    if args.restart and jsonl.exists():
        jsonl.unlink()
    with _mechanism_context(args, model):
        res = run_needle(
            model,
            tok,
            lengths=args.lengths,
            depths=args.depths,
            samples=args.samples,
            presses=_press_settings(args.presses, args.set),
            ratios=args.ratios,
            out=jsonl,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            seed=args.seed,
            protocol=args.protocol,
        )
    table = markdown_table(res)
    paths = plot_heatmaps(res, out / f"needle{tag}")
    (out / f"needle{tag}.md").write_text(table + "\n")
    print(table)
    print(f"heatmaps: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def _cmd_perplexity(args) -> int:
    from .evaluate import perplexity

    model, tok = _load(args)
    with _mechanism_context(args, model):
        ppl = perplexity(
            model,
            tok,
            presses=_press_settings(args.presses, args.set),
            ratios=args.ratios,
            prefix=args.prefix,
            continuation=args.continuation,
            seed=args.seed,
        )
    lines = ["| press | perplexity |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in ppl.items()]
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "perplexity.json").write_text(json.dumps(ppl, indent=1))
    return 0


def _cmd_cost(args) -> int:
    from .evaluate import cost, cost_markdown

    model, tok = _load(args)
    rows = cost(
        model,
        tok,
        contexts=args.contexts,
        presses=_press_settings(args.presses, args.set),
        ratio=args.ratio,
        new_tokens=args.new_tokens,
        progress=True,
    )
    md = cost_markdown(rows)
    print(md)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cost.md").write_text(md + "\n")
    return 0


def _cmd_presses(args) -> int:
    from .presses import press, press_names

    for n in press_names():
        doc = (type(press(n)).__doc__ or "").strip().splitlines()[0]
        print(f"{n:<14} {doc}")
    return 0


def register_cli(subparsers) -> None:
    llm = subparsers.add_parser("llm", help="pretrained LLMs: KV-cache presses, needle, perplexity, cost")
    sub = llm.add_subparsers(dest="llm_command", required=True)

    from .analysis.cli import add_analyze_parser

    add_analyze_parser(sub)  # attnzoo llm analyze ...

    p = sub.add_parser("presses", help="list the KV-cache presses")
    p.set_defaults(func=_cmd_presses)

    def evalargs(p, ratios=True):
        _common(p)
        p.add_argument("--presses", nargs="+", default=["snapkv", "streaming"], choices=PRESS_CHOICES)
        p.add_argument(
            "--set",
            action="append",
            metavar="PRESS.FIELD=VALUE",
            help="press setting, e.g. snapkv.window_size=64",
        )
        if ratios:
            p.add_argument(
                "--ratios",
                nargs="+",
                type=float,
                default=[0.75],
                help="compression ratios (fraction removed)",
            )
        p.add_argument(
            "--mechanism", help="run the model with this attnzoo mechanism in every layer (use_attention)"
        )
        p.add_argument("--mech-param", action="append", metavar="KEY=VALUE")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="answer a prompt (optionally about a context compressed by a press)")
    _common(p)
    p.add_argument("prompt")
    p.add_argument("--context", help="context text (compressed by the press)")
    p.add_argument("--context-file")
    p.add_argument("--press", choices=PRESS_CHOICES)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mechanism")
    p.add_argument("--mech-param", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("needle", help="needle-in-a-haystack grid, heatmaps per press and ratio (resumable)")
    evalargs(p)
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=2, help="needles per cell")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument(
        "--protocol",
        choices=["query_aware", "query_agnostic"],
        default="query_aware",
        help="query_aware: question inside the compressed prompt (SnapKV paper); "
        "query_agnostic: only the context is compressed (kvpress pipeline)",
    )
    p.add_argument("--out", default="report/llm")
    p.add_argument("--restart", action="store_true", help="discard finished rows instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_needle)

    p = sub.add_parser("perplexity", help="perplexity of a generated text after a compressed prefix")
    evalargs(p)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--out")
    p.set_defaults(func=_cmd_perplexity, ratios=[0.5, 0.75])

    p = sub.add_parser(
        "cost", help="KV bytes, peak memory and ms per generated token with and without presses"
    )
    evalargs(p, ratios=False)
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out")
    p.set_defaults(func=_cmd_cost)


def report_section(out_dir: Path, quick: bool) -> str:
    """Needle accuracy (+ heatmaps) and perplexity on the default model; quick = 1k tokens, 3 depths."""
    try:
        from .loading import default_model_path, load_model

        default_model_path()
    except (ImportError, FileNotFoundError) as e:
        return f"## LLM KV-cache presses\n\nSkipped: {e}"
    import torch

    from .evaluate import cost, cost_markdown, perplexity
    from .needle import markdown_table, plot_heatmaps, run_needle

    torch.set_num_threads(1)
    out = Path(out_dir) / "llm"
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    presses = {"snapkv": {}, "streaming": {}, "heavy_hitters": {}}
    lengths = (1024,) if quick else (1024, 2048, 4096, 8192)
    depths = (0.0, 0.5, 1.0) if quick else (0.0, 0.25, 0.5, 0.75, 1.0)
    res = run_needle(
        model,
        tok,
        lengths=lengths,
        depths=depths,
        samples=1 if quick else 2,
        presses=presses,
        ratios=(0.75,),
        out=out / "needle.jsonl",
        progress=False,
    )
    paths = plot_heatmaps(res, out / "needle")
    ppl = perplexity(
        model, tok, presses=presses, ratios=(0.75,), prefix=512 if quick else 1024, continuation=128
    )
    rows = cost(
        model,
        tok,
        contexts=(1024,) if quick else (2048, 4096, 8192),
        presses=presses,
        ratio=0.75,
        new_tokens=8,
    )
    parts = [
        "## LLM KV-cache presses (SmolLM2-135M-Instruct, CPU)",
        f"Needle accuracy, compression ratio 0.75 (25% of the cache kept), lengths {list(lengths)}:",
        markdown_table(res),
        "Heatmaps: " + ", ".join(f"[{p.stem}](llm/needle/{p.name})" for p in paths),
        "Perplexity of the continuation after a compressed prefix:",
        "| press | perplexity |\n|---|---|\n" + "\n".join(f"| {k} | {v:.3f} |" for k, v in ppl.items()),
        "Cost (time on a shared CPU; indicative only):",
        cost_markdown(rows),
    ]
    return "\n\n".join(parts)

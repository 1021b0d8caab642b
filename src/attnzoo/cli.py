"""The ``attnzoo`` command.

``attnzoo list``, ``attnzoo info NAME``, ``attnzoo report`` and the ``attnzoo bench`` group live here.
Other parts of the package plug in: every module named in :data:`PLUGINS` that exists may define

* ``register_bench(bench_subparsers)``: adds ``attnzoo bench <name>`` subcommands;
* ``register_cli(subparsers)``: adds top-level subcommands (e.g. ``attnzoo llm ...``);
* ``report_section(out_dir: Path, quick: bool) -> str``: runs its part of the default benchmark and
  returns a Markdown section of ``attnzoo report`` (sections appear in the order of :data:`PLUGINS`).

Each subcommand sets ``func`` (``args -> int`` exit code) with ``set_defaults``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import registry
from .bench.capabilities import capability_matrix, write_text_atomic

#: Modules that plug subcommands and report sections into the CLI, in report order.
PLUGINS = ("attnzoo.bench.speed", "attnzoo.bench.quality", "attnzoo.bench.local", "attnzoo.llm.cli")


def _plugins():
    mods = []
    for name in PLUGINS:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            if e.name != name:  # the plugin exists but one of its own imports is missing: say so
                raise
    return mods


def _cmd_list(args) -> int:
    names = registry.list_mechanisms(pattern=args.pattern, family=args.family, capability=args.capability)
    if not names:
        print("no mechanism matches", file=sys.stderr)
        return 1
    width = max(len(n) for n in names)
    for n in names:
        spec = registry.get(n)
        arxiv = f"arXiv {spec.arxiv}" if spec.arxiv else ""
        print(f"{n:<{width}}  {spec.family:<8} {','.join(_short(p) for p in spec.patterns):<12} {arxiv:<16} {spec.paper}")
    return 0


def _short(pattern: str) -> str:
    return {"noncausal_self": "NS", "causal_self": "CS", "noncausal_cross": "NC", "causal_cross": "CC"}[pattern]


def _cmd_info(args) -> int:
    try:
        spec = registry.get(args.name)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    print(spec.describe())
    return 0


def _cmd_report(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.sections.split(",")) if args.sections else None
    known = {"capabilities"} | {_section_name(m) for m in _plugins()}
    if wanted is not None and not wanted <= known:
        print(f"unknown report section(s) {sorted(wanted - known)}; known: {sorted(known)}", file=sys.stderr)
        return 2
    sections = ["# attnzoo report\n"]
    if wanted is None or "capabilities" in wanted:
        sections.append(capability_matrix())
    for mod in _plugins():
        fn = getattr(mod, "report_section", None)
        if fn is not None and (wanted is None or _section_name(mod) in wanted):
            sections.append(fn(out, quick=not args.full))
    path = out / "README.md"
    write_text_atomic(path, "\n\n".join(s.strip() for s in sections if s) + "\n")
    print(f"report written to {path}")
    return 0


def _section_name(mod) -> str:
    """``attnzoo.bench.speed`` -> ``speed``; ``attnzoo.llm.cli`` -> ``llm``."""
    parts = mod.__name__.split(".")
    return parts[-2] if parts[-1] == "cli" else parts[-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="Attention mechanisms behind one interface.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list the registered mechanisms")
    p.add_argument("--pattern", choices=registry.PATTERNS)
    p.add_argument("--family", choices=registry.FAMILIES)
    p.add_argument("--capability", choices=list(registry.CAPABILITIES))
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="paper, capabilities, defaults and complexity of one mechanism")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("report", help="run the default benchmark and write the report")
    p.add_argument("--out", default="report", help="output folder (default: report/)")
    p.add_argument("--full", action="store_true", help="the full sweep instead of the quick default")
    p.add_argument("--sections", help="comma-separated subset: capabilities,speed,quality,llm (default: all)")
    p.set_defaults(func=_cmd_report)

    bench = sub.add_parser("bench", help="benchmarks (speed, quality)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for mod in _plugins():
        for hook, target in (("register_bench", bench_sub), ("register_cli", sub)):
            fn = getattr(mod, hook, None)
            if fn is not None:
                fn(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

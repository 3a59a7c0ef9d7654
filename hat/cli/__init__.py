"""The ``hat`` command: ``hat <subcommand> [options]``; ``hat <subcommand> --help`` for details.

Each subcommand is a module of this package holding its parser and ``main(argv)``; the library
modules it calls hold no command-line code.
"""

from __future__ import annotations

import importlib
import sys

from hat.runtime import keep_freed_memory

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("hat.cli.train", "train a model (torchrun-ready)"),
    "eval": ("hat.cli.eval", "R@1/5/10, RSUM and ranks of a checkpoint on a Karpathy split"),
    "data": ("hat.cli.data", "build datasets: synthetic shapes, Tux Paint Scenes, objects"),
    "index": ("hat.cli.index", "build a search gallery: cached features + faiss index"),
    "search": ("hat.cli.search", "text -> image / image -> text search in a built gallery"),
    "convert": ("hat.cli.convert", "official LuminosityX/HAT .ckpt -> a hat-b checkpoint folder"),
    "fetch": ("hat.cli.fetch", "download, check, convert and cache official-f30k / official-coco"),
    "build-demo": (
        "hat.cli.build_demo",
        "rebuild the offline demo checkpoint and its reports (CPU)",
    ),
}


def usage() -> str:
    lines = ["usage: hat <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hat: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    keep_freed_memory()
    module.main(rest)
    return 0

"""The ``hat`` command: ``hat <subcommand> [options]``; ``hat <subcommand> --help`` for details."""

from __future__ import annotations

import importlib
import sys

from hat.runtime import keep_freed_memory

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "train": ("hat.train", "train a model (torchrun-ready)"),
    "eval": ("hat.evaluate", "R@1/5/10, RSUM and ranks of a checkpoint on a Karpathy split"),
    "data": ("hat.data.cli", "build datasets: synthetic shapes, Tux Paint Scenes"),
    "index": ("hat.index_cli", "build a search gallery: cached features + faiss index"),
    "search": ("hat.search", "text -> image / image -> text search in a built gallery"),
    "convert": ("hat.convert", "official LuminosityX/HAT .ckpt -> a hat-b checkpoint folder"),
    "fetch": ("hat.fetch", "download, check, convert and cache official-f30k / official-coco"),
    "build-demo": ("hat.demo_recipe", "rebuild the offline demo checkpoint and its reports (CPU)"),
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


if __name__ == "__main__":
    sys.exit(main())

"""``hat fetch``: download, check, convert and cache an official checkpoint (:mod:`hat.fetch`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hat.fetch
from hat.fetch import (
    MIRROR_ENV,
    OFFICIAL,
    SOURCE_NAME,
    FetchError,
    default_checkpoint_cache,
    fetch,
    resolve_checkpoint,
)


def resolve_or_exit(spec: str | Path, prog: str) -> Path:
    """:func:`resolve_checkpoint` for a command line: a failure ends it with the message."""
    try:
        return resolve_checkpoint(spec)
    except FetchError as err:
        raise SystemExit(f"{prog}: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hat fetch",
        description=hat.fetch.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(OFFICIAL), help="which official checkpoint")
    parser.add_argument("--file", help="use this downloaded .ckpt instead of downloading it")
    parser.add_argument(
        "--cache", default=str(default_checkpoint_cache()), help="checkpoint cache directory"
    )
    parser.add_argument(
        "--mirror", help=f"base URL of an HTTP copy of the files (default: ${MIRROR_ENV} or Drive)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    try:
        folder = fetch(
            args.name, args.cache, file=args.file, mirror=args.mirror, progress=not args.quiet
        )
    except FetchError as err:
        raise SystemExit(f"hat fetch: {err}") from err
    source = json.loads((folder / SOURCE_NAME).read_text())
    print(f"{args.name}: {folder} (from {source['file']}, sha256 {source['sha256']})")
    return folder

"""``hat convert``: an official LuminosityX/HAT checkpoint -> a ``hat-b`` folder.

The conversion rules: :mod:`hat.convert`.
"""

from __future__ import annotations

import argparse

from hat.convert import ConversionError, ConversionReport, convert_checkpoint
from hat.hub import PretrainedUnavailableError
from hat.safe_load import CheckpointReadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hat convert",
        description="Convert an official LuminosityX/HAT checkpoint (.ckpt) to a hat-b folder.",
    )
    parser.add_argument("checkpoint", help="official .ckpt (or a bare state_dict file)")
    parser.add_argument("out", help="checkpoint folder to write (replaced atomically)")
    parser.add_argument(
        "--tokenizer",
        metavar="SOURCE",
        help="tokenizer folder or hub name (default: the bundled bert-base-uncased vocabulary)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow unpickling Python objects from the file (runs code: trusted sources only)",
    )
    return parser


def main(argv: list[str] | None = None) -> ConversionReport:
    args = build_parser().parse_args(argv)
    try:
        report = convert_checkpoint(
            args.checkpoint, args.out, args.tokenizer, args.trust_checkpoint
        )
    except (
        CheckpointReadError,
        ConversionError,
        FileNotFoundError,
        PretrainedUnavailableError,
    ) as err:
        raise SystemExit(f"hat convert: {err}") from err
    print(report.summary())
    print(f"wrote {args.out}")
    return report

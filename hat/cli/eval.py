"""``hat eval``: evaluate a checkpoint on a Karpathy split (:mod:`hat.evaluate`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import hat.evaluate
from hat.cli.fetch import resolve_or_exit
from hat.data.captions import karpathy_groups, read_karpathy
from hat.encoder import Encoder
from hat.evaluate import evaluate
from hat.metrics import format_table
from hat.runtime import default_device


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hat eval", description=hat.evaluate.__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, or official-f30k / official-coco"
    )
    parser.add_argument("--data", required=True, help="Karpathy-split JSON")
    parser.add_argument("--image-root", required=True, help="folder the JSON's paths start from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--folds", type=int, default=1, help="also average over N image folds")
    parser.add_argument(
        "--group-by",
        metavar="KEY",
        help="also report the queries of each value of this image field (e.g. seen_concept)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    encoder = Encoder.from_pretrained(resolve_or_exit(args.checkpoint, "hat eval"), args.device)
    data = read_karpathy(args.data, args.image_root, args.split)
    groups = karpathy_groups(args.data, args.split, args.group_by) if args.group_by else None
    results = evaluate(encoder, data, args.folds, args.batch_size, args.workers, True, groups)
    table = results.table()
    report = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "split": args.split,
        "num_images": data.num_images,
        "num_captions": len(data.captions),
        "seconds": round(time.perf_counter() - start, 1),
        "results": table,
    }
    print(format_table(table))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return report

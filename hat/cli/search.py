"""``hat search``: text -> image / image -> text search in a gallery (:mod:`hat.search`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from hat import search
from hat.cli.fetch import resolve_or_exit
from hat.gallery import default_cache_dir
from hat.gallery.manifest import MANIFEST
from hat.search import DEFAULT_CANDIDATES, Searcher, SearchResult


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hat search",
        description=search.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--gallery",
        required=True,
        help="directory printed by hat index build; with --checkpoint, the images instead: a "
        "folder (images/ and captions.json or .csv) or karpathy:JSON:IMAGE_ROOT:SPLIT",
    )
    parser.add_argument(
        "--checkpoint",
        help="checkpoint folder, or official-f30k / official-coco: build (or reopen) the gallery "
        "of --gallery's images with it",
    )
    parser.add_argument(
        "--cache", default=str(default_cache_dir()), help="gallery cache (with --checkpoint)"
    )
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="caption: find images")
    query.add_argument("--image", help="image file: find captions of the caption bank")
    parser.add_argument("-k", type=int, default=10, help="results to return")
    parser.add_argument(
        "--candidates", type=int, default=DEFAULT_CANDIDATES, help="first-stage candidates K"
    )
    parser.add_argument("--exact", action="store_true", help="score the whole gallery exactly")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def format_hits(result: SearchResult) -> str:
    lines = []
    for rank, hit in enumerate(result.hits, start=1):
        levels = " ".join(f"{s:+.3f}" for s in hit.level_scores)
        image = hit.image or "no gallery image"
        what = f"{hit.caption!r} ({image})" if hit.caption is not None else hit.image
        lines.append(f"{rank:>3}  {hit.score:+.4f}  [{levels}]  {what}")
    times = "  ".join(f"{k} {v * 1000:.1f} ms" for k, v in result.seconds.items())
    lines.append(f"scored {result.scored} exactly; {times}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> SearchResult:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint and (Path(args.gallery) / MANIFEST).is_file():
        parser.error(f"{args.gallery} is a built gallery: search it without --checkpoint")
    if args.checkpoint:
        checkpoint = resolve_or_exit(args.checkpoint, "hat search")
        searcher = Searcher.build(checkpoint, args.gallery, args.cache, args.device)
    else:
        searcher = Searcher.open(args.gallery, args.device)
    if args.text is not None:
        result = searcher.text_to_image(args.text, args.k, args.candidates, args.exact)
    else:
        result = searcher.image_to_text(args.image, args.k, args.candidates, args.exact)
    print(json.dumps(asdict(result), indent=1) if args.json else format_hits(result))
    return result

"""``hat index build``: encode a gallery once into the cache (features + faiss indexes).

hat index build --checkpoint checkpoints/hat-tuxpaint --images photos/ [--captions captions.csv]
hat index build --checkpoint ... --karpathy dataset.json --image-root images/ --split test

Running it again is near-instant when nothing changed; after images are added (or edited) only
those are encoded. Prints the gallery directory to pass to ``hat search --gallery``.

torchrun --nproc_per_node N -m hat index build ...   shares the encoding over N processes (one
GPU each where there are GPUs); the cache folder must be one that every process sees.
"""

from __future__ import annotations

import argparse
import json
from datetime import timedelta

import torch.distributed as dist

from hat.cli.fetch import resolve_or_exit
from hat.distributed import DistInfo, process_group
from hat.gallery import (
    PRECISIONS,
    BuildSettings,
    Gallery,
    build_gallery,
    build_gallery_distributed,
    default_cache_dir,
    folder_collection,
    karpathy_collection,
)
from hat.runtime import default_device

SHOW_SKIPPED = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hat index", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build (or reopen) the gallery of an image collection")
    build.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, or official-f30k / official-coco"
    )
    build.add_argument("--images", help="image folder (searched recursively)")
    build.add_argument("--captions", help="JSON or CSV captions file for --images (optional)")
    build.add_argument(
        "--captions-without-images",
        help="text file, one caption per line, that image → text search ranks with no image of "
        "their own (optional, with --images)",
    )
    build.add_argument("--karpathy", help="Karpathy-split JSON instead of --images")
    build.add_argument("--image-root", help="image root of --karpathy")
    build.add_argument("--split", default="test", help="split of --karpathy")
    build.add_argument("--cache", default=str(default_cache_dir()), help="cache directory")
    build.add_argument("--precision", default="int8", choices=list(PRECISIONS))
    build.add_argument("--batch-size", type=int, default=32)
    build.add_argument("--workers", type=int, default=0, help="image decoding processes")
    build.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    build.add_argument("--verify", action="store_true", help="re-hash a cached gallery's files")
    build.add_argument("--json", action="store_true", help="print a JSON summary")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.add_argument(
        "--timeout",
        type=float,
        default=180,
        help="under torchrun: minutes a process waits for the others at a step they share "
        "(the leader writing the indexes, the slowest rank encoding its share)",
    )
    return parser


def summary(gallery: Gallery) -> dict:
    report = gallery.report
    return {
        "gallery": str(gallery.directory),
        "images": gallery.num_images,
        "captions": gallery.num_captions,
        "skipped": gallery.skipped,
        "cache_hit": report.cache_hit,
        "encoded_images": report.encoded_images,
        "reused_images": report.reused_images,
        "rebuilt_because": report.rebuilt_because,
        "bytes_per_image": round(gallery.bytes_per_image()),
        "seconds": round(report.seconds, 3),
    }


def format_summary(info: dict) -> str:
    state = "cache hit" if info["cache_hit"] else "built"
    lines = [
        f"gallery: {info['gallery']}",
        f"{state}: {info['images']} images ({info['encoded_images']} encoded, "
        f"{info['reused_images']} reused), {info['captions']} captions, "
        f"{info['bytes_per_image'] / 1024:.1f} KiB per image, {info['seconds']:.2f} s",
    ]
    if info["rebuilt_because"]:
        lines.append(f"rebuilt because: {info['rebuilt_because']}")
    skipped = info["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable image(s):")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:SHOW_SKIPPED]]
        if len(skipped) > SHOW_SKIPPED:
            lines.append(f"  ... and {len(skipped) - SHOW_SKIPPED} more (--json lists all)")
    return "\n".join(lines)


def _build(args: argparse.Namespace, ranks: DistInfo, collection, device: str) -> Gallery:
    """This process's part of the build (all of it when alone)."""
    if ranks.enabled and not ranks.is_main:
        dist.barrier()  # rank 0 fetches an official checkpoint first, once for all
    checkpoint = resolve_or_exit(args.checkpoint, "hat index build")
    if ranks.enabled and ranks.is_main:
        dist.barrier()
    if ranks.enabled and device == "cuda":
        device = f"cuda:{ranks.local_rank}"
    options = {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": device,
        "progress": not args.quiet and ranks.is_main,
        "verify": args.verify,
    }
    settings = BuildSettings(precision=args.precision)
    if ranks.enabled:
        return build_gallery_distributed(
            ranks, checkpoint, collection, args.cache, settings, **options
        )
    return build_gallery(checkpoint, collection, args.cache, settings, **options)


def main(argv: list[str] | None = None) -> Gallery:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.karpathy):
        parser.error("give either --images or --karpathy (with --image-root)")
    if args.karpathy:
        if not args.image_root:
            parser.error("--karpathy needs --image-root")
        collection = karpathy_collection(args.karpathy, args.image_root, args.split)
    else:
        collection = folder_collection(args.images, args.captions, args.captions_without_images)
    device = args.device or default_device()
    # Only small Python objects travel between the processes: gloo, even beside GPUs.
    with process_group(device, "gloo", timedelta(minutes=args.timeout)) as ranks:
        gallery = _build(args, ranks, collection, device)
    if ranks.is_main:
        info = summary(gallery)
        print(json.dumps(info, indent=1) if args.json else format_summary(info))
    return gallery

"""``hat data``: write datasets in Karpathy layout, read as is by ``hat train`` / ``hat eval``."""

from __future__ import annotations

import argparse
from pathlib import Path

from hat.data.synthetic import write_synthetic_dataset


def _synthetic(args: argparse.Namespace) -> None:
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    path = write_synthetic_dataset(args.out, sizes, args.image_size, args.seed)
    print(f"wrote {path} and {args.out}/images ({sum(sizes.values())} images)")


def _tuxpaint(argv: list[str]) -> None:
    from hat.demo_build import tuxpaint_scenes as tps

    parser = argparse.ArgumentParser(
        prog="hat data tuxpaint",
        description="Build the Tux Paint Scenes dataset (Karpathy format) from Debian "
        f"{tps.PACKAGE}.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, default=tps.DEFAULT_CACHE, help="where the .deb is kept"
    )
    parser.add_argument("--stamps-root", type=Path, help="an already unpacked stamps folder")
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    for split, default in tps.DEFAULT_SIZES.items():
        parser.add_argument(f"--{split.replace('_', '-')}", type=int, default=default, dest=split)
    parser.add_argument("--gallery", type=Path, help="also write a small test gallery here")
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in tps.DEFAULT_SIZES}
    tps.build_dataset(
        args.out,
        args.seed,
        args.cache,
        args.stamps_root,
        args.heldout_fraction,
        sizes,
        args.gallery,
    )


def _objects(argv: list[str]) -> None:
    from hat.demo_build import objects

    parser = argparse.ArgumentParser(prog="hat data objects", description=objects.__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--cache", type=Path, default=objects.DEFAULT_CACHE, help="unpacked packages"
    )
    parser.add_argument("--views", type=int, default=2, help="training views per object")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gallery", type=Path, help="also add the GCompris photos to this demo gallery folder"
    )
    args = parser.parse_args(argv)
    objects.build_dataset(args.out, args.cache, args.views, args.seed, args.gallery)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hat data", description=__doc__)
    sub = parser.add_subparsers(dest="dataset", required=True)
    syn = sub.add_parser(
        "synthetic", help="coloured shapes with 5 captions each (tests, smoke runs)"
    )
    syn.add_argument("--out", required=True)
    syn.add_argument("--train", type=int, default=200)
    syn.add_argument("--val", type=int, default=40)
    syn.add_argument("--test", type=int, default=40)
    syn.add_argument("--image-size", type=int, default=64)
    syn.add_argument("--seed", type=int, default=0)
    sub.add_parser(
        "tuxpaint", help="Tux Paint Scenes (see hat data tuxpaint --help)", add_help=False
    )
    sub.add_parser(
        "objects",
        help="named objects to train on and real photos to evaluate on (hat data objects --help)",
        add_help=False,
    )
    args, rest = parser.parse_known_args(argv)
    if args.dataset == "tuxpaint":
        _tuxpaint(rest)
    elif args.dataset == "objects":
        _objects(rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        _synthetic(args)

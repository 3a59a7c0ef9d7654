"""``hat data``: write datasets in Karpathy layout, read as is by ``hat train`` / ``hat eval``."""

from __future__ import annotations

import argparse

from hat.data.synthetic import write_synthetic_dataset


def _synthetic(args: argparse.Namespace) -> None:
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    path = write_synthetic_dataset(args.out, sizes, args.image_size, args.seed)
    print(f"wrote {path} and {args.out}/images ({sum(sizes.values())} images)")


def _delegate(dataset: str, argv: list[str]) -> None:
    if dataset == "tuxpaint":
        from hat.data import tuxpaint_scenes

        tuxpaint_scenes.main(argv)
    else:
        from hat.data import objects

        objects.main(argv)


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
    if args.dataset in ("tuxpaint", "objects"):
        _delegate(args.dataset, rest)
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    else:
        _synthetic(args)

"""``hat train``: train a model with the reference recipe (:mod:`hat.train`)."""

from __future__ import annotations

import argparse

from hat import train
from hat.distributed import process_group
from hat.runtime import default_device
from hat.train import TrainingRun


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hat train", description=train.__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("--model", default="hat-b", help="preset name (hat-b, hat-tiny) or a config JSON path")
    add("--data", required=True, help="Karpathy-split JSON (dataset_flickr30k.json, ...)")
    add("--image-root", required=True, help="folder the JSON's image paths start from")
    add("--out", required=True, help="run folder")
    add("--train-split", default="train")
    add("--val-split", default="val", help="'' to skip validation")
    add("--restval", action="store_true", help="add MSCOCO's restval images to train")
    add("--pretrained-image", help="'hub' (timm, by name) or a local weights file")
    add("--pretrained-text", help="'hub' (HF, by name) or a local HF model folder")
    add("--tokenizer", help="tokenizer folder or name (default: the text backbone's)")
    add("--epochs", type=int, default=30)
    add("--batch-size", type=int, default=58, help="per process")
    add("--lr", type=float, default=1e-4)
    add("--lr-step", type=int, default=10, help="StepLR step in epochs")
    add("--lr-gamma", type=float, default=0.1)
    add("--freeze-epochs", type=int, default=10, help="epochs with frozen backbones")
    add("--workers", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--device", default=default_device(), choices=["cpu", "cuda"])
    add("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    add("--skip-bad", action="store_true", help="skip unreadable images and count them")
    add("--resume", help="a run's last/ folder to continue from")
    add("--log-every", type=int, default=20)
    add("--max-steps-per-epoch", type=int, default=0, help="cap steps per epoch (smoke runs)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with process_group(args.device) as dist_info:
        return TrainingRun(args, dist_info).run()

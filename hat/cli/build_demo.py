"""``hat build-demo``: rebuild the offline demo checkpoint and its reports.

The recipe: :mod:`hat.demo_build.recipe`.
"""

from __future__ import annotations

import argparse

from hat.demo_build import recipe


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hat build-demo", description=recipe.__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default="hat-tuxpaint")
    parser.add_argument("--data", default="data/tuxpaint", help="Tux Paint Scenes folder")
    parser.add_argument(
        "--objects", default="data/objects", help="object and real-photo sets (hat data objects)"
    )
    parser.add_argument("--work", default="data/demo-work", help="feature cache and logs")
    parser.add_argument("--out", default="checkpoints/hat-tuxpaint")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--eval-images", type=int, default=500, help="images per report split")
    parser.add_argument("--val-images", type=int, default=100, help="images for model selection")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--ablation-epochs",
        type=int,
        default=3,
        help="epochs of each training-data ablation (0: none)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--head-epochs", type=int, default=8, help="global head alone, after")
    parser.add_argument("--head-batch-size", type=int, default=128)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return recipe.run(parser.parse_args(argv))

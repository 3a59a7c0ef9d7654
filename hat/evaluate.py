"""Evaluate a HAT checkpoint: exact full-matrix scoring, R@1/5/10 both ways, RSUM, ranks, and
how much of the exact top-10 a search's first stage keeps among its K candidates.

hat eval --checkpoint runs/x/best --data dataset_flickr30k.json --image-root flickr30k-images
hat eval ... --data dataset_coco.json --split test --folds 5      # MSCOCO 5K and 1K (5 folds)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hat.data.captions import CaptionedImages, karpathy_groups, read_karpathy
from hat.encode import first_stage_matrix, score_matrix
from hat.encoder import Encoder
from hat.fetch import resolve_or_exit
from hat.metrics import candidate_recall, fold_metrics, format_table, retrieval_metrics
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.runtime import default_device

FIRST_STAGE_RECALL = "first-stage recall of top-10"


@dataclass
class Evaluation:
    """What :func:`evaluate` measures, by kind; :meth:`table` lays it out as reports store it."""

    name: str
    """The headline's row name, ``all <images>``."""
    headline: dict[str, float]
    """The whole split, all levels summed: what model selection and summaries read."""
    folds: dict[str, dict[str, float]] = field(default_factory=dict)
    """``<k>-fold <images>``: the average over image folds (empty with one fold)."""
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """``<group> (<images>)``: the queries of each group, searched against the whole split."""
    levels: dict[str, dict[str, float]] = field(default_factory=dict)
    """``level <i> (<name>)``: each level alone (empty for a one-level model)."""
    first_stage_recall: dict[str, float] = field(default_factory=dict)
    """Share of the exact top-10 among the first stage's K candidates, ``t2i_K=..``/``i2t_K=..``."""

    def table(self) -> dict[str, dict[str, float]]:
        """Every result by row name, the headline first (``hat eval --out``, the demo reports)."""
        return {
            self.name: self.headline,
            **self.folds,
            **self.groups,
            **self.levels,
            FIRST_STAGE_RECALL: self.first_stage_recall,
        }


def evaluate(
    encoder: Encoder,
    data: CaptionedImages,
    folds: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """Metrics of the whole split, of each level alone and, with ``folds > 1``, the fold average;
    ``groups`` as in :func:`evaluate_features`."""
    images = encoder.encode_images(data.image_paths, batch_size, num_workers, progress=progress)
    texts = encoder.encode_captions(data.captions, progress=progress)
    return evaluate_features(
        encoder.model, images, texts, data.caption_to_image, folds, progress, groups
    )


def evaluate_features(
    model: HATModel,
    images: ImageFeatures,
    texts: TextFeatures,
    caption_to_image: np.ndarray,
    folds: int = 1,
    progress: bool = False,
    groups: dict[str, np.ndarray] | None = None,
) -> Evaluation:
    """:func:`evaluate` on already encoded features; ``groups``: name -> image mask, whose
    images' queries are also reported alone (searched against the whole split)."""
    per_level = score_matrix(model, images, texts, progress=progress).numpy()
    sims = per_level.sum(axis=0)
    n = images.levels[0].shape[0]
    result = Evaluation(f"all {n}", retrieval_metrics(sims, caption_to_image))
    if folds > 1:
        result.folds[f"{folds}-fold {n // folds}"] = fold_metrics(sims, caption_to_image, folds)
    for name, mask in (groups or {}).items():
        metrics = retrieval_metrics(sims, caption_to_image, mask)
        result.groups[f"{name} ({int(np.sum(mask))})"] = metrics
    if len(per_level) > 1:
        for i, name in enumerate(model.config.level_names):
            result.levels[f"level {i} ({name})"] = retrieval_metrics(per_level[i], caption_to_image)
    first = first_stage_matrix(model, images, texts).numpy()
    recall = {f"t2i_{k}": v for k, v in candidate_recall(sims.T, first.T).items()}
    recall.update({f"i2t_{k}": v for k, v in candidate_recall(sims, first).items()})
    result.first_stage_recall = recall
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hat eval", description=__doc__)
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


if __name__ == "__main__":
    main()

"""Retrieval quality of the engine on a captioned split: first-stage candidate recall, and R@K of
exact scoring from features stored at each precision (fp32 is the reference); with
``--pointing``, the pointing game of the alignment maps from each precision's features (the
split must carry groundings, as Tux Paint Scenes does).

Candidate recall = the fraction of the exact top-10 (full HAT score over the whole split) that the
first stage puts in its top-K: the re-ranked two-stage top-10 equals the exact one when it is 1.
Text → image searches the images, image → text the caption bank. The split is encoded once at
fp32; the other precisions are that gallery's features stored and read back through the codecs a
gallery uses (``pq`` trained as a segment writer trains it: on the first
``PQ_TRAINING_VECTORS`` regions; its caption tokens stay int8).

    nice -n 10 python benchmarks/retrieval_quality.py --checkpoint checkpoints/hat-tuxpaint \\
        --data dataset_tuxpaint_scenes.json --image-root images --split test [--captions 1]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from common import write_report

from hat.encode import score_matrix
from hat.encoder import Encoder
from hat.gallery import BuildSettings, build_gallery, karpathy_collection
from hat.gallery.codecs import PQ_TRAINING_VECTORS, kind_precision, new_codec
from hat.metrics import candidate_recall, retrieval_metrics
from hat.model import ImageFeatures, TextFeatures

TOP = 10
CANDIDATES = (10, 20, 50, 100, 200)


def first_captions(caption_image: np.ndarray, per_image: int) -> np.ndarray:
    """Ids of the first ``per_image`` captions of every image (a gallery groups them by image)."""
    rank = np.arange(len(caption_image)) - np.searchsorted(caption_image, caption_image)
    return np.flatnonzero(rank < per_image)


def stored(levels: list[torch.Tensor], precision: str) -> list[torch.Tensor]:
    """``levels`` as a gallery of ``precision`` gives them back."""
    out = []
    for x in levels:
        codec = new_codec(precision, x.shape[-1])
        if codec.needs_training:
            codec.train(codec.training_vectors(x)[:PQ_TRAINING_VECTORS])
        out.append(codec.decode(*codec.encode(x)))
    return out


def pointing(encoder: Encoder, args, images: ImageFeatures, texts: TextFeatures) -> dict:
    from hat.pointing import pointing_game, split_entries

    entries = split_entries(args.data, args.split)
    game = pointing_game(encoder, entries, args.image_root, images, texts)
    return {"words": game["words"], "levels": {k: round(v, 4) for k, v in game["levels"].items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="Karpathy-split JSON")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--captions", type=int, default=5, help="captions per image to use")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "int8", "pq"])
    parser.add_argument("--pointing", action="store_true", help="pointing game per precision")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    encoder = Encoder.from_pretrained(args.checkpoint)
    model = encoder.model
    collection = karpathy_collection(args.data, args.image_root, args.split)
    with tempfile.TemporaryDirectory(prefix="hat-quality-") as cache:
        gallery = build_gallery(
            args.checkpoint,
            collection,
            cache,
            BuildSettings("fp32"),
            encoder=encoder,
        )
        ids = first_captions(gallery.caption_image, args.captions)
        owners = gallery.caption_image[ids]
        images = gallery.image_features(range(gallery.num_images))
        texts = gallery.text_features(ids)
        all_texts = gallery.text_features(range(gallery.num_captions)) if args.pointing else None
        image_vectors = gallery.embeddings("image")
        text_vectors = gallery.embeddings("text")[ids]
    report: dict = {
        "checkpoint": args.checkpoint,
        "split": args.split,
        "images": gallery.num_images,
        "captions": len(ids),
        "precisions": {},
    }
    sims = {}
    for precision in args.precisions:
        text_precision = kind_precision(precision, "text")
        with torch.inference_mode():
            quantized_images = ImageFeatures(stored(images.levels, precision))
            quantized_texts = TextFeatures(stored(texts.levels, text_precision), texts.mask)
            sims[precision] = score_matrix(model, quantized_images, quantized_texts).sum(0).numpy()
        metrics = retrieval_metrics(sims[precision], owners)
        reference = report["precisions"].get(args.precisions[0], {}).get("metrics", metrics)
        report["precisions"][precision] = {
            "metrics": metrics,
            "change_vs_" + args.precisions[0]: {
                k: round(metrics[k] - reference[k], 2) for k in ("i2t_r1", "t2i_r1", "rsum")
            },
        }
        if args.pointing:
            every_text = TextFeatures(stored(all_texts.levels, text_precision), all_texts.mask)
            game = pointing(encoder, args, quantized_images, every_text)
            report["precisions"][precision]["pointing_game"] = game
        print(f"{precision}: {report['precisions'][precision]}", flush=True)
    chosen = sims[args.precisions[-1]]
    first_stage = image_vectors @ text_vectors.T  # what IndexFlatIP ranks by
    report["candidate_recall_of_exact_top10"] = {
        "text_to_image": candidate_recall(chosen.T, first_stage.T, CANDIDATES, TOP),
        "image_to_text": candidate_recall(chosen, first_stage, CANDIDATES, TOP),
    }
    report["first_stage_alone_metrics"] = retrieval_metrics(first_stage, owners)
    print(f"candidate recall: {report['candidate_recall_of_exact_top10']}")
    print(f"first stage alone: {report['first_stage_alone_metrics']}")
    write_report("retrieval_quality", report, args.out)
    return report


if __name__ == "__main__":
    main()

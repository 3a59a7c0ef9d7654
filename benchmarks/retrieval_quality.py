"""Retrieval quality of the engine on a captioned split: first-stage candidate recall, and R@K
of exact scoring from features stored at each precision (fp32 is the reference).

Candidate recall = the fraction of the exact top-10 (full HAT score over the whole gallery) that
the first stage puts in its top-K; the re-ranked two-stage top-10 equals the exact one exactly
when recall is 1. Both directions: text → image against the images, image → text against the
caption bank.

    nice -n 10 python benchmarks/retrieval_quality.py --checkpoint runs/x/best \\
        --data dataset.json --image-root images --split test
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import write_report

from hat.encode import score_matrix
from hat.factory import load_model
from hat.gallery import (
    PRECISIONS,
    BuildSettings,
    Gallery,
    build_gallery,
    karpathy_collection,
    search_index,
)
from hat.metrics import retrieval_metrics

TOP = 10
CANDIDATES = [10, 20, 50, 100, 200]


def candidate_recall(exact: np.ndarray, index, queries: np.ndarray) -> dict[str, float]:
    """Mean fraction of each query's exact top-10 (rows of ``exact``) in the first-stage top-K."""
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :TOP]
    out = {}
    for k in CANDIDATES:
        if k > exact.shape[1]:
            break
        found = search_index(index, queries, k)
        hits = [len(set(t) & set(f)) / TOP for t, f in zip(truth, found, strict=True)]
        out[f"K={k}"] = round(float(np.mean(hits)), 4)
    return out


def exact_scores(model, gallery: Gallery) -> np.ndarray:
    """Full score matrix ``(images, captions)`` from the gallery's stored features."""
    images = gallery.image_features(range(gallery.num_images))
    texts = gallery.text_features(range(gallery.num_captions))
    return score_matrix(model, images, texts).sum(0).numpy()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="Karpathy-split JSON")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cache", help="gallery cache (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.checkpoint)
    collection = karpathy_collection(args.data, args.image_root, args.split)
    cache = Path(args.cache or tempfile.mkdtemp(prefix="hat-quality-"))
    report: dict = {"checkpoint": args.checkpoint, "split": args.split, "precisions": {}}
    reference = None
    for precision in PRECISIONS:  # fp32 first: the reference
        gallery = build_gallery(
            args.checkpoint,
            collection,
            cache,
            BuildSettings(precision),
            model=model,
            tokenizer=tokenizer,
        )
        with torch.inference_mode():
            sims = exact_scores(model, gallery)
        metrics = retrieval_metrics(sims, gallery.caption_image)
        reference = reference or metrics
        entry = {
            "bytes_per_image": round(gallery.bytes_per_image()),
            "metrics": metrics,
            "r1_change_vs_fp32": {
                k: round(metrics[k] - reference[k], 2) for k in ("i2t_r1", "t2i_r1", "rsum")
            },
        }
        report["precisions"][precision] = entry
        print(f"{precision}: {entry}")
        if precision == "int8":
            report["images"], report["captions"] = gallery.num_images, gallery.num_captions
            report["candidate_recall_of_exact_top10"] = {
                "text_to_image": candidate_recall(
                    sims.T, gallery.image_index, gallery.embeddings("text")
                ),
                "image_to_text": candidate_recall(
                    sims, gallery.text_index, gallery.embeddings("image")
                ),
            }
            pooled = gallery.embeddings("image") @ gallery.embeddings("text").T
            report["first_stage_alone_metrics"] = retrieval_metrics(pooled, gallery.caption_image)
            print(f"candidate recall: {report['candidate_recall_of_exact_top10']}")
            print(f"first stage alone: {report['first_stage_alone_metrics']}")
    write_report("retrieval_quality", report, args.out)
    return report


if __name__ == "__main__":
    main()

"""What checking stored rows costs a query: the candidates' reads with and without their digests.

A text → image query gathers its K candidates' region features (every level); an image → text
query the tokens of K captions. Each read is timed checked (every row's xxh3 digest compared,
as the app and ``hat search`` do) and unchecked, alternating in one run, on a synthetic gallery
of the demo shapes (3 levels x 256 regions x 256 dims, int8) written through the real storage
code; whole text → image queries give the scale. Also timed: checking every byte of the gallery
(``Gallery.verify``, what the app runs in the background after start-up).

    nice -n 10 python benchmarks/row_checks.py [--images 2000] [--candidates 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import interleaved, save_demo_architecture_model, stats_ms, write_report
from query_latency import queries

from hat.fileio import atomic_directory
from hat.gallery import (
    BuildSettings,
    Collection,
    ImageEntry,
    SegmentWriter,
    checkpoint_fingerprint,
    gallery_header,
    open_gallery,
    write_gallery,
)
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.search import Searcher

CAPTIONS_PER_IMAGE = 5
TOKENS = 14  # word pieces of a typical caption


def synthetic_encoder(model: HATModel, shapes: list[tuple[int, int]], seed: int = 0):
    """An ``encode`` for write_gallery storing random features (images and their captions)."""
    g = torch.Generator().manual_seed(seed)
    dim = shapes[0][1]

    def encode(entries: list[ImageEntry], directory: Path) -> list[int]:
        lengths = np.full(len(entries) * CAPTIONS_PER_IMAGE, TOKENS, dtype=np.int64)
        writer = SegmentWriter(
            directory,
            "int8",
            len(entries),
            shapes,
            lengths,
            model.first_stage_dim,
            gate=model.stored_gate,
        )
        with torch.inference_mode():
            for start in range(0, len(entries), 64):
                rows = np.arange(start, min(start + 64, len(entries)))
                levels = [torch.randn(len(rows), regions, d, generator=g) for regions, d in shapes]
                features = ImageFeatures(levels)
                writer.put_images(rows, features, model.image_embedding(features))
            for start in range(0, len(lengths), 256):
                count = min(256, len(lengths) - start)
                mask = torch.ones(count, TOKENS, dtype=torch.bool)
                levels = [torch.randn(count, TOKENS, dim, generator=g) for _ in shapes]
                texts = TextFeatures(levels, mask)
                writer.put_texts(start, texts, model.text_embedding(texts))
        writer.close()
        return list(range(len(entries)))

    return encode


def synthetic_gallery(directory: Path, checkpoint: Path, size: int) -> Path:
    model = HATModel.from_pretrained(checkpoint)
    captions = tuple(f"caption {i}" for i in range(CAPTIONS_PER_IMAGE))
    entries = [ImageEntry(f"synthetic/{i:06d}.jpg", 0, 0, captions) for i in range(size)]
    collection = Collection(directory, entries, {"kind": "synthetic", "size": str(size)})
    config = model.config
    header = gallery_header(
        "synthetic",
        checkpoint,
        checkpoint_fingerprint(checkpoint),
        BuildSettings(),
        collection,
        config,
    )
    shapes = [(16 * 16, config.embed_dim)] * config.num_levels  # ViT-S/14 at 224 px
    target = directory / f"gallery-{size}"
    with atomic_directory(target) as staging:
        write_gallery(staging, collection, {}, synthetic_encoder(model, shapes), header, {})
    return target


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", help="demo checkpoint (default: its architecture, random)")
    parser.add_argument("--work", help="folder for the synthetic gallery (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.work or tempfile.mkdtemp(prefix="hat-row-checks-"))
    checkpoint = save_demo_architecture_model(work / "checkpoint", args.checkpoint)
    directory = synthetic_gallery(work, checkpoint, args.images)
    gallery = open_gallery(directory)
    rng = np.random.default_rng(0)
    k = min(args.candidates, gallery.num_images)

    def candidates(total: int) -> np.ndarray:  # sorted, as the first stage hands them over
        return np.sort(rng.choice(total, k, replace=False))

    def read(kind: str, checked: bool):
        def run():
            gallery.checked = checked
            if kind == "image":
                gallery.image_features(candidates(gallery.num_images))
            else:
                gallery.text_features(candidates(gallery.num_captions))

        return run

    report: dict = {"images": gallery.num_images, "captions": gallery.num_captions, "k": k}
    for kind in ("image", "text"):
        read(kind, True)()  # warm-up: page cache
        times = interleaved(
            {"checked": read(kind, True), "unchecked": read(kind, False)}, args.repeats
        )
        entry = {name: stats_ms(values) for name, values in times.items()}
        cost = np.median(np.subtract(times["checked"], times["unchecked"])) * 1000
        entry["check_cost_p50_ms"] = round(float(cost), 3)
        report[f"{kind}_rows"] = entry
        print(
            f"{k} {kind} rows: read p50 {entry['unchecked']['p50_ms']} ms unchecked, "
            f"{entry['checked']['p50_ms']} ms checked: the check costs {cost:.2f} ms per query"
        )
    gallery.checked = True
    searcher = Searcher.open(directory)
    captions = queries(args.repeats)
    searcher.text_to_image(captions[0], candidates=k)  # warm-up
    query_s = [0.0] * len(captions)
    for i, caption in enumerate(captions):
        start = time.perf_counter()
        searcher.text_to_image(caption, candidates=k)
        query_s[i] = time.perf_counter() - start
    report["text_to_image_query"] = stats_ms(query_s)
    size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    start = time.perf_counter()
    gallery.verify()
    seconds = time.perf_counter() - start
    report["verify"] = {
        "bytes": size,
        "seconds": round(seconds, 3),
        "mb_per_s": round(size / seconds / 1e6),
    }
    print(
        f"whole text -> image query p50 {report['text_to_image_query']['p50_ms']} ms; "
        f"checking every byte ({size / 1e6:.0f} MB): {seconds:.2f} s"
    )
    write_report("row_checks", report, args.out)
    shutil.rmtree(directory)
    return report


if __name__ == "__main__":
    main()

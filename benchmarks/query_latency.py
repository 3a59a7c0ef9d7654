"""Benchmark 2: text → image query latency (p50/p95), exact vs two-stage, at 1k/10k/100k images.

Galleries above the demo size are synthetic: region features of the demo shapes (3 levels x 256
regions x 256 dims, stored int8 like a real build) written through the real storage code, so the
100k gallery really is ~20 GB on disk (more than this machine's RAM: candidate reads partly hit
the disk). Every query is the full ``Searcher.text_to_image`` call: tokenise and encode the
caption with the model, pool, first stage, gather the K candidates, exact HAT re-rank. Exact and
two-stage queries alternate in one run. The first stage is also timed alone (flat vs IVF, and
IVF's recall of the flat top-K); benchmarks/million_gallery.py measures it at a million images.

    nice -n 10 python benchmarks/query_latency.py [--sizes 1000 10000 100000] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import interleaved, save_demo_architecture_model, stats_ms, timed, write_report

from hat.fileio import atomic_directory
from hat.gallery import (
    BuildSettings,
    Collection,
    ImageEntry,
    SegmentWriter,
    build_index,
    checkpoint_fingerprint,
    gallery_header,
    search_index,
    write_gallery,
)
from hat.model import HATModel, ImageFeatures
from hat.runtime import keep_freed_memory
from hat.search import Searcher

COLOURS = ["red", "brown", "yellow", "green", "blue", "white", "black", "pink"]
THINGS = ["hen", "car", "cat", "house", "tree", "dog", "apple", "boat", "guitar", "star"]
RELATIONS = ["to the left of", "to the right of", "above", "below", "next to"]


def queries(count: int) -> list[str]:
    """Distinct captions, so that candidate sets (and the pages they read) differ per query."""
    out = []
    for i in range(count):
        colour, thing = COLOURS[i % len(COLOURS)], THINGS[(i // len(COLOURS)) % len(THINGS)]
        relation, other = RELATIONS[i % len(RELATIONS)], THINGS[(i * 7 + 3) % len(THINGS)]
        out.append(f"a {colour} {thing} {relation} a {other}")
    return out


@torch.inference_mode()
def query_vectors(searcher: Searcher, captions: list[str]) -> np.ndarray:
    texts = [searcher.encoder.encode_caption(c) for c in captions]
    return torch.cat([searcher.model.text_embedding(t) for t in texts]).float().numpy()


POOL = 256  # distinct synthetic images; every gallery row is one of them plus its own offset


def synthetic_encoder(model: HATModel, shapes: list[tuple[int, int]], precision: str, seed=0):
    """An ``encode`` for write_gallery that stores synthetic features instead of running the
    towers (the model's global head still makes the first-stage vectors)."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randn(POOL, regions, dim, generator=g) for regions, dim in shapes]

    def encode(entries: list[ImageEntry], directory: Path) -> list[int]:
        no_captions = np.zeros(0, np.int64)
        writer = SegmentWriter(
            directory, precision, len(entries), shapes, no_captions, model.first_stage_dim
        )
        for start in range(0, len(entries), POOL):
            rows = np.arange(start, min(start + POOL, len(entries)))
            offset = torch.randn(len(rows), 1, shapes[0][1], generator=g)
            levels = [x[: len(rows)] + offset for x in pool]
            features = ImageFeatures(levels)
            with torch.inference_mode():
                writer.put_images(rows, features, model.image_embedding(features))
        writer.close()
        return list(range(len(entries)))

    return encode


def synthetic_gallery(directory: Path, checkpoint: Path, size: int) -> Path:
    model = HATModel.from_pretrained(checkpoint)
    config = model.config
    entries = [ImageEntry(f"synthetic/{i:06d}.jpg", 0, 0) for i in range(size)]
    collection = Collection(directory, entries, {"kind": "synthetic", "size": str(size)})
    settings = BuildSettings()
    model_key = checkpoint_fingerprint(checkpoint)
    header = gallery_header("synthetic", checkpoint, model_key, settings, collection, config)
    shapes = [(16 * 16, config.embed_dim)] * config.num_levels  # ViT-S/14 at 224 px
    target = directory / f"gallery-{size}"
    with atomic_directory(target) as staging:
        write_gallery(staging, collection, {}, synthetic_encoder(model, shapes, "int8"), header, {})
    return target


def first_stage(embeddings: np.ndarray, queries: np.ndarray, k: int) -> dict:
    """Flat vs IVF search time per query (one thread), and IVF's recall of the flat top-k."""
    faiss.omp_set_num_threads(1)
    flat = build_index(embeddings, flat_max=len(embeddings))
    start = time.perf_counter()
    ivf = build_index(embeddings, flat_max=0)
    build_s = time.perf_counter() - start
    times = interleaved(
        {
            "flat": lambda q=queries[:1]: search_index(flat, q, k),
            "ivf": lambda q=queries[:1]: search_index(ivf, q, k),
        },
        20,
    )
    truth, got = search_index(flat, queries, k), search_index(ivf, queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(truth, got, strict=True)])
    return {
        "flat": stats_ms(times["flat"]),
        "ivf": stats_ms(times["ivf"]),
        "ivf_build_s": round(build_s, 1),
        "ivf_recall_of_flat_topk": round(float(recall), 4),
    }


def measure(searcher: Searcher, captions: list[str], candidates: int, exact_every: int) -> dict:
    """Two-stage latency of every caption; every ``exact_every``-th one also exactly, in turn."""
    for caption in captions[-3:]:  # warm-up: page cache, faiss index, allocator
        searcher.text_to_image(caption, candidates=candidates)
    times: dict[str, list[float]] = {"two_stage": [], "exact": []}
    parts: dict[str, list[float]] = {"encode": [], "candidates": [], "rerank": []}
    for i, caption in enumerate(captions):
        start = time.perf_counter()
        result = searcher.text_to_image(caption, candidates=candidates)
        times["two_stage"].append(time.perf_counter() - start)
        for name, values in parts.items():
            values.append(result.seconds[name])
        if exact_every and i % exact_every == 0:
            times["exact"].append(timed(lambda c=caption: searcher.text_to_image(c, exact=True)))
    run = {
        "two_stage": stats_ms(times["two_stage"]),
        "two_stage_parts_p50_ms": {
            k: round(1000 * float(np.median(v)), 2) for k, v in parts.items()
        },
    }
    if times["exact"]:
        run["exact"] = stats_ms(times["exact"])
        run["exact_over_two_stage_p50"] = round(
            run["exact"]["p50_ms"] / run["two_stage"]["p50_ms"], 1
        )
    return run


def main(argv: list[str] | None = None) -> dict:
    keep_freed_memory()  # as the hat command and app.py do: queries reuse freed memory
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--checkpoint", help="demo checkpoint (default: its architecture, random)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--queries", type=int, default=40, help="two-stage queries per size")
    parser.add_argument("--exact-max", type=int, default=10000, help="largest size run exactly")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", help="folder for the synthetic galleries (default: a temp dir)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="hat-latency-"))
    checkpoint = save_demo_architecture_model(work / "checkpoint", args.checkpoint)
    report: dict = {"candidates": args.candidates, "sizes": []}
    for size in args.sizes:
        start = time.perf_counter()
        directory = synthetic_gallery(work, checkpoint, size)
        searcher = Searcher.open(directory)
        gallery = searcher.gallery
        entry = {
            "images": size,
            "index": type(gallery.image_index).__name__,
            "build_s": round(time.perf_counter() - start, 1),
            "bytes_per_image": round(gallery.bytes_per_image()),
            "runs": [],
        }
        captions = queries(args.queries)
        exact_every = max(1, args.queries // 8) if size <= args.exact_max else 0
        for threads in args.threads:
            torch.set_num_threads(threads)
            run = measure(searcher, captions, args.candidates, exact_every)
            entry["runs"].append({"threads": threads, **run})
            exact = run.get("exact", {}).get("p50_ms", "not run")
            print(
                f"{size:>7} images, {threads} thread(s): two-stage p50 "
                f"{run['two_stage']['p50_ms']} ms p95 {run['two_stage']['p95_ms']} ms "
                f"(parts {run['two_stage_parts_p50_ms']}); exact p50 {exact} ms"
            )
        vectors = query_vectors(searcher, captions)
        entry["first_stage"] = first_stage(gallery.embeddings("image"), vectors, args.candidates)
        print(f"{size:>7} images: first stage {entry['first_stage']}")
        report["sizes"].append(entry)
        shutil.rmtree(directory)
    if not args.work:
        shutil.rmtree(work)
    write_report("query_latency", report, args.out)
    return report


if __name__ == "__main__":
    main()

"""Benchmark 2: text → image query latency (p50/p95), exact vs two-stage, at 1k/10k/100k images.

Galleries above the demo size are synthetic: region features of the model's shapes (the demo
architecture: 3 levels x 256 regions x 256 dims; ``--checkpoint checkpoints/hat-tuxpaint`` adds
its concept level of 49 regions), stored int8 like a real build, or at ``--precisions``, written
through the real storage code, so the 100k gallery really is ~20 GB on disk (more than this
machine's RAM: candidate reads partly hit the disk). Every query is the full
``Searcher.text_to_image`` call: tokenise and encode the caption with the model, pool, first
stage, gather the K candidates, exact HAT re-rank. Exact and two-stage queries alternate in
one run. The first stage is also timed alone (flat vs IVF, and IVF's recall of the flat top-K);
benchmarks/million_gallery.py measures it at a million images.

The re-rank alone is timed on each query's candidates, interleaved, and the scores compared:
as search does it (stored norms; int8 multiplied in integers, other values decoded a cache-sized
block at a time while scored; image → text attention in the fused kernel of hat/native.py where
a C compiler built it) and, unless ``--no-old-path``, the paths before it, all scored in
PyTorch: as search does it ("eager"), without the stored concept gates (each candidate's taken
from its regions per query; gated models only), without the stored norms (every block widened to
fp32 and its norms taken per query) and every candidate decoded to fp32 first. Its rate
(pairs/s) is set against the scorer's own on fp32 features of the same shapes (96 x 96 pairs, as
benchmarks/exact_scoring.py; fused and all in PyTorch) and the FLOP bound at the fp32 GEMM rate,
all measured in the same run.

``--gallery SPEC`` also times both directions as the app's server does (``Searcher``: encode,
first stage, re-rank; the status line's time) on a real gallery built with the checkpoint (the
app's built-in one: ``assets/gallery``): text → image with the re-rank as search does it and,
interleaved, without the stored norms; image → text with gallery images as queries, and,
interleaved, all in PyTorch (``native.eager``: padded caption blocks, rows hashed in Python), and
how encoding the query image splits between the image tower and the concept level's teacher.

    nice -n 10 python benchmarks/query_latency.py [--sizes 1000 10000 100000] [--checkpoint DIR]
    nice -n 10 python benchmarks/query_latency.py --sizes 1000 --precisions fp32 fp16 int8 pq
    python benchmarks/query_latency.py --checkpoint checkpoints/hat-tuxpaint --sizes \
        --gallery assets/gallery --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch
from common import (
    gemm_peak_flops,
    interleaved,
    save_demo_architecture_model,
    stats_ms,
    timed,
    write_report,
)
from exact_scoring import features, matmul_flops

from hat import native
from hat.data.images import load_image
from hat.fileio import atomic_directory
from hat.gallery import (
    PRECISIONS,
    BuildSettings,
    Collection,
    ImageEntry,
    SegmentWriter,
    build_index,
    checkpoint_fingerprint,
    default_cache_dir,
    gallery_header,
    search_index,
    write_gallery,
)
from hat.model import HATModel, ImageFeatures, TextFeatures
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
            directory,
            precision,
            len(entries),
            shapes,
            no_captions,
            model.first_stage_dim,
            gate=model.stored_gate,
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


def synthetic_gallery(
    directory: Path, checkpoint: Path, size: int, precision: str = "int8"
) -> Path:
    model = HATModel.from_pretrained(checkpoint)
    config = model.config
    entries = [ImageEntry(f"synthetic/{i:06d}.jpg", 0, 0) for i in range(size)]
    collection = Collection(directory, entries, {"kind": "synthetic", "size": str(size)})
    settings = BuildSettings(precision)
    model_key = checkpoint_fingerprint(checkpoint)
    header = gallery_header("synthetic", checkpoint, model_key, settings, collection, config)
    shapes = [(h * w, config.embed_dim) for h, w in model.grid_sizes(config.image_size)]
    target = directory / f"gallery-{size}-{precision}"
    encode = synthetic_encoder(model, shapes, precision)
    with atomic_directory(target) as staging:
        write_gallery(staging, collection, {}, encode, header, {})
    return target


def rerank_as(
    searcher: Searcher,
    ids: np.ndarray,
    text: TextFeatures,
    earlier: Callable[[ImageFeatures], ImageFeatures],
) -> torch.Tensor:
    """The re-rank of candidates ``ids`` with each segment's part as ``earlier`` makes it of
    the part search scores, all in PyTorch: an earlier path, for comparison;
    ``(levels, len(ids))``."""
    out = torch.empty(searcher.gallery.num_levels, len(ids))
    with native.eager():
        for positions, part in searcher.gallery.image_parts(ids):
            scores = searcher.model.level_scores(earlier(part), text)[:, :, 0]
            out[:, torch.from_numpy(positions)] = scores
    return out


def decoded_first(part: ImageFeatures) -> ImageFeatures:
    """The re-rank before fused decoding: every candidate's levels decoded to fp32 at once
    (pq's stay coordinates), then scored."""
    levels = ImageFeatures(part.levels, scales=part.scales).expanded().levels
    return ImageFeatures(levels, part.bases)


def widened(part: ImageFeatures) -> ImageFeatures:
    """The re-rank before stored norms: the candidates as stored, widened to fp32 a block at a
    time and their norms taken per query (a pq gallery stores none: its codes as search takes
    them)."""
    return ImageFeatures(part.levels, part.bases, part.scales)


def gate_per_query(part: ImageFeatures) -> ImageFeatures:
    """The re-rank before stored gates: as search does it, but each candidate's concept gate
    taken from its regions per query."""
    return replace(part, gates=None)


def scorer_rate(searcher: Searcher, pairs: int = 96) -> dict:
    """The model's scorer alone on ``pairs`` x ``pairs`` fp32 features of this gallery's shapes
    (captions of 8-20 words, as exact_scoring.py), its FLOP count, and the fp32 GEMM rate, at
    the current thread count: what the re-rank is measured against."""
    gallery = searcher.gallery
    regions, dim = gallery.regions(), gallery.manifest.dim
    _, texts, mask, lengths = features(pairs, pairs, len(regions), 1, dim)
    g = torch.Generator().manual_seed(1)
    images = ImageFeatures([torch.randn(pairs, r, dim, generator=g) for r in regions])
    text = TextFeatures(texts, mask)

    def score() -> None:
        searcher.model.level_scores(images, text)

    def eager() -> None:
        with native.eager():
            score()

    times = interleaved({"fused": score, "eager": eager}, 3)
    seconds, eager_s = min(times["fused"]), min(times["eager"])
    flops = sum(matmul_flops(pairs, r, dim, lengths, 1) for r in regions)
    peak = gemm_peak_flops()
    return {
        "pairs_per_s": round(pairs * pairs / seconds),
        "share_of_flop_bound": round(flops / seconds / peak, 3),
        "eager_pairs_per_s": round(pairs * pairs / eager_s),
        "eager_share_of_flop_bound": round(flops / eager_s / peak, 3),
        "gemm_gflops": round(peak / 1e9, 1),
    }


def rerank_paths(
    searcher: Searcher, captions: list[str], candidates: int, old_path: bool, scorer: dict
) -> dict:
    """Each query's first-stage candidates re-ranked as search does it and (``old_path``) the
    two ways before, interleaved; their scores must agree. Pairs/s against ``scorer``'s rate and
    the FLOP bound (exact_scoring.matmul_flops at its GEMM rate)."""
    gallery, model = searcher.gallery, searcher.model
    ways = {"fused": searcher.score_images}
    earlier = {"widened": widened, "decoded_first": decoded_first}
    if gallery.manifest.gated:
        earlier = {"gate_per_query": gate_per_query, **earlier}
    for name, earlier_part in earlier.items() if old_path else ():
        ways[name] = lambda ids, text, f=earlier_part: rerank_as(searcher, ids, text, f)
    if old_path and native.kernels() is not None:
        ways["eager"] = lambda ids, text: rerank_as(searcher, ids, text, lambda part: part)
    times: dict[str, list[float]] = {name: [] for name in ways}
    flops, pairs = 0, 0
    with torch.inference_mode():
        for caption in captions:
            text = searcher.encoder.encode_caption(caption)
            ids = search_index(gallery.image_index, model.text_embedding(text).numpy(), candidates)
            ids = np.sort(ids[0][ids[0] >= 0])
            scores = {}
            for name, way in ways.items():
                start = time.perf_counter()
                scores[name] = way(ids, text)
                times[name].append(time.perf_counter() - start)
            for name in ways:
                torch.testing.assert_close(scores["fused"], scores[name], atol=1e-5, rtol=0)
            lengths = [int(text.mask.sum())]
            dim = gallery.manifest.dim
            flops += sum(matmul_flops(len(ids), r, dim, lengths, 1) for r in gallery.regions())
            pairs += len(ids)
    out = {name: stats_ms(values) for name, values in times.items()}
    fused_s = sum(times["fused"])
    out["fused_pairs_per_s"] = round(pairs / fused_s)
    out["fused_share_of_scorer_rate"] = round(pairs / fused_s / scorer["pairs_per_s"], 3)
    out["fused_share_of_flop_bound"] = round(flops / fused_s / (scorer["gemm_gflops"] * 1e9), 3)
    for name in ways.keys() - {"fused"}:
        out[f"{name}_over_fused_p50"] = round(out[name]["p50_ms"] / out["fused"]["p50_ms"], 2)
    return out


class EarlierSearcher(Searcher):
    """Search with an earlier re-rank (:func:`rerank_as`), for comparison."""

    def __init__(self, searcher: Searcher, earlier: Callable[[ImageFeatures], ImageFeatures]):
        super().__init__(searcher.gallery, searcher.encoder)
        self.earlier = earlier

    def score_images(self, ids, text: TextFeatures) -> torch.Tensor:
        return rerank_as(self, np.asarray(ids), text, self.earlier)


def server_ms(result) -> float:
    """A search's time as the app's status line shows it: encode + first stage + re-rank."""
    return 1000 * sum(result.seconds.values())


def parts_p50(results: list) -> dict:
    return {
        name: round(float(np.median([1000 * r.seconds[name] for r in results])), 2)
        for name in results[0].seconds
    }


@torch.inference_mode()
def encode_split(searcher: Searcher, image) -> dict[str, float]:
    """Seconds to preprocess a query image, to run the image tower and head on it, and the
    concept level's teacher (which reads the same pixels), at the encoder's precision."""
    out = {}
    start = time.perf_counter()
    pixels = searcher.encoder.transform(load_image(image))[None]
    out["preprocess"] = time.perf_counter() - start
    model, context = searcher.encoder.encoding_model()
    with context:
        start = time.perf_counter()
        model.image_head(model.image_tower.backbone_levels(pixels))
        out["image_tower"] = time.perf_counter() - start
        if model.concepts is not None:
            start = time.perf_counter()
            model.concepts.image_level(pixels)
            out["concept_teacher"] = time.perf_counter() - start
    return out


def gallery_queries(searcher: Searcher, captions: list[str], images: int, k: int = 8) -> dict:
    """Both directions on a built gallery as the app's server times them (k = 8, the page's
    default): text → image as search does it and, interleaved, the earlier re-ranks in PyTorch
    (with the concept gates taken per query; also without the stored norms), with the scores
    compared; image → text with its first ``images`` images as queries."""
    searchers = {
        "new": searcher,
        "gate_per_query": EarlierSearcher(searcher, gate_per_query),
        "without_stored_norms": EarlierSearcher(searcher, widened),
    }
    for caption in captions[-3:]:  # warm-up
        for way in searchers.values():
            way.text_to_image(caption, k)
    t2i: dict[str, list] = {name: [] for name in searchers}
    for caption in captions:
        for name, way in searchers.items():
            t2i[name].append(way.text_to_image(caption, k))
        for name in searchers:
            for a, b in zip(t2i["new"][-1].hits, t2i[name][-1].hits, strict=True):
                assert abs(a.score - b.score) < 1e-5, (caption, a, b)
    out = {
        f"text_to_image_{name}": {
            **stats_ms([server_ms(r) / 1000 for r in results]),
            "parts_p50_ms": parts_p50(results),
        }
        for name, results in t2i.items()
    }
    paths = [
        searcher.gallery.image_path(i) for i in range(min(images, searcher.gallery.num_images))
    ]
    searcher.image_to_text(paths[0], k)  # warm-up
    i2t, eager, split = [], [], []
    for path in paths:
        i2t.append(searcher.image_to_text(path, k))
        with native.eager():  # the earlier path: padded caption blocks scored in PyTorch
            eager.append(searcher.image_to_text(path, k))
        for a, b in zip(i2t[-1].hits, eager[-1].hits, strict=True):
            assert abs(a.score - b.score) < 1e-5, (path, a, b)
        split.append(encode_split(searcher, path))
    out["image_to_text"] = {
        **stats_ms([server_ms(r) / 1000 for r in i2t]),
        "parts_p50_ms": parts_p50(i2t),
        "encode_split_p50_ms": {
            name: round(float(np.median([1000 * s[name] for s in split])), 2) for name in split[0]
        },
    }
    out["image_to_text_eager"] = {
        **stats_ms([server_ms(r) / 1000 for r in eager]),
        "parts_p50_ms": parts_p50(eager),
    }
    return out


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
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    parser.add_argument("--checkpoint", help="demo checkpoint (default: its architecture, random)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--queries", type=int, default=40, help="two-stage queries per size")
    parser.add_argument("--exact-max", type=int, default=10000, help="largest size run exactly")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precisions", nargs="+", default=["int8"], choices=PRECISIONS)
    parser.add_argument(
        "--no-old-path", dest="old_path", action="store_false", help="time the re-rank one way"
    )
    parser.add_argument("--work", help="folder for the synthetic galleries (default: a temp dir)")
    parser.add_argument("--gallery", help="also time both directions on this collection spec")
    parser.add_argument("--gallery-cache", help="its gallery cache (default: the app's)")
    parser.add_argument("--query-images", type=int, default=15, help="image → text queries")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="hat-latency-"))
    checkpoint = save_demo_architecture_model(work / "checkpoint", args.checkpoint)
    report: dict = {"candidates": args.candidates, "sizes": []}
    for size, precision in itertools.product(args.sizes, args.precisions):
        start = time.perf_counter()
        directory = synthetic_gallery(work, checkpoint, size, precision)
        searcher = Searcher.open(directory)
        gallery = searcher.gallery
        entry = {
            "images": size,
            "precision": precision,
            "index": type(gallery.image_index).__name__,
            "build_s": round(time.perf_counter() - start, 1),
            "bytes_per_image": round(gallery.bytes_per_image()),
            "runs": [],
        }
        captions = queries(args.queries)
        exact_every = max(1, args.queries // 8) if size <= args.exact_max else 0
        name = f"{size:>7} images {precision}"
        for threads in args.threads:
            torch.set_num_threads(threads)
            run = measure(searcher, captions, args.candidates, exact_every)
            scorer = scorer_rate(searcher)
            rerank = rerank_paths(searcher, captions, args.candidates, args.old_path, scorer)
            entry["runs"].append({"threads": threads, **run, "scorer": scorer, "rerank": rerank})
            exact = run.get("exact", {}).get("p50_ms", "not run")
            print(
                f"{name}, {threads} thread(s): two-stage p50 "
                f"{run['two_stage']['p50_ms']} ms p95 {run['two_stage']['p95_ms']} ms "
                f"(parts {run['two_stage_parts_p50_ms']}); exact p50 {exact} ms"
            )
            print(
                f"{name}, {threads} thread(s): re-rank {rerank}; scorer {scorer['pairs_per_s']} "
                f"pairs/s ({100 * scorer['share_of_flop_bound']:.0f} % of the FLOP bound), GEMM "
                f"{scorer['gemm_gflops']} GFLOP/s"
            )
        vectors = query_vectors(searcher, captions)
        entry["first_stage"] = first_stage(gallery.embeddings("image"), vectors, args.candidates)
        print(f"{name}: first stage {entry['first_stage']}")
        report["sizes"].append(entry)
        shutil.rmtree(directory)
    if args.gallery:
        searcher = Searcher.build(
            checkpoint, args.gallery, args.gallery_cache or default_cache_dir()
        )
        report["gallery"] = {
            "spec": args.gallery,
            "images": searcher.gallery.num_images,
            "captions": searcher.gallery.num_captions,
            "levels": searcher.gallery.num_levels,
            "runs": [],
        }
        for threads in args.threads:
            torch.set_num_threads(threads)
            run = gallery_queries(searcher, queries(args.queries), args.query_images)
            report["gallery"]["runs"].append({"threads": threads, **run})
            print(f"gallery {args.gallery}, {threads} thread(s): {run}")
    if not args.work:
        shutil.rmtree(work)
    write_report("query_latency", report, args.out)
    return report


if __name__ == "__main__":
    main()

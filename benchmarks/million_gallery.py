"""Benchmark: a gallery of a million images on one machine, with compact (``pq``) features.

The gallery is simulated around real encoded images, not i.i.d. noise:

1. ``--real`` (a collection spec, first ``--real-images``) is encoded with the checkpoint into a
   real ``pq`` gallery: the codebooks are trained on real features, as any build trains them.
2. ``--size`` images are synthesised from it: image i is a real image a whose regions inside a
   random rectangle (10–50 % of the image, the same place on every level's grid) come from
   another real image b; its first-stage vector lies between a's and b's (weighted by area) plus
   noise. Candidates, first-stage neighbourhoods and the pages a query reads so have the
   structure of real ones.
3. They are written through the real segment writer (codes, row digests), ``write_gallery``
   (items, manifest, file digests) and the first-stage index ``build_index`` chooses.

Printed and saved: disk bytes per image, build time, peak memory; the first stage alone at one
thread (exact scan against IVF at several probe counts, and HNSW on a sample: recall of the exact
top-100 and latency); and two-stage text → image search at one thread (``Searcher``, real
captions of the real images: tokenise, encode, first stage, gather and decode the K candidates,
exact HAT re-rank), p50 / p95. The re-rank scores the ``pq`` regions from their codes (through a
table of the caption's products with the centroids); it is also timed side by side, on the same
candidates, against decoding them to coordinates first (PCA, plus one along each image's own
row; session 12's re-rank) and against expanding them to full width first.

    nice -n 10 python benchmarks/million_gallery.py --checkpoint checkpoints/hat-tuxpaint \\
        --real karpathy:data/tuxpaint/dataset_tuxpaint_scenes.json:data/tuxpaint/images:train \\
        --size 1000000 --work /path/with/40GB
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import stats_ms, write_report
from query_latency import measure

from hat.encoder import Encoder
from hat.factory import load_model
from hat.fileio import atomic_directory
from hat.gallery import (
    BuildSettings,
    Collection,
    Gallery,
    ImageEntry,
    SegmentWriter,
    build_gallery,
    build_index,
    checkpoint_fingerprint,
    collection_from_spec,
    gallery_header,
    search_index,
    write_gallery,
)
from hat.gallery.first_stage import IVF_PROBES
from hat.model import HATModel, ImageFeatures
from hat.runtime import keep_freed_memory
from hat.search import Searcher

CHUNK = 8192  # synthetic images written at once
NOISE = 0.1  # first-stage noise, relative to a unit vector
PROBES = (16, 32, 64, 128, 256)


class PeakMemory:
    """Peak anonymous memory (``RssAnon``) of this process, sampled in a thread. Not ``ru_maxrss``:
    that also counts the page cache of memory-mapped segment files, which the kernel reclaims."""

    def __init__(self, interval: float = 0.2):
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.thread.start()

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self.peak = max(self.peak, self.current())

    def take_gb(self) -> float:
        """The peak since the last call, in GB; starts a new window."""
        peak, self.peak = max(self.peak, self.current()), 0
        return round(peak / 1e9, 2)


def real_gallery(checkpoint: str, spec: str, images: int, cache: Path) -> Gallery:
    """The first ``images`` of ``spec`` encoded into a ``pq`` gallery (codebooks fitted on them)."""
    collection = collection_from_spec(spec)
    collection.entries = collection.entries[:images]
    encoder = Encoder.from_pretrained(checkpoint)
    settings = BuildSettings("pq")
    return build_gallery(checkpoint, collection, cache, settings, encoder=encoder, progress=True)


class Collage:
    """Synthetic images made of two real ones (codes and first-stage vectors of ``real``)."""

    def __init__(self, real: Gallery, grids: list[tuple[int, int]], seed: int):
        self.rng = np.random.default_rng(seed)
        segment = real.segments[0]
        rows = real.image_rows[:, 1]
        self.stored, _ = segment.read_images(rows)  # codes and mean region of every level
        self.vectors = real.embeddings("image")
        self.grids = grids
        self.codecs = segment.codecs

    def chunk(self, count: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
        """Codes and mean region of every level, and first-stage vectors, of ``count`` new
        images; the means, like the first-stage vectors, are a's and b's weighted by area."""
        n = len(self.vectors)
        a, b = self.rng.integers(0, n, count), self.rng.integers(0, n, count)
        side = np.sqrt(self.rng.uniform(0.1, 0.5, count))  # rectangle of 10-50 % of the area
        top, left = self.rng.uniform(0, 1 - side), self.rng.uniform(0, 1 - side)
        levels, area = [], np.zeros(count)
        for (codes, means), (h, w) in zip(self.stored, self.grids, strict=True):
            ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
            inside_y = (ys[None] >= top[:, None]) & (ys[None] < (top + side)[:, None])
            inside_x = (xs[None] >= left[:, None]) & (xs[None] < (left + side)[:, None])
            inside = (inside_y[:, :, None] & inside_x[:, None, :]).reshape(count, h * w)
            area = inside.mean(axis=1)
            mixed = (1 - area)[:, None] * means[a] + area[:, None] * means[b]
            levels.append(
                (np.where(inside[..., None], codes[b], codes[a]), mixed.astype(np.float16))
            )
        noise = self.rng.standard_normal(self.vectors[a].shape) / np.sqrt(self.vectors.shape[1])
        vectors = (1 - area)[:, None] * self.vectors[a] + area[:, None] * self.vectors[b]
        vectors += NOISE * noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return levels, vectors.astype(np.float32)


def synthetic_gallery(
    work: Path, checkpoint: str, model: HATModel, real: Gallery, size: int
) -> tuple[Path, dict]:
    """Write ``size`` collage images as a gallery in ``work`` (with their concept gates where
    ``model``, the checkpoint's, has one); returns its folder and timings."""
    collage = Collage(real, model.grid_sizes(model.config.image_size), seed=0)
    shapes = [(values.shape[1], real.manifest.dim) for values, _ in collage.stored]
    timings: dict[str, float] = {}

    def encode(entries: list[ImageEntry], directory: Path) -> list[int]:
        start = time.perf_counter()
        writer = SegmentWriter(
            directory,
            "pq",
            len(entries),
            shapes,
            np.zeros(0, np.int64),
            real.manifest.embedding_dim,
            codecs=collage.codecs,
            gate=model.stored_gate,
        )
        for first in range(0, len(entries), CHUNK):
            rows = np.arange(first, min(first + CHUNK, len(entries)))
            levels, vectors = collage.chunk(len(rows))
            writer.put_encoded_images(rows, levels, vectors)
        writer.close()
        timings["write_features_s"] = time.perf_counter() - start
        return list(range(len(entries)))

    entries = [ImageEntry(f"synthetic/{i:07d}.jpg", 0, 0) for i in range(size)]
    collection = Collection(work, entries, {"kind": "synthetic", "size": str(size)})
    settings = BuildSettings("pq")
    header = gallery_header(
        "synthetic",
        checkpoint,
        checkpoint_fingerprint(checkpoint),
        settings,
        collection,
        model.config,
    )
    target = work / f"gallery-{size}"
    start = time.perf_counter()
    with atomic_directory(target) as staging:
        write_gallery(staging, collection, {}, encode, header, {})
    timings["build_s"] = time.perf_counter() - start
    return target, timings


def recall_at(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, got, strict=True)]))


def first_stage(vectors: np.ndarray, queries: np.ndarray, k: int, hnsw_sample: int) -> dict:
    """Exact scan vs IVF (probe sweep) vs HNSW on a sample, one thread: recall of the exact
    top-``k`` and latency per query."""
    faiss.omp_set_num_threads(1)
    out: dict = {}
    flat = build_index(vectors, flat_max=len(vectors))
    times = []
    for q in queries:
        start = time.perf_counter()
        flat.search(q[None], k)
        times.append(time.perf_counter() - start)
    out["exact_scan"] = stats_ms(times)
    truth = search_index(flat, queries, k)
    del flat
    faiss.omp_set_num_threads(2)
    start = time.perf_counter()
    ivf = build_index(vectors, flat_max=0)
    out["ivf_build_s_2_threads"] = round(time.perf_counter() - start, 1)
    out["ivf_lists"] = ivf.nlist
    faiss.omp_set_num_threads(1)
    out["ivf"] = {}
    for probes in PROBES:
        ivf.nprobe = probes
        times, got = [], []
        for q in queries:
            start = time.perf_counter()
            got.append(ivf.search(q[None], k)[1][0])
            times.append(time.perf_counter() - start)
        out["ivf"][probes] = {"recall_of_exact": round(recall_at(truth, got), 4), **stats_ms(times)}
        print(f"  IVF {probes} probes: {out['ivf'][probes]}", flush=True)
    del ivf
    if hnsw_sample:
        sample = vectors[:hnsw_sample]
        exact = faiss.IndexFlatIP(sample.shape[1])
        exact.add(sample)
        truth = exact.search(queries, k)[1]
        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(sample.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 80
        hnsw.add(sample)
        build_s = time.perf_counter() - start
        faiss.omp_set_num_threads(1)
        hnsw.hnsw.efSearch = 256
        times, got = [], []
        for q in queries:
            start = time.perf_counter()
            got.append(hnsw.search(q[None], k)[1][0])
            times.append(time.perf_counter() - start)
        out["hnsw_sample"] = {
            "vectors": len(sample),
            "build_s_2_threads": round(build_s, 1),
            "recall_of_exact": round(recall_at(truth, got), 4),
            **stats_ms(times),
        }
    return out


def decoded_first(searcher: Searcher, ids: np.ndarray, text) -> torch.Tensor:
    """The re-rank of session 12: every candidate's codes decoded to coordinates first (with
    their norms, in one C pass), then scored; ``(levels, len(ids))``."""
    out = torch.empty(searcher.gallery.num_levels, len(ids))
    for positions, part in searcher.gallery.image_parts(ids, in_place=True):
        levels, norms = zip(*(x.decoded() for x in part.levels), strict=True)
        decoded = ImageFeatures(list(levels), part.bases, norms=list(norms), gates=part.gates)
        out[:, torch.from_numpy(positions)] = searcher.model.level_scores(decoded, text)[:, :, 0]
    return out


def expanded_first(searcher: Searcher, ids: np.ndarray, text) -> torch.Tensor:
    """Every candidate expanded to full-width fp32 features first, then scored."""
    return searcher.model.level_scores(searcher.gallery.image_features(ids), text)[:, :, 0]


RERANKS = {"codes": Searcher.score_images, "decoded": decoded_first, "expanded": expanded_first}


def rerank_paths(searcher: Searcher, captions: list[str], candidates: int) -> dict:
    """Re-rank of the same first-stage candidates, one thread, three ways, interleaved: the
    regions as codes (what search does: a caption scores them undecoded), decoded to
    coordinates first, and expanded to full width first."""
    gallery, model = searcher.gallery, searcher.model
    times: dict[str, list[float]] = {name: [] for name in RERANKS}
    with torch.inference_mode():
        for caption in captions:
            text = searcher.encoder.encode_caption(caption)
            ids = search_index(gallery.image_index, model.text_embedding(text).numpy(), candidates)
            ids = np.sort(ids[0][ids[0] >= 0])
            scores = {}
            for name, way in RERANKS.items():
                start = time.perf_counter()
                scores[name] = way(searcher, ids, text)
                times[name].append(time.perf_counter() - start)
            for name in ("decoded", "expanded"):
                torch.testing.assert_close(scores["codes"], scores[name], atol=1e-4, rtol=0)
    out = {name: stats_ms(values) for name, values in times.items()}
    for name in ("decoded", "expanded"):
        out[f"{name}_over_codes_p50"] = round(out[name]["p50_ms"] / out["codes"]["p50_ms"], 2)
    return out


def disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    keep_freed_memory()  # as the hat command and app.py do: queries reuse freed memory
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--real", required=True, help="collection spec of the real images")
    parser.add_argument("--real-images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--hnsw-sample", type=int, default=100_000, help="0: skip HNSW")
    parser.add_argument("--work", help="folder for the galleries (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic gallery")
    parser.add_argument(
        "--reuse", action="store_true", help="time queries on a gallery kept in --work by --keep"
    )
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="hat-million-"))
    work.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory()
    start = time.perf_counter()
    real = real_gallery(args.checkpoint, args.real, args.real_images, work / "real")
    model = load_model(args.checkpoint)[0]
    report: dict = {
        "checkpoint": args.checkpoint,
        "real": {"spec": args.real, "images": real.num_images, "captions": real.num_captions},
        "real_encode_s": round(time.perf_counter() - start, 1),
        "peak_anon_memory_gb_real_encode": memory.take_gb(),
        "size": args.size,
        "candidates": args.candidates,
    }
    directory = work / f"gallery-{args.size}"
    if args.reuse and directory.is_dir():
        report["reused_gallery"] = str(directory)
    else:
        directory, timings = synthetic_gallery(work, args.checkpoint, model, real, args.size)
        report.update({k: round(v, 1) for k, v in timings.items()})
    searcher = Searcher.open(directory)
    gallery = searcher.gallery
    report["index"] = type(gallery.image_index).__name__
    report["disk_bytes_per_image"] = round(disk_bytes(directory) / args.size)
    report["stored_image_bytes_per_image"] = round(gallery.bytes_per_image())
    report["peak_anon_memory_gb_build"] = memory.take_gb()
    print(
        f"{args.size} images: {report['disk_bytes_per_image'] / 1024:.1f} KiB per image on disk, "
        f"built in {report.get('build_s', '(reused)')} s ({report['index']}), "
        f"peak anonymous memory {report['peak_anon_memory_gb_build']} GB",
        flush=True,
    )
    captions = real.captions[: args.queries]
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    report["two_stage_1_thread"] = measure(searcher, captions, args.candidates, exact_every=0)
    report["two_stage_1_thread"]["ivf_probes"] = IVF_PROBES
    report["peak_anon_memory_gb_queries"] = memory.take_gb()
    print(f"two-stage, 1 thread: {report['two_stage_1_thread']}", flush=True)
    report["rerank_1_thread"] = rerank_paths(searcher, captions, args.candidates)
    print(f"re-rank, 1 thread: {report['rerank_1_thread']}", flush=True)
    with torch.inference_mode():
        queries = torch.cat(
            [searcher.model.text_embedding(searcher.encoder.encode_caption(c)) for c in captions]
        ).numpy()
    report["first_stage"] = first_stage(
        gallery.embeddings("image"), queries, args.candidates, min(args.hnsw_sample, args.size)
    )
    print(f"first stage: {report['first_stage']}", flush=True)
    write_report("million_gallery", report, args.out)
    if not args.keep:
        shutil.rmtree(directory)
    return report


if __name__ == "__main__":
    main()

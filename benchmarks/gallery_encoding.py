"""Benchmark 3: gallery encoding throughput vs the image backbone's forward alone, stored bytes
per image at each precision, and the cost of fingerprinting a collection (stat vs sha256).

The forward-alone figure runs the image tower (at the precision the build encodes in:
``hat.runtime.encode_dtype``) on images already decoded and preprocessed in
memory; the build figure is the whole ``build_gallery`` (decode, preprocess, encode, quantise,
write, pool, faiss index, hashes, manifest) into a fresh cache. The two alternate in one run.

    nice -n 10 python benchmarks/gallery_encoding.py [--images 64] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import demo_architecture_model, interleaved, timed, write_report
from PIL import Image

from hat.data.images import list_images, load_image
from hat.encoder import Encoder
from hat.gallery import PRECISIONS, BuildSettings, build_gallery, folder_collection
from hat.model import HATModel


def write_images(folder: Path, count: int, size: tuple[int, int] = (480, 360)) -> None:
    """Photo-sized JPEGs: smooth noise with a few coloured boxes (decoding cost like a photo)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize(size, Image.BILINEAR)
        pixels = np.asarray(image).copy()
        for _ in range(3):
            x, y = rng.integers(0, size[0] - 80), rng.integers(0, size[1] - 80)
            pixels[y : y + 80, x : x + 80] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def fingerprint_cost(folder: Path, repeats: int = 5) -> dict:
    """Per-file cost of stat (what the cache key uses) and of hashing the bytes (page cache warm,
    so the hash figure is a lower bound: a cold 100k-image collection is read from disk too).
    """
    paths = list_images(folder)
    total = sum(p.stat().st_size for p in paths)
    stat_s = min(timed(lambda: [p.stat() for p in paths]) for _ in range(repeats))
    hash_s = min(
        timed(lambda: [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths])
        for _ in range(repeats)
    )
    return {
        "files": len(paths),
        "mean_file_kb": round(total / len(paths) / 1024, 1),
        "stat_us_per_file": round(1e6 * stat_s / len(paths), 1),
        "sha256_us_per_file": round(1e6 * hash_s / len(paths), 1),
        "sha256_mb_per_s": round(total / hash_s / 1e6),
        "stat_100k_s": round(1e5 * stat_s / len(paths), 2),
        "sha256_100k_s": round(1e5 * hash_s / len(paths), 1),
    }


def concept_level_cost(model, tokenizer, pixels: torch.Tensor, batch_size: int, repeats: int):
    """Encoding time per image with the concept level against the same model without it, in
    fp32 and in bf16 (:func:`hat.runtime.encode_dtype`), and the teacher as loaded (plain) and
    as it runs (``hat.teacher_inference``), interleaved in one run."""
    regions = model.concepts.regions
    three = HATModel(replace(model.config, concepts=None)).to(model.device)
    three.load_state_dict(model.state_dict(), strict=False)  # all but the concept level
    batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]

    def encoding(of, precision: str):
        encoder = Encoder(of, tokenizer, precision)
        return lambda: [encoder.encode_pixels(batch) for batch in batches]

    @torch.inference_mode()
    def teacher(plain: bool):
        for batch in batches:
            raw = regions.teacher_input(batch)
            if plain:
                regions.teacher.forward_features(raw)
            else:
                size = raw.shape[-2:]
                raw = raw.contiguous(memory_format=torch.channels_last)
                regions.inference_teacher(size).forward_features(raw)

    variants = {
        "three_levels": encoding(three, "fp32"),
        "with_concepts": encoding(model, "fp32"),
        "three_levels_bf16": encoding(three, "bf16"),
        "with_concepts_bf16": encoding(model, "bf16"),
        "teacher_plain": lambda: teacher(plain=True),
        "teacher_rewritten": lambda: teacher(plain=False),
    }
    times = interleaved(variants, repeats)
    ms = {name: 1000 * float(np.median(t)) / len(pixels) for name, t in times.items()}
    return {
        "ms_per_image": {name: round(v, 1) for name, v in ms.items()},
        "with_concepts_over_three_levels": round(ms["with_concepts"] / ms["three_levels"], 3),
        "bf16_with_concepts_over_fp32_three_levels": round(
            ms["with_concepts_bf16"] / ms["three_levels"], 3
        ),
        "bf16_with_concepts_over_bf16_three_levels": round(
            ms["with_concepts_bf16"] / ms["three_levels_bf16"], 3
        ),
        "teacher_plain_over_rewritten": round(ms["teacher_plain"] / ms["teacher_rewritten"], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--checkpoint", help="demo checkpoint (default: its architecture, random)")
    parser.add_argument("--fingerprint-dir", help="also fingerprint this image folder")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="hat-encoding-"))
    model, tokenizer = demo_architecture_model(args.checkpoint)
    checkpoint = Path(args.checkpoint or model.save_pretrained(work / "checkpoint", tokenizer))
    write_images(work / "images", args.images)
    collection = folder_collection(work / "images")
    encoder = Encoder(model, tokenizer)
    transform = encoder.transform
    pixels = torch.stack(
        [transform(load_image(work / "images" / e.path)) for e in collection.entries]
    )

    @torch.inference_mode()
    def forward_alone() -> None:  # at the precision the build encodes in
        encoding, context = encoder.encoding_model()
        with context:
            for start in range(0, len(pixels), args.batch_size):
                encoding.image_tower(pixels[start : start + args.batch_size])

    caches = (work / f"cache-{i}" for i in range(10**6))

    def build(precision: str = "int8", cache: Path | None = None):
        settings = BuildSettings(precision)
        return build_gallery(
            checkpoint,
            collection,
            cache or next(caches),
            settings,
            encoder=encoder,
            batch_size=args.batch_size,
        )

    times = interleaved({"forward_alone": forward_alone, "build": build}, args.repeats)
    best = {name: args.images / min(t) for name, t in times.items()}
    report = {
        "images": args.images,
        "batch_size": args.batch_size,
        "encode_dtype": str(encoder.encode_dtype),
        "forward_alone_images_per_s": round(best["forward_alone"], 2),
        "build_images_per_s": round(best["build"], 2),
        "build_over_forward": round(best["build"] / best["forward_alone"], 3),
        "build_over_forward_median_of_rounds": round(
            float(np.median(np.divide(times["forward_alone"], times["build"]))), 3
        ),
    }
    print(
        f"forward alone {report['forward_alone_images_per_s']} img/s, whole build "
        f"{report['build_images_per_s']} img/s: {100 * report['build_over_forward']:.0f}% "
        f"(median of rounds {100 * report['build_over_forward_median_of_rounds']:.0f}%)"
    )
    if model.concepts is not None:
        report["concept_level"] = concept_level_cost(
            model, tokenizer, pixels, args.batch_size, args.repeats
        )
        print(f"concept level: {report['concept_level']}")
    galleries = {precision: build(precision) for precision in PRECISIONS}
    report["bytes_per_image"] = {p: round(g.bytes_per_image()) for p, g in galleries.items()}
    print(f"bytes per image: {report['bytes_per_image']}")
    reopen = build("int8", galleries["int8"].directory.parent).report  # unchanged: a cache hit
    assert reopen.cache_hit
    report["reopen_s"] = round(reopen.seconds, 3)
    print(f"reopening the unchanged gallery: {reopen.seconds * 1000:.0f} ms")
    report["fingerprint"] = fingerprint_cost(Path(args.fingerprint_dir or work / "images"))
    print(f"fingerprint: {report['fingerprint']}")
    shutil.rmtree(work)
    write_report("gallery_encoding", report, args.out)
    return report


if __name__ == "__main__":
    main()

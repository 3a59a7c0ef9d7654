"""Benchmark 5: what a query costs with the paper's model (``hat-b``: Swin-B 224 + BERT-base) on a
CPU, e.g. a Hugging Face Space on CPU hardware.

The model is built offline from the preset with random weights (speed does not depend on them).
Timed, with ``--threads`` threads, the parts of one search (``Searcher``): encoding the query
caption or image, reading the K first-stage candidates' stored int8 features back to fp32, and
the exact re-rank of the K candidates at every level (3 levels of 784 / 196 / 49 regions x 768
for an image, a 15-word-piece caption). The faiss first stage is left out (< 2 ms up to 10k
images, benchmarks/query_latency.py). Also: gallery encoding (images per second at a batch of
``--batch``, the cold start of a Space) and the int8 bytes stored per image.

    nice -n 19 python benchmarks/paper_model_cost.py [--threads 1 2] [--repeats 5] [--candidates K]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import interleaved, stats_ms, write_report

from hat.config import get_preset
from hat.gallery import dequantize, quantize
from hat.model import HATModel, ImageFeatures, TextFeatures
from hat.tokenization import load_tokenizer, tokenize

# A Flickr30K-style caption: 15 word pieces with [CLS] and [SEP].
CAPTION = "The man with pierced ears is wearing glasses and an orange hat."


def stored(features: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Features as a gallery stores them (int8, one fp16 scale per vector)."""
    return [quantize(x, "int8") for x in features]


def read_back(levels: list[tuple[np.ndarray, np.ndarray | None]]) -> list[torch.Tensor]:
    return [dequantize(values, scales) for values, scales in levels]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="hat-b", help="model preset (hat-tiny for a smoke run)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=100, help="K, re-ranked exactly")
    parser.add_argument("--batch", type=int, default=8, help="images per batch when encoding")
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    start = time.perf_counter()
    config = get_preset(args.preset)
    model = HATModel(config).eval()
    tokenizer = load_tokenizer(config)
    build_s = time.perf_counter() - start
    k, size = args.candidates, config.image_size
    tokens = tokenize(tokenizer, [CAPTION], config.max_text_len)
    query_pixels = torch.randn(1, 3, size, size)
    batch_pixels = torch.randn(args.batch, 3, size, size)
    with torch.inference_mode():
        image, text = model.encode_image(query_pixels), model.encode_text(**tokens)
        # K candidates of each kind, shaped like the query's features, stored as a gallery would.
        gallery_images = stored([torch.randn(k, *x.shape[1:]) for x in image.levels])
        gallery_texts = stored([torch.randn(k, *x.shape[1:]) for x in text.levels])
    candidate_mask = text.mask.expand(k, -1)

    @torch.inference_mode()
    def text_to_image_rerank():
        images = ImageFeatures(read_back(gallery_images))
        return model.level_scores(images, text)

    @torch.inference_mode()
    def image_to_text_rerank():
        texts = TextFeatures(read_back(gallery_texts), candidate_mask)
        return model.level_scores(image, texts)

    variants = {
        "encode_text": lambda: model.encode_text(**tokens),
        "encode_image": lambda: model.encode_image(query_pixels),
        "read_images": lambda: read_back(gallery_images),
        "rerank_t2i": text_to_image_rerank,
        "rerank_i2t": image_to_text_rerank,
        "encode_batch": lambda: model.encode_image(batch_pixels),
    }
    regions = [x.shape[1] for x in image.levels]
    report: dict = {
        "preset": args.preset,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "model_build_s": round(build_s, 1),
        "candidates": k,
        "caption_word_pieces": int(tokens["attention_mask"].sum()),
        "regions_per_level": regions,
        "int8_bytes_per_image": sum(regions) * (config.embed_dim + 2) + 4 * config.first_stage_dim,
        "runs": [],
    }
    print(
        f"{args.preset}: {report['parameters_m']} M parameters; levels of {regions} regions x "
        f"{config.embed_dim}; int8 gallery {report['int8_bytes_per_image'] / 1024:.0f} KiB/image"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for fn in variants.values():  # warm-up: allocator, oneDNN kernels
                fn()
            times = interleaved(variants, args.repeats)
        ms = {name: stats_ms(values) for name, values in times.items()}
        p50 = {name: stat["p50_ms"] for name, stat in ms.items()}
        run = {
            "threads": threads,
            "parts": ms,
            "text_to_image_query_ms": round(
                p50["encode_text"] + p50["read_images"] + p50["rerank_t2i"], 1
            ),
            "image_to_text_query_ms": round(p50["encode_image"] + p50["rerank_i2t"], 1),
            "gallery_images_per_s": round(1000 * args.batch / p50["encode_batch"], 2),
        }
        report["runs"].append(run)
        print(
            f"{threads} thread(s): text -> image {run['text_to_image_query_ms']} ms (encode "
            f"{p50['encode_text']}, read {p50['read_images']}, re-rank {p50['rerank_t2i']}); "
            f"image -> text {run['image_to_text_query_ms']} ms (encode {p50['encode_image']}, "
            f"re-rank {p50['rerank_i2t']}); gallery encoding {run['gallery_images_per_s']} "
            "images/s"
        )
    write_report("paper_model_cost", report, args.out)
    return report


if __name__ == "__main__":
    main()

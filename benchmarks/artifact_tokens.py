"""High-norm artifact tokens of the demo checkpoint, measured on the scene test split: how many
regions are norm outliers (hat.artifacts rule), on the projected level features the maps use and
on the raw backbone tokens, how many of them lie on objects (the scenes' boxes), how often a
grounded word's map peaks on one, and the pointing game with the peak over all regions (as
scored) and over the non-outliers.

Reads the frozen-backbone cache that ``hat build-demo`` wrote (data/demo-work/cache) and the
scene data (data/tuxpaint); writes reports/artifact_tokens.json.

    python benchmarks/artifact_tokens.py [--images 500]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from hat.artifacts import OUTLIER_Z
from hat.data.captions import read_karpathy
from hat.demo_build.recipe import EVAL_SETS, cache_split, head_features
from hat.encoder import Encoder
from hat.pointing import (
    artifact_pointing,
    outlier_statistics,
    regions_in_boxes,
    split_entries,
)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/hat-tuxpaint")
    parser.add_argument("--data", default="data/tuxpaint")
    parser.add_argument("--work", default="data/demo-work")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--out", default="reports/artifact_tokens.json")
    args = parser.parse_args()
    start = time.perf_counter()
    encoder = Encoder.from_pretrained(args.checkpoint, "cpu")
    model = encoder.model
    _, file, split = EVAL_SETS["scenes_test"]
    data_dir = Path(args.data)
    data = read_karpathy(data_dir / file, data_dir / "images", split).first(args.images)
    cache = Path(args.work) / "cache" / f"scenes_test-{data.num_images}.safetensors"
    if not cache.is_file():
        parser.exit(1, f"{cache} is missing: run `hat build-demo` first\n")
    cached = cache_split(encoder, data, cache)
    everything = torch.arange(data.num_images), torch.arange(len(data.captions))
    images, texts = head_features(model, cached, *everything)
    entries = split_entries(data_dir / file, split)[: data.num_images]
    cfg = model.config
    grids = model.image_tower.grid_sizes(cfg.image_size)
    resize = round(cfg.image_size * 256 / 224)
    sizes = []
    for path in data.image_paths:
        with Image.open(path) as im:
            sizes.append(im.size)
    tokens = {}
    for name, raw, projected, grid in zip(
        cfg.level_names, cached.image_levels, images.levels, grids, strict=True
    ):
        in_boxes = np.stack(
            [
                regions_in_boxes(
                    [o["box"] for o in e["objects"]], size, grid, cfg.image_size, resize
                )
                for e, size in zip(entries, sizes, strict=True)
            ]
        )
        tokens[name] = {
            "level_features": outlier_statistics(projected.norm(dim=-1).numpy(), in_boxes),
            "backbone_tokens": outlier_statistics(raw.float().norm(dim=-1).numpy(), in_boxes),
        }
    report = {
        "checkpoint": Path(args.checkpoint).name,
        "eval_set": "scenes_test",
        "num_images": data.num_images,
        "rule": f"modified z = 0.6745 (norm - median) / MAD > {OUTLIER_Z}, per image and level, "
        "on the projected level features",
        "tokens": tokens,
        "pointing": artifact_pointing(encoder, entries, data_dir / "images", images, texts),
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

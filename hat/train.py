"""Train HAT with the reference recipe: hardest-negative hinge loss, Adam, StepLR, frozen warm-up.

A model with a first-stage global head (``global_dim > 0``) trains it jointly, by distillation
from the batch's HAT scores on detached features: HAT itself learns exactly as without it.

    hat train --data dataset_flickr30k.json --image-root flickr30k-images --out runs/f30k \\
        --pretrained-image hub --pretrained-text hub
    torchrun --nproc_per_node 8 -m hat train ...        # DistributedDataParallel

The run folder gets ``last/`` (resumable, every epoch), ``best/`` (the model with the best
validation R@1 i2t + R@1 t2i), ``metrics.jsonl`` (one JSON object per log line) and ``args.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from hat.config import HATConfig, get_preset
from hat.data.captions import CaptionedImages, read_karpathy
from hat.data.loader import Batch, PairCollator, PairDataset
from hat.distributed import DistInfo, replicas_in_sync
from hat.encoder import Encoder
from hat.evaluate import Evaluation, evaluate
from hat.factory import create_model
from hat.loss import training_loss
from hat.training_state import load_training_state, save_training_state
from hat.transforms import train_transform


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_config(name_or_path: str) -> HATConfig:
    path = Path(name_or_path)
    return HATConfig.load(path) if path.suffix == ".json" else get_preset(name_or_path)


class Trainer:
    """The one training loop, shared by ``hat train`` (:class:`TrainingRun`) and ``hat
    build-demo`` (on cached backbone outputs): per batch, ``batch_loss(batch)`` (``None`` skips
    the batch), one optimizer step through the loss scaler and, with ``scheduler_step="step"``,
    a scheduler step; per epoch, the scheduler (``"epoch"``) and the caller's ``end_of_epoch``.

    What a batch is, which parameters train and what an epoch's end does are the caller's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batch_loss: Callable[[Any], torch.Tensor | None],
        *,
        scheduler_step: str = "epoch",
        scaler: torch.amp.GradScaler | None = None,
        log: Callable[[dict], None] | None = None,
        log_every: int = 0,
        desc: str = "epoch",
        show_progress: bool = True,
        step: int = 0,
    ):
        if scheduler_step not in ("epoch", "step"):
            raise ValueError(f"scheduler_step must be 'epoch' or 'step', got {scheduler_step!r}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batch_loss = batch_loss
        self.scheduler_step = scheduler_step
        self.scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
        self.log = log
        self.log_every = log_every
        self.desc = desc
        self.show_progress = show_progress
        self.step = step  # optimizer steps taken, across epochs and resumes

    def train_epoch(self, epoch: int, batches: Iterable, total: int) -> float:
        """At most ``total`` batches; returns their mean loss (NaN when every batch was skipped)."""
        self.model.train()
        losses = []
        bar = tqdm(
            batches, total=total, desc=f"{self.desc} {epoch}", disable=not self.show_progress
        )
        for n, batch in enumerate(bar):
            if n >= total:
                break
            loss = self.batch_loss(batch)
            if loss is None:
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler_step == "step":
                self.scheduler.step()
            self.step += 1
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if self.log is not None and self.log_every and self.step % self.log_every == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                self.log({"epoch": epoch, "step": self.step, "loss": loss.item(), "lr": lr})
        return float(np.mean(losses)) if losses else float("nan")

    def fit(
        self,
        epochs: int,
        batches: Callable[[int], tuple[Iterable, int]],
        end_of_epoch: Callable[[int, float], None],
        start_epoch: int = 0,
        start_of_epoch: Callable[[int], None] | None = None,
    ) -> None:
        """Epochs ``start_epoch`` to ``epochs - 1``; ``batches(epoch) -> (batches, how many)``."""
        for epoch in range(start_epoch, epochs):
            if start_of_epoch is not None:
                start_of_epoch(epoch)
            loss = self.train_epoch(epoch, *batches(epoch))
            if self.scheduler_step == "epoch":
                self.scheduler.step()
            end_of_epoch(epoch, loss)


class TrainingRun:
    """``hat train``: one run of the reference recipe; works alone or as one process of a
    torchrun group."""

    def __init__(self, args: argparse.Namespace, dist_info: DistInfo):
        self.args = args
        self.dist = dist_info
        self.device = torch.device(
            f"cuda:{dist_info.local_rank}" if args.device == "cuda" else args.device
        )
        self.out = Path(args.out)
        seed_everything(args.seed)
        self.model, self.tokenizer = create_model(
            load_config(args.model), args.pretrained_image, args.pretrained_text, args.tokenizer
        )
        self.model.to(self.device)
        self.config = self.model.config
        self.train_data = self._read(args.train_split, args.restval)
        self.val_data = self._read(args.val_split, False) if args.val_split else None
        self.optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=args.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=args.lr_step, gamma=args.lr_gamma
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.progress = {"epoch": -1, "step": 0, "best": float("-inf"), "skipped": 0}
        if args.resume:
            self.progress = load_training_state(
                args.resume, self.model, self.optimizer, self.scheduler
            )
        self.ddp_model: torch.nn.Module = self.model
        self.frozen: bool | None = None
        self.summary: dict = {}
        self.trainer = Trainer(
            self.model,
            self.optimizer,
            self.scheduler,
            self.batch_loss,
            scaler=self.scaler,
            log=self.log,
            log_every=args.log_every,
            show_progress=dist_info.is_main,
            step=self.progress["step"],
        )

    def _read(self, split: str, restval: bool) -> CaptionedImages:
        return read_karpathy(self.args.data, self.args.image_root, split, restval)

    def _amp_dtype(self) -> torch.dtype | None:
        if self.args.no_amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _set_phase(self, epoch: int) -> None:
        """Backbones stay frozen for the first ``freeze_epochs`` epochs, as in the reference."""
        frozen = epoch < self.args.freeze_epochs
        if frozen == self.frozen:
            return
        self.frozen = frozen
        self.model.lock_backbones(frozen)
        if self.dist.enabled:  # DDP registers the trainable set at wrap time: wrap again
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=ids)
        self.log({"event": "phase", "epoch": epoch, "backbones_frozen": frozen})

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            record = {"time": round(time.time(), 3), **record}
            with (self.out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def loader(self, epoch: int) -> DataLoader:
        dataset = PairDataset(self.train_data, train_transform(self.config), self.args.skip_bad)
        if self.dist.enabled:
            sampler = DistributedSampler(dataset, seed=self.args.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            generator = torch.Generator().manual_seed(self.args.seed + epoch)
            sampler = RandomSampler(dataset, generator=generator)
        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            sampler=sampler,
            num_workers=self.args.workers,
            collate_fn=PairCollator(self.tokenizer, self.config.max_text_len),
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def batches(self, epoch: int) -> tuple[DataLoader, int]:
        loader = self.loader(epoch)
        total = len(loader)
        if self.args.max_steps_per_epoch:
            total = min(total, self.args.max_steps_per_epoch)
        return loader, total

    def batch_loss(self, batch: Batch) -> torch.Tensor | None:
        """The reference loss of a batch of images and their captions (None: too few pairs)."""
        self.progress["skipped"] += batch.skipped
        if batch.input_ids is None or len(batch.captions) < 2:
            return None
        autocast = (
            torch.autocast("cuda", dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            scores = self.ddp_model(
                batch.pixel_values.to(self.device, non_blocking=True),
                batch.input_ids.to(self.device),
                batch.attention_mask.to(self.device),
            )
        return training_loss(
            scores.hat, scores.first_stage, self.config.margin, self.config.global_sharpness
        )

    def validate(self) -> Evaluation:
        encoder = Encoder(self.model, self.tokenizer)
        return evaluate(encoder, self.val_data, batch_size=self.args.batch_size)

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "args.json").write_text(json.dumps(vars(self.args), indent=2) + "\n")
        self.trainer.fit(
            self.args.epochs,
            self.batches,
            self._end_of_epoch,
            start_epoch=self.progress["epoch"] + 1,
            start_of_epoch=self._set_phase,
        )
        return self.summary

    def _end_of_epoch(self, epoch: int, loss: float) -> None:
        self.progress["epoch"] = epoch
        self.progress["step"] = self.trainer.step
        summary = {"epoch": epoch, "train_loss": loss, "skipped": self.progress["skipped"]}
        summary["replicas_in_sync"] = replicas_in_sync(self.model, self.dist)
        if not summary["replicas_in_sync"]:
            raise RuntimeError(f"DDP replicas diverged in epoch {epoch}")
        if self.dist.is_main:
            self._checkpoint(summary)
        self.log(summary)
        self.summary = summary

    def _checkpoint(self, summary: dict) -> None:
        if self.val_data is not None:
            evaluation = self.validate()
            metrics = summary["val"] = evaluation.headline
            summary["val_first_stage"] = evaluation.first_stage_recall
            selection = metrics["i2t_r1"] + metrics["t2i_r1"]
            if selection > self.progress["best"]:
                self.progress["best"] = selection
                self.model.save_pretrained(self.out / "best", tokenizer=self.tokenizer)
                summary["new_best"] = True
            print(
                f"epoch {summary['epoch']}: loss {summary['train_loss']:.4f}  "
                f"val R@1 i2t {metrics['i2t_r1']:.2f} t2i {metrics['t2i_r1']:.2f} "
                f"rsum {metrics['rsum']:.2f}"
            )
        else:
            self.model.save_pretrained(self.out / "best", tokenizer=self.tokenizer)
        save_training_state(
            self.out / "last",
            self.model,
            self.tokenizer,
            self.optimizer,
            self.scheduler,
            self.progress,
        )

"""Training with PyTorch Lightning: the LightningModule, atomic checkpoints, the trainer and its run folder.

The network lives under ``self.net``, so checkpoints hold ``net.*`` keys exactly like upstream's train.py
(each side loads the other's ``last.ckpt``); ours also embed the model config under ``moceir_config``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from .data.datasets import PairedPatchDataset, build_train_pairs
from .losses import restoration_loss
from .models import MoCEConfig, MoCEIR
from .models.checkpoints import CONFIG_KEY, load_model, save_model


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training run needs besides the model config (flag names are upstream's)."""

    de_type: tuple[str, ...] = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze")
    trainset: str = "standard"
    data_file_dir: str = "datasets"
    dehaze_source: str = "reside"
    repeats: dict[str, int] = field(default_factory=dict)
    holdout_val: bool = False  # keep the RainTrainL validation split out of training
    epochs: int = 120
    max_steps: int = -1  # > 0: stop after this many optimizer steps; the LR schedule spans them
    max_time: str | None = None  # "DD:HH:MM:SS" wall-clock limit
    batch_size: int = 8  # per device; with accum_grad a, each step sees batch_size // a (upstream)
    accum_grad: int = 1
    patch_size: int = 128
    lr: float = 2e-4
    warmup_epochs: float = 15
    schedule_epochs: float = 150  # cosine horizon (upstream: 150 while training 120)
    loss_type: str = "l1"
    fft_loss_weight: float = 0.1
    balance_loss_weight: float = 0.01
    num_workers: int = 4
    num_gpus: int | None = None  # None: 1 if CUDA is available, else CPU
    num_cpu_processes: int = 1  # CPU DDP (gloo) processes when training without GPUs
    precision: str = "32-true"
    compile: bool = False
    dispatch: str = "auto"
    channels_last: bool = True  # faster convolutions on CPU (oneDNN) and GPU (cuDNN); same results
    seed: int = 0
    ckpt_dir: str = "checkpoints"
    run_name: str | None = None
    save_every_n_epochs: int = 5
    resume_from: str | None = None
    fine_tune_from: str | None = None
    log_every_n_steps: int = 10


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine decay to 0 at ``total`` (upstream's LinearWarmupCosineAnnealingLR)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class MoCEModule(pl.LightningModule):
    """LightningModule holding the network as ``net``; returns L1 (+FFT) + balance."""

    def __init__(self, config: MoCEConfig, settings: TrainSettings):
        super().__init__()
        self.net = MoCEIR(config).set_dispatch(settings.dispatch)
        self.settings = settings
        self._tick: float | None = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lq = batch["lq"].contiguous(memory_format=torch.channels_last) if self.settings.channels_last else batch["lq"]
        out = self.net(lq)
        s = self.settings
        parts = restoration_loss(out.image, batch["gt"], out.balance_loss, s.loss_type, s.fft_loss_weight,
                                 s.balance_loss_weight)
        now = time.perf_counter()
        if self._tick is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("patches_per_s", batch["lq"].shape[0] * world / (now - self._tick), prog_bar=True)
        self._tick = now
        self.log("train/loss", parts["loss"], prog_bar=True, sync_dist=True)
        for name in ("l1", "fft", "balance"):
            if name in parts:
                self.log(f"train/{name}", parts[name], sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return parts["loss"]

    def configure_optimizers(self) -> Any:
        s = self.settings
        opt = torch.optim.AdamW(self.parameters(), lr=s.lr)
        total = self.trainer.estimated_stepping_batches
        if s.max_steps > 0:
            warmup = int(total * s.warmup_epochs / s.schedule_epochs)
            horizon = total
        else:
            per_epoch = total / max(1, self.trainer.max_epochs)
            warmup, horizon = int(per_epoch * s.warmup_epochs), int(per_epoch * s.schedule_epochs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, horizon))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.net.config.to_dict()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file, then renames, so a crash never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class PlotAtEnd(Callback):
    """Writes the loss / balance / learning-rate plots into the run folder when training ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.save()
            from .plots import plot_training_logs

            try:
                plot_training_logs(self.run_dir)
            except FileNotFoundError:  # too few steps to log anything
                print(f"no logged steps yet; no plots written to {self.run_dir}")


def resolve_checkpoint(ref: str, ckpt_dir: str) -> Path:
    """A checkpoint path, or a run name under ckpt_dir (upstream: ``ckpt_dir/<id>/last.ckpt``)."""
    p = Path(ref)
    if p.is_file():
        return p
    for candidate in (Path(ckpt_dir) / ref / "last.ckpt", p / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {ref} nor {Path(ckpt_dir) / ref / 'last.ckpt'}")


def build_dataloader(settings: TrainSettings, batch_size: int) -> tuple[DataLoader, dict[str, int]]:
    per_task = build_train_pairs(settings.data_file_dir, list(settings.de_type), settings.trainset,
                                 settings.dehaze_source, settings.repeats, settings.holdout_val)
    pairs = [p for task_pairs in per_task.values() for p in task_pairs]
    loader = DataLoader(PairedPatchDataset(pairs, settings.patch_size), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=settings.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=settings.num_workers > 0)
    if len(loader) == 0:
        raise ValueError(f"{len(pairs)} training patches make no full batch of {batch_size}; lower --batch_size")
    return loader, {k: len(v) for k, v in per_task.items()}


def train(config: MoCEConfig, settings: TrainSettings) -> Path:
    """Run training; returns the run folder (checkpoints, logs, plots, model.safetensors)."""
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    micro_batch = max(1, settings.batch_size // settings.accum_grad)
    loader, sizes = build_dataloader(settings, micro_batch)  # fails before anything is written if data is missing
    run_name = settings.run_name or datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
    run_dir = Path(settings.ckpt_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"training patches per task: {sizes}; run folder: {run_dir}")

    if settings.fine_tune_from:
        net = load_model(resolve_checkpoint(settings.fine_tune_from, settings.ckpt_dir))
        module = MoCEModule(net.config, settings)
        module.net.load_state_dict(net.state_dict())
    else:
        module = MoCEModule(config, settings)
    if settings.channels_last:
        module.net.to(memory_format=torch.channels_last)
    if settings.compile:
        module.net.compile()

    gpus = settings.num_gpus if settings.num_gpus is not None else int(torch.cuda.is_available())
    accelerator, devices = ("gpu", gpus) if gpus > 0 else ("cpu", settings.num_cpu_processes)
    if devices > 1:
        dense = settings.dispatch == "dense" or (settings.dispatch == "auto" and accelerator == "gpu")
        # Sparse dispatch skips experts no image picked; DDP must then look for unused parameters.
        strategy: Any = DDPStrategy(find_unused_parameters=not dense)
    else:
        strategy = "auto"
    ckpt = ModelCheckpoint(dirpath=run_dir, every_n_epochs=settings.save_every_n_epochs, save_top_k=-1,
                           save_last=True)
    trainer = pl.Trainer(
        max_epochs=settings.epochs, max_steps=settings.max_steps, max_time=settings.max_time,
        accelerator=accelerator, devices=devices, strategy=strategy, precision=settings.precision,
        accumulate_grad_batches=settings.accum_grad, default_root_dir=run_dir,
        logger=[TensorBoardLogger(run_dir, name="logs", version=""), CSVLogger(run_dir, name="logs", version="")],
        callbacks=[ckpt, TQDMProgressBar(refresh_rate=10), PlotAtEnd(run_dir)],
        plugins=[AtomicCheckpointIO()], log_every_n_steps=settings.log_every_n_steps,
        enable_model_summary=False,
    )
    resume = resolve_checkpoint(settings.resume_from, settings.ckpt_dir) if settings.resume_from else None
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)
    if trainer.is_global_zero:
        save_model(module.net, run_dir / "model.safetensors")
        (run_dir / "settings.json").write_text(_settings_json(config, settings, trainer))
    return run_dir


def _settings_json(config: MoCEConfig, settings: TrainSettings, trainer: pl.Trainer) -> str:
    import json

    d = {"config": config.to_dict(), "settings": dataclasses.asdict(settings), "global_step": trainer.global_step,
         "epoch": trainer.current_epoch}
    d["settings"]["de_type"] = list(settings.de_type)
    return json.dumps(d, indent=1)

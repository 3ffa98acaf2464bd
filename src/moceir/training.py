"""Training with PyTorch Lightning: the LightningModule, atomic checkpoints, the trainer and its run folder.

The network lives under ``self.net``, so checkpoints hold ``net.*`` keys exactly like upstream's train.py
(each side loads the other's ``last.ckpt``); ours also embed the model config under ``moceir_config``.
Everything that can be checked before training (settings, hardware, data layout, the checkpoint to resume, the run
folder, every training image) is checked before the first step and reported as one :class:`TrainingSetupError` line;
a run folder holding an earlier run is only written into by a run that resumes it.

The training step never waits for the device (no ``.item()``, no ``if tensor``): the loss is checked for NaN/inf
on the device and read once per logging period, and host-side numbers are logged as CPU tensors (Lightning
copies a Python float to the module's device with a blocking copy). Speed options: ``compile`` (a torch.compile
mode), ``fused_adamw``, ``fft_impl``, ``cuda_graphs`` (the whole step replayed from one CUDA graph,
:mod:`moceir.captured_step`); ``ema_decay`` keeps an exponential moving average of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from .callbacks import (AtomicCheckpointIO, PlotAtEnd, ResumableCSVLogger, RunCheckpoint, WeightEMA, WriteAtStart,
                        count_epoch_completed, epoch_complete, write_text)
from .captured_step import Capture, CaptureError, CapturedTrainStep, portable_optimizer_state
from .data.datasets import (DatasetLayoutError, PairedPatchDataset, build_train_pairs, check_training_images,
                            data_folders)
from .io import ImageReadError, file_problem, write_error_advice
from .losses import restoration_loss
from .models import MoCEConfig, MoCEIR
from .models.checkpoints import (CONFIG_KEY, CheckpointError, architecture_differences, check_finite,
                                 config_from_dict, infer_config, load_model, load_state_dict_strict,
                                 read_checkpoint_file, save_model)
from .models.config import FFT_IMPLS, PRESETS
from .runtime import COMPILE_MODES as TORCH_COMPILE_MODES
from .runtime import COMPILE_SCOPES, compile_network, first_line, is_rank_zero


class TrainingSetupError(ValueError):
    """Training cannot start (bad data, settings or hardware); the message is one line saying what to do."""

    exit_code = 2  # what `moceir train` exits with: bad options or data, nothing trained

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class TrainingDataError(TrainingSetupError):
    """A training image that broke during training (deleted, damaged): a file failed, exit code 1."""

    exit_code = 1


class TrainingOutputError(TrainingSetupError):
    """A checkpoint or log could not be written during training (a full disk): exit code 1, resume when fixed."""

    exit_code = 1


class TrainingPeerError(TrainingSetupError):
    """A collective of a distributed run failed, most often because another rank stopped: exit code 1."""

    exit_code = 1


class TrainingCompileError(TrainingSetupError):
    """torch.compile failed on the network (a limit of Inductor, e.g. the sparse dispatch's dynamic shapes on the
    CPU): exit code 1, with the options that train instead."""

    exit_code = 1


class TrainingStopped(TrainingSetupError):
    """Training was stopped from outside (SIGTERM: exit code 143; Ctrl-C: 130), as a shell reports a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLossError(TrainingSetupError):
    """The loss or the weights became NaN/inf; training stops and nothing non-finite is saved."""


COMPILE_MODES = ("none", *TORCH_COMPILE_MODES)  # "none": eager
MAX_SEED = 2**32 - 1  # numpy's limit, which pl.seed_everything enforces with a traceback
MAX_EPOCHS = 1e6  # --warmup_epochs and --schedule_epochs: 1e308 made an infinite number of warm-up steps
# What Lightning reads to resume, and the flags that give a network its shape (moceir train's names)
LIGHTNING_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "global_step", "pytorch-lightning_version")
ARCH_FLAGS = ("dim", "num_blocks", "num_dec_blocks", "heads", "num_refinement_blocks", "num_exp_blocks", "rank_type",
              "latent_dim")
RUN_FILES = ("model.safetensors", "model_ema.safetensors", "logs/metrics.csv")  # what a run leaves besides *.ckpt
WRITTEN_FILES = ("settings.json", "data_check.json", "training_curves.png", "logs/hparams.yaml")  # and these too


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
    num_nodes: int = 1  # machines; under torchrun or SLURM Lightning takes ranks from the launcher
    precision: str = "32-true"
    compile: str = "none"  # a COMPILE_MODES entry for torch.compile of the network (True/False: default/none)
    compile_scope: str = "network"  # COMPILE_SCOPES: one graph for the network, or one per block ("blocks")
    fused_adamw: bool = False  # AdamW(fused=True): one kernel per step for all parameters
    cuda_graphs: bool = False  # capture forward, loss, backward and AdamW in one CUDA graph (one GPU)
    fft_impl: str | None = None  # experts' FFT product while training ("fft"/"matmul"); None: the config's
    ema_decay: float = 0.0  # > 0: keep an EMA of the weights (model_ema.safetensors); e.g. 0.999
    dispatch: str = "auto"
    channels_last: bool = True  # faster convolutions on CPU (oneDNN) and GPU (cuDNN); same results
    seed: int = 0
    ckpt_dir: str = "checkpoints"
    run_name: str | None = None
    save_every_n_epochs: int = 5
    resume_from: str | None = None
    fine_tune_from: str | None = None
    log_every_n_steps: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # the flag used to be a boolean
            object.__setattr__(self, "compile", "default" if self.compile else "none")

    def validate(self) -> None:
        """Raise :class:`TrainingSetupError` for a loss weight, rate or schedule length that is not finite."""
        numbers = {"--lr": (self.lr, False), "--schedule_epochs": (self.schedule_epochs, False),
                   "--warmup_epochs": (self.warmup_epochs, True), "--fft_loss_weight": (self.fft_loss_weight, True),
                   "--balance_loss_weight": (self.balance_loss_weight, True)}
        for flag, (value, zero_ok) in numbers.items():
            if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                raise TrainingSetupError(f"{flag} is {value}; pass a finite number {'>= 0' if zero_ok else '> 0'}")
        for flag, value, low in (("--warmup_epochs", self.warmup_epochs, 0),
                                 ("--schedule_epochs", self.schedule_epochs, 1e-3)):
            if not low <= value <= MAX_EPOCHS:  # the warm-up's steps are total * warmup / schedule
                raise TrainingSetupError(f"{flag} is {value}; pass a number from {low:g} to {MAX_EPOCHS:g}")
        if not 0 <= self.ema_decay < 1:
            raise TrainingSetupError(f"--ema_decay is {self.ema_decay}; pass 0 (off) or a number in (0, 1) "
                                     "such as 0.999")
        if self.compile not in COMPILE_MODES:
            raise TrainingSetupError(f"--compile is {self.compile!r}; pass one of {', '.join(COMPILE_MODES)}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise TrainingSetupError(f"--compile_scope is {self.compile_scope!r}; pass one of "
                                     f"{', '.join(COMPILE_SCOPES)}")
        if self.compile_scope != "network" and self.compile == "none":
            raise TrainingSetupError(f"--compile_scope {self.compile_scope} says what to compile; add --compile "
                                     "(or --compile MODE) to compile it")
        if self.run_name is not None and (not Path(self.run_name).parts or Path(self.run_name).is_absolute()
                                          or any(part in (".", "..") for part in Path(self.run_name).parts)):
            raise TrainingSetupError(f"--run_name {self.run_name!r} is not a folder name under --ckpt_dir (it is "
                                     "empty, '.', absolute or holds '..'); name the run, e.g. --run_name r1")
        if not 0 <= self.seed <= MAX_SEED:
            raise TrainingSetupError(f"--seed is {self.seed}; pass a whole number from 0 to {MAX_SEED}")
        if self.fft_impl not in (None, *FFT_IMPLS):
            raise TrainingSetupError(f"--fft_impl is {self.fft_impl!r}; pass one of {', '.join(FFT_IMPLS)}")
        if self.resume_from and self.fine_tune_from:
            raise TrainingSetupError(f"--resume_from {self.resume_from} continues a run with its own weights, so "
                                     f"--fine_tune_from {self.fine_tune_from} would be ignored; pass one of them")
        if self.cuda_graphs:
            self._validate_cuda_graphs()

    def _validate_cuda_graphs(self) -> None:
        """What a step captured in one graph cannot do: each a one-line error naming the flag to change."""
        conflicts = [
            (self.accum_grad > 1, f"--accum_grad {self.accum_grad} (the graph holds one step); pass --accum_grad 1"),
            (self.precision == "16-mixed", "--precision 16-mixed (its loss scaler steps outside the graph); pass "
                                           "--precision bf16-mixed or 32-true"),
            (self.compile == "reduce-overhead", "--compile reduce-overhead (which captures graphs itself); pass "
                                                "--compile default or leave --cuda_graphs out"),
            (self.dispatch not in ("auto", "dense"), f"--dispatch {self.dispatch} (it reads the routing on the "
                                                     "host); pass --dispatch dense"),
        ]
        for conflict, message in conflicts:
            if conflict:
                raise TrainingSetupError(f"--cuda_graphs cannot run with {message}")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 0, then cosine decay to 0 at ``total`` (upstream's LinearWarmupCosineAnnealingLR)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class MoCEModule(pl.LightningModule):
    """LightningModule holding the network as ``net``; returns L1 (+FFT) + balance."""

    def __init__(self, config: MoCEConfig, settings: TrainSettings, capture: Capture | None = None):
        super().__init__()
        self.net = MoCEIR(config).set_dispatch(settings.dispatch)
        if settings.fft_impl:
            self.net.set_fft_impl(settings.fft_impl)
        self.settings = settings
        self._capture = capture  # with cuda_graphs: a stand-in for CUDA-graph capture (tests), else the real one
        self._captured: CapturedTrainStep | None = None
        self._tick: float | None = None  # start of the current logging period (host clock)
        self._seen = 0  # patches stepped since then
        self._nonfinite: torch.Tensor | None = None  # [] int32 on the device: steps whose loss was NaN/inf

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        s = self.settings
        if s.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier CUDA-graph outputs may be reused
        lq = batch["lq"].contiguous(memory_format=torch.channels_last) if s.channels_last else batch["lq"]
        if s.cuda_graphs:  # forward, backward and the optimizer step in one replay (see optimizer_step)
            parts = self._replay(lq, batch["gt"])
        else:
            parts = self._loss(self.net(lq), batch["gt"])
        bad = (~torch.isfinite(parts["loss"].detach())).int()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        self._log_speed(batch["lq"].shape[0])
        self.log("train/loss", parts["loss"], prog_bar=True, sync_dist=True)
        for name in ("l1", "fft", "balance"):
            if name in parts:
                self.log(f"train/{name}", parts[name], sync_dist=True)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]  # a device tensor with cuda_graphs: no host sync
        self.log("train/lr", lr.detach().clone() if torch.is_tensor(lr) else torch.tensor(lr))
        return None if s.cuda_graphs else parts["loss"]  # None: Lightning runs no backward of its own

    def _loss(self, out: Any, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.settings
        return restoration_loss(out.image, gt, out.balance_loss, s.loss_type, s.fft_loss_weight,
                                s.balance_loss_weight)

    def _replay(self, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
        """The captured step; a capture that fails (out of memory, an operation capture cannot take) is one line."""
        try:
            return self._captured_step()(lq, gt)
        except CaptureError as e:
            what = f"out of memory at batch {lq.shape[0]}; lower --batch_size" if e.out_of_memory else e
            raise TrainingSetupError(f"--cuda_graphs: capturing the training step failed ({what}), or train "
                                     "without --cuda_graphs") from e

    def _captured_step(self) -> CapturedTrainStep:
        if self._captured is None:
            dtype = torch.bfloat16 if self.settings.precision == "bf16-mixed" else None
            self._captured = CapturedTrainStep(self.net, self.trainer.optimizers[0], self._loss, dtype,
                                               capture=self._capture)
        return self._captured

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        if self.settings.cuda_graphs:
            optimizer_closure()  # training_step's replay has stepped the weights; Lightning counts the step
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if not self.settings.cuda_graphs:  # the captured backward writes the gradients where capture left them
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def _log_speed(self, batch_size: int) -> None:
        """patches/s averaged over the logging period (host clock; the log step's sync bounds each period)."""
        now = time.perf_counter()
        if self._tick is None:
            self._tick = now
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        self._seen += batch_size * world
        self.log("patches_per_s", torch.tensor(self._seen / (now - self._tick)), prog_bar=True)
        if (self.global_step + 1) % self.settings.log_every_n_steps == 0:
            self._tick, self._seen = now, 0

    def on_train_batch_end(self, outputs: Any, batch: dict, batch_idx: int) -> None:
        if (batch_idx + 1) % self.settings.log_every_n_steps == 0:
            self.raise_if_nonfinite()

    def on_train_end(self) -> None:
        self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss since the start was NaN/inf (one host sync)."""
        if self._nonfinite is not None and int(self._nonfinite) > 0:
            raise NonFiniteLossError(f"the training loss became NaN or inf ({int(self._nonfinite)} step(s) up to step "
                                     f"{self.global_step}); lower --lr (now {self.settings.lr:g}) or check the data; "
                                     "earlier checkpoints are kept")

    def configure_optimizers(self) -> Any:
        s = self.settings
        # fused: one kernel for all parameters. capturable is not needed: only the network is compiled (and, with
        # reduce-overhead, graph-captured); the optimizer step runs eagerly with the learning rate as a float.
        opt = torch.optim.AdamW(self.parameters(), lr=s.lr, fused=s.fused_adamw or None)
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
        if self.settings.cuda_graphs:
            checkpoint["optimizer_states"] = [portable_optimizer_state(o)
                                              for o in checkpoint.get("optimizer_states", [])]
            for sched in checkpoint.get("lr_schedulers", []):  # LambdaLR's last rates: clones of the tensor rate
                sched["_last_lr"] = [float(x) for x in sched.get("_last_lr", [])]
        if epoch_complete(self.trainer):
            count_epoch_completed(checkpoint)


def require_finite(net: torch.nn.Module, what: str) -> None:
    """Raise :class:`NonFiniteLossError` instead of saving ``what`` from weights holding NaN or inf."""
    bad = [name for name, p in net.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"{len(bad)} weight tensor(s) became NaN or inf (e.g. {bad[0]}); {what} was not "
                                 "written, earlier checkpoints are kept; lower --lr or check the data")


def resolve_checkpoint(ref: str, ckpt_dir: str) -> Path:
    """A checkpoint path, or a run name under ckpt_dir (upstream: ``ckpt_dir/<id>/last.ckpt``); a ref that names
    both (a file ``./NAME`` beside a run NAME) is a FileNotFoundError that asks for a path."""
    p, run = Path(ref), Path(ckpt_dir) / ref / "last.ckpt"
    if p.is_file():
        if run.is_file() and not os.path.samefile(p, run):
            raise FileNotFoundError(f"{ref} names both the file {p} and the run {run}; pass the path of the one "
                                    f"you mean (./{ref} or {run})")
        return p
    for candidate in (run, p / "last.ckpt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint at {ref} nor {run}")


@dataclass(frozen=True)
class ResumePoint:
    """A Lightning checkpoint accepted for resuming: its step, network weights and embedded config (or None)."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    lr: float | None = None  # the run's base learning rate (its optimizer and schedule are resumed with it)
    ema_decay: float | None = None  # the decay of the run's weight average, where it kept one
    optimizer_shapes: tuple[int, dict] = (0, {})  # AdamW's parameter count, {(param index, name): moment shape}
    history: list[dict[str, Any]] = field(default_factory=list)  # the calls of train that made it: run_history


def _checkpoint_to_resume(settings: TrainSettings) -> ResumePoint | None:
    """The checkpoint ``--resume_from`` names, checked (see :func:`read_resume_point`) and compared with the
    settings that a resumed run cannot change; None without resume."""
    if not settings.resume_from:
        return None
    try:
        path = resolve_checkpoint(settings.resume_from, settings.ckpt_dir)
    except FileNotFoundError as e:
        raise TrainingSetupError(f"--resume_from: {e}; pass a run name under --ckpt_dir or a .ckpt path") from None
    resume = read_resume_point(path)
    fresh = f"or start a new run from its weights with --fine_tune_from {path}"
    if resume.lr is not None and not math.isclose(resume.lr, settings.lr, rel_tol=1e-6):
        raise TrainingSetupError(f"--resume_from {path}: the run trains at --lr {resume.lr!r}, which its resumed "
                                 f"optimizer and schedule keep (not --lr {settings.lr!r}); pass --lr {resume.lr!r}, "
                                 f"{fresh}")
    if resume.ema_decay is not None and not settings.ema_decay:  # another decay carries the average on
        raise TrainingSetupError(f"--resume_from {path}: the run keeps an average of its weights (--ema_decay "
                                 f"{resume.ema_decay!r}), which a resume without --ema_decay would drop; pass "
                                 f"--ema_decay {resume.ema_decay!r}, {fresh}")
    resume = dataclasses.replace(resume, history=run_history(path))
    _note_changed_settings(path, settings, resume.history)
    return resume


def _requeued() -> bool:
    """Whether this is a SLURM job that SLURM has requeued (it replays the same command line)."""
    return SLURMEnvironment.detect() and os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


def _requeued_checkpoint(run_dir: Path) -> ResumePoint | None:
    """In a requeued SLURM job, where its last attempt stopped: of the newest ``hpc_ckpt_N.ckpt`` Lightning saved
    at SLURM's warning signal and ``last.ckpt`` (a node failed before the signal, maybe after an earlier
    requeue's signal), the one at the later step; None when there is neither."""
    if not _requeued():
        return None
    saved = [(int(m.group(1)), p) for p in run_dir.glob("hpc_ckpt_*.ckpt")
             if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    last = run_dir / "last.ckpt"
    hpc = read_resume_point(max(saved)[1], "requeued SLURM job") if saved else None
    if not last.is_file():
        return hpc
    try:
        at_last = read_resume_point(last, "requeued SLURM job")
    except TrainingSetupError as e:
        if hpc is None:
            raise
        rank_zero_only(print)(f"note: {e}; resuming {hpc.path} instead", file=sys.stderr)
        return hpc
    return at_last if hpc is None or at_last.step > hpc.step else hpc


def read_resume_point(path: Path, label: str = "--resume_from") -> ResumePoint:
    """Refuse, in one line naming ``path``, a file Lightning could not resume from, before anything is written:
    unreadable, not a complete Lightning checkpoint, or holding NaN/inf weights or optimizer state."""
    try:
        weights, config, ckpt = read_checkpoint_file(path)  # format problems and non-finite weights, one line each
        missing = [k for k in LIGHTNING_KEYS if k not in ckpt]
        if missing:
            raise CheckpointError(f"{path} is not a complete Lightning training checkpoint (no "
                                  f"{', '.join(missing)}); pass a last.ckpt that moceir train (or upstream's "
                                  "train.py) wrote, or pass the file to --fine_tune_from to start from its weights")
        outside = [str(k) for k in ckpt["state_dict"] if not str(k).startswith("net.")]
        if outside:
            raise CheckpointError(f"{path}: its state_dict holds {len(outside)} entries outside the network "
                                  f"(e.g. {outside[0]}; a moceir run holds net.* only); pass it to --fine_tune_from")
        check_finite(_optimizer_tensors(ckpt["optimizer_states"]), f"{path} (optimizer state)")
        lr, decay = _rate_and_average(ckpt, path)
        _check_training_state(ckpt, path)
        state = ckpt["optimizer_states"][0]
        shapes = {(i, name): tuple(t.shape) for i, moments in state["state"].items() if isinstance(moments, Mapping)
                  for name, t in moments.items() if name != "step" and torch.is_tensor(t)}
        return ResumePoint(path, ckpt["global_step"], weights, config, lr, decay,
                           (len(state["param_groups"][0]["params"]), shapes))
    except CheckpointError as e:
        raise TrainingSetupError(f"{label}: {e}") from None


MAX_STEP = 10**12  # a global_step beyond it is no run's (about 30 years of 1,000 steps a second)


def _check_training_state(ckpt: Mapping, path: Path) -> None:
    """A CheckpointError where the step, the optimizer or the schedule is not as Lightning saves a moceir run's
    (one AdamW with one parameter group, one LambdaLR): a damaged or edited file failed inside Lightning or torch
    with a traceback, some after the run folder was made, and a negative step was taken."""
    step, opts, scheds = ckpt["global_step"], ckpt["optimizer_states"], ckpt["lr_schedulers"]
    problem = None
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        problem = f"its global_step is {step!r}, not a step count"
    elif not (isinstance(opts, list) and len(opts) == 1 and isinstance(opts[0], Mapping)
              and isinstance(opts[0].get("state"), Mapping) and isinstance(groups := opts[0].get("param_groups"), list)
              and len(groups) == 1 and isinstance(groups[0], Mapping) and isinstance(groups[0].get("params"), list)):
        problem = "its optimizer state is not one optimizer with one parameter group"
    elif not (isinstance(scheds, list) and len(scheds) <= 1
              and all(isinstance(x, Mapping) and type(x.get("last_epoch")) is int for x in scheds)):
        problem = "its learning-rate schedule is not one schedule with a step count (last_epoch)"
    if problem:
        raise CheckpointError(f"{path}: {problem}, as Lightning saves a moceir run (damaged or edited?); pass it to "
                              "--fine_tune_from to start from its weights")


def _rate_and_average(ckpt: Mapping, path: Path) -> tuple[float | None, float | None]:
    """The run's base learning rate, and the decay of its weight average (None where it kept none), as Lightning
    saved them; a CheckpointError where they are not (a damaged or edited file)."""
    schedulers, callbacks = ckpt["lr_schedulers"], ckpt.get("callbacks") or {}
    try:
        lr = float(schedulers[0]["base_lrs"][0]) if schedulers else None
        ema = next((state for key, state in callbacks.items() if str(key).startswith("WeightEMA")), None)
        decay = None if ema is None else float(ema["decay"])
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        lr = decay = math.nan
    if not all(v is None or math.isfinite(v) for v in (lr, decay)):
        raise CheckpointError(f"{path}: its learning-rate schedule or weight average is not as Lightning saves them "
                              "(damaged or edited?); pass it to --fine_tune_from to start from its weights")
    return lr, decay


def _optimizer_tensors(states: Any) -> dict[str, torch.Tensor]:
    """Adam's moments and steps in a checkpoint's ``optimizer_states``, named for an error message."""
    return {f"optimizer_states[{i}].state[{pid}].{name}": t
            for i, state in enumerate(states if isinstance(states, list) else []) if isinstance(state, Mapping)
            for pid, per_param in (state.get("state") or {}).items() if isinstance(per_param, Mapping)
            for name, t in per_param.items() if torch.is_tensor(t)}


# Config fields that change what training computes without changing a weight's shape: a resume that changed
# them would go on as another run than the one it continues.
RUN_BEHAVIOUR_FIELDS = ("topk", "with_complexity", "complexity_scale")


def check_resume_network(net: MoCEIR, resume: ResumePoint) -> None:
    """Load the checkpoint's weights into ``net`` (Lightning does so again) or refuse, in one line, weights of
    another network, naming mismatched keys and the flags the checkpoint was trained with, or a run that would
    route or weigh its experts otherwise than the run it continues (``RUN_BEHAVIOUR_FIELDS``)."""
    trained_as = _resume_config(resume)
    if trained_as is not None and (diff := architecture_differences(trained_as, net.config)):
        shown = "; ".join(f"{what} {have}, not {asked}" for what, have, asked in diff)
        raise TrainingSetupError(f"--resume_from: {resume.path} holds a network with {shown}; leave out --model and "
                                 f"the shape flags to continue it as it is (it was trained with "
                                 f"{architecture_flags(trained_as)})")
    try:
        load_state_dict_strict(net, resume.weights, str(resume.path))
    except CheckpointError as e:
        raise TrainingSetupError(f"--resume_from: {e}{_trained_with(resume)}") from None
    _check_optimizer_shapes(net, resume)
    trained = resume.config or {}
    weighted = trained.get("with_complexity") or net.config.with_complexity  # else complexity_scale is unused
    changed = [f for f in RUN_BEHAVIOUR_FIELDS if f in trained and trained[f] != getattr(net.config, f)
               and (weighted or f != "complexity_scale")]
    if changed:
        was = " ".join(_flag(f, trained[f]) for f in changed)
        now = " ".join(_flag(f, getattr(net.config, f)) for f in changed)
        raise TrainingSetupError(f"--resume_from {resume.path}: the run was trained with {was}, this call asks for "
                                 f"{now}; pass the run's values to continue it, or --fine_tune_from to start a new "
                                 "run from its weights")


def _check_optimizer_shapes(net: MoCEIR, resume: ResumePoint) -> None:
    """A TrainingSetupError where the checkpoint's optimizer state does not fit ``net``'s parameters (their
    number, or a moment's shape): Lightning loaded it, and the first step failed inside AdamW."""
    count, shapes = resume.optimizer_shapes
    params = [tuple(p.shape) for p in net.parameters()]
    wrong = f"{count} parameters, the network {len(params)}" if count != len(params) else next(
        (f"state[{i}].{name} of shape {shape}, its parameter {params[i] if _index_in(i, params) else 'none'}"
         for (i, name), shape in shapes.items() if not _index_in(i, params) or shape != params[i]), None)
    if wrong:
        raise TrainingSetupError(f"--resume_from {resume.path}: its optimizer state does not fit the network "
                                 f"({wrong}; damaged or edited?); pass it to --fine_tune_from to start from its "
                                 "weights")


def _index_in(i: Any, items: list) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(items)


def _resume_config(resume: ResumePoint) -> MoCEConfig | None:
    """The architecture of the run ``resume`` continues: its embedded config, else what its weights tell."""
    try:
        return (config_from_dict(resume.config, str(resume.path)) if resume.config
                else infer_config(resume.weights, str(resume.path)))
    except CheckpointError:
        return None


def _trained_with(resume: ResumePoint) -> str:
    """'; it was trained with --model X --dim N: ...' where the checkpoint tells its architecture, else ''."""
    config = _resume_config(resume)
    if config is None:
        return ""
    return f"; it was trained with {architecture_flags(config)}: pass those shape flags to continue it"


def _flag(field: str, value: Any) -> str:
    """A config field as the ``moceir train`` flag that sets it: --topk 2, --heads 1 2 4 8, --no-with_complexity."""
    if isinstance(value, bool):
        return f"--{field}" if value else f"--no-{field}"
    return f"--{field} {' '.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"


def architecture_flags(config: MoCEConfig) -> str:
    """The ``moceir train`` flags that build ``config``'s network: the nearest preset and the fields it changes."""
    def changes(preset: MoCEConfig) -> list[str]:
        values = ((f, getattr(config, f)) for f in ARCH_FLAGS if getattr(config, f) != getattr(preset, f))
        return [_flag(f, v) for f, v in values]

    name = min(PRESETS, key=lambda n: len(changes(PRESETS[n])))
    flags = changes(PRESETS[name])
    return " ".join([f"--model {name}", *flags]) if flags else f"--model {name} (no other architecture flag)"


def _check_run_folder(run_dir: Path, resume: ResumePoint | None) -> None:
    """Refuse, before anything is written, a run folder that cannot be written, or that holds an earlier run this
    one does not resume: training into it would replace its model, log and settings."""
    from .pipeline import folder_problem  # pipeline imports the inference stack

    problem = folder_problem(run_dir)
    if problem:
        raise TrainingSetupError(f"run folder {run_dir}: {problem}; choose another --ckpt_dir or --run_name")
    log = run_dir / "logs" / "metrics.csv"  # written in place by Lightning's logger: a FIFO there blocked the run
    if os.path.lexists(log) and (problem := file_problem(log)):
        raise TrainingSetupError(f"{log} {problem}, where the run writes its log; move it away")
    if resume is not None and resume.path.parent.resolve() == run_dir.resolve():
        _refuse_going_back(run_dir, resume)
        return
    if resume is None and _requeued():  # its first attempt died before any checkpoint: it starts again
        return
    ckpts = _run_checkpoints(run_dir)
    earlier = [p.name for p in ckpts] + [f for f in RUN_FILES if (run_dir / f).is_file()]
    if not earlier:
        foreign = _foreign_files(run_dir)
        if foreign:
            raise TrainingSetupError(f"{run_dir} holds {', '.join(foreign)}, which this run would replace and no "
                                     "moceir run wrote; choose another --ckpt_dir or --run_name, or move them away")
        return
    shown = ", ".join(earlier[:4]) + (", ..." if len(earlier) > 4 else "")
    target = _resume_target(run_dir, ckpts)
    todo = (f"pass --resume_from {target} to continue it or choose another --run_name" if target else
            "it has no checkpoint to continue from: choose another --run_name or move its files away")
    raise TrainingSetupError(f"{run_dir} holds an earlier run ({shown}); {todo}")


def _refuse_going_back(run_dir: Path, resume: ResumePoint) -> None:
    """A TrainingSetupError where an earlier checkpoint of the run is resumed in its own folder while last.ckpt
    holds later steps that no epoch checkpoint holds: the resumed run would replace last.ckpt, their only copy.
    (Branching from an earlier epoch is allowed where last.ckpt's step is kept in an epoch checkpoint.)"""
    last = run_dir / "last.ckpt"
    if not last.is_file() or last.resolve() == resume.path.resolve():
        return
    try:
        step = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except Exception:  # noqa: BLE001 - an unreadable last.ckpt holds nothing to keep
        return
    kept = {int(m.group(1)) for p in run_dir.glob("*.ckpt") if (m := re.search(r"step=(\d+)", p.name))}
    if isinstance(step, int) and step > resume.step and step not in kept:
        raise TrainingSetupError(f"--resume_from {resume.path} is at step {resume.step}, but {last} is at step "
                                 f"{step}, which no other checkpoint holds: resuming in this run folder would "
                                 "replace it; resume into a new one (add --run_name NEW; the checkpoint is read "
                                 "where it is) or move last.ckpt away")


def _refuse_data_folder(run_dir: Path, per_task: dict[str, list]) -> None:
    """A TrainingSetupError where the run folder is a folder of training images: its training_curves.png would be
    trained on as an image by the next run (and its files mixed with the data)."""
    if os.path.realpath(run_dir) in data_folders(pair for pairs in per_task.values() for pair in pairs):
        raise TrainingSetupError(f"run folder {run_dir} is a folder of training images: the run's files (its "
                                 "training_curves.png) would join the data; choose a --ckpt_dir outside the data")


def _run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, last.ckpt first, then the newest."""
    return sorted(run_dir.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime, p.name))


def _resume_target(run_dir: Path, ckpts: list[Path]) -> Path | None:
    """What --resume_from takes to continue the run: its folder where last.ckpt is there, else its newest
    checkpoint (``ckpts`` as :func:`_run_checkpoints` orders them); None without any."""
    if not ckpts:
        return None
    return run_dir if ckpts[0].name == "last.ckpt" else ckpts[0]


def _foreign_files(run_dir: Path) -> list[str]:
    """The files in ``run_dir`` that a run writes besides checkpoints and models, where neither its settings.json
    nor its data_check.json is moceir's (an earlier attempt's, which a rerun may replace)."""
    def moceir_json(name: str, keys: tuple[str, ...]) -> bool:
        path = run_dir / name
        try:
            return path.is_file() and path.stat().st_size < 2**28 and isinstance(d := json.loads(path.read_text()),
                                                                                 dict) and set(keys) <= set(d)
        except (OSError, ValueError):
            return False

    if moceir_json("settings.json", ("config", "settings", "start_step")) or \
            moceir_json("data_check.json", ("problems", "files")):
        return []
    return [f for f in WRITTEN_FILES if os.path.lexists(run_dir / f)]


def _fine_tune_source(settings: TrainSettings) -> tuple[MoCEIR | None, list[dict[str, Any]]]:
    """The network ``--fine_tune_from`` names (None without it) and the calls of train that made it
    (:func:`run_history`)."""
    if not settings.fine_tune_from:
        return None, []
    ref = settings.fine_tune_from
    try:
        try:
            path: str | Path = resolve_checkpoint(ref, settings.ckpt_dir)
        except FileNotFoundError:
            if ref != "default":
                raise
            path = "default"  # the bundled model, when no file or run has that name
        return load_model(path), (run_history(path) if path != "default" else [])
    except (FileNotFoundError, CheckpointError) as e:
        raise TrainingSetupError(f"--fine_tune_from: {e}") from None


def run_history(checkpoint: str | Path) -> list[dict[str, Any]]:
    """The calls of ``moceir train`` that made ``checkpoint``, oldest first, from the settings.json beside it: each
    {"settings", "start_step", "global_step"}, the last one that file's own; [] where there is none (upstream's
    checkpoints, a file kept on its own)."""
    try:
        d = json.loads((Path(checkpoint).resolve().parent / "settings.json").read_text())
        record = {"settings": d["settings"], "start_step": d.get("start_step"), "global_step": d.get("global_step")}
        earlier = d.get("earlier", [])
        if not isinstance(record["settings"], dict) or not isinstance(earlier, list):
            return []
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [*(e for e in earlier if isinstance(e, dict) and isinstance(e.get("settings"), dict)), record]


# What a run trains on and toward: a resume that changes them is noted, and settings.json keeps each earlier
# call's settings ("earlier"), so that the run's whole history stays known (e.g. which images it trained on)
DATA_SETTINGS = ("de_type", "trainset", "dehaze_source", "repeats", "holdout_val", "patch_size", "batch_size",
                 "accum_grad", "loss_type", "fft_loss_weight", "balance_loss_weight")
SCHEDULE_SETTINGS = ("epochs", "max_steps", "schedule_epochs", "warmup_epochs")


def _note_changed_settings(path: Path, settings: TrainSettings, history: list[dict[str, Any]]) -> None:
    """A note where this resume trains with other data, loss or schedule settings than the call it continues."""
    if not history:
        return
    before, now = history[-1]["settings"], _settings_dict(settings)
    changed = [k for k in DATA_SETTINGS + SCHEDULE_SETTINGS if k in before and before[k] != now[k]]
    if not changed:
        return
    shown = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
    schedule = (" The learning-rate schedule is laid out again for the new length from the resumed step (see the "
                "lr column of metrics.csv)." if set(changed) & set(SCHEDULE_SETTINGS) else "")
    rank_zero_only(print)(f"note: --resume_from {path}: this call changes {shown}; the run's settings.json keeps "
                          f"each earlier call's settings under \"earlier\".{schedule}", file=sys.stderr)


def _hardware(settings: TrainSettings, capture_stand_in: bool = False) -> tuple[str, int, Any]:
    """(accelerator, devices, strategy); more GPUs than this machine has is an error, not a Lightning traceback.
    ``capture_stand_in``: --cuda_graphs may run on the CPU (tests capture with a stand-in)."""
    available = torch.cuda.device_count()
    gpus = settings.num_gpus if settings.num_gpus is not None else min(1, available)
    if gpus > available:
        raise TrainingSetupError(f"--num_gpus {gpus} but this machine has {available} CUDA device(s); "
                                 f"pass --num_gpus {available}{' (0 trains on the CPU)' if available else ''}")
    accelerator, devices = ("gpu", gpus) if gpus > 0 else ("cpu", settings.num_cpu_processes)
    if settings.cuda_graphs and accelerator != "gpu" and not capture_stand_in:
        raise TrainingSetupError("--cuda_graphs captures the step on a CUDA GPU, and this run would train on the "
                                 "CPU; leave --cuda_graphs out")
    if settings.cuda_graphs and (devices > 1 or settings.num_nodes > 1):
        raise TrainingSetupError(f"--cuda_graphs trains on one device, not {devices * settings.num_nodes}; pass "
                                 "--num_gpus 1 --num_nodes 1, or leave --cuda_graphs out")
    from .distributed import multi_node_problem

    if problem := multi_node_problem(settings.num_nodes):
        raise TrainingSetupError(problem)
    if devices == 1 and settings.num_nodes == 1:
        return accelerator, devices, "auto"
    dense = settings.dispatch == "dense" or (settings.dispatch == "auto" and accelerator == "gpu")
    # Sparse dispatch skips experts no image picked; DDP must then look for unused parameters.
    return accelerator, devices, DDPStrategy(find_unused_parameters=not dense)


def build_dataloader(settings: TrainSettings, batch_size: int) -> tuple[DataLoader, dict[str, list]]:
    """The shuffled patch loader and the (repeated) pairs per task; a bad layout is a TrainingSetupError."""
    try:
        per_task = build_train_pairs(settings.data_file_dir, list(settings.de_type), settings.trainset,
                                     settings.dehaze_source, settings.repeats, settings.holdout_val)
    except (DatasetLayoutError, ValueError) as e:
        raise TrainingSetupError(str(e)) from None
    pairs = [p for task_pairs in per_task.values() for p in task_pairs]
    loader = DataLoader(PairedPatchDataset(pairs, settings.patch_size), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=settings.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=settings.num_workers > 0)
    if len(loader) == 0:
        raise TrainingSetupError(f"{len(pairs)} training patches make no full batch of {batch_size}; "
                                 "lower --batch_size")
    return loader, per_task


def _check_images(per_task: dict[str, list], run_dir: Path, patch_size: int) -> None:
    """Open every training image once (cached in run_dir/data_check.json); all bad files in one error."""
    report = run_dir / "data_check.json"
    problems = check_training_images([p for pairs in per_task.values() for p in pairs], report,
                                     patch_size=patch_size, log=rank_zero_only(print))  # once, not per process
    if problems:
        shown = "; ".join(f"{Path(f).name} ({why})" for f, why in list(problems.items())[:3])
        raise TrainingSetupError(f"{len(problems)} unusable training image(s): {shown}"
                                 f"{' ...' if len(problems) > 3 else ''} see {report}; replace or remove them")


def _trainer(settings: TrainSettings, run_dir: Path, resume: ResumePoint | None,
             extra: tuple[Callback, ...] = (), capture_stand_in: bool = False) -> pl.Trainer:
    accelerator, devices, strategy = _hardware(settings, capture_stand_in)
    history = resume.path.parent / "logs" / "metrics.csv" if resume else None
    checkpoints = RunCheckpoint(dirpath=run_dir, every_n_epochs=settings.save_every_n_epochs, save_top_k=-1,
                                save_last=True, resuming=resume is not None)
    try:
        return pl.Trainer(
            max_epochs=settings.epochs, max_steps=settings.max_steps, max_time=settings.max_time,
            accelerator=accelerator, devices=devices, num_nodes=settings.num_nodes, strategy=strategy,
            precision=settings.precision,
            accumulate_grad_batches=settings.accum_grad, default_root_dir=run_dir,
            logger=[TensorBoardLogger(run_dir, name="logs", version=""),
                    ResumableCSVLogger(run_dir, history, resume.step if resume else 0)],
            callbacks=[*extra, checkpoints, TQDMProgressBar(refresh_rate=10), PlotAtEnd(run_dir)],
            plugins=[AtomicCheckpointIO()], log_every_n_steps=settings.log_every_n_steps,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError) as e:
        raise TrainingSetupError(f"cannot set up the trainer: {e}") from None


def _run_folder(settings: TrainSettings) -> tuple[Path, list[Path]]:
    """The run folder, and the folders this call made for it: --ckpt_dir/--run_name, else a name that every
    process of the run agrees on.

    Processes that Lightning starts for DDP inherit MOCEIR_RUN_NAME from the first one; a SLURM job uses its
    job id (so a requeued job finds its run folder); separate launches on several nodes need --run_name. A name
    made here (the start time) is claimed by making its folder, as ``<time>_2``, ``_3``, ... where runs started
    in the same second took it: each run writes into its own folder.
    """
    root = Path(settings.ckpt_dir)
    if settings.run_name:
        return root / settings.run_name, []
    name = os.environ.get("MOCEIR_RUN_NAME") or (f"slurm_{os.environ['SLURM_JOB_ID']}"
                                                 if os.environ.get("SLURM_JOB_ID") else None)
    if name is not None:
        return root / name, []
    if settings.num_nodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingSetupError("--run_name is required when several launched processes train together "
                                 "(each must write to the same run folder)")
    stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
    name, made = stamp, []
    with contextlib.suppress(OSError):  # an unwritable --ckpt_dir: the run folder check names it
        made = _make_folders(root)
        for n in range(2, 10_000):
            try:
                (root / name).mkdir()
            except FileExistsError:
                name = f"{stamp}_{n}"
            else:
                made.append(root / name)
                break
    os.environ["MOCEIR_RUN_NAME"] = name
    return root / name, made


def _make_folders(path: Path) -> list[Path]:
    """``path`` and its missing parents, made -> those made, outermost first."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _lock_run_folder(run_dir: Path) -> tuple[int | None, list[Path]]:
    """Lock the run folder for this call (rank 0 only) -> (the lock's descriptor, the folders made for it).

    A second ``moceir train`` into the folder is refused while this one runs, even before either has written a
    file. No lock where the folder cannot be made (the run folder check says why) or the file system has none.
    """
    from .pipeline import folder_problem  # pipeline imports the inference stack

    try:
        import fcntl
    except ImportError:  # Windows
        return None, []
    if folder_problem(run_dir):  # the run folder check names it
        return None, []
    try:
        made = _make_folders(run_dir)
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None, []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TrainingSetupError(f"{run_dir} is in use: another moceir train is writing to it now; wait for it to "
                                 "end or choose another --run_name") from None
    except OSError:
        os.close(fd)
        return None, made
    _HELD_LOCKS.add(fd)
    return fd, made


_HELD_LOCKS: set[int] = set()  # the run folder locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the copies of the run folder locks, which would otherwise
    keep the folder locked for as long as the worker lives (a flock belongs to the open file, not the process)."""
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def train(config: MoCEConfig | None, settings: TrainSettings, capture: Capture | None = None,
          changes: Mapping[str, Any] | None = None) -> Path:
    """Run training; returns the run folder (checkpoints, logs, plots, model.safetensors, settings.json, and
    model_ema.safetensors with ``ema_decay``). Its settings.json says how far training got: ``global_step``, and
    ``start_step`` (0, or the step resumed from); when they are equal this call trained nothing.

    Settings, checkpoints to resume or fine-tune from, hardware, the data layout and the run folder (writable, and
    holding no earlier run unless this one resumes it) are checked before anything is written; every training
    image is checked before the first step. ``capture``: with ``cuda_graphs``, a stand-in for CUDA-graph capture
    that lets the captured path run on the CPU (tests). ``config`` None: the architecture of ``fine_tune_from``,
    or of the run ``resume_from`` continues with the fields in ``changes`` (flags given without --model: they are
    checked against that run, not against a preset); a config that asks for another architecture than that
    checkpoint's is refused (it would be ignored).
    """
    settings.validate()
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    resume = _checkpoint_to_resume(settings)
    source, source_history = _fine_tune_source(settings)
    if source is None and config is None and resume is not None:  # a resumed run keeps its own architecture
        config = _resume_config(resume)
        if config is None:
            raise TrainingSetupError(f"--resume_from {resume.path}: its architecture cannot be told from the file; "
                                     "pass --model and the shape flags the run was trained with")
        try:
            config = config.replace(**changes) if changes else config
        except ValueError as e:  # flags that make no network with the run's other fields
            raise TrainingSetupError(f"--resume_from {resume.path}: {e}") from None
    if source is None and config is None:
        raise TrainingSetupError("no architecture to train: pass a config, or fine_tune_from a checkpoint")
    if source is not None and config is not None and (diff := architecture_differences(source.config, config)):
        shown = "; ".join(f"{what} {have}, not {asked}" for what, have, asked in diff)
        raise TrainingSetupError(f"--fine_tune_from {settings.fine_tune_from} holds a network with {shown}; "
                                 "fine-tuning keeps its architecture: leave out --model and the architecture flags")
    loader, per_task = build_dataloader(settings, max(1, settings.batch_size // settings.accum_grad))
    run_dir, made = _run_folder(settings)
    lock, made_here = _lock_run_folder(run_dir) if is_rank_zero() else (None, [])
    try:
        return _train_in(run_dir, config, settings, capture, resume, source, loader, per_task,
                         resume.history if resume else source_history)
    except BaseException:  # a refused or interrupted run leaves no empty folder behind (rmdir: empty ones only)
        for folder in reversed(made + made_here):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        if lock is not None:
            _HELD_LOCKS.discard(lock)
            os.close(lock)


def _train_in(run_dir: Path, config: MoCEConfig | None, settings: TrainSettings, capture: Capture | None,
              resume: ResumePoint | None, source: MoCEIR | None, loader: DataLoader,
              per_task: dict[str, list], history: list[dict[str, Any]]) -> Path:
    """:func:`train` once its run folder is chosen (and locked)."""
    if requeued := _requeued_checkpoint(run_dir):  # a requeue replays --resume_from: its own run comes first
        resume, history = requeued, run_history(requeued.path)[:-1]  # the last record: this very call's
    _refuse_data_folder(run_dir, per_task)
    _check_run_folder(run_dir, resume)
    if resume is None and _requeued():  # every rank, before any logs: the dead first attempt's rows go
        (run_dir / "logs" / "metrics.csv").unlink(missing_ok=True)
    module = _module(source.config if source else config, settings, capture, source, resume)
    resume = dataclasses.replace(resume, weights={}) if resume else None  # checked; Lightning reads the file
    ema = WeightEMA(settings.ema_decay) if settings.ema_decay > 0 else None
    start_step = resume.step if resume else 0
    at_start = WriteAtStart(run_dir / "settings.json", _settings_json(module.net.config, settings, start_step,
                                                                      history=history))
    trainer = _trainer(settings, run_dir, resume, (at_start, ema) if ema else (at_start,), capture is not None)

    run_dir.mkdir(parents=True, exist_ok=True)
    _check_images(per_task, run_dir, settings.patch_size)
    sizes = {task: len(pairs) for task, pairs in per_task.items()}
    if is_rank_zero():  # each rank runs this command
        print(f"training patches per task: {sizes}; run folder: {run_dir}")
    _fit(trainer, module, loader, resume, run_dir)
    if trainer.is_global_zero:
        require_finite(module.net, "model.safetensors")
        try:
            save_model(module.net, run_dir / "model.safetensors", overwrite=True)
            if ema is not None:
                _save_ema(ema, module.net, run_dir / "model_ema.safetensors")
            write_text(run_dir / "settings.json", _settings_json(module.net.config, settings, start_step, trainer,
                                                                 history))
        except OSError as e:  # save_model passes a full disk or read-only folder on as the OSError it is
            advice = write_error_advice(e.errno, "--ckpt_dir")
            if advice is None:
                raise
            raise TrainingOutputError(f"training ended but {e.filename or run_dir} could not be written "
                                      f"({e.strerror}); {advice}, then write the model from the last "
                                      f"checkpoint: moceir export {run_dir / 'last.ckpt'} "
                                      f"{run_dir / 'model.safetensors'}") from None
    return run_dir


def _module(config: MoCEConfig, settings: TrainSettings, capture: Capture | None, source: MoCEIR | None,
            resume: ResumePoint | None) -> MoCEModule:
    """The LightningModule: fine-tuned weights loaded, the resume checkpoint checked against it, compiled."""
    module = MoCEModule(config, settings, capture)
    if source:
        module.net.load_state_dict(source.state_dict())
    if resume:
        check_resume_network(module.net, resume)
    if settings.channels_last:
        module.net.to(memory_format=torch.channels_last)
    if settings.compile != "none":
        compile_network(module.net, settings.compile, settings.compile_scope)
    return module


def _fit(trainer: pl.Trainer, module: MoCEModule, loader: DataLoader, resume: ResumePoint | None,
         run_dir: Path) -> None:
    """trainer.fit; an image that became unreadable (or changed size) since it was checked is a one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's, on torch 2.13
        warnings.filterwarnings("ignore", message="The dirpath has changed from")  # a moved run folder: harmless here
        if module.settings.cuda_graphs:  # training_step returns no loss on purpose: the replay has done the backward
            warnings.filterwarnings("ignore", message=".*`training_step` returned `None`")
        try:
            with _thread_errors_left_to_the_main_thread():
                trainer.fit(module, train_dataloaders=loader, ckpt_path=resume.path if resume else None)
        except SystemExit as e:  # Lightning's ends of a stopped run: SIGTERMException, or exit 1 after a Ctrl-C
            if not (isinstance(e, SIGTERMException) or trainer.interrupted):
                raise
            then = _how_to_go_on(run_dir)
            how, code = ("by SIGTERM", 143) if isinstance(e, SIGTERMException) else ("(Ctrl-C)", 130)
            raise TrainingStopped(f"training stopped {how} at step {trainer.global_step}; this call wrote no "
                                  f"model.safetensors; {then}", code) from None
        except Exception as e:
            then = _how_to_go_on(run_dir)
            if trainer.world_size > 1 and _lost_a_peer(e) and _data_problem(e) is None:
                what = first_line(e)
                raise TrainingPeerError(f"rank {trainer.global_rank}: a collective failed ({type(e).__name__}: "
                                        f"{what}); if another process of this run stopped, its own error says why "
                                        f"(above, or in its node's log); fix that, then {then}") from None
            advice = write_error_advice(e.errno, "--ckpt_dir") if isinstance(e, OSError) else None
            if advice is not None:
                raise TrainingOutputError(f"cannot write {e.filename or f'into {run_dir}'}: {e.strerror}; {advice}, "
                                          f"then {then}") from None
            if isinstance(e, torch._dynamo.exc.TorchDynamoException):
                what = first_line(e)
                dense = "" if module.settings.dispatch == "dense" else (", or with --dispatch dense (static shapes, "
                                                                         "which compile)")
                raise TrainingCompileError(f"torch.compile failed ({type(e).__name__}: {what}); train without "
                                           f"--compile{dense}, then {then}") from None
            problem = _data_problem(e)
            if problem is None:
                raise
            raise TrainingDataError(f"during training: {problem}; then {then}") from None


def _how_to_go_on(run_dir: Path) -> str:
    """What to do after a stopped run: resume from its newest checkpoint, else train again."""
    target = _resume_target(run_dir, _run_checkpoints(run_dir))
    if target:
        return f"resume with --resume_from {target}"
    if any((run_dir / f).is_file() for f in RUN_FILES):  # a new run into the folder would be refused
        return "train again under another --run_name (or move this run's files away)"
    return "train again (the same --run_name: the run left no checkpoint, model or log)"


def _lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away (gloo, NCCL): each rank says
    so in one line, the failed rank's own error says why."""
    if isinstance(error, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "closed by peer"))


@contextlib.contextmanager
def _thread_errors_left_to_the_main_thread() -> Iterator[None]:
    """Keep a full disk or read-only folder in a logger's writer thread (TensorBoard's) from printing a traceback:
    the main thread meets the same error and reports it in one line."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and write_error_advice(args.exc_value.errno, "") is not None):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _data_problem(error: BaseException | None) -> str | None:
    """The message of an ImageReadError or DatasetLayoutError behind ``error`` (Lightning may wrap it; a DataLoader
    worker's copy carries the worker's traceback, whose last line holds the message), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ImageReadError, DatasetLayoutError)):
            text, marker = str(error), f"{type(error).__module__}.{type(error).__qualname__}: "
            return (text[text.index(marker) + len(marker):] if marker in text else text).strip()
        error = error.__cause__ or error.__context__
    return None


def _save_ema(ema: WeightEMA, net: MoCEIR, path: Path) -> None:
    """The averaged weights as a model file of their own (config embedded): ``moceir.load_model(path)``."""
    averaged = ema.network(net)
    require_finite(averaged, path.name)
    save_model(averaged, path, note=f"exponential moving average of the training weights, decay {ema.decay:g}",
               overwrite=True)


def _settings_dict(settings: TrainSettings) -> dict[str, Any]:
    """``settings`` as settings.json records them (its de_type a list, as JSON reads it back)."""
    d = dataclasses.asdict(settings)
    d["de_type"] = list(settings.de_type)
    return d


def _settings_json(config: MoCEConfig, settings: TrainSettings, start_step: int,
                   trainer: pl.Trainer | None = None, history: list[dict[str, Any]] = ()) -> str:
    """The run's model config and settings, the step it started from (0, or the resumed checkpoint's); global_step
    and epoch once training has ended (global_step == start_step: this call trained nothing); ``earlier``: the
    calls of train that made the checkpoint resumed or fine-tuned from (:func:`run_history`)."""
    d = {"config": config.to_dict(), "settings": _settings_dict(settings), "start_step": start_step,
         "global_step": trainer.global_step if trainer else None, "epoch": trainer.current_epoch if trainer else None,
         "earlier": list(history)}
    return json.dumps(d, indent=1)

"""What a training run keeps besides its step: an EMA of the weights, checkpoints, a resumable log and plots.

Lightning callbacks and plugins used by :func:`moceir.training.train`: :class:`WeightEMA`, :class:`RunCheckpoint`
(a checkpoint per complete epoch, ``last.ckpt`` at epoch ends and the end, never from non-finite weights),
:class:`AtomicCheckpointIO` (no truncated file after a crash), :class:`ResumableCSVLogger` (a resumed run continues
``metrics.csv``), :class:`WriteAtStart` (settings.json once a resume is accepted) and :class:`PlotAtEnd`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from .io import write_atomically
from .models import MoCEIR
from .runtime import first_line


def epoch_complete(trainer: pl.Trainer) -> bool:
    """Whether every batch of the current epoch has run (False when max_steps or max_time cut it short)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or progress.current.ready >= trainer.num_training_batches


def count_epoch_completed(checkpoint: dict) -> None:
    """Record a finished epoch as completed and the next one as not yet started.

    Lightning saves at epoch end before it counts the epoch, and with ``max_steps`` it then resumes inside the
    finished epoch: one extra batch there, rows logged under the old epoch, an extra ``epoch=E-step=S.ckpt``.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    if not epochs or not batches or epochs["total"]["completed"] != epochs["total"]["processed"] - 1:
        return
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]
    batches["current"] = dict.fromkeys(batches["current"], 0)
    batches["is_last_batch"] = False


class WeightEMA(Callback):
    """Exponential moving average of the network's parameters: ``ema = decay * ema + (1 - decay) * weights``.

    Kept on the parameters' device in fp32 and updated after every optimizer step with one fused lerp (no host
    synchronisation). It starts from the weights at the start of training (after ``--fine_tune_from``) and
    travels in Lightning checkpoints, so a resumed run continues it.
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []
        self._loaded: dict[str, torch.Tensor] | None = None
        self._step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        named = [(n, p) for n, p in pl_module.net.named_parameters()]
        self.names, self._live = [n for n, _ in named], [p for _, p in named]
        loaded = self._loaded or {}
        self.params = [loaded[n].to(p.device, p.dtype) if n in loaded else p.detach().clone() for n, p in named]
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self._step:  # an optimizer step happened (not every batch with accum_grad)
            self._step = trainer.global_step
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.params, [p.detach() for p in self._live], 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "params": self.averaged()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict.get("params")

    def averaged(self) -> dict[str, torch.Tensor]:
        """Parameter name -> averaged value (on the CPU)."""
        return {n: p.detach().cpu() for n, p in zip(self.names, self.params)}

    def network(self, net: MoCEIR) -> MoCEIR:
        """A CPU copy of ``net`` holding the averaged parameters (buffers from ``net``)."""
        ema = MoCEIR(net.config)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        state.update(self.averaged())
        ema.load_state_dict(state)
        return ema


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, but ``epoch=E-step=S.ckpt`` only for complete epochs, ``last.ckpt`` at every
    epoch end and at the end of training, and nothing from non-finite weights."""

    def __init__(self, *args: Any, resuming: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resuming = resuming

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if epoch_complete(trainer) and (trainer.current_epoch + 1) % self._every_n_epochs == 0:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        """``last.ckpt`` is replaced in place, never versioned: in a run folder that was moved or copied (the
        checkpoint holds the old folder's path) Lightning wrote last-v1.ckpt beside a stale last.ckpt, from which
        the next resume started again. Epoch checkpoints keep Lightning's -v1 names beside earlier ones."""
        counter, self._enable_version_counter = self._enable_version_counter, False
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self._enable_version_counter = counter

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        from .training import require_finite  # training imports this module

        require_finite(trainer.lightning_module, Path(filepath).name)
        super()._save_checkpoint(trainer, filepath)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: str) -> None:  # replaces Lightning's private check
        """Warn of earlier checkpoints unless resuming: settings.json, data_check.json and logs/ are always there."""
        if not self.resuming and dirpath and any(Path(dirpath).glob("*.ckpt")):
            rank_zero_warn(f"run folder {dirpath} already holds checkpoints; new ones are written beside them")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file, then renames, so a crash never leaves a truncated checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # torch.save into a file reports a full disk as a RuntimeError of its C++ writer; a buffer costs one
        # checkpoint-sized copy in memory on rank 0 (the weights and AdamW's two moments, and the EMA's if kept)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()), overwrite=True)


class _ResumedWriter(ExperimentWriter):
    """Writes ``metrics.csv`` starting from the rows of ``history`` logged before ``start_step``."""

    def __init__(self, log_dir: str, history: Path | None, start_step: int):
        super().__init__(log_dir)
        rows, keys = _read_rows(history) if history else ([], [])
        in_place = history is not None and os.path.isfile(self.metrics_file_path) \
            and os.path.samefile(history, self.metrics_file_path)  # the resumed run's own log, rewritten below
        if in_place and not rows and _has_lines(history):  # unreadable as a whole (its header)
            kept = _free_name(Path(self.metrics_file_path).with_name("metrics.unreadable.csv"))
            os.replace(self.metrics_file_path, kept)
            print(f"note: {history} could not be read (no row of numbers under a header with a step column); "
                  f"kept as {kept}, and the resumed run's log starts anew", file=sys.stderr)
        if in_place and any(float(r["step"]) >= start_step for r in rows):  # a branch, or a dead attempt's rows
            kept = Path(self.metrics_file_path).with_name(f"metrics.before-resume-at-step-{start_step}.csv")
            kept = _free_name(kept)
            shutil.copyfile(self.metrics_file_path, kept)
            print(f"note: {history} held rows from step {start_step} on, where this run resumes; the whole "
                  f"log is kept as {kept}", file=sys.stderr)
        rows = [r for r in rows if float(r["step"]) < start_step]
        if rows:
            self.metrics_keys = sorted(keys)
            with open(self.metrics_file_path + ".tmp", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(self.metrics_file_path + ".tmp", self.metrics_file_path)
        elif history is not None and os.path.isfile(self.metrics_file_path):  # resumed before its first logged step
            os.remove(self.metrics_file_path)

    def _check_log_dir_exists(self) -> None:
        """Lightning's version warns and deletes metrics.csv; __init__ keeps the rows a resume continues."""

    def save(self) -> None:
        try:
            super().save()
        except OSError as e:  # a full disk, as file.write reports it: the file's name goes into the one-line error
            e.filename = e.filename or self.metrics_file_path
            raise


def _has_lines(path: Path) -> bool:
    """Whether ``path`` holds more than a header line (something a resume could lose)."""
    if not path.is_file():  # a FIFO would block the open
        return False
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return len(f.read(1 << 16).strip().splitlines()) > 1
    return False


def _free_name(path: Path) -> Path:
    """``path``, or ``<stem>-2<suffix>``, ``-3``, ... where that is taken."""
    n, free = 2, path
    while os.path.lexists(free):
        free, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return free


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of an earlier metrics.csv and its header; rows that are not all numbers (a crash cut the last one
    short, a damaged byte) are left out, so that neither the resumed log nor its plot fails on them."""
    from .plots import metrics_reader

    if not path.is_file():
        return [], []
    reader, rows = metrics_reader(path), []
    try:
        keys = list(reader.fieldnames or [])
    except csv.Error:  # a damaged header line
        return [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows, keys
        except csv.Error:  # one damaged line (a field over csv's size limit, a NUL): the lines after it still count
            continue
        if None not in row and _numeric(row):
            rows.append(row)


def _numeric(row: dict) -> bool:
    """Whether a metrics.csv row has a step and every value it holds is a number."""
    if row.get("step") in ("", None):
        return False
    try:
        for value in row.values():
            if value not in ("", None):
                float(value)
    except ValueError:
        return False
    return True


class ResumableCSVLogger(CSVLogger):
    """CSVLogger into ``run/logs/metrics.csv`` that, on resume, keeps the earlier rows instead of erasing them."""

    def __init__(self, run_dir: Path, history: Path | None = None, start_step: int = 0):
        super().__init__(run_dir, name="logs", version="")
        self._history, self._start_step = history, start_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumedWriter(self.log_dir, self._history, self._start_step)
        return self._experiment


class WriteAtStart(Callback):
    """Writes ``text`` into ``path`` (atomically, on rank zero) when training starts: after Lightning has restored a
    resumed checkpoint, so a resume that fails leaves the run's earlier file as it was."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            write_text(self.path, self.text)


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename: a crash leaves the old file or the new one, never half of one."""
    write_atomically(path, lambda tmp: tmp.write_text(text), overwrite=True)


class PlotAtEnd(Callback):
    """Writes the loss / balance / learning-rate plots into the run folder when training ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.save()
            from .plots import MetricsError, plot_training_logs

            try:
                plot_training_logs(self.run_dir)
            except FileNotFoundError:  # too few steps to log anything
                print(f"no logged steps yet; no plots written to {self.run_dir}")
            except MetricsError as e:  # a damaged log must not cost the model that is written next
                print(f"note: training_curves.png not drawn: {e}", file=sys.stderr)
            except Exception as e:  # noqa: BLE001 - nor may a plot that fails (matplotlib): the model is written next
                print(f"note: training_curves.png not drawn ({type(e).__name__}: {first_line(e)}); "
                      f"moceir plot-logs {self.run_dir} draws it again", file=sys.stderr)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A run that stops on an error still gets curves up to that step (a resumed one: not the earlier call's)."""
        if trainer.is_global_zero:
            from .plots import plot_training_logs

            with contextlib.suppress(Exception):  # the training error is the one to report
                for lg in trainer.loggers:
                    lg.save()
                plot_training_logs(self.run_dir)

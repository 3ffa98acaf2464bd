"""Restore and evaluate across processes, GPUs and nodes with Lightning's ``Trainer.predict``.

Every rank builds the same plan (the same inputs, outputs and batches), takes every world_size-th batch, restores
it with the same :class:`moceir.pipeline.Restorer` as one process does, and writes its own outputs through a
prediction writer. No input is padded or duplicated, so each is restored exactly once. Report rows and benchmark
scores are gathered on every rank; rank 0 writes the report and the tables.

Launching follows Lightning's "ddp" strategy: the command re-runs itself once per local process, or is started by
``torchrun`` / SLURM's ``srun``, which Lightning detects.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .checks import is_whole
from .pipeline import ImageFiles, Plan, Restorer, RestoreOptions, UsageError, as_list
from .runtime import Terminated

warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
# The writer below finds each batch's images by its own plan, never by Lightning's batch indices
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")


# What torchrun, SLURM, LSF, MPI or a hand-made Lightning multi-node start sets; without any, a node cannot know
# its rank.
LAUNCHER_ENV = ("NODE_RANK", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "MASTER_ADDR", "WORLD_SIZE",
                "LSB_JOBID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def multi_node_problem(num_nodes: int) -> str | None:
    """Why ``num_nodes`` machines cannot start from this process (no launcher said which node it is: it would wait
    silently, forever, for nodes that never come), or None."""
    if num_nodes > 1 and not any(var in os.environ for var in LAUNCHER_ENV):
        return (f"--num_nodes {num_nodes} needs a launcher on each node: torchrun --nnodes {num_nodes} --node_rank N "
                "--master_addr HOST, or srun under SLURM (README, scaling out); started by hand, this process "
                "would wait for the other nodes forever")
    return None


@dataclass(frozen=True)
class Launch:
    """Where to run: ``num_gpus`` per node (0: CPU), ``num_nodes``, ``num_cpu_processes`` per node on CPU."""

    num_gpus: int = 0
    num_nodes: int = 1
    num_cpu_processes: int = 1

    def __post_init__(self) -> None:
        for name, least in (("num_gpus", 0), ("num_nodes", 1), ("num_cpu_processes", 1)):
            value = getattr(self, name)
            if not is_whole(value) or value < least:
                raise UsageError(f"{name} must be a whole number >= {least}, not {value!r}")
        if problem := multi_node_problem(self.num_nodes):  # before any work: the run could never start
            raise UsageError(problem)
        if self.num_gpus and not torch.cuda.is_available():  # one GPU asked for would have run on the CPU
            raise UsageError(f"--num_gpus {self.num_gpus} needs CUDA, which this machine lacks; leave it out (or "
                             "use --num_cpu_processes N) to run on the CPU")

    @property
    def world_size(self) -> int:
        return (self.num_gpus or self.num_cpu_processes) * self.num_nodes

    def trainer(self) -> pl.Trainer:
        for name in ("lightning.pytorch", "lightning.fabric"):  # its banner and tips are noise in a restore
            logging.getLogger(name).setLevel(logging.WARNING)
        return pl.Trainer(accelerator="gpu" if self.num_gpus else "cpu", devices=self.num_gpus or self.num_cpu_processes,
                          num_nodes=self.num_nodes, strategy="ddp" if self.world_size > 1 else "auto",
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, use_distributed_sampler=False)


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, on every rank (a list of one outside a distributed run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def share(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Every world-th batch from ``rank``, topped up with empty batches so that all ranks run equally many steps
    (Lightning's predict loop stops every rank at the shortest rank's count). Nothing is duplicated."""
    mine = batches[rank::world]
    return mine + [[] for _ in range(-(-len(batches) // world) - len(mine))]


class PlannedBatches(torch.utils.data.Sampler):
    """A fixed list of batches (lists of indices), as a batch sampler; no shuffling."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _RestoreTask(pl.LightningModule):
    """predict_step restores one planned batch; the writer callback hands its results to the rank's Restorer."""

    def __init__(self, net: torch.nn.Module, plan: Plan, options: RestoreOptions, budget: float,
                 num_workers: int, log: Callable[[str], None]):
        super().__init__()
        self.net, self.plan, self.options, self.budget = net, plan, options, budget
        self.num_workers, self.log = num_workers, log
        self.restorer: Restorer | None = None
        self.rows: dict[int, dict] = {}
        self.writer_error: BaseException | None = None

    def predict_dataloader(self) -> _AsPlanned:
        mine = PlannedBatches(share(self.plan.batches, self.trainer.global_rank, self.trainer.world_size))
        return _AsPlanned(torch.utils.data.DataLoader(ImageFiles(self.plan.jobs), batch_sampler=mine,
                                                      num_workers=self.num_workers, collate_fn=as_list))

    def on_predict_start(self) -> None:
        self.net.eval()
        self.restorer = Restorer(self.net, self.device, self.plan.jobs, self.options, self.budget, self.log,
                                 progress=False)

    def predict_step(self, items: list, batch_idx: int) -> list:
        return [r for group in self.restorer.groups(items) for r in self.restorer.compute(group)]

    def on_predict_end(self) -> None:
        rows = self.restorer.close()
        self.rows = {i: r for part in _gather(rows) for i, r in part.items()}
        self.writer_error = self.restorer.writer_error  # raised by the caller once the report is written

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # decoded images stay on the host; the Restorer moves each batch


class RestoredImageWriter(BasePredictionWriter):
    """Writes each rank's restored images as its batches finish (atomically, through the Restorer's writer)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        pl_module.restorer.submit(prediction)


def restore_distributed(net: torch.nn.Module, plan: Plan, options: RestoreOptions, budget: float, launch: Launch,
                        num_workers: int = 0, log: Callable[[str], None] = print
                        ) -> tuple[dict[int, dict], BaseException | None]:
    """Restore ``plan`` across ``launch``'s processes -> (every rank's rows by job index, the same on every rank;
    an unexpected error of this rank's writer, a bug, for the caller to raise after the report is written)."""
    task = _RestoreTask(net, plan, options, budget, num_workers, log)
    trainer = launch.trainer()
    trainer.callbacks.append(RestoredImageWriter())
    _predict(trainer, task)
    return task.rows, task.writer_error


def _predict(trainer: pl.Trainer, task: pl.LightningModule) -> None:
    """trainer.predict; a Ctrl-C or SIGTERM, which Lightning turns into exit code 1, is a KeyboardInterrupt (or
    Terminated) again: the command line says so in one line, exit code 130 (143), as for one process."""
    try:
        trainer.predict(task, return_predictions=False)
    except SystemExit:
        if trainer.interrupted:
            raise (Terminated if getattr(trainer, "received_sigterm", False) else KeyboardInterrupt) from None
        raise


class _AsPlanned:
    """Hands a DataLoader to Lightning as a plain iterable, so that Lightning uses the planned batches as they
    are instead of rebuilding the loader around its own sampler wrappers."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class _Indices(torch.utils.data.Dataset):
    """Item i is i: the scoring function reads the image itself."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _EvaluateTask(pl.LightningModule):
    """One predict dataloader per benchmark; each rank scores every world_size-th image of each."""

    def __init__(self, net: torch.nn.Module, datasets: list, sizes: list[int], score: Callable[..., dict | str]):
        super().__init__()
        self.net, self.datasets, self.sizes, self.score = net, datasets, sizes, score
        self.rows: list[dict[int, dict | str]] = [{} for _ in datasets]

    def predict_dataloader(self) -> list[_AsPlanned]:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return [_AsPlanned(torch.utils.data.DataLoader(
            _Indices(n), collate_fn=as_list, batch_sampler=PlannedBatches(share([[i] for i in range(n)], rank, world))))
            for n in self.sizes]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch

    def predict_step(self, indices: list[int], batch_idx: int, dataloader_idx: int = 0) -> list[int]:
        for idx in indices:
            self.rows[dataloader_idx][idx] = self.score(self.net, self.datasets[dataloader_idx], idx, self.device)
        return indices  # not None, which Lightning would warn about; the rows are gathered at the end

    def on_predict_end(self) -> None:
        merged: list[dict[int, dict | str]] = [{} for _ in self.datasets]
        for part in _gather(self.rows):
            for d, rows in enumerate(part):
                merged[d].update(rows)
        self.rows = merged


def evaluate_distributed(net: torch.nn.Module, datasets: list, sizes: list[int], score: Callable[..., dict | str],
                         launch: Launch) -> list[list[dict | str]]:
    """``score(net, datasets[d], index, device)`` for index in range(sizes[d]) of every d, across ``launch``'s
    processes. Returns, per dataset, the results in image order (the same on every rank).
    """
    task = _EvaluateTask(net, datasets, sizes, score)
    _predict(launch.trainer(), task)
    return [[rows[i] for i in sorted(rows)] for rows in task.rows]

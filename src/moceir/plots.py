"""Plots people would rather look at than read: training curves and routing heatmaps."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .io import write_atomically
from .runtime import first_line


class MetricsError(ValueError):
    """A metrics.csv that moceir cannot read (not written by ``moceir train``, or damaged)."""


def metrics_reader(path: Path) -> csv.DictReader:
    """A DictReader over the complete lines of a metrics.csv. A last line without its line end (a crash, or a run
    still writing) is left out: even when it parses, its last number may have lost digits. Quotes are not special
    (Lightning writes numbers only), so one damaged quote cannot swallow the lines after it."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: a byte-order mark (Excel) is no column
    lines = [line.rstrip("\r") for line in text.split("\n")[:-1]]
    return csv.DictReader(lines, quoting=csv.QUOTE_NONE)


PLOTTABLE = 1e100


def metrics_path(run_dir: str | Path) -> Path:
    """A run's log: ``logs/metrics.csv``, or, in a folder without ``logs``, its own ``metrics.csv`` (a log kept on
    its own, as in docs/runs)."""
    logs, alone = Path(run_dir) / "logs", Path(run_dir) / "metrics.csv"
    if not os.path.lexists(logs) and alone.is_file():
        return alone
    return logs / "metrics.csv"


def read_metrics(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each logged series of a run's log (:func:`metrics_path`): name -> (steps, values), finite points (at most
    :data:`PLOTTABLE` in magnitude) only.

    FileNotFoundError when nothing is logged yet (no file, or no finite value); MetricsError naming the line
    where the file is not a metrics.csv.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no training log at {path}; pass the run folder written by `moceir train`")
    series: dict[str, tuple[list[float], list[float]]] = {}  # name -> (steps, values)
    reader = metrics_reader(path)
    try:
        for n, row in enumerate(reader):
            if n == 0 and "step" not in reader.fieldnames:  # rows without steps would all sit at step 0
                raise MetricsError(f"{path}: no 'step' column in its header ({','.join(reader.fieldnames)[:80]}); "
                                   "not a metrics.csv written by `moceir train`")
            if None in row:
                raise ValueError(f"more fields than the header's {len(reader.fieldnames or ())}")
            step = float(row.get("step") or 0)
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    steps, values = series.setdefault(k, ([], []))
                    steps.append(step)
                    values.append(float(v))
    except MetricsError:
        raise
    except (ValueError, csv.Error) as e:
        raise MetricsError(f"{path}: line {reader.line_num}: {first_line(e)}; not a metrics.csv "
                           "written by `moceir train`") from None
    points = {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in series.items()}
    # beyond PLOTTABLE, matplotlib's axis ranges overflow (1.7e308 failed in tight_layout): such a point is no
    # more plottable than inf, and no loss, balance or learning rate of a run that still trains is near it
    finite = {k: (np.abs(s) <= PLOTTABLE) & (np.abs(v) <= PLOTTABLE) for k, (s, v) in points.items()}
    return {k: (s[finite[k]], v[finite[k]]) for k, (s, v) in points.items() if finite[k].any()}


def loss_label(run_dir: str | Path) -> str:
    """The training loss a run used, from its settings.json: "L1 + 0.01·balance", "L1 + 0.1·FFT + 0.01·balance"."""
    try:
        s = json.loads((Path(run_dir) / "settings.json").read_text())["settings"]
        terms = ["L1"]
        if str(s["loss_type"]).lower() == "fft":
            terms.append(f"{s['fft_loss_weight']:g}·FFT")
        if s["balance_loss_weight"]:
            terms.append(f"{s['balance_loss_weight']:g}·balance")
    except (OSError, ValueError, KeyError, TypeError):
        return "L1 (+ FFT) + balance"
    return " + ".join(terms)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < 3 or window < 2:
        return y
    window = min(window, len(y))
    padded = np.pad(np.asarray(y, dtype=np.float64), (window // 2, window - 1 - window // 2), mode="edge")
    total = np.concatenate([[0.0], np.cumsum(padded)])  # a moving mean in O(n); np.convolve took O(n * window)
    return (total[window:] - total[:-window]) / window


def plot_training_logs(run_dir: str | Path, out: str | Path | None = None, loss: str | None = None,
                       overwrite: bool = True) -> Path:
    """Training loss, balance loss and learning rate over steps -> PNG (default run_dir/training_curves.png).

    ``loss`` names the training loss in the title; by default it is read from the run's settings.json. The
    figure is written atomically (a link at ``out`` is replaced, not followed); without ``overwrite`` an
    existing ``out`` is an OSError. FileNotFoundError: nothing logged yet; MetricsError: not a metrics.csv.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    panels = [("train/loss", f"training loss ({loss or loss_label(run_dir)})", True), ("train/l1", "L1", True),
              ("train/balance", "balance loss (per MoE layer, mean)", False), ("train/lr", "learning rate", False)]
    panels = [p for p in panels if p[0] in m]
    if not panels:
        raise FileNotFoundError(f"{metrics_path(run_dir)} holds no finite train/loss, train/l1, "
                                "train/balance or train/lr value yet; plot again after more steps")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], panels):
        x, y = m[key]
        if key != "train/lr":
            ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="raw")
            ax.plot(x, _smooth(y, max(1, len(y) // 30)), color="tab:blue", lw=1.8, label="smoothed")
            ax.legend(fontsize=8, loc="upper right")  # "best" searched 2M points for minutes (a long log)
        else:
            ax.plot(x, y, color="tab:orange", lw=1.8)
        if log and (y > 0).all():
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"moceir training: {run_dir.name}", fontsize=11)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "training_curves.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # only now: a mistyped run folder is never made
        write_atomically(out, lambda tmp: fig.savefig(tmp, dpi=120), overwrite)
    finally:
        plt.close(fig)
    return out


def plot_routing_heatmap(counts: np.ndarray, tasks: list[str], out: str | Path, title: str = "",
                         topk: int = 1) -> Path:
    """counts: [tasks, layers, experts] -> one heatmap per MoE layer of the share of images that picked each
    expert (with top-k routing an image picks k experts, so a layer's shares add up to k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_tasks, n_layers, n_exp = counts.shape
    share = topk * counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    fig, axes = plt.subplots(1, n_layers, figsize=(1.2 * n_exp * n_layers / 2 + 2, 0.45 * n_tasks + 1.8),
                             sharey=True, squeeze=False)
    for layer, ax in enumerate(axes[0]):
        im = ax.imshow(share[:, layer], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(n_exp), [f"E{i}" for i in range(n_exp)], fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=8)
        if layer == 0:
            ax.set_yticks(range(n_tasks), tasks, fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of images")
    fig.suptitle(title or f"expert picked per task and MoE layer (E0 cheapest .. E{n_exp - 1} costliest)", fontsize=10)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)

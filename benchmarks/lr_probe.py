"""Learning-rate probe for relay training (issue 14): short fine-tunes of the bundled model, one per peak LR.

    python benchmarks/lr_probe.py --data_file_dir ../shared/datasets --lrs 2e-4 5e-4 1e-3 2e-3 \
        --steps 40 --batch_size 8 --out docs/runs/lr-probe

Every run starts from the same weights (``--fine_tune_from``, default: the bundled model), with the same seed, so it
sees the same patches and the same router noise; only the peak learning rate differs. The schedule is the relay
recipe's (10% linear warm-up, cosine to 0 at ``--steps``). Each run is a ``moceir train`` subprocess; its weights are
then scored in this process on the validation sets (``--benchmarks``, upstream's protocol), next to the starting
weights. Because every run sees the same batches, losses are compared step by step with the run of the lowest
learning rate (the reference): a run is unstable when its loss becomes non-finite, its command fails, or at some
step its loss exceeds ``--unstable_factor`` times the reference's loss on that batch.

Writes ``results.json``, ``results.md`` and ``loss_curves.png`` into ``--out`` (an earlier probe's are kept unless
``--overwrite``); the run folders go to ``--work`` (not kept in the repository; a used one is refused). It needs at
least two distinct learning rates and 4 steps, and exits 1 with a one-line error when the weights or a validation
set cannot be read or scored, or when no learning rate trained to the end. A short CPU probe tells which learning rates stay stable and which harm
the weights at once; it does not tell which one gives the best model after thousands of steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import moceir
from moceir.data.datasets import BENCHMARKS, DatasetLayoutError
from moceir.evaluation import scored_benchmark
from moceir.plots import read_metrics


def _repeats(a: argparse.Namespace) -> list[str]:
    """--repeat as given, else derain=12 and dehaze=5 for those of --de_type (train refuses a task it does not
    train)."""
    return a.repeat if a.repeat is not None else [r for r in ("derain=12", "dehaze=5") if r.split("=")[0] in a.de_type]


def train_command(a: argparse.Namespace, lr: float, run_name: str) -> list[str]:
    cmd = [sys.executable, "-m", "moceir", "train", "--model", a.model,
           "--de_type", *a.de_type, "--dehaze_source", "synthetic", "--holdout_val",
           "--loss_type", "fft", "--fft_loss_weight", "0.1", "--balance_loss_weight", "0.01",
           "--batch_size", str(a.batch_size), "--patch_size", str(a.patch_size), "--num_gpus", "0",
           "--num_workers", str(a.num_workers), "--lr", str(lr), "--warmup_epochs", "10", "--schedule_epochs", "100",
           "--epochs", "1000", "--max_steps", str(a.steps), "--save_every_n_epochs", "1000",
           "--log_every_n_steps", "1", "--seed", str(a.seed), "--fine_tune_from", a.fine_tune_from,
           "--data_file_dir", a.data_file_dir, "--ckpt_dir", str(a.work), "--run_name", run_name]
    for r in _repeats(a):
        cmd += ["--repeat", r]
    return cmd


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, train/loss) of the run's logs/metrics.csv; empty when the run logged nothing."""
    try:
        steps, values = read_metrics(run_dir).get("train/loss", ((), ()))
    except FileNotFoundError:
        return []
    return [(int(s), float(v)) for s, v in zip(steps, values)]


def stability(losses: list[tuple[int, float]], reference: list[tuple[int, float]],
              factor: float) -> tuple[bool, float, float]:
    """(stable, worst step ratio, mean step ratio) of a run's losses against the reference's on the same steps."""
    ref = dict(reference)
    if not losses or not all(math.isfinite(v) for _, v in losses):
        return False, float("nan"), float("nan")
    ratios = [v / ref[s] for s, v in losses if s in ref and ref[s] > 0]
    if not ratios:
        return False, float("nan"), float("nan")
    worst, mean = max(ratios), sum(ratios) / len(ratios)
    return worst <= factor, worst, mean


def judge(report: dict, factor: float) -> None:
    """Set each run's verdict against the run with the lowest learning rate that finished with finite losses."""
    finite = [r for r in report["runs"]
              if r["rc"] == 0 and r["losses"] and all(math.isfinite(v) for _, v in r["losses"])]
    reference = min(finite, key=lambda r: r["lr"])["losses"] if finite else []
    for run in report["runs"]:
        ok, run["worst_ratio"], run["mean_ratio"] = stability(run["losses"], reference, factor)
        run["stable"] = ok and run["rc"] == 0


class ProbeError(Exception):
    """Something the probe cannot go on without; the message is the one-line error."""


def score(weights: str, a: argparse.Namespace) -> dict[str, float]:
    """Mean PSNR (RGB) per validation benchmark."""
    try:
        model = moceir.load_model(weights).eval()
    except moceir.CheckpointError as e:
        raise ProbeError(str(e)) from None
    out = {}
    for bench in a.benchmarks:
        try:
            result = scored_benchmark(model, a.data_file_dir, bench, torch.device("cpu"), progress=False)
        except DatasetLayoutError as e:
            raise ProbeError(str(e)) from None
        for line in result.errors:
            print(f"error: {bench}: {line} (skipped)", file=sys.stderr)
        out[bench] = result.mean("psnr")
    return out


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        finite = [(s, v) for s, v in rows if math.isfinite(v)]
        if finite:
            ax.plot([s for s, _ in finite], [v for _, v in finite], label=f"lr {label}", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss (L1 + 0.1 FFT + 0.01 balance)")
    ax.set_title("Fine-tunes of the bundled model, same seed and patches")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    benches = report["benchmarks"]
    head = ["peak lr", "stable", "worst step loss / reference", "mean step loss / reference",
            *[f"{b} PSNR" for b in benches],
            *[f"{b} change" for b in benches], "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = report["start"]["psnr"]
    lines.append("| start (no training) | - | - | - | " + " | ".join(f"{base[b]:.2f}" for b in benches)
                 + " | " + " | ".join("-" for _ in benches) + " | - |")
    for run in report["runs"]:
        psnr = run.get("psnr") or {}
        cells = [f"{run['lr']:g}", "yes" if run["stable"] else "**no**", f"{run['worst_ratio']:.2f}",
                 f"{run['mean_ratio']:.2f}",
                 *[f"{psnr[b]:.2f}" if b in psnr else "-" for b in benches],
                 *[f"{psnr[b] - base[b]:+.2f}" if b in psnr else "-" for b in benches], f"{run['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    try:
        return probe()
    except ProbeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def probe() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--model", default="MoCE_IR_S", help="preset of the weights in --fine_tune_from")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-4, 5e-4, 1e-3, 2e-3])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--de_type", nargs="+", default=["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"])
    p.add_argument("--repeat", nargs="*", help="task=factor, as moceir train (default: derain=12 dehaze=5, for "
                   "those of --de_type)")
    p.add_argument("--fine_tune_from", default="default")
    p.add_argument("--benchmarks", nargs="+", default=["raintrainl_val", "denoise_25"], choices=BENCHMARKS,
                   metavar="BENCHMARK")
    p.add_argument("--unstable_factor", type=float, default=1.5)
    p.add_argument("--work", type=Path, default=Path("runs/lr_probe"))
    p.add_argument("--out", type=Path, default=Path("lr_probe"))
    p.add_argument("--render", action="store_true", help="only rewrite results.md and the plot from results.json")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier probe in --out")
    a = p.parse_args()
    if a.out.exists() and not a.out.is_dir():
        raise ProbeError(f"--out {a.out} is a file; pass a folder")
    if a.render:
        if not (a.out / "results.json").is_file():
            raise ProbeError(f"--render: no results.json in {a.out}; pass the --out of a probe")
        report = json.loads((a.out / "results.json").read_text())
        judge(report, a.unstable_factor)
        (a.out / "results.json").write_text(json.dumps(report, indent=1, default=float))
        (a.out / "results.md").write_text(markdown(report))
        plot({f"{r['lr']:g}": r["losses"] for r in report["runs"]}, a.out / "loss_curves.png")
        print(markdown(report))
        return 0
    if (a.out / "results.json").exists() and not a.overwrite:
        raise ProbeError(f"{a.out / 'results.json'} holds an earlier probe; pass --overwrite or another --out")
    if a.steps < 4:
        raise ProbeError(f"--steps {a.steps}: at least 4 (step 0's loss precedes any update, so a shorter probe "
                         "cannot see instability)")
    a.lrs = sorted(a.lrs)
    if len(set(a.lrs)) < 2 or len(set(a.lrs)) != len(a.lrs):
        raise ProbeError(f"--lrs {' '.join(map(str, a.lrs))}: give at least two distinct learning rates (the "
                         "lowest is the reference the others are judged against)")
    names = {lr: f"lr{lr:g}_s{a.steps}_b{a.batch_size}" for lr in a.lrs}
    taken = [str(a.work / n) for n in names.values() if (a.work / n).exists()]
    if taken:  # their metrics.csv would mix with the new run's
        raise ProbeError(f"{', '.join(taken)} exist(s) from an earlier probe; pass another --work or remove them")
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "benchmarks": a.benchmarks,
              "steps": a.steps, "batch_size": a.batch_size, "repeat": _repeats(a),
              "start": {"weights": a.fine_tune_from, "psnr": score(a.fine_tune_from, a)}, "runs": []}
    print(f"start: {report['start']['psnr']}", flush=True)
    curves = {}
    for lr in a.lrs:
        name = names[lr]
        run_dir = a.work / name
        t0 = time.perf_counter()
        proc = subprocess.run(train_command(a, lr, name), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        train_s = time.perf_counter() - t0
        losses = read_losses(run_dir)
        run = {"lr": lr, "rc": proc.returncode, "train_s": train_s, "losses": losses}
        weights = run_dir / "model.safetensors"
        if proc.returncode != 0:
            run["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        elif weights.exists():
            run["psnr"] = score(str(weights), a)
            if not all(math.isfinite(v) for v in run["psnr"].values()):
                run["rc"], run["error"] = 1, "non-finite outputs"
        report["runs"].append(run)
        curves[f"{lr:g}"] = losses
        judge(report, a.unstable_factor)
        print(f"lr {lr:g}: rc {proc.returncode}, {train_s:.0f} s, worst/mean step loss against the lowest lr "
              f"{run['worst_ratio']:.2f}/{run['mean_ratio']:.2f}, psnr {run.get('psnr')}", flush=True)
        (a.out / "results.json").write_text(json.dumps(report, indent=1, default=float))
        (a.out / "results.md").write_text(markdown(report))
        plot(curves, a.out / "loss_curves.png")
    print(markdown(report))
    if not any(r["rc"] == 0 for r in report["runs"]):
        print("error: no learning rate trained to the end; see the errors in results.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

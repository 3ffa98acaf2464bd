"""How long `moceir plot-logs` (and the plot drawn at the end of training) takes on a long run's metrics.csv.

    python benchmarks/plot_logs_speed.py                    # 2,000,000 logged steps (a 130 MB metrics.csv)
    python benchmarks/plot_logs_speed.py --rows 100000

Writes a synthetic metrics.csv with the columns `moceir train` logs into a temporary run folder, then times
reading it (``moceir.plots.read_metrics``) and drawing the figure (``plot_training_logs``) in this process, and
reports the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from moceir.plots import plot_training_logs, read_metrics

COLUMNS = "epoch,patches_per_s,step,train/balance,train/fft,train/l1,train/loss,train/lr"


def write_log(run: Path, rows: int) -> Path:
    """A metrics.csv of ``rows`` steps: a decaying noisy loss, as a long training run logs it."""
    path = run / "logs" / "metrics.csv"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    step = np.arange(rows)
    l1 = 0.05 * np.exp(-step / (rows / 4)) + 0.01 * rng.random(rows)
    table = np.column_stack([step // 1000, np.full(rows, 40.0), step, 0.3 + 0.01 * rng.random(rows),
                             1 + rng.random(rows), l1, 3 * l1, np.full(rows, 2e-4)])
    with open(path, "w") as f:
        f.write(COLUMNS + "\n")
        np.savetxt(f, table, delimiter=",", fmt=["%d", "%.3f", "%d", "%.6f", "%.6f", "%.6f", "%.6f", "%.8f"])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--rows", type=int, default=2_000_000, help="logged steps in the synthetic metrics.csv")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        size = write_log(run, a.rows).stat().st_size
        t0 = time.perf_counter()
        read_metrics(run)
        t1 = time.perf_counter()
        plot_training_logs(run, loss="L1")
        t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{a.rows:,} rows ({size / 2**20:.0f} MiB): read_metrics {t1 - t0:.1f} s; plot_training_logs (reads "
          f"it again, then draws) {t2 - t1:.1f} s; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()

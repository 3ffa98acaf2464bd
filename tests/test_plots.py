"""`moceir plot-logs`: the curves it draws, their axes and their titles."""

import json

import numpy as np
import pytest

from moceir.cli import main


def _run(tmp_path, rows, settings=None):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    lines = ["step,epoch,train/loss,train/lr"] + [f"{s},0,{loss},{lr}" for s, loss, lr in rows]
    (run / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")
    if settings is not None:
        (run / "settings.json").write_text(json.dumps({"settings": settings}))
    return run


@pytest.mark.parametrize("n", [60, 61, 90])  # smoothing windows of 2 (even), 2 and 3
def test_plot_logs_of_a_longer_run_draws_a_smoothed_curve_as_long_as_the_raw_one(tmp_path, monkeypatch, n):
    from matplotlib.axes import Axes

    drawn = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, x, y, *a, **k: drawn.append((len(x), np.asarray(y))) or
                        real(ax, x, y, *a, **k))
    run = _run(tmp_path, [(s, 1.0 / (s + 1), 1e-4) for s in range(n)])
    assert main(["plot-logs", str(run)]) == 0
    raw, smoothed = drawn[0], drawn[1]
    assert len(raw[1]) == len(smoothed[1]) == smoothed[0] == n
    assert (run / "training_curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_loss_that_is_not_positive_everywhere_is_drawn_on_a_linear_axis(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    scales = []
    monkeypatch.setattr(Axes, "set_yscale", lambda ax, value, **k: scales.append(value))
    run = _run(tmp_path, [(1, 0.5, 1e-4), (2, 0.0, 1e-4), (3, -0.1, 1e-4)])
    assert main(["plot-logs", str(run)]) == 0
    assert "log" not in scales
    scales.clear()
    run2 = _run(tmp_path / "b", [(1, 0.5, 1e-4), (2, 0.4, 1e-4)])
    assert main(["plot-logs", str(run2)]) == 0
    assert scales == ["log"]  # the loss panel only; the LR panel stays linear


@pytest.mark.parametrize("settings, label", [
    ({"loss_type": "l1", "fft_loss_weight": 0.1, "balance_loss_weight": 0.0}, "L1"),
    ({"loss_type": "FFT", "fft_loss_weight": 0.05, "balance_loss_weight": 0}, "L1 + 0.05·FFT"),
    ({"loss_type": "l1", "fft_loss_weight": 0.1, "balance_loss_weight": 0.02}, "L1 + 0.02·balance"),
])
def test_the_loss_label_names_only_the_terms_that_were_trained(tmp_path, settings, label):
    from moceir.plots import loss_label

    assert loss_label(_run(tmp_path, [(1, 0.5, 1e-4)], settings)) == label


@pytest.mark.parametrize("rows, plotted", [  # each failed in matplotlib with a traceback before
    ([(0, 1.7e308, 1e-4), (1, 1.7e308, 1e-4), (2, -1.7e308, 1e-4)], True),
    ([(1.7e308, 0.5, 1e-4), (-1.7e308, 0.4, 1e-4), (2, 0.3, 1e-4)], True),
    ([(1e308, 0.5, 1e-4)], False),  # nothing left to plot: one line
])
def test_values_too_large_to_plot_are_left_out_as_inf_is(tmp_path, capsys, rows, plotted):
    """Probe: finite values near 1.7e308 (a loss or a step) failed in matplotlib with a traceback."""
    run = _run(tmp_path, rows)
    assert main(["plot-logs", str(run)]) == (0 if plotted else 1)
    if plotted:
        assert (run / "training_curves.png").read_bytes().startswith(b"\x89PNG")
    else:
        assert "holds no finite train/loss" in capsys.readouterr().err


def test_plot_logs_draws_a_metrics_csv_kept_on_its_own(tmp_path, capsys):
    """Audit: the model card's curves were "plotted with `moceir plot-logs`", but docs/runs/<run> keeps the log as
    metrics.csv beside settings.json, and plot-logs said "no training log at docs/runs/cpu-run8/logs/metrics.csv"."""
    import shutil
    from pathlib import Path

    run = Path(__file__).resolve().parents[1] / "docs" / "runs" / "gpu-run1"
    shutil.copytree(run, tmp_path / "run")
    assert main(["plot-logs", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    (tmp_path / "run" / "logs").mkdir()  # a run's own logs/ folder comes first, even empty
    assert main(["plot-logs", str(tmp_path / "run"), "--out", str(tmp_path / "again.png")]) == 1
    assert "no training log at" in capsys.readouterr().err


def test_a_byte_order_mark_is_read_and_a_log_without_steps_refused(tmp_path, capsys):
    """Probe: a metrics.csv saved by Excel ("CSV UTF-8": a byte-order mark before "step") and a log without a step
    column were drawn with every point at step 0, exit 0."""
    from moceir.plots import read_metrics

    (tmp_path / "metrics.csv").write_bytes(b"\xef\xbb\xbfstep,train/loss\n1,1.0\n2,0.5\n3,0.25\n")
    steps, _ = read_metrics(tmp_path)["train/loss"]
    assert steps.tolist() == [1, 2, 3]
    (tmp_path / "metrics.csv").write_text("epoch,train/loss\n0,1.0\n0,0.5\n")
    assert main(["plot-logs", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'metrics.csv'}: no 'step' column in its header "
                                               "(epoch,train/loss); not a metrics.csv written by `moceir train`")

"""benchmarks/lr_probe.py (issue 14's recipe probe): the stability verdict, and a run end to end on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from lr_probe import stability  # noqa: E402

from conftest import GOLDEN, make_tiny_layout  # noqa: E402


def test_stability_is_judged_step_by_step_against_the_reference():
    ref = [(0, 0.2), (1, 0.3), (2, 0.2), (3, 0.25)]
    assert stability(ref, ref, 1.5) == (True, 1.0, 1.0)
    calm = [(0, 0.2), (1, 0.33), (2, 0.22), (3, 0.25)]
    ok, worst, mean = stability(calm, ref, 1.5)
    assert ok and abs(worst - 1.1) < 1e-9 and 1.0 < mean < 1.1
    spiky = [(0, 0.2), (1, 0.6), (2, 0.2), (3, 0.25)]  # recovers, but tripled the loss of one batch
    assert not stability(spiky, ref, 1.5)[0]
    assert not stability([(0, 0.2), (1, float("nan"))], ref, 1.5)[0]
    assert not stability([], ref, 1.5)[0]  # nothing logged


def test_probe_marks_a_diverging_lr_unstable_and_scores_the_other(tmp_path, tiny_layout):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lr_probe.py"), "--model", "MoCE_IR_tiny",
           "--fine_tune_from", str(GOLDEN / "upstream_tiny_last.ckpt"), "--data_file_dir", str(tiny_layout),
           "--lrs", "1e-4", "1e30", "--steps", "4", "--batch_size", "2", "--patch_size", "16", "--num_workers", "0",
           "--de_type", "denoise_25", "derain", "--repeat", "derain=2", "--benchmarks", "raintrainl_val",
           "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    calm, wild = report["runs"]
    assert calm["stable"] and calm["rc"] == 0 and "raintrainl_val" in calm["psnr"]
    assert len(calm["losses"]) == 4
    assert not wild["stable"]
    assert "| 1e+30 | **no** |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000


def _probe(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lr_probe.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_probe_refuses_what_it_cannot_judge(tmp_path, tiny_layout):
    """One-line errors, exit code 1, before any training (probes of a fresh-eyes review)."""
    (tmp_path / "runs" / "lr0.001_s40_b8").mkdir(parents=True)
    w, o = ("--work", tmp_path / "runs"), ("--out", tmp_path / "out")
    cases = [
        ([*w, *o, "--lrs", "1e-4", "1e-3"], "lr0.001_s40_b8"),  # its metrics.csv would mix with the new run's
        ([*w, *o, "--lrs", "1e-4"], "two distinct"),  # a single run is its own reference: always "stable"
        ([*w, *o, "--lrs", "1e-4", "0.0001"], "two distinct"),
        ([*w, *o, "--lrs", "1e-4", "1e-3", "--steps", "1"], "--steps 1"),  # step 0's loss precedes any update
        ([*w, "--out", tmp_path / "out" / "none", "--render"], "no results.json"),
    ]
    (tmp_path / "file").write_text("mine")
    cases.append(([*w, "--out", tmp_path / "file", "--lrs", "1e-4", "1e-3"], "is a file"))
    for args, expected in cases:
        res = _probe(*args)
        assert res.returncode == 1 and expected in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert (tmp_path / "file").read_text() == "mine"


def test_probe_stops_with_one_line_when_a_validation_set_is_empty(tmp_path):
    layout = make_tiny_layout(tmp_path / "n2", n=2)  # ids 1 and 2 only: the validation split (id 10) is empty
    res = _probe("--model", "MoCE_IR_tiny", "--fine_tune_from", GOLDEN / "upstream_tiny_last.ckpt",
                 "--data_file_dir", layout, "--lrs", "1e-4", "1e-3", "--steps", "4", "--benchmarks", "raintrainl_val",
                 "--work", tmp_path / "runs", "--out", tmp_path / "out")
    assert res.returncode == 1 and "raintrainl_val" in res.stderr and "Traceback" not in res.stderr

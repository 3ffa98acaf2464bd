"""benchmarks/lr_probe.py (issue 14's recipe probe): the stability verdict, and a run end to end on the tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from lr_probe import stability  # noqa: E402

from conftest import GOLDEN  # noqa: E402


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
           "--lrs", "1e-4", "1e30", "--steps", "3", "--batch_size", "2", "--patch_size", "16", "--num_workers", "0",
           "--de_type", "denoise_25", "derain", "--repeat", "derain=2", "--benchmarks", "raintrainl_val",
           "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    calm, wild = report["runs"]
    assert calm["stable"] and calm["rc"] == 0 and "raintrainl_val" in calm["psnr"]
    assert len(calm["losses"]) == 3
    assert not wild["stable"]
    assert "| 1e+30 | **no** |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "loss_curves.png").stat().st_size > 1000


def test_probe_refuses_a_work_folder_of_an_earlier_probe(tmp_path):
    (tmp_path / "runs" / "lr0.001_s40_b8").mkdir(parents=True)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lr_probe.py"), "--lrs", "1e-3",
                          "--work", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 1 and "lr0.001_s40_b8" in res.stderr and "Traceback" not in res.stderr

"""benchmarks/clean_photos.py: clean photos through a model, with one-line errors for bad input (issue 14)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import moceir
from moceir.models.checkpoints import save_model

from conftest import GOLDEN, save_damaged

ROOT = Path(__file__).resolve().parents[1]
TINY = str(GOLDEN / "upstream_tiny_last.ckpt")


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "clean_photos.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_rows_for_each_model_and_an_unreadable_photo_is_skipped(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    (tmp_path / "p3.png").write_bytes((tmp_path / "p0.png").read_bytes()[:60])  # truncated
    res = _run(TINY, TINY, "--photos", tmp_path, "--every", 1, "--per_image")
    assert res.returncode == 1, res.stderr[-2000:]  # the truncated photo: reported, the rest measured
    assert "p3.png" in res.stderr and "Traceback" not in res.stderr
    table = [line for line in res.stdout.splitlines() if line.startswith(f"| {TINY} |")]
    assert len(table) == 2 and table[0] == table[1]  # the same model twice gives the same figures
    assert "3 clean photos" in res.stdout and "| p2.png |" in res.stdout
    res = _run(TINY, "--photos", tmp_path, "--every", 2)
    assert "2 clean photos" in res.stdout  # p0 and p2


def test_bad_usage_is_one_line(tmp_path):
    res = _run(TINY, "--photos", tmp_path / "nowhere")
    assert res.returncode == 2 and "nowhere" in res.stderr and "Traceback" not in res.stderr
    res = _run(TINY, "--photos", tmp_path)  # empty folder
    assert res.returncode == 2 and "no images" in res.stderr
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    res = _run(tmp_path / "a.png", "--photos", tmp_path)  # not a checkpoint
    assert res.returncode == 1 and "a.png" in res.stderr and "Traceback" not in res.stderr
    res = _run(TINY, "--photos", tmp_path, "--every", 0)
    assert res.returncode == 2 and "--every" in res.stderr


def test_a_checkpoint_with_nan_outputs_is_an_error_and_the_others_still_run(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((24, 24, 3), 180, np.uint8)).save(photos / "sky.png")
    model = moceir.load_model(TINY)
    with torch.no_grad():
        model.output.weight.fill_(float("nan"))
    save_damaged(model, tmp_path / "nan.safetensors")
    res = _run(tmp_path / "nan.safetensors", TINY, "--photos", photos, "--every", 1)
    assert res.returncode == 1 and "NaN or inf" in res.stderr and "nan.safetensors" in res.stderr
    assert "Traceback" not in res.stderr and "nan dB" not in res.stdout and "nan levels" not in res.stdout
    assert f"| {TINY} |" in res.stdout
    res = _run(TINY, "--photos", photos / "sky.png")  # a file, not a folder
    assert res.returncode == 2 and "not a folder" in res.stderr


def test_a_model_that_returns_the_photo_unchanged_scores_inf_not_an_error(tmp_path):
    # a perfect score is not a broken model: only non-finite outputs are (this was reported as "not finite")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(photos / "a.png")
    model = moceir.load_model(TINY)
    with torch.no_grad():
        model.output.weight.zero_()  # the network's residual branch off: the output is the input
    save_model(model, tmp_path / "identity.safetensors")
    res = _run(tmp_path / "identity.safetensors", "--photos", photos, "--every", 1)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "inf dB" in res.stdout and "+0.00 levels" in res.stdout and "error" not in res.stderr

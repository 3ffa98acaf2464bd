"""scripts/evaluate_relay.py: a relay run's export, clean photos, judgement and checks.md in one command (issue 14)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

import moceir
from moceir.models.checkpoints import save_model

from conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[1]


def _run(run, out, *extra, cwd=ROOT):
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_relay.py"), str(run), "--out", str(out), "--quiet",
           *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)


def _training_folder(tmp_path):
    """A training folder as moceir train leaves it (fp32 raw and EMA weights) and the shipped model."""
    run = tmp_path / "cpu_relay"
    run.mkdir()
    shipped = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt")
    save_model(shipped, tmp_path / "shipped.safetensors")
    with torch.no_grad():
        shipped.output.weight.zero_()  # returns its input: beats the tiny network on the tiny layout
    save_model(shipped, run / "model.safetensors")
    with torch.no_grad():
        torch.manual_seed(0)
        shipped.output.weight.add_(0.05 * torch.randn_like(shipped.output.weight))
    save_model(shipped, run / "model_ema.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    return run, tmp_path / "shipped.safetensors", photos


def test_a_training_folder_is_exported_judged_and_recorded(tmp_path, tiny_layout):
    run, shipped, photos = _training_folder(tmp_path)
    out = tmp_path / "relay"
    args = ("--shipped", shipped, "--data_file_dir", tiny_layout, "--photos", photos, "--every", 1)
    res = _run(run, out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("fp16, config embedded") == 2  # moceir export's line for each
    for stem in ("model", "model_ema"):
        with safe_open(str(run / f"{stem}_fp16.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    verdict = json.loads((out / "judgement.json").read_text())
    assert set(verdict["candidates"]) == {"model_fp16", "model_ema_fp16"} and verdict["picked"] == "model_fp16"
    checks = (out / "checks.md").read_text()
    # every model's flat-sky rows, as judgement.json holds them
    for label in ("shipped", "model_fp16", "model_ema_fp16"):
        assert f"### {label} (" in checks
        r = verdict["flat_region"][label][2]
        assert f"| hazy sky | 0 | {r['texture_in']:.2f} | {r['texture_out']:.2f} | {r['mean_change']:+.1f} |" in checks
    assert "2 clean photos" in checks and "| p1.png |" in checks
    assert checks.count(f"| {run / 'model_fp16.safetensors'} |") == 1  # its row in the clean-photo summary
    timing = [line for line in checks.splitlines() if line.startswith("- clean photos:") or line.startswith("- judge:")]
    assert len(timing) == 2 and all("peak RSS" in t and "exit 0" in t for t in timing)
    rss = [int(t.split("peak RSS ")[1].split(" kB")[0].replace(",", "")) for t in timing]
    # a child's figure: a python with torch and a model loaded holds well over 100 MB, the script itself (no torch
    # until its children have run) far less, so measuring the parent instead would fail this
    assert all(100_000 < x < 20_000_000 for x in rss)

    # again: the exports are not redone and the judge takes its cached scores
    stamp = (run / "model_fp16.safetensors").stat().st_mtime_ns
    cached = (out / "model_fp16" / "scores.json").stat().st_mtime_ns
    res = _run(run, out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "config embedded" not in res.stdout and (run / "model_fp16.safetensors").stat().st_mtime_ns == stamp
    assert (out / "model_fp16" / "scores.json").stat().st_mtime_ns == cached

    # the judge refuses (another shipped model, here the bundled one): the earlier judgement and checks.md stay
    before = {f: (out / f).read_bytes() for f in ("judgement.json", "checks.md")}
    res = _run(run, out, *args[2:])  # --shipped left out: the bundled model is not the one judged before
    assert res.returncode == 1 and "without a judgement" in res.stderr and "Traceback" not in res.stderr
    assert {f: (out / f).read_bytes() for f in before} == before and "clean photos" not in res.stdout

    # a GPU window's folder (fp16 files only), from another working directory with relative paths
    window = tmp_path / "window"
    window.mkdir()
    for stem in ("model", "model_ema"):
        shutil.copy(run / f"{stem}_fp16.safetensors", window)
    res = _run("window", "relay-w", "--reuse", "relay", "--shipped", "shipped.safetensors", "--data_file_dir",
               os.path.relpath(tiny_layout, tmp_path), "--photos", "photos", "--every", 1, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    verdict = json.loads((tmp_path / "relay-w" / "judgement.json").read_text())
    assert set(verdict["reused_from"]) >= {"shipped", "model_fp16", "model_ema_fp16"}  # same weights as relay
    assert "### model_ema_fp16 (window/model_ema_fp16.safetensors)" in (tmp_path / "relay-w" / "checks.md").read_text()


def test_a_record_kept_by_hand_and_a_failed_judge_stop_it(tmp_path, tiny_layout):
    run, shipped, photos = _training_folder(tmp_path)
    out = tmp_path / "relay"
    out.mkdir()
    (out / "checks.md").write_text("# checks written by hand\n")
    args = ("--shipped", shipped, "--data_file_dir", tiny_layout, "--photos", photos, "--every", 1)
    res = _run(run, out, *args)
    assert res.returncode == 1 and "was not written by this script" in res.stderr and "Traceback" not in res.stderr
    assert (out / "checks.md").read_text() == "# checks written by hand\n" and not any(run.glob("*_fp16*"))
    # the judge refuses (an unknown row): its exit code, nothing else runs, no checks.md
    res = _run(run, tmp_path / "relay2", *args, "--benchmarks", "rain100x")
    assert res.returncode == 2 and "rain100x" in res.stderr and "without a judgement" in res.stderr
    assert "clean photos" not in res.stdout and not (tmp_path / "relay2" / "checks.md").exists()
    assert "Traceback" not in res.stderr


def test_bad_runs_are_one_line_errors_and_nothing_is_overwritten(tmp_path, tiny_layout):
    run, shipped, photos = _training_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(empty, tmp_path / "j0", "--photos", photos)
    assert res.returncode == 1 and "neither model_fp16.safetensors nor model.safetensors" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "j0").exists()

    # an fp16 export older than the weights it came from (trained again since): stop, keep it
    (run / "model_fp16.safetensors").write_bytes(b"an older export")
    os.utime(run / "model_fp16.safetensors", (1, 1))
    res = _run(run, tmp_path / "j1", "--photos", photos)
    assert res.returncode == 1 and "is older than" in res.stderr and "Traceback" not in res.stderr
    assert (run / "model_fp16.safetensors").read_bytes() == b"an older export"
    (run / "model_fp16.safetensors").unlink()

    (run / "model_ema.safetensors").write_bytes(b"not a checkpoint")
    res = _run(run, tmp_path / "j2", "--photos", photos)
    assert res.returncode == 1 and "model_ema.safetensors" in res.stderr and "Traceback" not in res.stderr
    assert "export failed" in res.stderr and not (run / "model_ema_fp16.safetensors").exists()
    assert not (tmp_path / "j2").exists()  # nothing judged

    (tmp_path / "a_file").write_text("kept")
    res = _run(run, tmp_path / "a_file", "--photos", photos)
    assert res.returncode == 2 and "is a file" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "a_file").read_text() == "kept"
    for bad in (("--photos", tmp_path / "nowhere"), ("--photos", photos, "--every", 0),
                ("--photos", photos, "--reuse", tmp_path / "nowhere")):
        res = _run(run, tmp_path / "j3", *bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr and not (tmp_path / "j3").exists()


def test_a_failed_clean_photo_check_still_judges_and_the_exit_code_says_so(tmp_path, tiny_layout):
    run, shipped, photos = _training_folder(tmp_path)
    (photos / "p2.png").write_bytes((photos / "p0.png").read_bytes()[:50])  # truncated
    weights = {f.name: f.read_bytes() for f in run.iterdir()}
    out = run  # the output folder is the run folder: its judgement lands beside the weights, which stay
    res = _run(run, out, "--shipped", shipped, "--data_file_dir", tiny_layout, "--photos", photos, "--every", 1)
    assert res.returncode == 1 and "p2.png" in res.stderr and "the clean-photo check exited 1" in res.stderr
    assert "Traceback" not in res.stderr
    assert (out / "judgement.json").exists()
    checks = (out / "checks.md").read_text()
    assert "exit 1" in checks and "### model_ema_fp16 (" in checks
    assert {name: (run / name).read_bytes() for name in weights} == weights


def test_an_earlier_judgement_left_in_out_is_not_taken_for_this_one(tmp_path):
    """The judge refuses (an unknown row) and leaves relay-N/judgement.json of an earlier evaluation in place: that
    judgement must not be recorded in checks.md as this run's, nor the clean photos run."""
    run = tmp_path / "window"
    run.mkdir()
    for stem in ("model", "model_ema"):  # an unpacked GPU window; the judge stops before reading them
        (run / f"{stem}_fp16.safetensors").write_bytes(b"weights")
    photos = tmp_path / "photos"
    photos.mkdir()
    out = tmp_path / "relay"
    out.mkdir()
    (out / "judgement.json").write_text(json.dumps({"shipped": "default", "candidates": {}, "flat_region": {}}))
    os.utime(out / "judgement.json", (1, 1))  # written long before this call
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate_relay.py"), str(run), "--out", str(out), "--quiet",
           "--photos", str(photos), "--benchmarks", "rain100x"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 2 and "without a judgement" in res.stderr, res.stderr[-2000:]
    assert not (out / "checks.md").exists() and "clean photos" not in res.stdout

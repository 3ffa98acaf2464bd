"""scripts/judge_relay.py: a relay run ships only if it beats the shipped model (issue 14)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import moceir
from moceir.models.checkpoints import save_model

from conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[1]


def _models(tmp_path):
    """identity.safetensors (output conv zeroed: returns its input) and noisy.safetensors (weights perturbed)."""
    base = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt")
    identity = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt")
    with torch.no_grad():
        identity.output.weight.zero_()
        noisy = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt")
        torch.manual_seed(0)
        noisy.output.weight.add_(0.5 * torch.randn_like(noisy.output.weight))
    paths = {}
    for name, m in (("identity", identity), ("noisy", noisy), ("base", base)):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_model(m, paths[name])
    return paths


def _judge(paths, shipped, candidates, layout, out):
    cmd = [sys.executable, str(ROOT / "scripts" / "judge_relay.py"), *[str(paths[c]) for c in candidates],
           "--shipped", str(paths[shipped]), "--data_file_dir", str(layout), "--out", str(out), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_a_better_candidate_ships_and_a_worse_one_does_not(tmp_path, tiny_layout):
    paths = _models(tmp_path)
    res = _judge(paths, "noisy", ["identity", "base"], tiny_layout, tmp_path / "j1")
    assert res.returncode == 0, res.stderr[-3000:]
    verdict = json.loads((tmp_path / "j1" / "judgement.json").read_text())
    scores = verdict["scores"]
    assert set(scores["identity"]) == {"raintrainl_val", "denoise_15", "denoise_25", "denoise_50", "dehaze"}
    best = max(("identity", "base"), key=lambda n: sum(scores[n].values()))
    assert verdict["picked"] == best
    assert verdict["ship"] == (verdict["means"][best] > verdict["shipped_mean"])
    assert verdict["ship"] and verdict["picked"] == "identity"  # the input beats a perturbed network here
    text = (tmp_path / "j1" / "judgement.md").read_text()
    assert "Decision: ship identity" in text and "moceir export" in text and str(paths["identity"]) in text
    assert set(verdict["bypassed"]) == {"shipped", "identity"} and len(verdict["flat_region"]["identity"]) == 4

    res = _judge(paths, "identity", ["noisy"], tiny_layout, tmp_path / "j2")
    assert res.returncode == 0, res.stderr[-3000:]
    verdict = json.loads((tmp_path / "j2" / "judgement.json").read_text())
    assert not verdict["ship"] and verdict["rows_worse"]
    assert "keep the shipped model" in (tmp_path / "j2" / "judgement.md").read_text()


def test_unreadable_candidate_and_missing_data_are_one_line_errors(tmp_path, tiny_layout):
    paths = _models(tmp_path)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a checkpoint")
    paths["broken"] = bad
    res = _judge(paths, "base", ["broken"], tiny_layout, tmp_path / "j")
    assert res.returncode == 1 and "broken.safetensors" in res.stderr and "Traceback" not in res.stderr
    res = _judge(paths, "base", ["identity"], tmp_path / "nowhere", tmp_path / "j")
    assert res.returncode == 1 and "nowhere" in res.stderr and "Traceback" not in res.stderr


def test_cached_scores_are_reused_only_for_the_same_weights(tmp_path, tiny_layout):
    paths = _models(tmp_path)
    out = tmp_path / "j"
    assert _judge(paths, "noisy", ["identity"], tiny_layout, out).returncode == 0
    first = json.loads((out / "judgement.json").read_text())
    # the same folder, but now "shipped" is another model: its cached scores must not be reused
    res = _judge(paths, "identity", ["base"], tiny_layout, out)
    assert res.returncode == 0, res.stderr[-2000:]
    second = json.loads((out / "judgement.json").read_text())
    assert second["scores"]["shipped"] == first["scores"]["identity"]
    assert second["scores"]["shipped"] != first["scores"]["shipped"]

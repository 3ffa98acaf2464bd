"""Restore and test across processes (Lightning DDP on CPU, gloo): the same outputs and scores as one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moceir
from moceir.io import load_image, save_image

from conftest import fill_deterministic

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _moceir(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moceir", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = moceir.create_model("MoCE_IR_tiny")
    fill_deterministic(model, 0.05)
    return str(moceir.save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


def test_two_process_restore_equals_one_process(tmp_path, tiny_ckpt):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        save_image(inp / f"s{i}.png", rng.random((24, 32, 3)).astype(np.float32))
    save_image(inp / "odd.png", rng.random((40, 16, 3)).astype(np.float32))
    (inp / "broken.png").write_text("not an image")
    one = _moceir("restore", str(inp), "-o", str(tmp_path / "one"), "--checkpoint", tiny_ckpt, "--quiet",
                  "--batch_size", "2", "--report", str(tmp_path / "one.json"))
    two = _moceir("restore", str(inp), "-o", str(tmp_path / "two"), "--checkpoint", tiny_ckpt, "--quiet",
                  "--batch_size", "2", "--report", str(tmp_path / "two.json"), "--num_cpu_processes", "2")
    assert one.returncode == two.returncode == 1, two.stderr[-3000:]
    assert len([ln for ln in two.stderr.splitlines() if "broken.png" in ln]) == 1 and "Traceback" not in two.stderr
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 6
    for name in names:
        assert np.array_equal(load_image(tmp_path / "one" / name).rgb, load_image(tmp_path / "two" / name).rgb)
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    key = lambda r: r["input"]  # noqa: E731
    assert [(r["input"], r["experts"]) for r in sorted(r1["images"], key=key)] == \
           [(r["input"], r["experts"]) for r in sorted(r2["images"], key=key)]
    assert len(r2["images"]) == 6 and len(r2["errors"]) == 1  # every input exactly once


def test_two_process_test_equals_one_process(tmp_path, tiny_layout, tiny_ckpt):
    common = ["test", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_25", "lolv1", "--data_file_dir",
              str(tiny_layout), "--quiet"]
    one = _moceir(*common, "--output_path", str(tmp_path / "one"))
    two = _moceir(*common, "--output_path", str(tmp_path / "two"), "--num_cpu_processes", "2")
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert a["summary"] == b["summary"] and [s["images"] for s in b["summary"]] == [3, 3]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert all(strip(a["per_image"][k]) == strip(b["per_image"][k]) for k in a["per_image"])

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

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # warnings shown: a user sees them too


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
    assert [ln for ln in two.stderr.splitlines() if ln.strip()] == [ln for ln in one.stderr.splitlines() if ln.strip()]
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
    """The same scores, and the same notes, printed once (rank 1 runs this command too), without Lightning's."""
    noted = moceir.save_model(moceir.load_model(tiny_ckpt), tmp_path / "noted.safetensors", note="a test note")
    common = ["test", "--ckpt", str(noted), "--benchmarks", "denoise_25", "lolv1", "--data_file_dir",
              str(tiny_layout), "--trainset", "CDD11_all"]
    for name in ("one", "two"):
        (tmp_path / name / "images").mkdir(parents=True)  # an earlier run's images: a note
    one = _moceir(*common, "--output_path", str(tmp_path / "one"))
    two = _moceir(*common, "--output_path", str(tmp_path / "two"), "--num_cpu_processes", "2")
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("model note: a test note") == 1
    lines = [[ln for ln in run.stderr.splitlines() if ln.strip() and "%|" not in ln] for run in (one, two)]
    assert lines[1] == [ln.replace("one", "two") for ln in lines[0]] and len(lines[0]) == 2  # images/, --trainset
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert a["summary"] == b["summary"] and [s["images"] for s in b["summary"]] == [3, 3]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert all(strip(a["per_image"][k]) == strip(b["per_image"][k]) for k in a["per_image"])


def test_two_node_torchrun_training_writes_one_checkpoint(tmp_path, tiny_layout):
    """Two `torchrun --nnodes 2` launches on this machine (one process per "node", gloo) train one run."""
    import socket
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    train = ["-m", "moceir", "train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "--data_file_dir",
             str(tiny_layout), "--batch_size", "1", "--patch_size", "16", "--num_workers", "0", "--ckpt_dir",
             str(tmp_path / "ck"), "--run_name", "two_nodes", "--num_gpus", "0", "--num_nodes", "2",
             "--repeat", "derain=2", "--epochs", "1", "--save_every_n_epochs", "1", "--log_every_n_steps", "1"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                               "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                               *train], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
             for rank in (0, 1)]
    logs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    run = tmp_path / "ck" / "two_nodes"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    # 3 pairs x 2 repeats = 6 samples over a world of 2 at batch 1: 3 steps in the epoch
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    assert sorted(p.name for p in run.glob("*.ckpt")) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    assert "GLOBAL_RANK: 1" in logs[0] + logs[1] and "MEMBER: 2/2" in logs[0] + logs[1]
    assert [log.count("training patches per task") for log in logs] == [1, 0]  # printed by rank 0 only


@pytest.mark.parametrize("command", ["train", "test", "restore"])
def test_num_nodes_without_a_launcher_is_one_line_not_a_silent_wait(tmp_path, small_layout, tiny_ckpt, capsys,
                                                                    monkeypatch, command):
    """Probe: `--num_nodes 2` started by hand waited, without a word, for a second node that never came."""
    from moceir.cli import main
    from moceir.distributed import LAUNCHER_ENV

    for var in LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    data = str(small_layout)
    argv = {"train": ["train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "--data_file_dir", data,
                      "--patch_size", "16", "--num_workers", "0", "--ckpt_dir", str(tmp_path / "ck"),
                      "--run_name", "r", "--num_gpus", "0"],
            "test": ["test", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", data,
                     "--output_path", str(tmp_path / "r")],
            "restore": ["restore", f"{data}/denoising/cBSD68/original_png", "--checkpoint", tiny_ckpt,
                        "-o", str(tmp_path / "o")]}
    assert main([*argv[command], "--num_nodes", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --num_nodes 2 needs a launcher on each node: torchrun --nnodes 2") and \
        len(err.splitlines()) == 1, err
    assert not any((tmp_path / name).exists() for name in ("ck", "r", "o"))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7])
def test_share_gives_every_batch_once_and_every_rank_as_many_steps(n, world):
    """Mutation: the top-up counted with floor division instead of ceiling: ranks got unequal step counts."""
    from moceir.distributed import share

    batches = [[i] for i in range(n)]
    parts = [share(batches, rank, world) for rank in range(world)]
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // world)
    assert sorted(b[0] for p in parts for b in p if b) == list(range(n))
    for rank, part in enumerate(parts):
        assert [b for b in part if b] == batches[rank::world]


def test_world_size_counts_every_node(monkeypatch):
    """Mutation: world_size without num_nodes: two nodes of two processes chose strategy "auto" (no DDP) at 1 node."""
    from moceir.distributed import Launch

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a launcher: multi-node is allowed
    assert Launch(num_cpu_processes=2, num_nodes=2).world_size == 4
    assert Launch(num_cpu_processes=1, num_nodes=3).world_size == 3
    assert Launch().world_size == 1


@pytest.mark.parametrize("var", ["MASTER_ADDR", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"])
def test_any_one_launcher_variable_lets_several_nodes_start(monkeypatch, var):
    """Mutation: ``all`` instead of ``any`` of LAUNCHER_ENV: torchrun or SLURM (each sets only some) was refused.
    Only the slow two-node torchrun training test saw it."""
    from moceir.distributed import LAUNCHER_ENV, multi_node_problem

    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    assert "needs a launcher on each node" in multi_node_problem(2)
    assert multi_node_problem(1) is None
    monkeypatch.setenv(var, "1")
    assert multi_node_problem(2) is None

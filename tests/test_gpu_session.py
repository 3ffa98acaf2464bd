"""The GPU window (issue 14): `scripts/gpu_session.sh --dry-run` takes the GPU run's code path on the CPU.

One dry run (MoCE_IR_tiny, 16x16 patches, a few steps; about a minute) feeds every test: the inference and
profile rows, the matrix rows with their checks, the injected failure of the fast configuration and the fallback,
the EMA, and the packed models.
"""

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import moceir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_throughput import PLANS  # noqa: E402


# Time limits with room for a machine shared with another test worker (pytest -n 2): phases end when their work is
# done, so these hardly lengthen a run; with the dry run's own (30 s of inference, 110 s in all), a CI run on a loaded
# machine timed its inference out and found no time left to train (2026-12-07).
LOADED_MACHINE = {"INFER_S": "100", "LN_S": "20", "PROFILE_S": "20", "PHASE1_S": "90", "DEADLINE_S": "300"}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("out", "work", "inherited_cache")}
    out = dirs["out"]
    # Inductor sets TORCHINDUCTOR_CACHE_DIR (to its shared default) in any process that has used its cache, so a
    # caller such as pytest passes one on: the run must still compile in its own.
    env = {**os.environ, "OUT": str(out), "WORK": str(dirs["work"]),
           "TORCHINDUCTOR_CACHE_DIR": str(dirs["inherited_cache"]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **LOADED_MACHINE}
    res = subprocess.run(["bash", "scripts/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    log = (out / "session.log").read_text() if (out / "session.log").exists() else ""
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:] + log[-4000:]
    return dirs


@pytest.fixture(scope="module")
def out(run_dirs) -> Path:
    return run_dirs["out"]


def test_a_window_that_trains_nothing_exits_1(tmp_path):
    # a python3 that fails at everything: no measurement, no training; what ran still lands in $OUT
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").write_text("#!/bin/sh\nexit 1\n")
    (shim / "python3").chmod(0o755)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(["bash", "scripts/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    log = (tmp_path / "out" / "session.log").read_text()
    assert res.returncode == 1, log[-2000:]
    assert "falling back to the known-good configuration" in log and log.rstrip().endswith("exit 1")


def test_the_run_compiles_in_its_own_inductor_cache_even_when_one_is_inherited(run_dirs):
    # CI, 2026-11-27: the inherited shared cache held a 0-byte .so from an earlier dry run's killed compile, and the
    # compile row failed with "file too short".
    assert (run_dirs["work"] / "inductor_cache").is_dir()
    assert not any(run_dirs["inherited_cache"].iterdir())


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]


def test_every_output_file_and_no_more_than_eight(out):
    names = {p.name for p in out.iterdir()}
    assert {"bench.jsonl", "session.log", "metrics.csv", "settings.json", "summary.json", "models.part0"} <= names
    assert len(names) <= 8, names


def test_inference_rows_come_first_with_their_targets(out):
    rows = _rows(out)
    kinds = [r["kind"] for r in rows]
    assert kinds.index("meta") == kinds.index("profile") + 1 and kinds[-1] == "selection"
    inf = [r for r in rows if r["kind"] == "inference"]
    assert {(r["mode"], r["precision"]) for r in inf} == {(m, p) for m in ("eager", "graphs") for p in ("fp32", "bf16")}
    ok = {(r["size"], r["batch"], r["experts"]): r for r in inf if r["status"] == "ok"}
    # the dry run's --max_pixels keeps 64² at batch 1 and 8 and 256² at batch 1; CPU times eager fp32 only, with the
    # experts run and bypassed
    assert set(ok) == {(s, b, e) for s, b in ((64, 1), (64, 8), (256, 1)) for e in ("run", "skip")}
    assert all(r["mode"] == "eager" and r["dispatch"] == "dense" and r["ms_per_image"] > 0 for r in ok.values())
    assert ok[256, 1, "skip"]["target_ms"] == 5.0 and ok[64, 1, "run"]["target_ms"] is None
    assert all(r["met"] is None for r in inf)  # judged on CUDA only
    skipped = {r["key"]: r["skipped"] for r in inf if r["status"] == "skipped"}
    assert "CUDA graphs" in skipped["inference graphs fp32 experts-skip"] and len(skipped) == 6
    ln = [r for r in rows if r["kind"] == "layernorm"]
    assert [r["channels"] for r in ln] == [32, 64, 128, 256]
    assert all(r["manual_max_abs_diff"] < 1e-5 and r["var_mean_max_abs_diff"] < 1e-5 for r in ln)
    (profile,) = [r for r in rows if r["kind"] == "profile"]
    assert profile["size"] == 256 and profile["wall_ms"] > 0 and profile["aten_ops"] > 0 and profile["top_ops"]


def test_targets_are_judged_on_cuda_only():
    code = ("from bench import judged; r = {'size': 1024, 'batch': 1, 'ms_per_image': 39.0}; "
            "print(judged(r, True)['met'], judged({**r, 'ms_per_image': 41.0}, True)['met'], judged(r, False)['met'], "
            "judged({**r, 'batch': 8}, True)['target_ms'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert res.stdout.split() == ["True", "False", "None", "None"], res.stderr[-2000:]


def test_summary_has_the_inference_section(out):
    inf = json.loads((out / "summary.json").read_text())["inference"]
    assert inf["phase"] == {"infer_s": 100, "bench_rc": 0, "layernorm_rc": 0, "profile_rc": 0}
    assert set(inf["layernorm_ms"]) == {"32x64", "64x32", "128x16", "256x8"}
    assert all(set(v) == {"layer_norm", "manual", "var_mean"} for v in inf["layernorm_ms"].values())
    assert inf["batch1_best"]["256"] == {**inf["batch1_best"]["256"], "mode": "eager", "precision": "fp32",
                                         "target_ms": 5.0, "met": None}
    assert inf["batch1_best"]["256"]["ms"] > 0 and inf["batch8_best"]["64"]["images_per_s"] > 0
    skipped = inf["batch1_best_experts_skipped"]["256"]  # apart: bypassed experts never stand for the trained model
    assert skipped["ms"] > 0 and skipped["ms"] != inf["batch1_best"]["256"]["ms"] and skipped["target_ms"] == 5.0
    assert set(inf["batch8_best_experts_skipped"]) == {"64"}
    assert inf["rows_by_status"] == {"ok": 6, "skipped": 6} and len(inf["not_measured"]) == 6
    assert inf["profile"]["wall_ms"] > 0 and inf["profile"]["cuda_kernels"] is None


def test_matrix_has_a_row_per_configuration_and_checks_the_fast_ones(out):
    rows = {r["key"]: r for r in _rows(out) if r["kind"] == "row"}
    planned = [c for _, _, configs in PLANS["dry"]().groups for c in configs]
    assert set(rows) == {c.key for c in planned}
    for cfg in planned:
        row = rows[cfg.key]
        if cfg.impl == "upstream":
            assert row["status"] in ("ok", "not available"), row
        elif cfg.mode != "eager":  # a cold Inductor cache cannot compile within the dry run's limit
            assert row["status"] in ("ok", "timeout", "skipped"), row
        else:
            assert row["status"] == "ok" and row["check"]["passed"] and row["patches_per_s"] > 0, row
            assert row["check"]["reference"] == (cfg.reference().key if cfg.reference() else None)
    assert rows["moceir eager bf16 b4"]["check"]["reference"] == "moceir eager fp32 b4"


def test_selection_names_a_checked_configuration(out):
    sel = [r for r in _rows(out) if r["kind"] == "selection"]
    assert len(sel) == 1 and sel[0]["known_good"] == "moceir eager bf16 b4"
    assert "--batch_size" in sel[0]["fastest_flags"] and sel[0]["fastest_patches_per_s"] > 0


def test_the_failed_fast_attempt_falls_back_to_the_known_good_one(out):
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "final" and summary["dry_run"]
    assert summary["fallback"]["happened"] and "NaN or inf" in summary["fallback"]["reason"]
    assert [a["name"] for a in summary["attempts"]] == ["fast", "known-good"]
    trained = summary["trained"]
    assert trained["config"] == "moceir eager bf16 b4" and trained["steps"] == 6
    assert math.isfinite(trained["final_loss"]) and trained["patches_per_s_median"] > 0
    assert trained["models"] == ["model_fp16.safetensors", "model_ema_fp16.safetensors"]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["global_step"] == 6 and settings["settings"]["ema_decay"] == 0.9


def test_metrics_hold_the_trained_steps(out):
    lines = (out / "metrics.csv").read_text().splitlines()
    assert "train/loss" in lines[0] and len(lines) >= 3


def test_model_parts_reassemble_into_loadable_raw_and_ema_weights(out, tmp_path):
    blob = b"".join((out / f"models.part{i}").read_bytes() for i in range(len(list(out.glob("models.part*")))))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path, filter="data")
    raw = moceir.load_model(tmp_path / "model_fp16.safetensors")
    ema = moceir.load_model(tmp_path / "model_ema_fp16.safetensors")
    assert raw.config == ema.config and raw.config.dim == 8
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), ema.parameters()))


def test_gpu_plan_measures_the_baselines_then_compiles_blocks_and_captures_the_step_over_them():
    # Window 3 (H200): the compile group got 57 s and timed out; eager fp32 (b16, b64) and the hand-captured step
    # were measured. The plan now runs the same-run baselines, then compiles each block (half the CPU compile time
    # of the whole network) and captures the step over the compiled blocks in the same process.
    plan = PLANS["gpu"]()
    (g1, t1, c1), (g2, t2, c2), (g3, t3, c3) = plan.groups[:3]
    assert [c.key for c in c1 + c2] == ["moceir eager fp32 b16", "moceir eager fp32 b64", "upstream eager fp32 b16"]
    assert [c.key for c in c3] == ["moceir default+blocks bf16 b16 fft_impl=matmul",
                                   "moceir graphs+blocks bf16 b16 fft_impl=matmul"]
    assert t1 + t2 + t3 <= 240 and t3 >= 150  # PHASE1_S in gpu_session.sh
    assert all(c.reference().key == "moceir eager bf16 b16 fft_impl=matmul" for c in c3)
    assert c3[0].trainable and c3[1].trainable
    assert c3[0].train_flags() == ["--compile", "default", "--precision", "bf16-mixed", "--batch_size", "16",
                                   "--dispatch", "dense", "--channels_last", "--compile_scope", "blocks",
                                   "--fft_impl", "matmul"]
    assert c3[1].train_flags() == [*c3[0].train_flags()[:-2], "--cuda_graphs", "--fft_impl", "matmul"]
    assert plan.known_good.key == "moceir eager fp32 b16"
    assert not any(c.impl == "upstream" and c.precision == "bf16" for _, _, cs in plan.groups for c in cs)
    script = (ROOT / "scripts" / "gpu_session.sh").read_text()
    assert "--precision $([ $DRY = 1 ] && echo bf16-mixed || echo 32-true)" in script  # the fallback = known_good


def test_rows_written_before_the_scope_field_still_select():
    from train_throughput import Config, select

    plan = PLANS["gpu"]()
    old = {"kind": "row", "key": "moceir eager fp32 b64", "impl": "moceir", "mode": "eager", "precision": "fp32",
           "batch": 64, "fused_adamw": False, "fft_impl": "fft", "status": "ok", "patches_per_s": 81.3,
           "check": {"reference": None, "passed": True}}
    sel = select([old], plan)
    assert sel["fastest"] == Config(batch=64).key and "--compile_scope" not in sel["fastest_flags"]


def test_a_captured_step_is_selected_when_fastest_with_the_flags_moceir_train_takes():
    import dataclasses

    from moceir.cli import build_parser
    from moceir.training import TrainSettings
    from train_throughput import GRAPHS, Config, select

    plan = PLANS["gpu"]()
    graphs = [c for _, _, cs in plan.groups for c in cs if c.mode == GRAPHS]
    assert [c.key for c in graphs] == ["moceir graphs+blocks bf16 b16 fft_impl=matmul", "moceir graphs fp32 b64"]
    assert graphs[0].reference().key == "moceir eager bf16 b16 fft_impl=matmul"
    assert graphs[1].reference().key == "moceir eager fp32 b64"  # measured in the first group: reused
    assert graphs[1].train_flags()[:2] == ["--compile", "none"] and "--cuda_graphs" in graphs[1].train_flags()

    def row(cfg, rate):
        return {"kind": "row", "key": cfg.key, **dataclasses.asdict(cfg), "status": "ok", "patches_per_s": rate,
                "check": {"reference": cfg.reference().key if cfg.reference() else None, "passed": True}}
    eager = Config(precision="fp32")
    sel = select([row(eager, 50.0), row(graphs[0], 120.0)], plan)
    assert sel["fastest"] == graphs[0].key and sel["fastest_patches_per_s"] == 120.0
    assert sel["fastest_flags"] == graphs[0].train_flags()
    # every selectable row's flags are ones `moceir train` parses and accepts together
    for cfg in (c for _, _, cs in plan.groups for c in cs if c.trainable):
        args = build_parser().parse_args(["train", *cfg.train_flags()])
        assert args.cuda_graphs == (cfg.mode == GRAPHS), cfg.key
        TrainSettings(precision=args.precision, compile=args.compile, compile_scope=args.compile_scope,
                      dispatch=args.dispatch, cuda_graphs=args.cuda_graphs, fft_impl=args.fft_impl).validate()


def test_a_captured_step_on_the_cpu_is_a_failed_row_not_a_crash(tmp_path):
    out = tmp_path / "rows.jsonl"
    res = subprocess.run([sys.executable, "train_throughput.py", "--model", "MoCE_IR_tiny", "--patch_size", "16",
                          "--batch_size", "2", "--compile", "graphs", "--device", "cpu", "--out", str(out)],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    (r,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert r["status"] == "failed" and "CUDA graphs need a CUDA device" in r["reason"]


def _pack_gpu_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_gpu_data.py"), *args], capture_output=True,
                          text=True, timeout=300)


def test_the_pack_lowers_its_quality_until_it_fits_and_says_when_it_cannot(tmp_path, datasets_dir):
    # Window 3: the 64 MiB the device run accepts counts the working tree too; a quality-90 pack did not fit.
    def pack(out, limit_mib):
        return _pack_gpu_data("--data_file_dir", str(datasets_dir), "--out", str(out), "--limit", "2", "--method",
                              "0", "--limit_mib", str(limit_mib))

    full = pack(tmp_path / "full", 100)
    assert full.returncode == 0 and "at quality 85" in full.stdout, full.stderr[-2000:]
    size_85 = float(full.stdout.split("quality 85, ")[1].split(" MiB")[0])
    smaller = pack(tmp_path / "smaller", size_85 * 0.97)
    assert smaller.returncode == 0, smaller.stderr[-2000:]
    assert "at quality 85" in smaller.stdout and "at quality 80" in smaller.stdout
    none = pack(tmp_path / "none", 0.01)
    assert none.returncode == 1 and "at quality 70 is over --limit_mib 0.01" in none.stderr
    assert "Traceback" not in none.stderr and none.stderr.strip().splitlines()[-1].startswith("error: ")
    # an earlier pack's images would be trained on beside the new one's: a folder that is not empty is refused
    again = pack(tmp_path / "full", 100)
    assert again.returncode == 1 and again.stderr.strip() == (
        f"error: --out {tmp_path / 'full'} is not an empty folder; remove it or name a new one")
    (tmp_path / "empty").mkdir()
    assert pack(tmp_path / "empty", 100).returncode == 0


@pytest.mark.parametrize("out", ["dangling_link", "under_a_file", "synthetic_0", "synthetic_negative"])
def test_the_pack_refuses_what_it_cannot_pack_into_in_one_line(tmp_path, out):
    """Probes: a dangling link or a path under a file as --out was a traceback; --synthetic 0 packed the real
    datasets instead, --synthetic -1 reported "-3 synthetic images"."""
    target, count = tmp_path / "out", "1"
    if out == "dangling_link":
        target.symlink_to(tmp_path / "missing")
    elif out == "under_a_file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "sub"
    else:
        count = "0" if out == "synthetic_0" else "-1"
    done = _pack_gpu_data("--synthetic", count, "--out", str(target), "--data_file_dir", str(tmp_path / "none"))
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(("error: ", "usage: ", "pack_gpu_data.py: error: "))
    assert not (tmp_path / "missing").exists() and not list(tmp_path.rglob("*.webp"))
    if out.startswith("synthetic"):
        assert "--synthetic" in done.stderr.strip().splitlines()[-1]


def test_a_reference_measured_earlier_in_the_matrix_is_reused_down_its_chain():
    from train_throughput import GRAPHS, Config, _check_losses, _measured_reference

    eager = Config(precision="fp32")
    rows = [{"kind": "row", "key": eager.key, "status": "ok", "patch": 128, "check": {"losses": [1.0, 0.9, 0.8]}},
            {"kind": "meta", "key": "meta"},
            {"kind": "row", "key": eager.key, "status": "ok", "patch": 128, "check": {"losses": [0.5, 0.4, 0.3]}},
            {"kind": "row", "key": "moceir eager fp32 b32", "status": "failed", "patch": 128}]
    measured = _check_losses(rows, 128)
    assert measured == {eager.key: [0.5, 0.4, 0.3]}  # this matrix's rows only, measured ones only
    assert _check_losses(rows, 64) == {} and _check_losses(rows[:1], 128) == {}
    compiled = Config(mode="reduce-overhead", precision="bf16", fft_impl="matmul")
    assert compiled.reference().key == "moceir eager bf16 b16 fft_impl=matmul"  # not measured: go down the chain
    assert _measured_reference(compiled, measured) == (eager, [0.5, 0.4, 0.3])
    assert _measured_reference(Config(mode=GRAPHS), measured) == (eager, [0.5, 0.4, 0.3])
    assert _measured_reference(compiled, {}) is None and _measured_reference(eager, measured) is None


def test_the_dry_matrix_reuses_its_references(out):
    rows = {r["key"]: r for r in _rows(out) if r["kind"] == "row"}
    # the bf16 row and the fused-AdamW row are checked against eager fp32 b4 measured before them in their group
    for key in ("moceir eager bf16 b4", "moceir eager fp32 b4 fused_adamw"):
        assert rows[key]["check"]["reference_reused"], key
        assert rows[key]["check"]["reference_losses"] == rows["moceir eager fp32 b4"]["check"]["losses"], key


def test_layernorm_timings_refuse_a_size_without_a_fourth_level():
    res = subprocess.run([sys.executable, "layernorm_speed.py", "--device", "cpu", "--size", "4"],
                         cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].endswith("--size must be at least 8 (MoCE-IR-S's fourth level is "
                                                        "1/8 of the side) and --calls at least 1; got 4 and 20")

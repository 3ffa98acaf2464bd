"""Command options that change what is scored, exported or accepted: they reach the code that acts on them."""

import argparse
import json
import shutil

import pytest
import torch

import moceir
from moceir.cli import _bytes, _config_from_args, build_parser, main


def test_checkpoint_id_is_looked_up_under_the_given_ckpt_dir(tmp_path, small_layout, tiny_ckpt, monkeypatch):
    runs = tmp_path / "my_runs"
    (runs / "run1").mkdir(parents=True)
    shutil.copy(tiny_ckpt, runs / "run1" / "last.ckpt")  # safetensors content: read by what it is
    monkeypatch.chdir(tmp_path)  # no ./checkpoints here
    assert main(["test", "--checkpoint_id", "run1", "--ckpt_dir", str(runs), "--benchmarks", "lolv1",
                 "--data_file_dir", str(small_layout), "--output_path", str(tmp_path / "r"), "--quiet"]) == 0
    title = json.loads((tmp_path / "r" / "results.json").read_text())["title"]
    assert str(runs / "run1" / "last.ckpt") in title


def test_test_scores_with_the_context_pad_asked_for(tmp_path, small_layout, tiny_ckpt):
    import moceir
    from moceir.evaluation import evaluate_benchmark

    psnr = {}
    for pad in ("0", "8"):
        out = tmp_path / pad
        assert main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "dehaze", "--data_file_dir", str(small_layout),
                     "--output_path", str(out), "--quiet", "--device", "cpu", "--context_pad", pad]) == 0
        psnr[pad] = [r["psnr"] for r in json.loads((out / "results.json").read_text())["per_image"]["dehaze"]]
    assert psnr["0"] != psnr["8"]
    model = moceir.load_model(tiny_ckpt)
    ref = evaluate_benchmark(model, small_layout, "dehaze", torch.device("cpu"), progress=False, context_pad=8)
    assert psnr["8"] == pytest.approx([r["psnr"] for r in ref.rows], abs=1e-4)


@pytest.fixture
def fake_export(monkeypatch):
    """moceir.onnx.export_onnx replaced by a recorder that writes a placeholder file (no minute-long export)."""
    import moceir.onnx

    calls = []

    def record(model, path, **kwargs):
        calls.append(kwargs)
        path.write_bytes(b"onnx")
        return path

    monkeypatch.setattr(moceir.onnx, "export_onnx", record)
    return calls


@pytest.mark.parametrize("flags, dispatch, optimize", [((), "conditional", True),
                                                       (("--dispatch", "dense", "--no-optimize"), "dense", False)])
def test_export_passes_dispatch_and_optimize_to_the_onnx_exporter(tmp_path, tiny_ckpt, fake_export, flags, dispatch,
                                                                  optimize):
    assert main(["export", tiny_ckpt, str(tmp_path / "m.onnx"), *flags]) == 0
    assert [(c["dispatch"], c["optimize"]) for c in fake_export] == [(dispatch, optimize)]


def test_onnx_export_with_a_half_dtype_is_refused(tmp_path, tiny_ckpt, fake_export, capsys):
    assert main(["export", tiny_ckpt, str(tmp_path / "m.onnx"), "--dtype", "fp16"]) == 2
    assert "ONNX export is fp32 only" in capsys.readouterr().err
    assert fake_export == [] and not (tmp_path / "m.onnx").exists()


def test_export_reads_the_suffix_case_insensitively(tmp_path, tiny_ckpt):
    out = tmp_path / "M.SAFETENSORS"
    assert main(["export", tiny_ckpt, str(out)]) == 0
    assert moceir.load_model(out).config == moceir.load_model(tiny_ckpt).config


def _parse(*argv):
    return build_parser().parse_args(list(argv))


def test_flag_values_at_their_documented_limits_are_accepted():
    assert _parse("train", "--patch_size", "65536").patch_size == 65536  # "at most 65536"
    assert _parse("info", "x", "--size", "65536").size == 65536
    assert _parse("train", "--max_steps", "-1").max_steps == -1  # "-1: no limit", given explicitly
    assert _parse("demo", "--port", "65535").port == 65535 and _parse("demo", "--port", "1").port == 1


@pytest.mark.parametrize("argv", [["demo", "--port", "0"], ["train", "--max_steps", "-2"],
                                  ["train", "--patch_size", "65544"]])
def test_flag_values_past_their_limits_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        _parse(*argv)
    assert stop.value.code == 2


@pytest.mark.parametrize("argv, prefix", [(["train", "--mode", "MoCE_IR"], "--mode"),
                                          (["info", "x", "--siz", "64"], "--siz"),
                                          (["restore", "a.png", "--out", "o"], "--out")])
def test_a_prefix_of_a_flag_is_refused_not_taken_for_it(argv, prefix, capsys):
    """argparse took `--mode MoCE_IR` as `--model MoCE_IR` (and would take another flag once one shares the prefix)."""
    with pytest.raises(SystemExit) as stop:
        _parse(*argv)
    assert stop.value.code == 2 and f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_memory_sizes_use_decimal_and_binary_units_as_named():
    assert _bytes("4GB") == 4e9 and _bytes("512MB") == 512e6 and _bytes("1TB") == 1e12
    assert _bytes("2.5GiB") == 2.5 * 2**30 and _bytes("512MiB") == 512 * 2**20 and _bytes("3KiB") == 3 * 2**10
    assert _bytes("1000") == 1000
    with pytest.raises(argparse.ArgumentTypeError):
        _bytes("0GB")


def test_no_with_complexity_reaches_the_config():
    args = _parse("test", "--benchmarks", "lolv1", "--model", "MoCE_IR_tiny", "--no-with_complexity")
    assert _config_from_args(args).with_complexity is False
    assert _config_from_args(_parse("test", "--benchmarks", "lolv1", "--model", "MoCE_IR_tiny")).with_complexity


def test_no_with_complexity_without_model_is_refused(tmp_path, tiny_ckpt, small_layout, capsys):
    assert main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(small_layout),
                 "--output_path", str(tmp_path / "r"), "--no-with_complexity"]) == 2
    assert "--with_complexity takes effect only with --model" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["train", "--de_type", "derain", "--resume_from", ""], ["train", "--de_type", "derain", "--fine_tune_from", ""],
    ["test", "--benchmarks", "denoise_15", "--ckpt", ""], ["test", "--benchmarks", "denoise_15", "--checkpoint_id", ""],
    ["info", ""], ["restore", "a.png", "--checkpoint", ""], ["restore", "a.png", "-o", ""], ["export", "", "x.pt"],
    ["routing", "--benchmarks", "denoise_15", "--from_results", ""], ["plot-logs", ""],
])
def test_an_empty_path_is_refused_not_taken_for_none(argv, capsys):
    """Probe: `--resume_from "$RUN"` with RUN unset trained from scratch (exit 0), `test --ckpt ""` scored the
    bundled model, and `info ""` spoke of the checkpoint "."."""
    with pytest.raises(SystemExit) as stop:
        _parse(*argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "is empty (an unset shell variable?)" in err
    positional = "" in (argv[1], argv[-1]) and not argv[-2].startswith("-")
    assert ("leave the flag out" in err) != positional, err  # a positional argument has no flag to leave out


def test_a_count_given_as_a_float_is_asked_for_as_a_whole_number(capsys):
    """Probe: `demo --concurrency 1e9` said "expected a number, got '1e9'"."""
    with pytest.raises(SystemExit):
        _parse("demo", "--concurrency", "1e9")
    assert "--concurrency: expected a whole number, got '1e9'" in capsys.readouterr().err


def test_a_note_that_is_not_utf_8_is_refused_before_the_export(capsys):
    """Probe: `export m n.safetensors --note $'bad\\xffbyte'` failed with a traceback (after 66 s of ONNX export)."""
    with pytest.raises(SystemExit) as stop:
        _parse("export", "m.safetensors", "n.safetensors", "--note", "bad\udcffbyte")
    assert stop.value.code == 2 and "holds bytes that are not UTF-8 text" in capsys.readouterr().err
    assert _parse("export", "m.safetensors", "n.safetensors", "--note", "café ☕").note == "café ☕"

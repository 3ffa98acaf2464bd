"""The moceir command end to end: info, restore (with bad inputs), test, routing, plot-logs."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch

import moceir
from moceir.cli import main
from moceir.io import save_image


def _bomb_png(path, side=30000):
    """A valid PNG header claiming side x side pixels: above PIL's decompression-bomb limit."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_top_level_help_describes_the_program_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "argparse" not in out and "image restoration" in out
    assert all(f"    {name}" in out for name in ("info", "train", "test", "routing", "restore", "demo", "export",
                                                  "plot-logs"))


def test_info_checks_the_size_against_the_network_and_labels_ranks_by_their_rule(tmp_path, capsys):
    """Probe: a 5-level network at --size 24 was a ValueError traceback; rank_type constant was labelled C/8..C/1."""
    deep = moceir.save_model(moceir.create_model("MoCE_IR_tiny", num_blocks=[1] * 5, num_dec_blocks=[1] * 4,
                                                 heads=[1] * 5), tmp_path / "deep.safetensors")
    assert main(["info", str(deep), "--size", "24"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == ("error: --size 24: this network's 5 levels need a "
                                                           "multiple of 16 (e.g. 32)")
    const = moceir.save_model(moceir.create_model("MoCE_IR_tiny", rank_type="constant", latent_dim=4),
                              tmp_path / "const.safetensors")
    assert main(["info", str(const), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "expert 3 (rank 4, patch 32)" in out and "C/" not in out
    assert main(["info", "MoCE_IR_tiny", "--size", "32"]) == 0
    assert "expert 0 (rank C/8, patch 4)" in capsys.readouterr().out


def test_info_reports_parameters(capsys):
    assert main(["info", "MoCE_IR_tiny", "--size", "64"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in moceir.create_model("MoCE_IR_tiny").parameters())
    assert f"parameters: {n:,}" in out and "expert 3" in out and "GFLOPs" in out


def test_info_shows_a_checkpoints_note(capsys):
    """As it does an ONNX file's (the bundled model's note says it is early and weak)."""
    assert main(["info", "default", "--size", "64"]) == 0
    assert capsys.readouterr().out.startswith(f"note: {moceir.models.checkpoints.checkpoint_note('default')}\n")


def test_restore_batch_goes_on_past_bad_inputs(tmp_path, tiny_ckpt, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    rgb = np.random.default_rng(0).random((30, 41, 3)).astype(np.float32)
    save_image(inp / "good.png", rgb)
    save_image(inp / "gray16.png", rgb, bit_depth=16, grayscale=True)
    save_image(inp / "rgba.png", rgb, alpha=np.full((30, 41), 0.5, np.float32))
    save_image(inp / "photo.jpg", rgb)
    good = (inp / "good.png").read_bytes()
    (inp / "truncated.png").write_bytes(good[: len(good) // 2])
    (inp / "text.png").write_text("hello")
    (inp / "zero.png").write_bytes(b"")
    _bomb_png(inp / "bomb.png")
    (tmp_path / "emptydir").mkdir()
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    code = main(["restore", str(inp), str(tmp_path / "emptydir"), "-o", str(out), "--checkpoint", tiny_ckpt,
                 "--report", str(report), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    for name in ("truncated.png", "text.png", "zero.png", "bomb.png", "emptydir"):
        line = [ln for ln in err.splitlines() if name in ln]
        assert len(line) == 1, (name, err)
    assert "too large" in [ln for ln in err.splitlines() if "bomb.png" in ln][0]
    written = sorted(p.name for p in out.iterdir())
    assert written == ["good.png", "gray16.png", "photo.jpg", "rgba.png"]
    from moceir.io import load_image

    assert load_image(out / "gray16.png").bit_depth == 16 and load_image(out / "gray16.png").grayscale
    assert load_image(out / "rgba.png").alpha is not None
    assert load_image(out / "good.png").rgb.shape == (30, 41, 3)
    rep = json.loads(report.read_text())
    assert len(rep["images"]) == 4 and all(len(r["experts"]) == 3 for r in rep["images"])


def test_restore_never_overwrites(tmp_path, tiny_ckpt, capsys):
    src = tmp_path / "a.png"
    save_image(src, np.zeros((16, 16, 3), np.float32))
    before = src.read_bytes()
    assert main(["restore", str(src), "-o", str(tmp_path), "--checkpoint", tiny_ckpt, "--quiet"]) == 1
    assert "overwrite an input" in capsys.readouterr().err
    assert src.read_bytes() == before
    out = tmp_path / "o"
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", tiny_ckpt, "--quiet"]) == 0
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", tiny_ckpt, "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", tiny_ckpt, "--quiet", "--overwrite"]) == 0


def test_restore_reports_bad_checkpoint(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_text("nope")
    assert main(["restore", str(bad), "-o", str(tmp_path / "o"), "--checkpoint", str(bad)]) == 2
    assert "bad.ckpt" in capsys.readouterr().err


def test_restore_tiles_and_matches_size(tmp_path, tiny_ckpt):
    src = tmp_path / "big.png"
    save_image(src, np.random.default_rng(1).random((200, 150, 3)).astype(np.float32))
    assert main(["restore", str(src), "-o", str(tmp_path / "o"), "--checkpoint", tiny_ckpt, "--tile", "64",
                 "--tile_overlap", "16", "--quiet", "--ext", "webp"]) == 0
    from moceir.io import load_image

    assert load_image(tmp_path / "o" / "big.webp").rgb.shape == (200, 150, 3)


def test_test_command_end_to_end(tmp_path, tiny_layout, tiny_ckpt, capsys):
    out = tmp_path / "results"
    code = main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_25", "dehaze", "lolv1", "--data_file_dir",
                 str(tiny_layout), "--output_path", str(out), "--save_results", "--y_channel", "--device", "cpu"])
    assert code == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [s["benchmark"] for s in summary] == ["denoise_25", "dehaze", "lolv1"]
    assert all(s["images"] == 3 and np.isfinite(s["psnr"]) and "psnr_y" in s for s in summary)
    rows = [r for rows in json.loads((out / "results.json").read_text())["per_image"].values() for r in rows]
    assert len(rows) == 9 and all(abs(r["psnr_y"] - r["psnr"]) > 1e-3 for r in rows)  # luma, not RGB again
    assert "| denoise_25 | 3 |" in (out / "results.md").read_text()
    assert len((out / "per_image.csv").read_text().splitlines()) == 10
    assert len(list((out / "images" / "lolv1").iterdir())) == 3
    routing = tmp_path / "routing"
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_25", "lolv1", "--from_results",
                 str(out / "results.json"), "--output_path", str(routing)]) == 0
    assert np.array(json.loads((routing / "routing.json").read_text())["counts"]).sum() == 2 * 3 * 3


def test_test_command_missing_benchmark_folder(tmp_path, tiny_layout, tiny_ckpt, capsys):
    code = main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "gopro", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(tmp_path / "r")])
    assert code == 1
    assert "deblurring/GoPro/test/input" in capsys.readouterr().err


def test_routing_command(tmp_path, tiny_layout, tiny_ckpt):
    out = tmp_path / "routing"
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_15", "lolv1", "--data_file_dir",
                 str(tiny_layout), "--output_path", str(out)]) == 0
    data = json.loads((out / "routing.json").read_text())
    assert np.array(data["counts"]).shape == (2, 3, 4)
    assert np.array(data["counts"]).sum(axis=2).tolist() == [[3, 3, 3], [3, 3, 3]]
    assert (out / "routing_heatmap.png").stat().st_size > 1000
    assert all(0 < f["share"] <= 1 for f in data["flops"])


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "MoCE_IR_XL"], "invalid choice"),
    (["train", "--batch_size", "0"], "must be > 0"),
    (["train", "--patch_size", "100"], "multiple of 8"),
    (["train", "--de_type", "denoise_99"], "invalid choice"),
    (["train", "--loss_type", "ssim"], "invalid choice"),
    (["train", "--repeat", "derain"], "TASK=N"),
    (["test", "--benchmarks", "lolv1", "denoise_15", "lolv1"], "--benchmarks names lolv1 more than once"),
    (["routing", "--benchmarks", "lolv1", "lolv1"], "--benchmarks names lolv1 more than once"),
])
def test_bad_flag_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_identity_task_and_its_repeat_parse():
    from moceir.cli import build_parser
    args = build_parser().parse_args(["train", "--de_type", "derain", "identity", "--repeat", "identity=5"])
    assert args.de_type == ["derain", "identity"] and args.repeat == [("identity", 5)]


def test_train_missing_data_dir(tmp_path, capsys):
    assert main(["train", "--de_type", "derain", "--data_file_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_missing_task_folder_stops_before_training(tmp_path, tiny_layout, capsys):
    code = main(["train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "synllie", "--data_file_dir",
                 str(tiny_layout), "--ckpt_dir", str(tmp_path / "ck"), "--num_gpus", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "llie/LOLv1/Train/input" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ck").exists()


def test_plot_logs_missing(tmp_path, capsys):
    assert main(["plot-logs", str(tmp_path)]) == 1
    assert "metrics.csv" in capsys.readouterr().err


def test_restore_batches_same_size_images_like_single(tmp_path, tiny_ckpt):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        save_image(inp / f"s{i}.png", rng.random((24, 32, 3)).astype(np.float32))
    save_image(inp / "other.png", rng.random((16, 16, 3)).astype(np.float32))
    for bs in ("1", "4"):
        assert main(["restore", str(inp), "-o", str(tmp_path / bs), "--checkpoint", tiny_ckpt, "--quiet",
                     "--batch_size", bs, "--report", str(tmp_path / f"r{bs}.json")]) == 0
    batches = sorted(r["batch"] for r in json.loads((tmp_path / "r4.json").read_text())["images"])
    assert batches == [1, 3, 3, 3]
    from moceir.io import load_image

    for name in ("s0.png", "s1.png", "s2.png", "other.png"):
        a, b = load_image(tmp_path / "1" / name).rgb, load_image(tmp_path / "4" / name).rgb
        assert np.abs(a - b).max() <= 1 / 255


def test_export_writes_fp16_with_note_and_never_overwrites(tmp_path, tiny_ckpt, capsys):
    out = tmp_path / "shipped.safetensors"
    assert main(["export", tiny_ckpt, str(out), "--dtype", "fp16", "--note", "tiny, for a test"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["note"] == "tiny, for a test"
        assert f.get_tensor(f.keys()[0]).dtype == torch.float16
    assert moceir.load_model(out).config == moceir.load_model(tiny_ckpt).config
    before = out.read_bytes()
    assert main(["export", tiny_ckpt, str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    bad = tmp_path / "bad.ckpt"
    bad.write_text("nope")
    assert main(["export", str(bad), str(tmp_path / "x.safetensors")]) == 2
    assert "bad.ckpt" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()

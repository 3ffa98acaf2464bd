"""Hostile and odd inputs to restore, routing, test and the Python API (issue 10): nothing lost, nothing silent."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import moceir
from moceir.cli import main
from moceir.io import load_image, save_image


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    return str(moceir.save_model(tiny_model, tmp_path / "tiny.safetensors"))


def _img(path, seed=0, size=(16, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(path, np.random.default_rng(seed).random((*size, 3)).astype(np.float32))
    return path


def _restore(*argv):
    return main(["restore", *map(str, argv), "--quiet"])


def _one_line(err: str) -> None:
    assert "Traceback" not in err and err.strip(), err


# ------------------------------------------------------------------------------------------------ data loss
def test_item1_same_name_inputs_get_distinct_outputs(tmp_path, tiny_ckpt, capsys):
    a, b = _img(tmp_path / "a" / "x.png", 1), _img(tmp_path / "b" / "x.png", 2)
    out = tmp_path / "out"
    assert main(["restore", str(a), str(b), "-o", str(out), "--checkpoint", tiny_ckpt,
                 "--report", str(tmp_path / "r.json")]) == 0
    assert "share the output name x.png" in capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["x_a.png", "x_b.png"]
    rows = json.loads((tmp_path / "r.json").read_text())["images"]
    assert {r["input"]: Path_name(r["output"]) for r in rows} == {str(a): "x_a.png", str(b): "x_b.png"}
    # each output is the restoration of its own input
    one = tmp_path / "one"
    assert _restore(a, "-o", one, "--checkpoint", tiny_ckpt) == 0
    assert np.array_equal(load_image(one / "x.png").rgb, load_image(out / "x_a.png").rgb)


def Path_name(p: str) -> str:
    return os.path.basename(p)


def test_item1_same_stem_other_extension_with_ext(tmp_path, tiny_ckpt):
    _img(tmp_path / "c" / "y.png", 1)
    Image.fromarray((np.random.default_rng(2).random((16, 24, 3)) * 255).astype(np.uint8)).save(tmp_path / "c" / "y.jpg")
    out = tmp_path / "out"
    assert _restore(tmp_path / "c" / "y.png", tmp_path / "c" / "y.jpg", "-o", out, "--ext", "png",
                    "--checkpoint", tiny_ckpt) == 0
    assert sorted(p.name for p in out.iterdir()) == ["y_jpg.png", "y_png.png"]


def test_item1_case_insensitive_names_do_not_collide(tmp_path, tiny_ckpt):
    from moceir.pipeline import plan_outputs

    jobs, notes = plan_outputs([tmp_path / "p" / "A.png", tmp_path / "q" / "a.png"], tmp_path / "o")
    assert len({j.output.name.lower() for j in jobs}) == 2 and notes


def test_item2_report_never_overwrites_an_input(tmp_path, tiny_ckpt, capsys):
    victim = _img(tmp_path / "p" / "victim.png")
    before = victim.read_bytes()
    code = _restore(victim, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", victim)
    err = capsys.readouterr().err
    assert code == 2 and "--report" in err and "inputs" in err
    assert victim.read_bytes() == before and not (tmp_path / "o").exists()  # refused before any work


def test_item2_report_never_overwrites_an_existing_file(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "x.png")
    report = tmp_path / "notes.txt"
    report.write_text("keep me")
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", report) == 2
    assert report.read_text() == "keep me" and "--overwrite" in capsys.readouterr().err
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", report, "--overwrite") == 0
    assert json.loads(report.read_text())["images"][0]["height"] == 16


def test_item2_report_in_missing_folder_fails_before_work(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "x.png")
    code = _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", tmp_path / "no" / "r.json")
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_item2_report_is_not_an_output(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "in" / "x.png")
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", tmp_path / "o" / "x.png") == 2
    assert "output" in capsys.readouterr().err


def test_item3_routing_writes_a_new_folder_and_never_replaces(tmp_path, tiny_layout, tiny_ckpt, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["routing", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_15", "--data_file_dir", str(tiny_layout),
            "--quiet"]
    assert main(args) == 0
    assert (tmp_path / "routing" / "routing.json").exists()  # under the current folder, not the repository
    before = (tmp_path / "routing" / "routing.md").read_text()
    (tmp_path / "routing" / "routing.md").write_text("mine")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "routing" / "routing.md").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert (tmp_path / "routing" / "routing.md").read_text() == before


def test_item4_dangling_symlink_in_output_is_not_written_through(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "in" / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.png"
    (out / "x.png").symlink_to(outside)
    assert _restore(src, "-o", out, "--checkpoint", tiny_ckpt) == 1
    assert "exists" in capsys.readouterr().err and not outside.exists()
    assert _restore(src, "-o", out, "--checkpoint", tiny_ckpt, "--overwrite") == 0
    assert not outside.exists() and not (out / "x.png").is_symlink()  # the link itself was replaced
    assert load_image(out / "x.png").rgb.shape == (16, 24, 3)


def test_item4_symlink_to_a_file_is_replaced_not_followed(tmp_path, tiny_ckpt):
    src = _img(tmp_path / "in" / "x.png")
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.png").symlink_to(target)
    assert _restore(src, "-o", out, "--checkpoint", tiny_ckpt, "--overwrite") == 0
    assert target.read_text() == "precious"


def test_item6_planar_16bit_tiff(tmp_path, tiny_ckpt):
    import tifffile

    u16 = (np.random.default_rng(0).random((3, 20, 28)) * 65535).astype(np.uint16)
    src = tmp_path / "in" / "planar.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, u16, photometric="rgb", planarconfig="separate")
    img = load_image(src)
    assert img.rgb.shape == (20, 28, 3) and img.bit_depth == 16
    np.testing.assert_allclose(img.rgb, u16.transpose(1, 2, 0) / 65535, atol=1e-6)
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 0
    assert load_image(tmp_path / "o" / "planar.tif").rgb.shape == (20, 28, 3)


def test_item6_tiff_of_unusable_shape_is_refused(tmp_path, tiny_ckpt, capsys):
    import tifffile

    src = tmp_path / "in" / "stack.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, np.zeros((20, 28, 7), np.uint16), planarconfig="contig", photometric="minisblack")
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert "stack.tif" in err and len(err.strip().splitlines()) == 1


def test_item7_first_frame_of_animation_is_announced(tmp_path, tiny_ckpt, capsys):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((16, 24, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    src = tmp_path / "in" / "anim.gif"
    src.parent.mkdir()
    frames[0].save(src, save_all=True, append_images=frames[1:])
    assert main(["restore", str(src), "-o", str(tmp_path / "o"), "--checkpoint", tiny_ckpt]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "anim.gif" in ln]
    assert len(notes) == 1 and "3 frames" in notes[0] and "first" in notes[0]
    import tifffile

    tif = tmp_path / "in2" / "pages.tif"
    tif.parent.mkdir()
    tifffile.imwrite(tif, (rng.random((2, 16, 24, 3)) * 255).astype(np.uint8), photometric="rgb")
    assert main(["restore", str(tif), "-o", str(tmp_path / "o2"), "--checkpoint", tiny_ckpt]) == 0
    assert "2 frames" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ moceir test
def test_item17_corrupt_benchmark_image_is_skipped_and_named(tmp_path, tiny_layout, tiny_ckpt, capsys):
    bad = tiny_layout / "denoising/cBSD68/original_png/0002.png"
    bad.write_bytes(bad.read_bytes()[:100])
    hazy = sorted((tiny_layout / "dehazing/SOTS/outdoor/hazy").iterdir())[0]
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(hazy)  # its clean image is 40x48
    out = tmp_path / "res"
    code = main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_25", "dehaze", "lolv1", "--data_file_dir",
                 str(tiny_layout), "--output_path", str(out), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "0002.png" in err and hazy.name in err and "does not match" in err and "Traceback" not in err
    summary = {s["benchmark"]: s["images"] for s in json.loads((out / "results.json").read_text())["summary"]}
    assert summary == {"denoise_25": 2, "dehaze": 2, "lolv1": 3}


# ------------------------------------------------------------------------------------------------ Python API
def test_item18_uint8_tensor_is_scaled(tiny_model):
    arr = (np.random.default_rng(0).random((3, 16, 24)) * 255).astype(np.uint8)
    out = moceir.restore(tiny_model, torch.from_numpy(arr))
    as_float = moceir.restore(tiny_model, torch.from_numpy(arr).float() / 255)
    assert out.dtype == torch.uint8 and out.max() > 1
    assert (out.float() - as_float * 255).abs().max() <= 1.0


def test_item18_float_outside_unit_range_is_refused(tiny_model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        moceir.restore(tiny_model, np.full((16, 16, 3), 200.0, np.float32))


@pytest.mark.parametrize("empty", [np.zeros((0, 0, 3), np.float32), np.zeros((0, 5), np.uint8),
                                   torch.zeros(0, 3, 8, 8)])
def test_an_image_without_pixels_is_refused(tiny_model, empty):
    with pytest.raises(ValueError, match="holds no pixels"):
        moceir.restore(tiny_model, empty)


def test_item18_hwc_tensor_is_accepted(tiny_model):
    x = torch.rand(16, 24, 3)
    y = moceir.restore(tiny_model, x)
    assert y.shape == (16, 24, 3)
    torch.testing.assert_close(y, moceir.restore(tiny_model, x.permute(2, 0, 1)).permute(1, 2, 0))
    with pytest.raises(ValueError, match="accepted layouts"):
        moceir.restore(tiny_model, torch.rand(5, 16, 24))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_item18_non_finite_input_is_refused(tiny_model, bad):
    x = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    x[3, 4, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        moceir.restore(tiny_model, x)


def test_item18_training_mode_is_kept(tiny_model):
    tiny_model.train()
    try:
        moceir.restore(tiny_model, np.zeros((16, 16, 3), np.uint8))
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_item18_restore_is_documented():
    doc = moceir.restore.__doc__
    assert "uint8" in doc and "[0, 1]" in doc and "Returns" in doc and "tile" in doc


def test_item19_save_model_never_overwrites_without_asking(tmp_path, tiny_model):
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        moceir.save_model(tiny_model, path, note="other")
    assert path.read_bytes() == before
    moceir.save_model(tiny_model, path, note="other", overwrite=True)
    assert path.read_bytes() != before


# ------------------------------------------------------------------------------------------------ first ten minutes
@pytest.mark.parametrize("command", ["info", "train", "test", "routing", "restore", "export", "plot-logs"])
def test_item21_every_flag_has_help(command):
    from moceir.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    text = sub.format_help()
    assert "(default:" in text or command == "plot-logs"


def test_item21_defaults_are_shown(capsys):
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: restored)" in text and "(default: 32)" in text and "(default: auto)" in text
    assert "bundled model" in text


def test_item21_test_has_quiet_and_info_nosuch_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    assert "--quiet" in capsys.readouterr().out
    assert main(["info", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nosuch" in err and "MoCE_IR_S" in err


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--balance_loss_weight", "nan"),
                                        ("--fft_loss_weight", "-inf"), ("--warmup_epochs", "nan")])
def test_item12_non_finite_settings_are_refused_at_parse_time(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--de_type", "derain", f"{flag}={value}"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


def test_item22_report_names_height_and_width(tmp_path, tiny_ckpt):
    src = _img(tmp_path / "x.png", size=(16, 40))
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--report", tmp_path / "r.json") == 0
    row = json.loads((tmp_path / "r.json").read_text())["images"][0]
    assert row["height"] == 16 and row["width"] == 40


def test_output_folder_that_is_a_file_is_refused(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "x.png")
    (tmp_path / "o").write_text("a file")
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 2
    assert "is a file" in capsys.readouterr().err


def test_restore_files_api_returns_rows(tmp_path, tiny_model):
    a = _img(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.png").write_text("no")
    rows = moceir.restore_files(tmp_path / "in", tmp_path / "o", tiny_model, progress=False, log=lambda s: None)
    assert [os.path.basename(r["input"]) for r in rows] == ["a.png", "bad.png"]
    assert "error" in rows[1] and rows[0]["output"].endswith("a.png") and str(a) == rows[0]["input"]


# ------------------------------------------------------------------ hostile probe of 2026-12-06 (each was a bug)
def test_an_ext_that_cannot_be_written_is_refused_before_any_work(tmp_path, tiny_ckpt, capsys):
    # PIL raised KeyError for xpm in the writer thread, which nobody read: "restored 0, 0 failed", exit 0
    src = _img(tmp_path / "in" / "a.png")
    for ext in ("xpm", "xyz"):
        assert _restore(src, "-o", tmp_path / "o", "--ext", ext, "--checkpoint", tiny_ckpt) == 2
        err = capsys.readouterr().err
        _one_line(err)
        assert f"--ext {ext}" in err and "png" in err
    assert not (tmp_path / "o").exists()


def test_an_unexpected_writer_error_is_never_silent(tmp_path, tiny_model, monkeypatch):
    import moceir.pipeline as pipeline

    real_save = pipeline.save_image

    def broken_for_b(path, *args, **kwargs):
        if path.name.startswith(".b."):
            raise KeyError("a bug in the writer")
        real_save(path, *args, **kwargs)

    for k, name in enumerate("abc"):
        _img(tmp_path / "in" / f"{name}.png", seed=k)
    monkeypatch.setattr(pipeline, "save_image", broken_for_b)
    with pytest.raises(KeyError, match="a bug in the writer"):  # raised, after the others and the report
        moceir.restore_files(tmp_path / "in", tmp_path / "o", tiny_model, progress=False, log=lambda s: None,
                             report=tmp_path / "r.json")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "c.png"]  # nothing half-written
    report = json.loads((tmp_path / "r.json").read_text())
    assert [os.path.basename(r["input"]) for r in report["images"]] == ["a.png", "c.png"]
    assert len(report["errors"]) == 1 and "b.png" in report["errors"][0]


def test_a_distributed_writer_error_is_raised_after_the_report(tmp_path, tiny_model, monkeypatch):
    """The Lightning path (--num_cpu_processes/--num_gpus) as a one-process world: the writer's bug is handed back
    instead of being raised inside Trainer.predict, so rank 0 writes the report first, as one process does."""
    import moceir.distributed as distributed
    import moceir.pipeline as pipeline

    real_save, real_restore, real_launch = pipeline.save_image, distributed.restore_distributed, distributed.Launch
    handed_back = []

    def broken_for_b(path, *args, **kwargs):
        if path.name.startswith(".b."):
            raise KeyError("a bug in the writer")
        real_save(path, *args, **kwargs)

    def one_process(net, plan, options, budget, launch, *args):
        rows, error = real_restore(net, plan, options, budget, real_launch(), *args)  # no DDP in this process
        handed_back.append(error)
        return rows, error

    class TwoProcesses(distributed.Launch):
        world_size = 2  # takes the distributed branch; one_process runs it as a world of one

    for k, name in enumerate("abc"):
        _img(tmp_path / "in" / f"{name}.png", seed=k)
    monkeypatch.setattr(pipeline, "save_image", broken_for_b)
    monkeypatch.setattr(distributed, "restore_distributed", one_process)
    monkeypatch.setattr(distributed, "Launch", TwoProcesses)
    with pytest.raises(KeyError, match="a bug in the writer"):
        moceir.restore_files(tmp_path / "in", tmp_path / "o", tiny_model, progress=False, log=lambda s: None,
                             report=tmp_path / "r.json")
    assert isinstance(handed_back[0], KeyError)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a.png", "c.png"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert [os.path.basename(r["input"]) for r in report["images"]] == ["a.png", "c.png"]
    assert len(report["errors"]) == 1 and "b.png" in report["errors"][0]


def test_a_report_in_the_output_folder_is_written_when_nothing_is_restored(tmp_path, tiny_ckpt, capsys):
    assert _restore(tmp_path / "missing.png", "-o", tmp_path / "o", "--report", tmp_path / "o" / "r.json",
                    "--checkpoint", tiny_ckpt) == 1
    _one_line(capsys.readouterr().err)
    assert json.loads((tmp_path / "o" / "r.json").read_text())["errors"]


def test_a_png_with_damaged_image_data_is_refused(tmp_path, tiny_ckpt, capsys):
    # reading the EXIF block before decoding made PIL swallow the decoding error: a black image, exit 0
    src = tmp_path / "in" / "bad.png"
    src.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(src)
    data = bytearray(src.read_bytes())
    start = data.index(b"IDAT") + 4 + 200
    data[start:start + 60] = bytes(b ^ 0xFF for b in data[start:start + 60])
    src.write_bytes(bytes(data))
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "bad.png" in err and not (tmp_path / "o" / "bad.png").exists()


def test_an_input_without_a_writable_extension_is_written_as_png(tmp_path, tiny_ckpt, capsys):
    # the temporary file's random suffix used to be named in "unknown file extension: .fokesvys"
    src = tmp_path / "in" / "noext"
    src.parent.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src, format="PNG")
    assert main(["restore", str(src), "-o", str(tmp_path / "o"), "--checkpoint", tiny_ckpt]) == 0
    assert (tmp_path / "o" / "noext.png").is_file()
    assert "writing PNG" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["/x", "a/../b", ".."])
def test_a_suffix_with_a_path_separator_is_refused(tmp_path, tiny_ckpt, capsys, suffix):
    src = _img(tmp_path / "in" / "a.png")
    assert _restore(src, "-o", tmp_path / "o", f"--suffix={suffix}", "--checkpoint", tiny_ckpt) == 2
    _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("mode, dtype", [("float", np.float32), ("nan", np.float32), ("int16", np.int16),
                                         ("int32", np.int32)])
def test_float_and_signed_tiffs_are_refused_not_clipped(tmp_path, tiny_ckpt, capsys, mode, dtype):
    # they came out black or white, exit 0
    import tifffile

    src = tmp_path / "in" / f"{mode}.tif"
    src.parent.mkdir()
    data = (np.random.default_rng(0).random((16, 16)) * (1 if dtype == np.float32 else 1000)).astype(dtype)
    if mode == "nan":
        data[3, 3] = np.nan
    tifffile.imwrite(src, data)
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert f"{mode}.tif" in err and "not supported" in err and "16-bit" in err
    assert not (tmp_path / "o" / f"{mode}.tif").exists()


def test_non_finite_output_is_not_written(tmp_path, tiny_model, capsys):
    # NaN weights (or fp16 overflow) gave black images and exit 0
    import copy

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.output.weight.fill_(float("nan"))
    _img(tmp_path / "in" / "a.png")
    rows = moceir.restore_files(tmp_path / "in", tmp_path / "o", broken, progress=False, log=print)
    assert "error" in rows[0] and "NaN or inf" in rows[0]["error"] and "a.png" in rows[0]["error"]
    assert not (tmp_path / "o" / "a.png").exists()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16bit_images_take_their_orientation_as_8bit_ones_do(tmp_path, orientation):
    import tifffile
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    u8 = (rng.random((6, 10, 3)) * 255).astype(np.uint8)
    tag = [(274, "H", 1, orientation, False)]
    tifffile.imwrite(tmp_path / "a16.tif", u8.astype(np.uint16) * 257, photometric="rgb", extratags=tag)
    tifffile.imwrite(tmp_path / "a8.tif", u8, photometric="rgb", extratags=tag)
    with Image.open(tmp_path / "a8.tif") as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.float32) / 255
    got = load_image(tmp_path / "a16.tif")
    assert got.bit_depth == 16 and got.rgb.shape == expected.shape
    np.testing.assert_allclose(got.rgb, expected, atol=1e-6)


def test_memory_error_while_decoding_gets_the_memory_advice(tmp_path, tiny_ckpt, monkeypatch, capsys):
    import moceir.io as io

    def no_memory(path):
        raise MemoryError("Unable to allocate 1.12 GiB")

    src = _img(tmp_path / "in" / "big.png")
    monkeypatch.setattr(io, "_png_bit_depth", no_memory)
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "out of memory while decoding" in err and "truncated" not in err


def test_output_folder_under_a_file_and_report_beside_it_are_one_line(tmp_path, tiny_ckpt, capsys):
    src = _img(tmp_path / "in" / "a.png")
    (tmp_path / "victim.png").write_text("a file")
    assert _restore(src, "-o", tmp_path / "victim.png" / "sub", "--checkpoint", tiny_ckpt) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "is a file, not a folder" in err
    assert _restore(src, "-o", tmp_path / "o", "--report", tmp_path / "victim.png" / "r.json",
                    "--checkpoint", tiny_ckpt) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "is a file, not a folder" in err and not (tmp_path / "o").exists()


def test_unwritable_output_and_report_folders_are_refused_before_work(tmp_path, tiny_ckpt, monkeypatch, capsys):
    # root passes any permission check, so the test takes the folder's answer from os.access
    src = _img(tmp_path / "in" / "a.png")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("ro") else real_access(p, mode))
    assert _restore(src, "-o", tmp_path / "ro", "--checkpoint", tiny_ckpt) == 2
    assert _restore(src, "-o", tmp_path / "ro" / "new", "--checkpoint", tiny_ckpt) == 2
    assert _restore(src, "-o", tmp_path / "o", "--report", tmp_path / "ro" / "r.json", "--checkpoint", tiny_ckpt) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all("not writable" in ln for ln in lines), lines
    assert not (tmp_path / "o").exists()


def test_report_inside_the_output_folder_to_be_made_is_accepted(tmp_path, tiny_ckpt):
    src = _img(tmp_path / "in" / "a.png")
    assert _restore(src, "-o", tmp_path / "o", "--report", tmp_path / "o" / "r.json", "--checkpoint", tiny_ckpt) == 0
    assert json.loads((tmp_path / "o" / "r.json").read_text())["images"][0]["input"] == str(src)


def test_global_routing_of_a_very_elongated_image(tmp_path, tiny_ckpt):
    src = tmp_path / "in" / "thin.png"
    src.parent.mkdir()
    Image.fromarray(np.full((1, 1200, 3), 128, np.uint8)).save(src)  # the downscaled pass was 0 px high
    assert _restore(src, "-o", tmp_path / "o", "--tile", "64", "--tile_routing", "global",
                    "--checkpoint", tiny_ckpt) == 0
    assert Image.open(tmp_path / "o" / "thin.png").size == (1200, 1)


@pytest.mark.parametrize("device", ["meta", "mkldnn"])
def test_a_device_that_cannot_compute_is_refused_up_front(tmp_path, tiny_ckpt, capsys, device):
    src = _img(tmp_path / "in" / "a.png")
    assert _restore(src, "-o", tmp_path / "o", "--device", device, "--checkpoint", tiny_ckpt) == 2
    _one_line(capsys.readouterr().err)


def test_a_suffix_too_long_for_any_name_is_refused_before_work(tmp_path, tiny_ckpt, capsys):
    a = _img(tmp_path / "a.png")
    assert _restore(a, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt, "--suffix", "x" * 300) == 2
    err = capsys.readouterr().err
    _one_line(err)
    assert "--suffix of 300 bytes" in err and "255" in err
    assert not (tmp_path / "out").exists()


def test_names_up_to_the_limit_are_written_and_one_past_it_is_named(tmp_path, tiny_ckpt, capsys):
    a, longer = _img(tmp_path / "in" / "a.png"), _img(tmp_path / "in2" / "ab.png")
    suffix = "x" * 250  # a + 250 + .png: 255 bytes, legal (the temporary name beside it was not)
    assert _restore(a, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt, "--suffix", suffix) == 0
    assert [len(p.name) for p in (tmp_path / "out").iterdir()] == [255]
    capsys.readouterr()
    assert _restore(longer, "-o", tmp_path / "out2", "--checkpoint", tiny_ckpt, "--suffix", suffix) == 1
    err = capsys.readouterr().err
    _one_line(err)
    assert "is 256 bytes, more than the 255 a file name can hold" in err


def test_an_output_folder_that_is_a_dangling_link_is_called_one(tmp_path, tiny_ckpt, capsys):
    a = _img(tmp_path / "a.png")
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    assert _restore(a, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt) == 2
    (tmp_path / "reports").symlink_to(tmp_path / "nowhere")
    report = tmp_path / "reports" / "r.json"
    assert _restore(a, "-o", tmp_path / "o2", "--checkpoint", tiny_ckpt, "--report", report) == 2
    err = capsys.readouterr().err
    assert err.count("is a link to nothing (dangling), not a folder") == 2, err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "o2").exists()


def test_partial_transparency_to_gif_is_announced_and_kept_on_or_off(tmp_path, tiny_ckpt, capsys):
    rgb = np.random.default_rng(0).random((16, 24, 3)).astype(np.float32)
    alpha = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (16, 1))
    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "a.png", rgb, alpha=alpha)
    assert main(["restore", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "out"), "--ext", "gif",
                 "--checkpoint", tiny_ckpt]) == 0
    assert "partial transparency, which .gif cannot hold" in capsys.readouterr().err
    back = load_image(tmp_path / "out" / "a.gif")
    assert np.array_equal(back.alpha, (alpha >= 0.5).astype(np.float32))


def _full_disk_for(monkeypatch, name: str) -> None:
    """Make writing a file called ``name`` fail as on a full disk (ENOSPC), before anything reaches its place."""
    import errno

    from moceir import pipeline

    real = pipeline.write_atomically

    def write(target, fn, overwrite):
        if target.name == name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, fn, overwrite)

    monkeypatch.setattr(pipeline, "write_atomically", write)


def test_a_full_disk_names_the_output_and_the_batch_goes_on(tmp_path, tiny_ckpt, monkeypatch, capsys):
    a, b = _img(tmp_path / "in" / "a.png", 1), _img(tmp_path / "in" / "b.png", 2)
    _full_disk_for(monkeypatch, "a.png")
    assert main(["restore", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt]) == 1
    err = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)  # tqdm's cursor moves when bars nest
    lines = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
    assert lines == [f"error: {a}: cannot write {tmp_path / 'out' / 'a.png'}: No space left on device; free some "
                     "space or choose another -o"], err  # its own line, not inside the progress bar
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["b.png"] and b.exists()


def test_a_report_that_cannot_be_written_keeps_the_images_and_fails(tmp_path, tiny_ckpt, monkeypatch, capsys):
    _img(tmp_path / "in" / "a.png", 1)
    _full_disk_for(monkeypatch, "r.json")
    assert _restore(tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", tiny_ckpt,
                    "--report", tmp_path / "r.json") == 1
    captured = capsys.readouterr()
    _one_line(captured.err)
    assert (f"error: cannot write the report {tmp_path / 'r.json'}: No space left on device; 1 of 1 image(s) were "
            "written, not the report") in captured.err
    assert "restored 1 image(s)" in captured.out
    assert (tmp_path / "out" / "a.png").exists() and not (tmp_path / "r.json").exists()
    with pytest.raises(moceir.pipeline.ReportError, match="r.json") as raised:
        moceir.restore_files(tmp_path / "in", tmp_path / "out2", tiny_ckpt, report=tmp_path / "r.json",
                             progress=False)
    assert [r["output"] for r in raised.value.rows] == [str(tmp_path / "out2" / "a.png")]


def test_an_output_folder_that_is_a_link_loop_is_called_one(tmp_path, tiny_ckpt, capsys):
    a = _img(tmp_path / "a.png")
    (tmp_path / "out").symlink_to(tmp_path / "out")
    assert _restore(a, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt) == 2
    assert "is a link loop, not a folder" in capsys.readouterr().err


def test_an_output_folder_on_a_read_only_file_system_is_called_so(tmp_path, tiny_ckpt, monkeypatch, capsys):
    from types import SimpleNamespace

    from moceir import pipeline

    a = _img(tmp_path / "a.png")
    monkeypatch.setattr(pipeline.os, "access", lambda path, mode: False)  # root ignores permission bits: simulated
    monkeypatch.setattr(pipeline.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    assert _restore(a, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt) == 2
    assert f"folder {tmp_path} is on a read-only file system; choose another -o" in capsys.readouterr().err


def test_a_folder_input_restores_its_gifs_too(tmp_path, tiny_ckpt):
    """Probe: a folder's .gif files (which moceir reads and writes) were skipped without a note, and a folder of
    GIFs only was "a folder with no images"."""
    (tmp_path / "in").mkdir()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    for name in ("a.gif", "b.GIF", "c.png"):
        image.save(tmp_path / "in" / name)
    rows = moceir.restore_files([tmp_path / "in"], tmp_path / "out", tiny_ckpt, progress=False)
    assert sorted(os.path.basename(r["output"]) for r in rows) == ["a.gif", "b.GIF", "c.png"]


def test_colour_profiles_are_kept_and_16_bit_files_are_read_by_content(tmp_path, tiny_ckpt):
    """Probe: every output dropped the input's ICC profile (a Display P3 or Adobe RGB photo then shows wrong
    colours), and a 16-bit PNG named .tif (or a 16-bit TIFF named .png) was refused as unreadable."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb = np.random.default_rng(0).random((16, 24, 3)).astype(np.float32)
    src = tmp_path / "in"
    src.mkdir()
    for ext in ("png", "jpg", "webp", "tif"):
        Image.fromarray((rgb * 255).astype(np.uint8)).save(src / f"p8_{ext}.{ext}", icc_profile=icc)
    for ext in ("png", "tif"):
        save_image(src / f"p16_{ext}.{ext}", rgb, bit_depth=16, icc_profile=icc)
    (src / "p16_png.tif").write_bytes((src / "p16_png.png").read_bytes())  # named as the other format
    (src / "p16_tif.png").write_bytes((src / "p16_tif.tif").read_bytes())
    assert _restore(src, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt) == 0
    outputs = sorted((tmp_path / "out").iterdir())
    assert len(outputs) == 8
    for out in outputs:
        img = load_image(out)
        assert img.icc_profile == icc and img.bit_depth == (16 if out.stem.startswith("p16") else 8), out.name


def test_png_colour_chunks_are_kept(tmp_path, tiny_ckpt):
    """Probe: a PNG's gAMA and cHRM were dropped without a note (ICC was kept): a linear-light PNG (gAMA 1.0), shown
    through it by a viewer before, came out as if sRGB, far darker."""
    import png
    from PIL import ImageCms, PngImagePlugin

    gamma, chrm = (100000).to_bytes(4, "big"), bytes(range(32))
    cicp = bytes([9, 16, 0, 1])
    colour = ((b"gAMA", gamma), (b"cHRM", chrm), (b"sRGB", b"\0"), (b"cICP", cicp))
    rgb = np.random.default_rng(0).random((16, 24, 3)).astype(np.float32)
    src = tmp_path / "in"
    src.mkdir()
    save_image(src / "plain16.png", rgb, bit_depth=16)
    chunks = list(png.Reader(filename=str(src / "plain16.png")).chunks())
    with open(src / "p16.png", "wb") as f:
        png.write_chunks(f, chunks[:1] + list(colour) + chunks[1:])
    (src / "plain16.png").unlink()
    info = PngImagePlugin.PngInfo()
    for kind, data in colour:
        info.add(kind, data)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(src / "p8.png", pnginfo=info)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray((rgb * 255).astype(np.uint8)).save(src / "icc.png", pnginfo=info, icc_profile=icc)
    assert _restore(src, "-o", tmp_path / "out", "--checkpoint", tiny_ckpt) == 0
    for name in ("p16.png", "p8.png", "icc.png"):
        out = tmp_path / "out" / name
        kept = [(kind, data) for kind, data in png.Reader(filename=str(out)).chunks()  # checks every CRC
                if kind not in (b"IHDR", b"IDAT", b"IEND")]
        with_profile = name == "icc.png"
        assert [k for k, _ in kept if k == b"iCCP"] == [b"iCCP"] * with_profile, name
        assert [c for c in kept if c[0] != b"iCCP"] == [c for c in colour if not (with_profile and c[0] == b"sRGB")]
        with Image.open(out) as im:
            assert im.info["gamma"] == 1.0 and im.size == (24, 16)
    assert load_image(tmp_path / "out" / "icc.png").icc_profile == icc
    assert load_image(src / "p8.png").png_colour == colour


def test_a_decoder_warning_is_a_note_naming_the_file_and_quiet_silences_it(tmp_path, tiny_ckpt, capfd):
    """Probe: a JPEG whose EXIF block claims more bytes than it holds printed PIL's warning as two lines naming
    PIL's own source file ("TiffImagePlugin.py:950: UserWarning: Truncated File Read"), not the image, twice, and
    --quiet ("errors only") let it through."""
    import struct

    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x010E, 2, 500, 100) + struct.pack("<I", 0)  # 500 bytes at 100
    exif = b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(src / "bad_exif.jpg", exif=exif)
    assert main(["restore", str(src), "-o", str(tmp_path / "a"), "--checkpoint", tiny_ckpt]) == 0
    err = capfd.readouterr().err
    assert "Warning" not in err and "PIL" not in err, err
    notes = [line for line in err.splitlines() if "warned" in line]
    assert notes == [f"note: {src / 'bad_exif.jpg'}: its decoder warned: Truncated File Read"], err
    assert _restore(src, "-o", tmp_path / "b", "--checkpoint", tiny_ckpt) == 0
    assert capfd.readouterr().err == ""


def test_links_that_lead_nowhere_a_report_named_as_an_image_and_plot_logs_of_a_file(tmp_path, tiny_ckpt, capsys):
    """Probe: a dangling link or a link loop named *.png in an input folder was skipped without a word (exit 0),
    and a loop given by name was "no such file"; `--report o/r.png` wrote JSON under an image's name into the output
    folder (a later restore of it failed); `plot-logs a.png` blamed an --out that was not given."""
    src = tmp_path / "in"
    _img(src / "a.png")
    (src / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    assert _restore(src, src / "loop.png", "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert f"{src / 'dangling.png'}: is a link to nothing (dangling); fix or remove the link" in err
    assert err.count(f"{src / 'loop.png'}: is a link loop") == 2 and "no such file" not in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.png"]
    assert _restore(src / "*.png", "-o", tmp_path / "o_glob", "--checkpoint", tiny_ckpt) == 1  # a glob as well
    err = capsys.readouterr().err
    assert "dangling.png: is a link to nothing" in err and "loop.png: is a link loop" in err
    assert [p.name for p in (tmp_path / "o_glob").iterdir()] == ["a.png"]
    assert _restore(src / "a.png", "-o", tmp_path / "o2", "--checkpoint", tiny_ckpt, "--report",
                    tmp_path / "o2" / "r.png") == 2
    assert "the report is JSON; name it .json, not .png" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert main(["plot-logs", str(src / "a.png")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src / 'a.png'} is a file; pass the run folder")


def test_a_pipe_named_as_an_image_is_called_one_in_a_folder_and_by_name(tmp_path, tiny_ckpt, capsys):
    """Probe: a FIFO named *.png in an input folder was skipped without a word (exit 0), and given by name it was
    "no such file, folder or matching glob"; /dev/zero likewise."""
    src = tmp_path / "in"
    _img(src / "a.png")
    os.mkfifo(src / "pipe.png")
    assert _restore(src, "-o", tmp_path / "o", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert f"{src / 'pipe.png'}: is not a regular file (a pipe or device); pass an image file" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["a.png"]
    assert _restore(src / "pipe.png", "/dev/zero", "-o", tmp_path / "o2", "--checkpoint", tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert err.count("is not a regular file (a pipe or device)") == 2 and "no such file" not in err, err


def test_the_model_note_follows_the_work_and_never_precedes_an_error(tmp_path, tiny_model, capsys):
    """Probe: `moceir restore x.png -o file` printed the bundled model's note (several lines' worth) before the
    one-line error."""
    noted = str(moceir.save_model(tiny_model, tmp_path / "noted.safetensors", note="a test model"))
    src = _img(tmp_path / "x.png")
    assert main(["restore", str(src), "-o", str(src), "--checkpoint", noted]) == 2
    out = capsys.readouterr()
    assert out.out == "" and len(out.err.strip().splitlines()) == 1 and "is a file" in out.err
    assert main(["restore", str(src), "-o", str(tmp_path / "o"), "--checkpoint", noted]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["model: a test model",
                                                         f"restored 1 image(s) into {tmp_path / 'o'}; 0 failed"]


def test_a_tiled_photo_keeps_its_profile_and_a_file_named_twice_is_restored_once(tmp_path, tiny_ckpt):
    """Probe (12-megapixel JPEG with a profile, restored in tiles, named by its folder and by a glob: 1 output,
    profile kept, 28 s on the 2-core CPU): here the same path at a small size, with tiles forced."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "in"
    src.mkdir()
    pixels = (np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(src / "photo.jpg", icc_profile=icc)
    assert _restore(src, src / "*.jpg", "-o", tmp_path / "o", "--checkpoint", tiny_ckpt, "--tile", "16",
                    "--report", tmp_path / "r.json") == 0
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["photo.jpg"]
    assert json.loads((tmp_path / "r.json").read_text())["images"][0]["tile"] == 16
    assert load_image(tmp_path / "o" / "photo.jpg").icc_profile == icc


def test_nothing_to_restore_shows_no_progress_bar(tmp_path, tiny_ckpt, capsys):
    """Probe: a missing input printed its error, then an empty "restoring: 0img" bar, twice."""
    assert main(["restore", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"), "--checkpoint", tiny_ckpt]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "restoring" not in err


def test_overwrite_never_replaces_an_input_even_through_a_linked_folder(tmp_path, tiny_model):
    """Mutation audit: --overwrite letting an output replace its input, or an output folder that links to the
    inputs' folder not being seen as theirs, passed; test_restore_never_overwrites ran without --overwrite only."""
    from moceir.io import save_image

    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    save_image(src, np.random.default_rng(5).random((16, 16, 3)).astype(np.float32))
    before = src.read_bytes()
    (tmp_path / "link").symlink_to(tmp_path / "in", target_is_directory=True)
    for out_dir in (tmp_path / "in", tmp_path / "link"):
        rows = moceir.restore_files([src], out_dir, model=tiny_model, overwrite=True, progress=False,
                                    log=lambda _: None)
        assert len(rows) == 1 and "would overwrite an input" in rows[0].get("error", ""), (out_dir, rows)
        assert src.read_bytes() == before


def test_a_file_name_with_a_line_break_cannot_forge_a_line(tmp_path, tiny_ckpt, capsys):
    """Probe: an unreadable file named "a<newline>error: ... restored" printed two lines, the second one forged."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "x\nrestored 9 image(s) into out; 0 failed\n.png").write_bytes(b"not a png")
    save_image(src / "ok.png", np.full((16, 16, 3), 0.5, np.float32))
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt, "--quiet"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "x\\x0arestored 9 image(s)" in errors[0], err
    assert not any(line.startswith("restored 9") for line in err.splitlines())


def test_a_benchmark_file_name_with_a_line_break_cannot_forge_a_line(tmp_path, tiny_layout, tiny_ckpt, capsys):
    (tiny_layout / "denoising/cBSD68/original_png" / "x\nerror: none.png").write_bytes(b"not a png")
    assert main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_25", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [
        line for line in err.splitlines() if line.startswith("error: denoise_25: ") and "x\\x0aerror: none" in line]
    assert "error: none" in err and len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_quoted_glob_that_matches_folders_restores_their_images(tmp_path):
    """Probe: restore 'gl/*' restored only gl/top.png, skipping the folders the glob matched without a word, and
    'gl/shoot*' (two folders) was "no such file, folder or matching glob"; the shell's expansion restored all."""
    from moceir.pipeline import gather_inputs

    for rel in ("top.png", "shoot1/a.png", "shoot2/b.png", "shoot2/.hidden.png"):
        (tmp_path / "gl" / rel).parent.mkdir(parents=True, exist_ok=True)
        save_image(tmp_path / "gl" / rel, np.zeros((4, 4, 3), np.float32))
    (tmp_path / "gl" / "empty").mkdir()
    files, errors, _ = gather_inputs([str(tmp_path / "gl" / "*")])
    assert [f.relative_to(tmp_path / "gl").as_posix() for f in files] == ["top.png", "shoot1/a.png", "shoot2/b.png"]
    assert [e for _, e in errors] == [f"{tmp_path / 'gl' / 'empty'}: folder has no images "
                                      "(png, jpg, jpeg, bmp, tif, tiff, webp, gif); nothing to restore there"]
    files, errors, _ = gather_inputs([str(tmp_path / "gl" / "shoot*")])
    assert [f.name for f in files] == ["a.png", "b.png"] and not errors


def test_a_rerun_into_the_input_folder_does_not_restore_the_earlier_outputs(tmp_path, tiny_ckpt, capsys):
    """Probe: `restore photos -o photos --suffix _r` run twice restored a_r.png into a_r_r.png and said a.png's output
    "would overwrite an input"; with --overwrite a third run made a_r_r_r.png. Review: a file of that name may be
    another photo (scan_r.png, the right page), so it is neither restored nor replaced, even with --overwrite."""
    import hashlib

    photos = tmp_path / "photos"
    photos.mkdir()
    save_image(photos / "a.png", np.zeros((16, 16, 3), np.float32))
    argv = ["restore", str(photos), "-o", str(photos), "--suffix", "_r", "--checkpoint", tiny_ckpt]
    assert main(argv) == 0
    digest = hashlib.md5((photos / "a_r.png").read_bytes()).hexdigest()
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main([*argv, *extra]) == 1
        err = capsys.readouterr().err
        assert f"note: {photos / 'a_r.png'}: has the name of {photos / 'a.png'}'s output (an earlier run's?): it is " \
               "neither restored nor replaced" in err
        assert f"error: output {photos / 'a_r.png'} is an input too (left out above); it is not replaced: move it " \
               "away to restore" in err
        assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_r.png"]
        assert hashlib.md5((photos / "a_r.png").read_bytes()).hexdigest() == digest
    # named on the command line, it is restored as any input, and protected as one
    assert main(["restore", str(photos / "a.png"), str(photos / "a_r.png"), "-o", str(photos), "--suffix", "_r",
                 "--checkpoint", tiny_ckpt, "--overwrite"]) == 1
    assert "would overwrite an input" in capsys.readouterr().err and (photos / "a_r_r.png").is_file()
    assert hashlib.md5((photos / "a_r.png").read_bytes()).hexdigest() == digest


def test_a_glob_that_matches_the_output_folder_leaves_it_out(tmp_path, tiny_ckpt, capsys):
    """Review: `restore 'photos/*' -o photos/restored` run twice restored the first run's outputs again (the glob
    matched the output folder), renaming the outputs on the clash."""
    photos = tmp_path / "photos"
    photos.mkdir()
    save_image(photos / "a.png", np.zeros((16, 16, 3), np.float32))
    argv = ["restore", str(photos / "*"), "-o", str(photos / "restored"), "--checkpoint", tiny_ckpt, "--overwrite"]
    assert main(argv) == 0 and main(argv) == 0
    assert f"note: {photos / 'restored'}: the output folder, which {photos / '*'} matches, is left out" in \
        capsys.readouterr().err
    assert sorted(p.name for p in (photos / "restored").iterdir()) == ["a.png"]


def test_restore_stops_restoring_once_its_output_folder_is_removed(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """Probe: with the output folder deleted after 20 of 300 outputs, every other image was still decoded and
    restored, then failed to be written: 279 error lines (hours of work, with large photos)."""
    import shutil

    import moceir.pipeline as pipeline

    src = tmp_path / "in"
    src.mkdir()
    for k in range(8):
        save_image(src / f"{k}.png", np.full((16, 16, 3), k / 10, np.float32))
    out = tmp_path / "out"
    real_write, computed = pipeline.write_atomically, []

    def write_then_remove(target, write, overwrite):
        real_write(target, write, overwrite)
        shutil.rmtree(out, ignore_errors=True)  # as a user would, after the first output

    real_compute = pipeline.Restorer.compute
    monkeypatch.setattr(pipeline, "write_atomically", write_then_remove)
    monkeypatch.setattr(pipeline.Restorer, "compute", lambda self, group: computed.append(1) or real_compute(self, group))
    report = tmp_path / "report.json"
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", tiny_ckpt, "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert err.count(f"error: the output folder {out} was removed while restoring") == 1
    assert len(computed) < 6, len(computed)
    doc = json.loads(report.read_text())  # every image is accounted for
    assert len(doc["images"]) + len(doc["errors"]) == 8
    assert sum(e.endswith(f"not restored: the output folder {out} was removed") for e in doc["errors"]) >= 3


def test_a_file_named_through_a_link_or_dots_is_never_left_out(tmp_path):
    """Review: a file named as alias.png (a link to X/a_r.png) or as L/../a_r.png was left out as an earlier
    output, its name compared by spelling, not by the file."""
    import os

    from moceir.pipeline import RestoreOptions, plan_restore

    x = tmp_path / "X"
    x.mkdir()
    for name in ("a.png", "a_r.png"):
        save_image(x / name, np.zeros((8, 8, 3), np.float32))
    os.symlink(x / "a_r.png", tmp_path / "alias.png")
    lines = []
    plan = plan_restore([str(x), str(tmp_path / "alias.png")], x, None, RestoreOptions(), suffix="_r",
                        log=lines.append)
    assert any(job.input.name in ("a_r.png", "alias.png") for job in plan.jobs), lines


def test_a_glob_leaves_out_the_files_in_the_output_folder(tmp_path, tiny_ckpt, capsys):
    """Review: `restore '*/*.png' -o out`, run again, restored its own earlier output out/p.png (as p_out.png)."""
    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "p.png", np.zeros((16, 16, 3), np.float32))
    argv = ["restore", str(tmp_path / "*" / "*.png"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
            "--overwrite"]
    assert main(argv) == 0 and main(argv) == 0
    assert "1 file(s) in the output folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p.png"]


def test_a_glob_of_files_all_in_the_output_folder_restores_them_in_place(tmp_path, tiny_ckpt):
    """The files a glob matches in the output folder are left out only beside others: 'photos/*.png' -o photos
    restores in place."""
    photos = tmp_path / "photos"
    photos.mkdir()
    save_image(photos / "a.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", str(photos / "*.png"), "-o", str(photos), "--suffix", "_r", "--checkpoint", tiny_ckpt,
                 "--quiet"]) == 0
    assert sorted(p.name for p in photos.iterdir()) == ["a.png", "a_r.png"]


def test_a_rerun_whose_outputs_were_renamed_on_a_clash_leaves_them_too(tmp_path, tiny_ckpt, capsys):
    """Probe (final reread): a.png and a.jpg restored into their own folder as PNG share a_r.png and are written as
    a_r_png.png and a_r_jpg.png; a rerun must leave those (the renamed names) neither restored nor replaced."""
    import hashlib

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "a.jpg"):
        save_image(photos / name, np.full((16, 16, 3), 0.4, np.float32))
    argv = ["restore", str(photos), "-o", str(photos), "--suffix", "_r", "--ext", "png", "--checkpoint", tiny_ckpt]
    assert main(argv) == 0
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in photos.iterdir()}
    assert sorted(sums) == ["a.jpg", "a.png", "a_r_jpg.png", "a_r_png.png"]
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 1
    assert capsys.readouterr().err.count("is an input too (left out above)") == 2
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in photos.iterdir()} == sums

"""`moceir test` against hostile inputs: tiny images, CDD11 names, earlier results, an output path under a file."""

import csv
import json

import numpy as np
import pytest
import torch

import moceir
from moceir.cli import main
from moceir.io import save_image


def _test(ckpt, data, out, *benchmarks, extra=()):
    return main(["test", "--ckpt", ckpt, "--benchmarks", *benchmarks, "--data_file_dir", str(data),
                 "--output_path", str(out), "--device", "cpu", "--quiet", *extra])


def _rows(out):
    with open(out / "per_image.csv", newline="") as f:
        return [(r["benchmark"], r["name"]) for r in csv.DictReader(f)]


def test_image_smaller_than_16_px_is_skipped_and_the_rest_scored(tmp_path, small_layout, tiny_ckpt, capsys):
    small = small_layout / "denoising/cBSD68/original_png/small.png"
    save_image(small, np.zeros((10, 10, 3), np.float32))
    save_image(small_layout / "denoising/cBSD68/original_png/edge.png", np.zeros((20, 17, 3), np.float32))  # -> 16x16
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "denoise_25") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(small) in err[0] and "smaller than 16x16" in err[0]
    assert sorted(name for _, name in _rows(out)) == ["0001.png", "0002.png", "edge.png"]


def test_cdd11_results_keep_their_degradation_folder(tmp_path, tiny_ckpt):
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for folder in ("haze", "rain", "clear"):
        (data / "cdd11/test" / folder).mkdir(parents=True)
        save_image(data / "cdd11/test" / folder / "001.png", rng.random((16, 16, 3)).astype(np.float32))
    out = tmp_path / "otc"
    assert _test(tiny_ckpt, data, out, "cdd11", extra=["--trainset", "CDD11_all", "--save_results"]) == 0
    assert _rows(out) == [("cdd11", "haze/001.png"), ("cdd11", "rain/001.png")]
    saved = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert saved == ["cdd11/haze/001.png", "cdd11/rain/001.png"]
    per_image = json.loads((out / "results.json").read_text())["per_image"]["cdd11"]
    assert [row["saved"] for row in per_image] == ["haze/001.png", "rain/001.png"]


def test_flags_that_would_be_ignored_are_refused_or_noted(tmp_path, small_layout, tiny_ckpt, capsys):
    """Probe: `--ckpt A --checkpoint_id B` scored A without a word; `--trainset CDD11_single` without cdd11 and
    `--trainset bogus` changed nothing, silently."""
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--checkpoint_id", "run1"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --ckpt {tiny_ckpt} and --checkpoint_id run1 name two "
                                                    "models; give one"]
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--trainset", "bogus"]) == 2
    assert "--trainset bogus: choose standard or CDD11_" in capsys.readouterr().err
    assert not out.exists()
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--trainset", "CDD11_single"]) == 0
    assert capsys.readouterr().err.splitlines() == ["note: --trainset CDD11_single selects which cdd11 images are "
                                                    "scored; --benchmarks has no cdd11, so it changes nothing here"]
    (out / "images" / "lolv1").mkdir(parents=True)  # Probe: an earlier run's images stayed beside new results
    assert main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(small_layout),
                 "--output_path", str(out), "--device", "cpu", "--overwrite"]) == 0
    assert "holds an earlier run's restored images; without --save_results they are left" in capsys.readouterr().err


def test_flat_benchmarks_keep_their_file_names(tmp_path, small_layout, tiny_ckpt):
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "dehaze", "lolv1", extra=["--save_results"]) == 0
    assert _rows(out) == [("dehaze", "0001_0.8_0.2.jpg"), ("dehaze", "0002_0.8_0.2.jpg"),
                          ("lolv1", "1.png"), ("lolv1", "2.png")]
    assert sorted(p.name for p in (out / "images" / "dehaze").iterdir()) == ["0001_0.8_0.2.png", "0002_0.8_0.2.png"]


def _one_result(name="a.png"):
    from moceir.evaluation import BenchmarkResult

    row = {"name": name, "psnr": 20.0, "ssim": 0.5, "input_psnr": 10.0, "seconds": 0.1, "experts": [0, 1]}
    return [BenchmarkResult("lolv1", [row])]


def test_reports_are_replaced_atomically(tmp_path, monkeypatch):
    from moceir.evaluation import write_reports

    write_reports(_one_result(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerow", disk_full)
    with pytest.raises((OSError, ValueError)) as e:
        write_reports(_one_result("b.png"), tmp_path)
    assert (tmp_path / "per_image.csv").read_bytes() == before["per_image.csv"]  # the earlier one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporary file left
    assert "per_image.csv" in str(e.value)


def test_saved_image_is_written_atomically(tmp_path, small_layout, tiny_ckpt, monkeypatch):
    from moceir import evaluation

    def half_written(path, rgb):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "save_image", half_written)
    ds = evaluation.benchmark_dataset(small_layout, "lolv1")
    model = moceir.load_model(tiny_ckpt, device="cpu")
    targets, _ = evaluation.save_targets(ds, tmp_path / "images")
    row = evaluation.score_image(model, (ds, targets), 0, torch.device("cpu"))
    assert row["psnr"] > 0 and "1.png" in row["not_saved"] and "No space left" in row["not_saved"]  # still scored
    assert list((tmp_path / "images").iterdir()) == []  # neither a broken 1.png nor a temporary file


def test_earlier_results_are_refused_without_overwrite(tmp_path):
    from moceir.evaluation import check_results_folder, write_reports
    from moceir.pipeline import UsageError

    check_results_folder(tmp_path / "r", ["lolv1"], save_results=True, overwrite=False)  # nothing there yet
    write_reports(_one_result(), tmp_path / "r")
    with pytest.raises(UsageError, match="results.md.*--overwrite"):
        check_results_folder(tmp_path / "r", ["lolv1"], overwrite=False)
    check_results_folder(tmp_path / "r", ["lolv1"])  # overwrite=True (the default): today's behaviour
    (tmp_path / "s" / "images" / "lolv1").mkdir(parents=True)
    with pytest.raises(UsageError, match="images/lolv1"):
        check_results_folder(tmp_path / "s", ["lolv1"], save_results=True, overwrite=False)
    check_results_folder(tmp_path / "s", ["lolv1"], save_results=False, overwrite=False)


def test_second_test_run_refuses_to_replace_results(tmp_path, small_layout, tiny_ckpt, capsys):
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1") == 0
    first = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert _test(tiny_ckpt, small_layout, out, "lolv1") == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "results.json").read_bytes() == first
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--overwrite"]) == 0


def test_output_path_under_a_file_is_one_line(tmp_path, small_layout, tiny_ckpt, capsys):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep me")
    assert _test(tiny_ckpt, small_layout, victim / "out", "lolv1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(victim) in err[0] and "--output_path" in err[0]
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("make", ["file_parent", "file_itself", "images_is_a_file"])
def test_output_path_problems_are_found_before_scoring(tmp_path, make):
    from moceir.evaluation import check_results_folder
    from moceir.pipeline import UsageError

    (tmp_path / "f").write_text("x")
    out = {"file_parent": tmp_path / "f" / "out", "file_itself": tmp_path / "f", "images_is_a_file": tmp_path}[make]
    if make == "images_is_a_file":
        (tmp_path / "images").write_text("x")
    with pytest.raises(UsageError, match="--output_path"):
        check_results_folder(out, ["lolv1"], save_results=True)


def test_results_json_names_the_skipped_image(tmp_path, small_layout, tiny_ckpt):
    save_image(small_layout / "llie/LOLv1/Test/input/9.png", np.zeros((8, 40, 3), np.float32))
    save_image(small_layout / "llie/LOLv1/Test/target/9.png", np.zeros((8, 40, 3), np.float32))
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1") == 1
    data = json.loads((out / "results.json").read_text())
    assert data["summary"][0]["images"] == 2 and "9.png" in data["errors"]["lolv1"][0]


def test_inputs_sharing_a_stem_are_saved_apart(tmp_path, small_layout, tiny_ckpt, capsys):
    lol = small_layout / "llie/LOLv1/Test"
    save_image(lol / "input/1.jpg", np.full((24, 32, 3), 0.1, np.float32))  # 1.png's twin in another format
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--save_results"]) == 0
    assert sorted(name for _, name in _rows(out)) == ["1.jpg", "1.png", "2.png"]
    assert sorted(p.name for p in (out / "images/lolv1").iterdir()) == ["1_jpg.png", "1_png.png", "2.png"]
    assert "1.jpg -> 1_jpg.png" in capsys.readouterr().err
    with open(out / "per_image.csv", newline="") as f:  # the renames are recorded, not only printed once
        assert sorted((r["name"], r["saved"]) for r in csv.DictReader(f)) == [
            ("1.jpg", "1_jpg.png"), ("1.png", "1_png.png"), ("2.png", "2.png")]


def test_two_clean_images_for_one_key_is_a_one_line_error(tmp_path, small_layout, tiny_ckpt, capsys):
    target = small_layout / "llie/LOLv1/Test/target"
    save_image(target / "1.jpg", np.zeros((24, 32, 3), np.float32))
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1", "dehaze") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.jpg and 1.png" in err[0] and f"keep one of them in {target}" in err[0]
    assert [b for b, _ in _rows(out)] == ["dehaze", "dehaze"]  # the other benchmark is still scored


def test_an_image_too_large_for_memory_is_skipped_and_the_rest_scored(tmp_path, small_layout, tiny_ckpt, capsys,
                                                                     monkeypatch):
    from moceir import evaluation

    real = evaluation.restore_tensor

    def short_of_memory(model, lq, **kwargs):
        if lq.mean() < 0.2:  # LOL's dark inputs: the first one "does not fit"
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 bytes")
        return real(model, lq, **kwargs)

    monkeypatch.setattr(evaluation, "restore_tensor", short_of_memory)
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1", "dehaze") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("out of memory restoring 16x32 whole" in line for line in err)
    assert [b for b, _ in _rows(out)] == ["dehaze", "dehaze"]


def _gray16(path, h, w):
    from PIL import Image

    Image.fromarray(np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)).save(path)


def test_16bit_and_exif_rotated_references_are_scored_as_restore_reads_them(tmp_path, small_layout, tiny_ckpt):
    from PIL import Image

    from moceir.io import load_image, read_rgb

    cbsd = small_layout / "denoising/cBSD68/original_png"
    _gray16(cbsd / "0001.png", 24, 32)  # was read as all white (convert("RGB") clips 16-bit samples)
    gt = small_layout / "llie/LOLv1/Test/target/1.png"
    upright = np.asarray(Image.open(gt))
    sideways = Image.fromarray(np.ascontiguousarray(np.rot90(upright)))  # stored sideways, displayed upright
    exif = sideways.getexif()
    exif[0x0112] = 6
    gt.unlink()
    sideways.save(gt.with_suffix(".jpg"), exif=exif, quality=100)
    for path in (cbsd / "0001.png", gt.with_suffix(".jpg")):
        assert np.abs(read_rgb(path) / 255 - load_image(path).rgb).max() <= 0.5 / 255 + 1e-6
    assert read_rgb(cbsd / "0001.png").mean() == pytest.approx(127.5, abs=0.6)
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "denoise_25", "lolv1") == 0
    per_image = json.loads((out / "results.json").read_text())["per_image"]
    assert [r["name"] for r in per_image["lolv1"]] == ["1.png", "2.png"]  # the rotated reference fits its input
    noisy = {r["name"]: r["input_psnr"] for r in per_image["denoise_25"]}
    assert 19 < noisy["0001.png"] < 22  # sigma 25 on the real reference; against all-white it was far lower


def test_a_pair_of_unequal_sizes_is_skipped_not_scored_misaligned(tmp_path, small_layout, tiny_ckpt, capsys):
    lol = small_layout / "llie/LOLv1/Test"
    wider = np.random.default_rng(0).random((24, 39, 3)).astype(np.float32)  # its input is 32 wide, 24 high
    save_image(lol / "target" / "1.png", wider)
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    expected = (f"error: lolv1: {lol / 'input' / '1.png'}: 32x24 does not match its clean image "
                f"{lol / 'target' / '1.png'} (39x24); fix or remove the pair (skipped)")
    assert len(err) == 1 and err[0] == expected, err
    assert _rows(out) == [("lolv1", "2.png")]


def test_a_pipe_among_benchmark_images_is_skipped_not_waited_on(tmp_path, small_layout, tiny_ckpt, capsys):
    import os

    fifo = small_layout / "denoising/cBSD68/original_png/0003.png"
    os.mkfifo(fifo)
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "denoise_25") == 1
    err = capsys.readouterr().err
    assert f"{fifo}: is not a regular file (a pipe or device)" in err and len(err.strip().splitlines()) == 1
    assert sorted(name for _, name in _rows(out)) == ["0001.png", "0002.png"]


def test_a_benchmark_whose_images_cannot_be_saved_is_still_scored(tmp_path, small_layout, tiny_ckpt, capsys,
                                                                  monkeypatch):
    import errno

    from moceir import evaluation

    def full(path, rgb):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluation, "save_image", full)
    out = tmp_path / "r"
    assert _test(tiny_ckpt, small_layout, out, "lolv1", extra=["--save_results"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.endswith("No space left on device); free some space or choose another "
                                               "--output_path (scored, not saved)") for line in err), err
    assert _rows(out) == [("lolv1", "1.png"), ("lolv1", "2.png")]  # were dropped from the table
    assert "not_saved" not in json.loads((out / "results.json").read_text())["per_image"]["lolv1"][0]


def test_results_are_written_as_a_set_or_not_at_all(tmp_path, monkeypatch):
    import errno

    import moceir.io
    from moceir.evaluation import write_reports

    write_reports(_one_result(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = moceir.io._written_temp

    def full_at_the_json(target, write):
        if target.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, write)

    monkeypatch.setattr(moceir.io, "_written_temp", full_at_the_json)
    with pytest.raises(OSError) as raised:
        write_reports(_one_result("b.png"), tmp_path)
    assert raised.value.filename == str(tmp_path / "results.json")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # results.md was not replaced alone


def test_nothing_scored_says_so(tmp_path, small_layout, tiny_ckpt, capsys):
    for image in (small_layout / "llie/LOLv1/Test/input").iterdir():
        image.write_bytes(b"broken")
    assert _test(tiny_ckpt, small_layout, tmp_path / "r", "lolv1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: no image of lolv1 could be scored; no results written" and len(err) == 3
    assert not (tmp_path / "r" / "results.md").exists()


def test_a_one_pixel_image_becomes_a_tensor_without_a_read_only_warning(monkeypatch):
    """Probe: `moceir test` printed PyTorch's "NumPy array is not writable" warning for a 1x1 benchmark image (its
    transpose was already contiguous, so the read-only PIL array reached torch uncopied). PyTorch warns once per
    process, so the test checks what reaches torch.from_numpy instead."""
    import torch
    from PIL import Image

    import moceir.data.datasets as datasets

    real = torch.from_numpy

    def writable_only(array):
        assert array.flags.writeable, "a read-only array reached torch.from_numpy"
        return real(array)

    monkeypatch.setattr(datasets.torch, "from_numpy", writable_only)
    pixel = np.asarray(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert datasets._to_tensor(pixel).flatten().tolist() == [1.0, 0.0, 0.0]


def test_save_results_never_writes_into_the_benchmarks_own_folder(tmp_path, small_layout, tiny_ckpt, capsys):
    """images/lolv1 a link to the inputs: even with --overwrite, refused before anything is written."""
    inputs = small_layout / "llie/LOLv1/Test/input"
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    (tmp_path / "r" / "images").mkdir(parents=True)
    (tmp_path / "r" / "images" / "lolv1").symlink_to(inputs)
    assert _test(tiny_ckpt, small_layout, tmp_path / "r", "lolv1", extra=["--save_results", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a folder of the benchmark's own images" in err[0] and str(inputs) in err[0]
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before
    assert not (tmp_path / "r" / "results.json").exists()


def test_a_model_whose_output_is_nan_scores_nothing_and_says_so(tmp_path, small_layout, tiny_ckpt, capsys):
    model = moceir.load_model(tiny_ckpt)
    with torch.no_grad():
        model.patch_embed.proj.weight.fill_(3e38)  # finite weights, inf then NaN inside
    ckpt = moceir.save_model(model, tmp_path / "nan_out.safetensors")
    assert _test(str(ckpt), small_layout, tmp_path / "r", "lolv1", extra=["--save_results"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("output holds NaN or inf; not scored" in line for line in err[:2])
    assert "no image of lolv1 could be scored" in err[2]
    assert not (tmp_path / "r" / "results.json").exists() and not list((tmp_path / "r").rglob("*.png"))


def test_identical_input_and_target_give_valid_json(tmp_path, small_layout, tiny_ckpt):
    """PSNR of identical images is inf: the table says so, results.json holds null (JSON has no Infinity)."""
    lol = small_layout / "llie/LOLv1/Test"
    (lol / "input" / "1.png").write_bytes((lol / "target" / "1.png").read_bytes())
    assert _test(tiny_ckpt, small_layout, tmp_path / "r", "lolv1") == 0
    text = (tmp_path / "r" / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in results.json"))
    assert data["summary"][0]["input_psnr"] is None and data["per_image"]["lolv1"][0]["input_psnr"] is None
    assert "| inf |" in (tmp_path / "r" / "results.md").read_text()
    data["per_image"]["lolv1"][0]["psnr"] = None  # a restored image equal to its target
    (tmp_path / "perfect.json").write_text(json.dumps(data))
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--from_results",
                 str(tmp_path / "perfect.json"), "--output_path", str(tmp_path / "routing"), "--no-bypass_column"]) == 0
    routing = json.loads((tmp_path / "routing" / "routing.json").read_text(),
                         parse_constant=lambda name: pytest.fail(f"{name} in routing.json"))
    assert routing["psnr"]["lolv1"] is None and "| inf |" in (tmp_path / "routing" / "routing.md").read_text()


@pytest.mark.parametrize("size", ["ab", None, [1e308, 1e308], [16]])
def test_routing_from_results_with_a_damaged_size_is_one_line(tmp_path, small_layout, tiny_ckpt, size, capsys):
    assert _test(tiny_ckpt, small_layout, tmp_path / "r", "lolv1") == 0
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    data["per_image"]["lolv1"][0]["size"] = size
    (tmp_path / "bad.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--from_results", str(tmp_path / "bad.json"),
                 "--output_path", str(tmp_path / "routing"), "--no-bypass_column"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not [height, width] in pixels" in err[0]


def test_top2_routing_counts_and_costs_both_experts_of_each_image(tmp_path, small_layout):
    """Probe: with topk=2 only the first expert of each layer was recorded: half the picks, half the FLOPs."""
    from conftest import fill_deterministic
    from moceir.demo import DemoSession

    model = moceir.create_model("MoCE_IR_tiny", topk=2)
    fill_deterministic(model, 0.05)
    ckpt = str(moceir.save_model(model, tmp_path / "top2.safetensors"))
    assert _test(ckpt, small_layout, tmp_path / "r", "lolv1") == 0
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["per_image"]["lolv1"]
    assert all(len(layer) == 2 and layer[0] != layer[1] for row in rows for layer in row["experts"])
    with open(tmp_path / "r" / "per_image.csv", newline="") as f:
        assert [r["experts"] for r in csv.DictReader(f)] == [" ".join(f"{a}+{b}" for a, b in row["experts"])
                                                             for row in rows]
    out = tmp_path / "routing"
    assert main(["routing", "--ckpt", ckpt, "--benchmarks", "lolv1", "--from_results", str(tmp_path / "r" /
                 "results.json"), "--output_path", str(out), "--no-bypass_column"]) == 0
    data = json.loads((out / "routing.json").read_text())
    assert np.array(data["counts"]).sum(axis=2).tolist() == [[4, 4, 4]]  # 2 images x 2 experts per layer
    session = DemoSession(ckpt, "cpu", 1e6, tmp_path / "work", tmp_path / "results")
    spent = [session.expert_table(row["experts"], *row["size"])[1] for row in rows]
    table, _, _ = session.expert_table(rows[0]["experts"], *rows[0]["size"])
    first_only = session.expert_table([layer[0] for layer in rows[0]["experts"]], *rows[0]["size"])[1]
    assert table[0][2].count("+E") == 1 and spent[0] > first_only
    assert abs(data["flops"][0]["expert_gflops_spent"] - np.mean(spent)) < 1e-9


def test_an_ablation_run_says_so_and_routing_will_not_read_it_as_the_network(tmp_path, small_layout, tiny_ckpt,
                                                                             capsys):
    """Probe: `test --experts skip` wrote results with no trace of the ablation; `routing --from_results` then
    showed its PSNR beside the experts' FLOPs as if they had run."""
    assert _test(tiny_ckpt, small_layout, tmp_path / "r", "lolv1", extra=["--experts", "skip"]) == 0
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert data["experts"] == "skip" and "(experts bypassed: --experts skip)" in data["title"]
    assert "(experts bypassed" in (tmp_path / "r" / "results.md").read_text()
    capsys.readouterr()
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--from_results",
                 str(tmp_path / "r" / "results.json"), "--output_path", str(tmp_path / "routing")]) == 2
    assert "made with the experts bypassed (--experts skip)" in capsys.readouterr().err
    assert _test(tiny_ckpt, small_layout, tmp_path / "plain", "lolv1") == 0
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["experts"] == "run"


def test_overwrite_names_the_earlier_images_it_leaves(tmp_path, tiny_ckpt, capsys):
    """Probe: a second run with --overwrite left an earlier run's 10.png beside its own, without a word."""
    from conftest import make_tiny_layout

    out = tmp_path / "r"
    three, two = make_tiny_layout(tmp_path / "three", n=3), make_tiny_layout(tmp_path / "two", n=2)
    assert _test(tiny_ckpt, three, out, "lolv1", extra=["--save_results"]) == 0  # 1, 2 and 10.png
    capsys.readouterr()
    assert _test(tiny_ckpt, two, out, "lolv1", extra=["--save_results", "--overwrite"]) == 0  # 1 and 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"note: {out / 'images' / 'lolv1'}: 1 image(s) there are not from this run (e.g. 10.png); an "
                   "earlier run left them; remove them, or use a new --output_path"]


def test_a_decision_score_of_a_model_with_non_finite_outputs_is_nan(tmp_path, small_layout, tiny_ckpt):
    """Review: the relay judge (scored_benchmark) stopped on such a candidate ("check the data folder") instead of
    setting it aside as unusable, and a model NaN on some images would have been judged on the others."""
    from moceir.evaluation import scored_benchmark

    model = moceir.load_model(tiny_ckpt)
    with torch.no_grad():
        model.patch_embed.proj.weight.fill_(3e38)
    result = scored_benchmark(model, small_layout, "lolv1", torch.device("cpu"), progress=False)
    assert result.unusable and np.isnan(result.mean("psnr")) and len(result.errors) == 2


def test_routing_from_results_of_a_top2_model_needs_both_experts_per_layer(tmp_path, small_layout, capsys):
    """Review: a results.json holding one expert per layer (as written before top-k was reported whole) was taken
    for a top-2 model, halving its expert FLOPs again."""
    from conftest import fill_deterministic

    model = moceir.create_model("MoCE_IR_tiny", topk=2)
    fill_deterministic(model, 0.05)
    ckpt = str(moceir.save_model(model, tmp_path / "top2.safetensors"))
    assert _test(ckpt, small_layout, tmp_path / "r", "lolv1") == 0
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    for row in data["per_image"]["lolv1"]:
        row["experts"] = [layer[0] for layer in row["experts"]]
    (tmp_path / "old.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["routing", "--ckpt", ckpt, "--benchmarks", "lolv1", "--from_results", str(tmp_path / "old.json"),
                 "--output_path", str(tmp_path / "routing"), "--no-bypass_column"]) == 2
    assert "are not 3 lists of 2 indices below 4" in capsys.readouterr().err


def test_routing_heatmap_shares_count_images_under_top_k(tmp_path, monkeypatch):
    import matplotlib.axes

    from moceir.plots import plot_routing_heatmap

    shown = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, x, **kw: shown.append(np.array(x)) or
                        real(ax, x, **kw))
    counts = np.array([[[2, 0, 2, 0]]])  # 2 images, each picked 2 experts
    plot_routing_heatmap(counts, ["lolv1"], tmp_path / "h.png", topk=2)
    assert shown[0].tolist() == [[1.0, 0.0, 1.0, 0.0]]  # every image picked E0 and E2


def test_benchmark_scores_compare_the_restored_image_with_the_clean_one(tiny_layout, tiny_model):
    """Mutation audit: the degraded image taken as the reference (input_psnr is symmetric and did not show it), or
    `moceir test --context_pad` dropped, passed. Each row's PSNR is the clean image's against the network's output
    at that context_pad, and input_psnr the clean image's against the degraded one."""
    from moceir.evaluation import benchmark_dataset, evaluate_benchmark
    from moceir.inference import restore_tensor
    from moceir.metrics import psnr

    result = evaluate_benchmark(tiny_model, tiny_layout, "dehaze", torch.device("cpu"), progress=False, context_pad=8)
    ds = benchmark_dataset(tiny_layout, "dehaze")
    assert len(result.rows) == len(ds) == 3
    for i, row in enumerate(result.rows):
        item = ds[i]
        gt, lq = (item[k].permute(1, 2, 0).numpy() for k in ("gt", "lq"))
        with torch.no_grad():
            padded = restore_tensor(tiny_model, item["lq"][None], context_pad=8)
            plain = restore_tensor(tiny_model, item["lq"][None], context_pad=0)
        out = padded.clamp(0, 1)[0].permute(1, 2, 0).numpy()
        assert not torch.equal(padded, plain)  # the pad changes the output, so dropping it shows
        assert row["psnr"] == pytest.approx(psnr(gt, out), abs=1e-6)
        assert row["input_psnr"] == pytest.approx(psnr(gt, lq), abs=1e-6)
        assert abs(psnr(gt, out) - psnr(lq, out)) > 0.1  # the reference matters here


def test_a_results_set_with_a_fifo_is_refused_before_scoring_and_never_left_mixed(tmp_path):
    """Probe: `test --overwrite` into a folder whose results.json was a FIFO replaced results.md, then failed on
    the FIFO: a mixed set (the rollback ran only without --overwrite), after all the scoring."""
    import os

    from moceir.evaluation import check_results_folder
    from moceir.io import write_files_atomically
    from moceir.pipeline import UsageError

    (tmp_path / "results.md").write_text("earlier")
    os.mkfifo(tmp_path / "results.json")
    with pytest.raises(UsageError, match=r"results.json is a device, pipe or socket \(or a link to one\)"):
        check_results_folder(tmp_path, ["denoise_15"], overwrite=True)
    with pytest.raises(OSError, match="is a device, pipe or socket"):
        write_files_atomically({tmp_path / "results.md": lambda tmp: tmp.write_text("new"),
                                tmp_path / "results.json": lambda tmp: tmp.write_text("{}")}, overwrite=True)
    assert (tmp_path / "results.md").read_text() == "earlier" and (tmp_path / "results.json").is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temporary file left


def test_benchmark_images_named_in_bytes_that_are_not_utf_8_are_scored_and_reported(tiny_ckpt, small_layout, tmp_path):
    """Probe: such a name in cBSD68 failed in the noise seed (a traceback, no results; `routing` dropped the whole
    benchmark), and in a paired benchmark in per_image.csv, after all the scoring."""
    import os
    import shutil

    for folder, name in (("denoising/cBSD68/original_png", "0001.png"), ("llie/LOLv1/Test/target", "1.png"),
                         ("llie/LOLv1/Test/input", "1.png")):
        src = os.fsencode(small_layout / folder / name)
        shutil.move(src, src.replace(os.fsencode(name), b"bad\xff.png"))
    out = tmp_path / "out"
    assert _test(tiny_ckpt, small_layout, out, "denoise_15", "lolv1", extra=["--save_results"]) == 0
    assert (out / "per_image.csv").read_text().count("bad\\udcff.png") == 4  # as results.json writes it
    rows = json.loads((out / "results.json").read_text())["per_image"]
    assert sorted(r["name"] for r in rows["denoise_15"]) == ["0002.png", "bad\udcff.png"]
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "denoise_15", "--data_file_dir", str(small_layout),
                 "--output_path", str(tmp_path / "routing"), "--quiet"]) == 0


@pytest.mark.parametrize("holdout", [False, True])
def test_a_validation_score_of_a_run_that_trained_on_the_split_is_called_so(tiny_ckpt, tiny_layout, tmp_path, capsys,
                                                                            holdout):
    """Probe: `test --benchmarks raintrainl_val` of a run trained on derain without --holdout_val scored its own
    training images and called it validation, without a word."""
    import shutil

    run = tmp_path / "ck" / "run"
    run.mkdir(parents=True)
    shutil.copy(tiny_ckpt, run / "model.safetensors")
    (run / "settings.json").write_text(json.dumps({"settings": {"de_type": ["derain"], "holdout_val": holdout}}))
    assert main(["test", "--ckpt", str(run / "model.safetensors"), "--benchmarks", "raintrainl_val",
                 "--data_file_dir", str(tiny_layout), "--output_path", str(tmp_path / "out"), "--quiet"]) == 0
    said = (f"note: raintrainl_val: {run / 'model.safetensors'} comes from a run that trained derain without "
            "--holdout_val") in capsys.readouterr().err
    assert said == (not holdout)


def test_results_that_appear_while_scoring_are_called_so_not_an_earlier_run(tiny_ckpt, small_layout, tmp_path, capsys,
                                                                            monkeypatch):
    """Probe: of two `moceir test` runs into one --output_path, the second scored everything, then said the first's
    files "exist(s) from an earlier run" (exit 2, as for bad options)."""
    import moceir.evaluation as evaluation

    out, real = tmp_path / "out", evaluation.score_image

    def score_image(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "results.md").write_text("the other run's")
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "score_image", score_image)
    assert _test(tiny_ckpt, small_layout, out, "lolv1") == 1
    captured = capsys.readouterr()
    assert "| lolv1 | 2 |" in captured.out  # the scores are printed
    assert captured.err.strip() == (f"error: {out / 'results.md'} appeared while this run scored (another run writing "
                                     "to the same --output_path?); no result file was written, the table above holds "
                                     "the scores; choose another --output_path or pass --overwrite")
    assert (out / "results.md").read_text() == "the other run's" and not (out / "results.json").exists()


def test_an_output_path_that_is_a_device_is_not_called_a_file(tiny_ckpt, small_layout, tmp_path, capsys):
    """Probe: `test --output_path /dev/null` was refused as "/dev/null is a file, not a folder"."""
    assert _test(tiny_ckpt, small_layout, "/dev/null", "lolv1") == 2
    assert "/dev/null is a device, pipe or socket, not a folder" in capsys.readouterr().err
    assert main(["restore", str(small_layout / "llie/LOLv1/Test/input"), "-o", "/dev/null", "--checkpoint",
                 tiny_ckpt]) == 2
    assert "-o /dev/null is a device, pipe or socket; give a folder" in capsys.readouterr().err


def test_context_pad_and_the_checkpoint_are_recorded_and_routing_checks_the_checkpoint(tmp_path, small_layout,
                                                                                      tiny_ckpt, tiny_model, capsys):
    """Probe: `test --context_pad 16` changed the scores (18.56 vs 18.58 dB) but its results had the very title and
    keys of upstream's protocol; `routing --from_results` showed results made by another checkpoint as this one's."""
    import moceir

    assert _test(tiny_ckpt, small_layout, tmp_path / "pad", "lolv1", extra=["--context_pad", "16"]) == 0
    data = json.loads((tmp_path / "pad" / "results.json").read_text())
    assert data["context_pad"] == 16 and data["checkpoint"] == tiny_ckpt
    assert data["title"] == f"moceir test: {tiny_ckpt} (--context_pad 16, not upstream's protocol)"
    assert "(--context_pad 16, not upstream's protocol)" in (tmp_path / "pad" / "results.md").read_text()
    other = str(moceir.save_model(tiny_model, tmp_path / "other.safetensors"))
    capsys.readouterr()
    assert main(["routing", "--ckpt", other, "--benchmarks", "lolv1", "--from_results",
                 str(tmp_path / "pad" / "results.json"), "--output_path", str(tmp_path / "routing")]) == 2
    assert f"its scores were made with the checkpoint {tiny_ckpt}, not {other}" in capsys.readouterr().err
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--from_results",
                 str(tmp_path / "pad" / "results.json"), "--output_path", str(tmp_path / "routing")]) == 0


def test_a_benchmark_file_without_its_counterpart_is_skipped_with_a_line_and_the_rest_scored(tmp_path, tiny_ckpt,
                                                                                            capsys):
    """Probe: one hazy SOTS image without its clean one dropped the whole benchmark (exit 1, "no image ... could be
    scored"); a clean image without its hazy one was left out without a word, the benchmark silently smaller."""
    import shutil

    from conftest import make_tiny_layout

    data = make_tiny_layout(tmp_path / "data", n=3)
    sots = data / "dehazing/SOTS/outdoor"
    shutil.copy(sots / "hazy/0001_0.8_0.2.jpg", sots / "hazy/0009_0.8_0.2.jpg")  # no gt/0009.png
    (sots / "hazy/0002_0.8_0.2.jpg").unlink()  # gt/0002.png alone
    assert _test(tiny_ckpt, data, tmp_path / "r", "dehaze") == 1
    err = capsys.readouterr().err
    assert (f"error: dehaze: {sots / 'hazy/0009_0.8_0.2.jpg'}: no clean counterpart in {sots / 'gt'}; add its clean "
            "image or move it out (skipped)") in err
    assert (f"error: dehaze: {sots / 'gt/0002.png'}: no degraded counterpart in {sots / 'hazy'}; add it or move this "
            "clean image out (skipped)") in err
    assert _rows(tmp_path / "r") == [("dehaze", "0001_0.8_0.2.jpg"), ("dehaze", "0010_0.8_0.2.jpg")]

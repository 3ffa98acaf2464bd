"""routing, plot-logs, export and info against hostile inputs: one line, nothing lost, a truthful exit code."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moceir
from moceir.cli import main
from moceir.runtime import Terminated


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _routing(ckpt, out, *benchmarks, data=None, extra=()):
    source = ["--data_file_dir", str(data)] if data else []
    return main(["routing", "--ckpt", ckpt, "--benchmarks", *benchmarks, *source, "--output_path", str(out),
                 "--device", "cpu", "--quiet", *extra])


def _digest(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("code,advice", [("ENOSPC", "free some space"), ("EROFS", "read-only"),
                                         ("EACCES", "check the permissions")])
def test_routing_on_a_full_or_read_only_disk_is_one_line_naming_the_file(tmp_path, small_layout, tiny_ckpt,
                                                                         monkeypatch, capsys, code, advice):
    import errno
    import os

    import moceir.io

    def fails(target, write):  # as the OS reports it: the errno, no file name (a write() call)
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(moceir.io, "_written_temp", fails)
    out = tmp_path / "r"
    assert _routing(tiny_ckpt, out, "denoise_15", data=small_layout) == 1
    line = _one_line(capsys)
    assert line.startswith(f"error: {out / 'routing_heatmap.png'}: {os.strerror(getattr(errno, code))};"), line
    assert advice in line and not list(out.iterdir())


def test_routing_writes_its_three_files_as_one_set(tmp_path, small_layout, tiny_ckpt, monkeypatch, capsys):
    import errno

    import moceir.io

    out = tmp_path / "r"
    assert _routing(tiny_ckpt, out, "denoise_15", data=small_layout) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = moceir.io._written_temp

    def full_at_the_json(target, write):  # the disk fills after the heatmap and the table were written
        if target.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, write)

    monkeypatch.setattr(moceir.io, "_written_temp", full_at_the_json)
    capsys.readouterr()
    assert _routing(tiny_ckpt, out, "denoise_15", data=small_layout, extra=["--overwrite"]) == 1
    assert "routing.json: No space left on device" in _one_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new heatmap beside an old table


def test_an_os_error_that_is_not_the_machines_stays_a_traceback(tmp_path, small_layout, tiny_ckpt, monkeypatch):
    import errno

    import moceir.io

    def fails(target, write):
        raise OSError(errno.EBADF, "Bad file descriptor")  # a bug in moceir, not a full disk

    monkeypatch.setattr(moceir.io, "_written_temp", fails)
    with pytest.raises(OSError, match="Bad file descriptor"):
        _routing(tiny_ckpt, tmp_path / "r", "denoise_15", data=small_layout)


# ------------------------------------------------------------------------------------------------ export
def test_export_never_replaces_its_own_checkpoint(tmp_path, tiny_ckpt, capsys):
    before = _digest(tiny_ckpt)
    link = tmp_path / "link.safetensors"
    link.symlink_to(tiny_ckpt)
    for source, out in ((tiny_ckpt, tiny_ckpt), (str(link), tiny_ckpt), (tiny_ckpt, str(link))):
        for extra in ([], ["--overwrite"]):  # without --overwrite too: "pass --overwrite" would be wrong advice
            assert main(["export", source, out, "--dtype", "fp16", *extra]) == 2
            assert "is the checkpoint being exported" in _one_line(capsys)
    assert _digest(tiny_ckpt) == before and link.is_symlink()


def test_export_of_a_model_with_router_noise_to_onnx_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    noisy = moceir.create_model("MoCE_IR_tiny", eval_router_noise=True)
    ckpt = str(moceir.save_model(noisy, tmp_path / "noisy.safetensors"))
    assert main(["export", ckpt, str(tmp_path / "noisy.onnx"), "--no-optimize"]) == 2
    assert "router noise" in _one_line(capsys) and not (tmp_path / "noisy.onnx").exists()


# ------------------------------------------------------------------------------------------------ info
def test_info_refuses_an_absurd_size(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "MoCE_IR_tiny", "--size", "999999999999999999999992"])
    assert exit_.value.code == 2 and "at most 65536" in capsys.readouterr().err


def test_info_stopped_reader_is_not_a_traceback():
    cmd = f"{sys.executable} -m moceir info MoCE_IR_tiny | head -c 10"
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and done.stdout == "model: MoC"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_1():
    """Probe: `moceir info ... > /dev/full` ended in an OSError traceback."""
    done = subprocess.run(["bash", "-c", f"{sys.executable} -m moceir info MoCE_IR_tiny > /dev/full"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == ["error: standard output: No space left on device; what moceir printed there "
                                        "is lost"]


def test_a_closed_stdout_is_one_line_and_exit_1_and_the_work_is_done(tmp_path, small_layout, tiny_ckpt):
    """Probe: `moceir info >&-` exited 0 with everything it printed lost."""
    test = (f"{sys.executable} -m moceir test --ckpt {tiny_ckpt} --benchmarks lolv1 --data_file_dir {small_layout} "
            f"--output_path {tmp_path / 'results'} --quiet >&-")
    for cmd in (f"{sys.executable} -m moceir info MoCE_IR_tiny >&-", test):
        done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines() == ["error: standard output is closed; what moceir printed there is lost"]
    assert json.loads((tmp_path / "results" / "results.json").read_text())["summary"][0]["images"] == 2


def test_a_reader_that_stops_early_costs_neither_training_nor_test_results(tmp_path, small_layout, tiny_ckpt):
    """Probe: `moceir train ... | head -1` stopped training at its next progress line (no model, no "how to resume"
    line, exit 1), and so did `2>&1 | head -1` (Lightning writes to stderr); `moceir test ... | head -1` scored every
    benchmark, then wrote no results, silently."""
    moceir_cmd = f"{sys.executable} -m moceir"
    train = (f"{moceir_cmd} train --model MoCE_IR_tiny --de_type derain --data_file_dir {small_layout} --patch_size 16 "
             f"--batch_size 1 --num_workers 0 --max_steps 3 --ckpt_dir {tmp_path / 'ck'} --run_name r 2>&1 | head -1; "
             "exit ${PIPESTATUS[0]}")
    test = (f"{moceir_cmd} test --ckpt {tiny_ckpt} --benchmarks lolv1 --data_file_dir {small_layout} "
            f"--output_path {tmp_path / 'results'} | head -1; exit ${{PIPESTATUS[0]}}")
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a user's shell: stdout buffered
    for cmd in (train, test, test.replace("| head -1", "| true").replace("results", "results2")):
        done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, env=buffered)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert len(done.stdout.splitlines()) == (0 if "| true" in cmd else 1)
    assert (tmp_path / "ck" / "r" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["per_image.csv", "results.json", "results.md"]


def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, tiny_ckpt, capsys):
    """Probe: a path component over 255 bytes was an OSError traceback (File name too long) in every command, and
    as one input of restore it cost the whole batch."""
    from moceir.io import save_image

    long = str(tmp_path / ("a" * 300))
    save_image(tmp_path / "ok.png", np.zeros((16, 16, 3), np.float32))
    assert main(["restore", f"{long}.png", str(tmp_path / "ok.png"), "-o", str(tmp_path / "out"), "--checkpoint",
                 tiny_ckpt, "--quiet"]) == 1
    assert "File name too long; a file or folder name in it is longer" in _one_line(capsys)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["ok.png"]
    for argv in (["info", long], ["export", tiny_ckpt, f"{long}.safetensors"], ["plot-logs", long],
                 ["restore", str(tmp_path / "ok.png"), "-o", long, "--checkpoint", tiny_ckpt]):
        assert main(argv) == 1, argv
        assert _one_line(capsys).startswith(f"error: {long}"), argv


def test_an_image_too_wide_for_the_output_format_is_refused_before_it_is_restored(tmp_path, tiny_ckpt, capsys):
    """Probe: a 66000 px wide image restored to GIF failed after restoring, in a struct.error traceback (the
    closing line never printed); JPEG printed libjpeg's own line, WebP failed after restoring beyond 16383 px."""
    from moceir.io import save_image

    save_image(tmp_path / "wide.png", np.zeros((1, 66000, 3), np.float32))
    save_image(tmp_path / "ok.png", np.zeros((16, 16, 3), np.float32))
    for ext, limit in (("gif", 65535), ("webp", 16383)):
        out = tmp_path / ext
        assert main(["restore", str(tmp_path / "wide.png"), str(tmp_path / "ok.png"), "-o", str(out), "--ext", ext,
                     "--checkpoint", tiny_ckpt, "--quiet"]) == 1
        assert f"holds at most {limit} px a side, and this image is 66000x1; write PNG" in _one_line(capsys)
        assert [p.name for p in out.iterdir()] == [f"ok.{ext}"]
    with pytest.raises(ValueError, match="a JPG holds at most 65500 px"):
        save_image(tmp_path / "wide.jpg", np.zeros((1, 66000, 3), np.float32))
    assert not (tmp_path / "wide.jpg").exists()


# ------------------------------------------------------------------------------------------------ routing
def test_routing_goes_on_past_a_missing_benchmark_and_exits_1(tmp_path, small_layout, tiny_ckpt, capsys):
    out = tmp_path / "r"
    assert _routing(tiny_ckpt, out, "gopro", "denoise_15", data=small_layout) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: gopro: missing folder")
    assert json.loads((out / "routing.json").read_text())["benchmarks"] == ["denoise_15"]


def test_routing_with_no_benchmark_to_score_writes_nothing(tmp_path, tiny_ckpt, capsys):
    assert _routing(tiny_ckpt, tmp_path / "r", "denoise_15", data=tmp_path / "nowhere") == 1
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_routing_counts_a_skipped_image_in_its_exit_code(tmp_path, small_layout, tiny_ckpt, capsys):
    bad = small_layout / "denoising/cBSD68/original_png/0001.png"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "r"
    assert _routing(tiny_ckpt, out, "denoise_15", data=small_layout) == 1
    assert "0001.png" in capsys.readouterr().err
    data = json.loads((out / "routing.json").read_text())  # strict JSON: no NaN anywhere
    assert np.array(data["counts"]).sum() == 3 and json.dumps(data, allow_nan=False)


def test_routing_output_problems_are_found_before_any_scoring(tmp_path, small_layout, tiny_ckpt, capsys, monkeypatch):
    import moceir.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate_benchmark", lambda *a, **k: pytest.fail("scored before refusing"))
    afile = tmp_path / "afile"
    afile.write_text("keep")
    (tmp_path / "r" / "routing.md").mkdir(parents=True)
    for out, needle in ((afile / "sub", "is a file, not a folder"), (afile, "is a file, not a folder"),
                        (tmp_path / "r", "routing.md is a folder")):
        assert _routing(tiny_ckpt, out, "denoise_15", data=small_layout, extra=["--overwrite"]) == 2
        assert needle in _one_line(capsys)
    assert afile.read_text() == "keep" and not (tmp_path / "r" / "routing_heatmap.png").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"per_image": {"denoise_15": [{"name": "a"}]}}', "denoise_15/a: its experts None"),
    ('{"per_image": {"denoise_15": "abc"}}', "no per-image rows"),
    ('{"per_image": {"denoise_15": [{"name": "a", "experts": [9, 9, 9], "psnr": 30}]}}', "[9, 9, 9] are not 3"),
    ('{"per_image": {"denoise_15": [{"name": "a", "experts": [0, 1, 2, 3, 0, 1], "psnr": 30}]}}', "are not 3"),
    ('{"per_image": {"denoise_15": [{"name": "a", "experts": [0, 1, 2]}]}}', "denoise_15/a: no PSNR"),
    ('{"per_image": {"lolv1": []}}', "no results for denoise_15"),
    ("[1, 2]", "not a results.json"),
    ("\x00\xff", "--from_results"),
])
def test_routing_from_results_that_do_not_fit_the_model(tmp_path, tiny_ckpt, capsys, content, needle):
    saved = tmp_path / "results.json"
    saved.write_bytes(content.encode("latin-1"))
    assert _routing(tiny_ckpt, tmp_path / "r", "denoise_15", extra=["--from_results", str(saved)]) == 2
    assert needle in _one_line(capsys) and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------ plot-logs
def _run(tmp_path, csv_text: str, name: str = "run"):
    (tmp_path / name / "logs").mkdir(parents=True)
    (tmp_path / name / "logs" / "metrics.csv").write_bytes(csv_text.encode("latin-1"))
    return tmp_path / name


GOOD_LOG = "step,epoch,train/loss,train/lr\n1,0,0.5,0.1\n2,0,0.4,0.1\n"


@pytest.mark.parametrize("csv_text, needle", [
    ("", "holds no finite"), ("step,epoch,train/loss\n", "holds no finite"), ("step,epoch,foo\n1,0,1\n", "no finite"),
    ("step,epoch,train/loss\n1,0,nan\n", "holds no finite"), ("step,epoch,train/loss\n1,0,abc\n", "line 2: could not"),
    ("step,epoch,train/loss\nx,0,0.5\n", "line 2"), ("step,epoch,train/loss\n1,0,0.5,9,9\n", "more fields"),
    ("\x00\xff\xfe", "holds no finite"),
])
def test_plot_logs_of_a_log_it_cannot_plot_is_one_line(tmp_path, capsys, csv_text, needle):
    run = _run(tmp_path, csv_text)
    assert main(["plot-logs", str(run)]) == 1
    assert needle in _one_line(capsys) and not (run / "training_curves.png").exists()


def test_plot_logs_never_replaces_a_named_file_or_follows_a_link(tmp_path, capsys):
    run = _run(tmp_path, GOOD_LOG)
    mine, victim, link = run / "mine.png", tmp_path / "victim.txt", run / "link.png"
    mine.write_text("precious")
    victim.write_text("important")
    link.symlink_to(victim)
    for out in (mine, link):
        assert main(["plot-logs", str(run), "--out", str(out)]) == 2
        assert "pass --overwrite" in _one_line(capsys)
    assert main(["plot-logs", str(run), "--out", str(link), "--overwrite"]) == 0
    assert mine.read_text() == "precious" and victim.read_text() == "important" and not link.is_symlink()
    assert link.read_bytes().startswith(b"\x89PNG")
    assert main(["plot-logs", str(run)]) == 0 and main(["plot-logs", str(run)]) == 0  # its own plot is redrawn


def _full_disk(monkeypatch) -> None:
    """Every atomic write fails as on a full disk, reported as write() reports it (an errno, no file name)."""
    import errno

    import moceir.io

    def full(target, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(moceir.io, "_written_temp", full)


def test_plot_logs_on_a_full_disk_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    run = _run(tmp_path, GOOD_LOG)
    _full_disk(monkeypatch)
    assert main(["plot-logs", str(run), "--out", str(run / "c.png")]) == 1
    assert _one_line(capsys) == (f"error: {run / 'c.png'}: cannot write (No space left on device); free some space "
                                 "or choose another --out")


def test_export_on_a_full_disk_is_one_line_and_exit_1(tmp_path, tiny_ckpt, capsys, monkeypatch):
    # ONNX export writes through the same write_output; its ~50 s export is not repeated here
    _full_disk(monkeypatch)
    out = tmp_path / "m.safetensors"
    assert main(["export", tiny_ckpt, str(out), "--dtype", "fp16"]) == 1
    assert _one_line(capsys) == f"error: {out}: No space left on device; free some space or choose another output path"
    assert not out.exists()


def test_onnx_export_into_a_folder_without_room_for_the_weights_is_refused_before_exporting(tmp_path, tiny_ckpt,
                                                                                              capsys, monkeypatch):
    """Probe: on a full disk the export ran for ~53 s (the tiny preset; minutes for MoCE-IR-S), then failed."""
    from collections import namedtuple

    import moceir.onnx

    pytest.importorskip("onnxscript")

    def never(*args, **kwargs):
        raise AssertionError("exported although the file cannot be written")

    monkeypatch.setattr(torch.onnx, "export", never)
    monkeypatch.setattr(moceir.onnx.shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(1, 1, 4096))
    out = tmp_path / "m.onnx"
    assert main(["export", tiny_ckpt, str(out)]) == 1
    line = _one_line(capsys)
    assert line == (f"error: {out}: No space left on device: the file needs at least 1.1 MiB, 0.0 MiB are free; "
                    "free some space or choose another output path"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


def test_overwrite_never_replaces_a_device_pipe_or_a_link_to_one(tmp_path, tiny_ckpt, capsys):
    """Probe: `--report /dev/stdout --overwrite` (the first refusal advised --overwrite) replaced, as root, the
    system's /dev/stdout link by a regular file; /dev/null and FIFOs alike."""
    import os

    from PIL import Image

    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "in" / "a.png")
    (tmp_path / "null").symlink_to(os.devnull)
    os.mkfifo(tmp_path / "fifo.safetensors")
    assert main(["restore", str(tmp_path / "in"), "--checkpoint", tiny_ckpt, "-o", str(tmp_path / "out"), "--report",
                 str(tmp_path / "null"), "--overwrite", "--quiet"]) == 2  # before any image (a later probe)
    assert "is a device, pipe or socket (or a link to one), which moceir does not replace" in _one_line(capsys)
    assert main(["export", tiny_ckpt, str(tmp_path / "fifo.safetensors"), "--overwrite"]) == 2
    assert "is a device, pipe or socket" in _one_line(capsys)
    assert os.readlink(tmp_path / "null") == os.devnull and (tmp_path / "fifo.safetensors").is_fifo()
    assert not (tmp_path / "out").exists()


def test_save_model_writes_what_load_model_reads(tmp_path, tiny_ckpt):
    model = moceir.load_model(tiny_ckpt)
    for dtype in (None, torch.float16):  # now serialised in memory, then written by Python
        path = moceir.save_model(model, tmp_path / f"{dtype}.safetensors", dtype=dtype, note="n")
        back = moceir.load_model(path)
        assert back.config == model.config
        assert all(torch.allclose(a.float(), b.float(), atol=1e-3) for a, b in
                   zip(model.state_dict().values(), back.state_dict().values()))


def test_plot_logs_output_path_problems_are_one_line(tmp_path, capsys):
    run = _run(tmp_path, GOOD_LOG)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    (run / "folder.png").mkdir()
    for out, needle in ((afile / "x.png", "is a file, not a folder"), (run / "o.txt", "name it .png"),
                        (run / "o.pgf", "name it .png"),  # was a traceback: matplotlib's pgf needs xelatex
                        (run, "name it .png"), (run / "folder.png", "is a folder")):
        assert main(["plot-logs", str(run), "--out", str(out)]) == 2
        assert needle in _one_line(capsys)
    assert main(["plot-logs", str(run), "--out", str(tmp_path / "new" / "dir" / "curves.pdf")]) == 0
    assert (tmp_path / "new" / "dir" / "curves.pdf").read_bytes().startswith(b"%PDF")


# ------------------------------------------------------------------------------------------------ test / routing
@pytest.mark.parametrize("command", ["test", "routing"])
def test_architecture_flags_without_model_are_refused(tmp_path, small_layout, tiny_ckpt, capsys, command):
    argv = [command, "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(small_layout),
            "--output_path", str(tmp_path / "r"), "--device", "cpu", "--quiet", "--dim", "16"]
    assert main(argv) == 2
    assert "--dim takes effect only with --model" in _one_line(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", ["test", "routing"])
def test_an_onnx_graph_is_refused_by_name(tmp_path, small_layout, capsys, command):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not even read")
    argv = [command, "--ckpt", str(graph), "--benchmarks", "lolv1", "--data_file_dir", str(small_layout),
            "--output_path", str(tmp_path / "r"), "--device", "cpu", "--quiet"]
    assert main(argv) == 2
    assert "is an ONNX graph" in _one_line(capsys)


def test_export_format_that_contradicts_the_suffix_is_refused(tmp_path, tiny_ckpt, capsys):
    assert main(["export", tiny_ckpt, str(tmp_path / "fake.onnx"), "--format", "safetensors"]) == 2
    assert "its suffix does not name" in _one_line(capsys) and not (tmp_path / "fake.onnx").exists()
    assert main(["export", tiny_ckpt, str(tmp_path / "model.bin"), "--format", "safetensors"]) == 0
    assert moceir.load_model(tmp_path / "model.bin").config == moceir.load_model(tiny_ckpt).config


@pytest.mark.parametrize("content, says", [(b"", "the file is empty"), (b"hello world\n", "not a checkpoint")])
def test_an_empty_or_text_checkpoint_says_what_it_is(tmp_path, capsys, content, says):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(content)
    assert main(["info", str(bad)]) == 2
    assert says in _one_line(capsys)


def test_plot_logs_of_a_mistyped_run_folder_makes_no_folder(tmp_path, capsys):
    typo = tmp_path / "typo_run"
    assert main(["plot-logs", str(typo)]) == 1
    assert main(["plot-logs", str(typo), "--out", str(tmp_path / "a" / "b" / "c.png")]) == 1
    capsys.readouterr()
    assert not typo.exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("flags, says", [(("--latent_dim", "100000", "--rank_type", "exp"), "exceed 65536"),
                                         (("--latent_dim", "30", "--rank_type", "fact"), "exceed 65536"),
                                         (("--latent_dim", "5000", "--rank_type", "fact"), "exceed 65536"),
                                         (("--dim", "100000"), "choose a smaller dim"),
                                         (("--dim", "7"), "each must be at least 1")])
def test_architecture_flags_that_make_no_network_are_one_line(tmp_path, small_layout, tiny_ckpt, capsys, flags, says):
    """Probe: ranks of 10^5 ** 4 or 30! were a 40 GB allocation or a C++ overflow, each a traceback."""
    assert main(["test", "--model", "MoCE_IR_tiny", *flags, "--ckpt", tiny_ckpt, "--benchmarks", "denoise_15",
                 "--data_file_dir", str(small_layout), "--output_path", str(tmp_path / "r")]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"error: --model MoCE_IR_tiny {' '.join(flags)}") and says in line, line


def test_scores_are_printed_when_the_results_files_cannot_be_written(tmp_path, small_layout, tiny_ckpt, capsys,
                                                                    monkeypatch):
    """The results files are written before the table is printed (for `| head`), but a full disk there must not
    cost the printed scores too (a review of that change)."""
    import errno

    import moceir.evaluation

    def full(results, out_dir, title, overwrite, experts, checked=False, **recorded):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "results.md"))

    monkeypatch.setattr(moceir.evaluation, "write_reports", full)
    assert main(["test", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(small_layout),
                 "--output_path", str(tmp_path / "r"), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "lolv1" in out.out and "PSNR" in out.out and "No space left on device" in out.err


def test_ctrl_c_across_processes_is_a_keyboard_interrupt_again():
    """Review: with --num_cpu_processes, Lightning caught Ctrl-C itself and exited 1 (not the one line and 130)."""
    from moceir.distributed import _predict

    class Interrupted:
        interrupted = True

        def predict(self, task, return_predictions):
            raise SystemExit(1)  # what Lightning does after "Detected KeyboardInterrupt"

    with pytest.raises(KeyboardInterrupt) as caught:
        _predict(Interrupted(), None)
    assert not isinstance(caught.value, Terminated)
    Interrupted.received_sigterm = True  # review (2026-12-07): SIGTERM across processes was reported as Ctrl-C
    with pytest.raises(Terminated):
        _predict(Interrupted(), None)
    Interrupted.interrupted = False
    with pytest.raises(SystemExit):
        _predict(Interrupted(), None)


@pytest.mark.parametrize("signal,code,how", [(KeyboardInterrupt, 130, "interrupted (Ctrl-C)"),
                                             (Terminated, 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_in_any_command_is_one_line_and_its_exit_code(monkeypatch, capsys, signal, code, how):
    """Probe: Ctrl-C during `moceir test` printed a KeyboardInterrupt traceback (here: in `info`, in-process);
    SIGTERM (2026-12-07) killed the command where it stood."""
    import moceir.cli as cli

    def interrupted(args):
        raise signal

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info", "MoCE_IR_tiny"]) == code
    assert capsys.readouterr().err.splitlines() == [f"error: moceir info {how}; files written before it are "
                                                    "complete, the rest was not done"]


def test_export_keeps_the_checkpoints_note_unless_replaced(tmp_path, tiny_ckpt, capsys):
    """Probe: `moceir export default d16.safetensors --dtype fp16` dropped the bundled model's "early, weak" note."""
    from moceir.models.checkpoints import checkpoint_note

    noted = moceir.save_model(moceir.load_model(tiny_ckpt), tmp_path / "noted.safetensors", note="early and weak")
    assert main(["export", str(noted), str(tmp_path / "kept.safetensors"), "--dtype", "fp16"]) == 0
    assert main(["export", str(noted), str(tmp_path / "new.safetensors"), "--note", "replaced"]) == 0
    assert main(["export", str(noted), str(tmp_path / "none.safetensors"), "--note", ""]) == 0
    assert [checkpoint_note(str(tmp_path / f"{n}.safetensors")) for n in ("kept", "new", "none")] == \
           ["early and weak", "replaced", ""]


@pytest.mark.parametrize("argv,message", [
    (["export", "{ckpt}", "{tmp}"], "{tmp} is a folder; name the file to write (e.g. {tmp}/model.safetensors)"),
    (["export", "{ckpt}", "{tmp}", "--overwrite"], "{tmp} is a folder; name the file to write (e.g. "
                                                   "{tmp}/model.safetensors)"),
    (["export", "{ckpt}", "{tmp}/.safetensors"], "{tmp}/.safetensors is only a suffix; name the file (e.g. "
                                                 "{tmp}/model.safetensors)"),
    (["plot-logs", "{tmp}", "--out", "{tmp}/.png"], "--out {tmp}/.png is only a suffix; name the file (e.g. "
                                                    "{tmp}/curves.png)"),
    (["plot-logs", "{tmp}", "--out", "{tmp}/apng"], "--out {tmp}/apng: name it .png (or .eps, .gif, .jpg, .jpeg, "
                                                    ".pdf, .ps, .raw, .rgba, .svg, .svgz, .tif, .tiff, .webp, .avif)"),
])
def test_output_names_that_are_a_folder_or_only_a_suffix_get_their_own_advice(tmp_path, tiny_ckpt, argv, message,
                                                                              capsys):
    """Probe: export to a folder said "exists; pass --overwrite", then with it "is a folder"; `.safetensors` and
    `--out .png` were told to use the suffix they already had."""
    assert main([a.format(ckpt=tiny_ckpt, tmp=tmp_path) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == "error: " + message.format(tmp=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("command", ["test", "restore"])
def test_num_gpus_without_cuda_is_one_line_not_a_silent_cpu_run(tmp_path, small_layout, tiny_ckpt, command, capsys):
    """Probe: `moceir test --num_gpus 1` on a machine without CUDA ran on the CPU and exited 0 (2 was refused)."""
    where = (["--benchmarks", "lolv1", "--data_file_dir", str(small_layout), "--output_path", str(tmp_path / "r"),
              "--ckpt", tiny_ckpt] if command != "restore" else
             [str(small_layout / "llie/LOLv1/Test/input"), "-o", str(tmp_path / "r"), "--checkpoint", tiny_ckpt])
    assert main([command, *where, "--num_gpus", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --num_gpus 1 needs CUDA, which this machine lacks; leave it "
                                               "out (or use --num_cpu_processes N) to run on the CPU")
    assert not (tmp_path / "r").exists()

"""What `moceir routing` writes: its table, its PSNR column, its heatmap; its flags and its output checks."""

import json
import os

import numpy as np
import pytest

import moceir
from moceir.cli import main
from moceir.io import save_image

from conftest import fill_deterministic


def _results(path, rows_by_bench):
    path.write_text(json.dumps({"per_image": rows_by_bench, "experts": "run"}))
    return str(path)


def _routing(ckpt, out, *benchmarks, extra=()):
    return main(["routing", "--ckpt", ckpt, "--benchmarks", *benchmarks, "--output_path", str(out), "--device", "cpu",
                 "--quiet", *extra])


def test_routing_table_has_one_column_per_moe_layer_and_the_networks_psnr(tmp_path, tiny_ckpt):
    rows = [{"name": f"{i}.png", "experts": [i % 4, (i + 1) % 4, 3], "psnr": 30.0 + i, "input_psnr": 10.0,
             "size": [32, 48]} for i in range(3)]
    saved = _results(tmp_path / "results.json", {"lolv1": rows})
    out = tmp_path / "routing"
    assert _routing(tiny_ckpt, out, "lolv1", extra=["--from_results", saved]) == 0
    md = (out / "routing.md").read_text().splitlines()
    assert md[0] == "| benchmark | L0 | L1 | L2 |"  # 3 MoE layers (not one column per expert)
    assert md[2] == "| lolv1 | 1/1/1/0 | 0/1/1/1 | 0/0/0/3 |"
    data = json.loads((out / "routing.json").read_text())
    assert data["psnr"] == {"lolv1": pytest.approx(31.0)}  # the restored images' PSNR, not the inputs'
    assert "| 31.000 | - |" in (out / "routing.md").read_text()


def test_routing_heatmap_of_a_top2_model_shows_both_experts_of_each_image(tmp_path, monkeypatch):
    import matplotlib.axes

    model = fill_deterministic(moceir.create_model("MoCE_IR_tiny", topk=2), 0.05)
    ckpt = str(moceir.save_model(model, tmp_path / "top2.safetensors"))
    rows = [{"name": f"{i}.png", "experts": [[0, 2], [1, 3], [0, 1]], "psnr": 30.0, "size": [32, 32]}
            for i in range(2)]
    saved = _results(tmp_path / "results.json", {"lolv1": rows})
    shown = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, x, **kw: shown.append(np.array(x)) or
                        real(ax, x, **kw))
    assert _routing(ckpt, tmp_path / "routing", "lolv1", extra=["--from_results", saved]) == 0
    assert [s.tolist() for s in shown] == [[[1.0, 0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]]


def test_no_bypass_column_scores_once(tmp_path, small_layout, tiny_ckpt, monkeypatch):
    import moceir.evaluation as evaluation

    calls = []
    real = evaluation.evaluate_benchmark
    monkeypatch.setattr(evaluation, "evaluate_benchmark", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    out = tmp_path / "r"
    assert _routing(tiny_ckpt, out, "lolv1", extra=["--data_file_dir", str(small_layout), "--no-bypass_column"]) == 0
    assert calls == ["lolv1"]
    assert json.loads((out / "routing.json").read_text())["psnr_experts_bypassed"] == {}


def test_a_dangling_link_among_the_outputs_is_refused_before_scoring(
        tmp_path, small_layout, tiny_ckpt, monkeypatch, capsys):
    import moceir.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate_benchmark", lambda *a, **k: pytest.fail("scored before refusing"))
    out = tmp_path / "r"
    out.mkdir()
    (out / "routing.md").symlink_to(tmp_path / "nowhere")
    assert _routing(tiny_ckpt, out, "lolv1", extra=["--data_file_dir", str(small_layout)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert os.path.islink(out / "routing.md") and not (out / "routing.json").exists()


def _cdd11(root):
    rng = np.random.default_rng(0)
    for folder in ("clear", "haze", "haze_rain"):
        (root / "cdd11/test" / folder).mkdir(parents=True)
        save_image(root / "cdd11/test" / folder / "001.png", rng.random((16, 16, 3)).astype(np.float32))
    return root


def test_test_and_routing_score_only_the_cdd11_subset_asked_for(tmp_path, tiny_ckpt):
    data = _cdd11(tmp_path / "data")
    common = ["--ckpt", tiny_ckpt, "--benchmarks", "cdd11", "--data_file_dir", str(data), "--device", "cpu",
              "--quiet", "--trainset", "CDD11_single"]
    assert main(["test", *common, "--output_path", str(tmp_path / "t")]) == 0
    rows = json.loads((tmp_path / "t" / "results.json").read_text())["per_image"]["cdd11"]
    assert [r["name"] for r in rows] == ["haze/001.png"]
    assert main(["routing", *common, "--output_path", str(tmp_path / "r")]) == 0
    counts = np.array(json.loads((tmp_path / "r" / "routing.json").read_text())["counts"])
    assert counts.sum(axis=2).tolist() == [[1, 1, 1]]  # one image (haze), not two (haze, haze_rain)


def test_an_output_that_appears_while_scoring_is_kept_and_the_scores_are_printed(tmp_path, tiny_ckpt, monkeypatch,
                                                                                 capsys):
    """Probe (2026-12-07): routing.md written by another program while routing scored: a traceback (exit 1),
    routing_heatmap.png already moved into place (half a set), and the table never printed (the scores lost)."""
    import moceir.evaluation as evaluation

    rows = [{"name": f"{i}.png", "experts": [i % 4, 0, 3], "psnr": 30.0, "input_psnr": 10.0, "size": [32, 48]}
            for i in range(3)]
    saved = _results(tmp_path / "results.json", {"lolv1": rows})
    out = tmp_path / "routing"
    real = evaluation.routing_flops

    def meanwhile(*a, **k):
        out.mkdir(exist_ok=True)
        (out / "routing.md").write_text("my notes\n")
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "routing_flops", meanwhile)
    assert _routing(tiny_ckpt, out, "lolv1", extra=["--from_results", saved]) == 1
    captured = capsys.readouterr()
    assert "| lolv1 | 1/1/1/0 | 3/0/0/0 | 0/0/0/3 |" in captured.out
    err = captured.err.strip()
    assert err.startswith("error: output ")
    assert "routing.md appeared meanwhile; nothing of this set of 3 files was written" in err
    assert "\n" not in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["routing.md"] and (out / "routing.md").read_text() == "my notes\n"


def test_an_output_folder_of_benchmark_images_is_refused(tmp_path, small_layout, tiny_ckpt, capsys):
    """Probe (2026-12-07): --output_path data/denoising/cBSD68/original_png wrote routing_heatmap.png among the
    benchmark's images (exit 0), and the next `moceir test` scored it as a cBSD68 image."""
    folder = small_layout / "denoising/cBSD68/original_png"
    before = sorted(p.name for p in folder.iterdir())
    assert _routing(tiny_ckpt, folder, "denoise_15", extra=["--data_file_dir", str(small_layout)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--output_path {folder} is a folder of denoise_15's images" in err and "\n" not in err
    (tmp_path / "link").symlink_to(folder)  # the same folder by another name (probe of the review, 2026-12-07)
    assert _routing(tiny_ckpt, tmp_path / "link", "denoise_15", extra=["--data_file_dir", str(small_layout)]) == 2
    assert "is a folder of denoise_15's images" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_from_results_that_is_not_a_file_is_refused(tmp_path, tiny_ckpt, kind):
    """Probe (2026-12-07): --from_results of a FIFO waited forever, of /dev/zero grew the memory without end."""
    import subprocess
    import sys

    source = tmp_path / "f.json"
    if kind == "fifo":
        os.mkfifo(source)
    else:
        source = "/dev/zero"
    run = subprocess.run([sys.executable, "-m", "moceir", "routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1",
                          "--from_results", str(source), "--output_path", str(tmp_path / "r"), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip() == (f"error: --from_results {source} is not a regular file (a pipe or device); pass "
                                  "the results.json that `moceir test` wrote with this checkpoint")
    assert not (tmp_path / "r").exists()


def test_from_results_into_a_folder_of_benchmark_images_is_refused_too(tmp_path, small_layout, tiny_ckpt, capsys):
    """Review (2026-12-07): with --from_results the benchmark-folder check was skipped, and the heatmap PNG still
    went into the folder."""
    rows = [{"name": "1.png", "experts": [0, 0, 3], "psnr": 30.0, "input_psnr": 10.0, "size": [24, 32]}]
    saved = _results(tmp_path / "results.json", {"lolv1": rows})
    folder = small_layout / "llie/LOLv1/Test/input"
    before = sorted(p.name for p in folder.iterdir())
    assert _routing(tiny_ckpt, folder, "lolv1", extra=["--from_results", saved, "--data_file_dir",
                                                        str(small_layout)]) == 2
    assert "is a folder of lolv1's images" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_routing_refuses_an_output_folder_of_training_images(tmp_path, tiny_ckpt, tiny_layout, capsys):
    """Probe: `routing --output_path data/denoising/BSD400` wrote its heatmap there (exit 0), and the next
    `moceir train` trained on routing_heatmap.png as a clean image."""
    before = sorted(p.name for p in (tiny_layout / "denoising/BSD400").iterdir())
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(tiny_layout / "denoising/BSD400"), "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith(f"error: --output_path {tiny_layout / 'denoising/BSD400'} is a "
                                              f"folder of training images ({tiny_layout / 'denoising/BSD400'})")
    assert sorted(p.name for p in (tiny_layout / "denoising/BSD400").iterdir()) == before


def test_routing_refuses_a_fifo_among_its_files_before_scoring(tmp_path, tiny_ckpt, tiny_layout, capsys, monkeypatch):
    """Review: `routing --overwrite` into a folder whose routing.json was a FIFO scored everything, then failed
    with a traceback (`test` refused it up front)."""
    import moceir.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate_benchmark", lambda *a, **k: pytest.fail("scored before refusing"))
    (tmp_path / "r").mkdir()
    os.mkfifo(tmp_path / "r" / "routing.json")
    assert main(["routing", "--ckpt", tiny_ckpt, "--benchmarks", "lolv1", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(tmp_path / "r"), "--device", "cpu", "--quiet", "--overwrite"]) == 2
    assert "routing.json is a device, pipe or socket (or a link to one)" in capsys.readouterr().err

"""The GPU-window scripts' rules that earlier tests left open (found by a mutation audit; no model runs)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import relay_noise  # noqa: E402


def test_relay_noise_prefers_the_judgement_folder_beside_to_the_path_as_written(tmp_path, monkeypatch):
    """reused_from names a path relative to where the judge ran; the folder of that name beside this judgement
    comes first (a stale copy at the path as written, with the same key, is not read)."""
    def csv(folder: Path, dehaze: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "per_image.csv").write_text("benchmark,name,psnr\n" + "".join(
            f"dehaze,{k},{v}\n" for k, v in dehaze.items()))

    key = {"weights_digest": "abc", "experts_bypassed": False}
    here = tmp_path / "here"
    csv(here / "relay-1" / "shipped", {"a.jpg": 20.0, "b.jpg": 22.0})
    (here / "relay-1" / "shipped" / "scores.json").write_text(json.dumps({"key": key}))
    second = here / "relay-2"
    csv(second / "model_fp16", {"a.jpg": 21.0, "b.jpg": 22.0})
    (second / "shipped").mkdir(parents=True)
    (second / "shipped" / "scores.json").write_text(json.dumps({"key": key, "reused_from": "runs/relay-1/shipped"}))
    (second / "judgement.json").write_text(json.dumps({"candidates": {"model_fp16": "model_fp16.safetensors"}}))
    # a different copy at the path as written, relative to the working directory
    cwd = tmp_path / "cwd"
    csv(cwd / "runs" / "relay-1" / "shipped", {"a.jpg": 10.0, "b.jpg": 10.0})
    (cwd / "runs" / "relay-1" / "shipped" / "scores.json").write_text(json.dumps({"key": key}))
    monkeypatch.chdir(cwd)
    assert relay_noise.reports_folder(second / "shipped") == here / "relay-1" / "shipped"
    assert relay_noise.changes(second)["model_fp16"]["dehaze"] == [1.0, 0.0]


def test_judge_a_row_equal_to_the_shipped_models_is_not_worse():
    """rows_worse lists the rows that got worse: a tie is not one (the model card's 'Rows that got worse')."""
    from judge_relay import judge

    v = judge({"a": 20.0, "b": 30.0}, {"raw": {"a": 20.0, "b": 31.0}})
    assert v["picked"] == "raw" and v["ship"] and v["rows_worse"] == []
    v = judge({"a": 20.0, "b": 30.0}, {"raw": {"a": 19.9, "b": 31.0}})
    assert v["rows_worse"] == ["a"]


def test_judge_a_candidate_that_only_ties_the_shipped_mean_does_not_ship():
    """Ship only if the pick beats the shipped model: an equal mean keeps the shipped one."""
    from judge_relay import judge

    v = judge({"a": 20.0, "b": 30.0}, {"raw": {"a": 21.0, "b": 29.0}})
    assert v["means"]["raw"] == v["shipped_mean"] and not v["ship"]


def test_judge_a_bypassed_folder_of_other_weights_is_a_clash_too(tmp_path):
    """An earlier judgement whose only trace of the label is its bypassed scores (the plain ones moved away or
    unreadable) still holds another model's reports: rescoring would replace them without a word."""
    import argparse

    from judge_relay import other_weights

    a = argparse.Namespace(out=tmp_path)
    (tmp_path / "shipped_bypassed").mkdir()
    (tmp_path / "shipped_bypassed" / "scores.json").write_text(json.dumps({"key": {"weights_digest": "theirs"}}))
    assert other_weights(a, "shipped", "mine") == tmp_path / "shipped_bypassed"
    assert other_weights(a, "shipped", "theirs") is None


def test_the_gpu_data_pack_takes_every_training_folder_and_any_suffix_case(tmp_path):
    """pack_gpu_data.source_files: BSD400 and both halves of RainTrainL (rainy and gt stay paired under --limit),
    image suffixes in any case (IMG_1.PNG from a camera)."""
    from PIL import Image

    import pack_gpu_data

    root = tmp_path / "datasets"
    for folder in pack_gpu_data.FOLDERS:
        (root / folder).mkdir(parents=True)
    img = Image.new("RGB", (8, 8))
    for i in (1, 2, 3):
        img.save(root / "denoising/BSD400" / f"{i}.jpg")
        img.save(root / "deraining/RainTrainL/rainy" / f"rain-{i}.png")
        img.save(root / "deraining/RainTrainL/gt" / f"norain-{i}.png")
    img.save(root / "denoising/BSD400" / "4.PNG")
    files = [f.relative_to(root).as_posix() for f in pack_gpu_data.source_files(root, None)]
    folders = {"denoising/BSD400", "deraining/RainTrainL/rainy", "deraining/RainTrainL/gt"}
    assert {f.rsplit("/", 1)[0] for f in files} == folders
    assert "denoising/BSD400/4.PNG" in files and len(files) == 10
    limited = [f.relative_to(root).as_posix() for f in pack_gpu_data.source_files(root, 2)]
    assert sorted(limited) == sorted(["denoising/BSD400/1.jpg", "denoising/BSD400/2.jpg",
                                      "deraining/RainTrainL/rainy/rain-1.png", "deraining/RainTrainL/rainy/rain-2.png",
                                      "deraining/RainTrainL/gt/norain-1.png", "deraining/RainTrainL/gt/norain-2.png"])


def test_the_synthetic_gpu_data_has_n_images_per_folder_in_pairs(tmp_path):
    import pack_gpu_data

    pack_gpu_data.write_synthetic(tmp_path, 3, size=(16, 16))
    names = {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in pack_gpu_data.FOLDERS}
    assert names["denoising/BSD400"] == ["1.webp", "2.webp", "3.webp"]
    assert names["deraining/RainTrainL/rainy"] == [f"rain-{i}.webp" for i in (1, 2, 3)]
    assert names["deraining/RainTrainL/gt"] == [f"norain-{i}.webp" for i in (1, 2, 3)]

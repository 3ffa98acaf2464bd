"""scripts/relay_noise.py: the spread of a validation row across relay runs, from judgement folders (no model)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import relay_noise  # noqa: E402


def write_scores(folder: Path, scores: dict[str, dict[str, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["benchmark,name,psnr,ssim"]
    lines += [f"{row},{name},{psnr},0.9" for row, images in scores.items() for name, psnr in images.items()]
    (folder / "per_image.csv").write_text("\n".join(lines) + "\n")


def judgement(folder: Path, shipped: dict, candidates: dict[str, dict]) -> Path:
    write_scores(folder / "shipped", shipped)
    for name, scores in candidates.items():
        write_scores(folder / name, scores)
    (folder / "judgement.json").write_text(json.dumps({"candidates": {n: f"{n}.safetensors" for n in candidates}}))
    return folder


SHIPPED = {"dehaze": {"a.jpg": 20.0, "b.jpg": 22.0}, "denoise_25": {"c.png": 30.0, "d.png": 31.0, "e.png": 29.0}}


def moved(haze: dict[str, float], noise: float) -> dict[str, dict[str, float]]:
    """Per-image scores: the dehaze row as given, the denoise_25 row the shipped model's plus ``noise``."""
    return {"dehaze": haze, "denoise_25": {k: v + noise for k, v in SHIPPED["denoise_25"].items()}}


RAW = moved({"a.jpg": 21.0, "b.jpg": 22.0}, 0.1)


def test_row_changes_spread_and_standard_error_match_a_hand_computation(tmp_path, capsys):
    # run 1 raw: dehaze +1, 0; run 2 raw: -1, -1 (images listed in another order than the shipped model's)
    one = judgement(tmp_path / "relay-1", SHIPPED, {
        "model_fp16": RAW,
        "model_ema_fp16": moved({"a.jpg": 20.0, "b.jpg": 22.0}, 0.0),
    })
    two = judgement(tmp_path / "relay-2", SHIPPED, {
        "model_fp16": moved({"b.jpg": 21.0, "a.jpg": 19.0}, 0.3),
    })
    rows = {r["row"]: r for r in relay_noise.summary({"1": relay_noise.changes(one), "2": relay_noise.changes(two)},
                                                     "model_fp16")}
    haze = rows["dehaze"]
    assert haze["n"] == 2
    assert haze["means"][("1", "model_fp16")] == pytest.approx(0.5)
    assert haze["means"][("1", "model_ema_fp16")] == pytest.approx(0.0)
    assert haze["mean"] == pytest.approx(-0.25)
    assert haze["sd"] == pytest.approx(math.sqrt(2 * 0.75 ** 2))  # sample sd of 0.5 and -1.0
    assert (haze["lo"], haze["hi"]) == (pytest.approx(-1.0), pytest.approx(0.5))
    assert haze["se"] == pytest.approx(math.sqrt((0.5 ** 2 + 0.0) / 2))  # sd/sqrt(n): 0.707/1.414 and 0
    noise = rows["denoise_25"]
    assert noise["mean"] == pytest.approx(0.2) and noise["se"] == pytest.approx(0.0, abs=1e-9)

    assert relay_noise.main([str(one), str(two)]) == 0
    table = capsys.readouterr().out
    assert "| dehaze | 2 | +0.50 | +0.00 | -1.00 | -0.25 | 1.06 | -1.00 to +0.50 | 0.35 |" in table
    assert "relay-1 model_ema_fp16" in table.splitlines()[0]
    assert table.splitlines()[2].startswith("| dehaze") and table.splitlines()[3].startswith("| denoise_25")

    # the EMA weights across runs: only relay-1 has them, so no spread across runs
    assert relay_noise.main([str(one), str(two), "--candidate", "model_ema_fp16"]) == 0
    ema = "| dehaze | 2 | +0.50 | +0.00 | -1.00 | +0.00 | n/a (one run) | +0.00 to +0.00 | 0.00 |"
    assert ema in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["no_judgement", "bad_json", "other_images", "not_a_table", "missing_csv", "empty",
                                    "twice", "no_row", "nan"])
def test_a_folder_that_is_not_a_readable_judgement_is_a_one_line_error_naming_it(tmp_path, capsys, damage):
    folder = judgement(tmp_path / "relay-3", SHIPPED, {"model_fp16": RAW})
    if damage == "no_judgement":
        (folder / "judgement.json").unlink()
    elif damage == "bad_json":
        (folder / "judgement.json").write_text("{")
    elif damage == "other_images":
        write_scores(folder / "model_fp16", moved({"a.jpg": 21.0, "z.jpg": 22.0}, 0.1))
    elif damage == "not_a_table":
        (folder / "model_fp16" / "per_image.csv").write_text("benchmark,name,psnr\ndehaze,a.jpg,high\n")
    elif damage == "twice":
        with (folder / "shipped" / "per_image.csv").open("a") as f:
            f.write("dehaze,a.jpg,20.5,0.9\n")
    elif damage == "no_row":
        write_scores(folder / "model_fp16", {"denoise_25": RAW["denoise_25"]})
    elif damage == "nan":
        write_scores(folder / "model_fp16", moved({"a.jpg": float("nan"), "b.jpg": 22.0}, 0.1))
    elif damage == "empty":
        (folder / "shipped" / "per_image.csv").write_text("benchmark,name,psnr\n")
    else:
        (folder / "shipped" / "per_image.csv").unlink()
    assert relay_noise.main([str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "relay-3" in err and "Traceback" not in err


def test_a_candidate_the_judge_left_out_as_not_finite_is_skipped(tmp_path, capsys):
    folder = judgement(tmp_path / "relay-5", SHIPPED, {"model_fp16": RAW})
    verdict = json.loads((folder / "judgement.json").read_text())
    verdict["candidates"]["model_ema_fp16"] = "nan.safetensors"  # scored nothing, so no per_image.csv
    verdict["unusable"] = ["model_ema_fp16"]
    (folder / "judgement.json").write_text(json.dumps(verdict))
    assert relay_noise.main([str(folder)]) == 0
    assert "model_ema_fp16" not in capsys.readouterr().out


def test_bad_usage_names_the_choices(tmp_path, capsys):
    folder = judgement(tmp_path / "relay-4", SHIPPED, {"model_fp16": RAW})
    assert relay_noise.main([str(folder), "--candidate", "model_swa"]) == 2
    assert "['model_fp16']" in capsys.readouterr().err
    assert relay_noise.main([str(folder), str(folder)]) == 2
    assert "once" in capsys.readouterr().err
    other = judgement(tmp_path / "elsewhere" / "relay-4", SHIPPED, {"model_fp16": RAW})  # two inputs, one name
    assert relay_noise.main([str(folder), str(other)]) == 2
    assert "distinct names" in capsys.readouterr().err


def test_reused_shipped_scores_are_read_from_the_folder_they_came_from(tmp_path, monkeypatch):
    first = judgement(tmp_path / "runs" / "relay-1", SHIPPED, {"model_fp16": RAW})
    second = judgement(tmp_path / "runs" / "relay-2", SHIPPED, {"model_fp16": RAW})
    (second / "shipped" / "per_image.csv").unlink()  # as judge_relay.py --reuse leaves it
    key = {"weights_digest": "abc", "experts_bypassed": False}
    (first / "shipped" / "scores.json").write_text(json.dumps({"key": key}))
    (second / "shipped" / "scores.json").write_text(json.dumps({"key": key, "reused_from": "runs/relay-1/shipped"}))
    expected = relay_noise.changes(first)
    assert expected["model_fp16"]["dehaze"] == [1.0, 0.0]
    assert relay_noise.reports_folder(second / "shipped") == first / "shipped"  # beside it, from any folder
    assert relay_noise.changes(second) == expected
    monkeypatch.chdir(tmp_path)  # the path as the judge wrote it, from the folder it ran in, also serves
    moved = tmp_path / "elsewhere" / "relay-2"
    moved.parent.mkdir()
    second.rename(moved)
    assert relay_noise.reports_folder(moved / "shipped") == Path("runs/relay-1/shipped")
    assert relay_noise.changes(moved) == expected
    # scores of other weights where the reports should be (a later --rescore there) are not read as these
    (first / "shipped" / "scores.json").write_text(json.dumps({"key": {**key, "weights_digest": "other"}}))
    with pytest.raises(relay_noise.NoiseError, match="reused from runs/relay-1/shipped, but neither"):
        relay_noise.changes(moved)

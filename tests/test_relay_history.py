"""scripts/relay_history.py: the candidates' rows across judgements against the shipped model's bound (no model)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import relay_history  # noqa: E402


def judgement(folder: Path, shipped: dict, candidates: dict, unusable=(), tolerance: float | None = 0.3) -> Path:
    """relay-N/judgement.json; ``tolerance`` None: written before judgements recorded their bound."""
    folder.mkdir(parents=True)
    verdict = {"shipped": "default", "candidates": {n: f"{n}.safetensors" for n in candidates},
               "scores": {"shipped": shipped, **candidates}, "unusable": list(unusable)}
    if tolerance is not None:
        verdict["row_loss_tolerance_db"] = tolerance
    (folder / "judgement.json").write_text(json.dumps(verdict))
    return folder


def test_rows_across_judgements_against_the_last_shipped_model(tmp_path, capsys):
    # relay-10 comes after relay-9 although it sorts before it as text; its shipped model is relay-9's "raw"
    judgement(tmp_path / "relay-9", {"sots": 20.0, "rain": 24.0},
              {"raw": {"sots": 21.5, "rain": 24.1}, "ema": {"sots": 20.9, "rain": 24.3}})
    judgement(tmp_path / "relay-10", {"sots": 21.5, "rain": 24.1},
              {"raw": {"sots": 21.0, "rain": 24.2}, "ema": {"sots": 21.3, "rain": 24.0},
               "broken": {"sots": float("nan"), "rain": 99.0}}, unusable=["broken"])
    rows = {r["row"]: r for r in relay_history.history([tmp_path / "relay-10", tmp_path / "relay-9"])}
    sots = rows["sots"]
    assert sots["n"] == 4 and sots["max"] == 21.5 and sots["min"] == 20.9  # the unusable candidate is left out
    assert sots["mean"] == pytest.approx((21.5 + 20.9 + 21.0 + 21.3) / 4)
    assert sots["rank"] == 1 and sots["reach"] == 2  # 21.5 and 21.3 reach 21.5 - 0.3; 21.0 and 20.9 do not
    assert rows["rain"]["rank"] == 3 and rows["rain"]["reach"] == 4
    assert relay_history.main([str(tmp_path / "relay-9"), str(tmp_path / "relay-10")]) == 0
    out = capsys.readouterr().out
    assert "| sots | 4 | 21.18 | 0.28 | 20.90 | 21.50 | 21.50 | 1 of 4 | 2 of 4 (≥ 21.20) |" in out
    assert "from " + str(tmp_path / "relay-10") in out


def test_a_folder_that_is_not_a_judgement_is_one_line_and_exit_2(tmp_path, capsys):
    judgement(tmp_path / "relay-1", {"sots": 20.0}, {"raw": {"sots": 21.0}})
    (tmp_path / "relay-2").mkdir()
    (tmp_path / "relay-2" / "judgement.json").write_text('{"scores": [1]}')
    for bad in (tmp_path / "relay-2", tmp_path / "nowhere"):
        assert relay_history.main([str(tmp_path / "relay-1"), str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0]


def test_a_non_finite_shipped_score_or_no_candidate_is_one_line_and_exit_2(tmp_path, capsys):
    judgement(tmp_path / "relay-1", {"sots": float("nan")}, {"raw": {"sots": 21.0}})
    judgement(tmp_path / "relay-2", {"sots": 20.0}, {})
    judgement(tmp_path / "relay-3", {"sots": 20.0}, {"raw": {"sots": float("nan")}}, unusable=["raw"])
    for folders, says in (([tmp_path / "relay-1"], "score of row sots is nan"),
                          ([tmp_path / "relay-2", tmp_path / "relay-3"], "no usable candidate in 2")):
        assert relay_history.main([str(f) for f in folders]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]


def test_the_reach_is_measured_with_the_last_judgements_own_bound(tmp_path):
    """The bound is the last judgement's row_loss_tolerance_db, whatever it is, and 0 where it recorded none."""
    cands = {"raw": {"sots": 20.8}, "ema": {"sots": 20.6}, "old": {"sots": 19.9}}
    judgement(tmp_path / "relay-1", {"sots": 20.0}, cands, tolerance=0.3)
    judgement(tmp_path / "relay-2", {"sots": 21.0}, {}, tolerance=0.5)
    (row,) = relay_history.history([tmp_path / "relay-1", tmp_path / "relay-2"])
    assert row["bound"] == 0.5 and row["reach"] == 2  # 20.8 and 20.6 reach 21.0 - 0.5; 19.9 does not
    judgement(tmp_path / "relay-3", {"sots": 20.6}, {}, tolerance=None)
    (row,) = relay_history.history([tmp_path / "relay-1", tmp_path / "relay-3"])
    assert row["bound"] == 0.0 and row["reach"] == 2  # 20.8 and 20.6 reach 20.6 itself

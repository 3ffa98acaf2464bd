"""How much a validation row moves between relay runs, against how much its few images can say (issue 14).

    python scripts/relay_noise.py docs/runs/relay-9 docs/runs/relay-10 docs/runs/relay-11

Reads judgements written by ``scripts/judge_relay.py``: each folder's ``judgement.json`` (its candidates) and the
``per_image.csv`` of its ``shipped`` model and of every candidate (but those the judge left out as not finite); for
scores the judge reused, that of the earlier folder its ``scores.json`` names under ``reused_from`` (as written, or
the judgement folder of that name beside this one).
For each validation row and each candidate it takes the per-image PSNR change against that folder's shipped model
(images matched by name), and prints in markdown:

- each candidate's mean change (the judge's row change);
- across the runs' candidates of one name (``--candidate``, default the raw weights ``model_fp16``): the mean, the
  sample standard deviation and the range of those changes, i.e. how far the row moves from run to run;
- the standard error of one candidate's mean change, ``sd(per-image changes) / sqrt(n)``, as a root mean square over
  those candidates: what a row of ``n`` images can resolve if its images moved independently.

No model runs; it reads CSV and JSON only. Exit code 0; 2 on bad usage or a folder that is not a readable judgement
(a one-line error naming it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path


class NoiseError(Exception):
    """A judgement folder that cannot be read; the message is the one-line error."""


def per_image(path: Path) -> dict[str, dict[str, float]]:
    """``{row: {image name: PSNR}}`` from a judge's ``per_image.csv`` (columns benchmark, name, psnr)."""
    try:
        with path.open(newline="") as f:
            table = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise NoiseError(f"{path}: cannot read ({err}); is it a judge_relay.py output folder?") from None
    rows: dict[str, dict[str, float]] = {}
    for line in table:
        try:
            value, row, name = float(line["psnr"]), line["benchmark"], line["name"]
        except (KeyError, TypeError, ValueError):
            raise NoiseError(f"{path}: not a per-image score table (needs benchmark, name, psnr)") from None
        if not math.isfinite(value):
            raise NoiseError(f"{path}: PSNR of {name} in row {row} is {value}; a spread needs finite scores")
        if name in rows.setdefault(row, {}):
            raise NoiseError(f"{path}: image {name} appears twice in row {row}")
        rows[row][name] = value
    return rows


def _scores_key(folder: Path) -> object:
    try:
        return json.loads((folder / "scores.json").read_text()).get("key")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None


def reports_folder(model: Path) -> Path:
    """The folder holding ``model``'s per_image.csv: itself, or the one its scores were reused from (the judgement
    folder of that name beside this one first, then the path as written), if its scores.json holds the same key
    (weights, data, rows, bypass)."""
    if (model / "per_image.csv").exists():
        return model
    try:
        saved = json.loads((model / "scores.json").read_text())
        origin = saved.get("reused_from")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        saved, origin = {}, None
    if not isinstance(origin, str) or not origin:
        return model  # per_image() then names the missing file
    origin_path = Path(origin)
    places = (model.parent.parent / origin_path.parent.name / origin_path.name, origin_path)
    for candidate in places:
        if (candidate / "per_image.csv").exists() and _scores_key(candidate) == saved.get("key"):
            return candidate
    raise NoiseError(f"{model}: its scores were reused from {origin}, but neither {places[0]} nor {places[1]} holds "
                     "a per_image.csv scored with the same key; restore that judgement folder beside this one")


def changes(folder: Path) -> dict[str, dict[str, list[float]]]:
    """``{candidate: {row: per-image PSNR changes against the folder's shipped model}}`` for one judgement."""
    try:
        verdict = json.loads((folder / "judgement.json").read_text())
        names = [n for n in verdict["candidates"] if n not in verdict.get("unusable", [])]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise NoiseError(f"{folder}: no readable judgement.json with candidates; "
                         "give folders written by scripts/judge_relay.py") from None
    shipped_csv = reports_folder(folder / "shipped") / "per_image.csv"
    shipped = per_image(shipped_csv)
    if not shipped:
        raise NoiseError(f"{shipped_csv}: no per-image scores")
    out: dict[str, dict[str, list[float]]] = {}
    for name in names:
        cand = per_image(reports_folder(folder / name) / "per_image.csv")
        out[name] = {}
        for row, base in shipped.items():
            if row not in cand:
                raise NoiseError(f"{folder / name}: no row {row}, which the shipped model has")
            if set(cand[row]) != set(base):
                raise NoiseError(f"{folder / name}: row {row} holds other images than the shipped model's")
            out[name][row] = [cand[row][k] - base[k] for k in base]
    return out


def summary(runs: dict[str, dict[str, dict[str, list[float]]]], candidate: str) -> list[dict]:
    """One dict per row (in the judge's order): n, every candidate's mean change, the spread of ``candidate``'s."""
    rows = list(dict.fromkeys(row for run in runs.values() for cand in run.values() for row in cand))
    table = []
    for row in rows:
        means = {(run, name): statistics.fmean(d[row]) for run, cands in runs.items()
                 for name, d in cands.items() if row in d}
        picked = [runs[run][candidate][row] for run in runs if candidate in runs[run] and row in runs[run][candidate]]
        picked_means = [statistics.fmean(d) for d in picked]
        se = [statistics.stdev(d) / math.sqrt(len(d)) for d in picked if len(d) > 1]
        table.append({
            "row": row,
            "n": len(picked[0]) if picked else 0,
            "means": means,
            "mean": statistics.fmean(picked_means) if picked_means else math.nan,
            "sd": statistics.stdev(picked_means) if len(picked_means) > 1 else math.nan,
            "lo": min(picked_means, default=math.nan),
            "hi": max(picked_means, default=math.nan),
            "se": math.sqrt(statistics.fmean([s * s for s in se])) if se else math.nan,
        })
    return table


def markdown(runs: dict[str, dict[str, dict[str, list[float]]]], candidate: str) -> str:
    """The table this script prints."""
    table = summary(runs, candidate)
    keys = [(run, name) for run, cands in runs.items() for name in cands]
    head = ["row", "images"] + [f"{run} {name}" for run, name in keys] + [
        f"{candidate}: mean", "sd across runs", "range", "standard error within a run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["row"], str(r["n"])] + [f"{r['means'][k]:+.2f}" if k in r["means"] else "" for k in keys]
        cells += [f"{r['mean']:+.2f}", "n/a (one run)" if math.isnan(r["sd"]) else f"{r['sd']:.2f}",
                  f"{r['lo']:+.2f} to {r['hi']:+.2f}", f"{r['se']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="judgement folders (docs/runs/relay-N)")
    p.add_argument("--candidate", default="model_fp16",
                   help="the candidate whose changes are compared across runs (default: the raw weights)")
    a = p.parse_args(argv)
    if len({f.resolve() for f in a.folders}) != len(a.folders) or len({f.name for f in a.folders}) != len(a.folders):
        print("error: give each judgement folder once, with distinct names (they label the columns)", file=sys.stderr)
        return 2
    try:
        runs = {folder.name or str(folder): changes(folder) for folder in a.folders}
    except NoiseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not any(a.candidate in run for run in runs.values()):
        print(f"error: no folder has a candidate named {a.candidate!r}; "
              f"they have {sorted({n for run in runs.values() for n in run})}", file=sys.stderr)
        return 2
    print(markdown(runs, a.candidate), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

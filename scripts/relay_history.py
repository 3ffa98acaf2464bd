"""Every relay candidate's validation rows across judgements, against what the shipped model now asks of a row.

    python scripts/relay_history.py docs/runs/relay-*

Reads each folder's ``judgement.json`` (written by ``scripts/judge_relay.py``): the candidates' mean RGB PSNR per
validation row, leaving out those the judge found unusable. For each row it prints, in markdown, the candidates'
count, mean, sample standard deviation, minimum and maximum; the shipped model's score in the last folder given (the
model a new run must beat) and its rank among the candidates; and how many candidates reach that score less the
per-row bound of the last judgement (``row_loss_tolerance_db``): how often a past candidate would have passed the
row against today's shipped model. A shipped model that was itself picked for a high mean sits high on the noisiest
row, and the bound is then measured from there. Folders are read in the order of their trailing numbers.

No model runs; it reads JSON only. Exit code 0; 2 on bad usage or a folder that is not a readable judgement (a
one-line error naming it).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path


class HistoryError(Exception):
    """A judgement folder that cannot be read; the message is the one-line error."""


def read_judgement(folder: Path) -> dict:
    """The folder's judgement.json, checked for what this script reads."""
    try:
        verdict = json.loads((folder / "judgement.json").read_text())
        scores, candidates = verdict["scores"], verdict["candidates"]
        shipped = scores["shipped"]
        rows = {n: {r: float(v) for r, v in scores[n].items()} for n in candidates
                if n not in verdict.get("unusable", [])}
        shipped = {r: float(v) for r, v in shipped.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise HistoryError(f"{folder}: no readable judgement.json with scores of the shipped model and its "
                           "candidates; give folders written by scripts/judge_relay.py") from None
    bad = sorted(r for r, v in shipped.items() if not math.isfinite(v))
    if bad:
        raise HistoryError(f"{folder}: the shipped model's score of row {bad[0]} is {shipped[bad[0]]}; a bound needs "
                           "finite scores")
    return {"candidates": rows, "shipped": shipped, "tolerance": verdict.get("row_loss_tolerance_db")}


def _order(folder: Path) -> tuple[int, str]:
    number = re.search(r"(\d+)$", folder.name)
    return (int(number.group(1)) if number else -1, folder.name)


def history(folders: list[Path]) -> list[dict]:
    """One dict per row of the last judgement's shipped model: the candidates' statistics and the bound's reach."""
    judgements = [(f, read_judgement(f)) for f in sorted(folders, key=_order)]
    if not any(j["candidates"] for _, j in judgements):
        raise HistoryError(f"no usable candidate in {len(folders)} judgement folder(s); give folders that judged one")
    last = judgements[-1][1]
    tolerance = last["tolerance"] if isinstance(last["tolerance"], (int, float)) else 0.0
    out = []
    for row, shipped in last["shipped"].items():
        values = [c[row] for _, j in judgements for c in j["candidates"].values()
                  if math.isfinite(c.get(row, math.nan))]
        if not values:
            continue
        out.append({"row": row, "n": len(values), "mean": statistics.mean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values),
                    "max": max(values), "shipped": shipped, "rank": 1 + sum(v > shipped for v in values),
                    "reach": sum(v >= shipped - tolerance for v in values), "bound": tolerance})
    return out


def to_markdown(rows: list[dict], folders: list[Path]) -> str:
    last = sorted(folders, key=_order)[-1]
    lines = [f"Candidates of {len(folders)} judgement(s); shipped model and bound from {last}.", "",
             "| row | candidates | mean | sd | min | max | shipped | shipped's rank | reach shipped − bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['n']} | {r['mean']:.2f} | {r['sd']:.2f} | {r['min']:.2f} | {r['max']:.2f} | "
                     f"{r['shipped']:.2f} | {r['rank']} of {r['n']} | {r['reach']} of {r['n']} "
                     f"(≥ {r['shipped'] - r['bound']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="judgement folders (judge_relay.py --out)")
    a = p.parse_args(argv)
    try:
        rows = history(a.folders)
    except HistoryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(rows, a.folders), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

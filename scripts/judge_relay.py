"""Judge a relay run (issue 14, docs/gpu-window.md): ship it only if it beats the shipped model.

    cat out/models.part* > models.tar && tar -xf models.tar
    python scripts/judge_relay.py model_fp16.safetensors model_ema_fp16.safetensors \
        --data_file_dir ../shared/datasets --out docs/runs/relay-3

Scores the shipped model (``--shipped``, default: the bundled one) and every candidate on the validation rows of the
model card (RainTrainL validation split, CBSD68 sigma 15/25/50, the SOTS subset; upstream's protocol, RGB PSNR).
The candidate with the higher mean PSNR over those rows is picked; it is to be shipped only if its mean beats the
shipped model's. The shipped model and the picked candidate are then also scored with every complexity expert
bypassed (the model card's expert-bypass column) and on the synthetic flat sky (benchmarks/flat_region.py).

Writes into ``--out``: ``judgement.md`` (the tables for the model card, the rows that got worse, the decision and
the export command), ``judgement.json``, and each model's ``results.json``/``per_image.csv`` under a folder of its
own. Scores already in ``--out`` for the same weights (sha256) are reused (``--rescore`` recomputes them), so an
interrupted judgement resumes.
Nothing is exported: shipping stays a deliberate ``moceir export`` (printed). Exit code 0 when judged, 1 when a
model or a validation set cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moceir  # noqa: E402
from moceir.data.datasets import DatasetLayoutError  # noqa: E402
from moceir.evaluation import evaluate_benchmark, write_reports  # noqa: E402
from moceir.models.checkpoints import resolve_path  # noqa: E402
from moceir.models.experts import set_expert_bypass  # noqa: E402

from flat_region import flat_region_rows  # noqa: E402

ROWS = ("raintrainl_val", "denoise_15", "denoise_25", "denoise_50", "dehaze")


def fingerprint(path: str) -> str:
    """sha256 of the checkpoint file, so that cached scores are reused only for the same weights."""
    return hashlib.sha256(resolve_path(path).read_bytes()).hexdigest()


def scores(model: moceir.MoCEIR, label: str, a: argparse.Namespace, source: str,
           bypass: bool = False) -> dict[str, float]:
    """Mean RGB PSNR per validation row; cached in ``out/<label>[_bypassed]/results.json`` with the weights' hash."""
    folder = a.out / (label + ("_bypassed" if bypass else ""))
    cached, stamp = folder / "results.json", folder / "weights.sha256"
    if cached.exists() and stamp.exists() and stamp.read_text() == source and not a.rescore:
        saved = json.loads(cached.read_text())
        psnr = {s["benchmark"]: s["psnr"] for s in saved["summary"]}
        if all(b in psnr for b in a.benchmarks):
            return {b: psnr[b] for b in a.benchmarks}
    set_expert_bypass(model, bypass)
    results = [evaluate_benchmark(model, a.data_file_dir, b, torch.device("cpu"), progress=not a.quiet)
               for b in a.benchmarks]
    set_expert_bypass(model, False)
    for r in results:
        for line in r.errors:
            print(f"error: {label}: {r.name}: {line} (skipped)", file=sys.stderr)
    write_reports(results, folder, f"{label}{' (experts bypassed)' if bypass else ''}")
    stamp.write_text(source)
    return {r.name: r.mean("psnr") for r in results}


def judge(shipped: dict[str, float], candidates: dict[str, dict[str, float]]) -> dict:
    """Pick the candidate with the best mean; ship it only if that mean beats the shipped model's."""
    means = {name: float(np.mean(list(s.values()))) for name, s in candidates.items()}
    picked = max(means, key=means.get)
    shipped_mean = float(np.mean(list(shipped.values())))
    worse = [b for b in shipped if candidates[picked][b] < shipped[b]]
    return {"picked": picked, "means": means, "shipped_mean": shipped_mean, "ship": means[picked] > shipped_mean,
            "rows_worse": worse}


def report(a: argparse.Namespace, shipped: dict, cands: dict, verdict: dict, bypassed: dict, flat: dict) -> str:
    picked = verdict["picked"]
    lines = [f"# Relay judgement: {', '.join(cands)} against {a.shipped}", "",
             "Mean RGB PSNR per validation row (upstream's protocol), then with every expert bypassed.", "",
             "| benchmark | shipped | " + " | ".join(cands) + " | change (picked) | shipped, bypassed | picked, bypassed |",
             "|---|---|" + "---|" * len(cands) + "---|---|---|"]
    for b in a.benchmarks:
        lines.append(f"| {b} | {shipped[b]:.2f} | " + " | ".join(f"{c[b]:.2f}" for c in cands.values())
                     + f" | {cands[picked][b] - shipped[b]:+.2f} | {bypassed['shipped'][b]:.2f} | "
                     f"{bypassed[picked][b]:.2f} |")
    lines.append(f"| **mean** | {verdict['shipped_mean']:.3f} | "
                 + " | ".join(f"{verdict['means'][n]:.3f}" for n in cands)
                 + f" | {verdict['means'][picked] - verdict['shipped_mean']:+.3f} | | |")
    lines += ["", "Flat region (benchmarks/flat_region.py; texture and mean change in 8-bit levels):", "",
              "| input | context_pad | shipped texture | picked texture | shipped mean change | picked mean change |",
              "|---|---|---|---|---|---|"]
    for s, p in zip(flat["shipped"], flat[picked]):
        lines.append(f"| {s['input']} | {s['context_pad']} | {s['texture_out']:.2f} | {p['texture_out']:.2f} | "
                     f"{s['mean_change']:+.1f} | {p['mean_change']:+.1f} |")
    lines.append("")
    if verdict["ship"]:
        worse = ", ".join(verdict["rows_worse"]) or "none"
        lines += [f"**Decision: ship {picked}** (mean {verdict['means'][picked]:.3f} dB against "
                  f"{verdict['shipped_mean']:.3f} dB). Rows that got worse: {worse}.", "", "```bash",
                  f"moceir export {cands_paths(a)[picked]} src/moceir/weights/default.safetensors --dtype fp16 "
                  "--overwrite --note \"...\"", "```"]
    else:
        lines.append(f"**Decision: keep the shipped model.** The best candidate, {picked}, has a mean of "
                     f"{verdict['means'][picked]:.3f} dB against {verdict['shipped_mean']:.3f} dB. Record the run in "
                     "the model card as not shipped.")
    return "\n".join(lines) + "\n"


def cands_paths(a: argparse.Namespace) -> dict[str, str]:
    return {Path(c).stem: c for c in a.candidates}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", help="the run's weights (raw and EMA), any format load_model reads")
    p.add_argument("--shipped", default="default", help="the model to beat (default: the bundled one)")
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--benchmarks", nargs="+", default=list(ROWS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rescore", action="store_true", help="recompute scores already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args()
    paths = cands_paths(a)
    if len(paths) != len(a.candidates) or "shipped" in paths:
        print("error: candidates need distinct file names other than 'shipped' (their names label the folders "
              "in --out); rename one", file=sys.stderr)
        return 1
    sources = {"shipped": a.shipped, **paths}
    try:
        models = {n: moceir.load_model(f) for n, f in sources.items()}
        hashes = {n: fingerprint(f) for n, f in sources.items()}
    except moceir.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in models.values():
        m.eval()
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        shipped = scores(models["shipped"], "shipped", a, hashes["shipped"])
        cands = {n: scores(models[n], n, a, hashes[n]) for n in paths}
    except DatasetLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    verdict = judge(shipped, cands)
    picked = verdict["picked"]
    bypassed = {n: scores(models[n], n, a, hashes[n], bypass=True) for n in ("shipped", picked)}
    flat = {n: flat_region_rows(models[n]) for n in ("shipped", picked)}
    text = report(a, shipped, cands, verdict, bypassed, flat)
    (a.out / "judgement.md").write_text(text)
    (a.out / "judgement.json").write_text(json.dumps(
        {"shipped": a.shipped, "candidates": paths, "scores": {"shipped": shipped, **cands},
         "bypassed": bypassed, "flat_region": flat, **verdict}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

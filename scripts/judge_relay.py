"""Judge a relay run (issue 14, docs/gpu-window.md): ship it only if it beats the shipped model.

    cat out/models.part* > models.tar && tar -xf models.tar
    python scripts/judge_relay.py model_fp16.safetensors model_ema_fp16.safetensors \
        --data_file_dir ../shared/datasets --out docs/runs/relay-4 --reuse docs/runs/relay-3

Scores the shipped model (``--shipped``, default: the bundled one) and every candidate on the validation rows of the
model card (RainTrainL validation split, CBSD68 sigma 15/25/50, the SOTS subset; upstream's protocol, RGB PSNR).
Every model also runs the synthetic flat sky (benchmarks/flat_region.py). The pick is the candidate with the higher
mean PSNR over those rows among the candidates whose flat sky is not further from the clean sky (in brightness or
texture; on the hazy sky only darkness counts) than the shipped model's beyond the tolerances below (the model
card's known failure), and none of whose rows falls more than ``ROW_LOSS_TOLERANCE`` dB below the shipped model's
(the mean counts denoising three times, so it alone would let one task be traded away); a vetoed candidate is
passed over, and if all are vetoed the best is reported and kept out.
The shipped model and the pick are also scored with every complexity expert bypassed (the model card's expert-bypass
column). The pick is to be shipped only if it passed the veto and its mean beats the shipped model's.

Writes into ``--out``: ``judgement.md`` (the tables for the model card, the rows that got worse, the decision and
the export command), ``judgement.json``, and each model's ``results.json``/``per_image.csv`` under a folder of its
own (for reused scores, the earlier folder keeps them: below). Scores already in ``--out`` computed from the same weights (a sha256 of the loaded config and tensors, so an
export that only rewrote the note matches), data folder and rows are reused (``--rescore`` recomputes them), so an
interrupted judgement resumes; ``--reuse DIR`` also takes them from an earlier judgement folder (the shipped model
is usually the last run's pick): its table (results.md) is copied, and its scores.json names under ``reused_from``
the folder that keeps the per-image reports. A folder in ``--out`` holding scores of other weights under the same label (an
earlier judgement against another shipped model), or a judgement.json decided under another rule (``flat_veto``,
``row_loss_tolerance_db``) or unreadable, is a one-line error, not overwritten, unless ``--rescore``.
Nothing is exported: shipping stays a
deliberate ``moceir export`` (printed). Exit code 0 when judged; 1 when a model or a validation row cannot be
read or scored, when a candidate's architecture differs from the shipped model's, or when a candidate's outputs
are not finite (it is then left out of the judgement, which still covers the others).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moceir  # noqa: E402
from moceir.data.datasets import BENCHMARKS, DatasetLayoutError  # noqa: E402
from moceir.evaluation import scored_benchmark, write_reports  # noqa: E402
from moceir.models.checkpoints import NonFiniteWeights  # noqa: E402
from moceir.models.experts import set_expert_bypass  # noqa: E402
from moceir.pipeline import write_atomically  # noqa: E402

from flat_region import flat_region_rows  # noqa: E402

# Part of every cache key: raise it when a change to scoring (metrics, cropping, data loading, the bypass) would
# give other numbers for the same weights, so that no earlier judgement's scores are reused.
SCORING_VERSION = 1
# The flat-sky check (benchmarks/flat_region.py) vetoes a pick whose brightness error (output mean minus the clean
# sky's, the target of both the clean and the hazy input) or texture exceeds the shipped model's by more than these
# (8-bit grey levels, mean over the two context_pad rows of either input); see docs/gpu-window.md.
FLAT_BRIGHTNESS_TOLERANCE = 2.0
FLAT_TEXTURE_TOLERANCE = 0.25
# Inputs on which only darkening below the clean sky counts (since 2026-11-27, before relay run 7's results): haze
# left on the hazy sky (an output brighter than the clean sky) is under-dehazing, which the SOTS row scores; the veto
# guards the known failure, darkened smooth regions. On the clean sky any error counts: the input is the target.
DARKENING_ONLY = frozenset({"hazy sky"})
# Recorded in judgement.json: a folder decided under another veto is not silently rejudged (and its decision flipped).
FLAT_VETO = {"brightness_tolerance": FLAT_BRIGHTNESS_TOLERANCE, "texture_tolerance": FLAT_TEXTURE_TOLERANCE,
             "darkening_only": sorted(DARKENING_ONLY)}
# No validation row of the pick may fall more than this many dB below the shipped model's (decided on 2026-11-28,
# before relay run 8's results). The mean of the five rows counts denoising three times, so on its own it let run 7
# ship while the SOTS subset lost 0.43 dB; under this bound run 7 would have been kept out.
ROW_LOSS_TOLERANCE = 0.3
# What judgement.json records of the rule it was decided under; a folder decided under another is not rejudged.
RULE = {"flat_veto": FLAT_VETO, "row_loss_tolerance_db": ROW_LOSS_TOLERANCE}
ROWS = ("raintrainl_val", "denoise_15", "denoise_25", "denoise_50", "dehaze")


class JudgeError(Exception):
    """A model or a validation row that cannot be judged; the message is the one-line error."""


def fingerprint(model: moceir.MoCEIR) -> str:
    """sha256 of what is scored: the config and every tensor as loaded (name, dtype, shape, bytes).

    The file's bytes would not do: ``moceir export --note`` rewrites the metadata of unchanged weights, so the
    shipped model and the run file it was exported from must share their scores.
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None when the file is missing, unreadable or holds anything else."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def read_cache(path: Path, key: dict) -> dict | None:
    """The scores cached in ``path`` if they were computed for ``key``; None for any other or unreadable file."""
    saved = read_json(path)
    if saved is None or saved.get("key") != key:
        return None
    psnr = saved.get("psnr")
    if not isinstance(psnr, dict) or sorted(psnr) != sorted(key["benchmarks"]) \
            or not all(isinstance(v, (int, float)) for v in psnr.values()):
        return None
    return saved


def other_weights(a: argparse.Namespace, label: str, digest: str) -> Path | None:
    """A folder of ``label`` in ``--out`` holding scores of other weights than ``digest`` (rescoring would replace
    that judgement's reports); None if there is none. Unreadable caches do not count: they are rescored."""
    for name in (label, f"{label}_bypassed"):
        saved = read_json(a.out / name / "scores.json") or {}
        key = saved.get("key")
        if isinstance(key, dict) and key.get("weights_digest") not in (None, digest):
            return a.out / name
    return None


def reusable(a: argparse.Namespace, key: dict) -> tuple[Path, dict] | None:
    """A model folder under ``--reuse`` whose scores were computed for ``key``, and those scores."""
    for folder in a.reuse:
        for cache in sorted(folder.glob("*/scores.json")):
            saved = read_cache(cache, key)
            if saved is not None:
                return cache.parent, saved
    return None


def copy_scores(earlier: Path, saved: dict, folder: Path) -> None:
    """Reuse an earlier model folder's scores (``saved``): its table (results.md) is copied and its scores.json
    written last, naming under ``reused_from`` the folder that holds the per-image reports (results.json,
    per_image.csv), which are not copied (each judgement would otherwise carry the shipped model's again)."""
    origin = saved.get("reused_from") or str(earlier)  # scores that were themselves reused: their first folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scores.json").unlink(missing_ok=True)
    for stale in ("results.json", "per_image.csv", "results.md"):  # reports of other weights, scored here before
        (folder / stale).unlink(missing_ok=True)
    if (earlier / "results.md").is_file():
        shutil.copyfile(earlier / "results.md", folder / "results.md")
    (folder / "scores.json").write_text(json.dumps({**saved, "reused_from": origin}, indent=1))


def scores(model: moceir.MoCEIR, label: str, a: argparse.Namespace, source: str,
           bypass: bool = False) -> dict[str, float]:
    """Mean RGB PSNR per validation row, unrounded.

    Cached in ``out/<label>[_bypassed]/scores.json`` together with what they were computed from (the weights'
    digest, the data folder, the rows, bypass, the scoring version); reused only when all of it matches.
    """
    name = label + ("_bypassed" if bypass else "")
    folder = a.out / name
    cache = folder / "scores.json"
    key = {"weights_digest": source, "data_file_dir": str(Path(a.data_file_dir).resolve()),
           "benchmarks": list(a.benchmarks), "experts_bypassed": bypass, "scoring_version": SCORING_VERSION}
    if not a.rescore:
        saved = read_cache(cache, key)
        if saved is not None:
            return saved["psnr"]
        found = reusable(a, key)
        if found is not None:
            copy_scores(*found, folder)
            print(f"{name}: scores reused from {found[0]}", file=sys.stderr)
            return found[1]["psnr"]
        if a.reuse:
            print(f"{name}: no scores of these weights in --reuse; scoring", file=sys.stderr)
    cache.unlink(missing_ok=True)  # a run interrupted below must not leave an old cache beside new reports
    set_expert_bypass(model, bypass)
    try:
        results = [scored_benchmark(model, a.data_file_dir, b, torch.device("cpu"), progress=not a.quiet)
                   for b in a.benchmarks]
    finally:
        set_expert_bypass(model, False)
    for r in results:
        for line in r.errors:
            print(f"error: {label}: {r.name}: {line} (skipped)", file=sys.stderr)
    psnr = {r.name: r.mean("psnr") for r in results}
    write_reports(results, folder, f"{label}{' (experts bypassed)' if bypass else ''}",
                  experts="skip" if bypass else "run")
    cache.write_text(json.dumps({"key": key, "psnr": psnr}, indent=1))
    return psnr


def reused_from(out: Path, names: list[str]) -> dict[str, str]:
    """This judgement's model folders in ``out`` whose scores were copied from an earlier one, and from where."""
    saved = {name: read_json(out / name / "scores.json") or {} for name in names}
    return {name: s["reused_from"] for name, s in saved.items() if s.get("reused_from")}


def judge(shipped: dict[str, float], candidates: dict[str, dict[str, float]],
          vetoes: dict[str, list[str]] | None = None) -> dict:
    """Pick the best mean among the candidates the veto passes (flat sky, per-row bound); ship it only if it beats
    the shipped model.

    ``vetoes``: each candidate's flat_regression() and row_regression() reasons ([] when it passes). A vetoed
    candidate is passed over for the next best; when every candidate is vetoed, the best is reported and not
    shipped.
    """
    vetoes = vetoes or {}
    means = {name: float(np.mean(list(s.values()))) for name, s in candidates.items()}

    def rank(n: str) -> tuple[bool, bool, float]:
        # a NaN score (non-finite outputs) is never picked over a finite one and never shipped
        finite = bool(np.isfinite(means[n]))
        return finite, not vetoes.get(n), means[n] if finite else -np.inf

    picked = max(means, key=rank)
    shipped_mean = float(np.mean(list(shipped.values())))
    worse = [b for b in shipped if not candidates[picked][b] >= shipped[b]]
    beats = bool(np.isfinite(means[picked]) and (not np.isfinite(shipped_mean) or means[picked] > shipped_mean))
    vetoed = {n: vetoes[n] for n in means if vetoes.get(n)}
    # passed over: vetoed candidates that would have been picked on their mean alone
    passed_over = {n: r for n, r in vetoed.items() if n != picked and rank(n)[0] and means[n] > means[picked]}
    return {"picked": picked, "means": means, "shipped_mean": shipped_mean, "ship": beats and not vetoes.get(picked),
            "rows_worse": worse, "veto_reasons": vetoes.get(picked, []), "vetoed": vetoed,
            "passed_over": passed_over}


def row_regression(shipped: dict[str, float], picked: dict[str, float]) -> list[str]:
    """The validation rows on which the pick falls more than ``ROW_LOSS_TOLERANCE`` dB below the shipped model
    (PSNR per row, as scores() returns them); [] if none. A NaN row never passes."""
    return [f"its {b} PSNR is {shipped[b] - picked[b]:.2f} dB below the shipped model's "
            f"(tolerance {ROW_LOSS_TOLERANCE} dB)" for b in shipped if not picked[b] >= shipped[b] - ROW_LOSS_TOLERANCE]


def flat_regression(shipped: list[dict], picked: list[dict]) -> list[str]:
    """Why the pick makes the flat-sky check worse than the shipped model, beyond the tolerances; [] if it does not.

    ``shipped``/``picked``: flat_region_rows() of each, the same rows. The darkening of smooth regions is the model
    card's known failure, so a pick that worsens it does not ship whatever its PSNR. Brightness is judged by the
    error against the clean sky, not by the change: removing the hazy sky's haze darkens it, rightly. Each input
    (clean sky, hazy sky) is judged on its own, so a better hazy sky cannot buy a darker clean one. On the inputs in
    ``DARKENING_ONLY`` only the part of the error below the clean sky counts (haze left is scored by SOTS).
    """
    def off(name: str, error: float) -> float:
        # np.maximum keeps a NaN (which then never passes); max() would drop it
        return float(np.maximum(0.0, -error)) if name in DARKENING_ONLY else abs(error)

    reasons = []
    for name in dict.fromkeys(r["input"] for r in shipped):
        pairs = [(s, p) for s, p in zip(shipped, picked) if s["input"] == name]
        darker = np.mean([off(name, p["mean_error"]) - off(name, s["mean_error"]) for s, p in pairs])
        rougher = np.mean([p["texture_out"] - s["texture_out"] for s, p in pairs])
        if not darker <= FLAT_BRIGHTNESS_TOLERANCE:
            where = "further below" if name in DARKENING_ONLY else "further from"
            reasons.append(f"its output of the {name} is {darker:.1f} grey levels {where} the clean sky's "
                           f"brightness than the shipped model's (tolerance {FLAT_BRIGHTNESS_TOLERANCE})")
        if not rougher <= FLAT_TEXTURE_TOLERANCE:
            reasons.append(f"it leaves {rougher:.2f} grey levels more texture on the {name} "
                           f"(tolerance {FLAT_TEXTURE_TOLERANCE})")
    return reasons


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
    lines += ["", "Flat region (benchmarks/flat_region.py; 8-bit levels; the error is the output's mean minus the "
              "clean sky's, the target of both inputs):", "",
              "| input | context_pad | shipped texture | picked texture | shipped mean change | picked mean change "
              "| shipped error | picked error |",
              "|---|---|---|---|---|---|---|---|"]
    for s, p in zip(flat["shipped"], flat[picked]):
        lines.append(f"| {s['input']} | {s['context_pad']} | {s['texture_out']:.2f} | {p['texture_out']:.2f} | "
                     f"{s['mean_change']:+.1f} | {p['mean_change']:+.1f} | {s['mean_error']:+.1f} | "
                     f"{p['mean_error']:+.1f} |")
    lines.append("")
    for n, reasons in verdict.get("vetoed", {}).items():
        if n != picked:
            how = "passed over by the veto" if n in verdict["passed_over"] else "also vetoed"
            lines += [f"{n} was {how} (mean {verdict['means'][n]:.3f} dB): " + "; ".join(reasons) + ".", ""]
    if verdict["ship"]:
        worse = ", ".join(verdict["rows_worse"]) or "none"
        lines += [f"**Decision: ship {picked}** (mean {verdict['means'][picked]:.3f} dB against "
                  f"{verdict['shipped_mean']:.3f} dB). Rows that got worse: {worse}.", "", "```bash",
                  f"moceir export {cands_paths(a)[picked]} src/moceir/weights/default.safetensors --dtype fp16 "
                  "--overwrite --note \"...\"", "```"]
    else:
        lines.append(f"**Decision: keep the shipped model.** The best candidate, {picked}, has a mean of "
                     f"{verdict['means'][picked]:.3f} dB against {verdict['shipped_mean']:.3f} dB"
                     + ("; " + "; ".join(verdict["veto_reasons"]) if verdict.get("veto_reasons") else "")
                     + ". Record the run in the model card as not shipped.")
    return "\n".join(lines) + "\n"


def cands_paths(a: argparse.Namespace) -> dict[str, str]:
    return {Path(c).stem: c for c in a.candidates}


def load_all(a: argparse.Namespace, sources: dict[str, str]) -> tuple[dict, dict, list[str]]:
    """Models and sha256 per label, and the candidates left out for NaN or inf weights (an error line each);
    every candidate must have the shipped model's architecture."""
    models, hashes, refused = {}, {}, []
    for name, path in sources.items():
        try:
            models[name] = moceir.load_model(path).eval()
            hashes[name] = fingerprint(models[name])
        except NonFiniteWeights as e:
            if name == "shipped":
                raise JudgeError(str(e)) from None
            print(f"error: {path}: its weights are not finite (NaN or inf); it cannot ship", file=sys.stderr)
            refused.append(name)
        except moceir.CheckpointError as e:
            message = str(e) if str(path) in str(e) else f"{path}: {e}"
            raise JudgeError(message) from None
    for name, m in models.items():
        if m.config != models["shipped"].config:
            raise JudgeError(f"{sources[name]}: its architecture differs from the shipped model's "
                             f"({a.shipped}); a relay run continues the shipped architecture")
    return models, hashes, refused


def finite_or_error(name: str, path: str, psnr: dict[str, float]) -> bool:
    bad = [b for b, v in psnr.items() if not np.isfinite(v)]
    if bad:
        print(f"error: {path}: its outputs are not finite on {', '.join(bad)} (NaN or inf weights?); "
              "it cannot ship", file=sys.stderr)
    return not bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="+", help="the run's weights (raw and EMA), any format load_model reads")
    p.add_argument("--shipped", default="default", help="the model to beat (default: the bundled one)")
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--benchmarks", nargs="+", default=list(ROWS), choices=BENCHMARKS, metavar="BENCHMARK")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rescore", action="store_true",
                   help="recompute scores already in --out (and ignore --reuse); also rejudges a folder decided "
                        "under another rule or unreadable")
    p.add_argument("--reuse", action="append", type=Path, default=[], metavar="DIR",
                   help="an earlier judgement folder (repeatable) whose scores of the same weights (same digest, "
                        "data folder, rows and scoring version) are copied instead of recomputed, e.g. the last "
                        "run's for the shipped model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args()
    paths = cands_paths(a)
    labels = ["shipped", *paths]
    if len(paths) != len(a.candidates) or "shipped" in paths or any(
            f"{x}_bypassed" == y for x in labels for y in labels):
        print("error: candidates need distinct file names other than 'shipped' and '<another>_bypassed' (their "
              "names label the folders in --out); rename one", file=sys.stderr)
        return 1
    for d in a.reuse:
        if not d.is_dir() or not any(d.glob("*/scores.json")):
            print(f"error: --reuse {d}: not a judgement folder (no <model>/scores.json in it); pass an earlier "
                  "--out such as docs/runs/relay-3", file=sys.stderr)
            return 1
    if a.out.exists() and not a.out.is_dir():
        print(f"error: --out {a.out} is a file; pass a folder", file=sys.stderr)
        return 1
    recorded = a.out / "judgement.json"
    earlier = read_json(recorded)
    if recorded.exists() and earlier is None and not a.rescore:
        print(f"error: {recorded} is unreadable (not a JSON object); it is left as it is: move it aside to judge "
              "again from the cached scores, pass another --out, or --rescore to replace it", file=sys.stderr)
        return 1
    if earlier is not None and {k: earlier.get(k) for k in RULE} != RULE and not a.rescore:
        print(f"error: {recorded} was decided under another rule (flat-sky veto or row-loss bound, "
              "docs/gpu-window.md, step 3) and its decision stands as recorded; pass another --out, or --rescore "
              "to rejudge it under the current one", file=sys.stderr)
        return 1
    try:
        sources = {"shipped": a.shipped, **paths}
        models, hashes, refused = load_all(a, sources)
        for label in [] if a.rescore else models:
            clash = other_weights(a, label, hashes[label])
            if clash is not None:
                raise JudgeError(f"{clash} holds the scores of other weights than {sources[label]}, from an earlier "
                                 "judgement; pass the model it was judged with (--shipped defaults to the bundled "
                                 "model, which changes when a run ships), another --out, or --rescore to replace them")
        a.out.mkdir(parents=True, exist_ok=True)
        shipped = scores(models["shipped"], "shipped", a, hashes["shipped"])
        if not finite_or_error("shipped", a.shipped, shipped):
            return 1
        cands = {n: scores(models[n], n, a, hashes[n]) if n in models else dict.fromkeys(a.benchmarks, math.nan)
                 for n in paths}  # a refused candidate scores NaN, as one whose outputs are not finite
    except (JudgeError, DatasetLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    unusable = [n for n in paths if n in refused or not finite_or_error(n, paths[n], cands[n])]
    if len(unusable) == len(paths):
        return 1
    flat = {n: flat_region_rows(models[n]) for n in ("shipped", *paths) if n not in unusable}
    vetoes = {n: flat_regression(flat["shipped"], flat[n]) + row_regression(shipped, cands[n])
              for n in flat if n != "shipped"}
    verdict = judge(shipped, cands, vetoes)
    picked = verdict["picked"]
    bypassed = {n: scores(models[n], n, a, hashes[n], bypass=True) for n in ("shipped", picked)}
    text = report(a, shipped, cands, verdict, bypassed, flat)
    record = json.dumps(
        {"shipped": a.shipped, "candidates": paths, "data_file_dir": str(Path(a.data_file_dir).resolve()),
         "unusable": unusable, "scores": {"shipped": shipped, **cands}, "bypassed": bypassed, "flat_region": flat,
         "reused_from": reused_from(a.out, [*labels, *(f"{n}_bypassed" for n in bypassed)]),
         **RULE, **verdict}, indent=1)
    # through a temporary file: an interrupted write leaves the old judgement, never an unreadable one
    write_atomically(a.out / "judgement.md", lambda tmp: tmp.write_text(text), overwrite=True)
    write_atomically(a.out / "judgement.json", lambda tmp: tmp.write_text(record), overwrite=True)
    print(text)
    return 1 if unusable else 0


if __name__ == "__main__":
    sys.exit(main())

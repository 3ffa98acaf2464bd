"""Benchmark evaluation (upstream's protocol) and routing analysis."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data.datasets import BenchmarkDataset, DatasetLayoutError, benchmark_pairs, data_folders
from .flops import image_experts, layer_picks
from .inference import restore_tensor
from .io import (SPECIAL_FILE, ImageReadError, OutputAppeared, save_image, special_file, write_atomically,
                 write_error_advice, write_files_atomically)
from .metrics import psnr, ssim
from .models import MoCEIR
from .pipeline import UsageError, folder_problem, plan_outputs

REPORT_FILES = ("results.md", "results.json", "per_image.csv")
NON_FINITE_OUTPUT = "the model's output holds NaN or inf"  # an image's error line, and what scored_benchmark seeks


@dataclass
class BenchmarkResult:
    name: str
    rows: list[dict] = field(default_factory=list)  # per image: name, psnr, ssim (+ y variants), input_psnr, experts
    errors: list[str] = field(default_factory=list)  # one line per image that could not be scored
    not_saved: list[str] = field(default_factory=list)  # one line per scored image whose PNG could not be saved
    unusable: bool = False  # a decision's score (scored_benchmark) where some output was not finite: means are NaN

    def mean(self, key: str) -> float:
        return float(np.mean([r[key] for r in self.rows])) if self.rows and not self.unusable else float("nan")

    def summary(self) -> dict:
        keys = [k for k in ("psnr", "ssim", "psnr_y", "ssim_y", "input_psnr") if self.rows and k in self.rows[0]]
        return {"benchmark": self.name, "images": len(self.rows), **{k: round(self.mean(k), 4) for k in keys}}


def _load_item(ds: BenchmarkDataset, idx: int) -> tuple[dict | None, str | None]:
    """A benchmark item, or a one-line reason why it cannot be scored (unreadable, too small, sizes that differ)."""
    pair = ds.pairs[idx]
    try:
        item = ds[idx]
    except ImageReadError as e:
        return None, str(e)
    except MemoryError:
        return None, f"{pair.degraded or pair.clean}: out of memory while decoding; score a downscaled copy"
    if len(item["sizes"]) == 2 and item["sizes"][0] != item["sizes"][1]:  # upstream crops both and scores them
        (gh, gw), (h, w) = item["sizes"]  # misaligned: a pair's images must match pixel for pixel
        return None, (f"{pair.degraded}: {w}x{h} does not match its clean image {pair.clean} ({gw}x{gh}); fix or "
                      "remove the pair")
    base = ds.crop_base
    for path, img in ((pair.clean, item["gt"]), (pair.degraded, item["lq"])):
        if path is not None and min(img.shape[1:]) < base:  # the crop to multiples of 16 left nothing
            return None, f"{path}: smaller than {base}x{base} after cropping to multiples of {base}; not scored"
    return item, None


def save_targets(ds: BenchmarkDataset, save_dir: Path) -> tuple[list[Path], list[str]]:
    """Where each image of ``ds`` is saved -> (one path per pair, notes about renamed ones).

    ``save_dir/<name>.png`` (CDD11: ``save_dir/haze/001.png``); names that would share one PNG in a folder
    (``a.png`` and ``a.jpg``) are told apart as restore tells its outputs apart (``a_png.png``, ``a_jpg.png``).
    """
    folders: dict[str, list[int]] = {}
    for i, pair in enumerate(ds.pairs):
        folders.setdefault(pair.folder, []).append(i)
    targets: list[Path] = [save_dir] * len(ds.pairs)
    notes = []
    for folder, indices in folders.items():
        files = [Path(ds.pairs[i].name) for i in indices]
        jobs, renamed = plan_outputs(files, save_dir / folder, ext="png")
        notes += renamed
        for i, job in zip(indices, jobs):
            targets[i] = job.output
    _refuse_data_folders(ds, targets)
    return targets, notes


def _refuse_data_folders(ds: BenchmarkDataset, targets: list[Path]) -> None:
    """A UsageError where a restored image would go into a folder of the benchmark's own images (a link under
    images/, or --output_path inside the data): it could replace an input, and would be read as one next time."""
    data_dirs = data_folders(ds.pairs)
    for target in targets:
        if os.path.realpath(target.parent) in data_dirs:
            raise UsageError(f"{target.parent} is {os.path.realpath(target.parent)}, a folder of the benchmark's "
                             "own images: --save_results would write into it; choose an --output_path outside "
                             "the data")


def score_image(model: MoCEIR, entry: tuple[BenchmarkDataset, list[Path] | None], idx: int, device: torch.device,
                y_channel: bool = False, context_pad: int = 0, overwrite: bool = True) -> dict | str:
    """Restore and score image ``idx`` of ``entry = (dataset, save targets)`` -> its row, or a one-line error.

    With targets (:func:`save_targets`), the restored image goes to ``targets[idx]`` (atomically; without
    ``overwrite`` never over a file).
    """
    ds, targets = entry
    item, error = _load_item(ds, idx)
    if item is None:
        return error
    lq = item["lq"][None].to(device)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out, experts = restore_tensor(model, lq, return_experts=True, context_pad=context_pad)
    except (RuntimeError, MemoryError) as e:  # the protocol restores whole images: a large one may not fit
        if not (isinstance(e, MemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e)):
            raise
        _, h, w = item["lq"].shape
        return (f"{item['name']}: out of memory restoring {h}x{w} whole (the benchmark protocol does not tile); "
                "score it on a machine or GPU with more memory")
    seconds = time.perf_counter() - t0
    if not torch.isfinite(out).all():  # clamp keeps NaN; a NaN score would pass into the means
        return f"{item['name']}: {NON_FINITE_OUTPUT}; not scored (check the checkpoint)"
    restored = out.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
    clean = item["gt"].permute(1, 2, 0).numpy()
    degraded = item["lq"].permute(1, 2, 0).numpy()
    row = {"name": item["name"], "psnr": psnr(clean, restored), "ssim": ssim(clean, restored),
           "input_psnr": psnr(clean, degraded), "seconds": round(seconds, 4),
           "experts": image_experts(experts, 0), "size": list(clean.shape[:2])}
    if y_channel:
        row["psnr_y"] = psnr(clean, restored, test_y_channel=True)
        row["ssim_y"] = ssim(clean, restored, test_y_channel=True)
    if targets is not None:
        target = targets[idx]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, lambda tmp: save_image(tmp, restored), overwrite)
        except OSError as e:  # scored all the same: only the PNG is missing
            advice = write_error_advice(e.errno, "--output_path") or "check --output_path"
            row["not_saved"] = f"{item['name']}: cannot write {target} ({e.strerror or e}); {advice}"
        else:  # under images/<benchmark>/; not always the input's name (a.jpg -> a.png, or a_jpg.png beside a.png)
            row["saved"] = (Path(ds.pairs[idx].folder) / target.name).as_posix()
    return row


def benchmark_dataset(data_dir: str | Path, benchmark: str, cdd11_subset: str = "all") -> BenchmarkDataset:
    """The benchmark's test pairs; raises DatasetLayoutError naming a missing folder. A file without its
    counterpart is left out, with a line in the dataset's ``unmatched``."""
    unmatched: list[str] = []
    return BenchmarkDataset(benchmark_pairs(data_dir, benchmark, cdd11_subset, unmatched), unmatched=unmatched)


def scored_benchmark(model: MoCEIR, data_dir: str | Path, benchmark: str, device: torch.device,
                     progress: bool = True) -> BenchmarkResult:
    """:func:`evaluate_benchmark` for a decision that needs a number: raises DatasetLayoutError when no image of
    the benchmark could be scored (its mean would be NaN). Skipped images stay listed in ``result.errors``; a model
    whose output is not finite on any image scores NaN (it is unusable, not judged on its other images)."""
    result = evaluate_benchmark(model, data_dir, benchmark, device, progress=progress)
    if any(NON_FINITE_OUTPUT in line for line in result.errors):
        result.unusable = True
        return result
    if not result.rows:
        why = f" (first: {result.errors[0]})" if result.errors else ""
        raise DatasetLayoutError(f"{benchmark}: no image of {data_dir} could be scored{why}; check the data folder")
    return result


def collect(name: str, scored: list[dict | str], unmatched: Sequence[str] = ()) -> BenchmarkResult:
    """Rows and error lines of one benchmark, in image order after the ``unmatched`` files' lines (a row whose PNG
    could not be saved is kept, and its line goes to ``not_saved``)."""
    rows = [r for r in scored if isinstance(r, dict)]
    not_saved = [r.pop("not_saved") for r in rows if "not_saved" in r]
    return BenchmarkResult(name, rows, [*unmatched, *(r for r in scored if isinstance(r, str))], not_saved)


def evaluate_benchmark(model: MoCEIR, data_dir: str | Path, benchmark: str, device: torch.device,
                       y_channel: bool = False, save_dir: Path | None = None, cdd11_subset: str = "all",
                       progress: bool = True, context_pad: int = 0) -> BenchmarkResult:
    """Centre-crop to multiples of 16, clamp to [0, 1], PSNR/SSIM on RGB with data_range 1 (upstream).

    Images that cannot be read or whose pair sizes differ are skipped and listed in ``result.errors``.
    ``context_pad`` > 0 departs from upstream's protocol (see :func:`moceir.inference.restore_tensor`).
    """
    ds = benchmark_dataset(data_dir, benchmark, cdd11_subset)
    targets = save_targets(ds, save_dir)[0] if save_dir is not None else None
    scored = [score_image(model, (ds, targets), i, device, y_channel, context_pad)
              for i in tqdm(range(len(ds)), desc=benchmark, disable=not progress, leave=False)]
    return collect(benchmark, scored, ds.unmatched)


def markdown_table(results: list[BenchmarkResult], title: str = "") -> str:
    extra = [k for k in ("psnr_y", "ssim_y") if results and results[0].rows and k in results[0].rows[0]]
    head = ["benchmark", "images", "PSNR", "SSIM"] + [k.replace("_y", " (Y)").upper() for k in extra] + ["input PSNR"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vals = [r.name, str(len(r.rows)), f"{r.mean('psnr'):.2f}", f"{r.mean('ssim'):.4f}"]
        vals += [f"{r.mean(k):.2f}" if k.startswith("psnr") else f"{r.mean(k):.4f}" for k in extra]
        vals.append(f"{r.mean('input_psnr'):.2f}")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def check_results_folder(out_dir: str | Path, benchmarks: Sequence[str] = (), save_results: bool = False,
                         overwrite: bool = True, names: Sequence[str] = REPORT_FILES) -> None:
    """A UsageError, before any scoring, where ``out_dir`` (and ``images/<benchmark>`` with ``save_results``)
    cannot be made or written, where one of the files ``names`` (``moceir test``'s, or routing's) cannot be
    replaced, or, without ``overwrite``, where it holds results of an earlier run."""
    out_dir = Path(os.path.abspath(out_dir))
    folders = [out_dir] + [out_dir / "images" / b for b in benchmarks if save_results]
    for folder in folders:
        problem = folder_problem(folder)
        if problem:
            raise UsageError(f"--output_path {out_dir}: {problem}; choose another --output_path")
    files = [out_dir / name for name in names]
    for path in files:
        if path.is_dir():
            raise UsageError(f"--output_path {out_dir}: {path} is a folder; choose another --output_path")
        if special_file(path):  # found only when the results were written, after all the scoring
            raise UsageError(f"--output_path {out_dir}: {path} {SPECIAL_FILE}")
    earlier = [str(p) for p in files + folders[1:] if os.path.lexists(p)]
    if earlier and not overwrite:
        raise UsageError(f"{', '.join(earlier)} exist(s) from an earlier run; pass --overwrite or choose another "
                         "--output_path")


def _write_csv(path: Path, results: list[BenchmarkResult]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:  # odd bytes: \udcff
        keys = ["benchmark", "name", "psnr", "ssim", "psnr_y", "ssim_y", "input_psnr", "seconds", "experts", "saved"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            for row in r.rows:
                experts = " ".join("+".join(map(str, layer_picks(e))) for e in row["experts"])  # top-k: 0+2
                writer.writerow({"benchmark": r.name, **row, "experts": experts})


def write_reports(results: list[BenchmarkResult], out_dir: Path, title: str = "",
                  overwrite: bool = True, experts: str = "run", checked: bool = False,
                  checkpoint: str | None = None, context_pad: int = 0) -> dict[str, Path]:
    """results.md (table), results.json (summaries + per-image rows), per_image.csv, written as one set.
    ``experts``: "skip" where the scores were made with the experts bypassed; ``checkpoint``: the model scored
    ("default": the bundled one); ``context_pad``: the reflected context added around each image (0: upstream's
    protocol). All three are recorded in results.json.

    A folder that cannot be written, or (without ``overwrite``) an earlier result, is a UsageError; where the
    folder was ``checked`` before scoring, a result file found now appeared meanwhile: an OutputAppeared.
    """
    if checked and not overwrite and (appeared := [p for p in (out_dir / n for n in REPORT_FILES)
                                                   if os.path.lexists(p)]):  # not "an earlier run": another run's
        raise OutputAppeared(f"{appeared[0]} appeared while this run scored (another run writing to the same "
                             "--output_path?); no result file was written, the table above holds the scores; "
                             "choose another --output_path or pass --overwrite", appeared[0])
    check_results_folder(out_dir, overwrite=overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: out_dir / name for key, name in zip(("md", "json", "csv"), REPORT_FILES)}
    table = markdown_table(results, title)
    data = json.dumps(finite_or_null({"title": title, "checkpoint": checkpoint, "experts": experts,
                                      "context_pad": context_pad, "summary": [r.summary() for r in results],
                                      "per_image": {r.name: r.rows for r in results},
                                      "errors": {r.name: r.errors for r in results if r.errors}}),
                      indent=1, allow_nan=False)
    writers = {"md": lambda tmp: tmp.write_text(table, "utf-8", "backslashreplace"),
               "json": lambda tmp: tmp.write_text(data), "csv": lambda tmp: _write_csv(tmp, results)}
    try:
        write_files_atomically({paths[key]: write for key, write in writers.items()}, overwrite)
    except OSError as e:  # none of the three replaced: an earlier run's set stays whole
        if write_error_advice(e.errno, "--output_path") is not None:
            raise  # a full disk, a read-only folder: the CLI names the file in one line, exit 1
        raise UsageError(f"cannot write {e.filename or out_dir} ({e.strerror or e}); check --output_path") from None
    return paths


def _same_model(a: str, b: str) -> bool | None:
    """Whether checkpoint names ``a`` and ``b`` are one model: the same file (links followed), or both the bundled
    "default"; None where a file is gone and that cannot be told."""
    if "default" in (a, b):
        return a == b
    if not (os.path.exists(a) and os.path.exists(b)):
        return None
    return os.path.samefile(a, b)


def finite_or_null(obj: object) -> object:
    """``obj`` with inf and NaN floats as None: standard JSON has no Infinity (the PSNR of identical images)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def results_from_json(data: object, benchmarks: Sequence[str], layers: int, experts: int,
                      topk: int = 1, checkpoint: str | None = None) -> list[BenchmarkResult]:
    """The ``per_image`` rows of a ``moceir test`` results.json for ``benchmarks``, checked against a model with
    ``layers`` MoE layers of ``experts`` experts, ``topk`` of them per layer, and, where both are known, against
    the ``checkpoint`` that made them; a ValueError names the first row that does not fit."""
    saved = data.get("per_image") if isinstance(data, dict) else None
    if not isinstance(saved, dict):
        raise ValueError("no 'per_image' table: not a results.json of `moceir test`")
    if data.get("experts") == "skip":
        raise ValueError("its scores were made with the experts bypassed (--experts skip), not by the network "
                         "whose routing they would show")
    made_by = data.get("checkpoint")
    if isinstance(made_by, str) and checkpoint is not None and _same_model(made_by, checkpoint) is False:
        raise ValueError(f"its scores were made with the checkpoint {made_by}, not {checkpoint}, whose routing "
                         "they would be shown as")
    missing = [b for b in benchmarks if b not in saved]
    if missing:
        raise ValueError(f"no results for {', '.join(missing)}")
    entry = (lambda e: type(e) is int) if topk == 1 else (lambda e: isinstance(e, list) and len(e) == topk)
    what = "indices" if topk == 1 else f"lists of {topk} indices"
    for b in benchmarks:
        rows = saved[b]
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{b}: no per-image rows")
        for row in rows:
            name = row.get("name", "?") if isinstance(row, dict) else "?"
            picks = row.get("experts") if isinstance(row, dict) else None
            if not (isinstance(picks, list) and len(picks) == layers and all(
                    entry(e) and all(type(i) is int and 0 <= i < experts for i in layer_picks(e)) for e in picks)):
                raise ValueError(f"{b}/{name}: its experts {picks!r} are not {layers} {what} below {experts} "
                                 "(results of another model?)")
            if type(row.get("psnr")) not in (int, float) and not ("psnr" in row and row["psnr"] is None):
                raise ValueError(f"{b}/{name}: no PSNR")
            size = row.get("size", [256, 256])
            if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and 0 < v < 2**20 for v in size)):
                raise ValueError(f"{b}/{name}: its size {size!r} is not [height, width] in pixels")
    return [BenchmarkResult(b, [{**row, "psnr": float("inf") if row["psnr"] is None else row["psnr"]}
                                for row in saved[b]]) for b in benchmarks]


def routing_counts(results: list[BenchmarkResult], layers: int, experts: int) -> np.ndarray:
    """[benchmarks, layers, experts] number of images that picked each expert (with top-k routing, an image
    counts for each of its k experts)."""
    counts = np.zeros((len(results), layers, experts), dtype=np.int64)
    for t, r in enumerate(results):
        for row in r.rows:
            for layer, entry in enumerate(row["experts"]):
                for e in layer_picks(entry):
                    counts[t, layer, e] += 1
    return counts


def routing_flops(model: MoCEIR, results: list[BenchmarkResult]) -> list[dict]:
    """Per benchmark: expert FLOPs actually spent vs. running every expert (per image, summed over layers)."""
    from .flops import ExpertCosts

    costs = ExpertCosts(model)
    rows = []
    for r in results:
        spent = every = 0.0
        for row in r.rows:
            h, w = row.get("size", (256, 256))
            table = costs.at(h, w)
            spent += costs.spent(table, row["experts"])
            every += float(table.sum())
        rows.append({"benchmark": r.name, "expert_gflops_spent": spent / 1e9 / max(1, len(r.rows)),
                     "expert_gflops_all": every / 1e9 / max(1, len(r.rows)),
                     "share": spent / every if every else float("nan")})
    return rows

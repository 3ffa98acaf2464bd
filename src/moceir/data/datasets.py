"""Datasets in upstream MoCE-IR / PromptIR folder layouts (under ``--data_file_dir``).

Every task lists its image pairs up front; a missing or empty folder raises :class:`DatasetLayoutError`
naming the exact path and the layout expected, so a run never starts on a silently empty dataset.
Tasks and benchmarks are named by strings, never by list position.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..io import IMAGE_EXTS, ImageReadError, exif_orientation, file_problem, read_rgb, write_atomically
from .degradations import (DENOISE_SIGMAS, augment, crop_to_multiple, random_haze, seeded_rng, sigma_for_task,
                           add_gaussian_noise)

TASKS = ("denoise_15", "denoise_25", "denoise_50", "derain", "dehaze", "deblur", "synllie", "identity")
TRAINSETS = ("standard", "CDD11_all", "CDD11_single", "CDD11_double", "CDD11_triple")
BENCHMARKS = ("derain", "dehaze", "denoise_15", "denoise_25", "denoise_50", "gopro", "lolv1", "cdd11",
              "raintrainl_val")
DEHAZE_SOURCES = ("reside", "synthetic")
# Upstream's repeat factors, which balance the tasks of the standard training set.
UPSTREAM_REPEATS = {"denoise_15": 3, "denoise_25": 3, "denoise_50": 3, "derain": 120, "dehaze": 1, "deblur": 5,
                    "synllie": 20, "cdd11": 2}
# Not upstream: "identity" pairs each clean BSD400 patch with itself, so the model sees that a clean image (a bright,
# smooth sky included) is to be left alone. Off unless named in --de_type.
IDENTITY_REPEAT = 3
CROP_BASE = 16  # training images are centre-cropped to multiples of this before patches are cut
# Upstream's training layout under --data_file_dir, read by train_pairs and named by training_folders
CLEAN_FOLDERS = ("denoising/BSD400", "denoising/WaterlooED")  # noise, identity and synthetic haze: clean images
PAIRED_TRAIN = {"derain": ("deraining/RainTrainL", "rainy", "gt"),  # task: (folder, degraded, clean)
                "deblur": ("deblurring/GoPro/crop/train", "input_crops", "target_crops"),
                "synllie": ("llie/LOLv1/Train", "input", "target")}
RESIDE, RESIDE_HAZY = "dehazing/RESIDE", ("part1", "part2", "part3", "part4")  # and RESIDE/clear


class DatasetLayoutError(FileNotFoundError):
    """A data folder is missing, empty or unpaired; the message names the path and the layout expected."""


@dataclass(frozen=True)
class Pair:
    """One training or test example. ``degraded`` is None where the degradation is synthesised (noise, haze)."""

    degraded: Path | None
    clean: Path
    task: str
    folder: str = ""  # sub-folder of a layout whose folders share file names (CDD11's "haze"); "" when flat

    @property
    def name(self) -> str:
        """Unique within its benchmark: the file name, under its folder where it has one ("haze/001.png")."""
        file = (self.degraded or self.clean).name
        return f"{self.folder}/{file}" if self.folder else file


def data_folders(pairs: Iterable[Pair]) -> set[str]:
    """The real paths (links followed) of the folders that ``pairs``' images are in: a folder a command must not
    write its own images into, where the next run would read them as data."""
    return {os.path.realpath(folder) for folder in {p.parent for pair in pairs for p in (pair.clean, pair.degraded)
                                                    if p}}


def images_in(folder: Path, layout: str) -> list[Path]:
    if not folder.is_dir():
        what = (f"{folder} {file_problem(folder) or 'is a file'}, not a folder" if os.path.lexists(folder)
                else f"missing folder {folder}")
        raise DatasetLayoutError(f"{what}; expected layout: {layout}")  # a link loop was called "missing"
    with os.scandir(folder) as listing:  # hidden: macOS's ._x.png resource forks are not images
        entries = sorted((e for e in listing if os.path.splitext(e.name)[1].lower() in IMAGE_EXTS
                          and not e.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise DatasetLayoutError(f"no images ({'/'.join(IMAGE_EXTS)}) in {folder}; expected layout: {layout}")
    _refuse_second_names(folder, entries)
    return [folder / e.name for e in entries]


def _refuse_second_names(folder: Path, entries: list[os.DirEntry]) -> None:
    """A DatasetLayoutError where two names in ``folder`` lead to one image (a link to a file beside it, two links
    to one file, hard links): it would be trained on or scored twice. A file's identity is its inode, which the
    listing gives; only links cost a stat (a folder of 70,000 RESIDE images lists in one pass)."""
    listed = Counter(e.inode() for e in entries)
    if not any(e.is_symlink() for e in entries) and len(listed) == len(entries):
        return
    device = os.stat(folder).st_dev
    seen: dict[tuple[int, int], str] = {}
    for e in entries:
        try:  # a link, or a listed inode that repeats (a FUSE mount may list one for all): the file's own stat
            st = os.stat(e.path) if e.is_symlink() or listed[e.inode()] > 1 else None
        except OSError:  # a link to nothing: reading it says so, naming it
            continue
        identity = (st.st_dev, st.st_ino) if st else (device, e.inode())
        if identity in seen:
            raise DatasetLayoutError(f"{folder / e.name} and {seen[identity]} in {folder} are the same image (a link "
                                     "or a hard link): it would be counted twice; keep one of them")
        seen[identity] = e.name


def _number(stem: str) -> str:
    """Pair key of RainTrainL/Rain100L: rain-12 / norain-12 -> "12"."""
    return re.sub(r"^(no)?rain-", "", stem)


def pair_by_name(degraded: list[Path], clean: list[Path], task: str,
                 key: Callable[[str], str] = lambda s: s, unmatched: list[str] | None = None,
                 clean_unmatched: bool = True) -> list[Pair]:
    """Match files by ``key(stem)``, not by sorted order; an unmatched degraded file, or two clean files with one
    key (``a.png`` and ``a.jpg``: which one is the reference?), is an error. Given an ``unmatched`` list (a
    benchmark, scored without them), a line for each file without its counterpart goes there instead: degraded
    ones, and, with ``clean_unmatched``, clean ones."""
    by_key: dict[str, Path] = {}
    for p in clean:
        if key(p.stem) in by_key:
            raise DatasetLayoutError(f"{by_key[key(p.stem)]} and {p.name} are both the clean image for "
                                     f"'{key(p.stem)}'; keep one of them in {p.parent}")
        by_key[key(p.stem)] = p
    missing = [p for p in degraded if key(p.stem) not in by_key]
    if missing and (unmatched is None or len(missing) == len(degraded)):  # none pairs: a layout error, not N lines
        raise DatasetLayoutError(f"{len(missing)} file(s) in {missing[0].parent} have no clean counterpart in "
                                 f"{clean[0].parent}, e.g. {missing[0].name}; add their clean images or move them "
                                 "out")
    if unmatched is not None:
        unmatched += [f"{p}: no clean counterpart in {clean[0].parent}; add its clean image or move it out"
                      for p in missing]
        paired = {key(p.stem) for p in degraded}
        unmatched += [f"{p}: no degraded counterpart in {degraded[0].parent}; add it or move this clean image out"
                      for p in clean if clean_unmatched and key(p.stem) not in paired]
    return [Pair(p, by_key[key(p.stem)], task) for p in degraded if key(p.stem) in by_key]


def folder_pairs(base: Path, degraded: str, clean: str, task: str, key: Callable[[str], str] = lambda s: s,
                 pattern: str = "same names", unmatched: list[str] | None = None) -> list[Pair]:
    """Pairs of ``base/degraded`` and ``base/clean`` images matched by ``key`` of their names (see
    :func:`pair_by_name` for ``unmatched``)."""
    layout = f"{base}/{degraded}/* and {base}/{clean}/* ({pattern})"
    return pair_by_name(images_in(base / degraded, layout), images_in(base / clean, layout), task, key, unmatched)


def unique_stems(files: list[Path]) -> list[Path]:
    """``files`` unless two in one folder share a stem (``1.png`` and ``1.jpg``): both would be trained on."""
    seen: dict[tuple[Path, str], Path] = {}
    for p in files:
        if (p.parent, p.stem) in seen:
            raise DatasetLayoutError(f"{seen[p.parent, p.stem]} and {p.name} share the name '{p.stem}', so both "
                                     f"would be trained on; keep one of them in {p.parent}")
        seen[p.parent, p.stem] = p
    return files


def is_holdout(pair: Pair) -> bool:
    """RainTrainL validation split: images whose number is a multiple of 10 (20 of 200)."""
    num = _number(pair.clean.stem)
    return num.isdigit() and int(num) % 10 == 0


def train_pairs(root: str | Path, task: str, dehaze_source: str = "reside", holdout: bool = False) -> list[Pair]:
    """The pairs of one training task in upstream's layout under ``root`` (un-repeated)."""
    root = Path(root)
    if task in DENOISE_SIGMAS or task == "identity" or (task == "dehaze" and dehaze_source == "synthetic"):
        bsd, waterloo = (root / f for f in CLEAN_FOLDERS)
        layout = f"{bsd}/*.jpg and optionally {waterloo}/*.bmp (clean images)"
        clean = images_in(bsd, layout)
        if waterloo.is_dir():
            clean += images_in(waterloo, layout)
        return [Pair(None, p, task) for p in unique_stems(clean)]
    pairs = _degraded_pairs(root, task, dehaze_source, holdout)
    unique_stems([p.degraded for p in pairs if p.degraded])
    return pairs


def _degraded_pairs(root: Path, task: str, dehaze_source: str, holdout: bool) -> list[Pair]:
    """The pairs of a task with degraded files on disk (deraining, RESIDE dehazing, deblurring, low light)."""
    if task == "derain":
        base, degraded, clean = PAIRED_TRAIN[task]
        pairs = folder_pairs(root / base, degraded, clean, task, _number, "rain-N / norain-N")
        kept = [p for p in pairs if not (holdout and is_holdout(p))]
        if pairs and not kept:  # the task would train on nothing, without a word
            raise DatasetLayoutError(f"derain: every pair in {root / base} is in the "
                                     "validation split that --holdout_val holds out (ids divisible by 10); add "
                                     "training pairs or leave out --holdout_val")
        return kept
    if task == "dehaze":
        if dehaze_source not in DEHAZE_SOURCES:
            raise ValueError(f"dehaze_source must be one of {DEHAZE_SOURCES}, got {dehaze_source!r}")
        base = root / RESIDE
        layout = (f"{base}/part1..part4/NNNN_A_beta.jpg and {base}/clear/NNNN.jpg (RESIDE OTS); "
                  "without OTS use --dehaze_source synthetic")
        hazy = [p for part in RESIDE_HAZY if (base / part).is_dir()
                for p in images_in(base / part, layout)]
        if not hazy:
            raise DatasetLayoutError(f"no RESIDE OTS images in {base}/part1..4; expected layout: {layout}")
        return pair_by_name(hazy, images_in(base / "clear", layout), task, lambda s: s.split("_")[0])
    if task in PAIRED_TRAIN:  # deblur, synllie
        base, degraded, clean = PAIRED_TRAIN[task]
        return folder_pairs(root / base, degraded, clean, task)
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def training_folders(root: str | Path) -> list[Path]:
    """The folders under ``root`` that :func:`train_pairs` and the CDD11 training set read images from, whether
    they exist or not (not listed: a command can refuse to write into one without reading RESIDE's 300k names)."""
    root = Path(root)
    cdd11 = root / "cdd11" / "train"
    return [*(root / f for f in CLEAN_FOLDERS),
            *(root / base / d for base, *folders in PAIRED_TRAIN.values() for d in folders),
            *(root / RESIDE / d for d in (*RESIDE_HAZY, "clear")),
            *(sorted(d for d in cdd11.iterdir() if d.is_dir()) if cdd11.is_dir() else [])]


def cdd11_pairs(root: str | Path, split: str, subset: str, unmatched: list[str] | None = None) -> list[Pair]:
    """CDD11: ``cdd11/<split>/<degradation>/`` + ``clear/``; subset all|single|double|triple or a folder name.
    ``unmatched``: see :func:`pair_by_name` (of ``clear/``, shared by the folders, only degraded files count)."""
    base = Path(root) / "cdd11" / split
    layout = f"{base}/<degradation, e.g. haze_rain>/*.png and {base}/clear/*.png (same names)"
    clean = images_in(base / "clear", layout)
    folders = sorted(d for d in base.iterdir() if d.is_dir() and d.name != "clear"  # .ipynb_checkpoints: no
                     and not d.name.startswith(".")) if base.is_dir() else []       # degradation
    counts = {"single": 1, "double": 2, "triple": 3}
    chosen = [d for d in folders if subset == "all" or d.name == subset
              or counts.get(subset) == d.name.count("_") + 1]
    if not chosen:
        raise DatasetLayoutError(f"no CDD11 degradation folders for subset {subset!r} in {base}; "
                                 f"expected layout: {layout}")
    pairs = []
    for d in chosen:
        try:
            pairs += [replace(pair, folder=d.name) for pair in pair_by_name(
                images_in(d, layout), clean, f"cdd11:{d.name}", unmatched=unmatched, clean_unmatched=False)]
        except DatasetLayoutError as e:  # an empty folder, or one where nothing pairs: a benchmark scores the others
            if unmatched is None:
                raise
            unmatched.append(f"{e}; its images are not scored")
    return pairs


def benchmark_pairs(root: str | Path, benchmark: str, cdd11_subset: str = "all",
                    unmatched: list[str] | None = None) -> list[Pair]:
    """Test pairs of a benchmark, in the layouts upstream's test.py reads. A file without its counterpart is a
    DatasetLayoutError, or, given an ``unmatched`` list, a line there (the others are scored)."""
    root = Path(root)
    if benchmark in DENOISE_SIGMAS:
        base = root / "denoising" / "cBSD68" / "original_png"
        return [Pair(None, p, benchmark) for p in images_in(base, f"{base}/*.png (clean CBSD68)")]
    if benchmark == "derain":
        return folder_pairs(root / "deraining" / "Rain100L", "rainy", "gt", benchmark, _number, "rain-N / norain-N",
                            unmatched)
    if benchmark == "raintrainl_val":
        return [p for p in train_pairs(root, "derain") if is_holdout(p)]
    if benchmark == "dehaze":
        return folder_pairs(root / "dehazing" / "SOTS" / "outdoor", "hazy", "gt", benchmark,
                            lambda s: s.split("_")[0], "NNNN_A_beta.jpg / NNNN.png", unmatched)
    if benchmark == "gopro":
        return folder_pairs(root / "deblurring" / "GoPro" / "test", "input", "target", benchmark,
                            unmatched=unmatched)
    if benchmark == "lolv1":
        return folder_pairs(root / "llie" / "LOLv1" / "Test", "input", "target", benchmark, unmatched=unmatched)
    if benchmark == "cdd11":
        return cdd11_pairs(root, "test", cdd11_subset, unmatched)
    raise ValueError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")


def _rng() -> np.random.Generator:
    """Per-sample generator drawn from torch's RNG: reproducible under a seed and distinct in each worker."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


def _read_cropped(path: Path) -> np.ndarray:
    """The image at ``path`` cropped to multiples of CROP_BASE; one smaller than that (nothing would be left) is a
    DatasetLayoutError naming it (`moceir train` checks every image first: this one changed since)."""
    img = read_rgb(path)
    if min(img.shape[:2]) < CROP_BASE:
        raise DatasetLayoutError(f"{path}: {img.shape[1]}x{img.shape[0]} is smaller than {CROP_BASE} pixels (changed "
                                 "since the run checked it?); replace or remove it")
    return crop_to_multiple(img, CROP_BASE)


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad an image smaller than the patch size."""
    ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect") if ph or pw else img


class PairedPatchDataset(Dataset):
    """Random paired crops with the 8 flip/rotation augmentations; noise and haze are synthesised on the fly
    ("identity" pairs a clean patch with itself).

    Item: {"lq": [3, p, p] float in [0, 1], "gt": same, "task": str, "path": str}.
    """

    def __init__(self, pairs: list[Pair], patch_size: int = 128):
        if not pairs:
            raise DatasetLayoutError("the training set is empty")
        self.pairs = pairs
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> dict:
        pair, p, rng = self.pairs[idx], self.patch_size, _rng()
        clean = _fit(_read_cropped(pair.clean), p)
        degraded = None if pair.degraded is None else _fit(_read_cropped(pair.degraded), p)
        if degraded is not None and degraded.shape != clean.shape:
            raise DatasetLayoutError(f"{pair.degraded} is {degraded.shape[:2]} but its clean image {pair.clean} is "
                                     f"{clean.shape[:2]}; the pair must have the same size")
        y, x = rng.integers(0, clean.shape[0] - p + 1), rng.integers(0, clean.shape[1] - p + 1)
        mode = int(rng.integers(0, 8))
        clean = augment(clean[y:y + p, x:x + p], mode)
        if degraded is None and pair.task == "identity":
            degraded = clean.copy()
        elif degraded is None:
            degraded = random_haze(clean, rng) if pair.task == "dehaze" else \
                add_gaussian_noise(clean, sigma_for_task(pair.task), rng)
        else:
            degraded = augment(degraded[y:y + p, x:x + p], mode)
        return {"lq": _to_tensor(degraded), "gt": _to_tensor(clean), "task": pair.task, "path": str(pair.clean)}


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]; always a copy (PIL's arrays are read-only: a 1x1 image's
    transpose is already contiguous, and torch warns on a read-only array)."""
    return torch.from_numpy(img.transpose(2, 0, 1).copy()).float().div_(255.0)


def build_train_pairs(root: str | Path, de_type: list[str], trainset: str = "standard",
                      dehaze_source: str = "reside", repeats: dict[str, int] | None = None,
                      holdout: bool = False) -> dict[str, list[Pair]]:
    """All training pairs per task, repeated by upstream's factors (overridable by ``repeats``)."""
    if trainset not in TRAINSETS:
        raise ValueError(f"trainset must be one of {TRAINSETS}, got {trainset!r}")
    # Synthetic haze is made on the 400 BSD images: repeat them like a denoising task.
    synthetic = {"dehaze": UPSTREAM_REPEATS["denoise_15"]} if dehaze_source == "synthetic" else {}
    factors = {**UPSTREAM_REPEATS, "identity": IDENTITY_REPEAT, **synthetic, **(repeats or {})}
    trained = ["cdd11"] if trainset.startswith("CDD11") else list(de_type)
    if unused := [t for t in (repeats or {}) if t not in trained]:  # a typo'd or forgotten task would go unnoticed
        todo = ("a CDD11 training set repeats as a whole: --repeat cdd11=N" if trained == ["cdd11"] else
                "add it to --de_type or leave the --repeat out")
        raise ValueError(f"--repeat {unused[0]}: that task is not trained here (training: {', '.join(trained)}); "
                         f"{todo}")
    if trainset.startswith("CDD11"):
        pairs = cdd11_pairs(root, "train", trainset.split("_", 1)[1])
        unique_stems([p.degraded for p in pairs if p.degraded])  # 001.png and 001.jpg: both would be trained on
        per_task = {"cdd11": pairs * factors["cdd11"]}
    else:
        unknown = [t for t in de_type if t not in TASKS]
        if unknown or not de_type:
            raise ValueError(f"unknown --de_type {unknown or de_type}; valid: {', '.join(TASKS)}")
        per_task = {t: train_pairs(root, t, dehaze_source, holdout) * factors[t] for t in de_type}
    if not any(per_task.values()):
        raise DatasetLayoutError(f"the training set is empty: every task ({', '.join(per_task)}) is repeated 0 "
                                 "times; raise one with --repeat TASK=N")
    return per_task


def image_size(path: str) -> list[int] | str:
    """[width, height] of an image as :func:`read_rgb` reads it (EXIF orientation applied), else why it cannot be
    read. 8-bit images are checked cheaply (JPEGs decoded at 1/8 scale); others are decoded as training reads them."""
    p = Path(path)
    if problem := file_problem(p):
        return problem
    try:
        with Image.open(p) as im:
            if not im.mode.startswith(("I", "F")):
                w, h = im.size
                im.draft(None, (max(1, w // 8), max(1, h // 8)))
                im.convert("RGB")  # as read_rgb does
                return [h, w] if exif_orientation(im) in (5, 6, 7, 8) else [w, h]
    except Exception as e:  # noqa: BLE001 - an 8-bit image that does not decode: read_rgb would fail the same way
        if not isinstance(e, Image.UnidentifiedImageError):  # which read_rgb may still read (a 16-bit TIFF)
            return f"cannot be decoded ({type(e).__name__}: {e})"
    try:
        h, w = read_rgb(p).shape[:2]
    except (ImageReadError, MemoryError) as e:
        return str(e).removeprefix(f"{p}: ") if not isinstance(e, MemoryError) else "is too large to decode"
    return [w, h]


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _pair_problem(pair: Pair, sizes: dict[str, list[int] | str], patch_size: int = 0) -> tuple[str, str] | None:
    """A pair whose images differ in size once cropped to CROP_BASE, or are smaller than CROP_BASE or (so cropped)
    than the patch, which would be cut from a reflect-padded image."""
    for path in (pair.clean, pair.degraded):
        size = sizes.get(str(path)) if path else None
        if isinstance(size, list) and min(size) < CROP_BASE:
            return str(path), f"{size[0]}x{size[1]} is smaller than {CROP_BASE} pixels"
        if isinstance(size, list) and min(size) // CROP_BASE * CROP_BASE < patch_size:
            return str(path), (f"{size[0]}x{size[1]} is smaller than the {patch_size}-pixel patch once cropped to "
                               f"multiples of {CROP_BASE}; remove it or lower --patch_size")
    if pair.degraded is None:
        return None
    a, b = sizes[str(pair.degraded)], sizes[str(pair.clean)]
    if isinstance(a, list) and isinstance(b, list) and [v // CROP_BASE for v in a] != [v // CROP_BASE for v in b]:
        return str(pair.degraded), f"{a[0]}x{a[1]} but its clean image {pair.clean.name} is {b[0]}x{b[1]}"
    return None


def _cached_entry(path: str, cached: dict) -> dict:
    """{"stamp": [bytes, mtime_ns]} plus "size" when the file is missing or unchanged since ``cached``."""
    entry, hit = {"stamp": _stamp(path)}, cached.get(os.path.abspath(path))
    if entry["stamp"] is None:
        entry["size"] = image_size(path)  # why: missing, a dangling link, a link loop
    elif isinstance(hit, dict) and hit.get("stamp") == entry["stamp"] and "size" in hit:
        entry["size"] = hit["size"]
    return entry


DATA_CHECK_VERSION = 2  # 2: sizes after EXIF orientation, 16-bit images decoded (1 had no version key)


def check_training_images(pairs: list[Pair], report: Path, workers: int = 8, patch_size: int = 0,
                          log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Decode every image of ``pairs`` once (in threads) and compare each pair's sizes, and each image's with
    ``patch_size`` -> {file: problem}. Pairs whose sizes differ by less than CROP_BASE pixels are trained as
    upstream trains them (both centre-cropped, so shifted against each other), listed under "unequal_pairs" and
    announced through ``log``.

    The result is written to ``report`` (JSON), whose entries, keyed by path, file size and mtime, let a later
    call (a resumed run) skip the files that did not change.
    """
    try:
        old = json.loads(report.read_text())
        cached = dict(old["files"]) if old.get("version") == DATA_CHECK_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        old, cached = None, {}
    files = sorted({str(p) for pair in pairs for p in (pair.clean, pair.degraded) if p is not None})
    entries = {f: _cached_entry(f, cached) for f in files}
    todo = [f for f, e in entries.items() if "size" not in e]
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(tqdm(pool.map(image_size, todo), total=len(todo), desc="checking training images",
                            unit="img", disable=not todo))
    for f, size in zip(todo, decoded):
        entries[f]["size"] = size
    sizes = {f: e["size"] for f, e in entries.items()}
    problems = {f: size for f, size in sizes.items() if isinstance(size, str)}
    for found in filter(None, (_pair_problem(pair, sizes, patch_size) for pair in set(pairs))):
        problems.setdefault(*found)
    unequal = sorted(str(pair.degraded) for pair in set(pairs) if pair.degraded is not None
                     and not {str(pair.degraded), str(pair.clean)} & set(problems)
                     and isinstance(sizes[str(pair.degraded)], list) and isinstance(sizes[str(pair.clean)], list)
                     and sizes[str(pair.degraded)] != sizes[str(pair.clean)])
    if unequal and log is not None:
        (w, h), (cw, ch) = sizes[unequal[0]], sizes[next(str(p.clean) for p in pairs if str(p.degraded) == unequal[0])]
        log(f"note: {len(unequal)} training pair(s) differ in size by less than {CROP_BASE} px (e.g. "
            f"{Path(unequal[0]).name}: {w}x{h}, its clean image {cw}x{ch}); both are centre-cropped to multiples of "
            f"{CROP_BASE}, as upstream does, which shifts one against the other; see 'unequal_pairs' in {report}")
    data = {"version": DATA_CHECK_VERSION, "problems": dict(sorted(problems.items())),
            "unequal_pairs": unequal, "files": {os.path.abspath(f): e for f, e in entries.items()}}
    if data != old:
        _write_json(report, data)
    return data["problems"]


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)), overwrite=True)


class BenchmarkDataset(Dataset):
    """Full test images centre-cropped to multiples of 16 (upstream's protocol).

    Noise for the denoising benchmarks is seeded by the image's name and sigma, so a score does not depend
    on what ran before. Item: {"lq", "gt": [3, H, W] float, "name": :attr:`Pair.name`}.
    """

    def __init__(self, pairs: list[Pair], crop_base: int = 16, unmatched: Sequence[str] = ()):
        self.pairs = pairs
        self.crop_base = crop_base
        self.unmatched = list(unmatched)  # a line per file left out for want of its counterpart

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> dict:
        pair = self.pairs[idx]
        clean = read_rgb(pair.clean)
        sizes = [clean.shape[:2]]
        clean = crop_to_multiple(clean, self.crop_base)
        if pair.degraded is None:
            sigma = sigma_for_task(pair.task)
            degraded = add_gaussian_noise(clean, sigma, seeded_rng(pair.clean.name, sigma))
        else:
            degraded = read_rgb(pair.degraded)
            sizes.append(degraded.shape[:2])
            degraded = crop_to_multiple(degraded, self.crop_base)
        return {"lq": _to_tensor(degraded), "gt": _to_tensor(clean), "name": pair.name, "sizes": sizes}

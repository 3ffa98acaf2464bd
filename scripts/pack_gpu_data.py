"""Pack the training images for the GPU machine: BSD400 and RainTrainL as WebP, under the 64 MiB it accepts.

    python scripts/pack_gpu_data.py --data_file_dir ../shared/datasets --out .gpu/data --quality 85
    python scripts/pack_gpu_data.py --data_file_dir ../shared/datasets --out /tmp/data --limit 6   # a dry run's
    python scripts/pack_gpu_data.py --synthetic 6 --out /tmp/data                    # random images, no datasets

The layout is the one `moceir train` reads (denoising/BSD400, deraining/RainTrainL/{rainy,gt}); synthetic haze
is made on BSD400 at training time. `.gpu/` is git-ignored; `scripts/gpu_session.sh` reads DATA=.gpu/data.
--out must be new or empty: the pack never mixes with, nor deletes, what a folder already holds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

FOLDERS = ("denoising/BSD400", "deraining/RainTrainL/rainy", "deraining/RainTrainL/gt")
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def source_files(root: Path, limit: int | None) -> list[Path]:
    """The images of FOLDERS under ``root``, sorted; the first ``limit`` of each (rainy and gt stay paired)."""
    files = []
    for folder in FOLDERS:
        if not (root / folder).is_dir():
            raise SystemExit(f"error: {root / folder} is missing; point --data_file_dir at the datasets folder")
        found = [f for f in sorted((root / folder).iterdir()) if f.suffix.lower() in SUFFIXES]
        files += found[:limit]
    return files


def write_synthetic(out_root: Path, n: int, size: tuple[int, int] = (96, 128)) -> None:
    """``n`` random images per folder in the training layout (RainTrainL pairs rain-i / norain-i)."""
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        clean = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        rainy = np.clip(clean.astype(int) + 40 * (rng.random(size) < 0.05)[..., None], 0, 255).astype(np.uint8)
        for rel, img in ((f"denoising/BSD400/{i}.webp", clean), (f"deraining/RainTrainL/gt/norain-{i}.webp", clean),
                         (f"deraining/RainTrainL/rainy/rain-{i}.webp", rainy)):
            (out_root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(out_root / rel, "WEBP", lossless=True)


MIN_QUALITY = 70


def pack(files: list[Path], src_root: Path, out_root: Path, quality: int, method: int) -> float:
    """Write ``files`` under ``out_root`` as WebP at ``quality``; returns the pack's size in MiB."""
    for f in tqdm(files, desc=f"packing (quality {quality})", unit="img"):
        dst = out_root / f.relative_to(src_root).with_suffix(".webp")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").save(dst, "WEBP", quality=quality, method=method)
    return sum(f.stat().st_size for f in out_root.rglob("*.webp")) / 2**20


def _positive(v: str) -> int:
    if not v.isdigit() or int(v) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {v}")
    return int(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--out", default=".gpu/data")
    p.add_argument("--quality", type=int, default=85,
                   help="WebP quality (85: with the working tree, under the 64 MiB the GPU run accepts)")
    p.add_argument("--limit", type=int, help="pack only the first N images of each folder (dry runs)")
    p.add_argument("--synthetic", type=_positive, metavar="N", help="write N random images per folder instead")
    p.add_argument("--method", type=int, default=6, help="WebP effort 0-6 (6: smallest, slowest)")
    p.add_argument("--limit_mib", type=float, default=60.0,
                   help="lower the quality by 5 (down to 70) until the pack is not larger (64 MiB less the working "
                        "tree; prepare_gpu_window.sh works it out)")
    a = p.parse_args()
    out_root = Path(a.out)
    if os.path.lexists(out_root) and (not out_root.is_dir() or any(out_root.iterdir())):
        # images of an earlier pack would stay beside this one's and be trained on
        raise SystemExit(f"error: --out {out_root} is not an empty folder; remove it or name a new one")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out_root}: cannot make this folder ({e.strerror}); name another") from None
    if a.synthetic is not None:
        write_synthetic(out_root, a.synthetic)
        print(f"{3 * a.synthetic} synthetic images in {out_root}")
        return
    src_root = Path(a.data_file_dir)
    files = source_files(src_root, a.limit)
    qualities = [*range(a.quality, MIN_QUALITY, -5), MIN_QUALITY] if a.quality > MIN_QUALITY else [a.quality]
    for quality in qualities:  # lower the quality until the pack fits
        total = pack(files, src_root, out_root, quality, a.method)
        print(f"{len(files)} images at quality {quality}, {total:.1f} MiB in {out_root}")
        if total <= a.limit_mib:
            return
    raise SystemExit(f"error: {total:.1f} MiB at quality {quality} is over --limit_mib {a.limit_mib}; "
                     "make room in the working tree")


if __name__ == "__main__":
    main()

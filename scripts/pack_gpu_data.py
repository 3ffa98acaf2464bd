"""Pack the training images for the GPU machine: BSD400 and RainTrainL as WebP, under the 64 MiB it accepts.

    python scripts/pack_gpu_data.py --data_file_dir ../shared/datasets --out .gpu/data --quality 90

The layout is the one `moceir train` reads (denoising/BSD400, deraining/RainTrainL/{rainy,gt}); synthetic haze
is made on BSD400 at training time. `.gpu/` is git-ignored; `scripts/gpu_session.sh` reads DATA=.gpu/data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from tqdm import tqdm

FOLDERS = ("denoising/BSD400", "deraining/RainTrainL/rainy", "deraining/RainTrainL/gt")
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--out", default=".gpu/data")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--limit_mib", type=float, default=60.0, help="fail if the pack is larger (the carry limit is 64)")
    a = p.parse_args()
    src_root, out_root = Path(a.data_file_dir), Path(a.out)
    files = []
    for folder in FOLDERS:
        if not (src_root / folder).is_dir():
            raise SystemExit(f"error: {src_root / folder} is missing; point --data_file_dir at the datasets folder")
        files += [f for f in sorted((src_root / folder).iterdir()) if f.suffix.lower() in SUFFIXES]
    for f in tqdm(files, desc="packing", unit="img"):
        dst = out_root / f.relative_to(src_root).with_suffix(".webp")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").save(dst, "WEBP", quality=a.quality, method=6)
    total = sum(f.stat().st_size for f in out_root.rglob("*.webp")) / 2**20
    print(f"{len(files)} images, {total:.1f} MiB in {out_root}")
    if total > a.limit_mib:
        raise SystemExit(f"error: {total:.1f} MiB is over --limit_mib {a.limit_mib}; lower --quality")


if __name__ == "__main__":
    main()

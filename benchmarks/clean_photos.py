"""Clean photographs through the model: how far does it move images that need no restoration? (issue 14)

    python benchmarks/clean_photos.py default runs/relay-4/model_ema_fp16.safetensors

The flat-sky check (flat_region.py) is synthetic; this is its counterpart on real photos. Every ``--every``-th
image of ``--photos`` (default: the clean CBSD68 images) is restored as it is, with ``moceir.restore``'s defaults.
Per model: the PSNR of the output against the input (higher: the clean photo is left more alone), the mean change of
brightness in 8-bit grey levels (negative: darker) and the image darkened most. ``--per_image`` lists every image.
Exit code 0; 1 when a checkpoint cannot be loaded, gives non-finite outputs, or an image cannot be read (the rest
still run); 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

import moceir
from moceir.io import ImageReadError, list_images, read_rgb
from moceir.metrics import psnr


def photo_rows(model: moceir.MoCEIR, photos: list[tuple[str, np.ndarray]]) -> list[dict]:
    """One row per photo (uint8 RGB [H, W, 3]): name, PSNR of output against input (dB; inf when the photo comes
    back unchanged), mean change (levels), and whether the output is finite."""
    rows = []
    for name, rgb in photos:
        x = rgb.astype(np.float32) / 255
        y = moceir.restore(model, x)
        rows.append({"image": name, "psnr": float(psnr(x, y, data_range=1.0)),
                     "mean_change": float((y.mean() - x.mean()) * 255), "finite": bool(np.isfinite(y).all())})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="models to compare ('default': the bundled one)")
    p.add_argument("--photos", type=Path, default=Path("../shared/datasets/denoising/cBSD68/original_png"))
    p.add_argument("--every", type=int, default=4, help="use every N-th image of the sorted folder (default: 4)")
    p.add_argument("--per_image", action="store_true", help="also list every image's figures")
    a = p.parse_args()
    if a.every < 1:
        p.error("--every must be at least 1")
    if not a.photos.is_dir():
        print(f"error: --photos {a.photos}: not a folder; pass a folder of clean photographs", file=sys.stderr)
        return 2
    files = list_images(a.photos)[::a.every]
    if not files:
        print(f"error: --photos {a.photos}: no images in it", file=sys.stderr)
        return 2
    status, photos = 0, []
    for f in files:
        try:
            photos.append((f.name, read_rgb(f)))
        except ImageReadError as e:
            print(f"error: {e} (skipped)", file=sys.stderr)
            status = 1
    if not photos:
        return 1
    print(f"{len(photos)} clean photos from {a.photos} (every {a.every})\n")
    print("| model | PSNR of output against input | mean brightness change | darkened most |")
    print("|---|---|---|---|")
    per_image = {}
    for ck in a.checkpoints:
        try:
            model = moceir.load_model(ck)
        except moceir.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
            continue
        rows = photo_rows(model, photos)
        bad = [r["image"] for r in rows if not r["finite"]]
        if bad:
            print(f"error: {ck}: its outputs are not finite on {len(bad)} of {len(rows)} photos ({bad[0]}, ...); "
                  "NaN or inf weights? check the checkpoint", file=sys.stderr)
            status = 1
            continue
        per_image[ck] = rows
        worst = min(rows, key=lambda r: r["mean_change"])
        print(f"| {ck} | {np.mean([r['psnr'] for r in rows]):.2f} dB | "
              f"{np.mean([r['mean_change'] for r in rows]):+.2f} levels | "
              f"{worst['image']} ({worst['mean_change']:+.1f}) |")
    if a.per_image and per_image:
        print("\n| image | " + " | ".join(f"{ck}: PSNR, change" for ck in per_image) + " |")
        print("|---|" + "---|" * len(per_image))
        for i, (name, _) in enumerate(photos):
            print(f"| {name} | " + " | ".join(f"{r[i]['psnr']:.2f}, {r[i]['mean_change']:+.1f}"
                                              for r in per_image.values()) + " |")
    return status


if __name__ == "__main__":
    sys.exit(main())

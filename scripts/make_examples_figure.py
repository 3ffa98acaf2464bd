"""Before/after figure of the bundled model on examples/ (run `moceir restore examples -o restored` first).

    python scripts/make_examples_figure.py restored docs/examples.png
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moceir.io import read_rgb
from moceir.metrics import psnr

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
EXAMPLES = {  # example -> ground truth and the crop it was cut with
    "noisy_sigma25_cbsd68_0011.png": (SHARED / "denoising/cBSD68/original_png/0011.png", (256, 256)),
    "rainy_raintrainl_10.png": (SHARED / "deraining/RainTrainL/gt/norain-10.webp", (256, 320)),
    "hazy_sots_0001.jpg": (SHARED / "dehazing/SOTS/outdoor/gt/0001.png", None),
}


def main(restored_dir: str, out: str) -> None:
    fig, axes = plt.subplots(len(EXAMPLES), 3, figsize=(10, 3.3 * len(EXAMPLES)))
    for row, (name, (gt_path, crop)) in enumerate(EXAMPLES.items()):
        lq = read_rgb(Path("examples") / name)
        res = read_rgb(Path(restored_dir) / name)
        gt = read_rgb(gt_path)
        gt = gt[:crop[0], :crop[1]] if crop else gt[:lq.shape[0], :lq.shape[1]]
        f = [a.astype(np.float32) / 255 for a in (lq, res, gt)]
        titles = [f"input  {psnr(f[2], f[0]):.2f} dB", f"moceir default  {psnr(f[2], f[1]):.2f} dB", "ground truth"]
        for col, (img, title) in enumerate(zip((lq, res, gt), titles)):
            axes[row, col].imshow(img)
            axes[row, col].set_title(title, fontsize=10)
            axes[row, col].axis("off")
    fig.suptitle("bundled default model (MoCE-IR-S; its training runs are in docs/model-card.md): "
                 "PSNR against the ground truth", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

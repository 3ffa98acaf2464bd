"""What a margin of reflected context (`--context_pad`) does to restored images, on the benchmarks we hold.

    python benchmarks/context_pad.py --data_file_dir ../shared/datasets --pads 0 8 16 32 \
        --benchmarks denoise_25 dehaze raintrainl_val

For each benchmark and pad: PSNR over the whole image (upstream's protocol: centre crop to multiples of 16, RGB),
PSNR over the 4-px frame at the border only, the mean signed error in that frame (negative: darker than the
clean image), and the seconds per image.
"""

import argparse
import time

import numpy as np
import torch

import moceir
from moceir.data.datasets import BenchmarkDataset, benchmark_pairs
from moceir.inference import restore_tensor
from moceir.metrics import psnr


def border_mask(h: int, w: int, width: int = 4) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--benchmarks", nargs="+", default=["denoise_25", "dehaze", "raintrainl_val"])
    p.add_argument("--pads", nargs="+", type=int, default=[0, 8, 16, 32])
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--limit", type=int, default=0, help="images per benchmark (0: all)")
    a = p.parse_args()
    torch.set_num_threads(2)
    model = moceir.load_model(a.checkpoint)
    print("| benchmark | images | context_pad | PSNR | PSNR of the 4-px border | mean border error | s/image |")
    print("|---|---|---|---|---|---|---|")
    for bench in a.benchmarks:
        ds = BenchmarkDataset(benchmark_pairs(a.data_file_dir, bench))
        n = min(len(ds), a.limit) if a.limit else len(ds)
        items = [ds[i] for i in range(n)]
        for pad in a.pads:
            full, edge, bias, seconds = [], [], [], 0.0
            for item in items:
                t0 = time.perf_counter()
                with torch.no_grad():
                    y = restore_tensor(model, item["lq"][None], context_pad=pad).clamp(0, 1)[0]
                seconds += time.perf_counter() - t0
                out, gt = y.permute(1, 2, 0).numpy(), item["gt"].permute(1, 2, 0).numpy()
                mask = border_mask(*gt.shape[:2])
                full.append(psnr(gt, out))
                err = out[mask] - gt[mask]
                edge.append(10 * np.log10(1 / max(float((err**2).mean()), 1e-12)))
                bias.append(float(err.mean()))
            print(f"| {bench} | {n} | {pad} | {np.mean(full):.3f} | {np.mean(edge):.3f} | {np.mean(bias):+.4f} | "
                  f"{seconds / n:.2f} |", flush=True)


if __name__ == "__main__":
    main()

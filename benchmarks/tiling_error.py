"""How far tiled restoration is from whole-image restoration, with per-tile or global routing.

    python benchmarks/tiling_error.py --image examples/hazy_sots_0001.jpg --tile 256

MoCE-IR's channel attention pools over the whole image and each image's router picks its experts from global
statistics, so tiles cannot be exact; this measures by how much they differ.
"""

import argparse

import numpy as np
import torch

import moceir
from moceir.inference import global_experts, pad_to_multiple, restore_tensor
from moceir.io import read_rgb
from moceir.metrics import psnr
from moceir.runtime import tune_cpu_allocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default="examples/hazy_sots_0001.jpg")
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlaps", type=int, nargs="+", default=[32, 64])
    a = p.parse_args()
    tune_cpu_allocator()
    model = moceir.load_model(a.checkpoint, channels_last=True)
    x = torch.from_numpy(read_rgb(a.image).transpose(2, 0, 1).copy()).float().div(255)[None]
    with torch.no_grad():
        full = restore_tensor(model, x).clamp(0, 1)
        whole = global_experts(model, x, max_side=10**6)[:, 0, 0]
        tiles = []
        xp, _ = pad_to_multiple(x, 8)
        for top in range(0, xp.shape[-2] - a.tile + 1, a.tile):
            for left in range(0, xp.shape[-1] - a.tile + 1, a.tile):
                tiles.append(model(xp[..., top:top + a.tile, left:left + a.tile], return_aux=True).experts[:, 0])
        changed = np.mean([(t != whole).float().mean().item() for t in tiles])
    ref = full[0].permute(1, 2, 0).numpy()
    print(f"{a.image} {tuple(x.shape[-2:])}, tile {a.tile}: per-tile routing differs from the whole image's in "
          f"{100 * changed:.0f}% of (tile, MoE layer) decisions")
    print("| routing | overlap | max abs diff vs untiled | PSNR vs untiled |\n|---|---|---|---|")
    for routing in ("tile", "global"):
        for ov in a.overlaps:
            with torch.no_grad():
                y = restore_tensor(model, x, tile=a.tile, overlap=ov, routing=routing).clamp(0, 1)
            out = y[0].permute(1, 2, 0).numpy()
            print(f"| {routing} | {ov} | {np.abs(out - ref).max():.4f} | {psnr(ref, out):.2f} dB |")


if __name__ == "__main__":
    main()

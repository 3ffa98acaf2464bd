"""Where the CPU fusion pays: one FFN (with its residual) fused against the reference path, per map size.

    python benchmarks/fusion_sizes.py

Interleaved in one process, median of 15 calls each. Sets fused.MIN_PIXELS (moceir/models/fused.py).
"""

from __future__ import annotations

import time

import torch

import common  # noqa: F401  (importing it applies the allocator tuning, as the moceir command does)
from moceir.models import fused
from moceir.models.layers import FeedForward

CASES = ((256, 16), (256, 32), (128, 32), (128, 64), (64, 64), (64, 128), (32, 64), (32, 128), (32, 256))


def median_ms(fn, n: int = 15) -> float:
    fn(), fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[n // 2]


def main() -> None:
    torch.manual_seed(0)
    print("| channels | map | fused ms | reference ms | fused / reference |\n|---|---|---|---|---|")
    fused.MIN_PIXELS = 0  # measure below the threshold too
    with torch.inference_mode():
        for dim, side in CASES:
            ffn = FeedForward(dim, 2.0, bias=False).to(memory_format=torch.channels_last)
            x = torch.randn(1, dim, side, side).contiguous(memory_format=torch.channels_last)
            fused.set_enabled(True)
            on = median_ms(lambda: ffn(x, x))
            fused.set_enabled(False)
            off = median_ms(lambda: ffn(x, x))
            print(f"| {dim} | {side}×{side} | {on:.2f} | {off:.2f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()

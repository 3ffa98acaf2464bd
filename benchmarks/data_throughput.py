"""Training data path speed: random 128² training pairs per second from one process, per task.

    python benchmarks/data_throughput.py --data_file_dir ../shared/datasets --items 200

It runs with one torch thread, as each DataLoader worker does. With N loader workers the data path delivers about
N times this rate, so it can be compared with the training rate (patches/s) to tell whether data loading limits
training.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import torch

from moceir.data.datasets import PairedPatchDataset, build_train_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--de_type", nargs="+", default=["denoise_15", "denoise_25", "denoise_50", "derain", "dehaze"])
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--items", type=int, default=200)
    a = p.parse_args()
    # One thread, as in a DataLoader worker: with torch's default threads a [3, 128, 128] conversion took 6 ms
    # instead of microseconds (thread start-up per tiny operator), and items 28.6 ms instead of 3.1 ms.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    pairs = build_train_pairs(a.data_file_dir, a.de_type, dehaze_source="synthetic",
                              repeats={t: 1 for t in a.de_type})
    dataset = PairedPatchDataset([x for task in pairs.values() for x in task], a.patch_size)
    seconds = collections.defaultdict(list)
    for i in random.Random(0).choices(range(len(dataset)), k=a.items):
        t0 = time.perf_counter()
        item = dataset[i]
        seconds[item["task"]].append(time.perf_counter() - t0)
    every = [s for v in seconds.values() for s in v]
    print("| task | items | ms per item | items/s (one process) |\n|---|---|---|---|")
    for task, v in sorted(seconds.items()):
        print(f"| {task} | {len(v)} | {1000 * sum(v) / len(v):.1f} | {len(v) / sum(v):.0f} |")
    print(f"| all | {len(every)} | {1000 * sum(every) / len(every):.1f} | {len(every) / sum(every):.0f} |")


if __name__ == "__main__":
    main()

"""Time spent before any image is decoded: naming the outputs of many inputs, and listing a large data folder.

    python benchmarks/planning_speed.py --files 8000

plan_outputs names N .png and N .jpg inputs of the same stems written as PNG (every name clashes once, as a camera
folder of RAW+JPEG exports restored with --ext png would); images_in lists a folder of N empty .png files (as the
datasets list RESIDE's 70,000 images). Each is timed as the best of --repeat runs, in this process.
"""

import argparse
import tempfile
import time
from pathlib import Path

from moceir.data.datasets import images_in
from moceir.pipeline import plan_outputs


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=8000, help="N")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    inputs = [Path(f"/photos/{i:06d}{ext}") for ext in (".png", ".jpg") for i in range(a.files)]
    naming = best_of(a.repeat, lambda: plan_outputs(inputs, Path("/restored"), "png"))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.files):
            (Path(tmp) / f"{i:06d}.png").touch()
        listing = best_of(a.repeat, lambda: images_in(Path(tmp), "a folder of images"))
    print(f"| step | inputs | seconds |\n|---|---|---|\n| plan_outputs (every name clashes) | {2 * a.files} | "
          f"{naming:.2f} |\n| images_in | {a.files} | {listing:.3f} |")


if __name__ == "__main__":
    main()

"""Images per second of `moceir restore` on a folder of cBSD68 JPEGs, with and without loader workers.

    python benchmarks/restore_throughput.py --data_file_dir ../shared/datasets --images 200 --workers 0 2
    python benchmarks/restore_throughput.py ... --baseline_src /path/to/older/moceir/src   # an older checkout too

The folder holds `--images` JPEGs (quality 90) cycled from cBSD68 (481x321 and 321x481). Each configuration runs
`python -m moceir restore FOLDER -o OUT --quiet --batch_size B --num_workers W` in a fresh process; the time
includes starting Python and loading the model, which the first line measures on its own (one image).
With 2 threads on a 2-core machine that runs anything else, OpenMP's threads wait for each other and single
images take up to 6x longer at random: use `--threads 1` there.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def run(folder: Path, out: Path, extra: list[str], src: str | None, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if src:
        env["PYTHONPATH"] = src
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moceir", "restore", str(folder), "-o", str(out), "--quiet", "--device",
                    "cpu", *extra], check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_file_dir", default="../shared/datasets")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="OMP_NUM_THREADS of each run (1 gives stable figures on a machine shared with other work)")
    p.add_argument("--baseline_src", help="the src/ folder of another moceir checkout, run first for comparison")
    a = p.parse_args()
    clean = sorted((Path(a.data_file_dir) / "denoising/cBSD68/original_png").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        folder, one = Path(tmp) / "in", Path(tmp) / "one"
        folder.mkdir()
        one.mkdir()
        for i in range(a.images):
            Image.open(clean[i % len(clean)]).convert("RGB").save(folder / f"{i:04d}.jpg", quality=90)
        shutil.copy(folder / "0000.jpg", one / "0000.jpg")
        out = Path(tmp) / "out"
        startup = run(one, out, [], None, a.threads)
        print(f"start-up and one image: {startup:.1f} s")
        print("| code | workers | batch | seconds | images/s | images/s without start-up |")
        print("|---|---|---|---|---|---|")
        configs = ([("baseline", None, a.baseline_src)] if a.baseline_src else []) + \
                  [("this checkout", w, None) for w in a.workers]
        for name, workers, src in configs:
            extra = ["--batch_size", str(a.batch_size)] + (["--num_workers", str(workers)] if workers is not None else [])
            seconds = run(folder, out, extra, src, a.threads)
            net = max(seconds - startup, 1e-9)
            print(f"| {name} | {'-' if workers is None else workers} | {a.batch_size} | {seconds:.1f} | "
                  f"{a.images / seconds:.2f} | {a.images / net:.2f} |", flush=True)


if __name__ == "__main__":
    main()

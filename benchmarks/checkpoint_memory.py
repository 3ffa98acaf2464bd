"""Peak memory of refusing a checkpoint padded with a tensor no network has, against loading the plain file.

    python benchmarks/checkpoint_memory.py --junk_mib 512

Writes the bundled model's tensors plus a float32 tensor "junk" of ``--junk_mib`` MiB into a temporary safetensors
file, then runs ``moceir info`` on it and on the bundled model, each in its own process, and prints each one's peak
resident memory (ru_maxrss) and exit code. A refused file should cost no more than the plain model: its header is
checked before any tensor is read.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moceir.models.checkpoints import DEFAULT_WEIGHTS


def peak_rss_mib(*args: str) -> tuple[float, int]:
    """(peak resident MiB, exit code) of ``python -m moceir *args`` run alone in a child process."""
    code = ("import resource, subprocess, sys\n"
            f"rc = subprocess.run([sys.executable, '-m', 'moceir', *{list(args)!r}], capture_output=True).returncode\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]) / 1024, int(out[1])  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--junk_mib", type=int, default=512, help="size of the extra tensor")
    a = p.parse_args()
    with safe_open(str(DEFAULT_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    with tempfile.TemporaryDirectory() as tmp:
        padded = Path(tmp) / "padded.safetensors"
        save_file({**load_file(str(DEFAULT_WEIGHTS)), "junk": torch.zeros(a.junk_mib * 2**18)}, str(padded),
                  metadata=metadata)
        rows = [("bundled model", *peak_rss_mib("info", "default")),
                (f"padded with {a.junk_mib} MiB", *peak_rss_mib("info", str(padded)))]
    print("| moceir info of | peak RSS (MiB) | exit code |\n|---|---|---|")
    for name, rss, rc in rows:
        print(f"| {name} | {rss:.0f} | {rc} |")
    print(json.dumps({name: {"peak_rss_mib": round(rss), "exit_code": rc} for name, rss, rc in rows}))


if __name__ == "__main__":
    main()

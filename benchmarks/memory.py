"""Peak memory of one fp32 inference at a given size, in a fresh process (CPU: peak RSS; CUDA: peak allocated).

    python benchmarks/memory.py --size 1024
    python benchmarks/memory.py --restore_size 4000x3000    # `moceir restore` of a real photo resized to 4000x3000
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--device", default="cpu")
    p.add_argument("--restore_size", help="WxH: time and peak RSS of `moceir restore` on a photo of that size")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1] / "examples" / "hazy_sots_0001.jpg"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.restore_size:
        from PIL import Image

        w, h = map(int, a.restore_size.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"photo_{w}x{h}.png"
            Image.open(a.source).convert("RGB").resize((w, h), Image.BICUBIC).save(src)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "moceir", "restore", str(src), "-o", str(Path(tmp) / "out"), "--device",
                   a.device, "--report", str(Path(tmp) / "report.json"), "--quiet"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            report = json.loads((Path(tmp) / "report.json").read_text()) if res.returncode == 0 else {}
            tile = report.get("images", [{}])[0].get("tile")
            print(f"moceir restore {w}x{h} on {a.device}: exit {res.returncode}, {seconds:.0f} s, tile {tile}, "
                  f"peak RSS {_child_peak_mb():.0f} MB")
            if res.returncode:
                print(res.stderr[-2000:])
        return
    if not a.child:
        subprocess.run([sys.executable, __file__, "--child", "--size", str(a.size), "--model", a.model,
                        "--device", a.device], check=True)
        return
    import moceir

    device = torch.device(a.device)
    model = moceir.create_model(a.model).eval().to(device).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, a.size, a.size, device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        model(x)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"{a.model} {a.size}x{a.size} fp32 on {torch.cuda.get_device_name(device)}: peak allocated {peak:.0f} MB")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{a.model} {a.size}x{a.size} fp32 on CPU: peak RSS {peak:.0f} MB ({peak - base:.0f} MB above the "
              f"{base:.0f} MB before the forward pass; {(peak - base) * 2**20 / a.size**2:.0f} bytes/pixel)")


if __name__ == "__main__":
    main()

"""Peak memory of one fp32 inference at a given size, in a fresh process (CPU: peak RSS; CUDA: peak allocated).

    python benchmarks/memory.py --size 1024
    python benchmarks/memory.py --restore_size 1155x866 3000x2000 4000x3000              # `moceir restore` (CLI)
    python benchmarks/memory.py --restore_size 1155x866 3000x2000 4000x3000 --api        # moceir.restore (API)
    python benchmarks/memory.py --tiled 1200x1000 --tile 512 [--tuned_allocator]          # tiles, allocator on/off
    python benchmarks/memory.py --probe_size 12000x12000    # sizing a PNG from its header (demo, restore planning)

--restore_size restores a real photo resized to each size, each in a fresh process, and prints the time, the
tile chosen, the peak RSS and the peak that moceir's memory model (moceir.inference.estimate_peak_bytes)
predicted for it.
"""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _child_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


_API_CHILD = """
import sys, numpy as np, moceir
from PIL import Image
arr = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
kw = {"max_memory": float(sys.argv[2])} if len(sys.argv) > 2 else {}
out = moceir.restore(moceir.load_model("default"), arr, **kw)
assert out.shape == arr.shape
"""


def _restore_peak(size: str, source: str, device: str, api: bool, max_memory: str | None) -> None:
    """Restore `source` resized to WxH in a fresh process; print time, tile, peak RSS and the model's estimate."""
    import os

    import moceir
    from moceir.cli import _bytes
    from moceir.inference import auto_tile, estimate_peak_bytes, memory_budget
    from moceir.pipeline import DEFAULT_CONTEXT_PAD, _padded
    from PIL import Image

    if not api:  # the command tunes glibc's allocator, and the memory model follows (moceir.runtime)
        from moceir.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    w, h = map(int, size.lower().split("x"))
    budget = _bytes(max_memory) if max_memory else memory_budget(torch.device(device))
    model = moceir.create_model("MoCE_IR_S")
    padded = _padded((h, w), DEFAULT_CONTEXT_PAD)  # as the pipeline sizes it
    tile = auto_tile(model, *padded, budget)
    predicted = estimate_peak_bytes(model, *padded, tile) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"photo_{w}x{h}.png"
        Image.open(source).convert("RGB").resize((w, h), Image.BICUBIC).save(src)
        if api:
            cmd = [sys.executable, "-c", _API_CHILD, str(src)] + ([str(budget)] if max_memory else [])
        else:
            cmd = [sys.executable, "-m", "moceir", "restore", str(src), "-o", str(Path(tmp) / "out"), "--device",
                   device, "--quiet"] + (["--max_memory", max_memory] if max_memory else [])
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "2"})
        stderr = child.stderr.read()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
    print(f"{'moceir.restore' if api else 'moceir restore'} {w}x{h} ({w * h / 1e6:.1f} MP) on {device}: "
          f"exit {child.returncode}, {seconds:.0f} s, budget {budget / 1e9:.2f} GB, tile {tile}, "
          f"peak RSS {usage.ru_maxrss / 1024:.0f} MB, predicted {predicted:.0f} MB", flush=True)
    if child.returncode:
        print(stderr[-2000:])


def _tiled_peak(size: str, tile: int, tuned: bool) -> None:
    """Peak RSS (VmHWM) of the bundled model on a random image in tiles, in this process (run it fresh)."""
    import moceir
    from moceir.inference import restore_tensor
    from moceir.runtime import tune_cpu_allocator

    if tuned:
        tune_cpu_allocator()

    def hwm_mb() -> float:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["VmHWM"].split()[0]) / 1024

    torch.set_num_threads(2)
    model = moceir.load_model("default")
    h, w = map(int, size.lower().split("x"))
    with torch.no_grad():
        restore_tensor(model, torch.rand(1, 3, h, w), tile, 32)
    print(f"{h}x{w} in {tile}x{tile} tiles, allocator {'tuned' if tuned else 'glibc defaults'}: "
          f"peak RSS {hwm_mb():.0f} MB")


_PROBE_CHILD = """
import sys, time
from moceir.io import image_size
t0 = time.perf_counter()
size = image_size(sys.argv[1]) if sys.argv[1] != "-" else None
hwm = dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0]  # ru_maxrss survives exec
print(size, f"{time.perf_counter() - t0:.4f}", int(hwm) / 1024)
"""


def _probe_peak(size: str) -> None:
    """Peak RSS of moceir.io.image_size on a black WxH PNG (a few hundred kB), in a fresh process, against the peak
    of a process that only imports moceir.io."""
    import numpy as np
    from PIL import Image

    w, h = map(int, size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"black_{w}x{h}.png"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
        runs = {arg: subprocess.run([sys.executable, "-c", _PROBE_CHILD, arg], capture_output=True, text=True,
                                    check=True).stdout.split() for arg in ("-", str(path))}
        kb = path.stat().st_size / 1e3
    *answer, seconds, peak = runs[str(path)]
    print(f"image_size of a {w}x{h} PNG ({kb:.0f} kB): {' '.join(answer)} in {float(seconds) * 1e3:.1f} ms, "
          f"peak RSS {float(peak):.0f} MB (a process importing moceir.io: {float(runs['-'][-1]):.0f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--device", default="cpu")
    p.add_argument("--restore_size", nargs="+", help="WxH ...: time and peak RSS of restoring a photo of each size")
    p.add_argument("--api", action="store_true", help="with --restore_size: moceir.restore instead of the CLI")
    p.add_argument("--max_memory", help="with --restore_size: the --max_memory budget (default: automatic)")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1] / "examples" / "hazy_sots_0001.jpg"))
    p.add_argument("--tiled", help="HxW: peak RSS of restore_tensor on a random HxW image in --tile tiles")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tuned_allocator", action="store_true", help="with --tiled: apply moceir's glibc tuning first")
    p.add_argument("--probe_size", help="WxH: peak RSS of reading a black WxH PNG's size from its header")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe_size:
        _probe_peak(a.probe_size)
        return
    if a.restore_size:
        for size in a.restore_size:
            _restore_peak(size, a.source, a.device, a.api, a.max_memory)
        return
    if a.tiled:
        _tiled_peak(a.tiled, a.tile, a.tuned_allocator)
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

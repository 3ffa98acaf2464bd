"""ONNX Runtime against PyTorch on the CPU: the bundled default model (MoCE-IR-S), batch 1, fp32.

    python benchmarks/onnx_speed.py                         # 256 interleaved; 1024 per engine in a subprocess
    python benchmarks/onnx_speed.py --sizes 256 512 --repeats 3 --memory-size 0

- PyTorch: ``moceir.load_model("default", channels_last=True)`` (eager, sparse dispatch, oneDNN-fused path);
- "ort": ``moceir.onnx.export_onnx(..., dispatch="dense")`` of the same weights (all experts run, gated;
  fft_impl="matmul"), CPU execution provider, ``--threads`` intra-op threads;
- "ort_skip": the default export (``dispatch="conditional"``): each expert runs inside an ONNX ``If`` taken only
  when an image of the batch chose it; at batch 1 that skips 3 of 4 experts per MoE layer.

``--sizes`` are timed interleaved in one process (median of ``--repeats``). At ``--memory-size`` each engine runs
alone in a fresh subprocess: two forwards, the second one timed, and the RSS high-water mark (VmHWM) after loading and at the end
(three engines at 1024x1024 in one process would hold over 20 GB). The exported files are cached in ``--cache``
(re-exported with ``--export``; exporting MoCE-IR-S takes about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common  # noqa: F401  (importing it applies the allocator tuning, as the moceir command does)
import moceir
from moceir.onnx import export_onnx, load_onnx

ENGINES = ("pytorch", "ort", "ort_skip")


def export(path: Path, skip_unchosen: bool) -> float:
    t0 = time.perf_counter()
    export_onnx(moceir.load_model("default"), path, overwrite=True, dispatch="conditional" if skip_unchosen else "dense",
                note="benchmarks/onnx_speed.py" + (" conditional" if skip_unchosen else " dense"))
    return time.perf_counter() - t0


def load_engine(engine: str, cache: Path, threads: int):
    if engine == "pytorch":
        model = moceir.load_model("default", channels_last=True)

        def run(x):
            with torch.inference_mode():
                out = model(x.contiguous(memory_format=torch.channels_last), return_aux=True)
            return out.image, out.expert_indices
        return run
    return load_onnx(cache / f"{engine}.onnx", providers=["CPUExecutionProvider"], threads=threads)


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would
    report its parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(engine: str, cache: Path, size: int, threads: int) -> None:
    """Run one engine twice at ``size``; print peak RSS (MiB) after loading and at the end, and the second
    forward's seconds, as JSON."""
    torch.set_num_threads(threads)
    run = load_engine(engine, cache, threads)
    loaded = _peak_rss_mib()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    run(x)
    t0 = time.perf_counter()
    run(x)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mib()
    print(json.dumps({"engine": engine, "loaded_mib": loaded, "peak_mib": peak, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[256], help="sizes timed in one process")
    parser.add_argument("--memory-size", type=int, default=1024, help="size run per engine in a subprocess (0: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moceir_onnx_bench")
    parser.add_argument("--export", action="store_true", help="re-export even if the cached files exist")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.cache, args.memory_size, args.threads)
        return
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    for engine in args.engines:
        path = args.cache / f"{engine}.onnx"
        if engine != "pytorch" and (args.export or not path.exists()):
            print(f"exported {path} in {export(path, engine == 'ort_skip'):.0f} s", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads; median of {args.repeats}, batch 1, fp32")
    engines = {e: load_engine(e, args.cache, args.threads) for e in args.engines}
    print("| size | " + " | ".join(f"{e} s" for e in engines) + " | max abs diff to pytorch | experts equal |")
    print("|---" * (len(engines) + 3) + "|")
    for size in args.sizes:
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        outs = {e: run(x) for e, run in engines.items()}  # warm-up
        times: dict[str, list[float]] = {e: [] for e in engines}
        for _ in range(args.repeats):
            for e, run in engines.items():
                t0 = time.perf_counter()
                run(x)
                times[e].append(time.perf_counter() - t0)
        ref = outs.get("pytorch", next(iter(outs.values())))
        diff = max((o[0] - ref[0]).abs().max().item() for o in outs.values())
        same = all(torch.equal(o[1], ref[1]) for o in outs.values())
        cells = " | ".join(f"{statistics.median(t):.3f}" for t in times.values())
        print(f"| {size}² | {cells} | {diff:.1e} | {same} |", flush=True)
    if args.memory_size:
        size = args.memory_size
        print(f"\nEach engine alone in a subprocess at {size}x{size}: peak RSS and the second forward's time")
        print("| engine | after loading MiB | peak MiB | forward s |\n|---|---|---|---|")
        for engine in args.engines:
            out = subprocess.run([sys.executable, __file__, "--child", engine, "--memory-size", str(size),
                                  "--threads", str(args.threads), "--cache", str(args.cache)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {engine} | {r['loaded_mib']:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

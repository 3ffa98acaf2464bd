"""CPU torch.compile of the real-valued, conditional-dispatch network against eager moceir, one process.

    python benchmarks/compile_cpu.py --size 256 --threads 2 --repeats 5

The eager reference is what `moceir.load_model("default")` runs on the CPU (sparse dispatch, torch.fft,
oneDNN-fused convolutions). The compiled network uses ``fft_impl="matmul"`` (Inductor generates no code for
complex tensors) and ``dispatch="conditional"`` (one graph: ``torch.cond`` per expert instead of the sparse
dispatch's host round trips), with Inductor's ``freezing`` (weights folded as constants, oneDNN weight prepacking).
Prints the compile time, the median seconds of each and the largest output difference. ``--bf16`` adds eager
bf16 autocast (oneDNN's AMX/AVX-512 bf16 kernels where the CPU has them), the other way to trade exactness for
speed; ``--no_compile`` skips the compiled row.
"""

import argparse
import time

import torch

import common  # noqa: F401  (importing it applies the allocator tuning, as the moceir command does)
import moceir
from moceir.models import fused


def median_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bf16", action="store_true", help="also time eager moceir under bf16 autocast")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
    a = p.parse_args()
    import torch._inductor.config as inductor

    inductor.freezing = True
    torch.set_num_threads(a.threads)
    eager = moceir.load_model("default").eval()
    net = moceir.load_model("default", fft_impl="matmul").eval().set_dispatch("conditional")
    x = torch.rand(1, 3, a.size, a.size).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        ref = eager(x, return_aux=True)
        rows.append(("eager moceir (sparse, fft, fused)", "-", median_seconds(eager, x, a.repeats), 0.0))
        if a.bf16:
            def eager_bf16(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return eager(x, return_aux=True)
            eager_bf16(x)
            diff = (eager_bf16(x).image.float() - ref.image).abs().max().item()
            rows.append(("eager moceir, bf16 autocast", "-", median_seconds(eager_bf16, x, a.repeats), diff))
        if not a.no_compile:
            with fused.disabled():  # the fused path is an eager fast path; Inductor does its own fusion
                compiled = torch.compile(net)
                t0 = time.perf_counter()
                out = compiled(x, return_aux=True)
                compile_s = time.perf_counter() - t0
                compiled_s = median_seconds(compiled, x, a.repeats)
            rows.append(("torch.compile, freezing, conditional, matmul", f"{compile_s:.0f}", compiled_s,
                         (out.image - ref.image).abs().max().item()))
    print(f"{a.size}x{a.size}, batch 1, fp32, {a.threads} thread(s), median of {a.repeats}")
    print("| variant | first call s | s per call | max abs diff |")
    print("|---|---|---|---|")
    for name, first, seconds, diff in rows:
        print(f"| {name} | {first} | {seconds:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()

"""Cold torch.compile of moceir's training step: the whole network against each block on its own.

    python benchmarks/compile_time.py --scope blocks --model MoCE_IR_S
    python benchmarks/compile_time.py --scope network --model MoCE_IR_S

Runs three eager steps, then the same three steps with the network compiled (`moceir.runtime.compile_network`,
mode "default", fft_impl=matmul, dense dispatch, channels-last) in a fresh Inductor cache, and prints the first
compiled step's seconds (the compile), the later steps' seconds, the largest loss difference from eager (the
router noise is the same: Inductor's fallback_random), the number of graphs Dynamo compiled and where the compile
time went (Dynamo's own timers). On a GPU machine the step runs on CUDA and Triton compiles the kernels.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from moceir.runtime import COMPILE_SCOPES, compile_network
from step_traffic import build, check_step_args, step


def losses_and_times(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: int, patch: int,
                     steps: int) -> tuple[list[float], list[float]]:
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(1)
    losses, times = [], []
    for i in range(steps):
        lq, gt = (torch.rand(batch, 3, patch, patch, generator=g).to(device) for _ in range(2))
        torch.manual_seed(100 + i)
        t0 = time.perf_counter()
        losses.append(step(net, opt, lq, gt).item())  # a sync: the time is the step's
        times.append(time.perf_counter() - t0)
    return losses, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scope", choices=COMPILE_SCOPES, default="blocks")
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = p.parse_args()
    check_step_args(p, a)
    if a.steps < 2:
        p.error(f"--steps must be at least 2 (the first compiles), got {a.steps}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")  # a cold cache
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    ref, ref_t = losses_and_times(*build(a.model, "matmul", device=device), a.batch_size, a.patch_size, a.steps)
    net, opt = build(a.model, "matmul", device=device)
    compile_network(net, "default", a.scope)
    got, got_t = losses_and_times(net, opt, a.batch_size, a.patch_size, a.steps)

    import torch._dynamo.utils as dynamo_utils

    print(f"{a.model}, scope {a.scope}, batch {a.batch_size}, {a.patch_size}² patches, {device}")
    print(f"compile (first step): {got_t[0]:.1f} s; graphs: {dynamo_utils.counters['stats']['unique_graphs']}; "
          f"graph breaks: {sum(dynamo_utils.counters['graph_break'].values())}")
    print("step s, eager:   " + " ".join(f"{t:.3f}" for t in ref_t[1:]))
    print("step s, compiled: " + " ".join(f"{t:.3f}" for t in got_t[1:]))
    print(f"largest loss difference from eager: {max(abs(x - y) for x, y in zip(ref, got)):.2e}")
    timers = dynamo_utils.compile_times(repr="str", aggregate=True)
    keep = ("bytecode_tracing", "fw_compiler_base", "bw_compiler", "async_compile.wait", "compile_file")
    print("\n".join(line for line in timers.splitlines() if line.split(",")[0].split(".")[-1] in keep
                    or any(line.startswith(k) for k in keep)))


if __name__ == "__main__":
    main()

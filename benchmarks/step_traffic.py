"""Bytes moved by one training step of moceir: eager (every operator), and after Inductor's fusion.

    python benchmarks/step_traffic.py                                   # eager fp32, batch 1 of 128²: seconds
    python benchmarks/step_traffic.py --precision bf16 --fft_impl matmul
    python benchmarks/step_traffic.py --inductor                        # + Inductor's count (minutes)

A step is what benchmarks/train_throughput.py times: forward (dense dispatch, channels-last), L1 + 0.1 FFT + 0.01
balance, backward, AdamW, here on real CPU tensors in channels-last, with LayerNorm2d taking the formulation it
takes on CUDA (`layers.fused_layer_norm_pays`). The eager count adds up the bytes of the tensors each operator
reads and writes (views are free). It is a model of memory traffic, not a measurement: a cache can serve a
re-read, cuDNN's workspaces are not counted, an in-place write counts its destination as read and written, an
expanded view at its full size, and AdamW's first step includes setting up its state. "extern" are the operators
that stay library calls after compiling (convolutions, matrix products, FFTs); the rest is what Inductor can fuse.
Forward and backward scale with the batch, AdamW does not, so the rows are also given per ``--per`` patches
(default 16: the issue's batch), that is forward and backward times ``per / batch_size`` plus AdamW once.

``--inductor`` compiles the whole network on the CPU in a fresh cache (Inductor's C++ backend: the same scheduler
as on a GPU, with the CPU backend's fusion rules, which differ from Triton's in places such as split reductions),
with fft_impl=matmul unless told otherwise, runs one step and reports Inductor's own count of the bytes its kernels
read and write (``torch._inductor.metrics.num_bytes_accessed``, forward and backward; the optimizer stays eager and
is counted as such). Compiling block by block (``--compile_scope blocks``) leaves the layers between blocks eager,
so it moves somewhat more. ``--bandwidth_tbs`` turns bytes into milliseconds at that bandwidth (an H200: 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import tempfile
import time
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import moceir
from moceir.losses import restoration_loss
from moceir.models import layers
from moceir.models.experts import set_expert_bypass

EXTERN = ("convolution", "mm", "bmm", "addmm", "baddbmm", "_fft_r2c", "_fft_c2r", "_fft_c2c", "linalg_vecdot")


class TrafficCounter(TorchDispatchMode):
    """Sums, per operator, the bytes of the tensors it reads and writes; view operators count nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.__name__.split(".")[0] in ("detach", "_unsafe_view", "lift_fresh", "alias"):
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        name = func.__name__.split(".")[0]
        self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def split(self) -> tuple[int, int]:
        """(bytes of extern operators, bytes of the others)."""
        ext = sum(v for k, v in self.bytes.items() if k.startswith(EXTERN))
        return ext, self.total - ext


def cuda_layer_norm_rule():
    """LayerNorm2d choosing its formulation as it does on CUDA (the count is meant for the GPU's step)."""
    rule = layers.fused_layer_norm_pays
    return mock.patch.object(layers, "fused_layer_norm_pays", lambda device_type, channels: rule("cuda", channels))


def build(model: str, fft_impl: str, bypass: bool = False,
          device: str | torch.device = "cpu") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The training step's network (seed 0, dense dispatch, channels-last, train mode) and its AdamW."""
    torch.manual_seed(0)
    net = moceir.create_model(model, fft_impl=fft_impl).set_dispatch("dense").train().to(device)
    net = set_expert_bypass(net.to(memory_format=torch.channels_last), bypass)
    return net, torch.optim.AdamW(net.parameters(), lr=2e-4)


def batch(b: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lq, gt = (torch.rand(b, 3, patch, patch, generator=g).contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    return lq, gt


def step(net, opt, lq, gt, bf16: bool = False, counter: TrafficCounter | None = None,
         optimizer_counter: TrafficCounter | None = None) -> torch.Tensor:
    with counter if counter is not None else contextlib.nullcontext():
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = net(lq)
            loss = restoration_loss(out.image, gt, out.balance_loss, "fft")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with optimizer_counter if optimizer_counter is not None else contextlib.nullcontext():
        opt.step()
    return loss.detach()


def eager_count(model: str, b: int, patch: int, fft_impl: str, bf16: bool = False,
                bypass: bool = False) -> tuple[TrafficCounter, TrafficCounter]:
    """(forward + loss + backward counter, AdamW counter) of one eager step. ``bypass``: every expert the identity.
    bf16 is CPU autocast, whose operator lists are close to, not the same as, CUDA's."""
    with cuda_layer_norm_rule():
        net, opt = build(model, fft_impl, bypass)
        lq, gt = batch(b, patch)
        fwd_bwd, optim = TrafficCounter(), TrafficCounter()
        step(net, opt, lq, gt, bf16, fwd_bwd, optim)
    return fwd_bwd, optim


def inductor_count(model: str, b: int, patch: int, bf16: bool,
                   fft_impl: str = "matmul") -> tuple[int, float, float]:
    """(bytes Inductor's kernels move in forward and backward, compile seconds, eager seconds of the same step)."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.metrics as metrics

    from moceir.runtime import compile_network

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-count-")  # a cache hit counts nothing
    log = compile_fx.inductor_metrics_log  # Inductor counts the bytes only while this log is on at INFO
    log.setLevel(logging.INFO)
    log.propagate, log.handlers = False, [logging.NullHandler()]  # the count without its printout
    with cuda_layer_norm_rule():
        net, opt = build(model, fft_impl)
        lq, gt = batch(b, patch)
        t0 = time.perf_counter()
        step(net, opt, lq, gt, bf16)
        eager_s = time.perf_counter() - t0
        net, opt = build(model, fft_impl)
        compile_network(net, "default")
        metrics.reset()
        t0 = time.perf_counter()
        step(net, opt, lq, gt, bf16)
    if not metrics.num_bytes_accessed:
        raise SystemExit("error: Inductor counted no bytes (did it compile?); run again")
    return metrics.num_bytes_accessed, time.perf_counter() - t0, eager_s


def check_step_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """A one-line usage error (exit 2) for a model, batch or patch size the training step cannot take."""
    if a.model not in moceir.PRESETS:
        p.error(f"--model {a.model!r} is not a preset; choose one of {', '.join(moceir.PRESETS)}")
    m = moceir.get_config(a.model).size_multiple
    if a.batch_size < 1 or a.patch_size < m or a.patch_size % m:
        p.error(f"--batch_size must be at least 1 and --patch_size a positive multiple of {m}; "
                f"got {a.batch_size} and {a.patch_size}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--per", type=int, default=16, help="also give the rows per this many patches")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU autocast")
    p.add_argument("--fft_impl", choices=["fft", "matmul"], default=None,
                   help="experts' FFT product (default: fft; with --inductor matmul, which Inductor compiles: with "
                        "fft it leaves the complex operators to eager kernels)")
    p.add_argument("--bypass_experts", action="store_true",
                   help="eager count with every expert the identity: what the dense dispatch's four experts cost")
    p.add_argument("--inductor", action="store_true", help="also compile on the CPU and report Inductor's count")
    p.add_argument("--bandwidth_tbs", type=float, default=4.8, help="memory bandwidth for the time column (TB/s)")
    p.add_argument("--top", type=int, default=12, help="operators listed")
    a = p.parse_args()
    check_step_args(p, a)
    if a.per < 1:
        p.error(f"--per must be at least 1, got {a.per}")
    impl = a.fft_impl or ("matmul" if a.inductor else "fft")
    if a.bypass_experts and a.inductor:
        p.error("--bypass_experts counts the eager step only")
    bf16 = a.precision == "bf16"
    fwd_bwd, optim = eager_count(a.model, a.batch_size, a.patch_size, impl, bf16, a.bypass_experts)
    ext, rest = fwd_bwd.split()
    scale = a.per / a.batch_size

    def row(label: str, n: float, adam: float = 0.0) -> None:
        per = n * scale + adam
        print(f"{label:52s} {(n + adam) / 1e9:8.2f} GB | per {a.per}: {per / 1e9:8.2f} GB "
              f"{1000 * per / (a.bandwidth_tbs * 1e12):7.1f} ms at {a.bandwidth_tbs:g} TB/s")

    print(f"{a.model}, batch {a.batch_size}, {a.patch_size}² patches, {a.precision}, fft_impl={impl}, one training "
          f"step{', experts bypassed' if a.bypass_experts else ''}")
    row(f"eager, {fwd_bwd.calls.total() + optim.calls.total()} operator calls, with AdamW", fwd_bwd.total, optim.total)
    row("  forward + backward", fwd_bwd.total)
    row("    extern: convolutions, matrix products, FFTs", ext)
    row("    the rest: elementwise, reductions, copies", rest)
    row("  AdamW", 0.0, optim.total)
    print("largest operators (forward + backward):")
    for name, n in fwd_bwd.bytes.most_common(a.top):
        print(f"  {name:40s} {n / 1e9:9.2f} GB {fwd_bwd.calls[name]:7d} calls")
    if a.inductor:
        fused, compile_s, eager_s = inductor_count(a.model, a.batch_size, a.patch_size, bf16, impl)
        print(f"Inductor (whole network compiled on the CPU in {compile_s:.0f} s; eager step {eager_s:.1f} s):")
        row("  forward + backward, Inductor's kernels, with AdamW", fused, optim.total)
        row("  forward + backward, Inductor's kernels", fused)
        print(f"  eager / Inductor, forward + backward: {fwd_bwd.total / fused:.2f}x")


if __name__ == "__main__":
    main()

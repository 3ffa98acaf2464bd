"""Timing helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import nullcontext

import torch

import moceir
from moceir.losses import restoration_loss
from moceir.runtime import tune_cpu_allocator

tune_cpu_allocator()  # as the moceir command does; see moceir/runtime.py


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str, cache_enabled: bool = True):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision],
                          cache_enabled=cache_enabled)


def timeit(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)  # peak memory of the timed calls, not of cuDNN's autotuning during warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def inference_seconds(model, device, size: int, batch: int, precision: str, warmup: int, repeats: int,
                      cuda_graph: bool = False) -> tuple[float, float | None]:
    """Median seconds of one no-grad forward, and None; with ``cuda_graph``, of a call of
    :class:`moceir.cuda_graphs.GraphedNetwork` (what ``moceir restore --cuda_graphs`` runs: input copied in, graph
    replayed, output copied out), and the largest difference of its output from the eager forward's."""
    x = torch.rand(batch, 3, size, size, device=device)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()
    net, diff = model, None
    if cuda_graph:
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        from moceir.cuda_graphs import GraphedNetwork

        net = GraphedNetwork(model, max_graphs=1, capture_after=1)
        with torch.no_grad(), autocast(device, precision):
            diff = (net(x).float() - model(x).float()).abs().max().item()
        if net.captures != 1 or net.replays != 1:  # it fell back to eager: time nothing under the graphs label
            raise RuntimeError(net.disabled or "the CUDA graph was not captured (out of memory)")

    def run():
        with torch.no_grad(), autocast(device, precision):
            net(x)

    return timeit(run, device, warmup, repeats), diff


def train_patches_per_second(model, device, batch: int, patch: int, precision: str, warmup: int,
                             repeats: int) -> float:
    """Full optimizer steps (forward, L1 + 0.1 FFT + 0.01 balance, backward, AdamW) -> patches/s."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gt = torch.rand(batch, 3, patch, patch, device=device)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        gt, lq = (t.contiguous(memory_format=torch.channels_last) for t in (gt, lq))

    def step():
        with autocast(device, precision):
            out = model(lq)
            loss = restoration_loss(out.image, gt, out.balance_loss, "fft")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / timeit(step, device, warmup, repeats)


def build(name: str, device: torch.device, channels_last: bool, compile_model: bool, dispatch: str = "auto"):
    model = prepare(moceir.create_model(name).set_dispatch(dispatch), device, channels_last)
    if compile_model:
        model.compile()
    return model

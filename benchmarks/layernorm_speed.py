"""LayerNorm over channels on channels-last tensors: which formulation is fastest at the network's shapes.

    python benchmarks/layernorm_speed.py --device cuda --size 1024 --jsonl bench.jsonl
    python benchmarks/layernorm_speed.py --device cpu --size 64

Window 3 (H200, 1024², fp32) found ``F.layer_norm`` on the [B, H, W, C] view, what ``LayerNorm2d`` does for
channels-last input, taking 35.7 ms of a 193 ms forward in 36 calls: PyTorch's kernel is slow for rows of 32 to 256
values. This times, per shape MoCE-IR-S normalises at that image size (C = 32, 64, 128, 256 at 1, 1/2, 1/4, 1/8 of
the side), three formulations that give the same result to fp32 rounding:
- ``layer_norm``: ``F.layer_norm`` over the last dim of the NHWC view (``LayerNorm2d``'s channels-last path on the
  CPU, and on CUDA from 128 channels: ``layers.fused_layer_norm_pays``, set by these timings);
- ``manual``: mean, centre, mean of squares, rsqrt, addcmul along dim 1 (the current NCHW path's formula);
- ``var_mean``: ``torch.var_mean`` along dim 1, then one normalise-and-scale expression.
Each row: ms per call (back-to-back calls, median of 3 rounds) and the largest difference from ``layer_norm``.
Forward only, batch 1, on the channels-last norms of the transformer blocks; the experts' norms take the NCHW path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

EPS = 1e-5


def layer_norm(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, EPS).permute(0, 3, 1, 2)


def manual(x, w, b):
    xc = x - x.mean(1, keepdim=True)
    var = xc.square().mean(1, keepdim=True)
    return torch.addcmul(b.view(1, -1, 1, 1), xc * torch.rsqrt(var + EPS), w.view(1, -1, 1, 1))


def var_mean(x, w, b):
    var, mu = torch.var_mean(x, 1, keepdim=True, correction=0)
    return (x - mu) * torch.rsqrt(var + EPS) * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


FORMULATIONS = {"layer_norm": layer_norm, "manual": manual, "var_mean": var_mean}


def shapes(size: int) -> list[tuple[int, int]]:
    """(channels, side) of the LayerNorms of MoCE-IR-S's four levels for a size x size image."""
    return [(32 * 2**i, size // 2**i) for i in range(4)]


def ms_per_call(fn, device: torch.device, calls: int) -> float:
    """Median over 3 rounds of the mean ms per call of ``calls`` back-to-back calls (one sync per round), so
    launches overlap the kernels as in the network and a kernel's time, not one launch's latency, is measured."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    rounds = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rounds.append((time.perf_counter() - t0) / calls)
    return 1000 * statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=1024, help="image side; the shapes follow MoCE-IR-S's levels")
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed round")
    p.add_argument("--jsonl", help="also append each row to these JSON lines (kind: layernorm)")
    a = p.parse_args()
    if a.size < 8 or a.calls < 1:
        p.error(f"--size must be at least 8 (MoCE-IR-S's fourth level is 1/8 of the side) and --calls at least 1; "
                f"got {a.size} and {a.calls}")
    device = torch.device(a.device)
    gen = torch.Generator().manual_seed(0)
    for channels, side in shapes(a.size):
        x = torch.randn(1, channels, side, side, generator=gen).to(device).contiguous(
            memory_format=torch.channels_last)
        w = (1 + 0.1 * torch.randn(channels, generator=gen)).to(device)
        b = (0.1 * torch.randn(channels, generator=gen)).to(device)
        with torch.no_grad():
            ref = layer_norm(x, w, b)
            row = {"kind": "layernorm", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", "channels": channels, "side": side}
            for name, fn in FORMULATIONS.items():
                row[f"{name}_ms"] = ms_per_call(lambda fn=fn: fn(x, w, b), device, a.calls)
                row[f"{name}_max_abs_diff"] = (fn(x, w, b) - ref).abs().max().item()
        print(json.dumps(row), flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

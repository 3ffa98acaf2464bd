"""Where one inference forward spends its time: operator launches, device time and wall time.

    python benchmarks/profile_forward.py --device cuda --size 256 --dispatch dense --out profile_cuda.md
    python benchmarks/profile_forward.py --device cpu --size 256 --out profile_cpu.md
    python benchmarks/profile_forward.py --device cpu --size 128 --dispatch dense --experts skip --out skip.md

On CUDA, a device-busy time far below the wall time means the forward is bound by launches and host work
(CUDA graphs or torch.compile help), not by the kernels. Writes a Markdown summary with the top operators;
--jsonl also appends the figures as one JSON line (kind: profile; the GPU window's bench.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import autocast, build, sync
from moceir.models.experts import set_expert_bypass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--dispatch", default="auto", choices=["auto", "dense", "sparse"])
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument("--experts", default="run", choices=["run", "skip"], help="skip: every expert bypassed")
    p.add_argument("--out", help="also write the report here (Markdown); it is printed in any case")
    p.add_argument("--jsonl", help="also append the figures and the top operators to these JSON lines")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = False  # no autotuning: the profile should show steady-state kernels
    model = set_expert_bypass(build(a.model, device, a.layout == "channels_last", False, a.dispatch).eval(),
                              a.experts == "skip")
    x = torch.rand(a.batch, 3, a.size, a.size, device=device)

    def forward():
        with torch.no_grad(), autocast(device, a.precision):
            model(x)
        sync(device)

    for _ in range(3):
        forward()
    t0 = time.perf_counter()
    forward()
    wall_ms = 1000 * (time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    lines = [f"# Forward profile: {a.model}, {a.batch}x3x{a.size}x{a.size}, {a.precision}, {a.layout}, "
             f"dispatch {a.dispatch}, experts {a.experts}, {device.type} "
             f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else ''})",
             "", f"- wall time of one forward, unprofiled: {wall_ms:.1f} ms",
             f"- aten operator calls: {ops}"]
    sort_key = "self_cpu_time_total"
    skip = " experts-skip" if a.experts == "skip" else ""
    row = {"kind": "profile", "key": f"profile {a.precision}{skip} {a.size} b{a.batch}", "model": a.model,
           "size": a.size,
           "batch": a.batch, "precision": a.precision, "dispatch": a.dispatch, "experts": a.experts,
           "layout": a.layout,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
           "wall_ms": wall_ms, "aten_ops": ops, "cuda_kernels": None, "device_busy_ms": None, "busy_pct": None}
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_ms = sum(e.device_time for e in kernels) / 1000
        lines += [f"- CUDA kernels launched: {len(kernels)}",
                  f"- device-busy time (sum of kernel times): {busy_ms:.1f} ms, "
                  f"{100 * busy_ms / wall_ms:.0f}% of the wall time"]
        sort_key = "self_device_time_total"
        row.update(cuda_kernels=len(kernels), device_busy_ms=busy_ms, busy_pct=100 * busy_ms / wall_ms)
    if a.jsonl:
        top = sorted(events, key=lambda e: getattr(e, sort_key), reverse=True)[:10]
        row["top_ops"] = [{"op": e.key, "self_ms": getattr(e, sort_key) / 1000, "calls": e.count} for e in top]
        with open(a.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    lines += ["", "```", events.table(sort_by=sort_key, row_limit=25, max_name_column_width=50), "```"]
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""moceir benchmark suite: inference ms/image and training patches/s, peak memory, on CPU and CUDA.

    python benchmarks/bench.py --device cpu  --out docs/bench_cpu.json
    python benchmarks/bench.py --device cuda --out bench_gpu.json

    python benchmarks/bench.py --sizes 256 1024 --modes eager graphs --dispatches dense --skip_train --jsonl bench.jsonl

Prints a Markdown table (also written next to --out). Every row is one configuration measured in this run; a
configuration that cannot run on this device (bf16 or CUDA graphs on the CPU) gets a row saying why.
--jsonl appends each row, as measured, to a JSON-lines file (the GPU window's bench.jsonl).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from common import build, inference_seconds, peak_memory_mb, reset_peak, train_patches_per_second
from moceir.models import fused
from moceir.models.experts import set_expert_bypass

# Issue 14's GPU inference targets, ms per image at batch 1, by image side. Rows record them and, on CUDA, whether
# they were met.
TARGET_MS = {(256, 1): 5.0, (1024, 1): 40.0}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def judged(row: dict, on_cuda: bool) -> dict:
    """An inference ``row`` with the target it is judged against and, on CUDA, whether it met it."""
    target = TARGET_MS.get((row.get("size"), row.get("batch")))
    met = row["ms_per_image"] <= target if on_cuda and target and "ms_per_image" in row else None
    return {**row, "target_ms": target, "met": met}


def _skip_reason(device: torch.device, mode: str, precision: str, dispatch: str = "dense") -> str | None:
    if precision != "fp32" and device.type == "cpu":
        return f"{precision} is not timed on the CPU"
    if mode == "graphs" and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if mode == "graphs" and dispatch not in ("dense", "auto"):
        return "CUDA graphs run the dense dispatch only"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max_pixels", type=float, default=8 * 1024 * 1024, help="skip inference rows above this batch*H*W")
    p.add_argument("--train_batches", type=int, nargs="+", default=[8, 16])
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["eager"],
                   help="eager, compiled (torch.compile) and/or graphs (CUDA graph replay; inference rows only)")
    p.add_argument("--dispatches", nargs="+", default=["auto"], help="expert dispatch: auto, dense and/or sparse")
    p.add_argument("--experts", nargs="+", default=["run"], choices=["run", "skip"],
                   help="skip: every complexity expert bypassed, as `moceir restore --experts skip` (inference rows)")
    p.add_argument("--cpu_fusions", nargs="+", default=["on"], choices=["on", "off"],
                   help="oneDNN-fused CPU inference path (moceir/models/fused.py) on and/or off")
    p.add_argument("--cudnn_benchmark", choices=["on", "off"], default="on",
                   help="cuDNN autotuning (on CUDA); off avoids minutes of tuning on a fresh machine")
    p.add_argument("--layouts", nargs="+", default=["channels_last"], help="channels_last and/or nchw")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train_repeats", type=int, default=5)
    p.add_argument("--train_warmup", type=int, default=3)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--jsonl", help="also append each row to these JSON lines, as measured (kind: inference/train)")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = device.type == "cuda" and a.cudnn_benchmark == "on"
    rows = []

    def record(row: dict) -> None:
        if row["task"] == "inference":
            row = judged(row, device.type == "cuda")
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps({"meta": {"device": _device_name(device), "partial": True}, "rows": rows}))
        if a.jsonl:
            at = f" {row.get('size', row.get('patch'))} b{row['batch']}" if "batch" in row else ""
            skip = " experts-skip" if row.get("experts") == "skip" else ""
            line = {"kind": row["task"], "key": f"{row['task']} {row['mode']} {row['precision']}{skip}{at}",
                    "status": "skipped" if "skipped" in row else "failed" if "error" in row else "ok",
                    "model": a.model, "device": _device_name(device), **row}
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(line) + "\n")

    configs = [(layout, mode, dispatch, precision, experts, fusion) for layout in a.layouts for mode in a.modes
               for dispatch in a.dispatches for precision in a.precisions for experts in a.experts
               for fusion in a.cpu_fusions if not (fusion == "off" and device.type != "cpu")]
    for layout, mode, dispatch, precision, experts, fusion in configs:
        key = {"layout": layout, "mode": mode, "dispatch": dispatch, "precision": precision, "experts": experts}
        if device.type == "cpu":
            key["cpu_fusion"] = fusion
        if why := _skip_reason(device, mode, precision, dispatch):
            record({"task": "inference", **key, "skipped": why})
            continue
        fused.set_enabled(fusion == "on")
        model = set_expert_bypass(build(a.model, device, layout == "channels_last", mode == "compiled", dispatch),
                                  experts == "skip")
        for size in a.sizes:
            for batch in a.batches:
                if batch * size * size > a.max_pixels:
                    continue
                reset_peak(device)
                t0 = time.perf_counter()
                try:
                    sec, diff = inference_seconds(model, device, size, batch, precision,
                                                  warmup=2 if mode == "eager" else 3, repeats=a.repeats,
                                                  cuda_graph=mode == "graphs")
                except Exception as err:  # one failed configuration (e.g. graph capture) must not end the run
                    record({"task": "inference", **key, "size": size, "batch": batch, "error": repr(err)[:300]})
                    continue
                record({"task": "inference", **key, "size": size, "batch": batch, "ms_per_image": 1000 * sec / batch,
                        "images_per_s": batch / sec, "peak_mb": peak_memory_mb(device),
                        "wall_s": time.perf_counter() - t0,
                        **({"max_abs_diff_vs_eager": diff} if diff is not None else {})})
        # training never takes the fused path, and never bypasses the experts
        if a.skip_train or mode == "graphs" or fusion == "off" or experts == "skip":
            continue
        for batch in a.train_batches:
            model = build(a.model, device, layout == "channels_last", mode == "compiled", dispatch)
            reset_peak(device)
            t0 = time.perf_counter()
            rate = train_patches_per_second(model, device, batch, a.patch, precision, warmup=a.train_warmup,
                                            repeats=a.train_repeats)
            record({"task": "train", **key, "patch": a.patch, "batch": batch, "patches_per_s": rate,
                    "peak_mb": peak_memory_mb(device), "wall_s": time.perf_counter() - t0})
        del model
    meta = {"device": _device_name(device), "torch": torch.__version__, "model": a.model,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python benchmarks/bench.py " +
            " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items()
                     if not isinstance(v, bool)) + (" --skip_train" if a.skip_train else "")}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = to_markdown(meta, rows)
    Path(a.out).with_suffix(".md").write_text(md)
    print(md)


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"**{meta['model']} on {meta['device']}**, torch {meta['torch']}, {meta['date']}", "",
             "| task | layout | mode | dispatch | precision | size / patch | batch | result | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = (r["mode"] + (", fusion off" if r.get("cpu_fusion") == "off" else "")
                + (", experts skipped" if r.get("experts") == "skip" else ""))
        head = f"| {r['task']} | {r['layout']} | {mode} | {r.get('dispatch', 'auto')} | {r['precision']} | "
        if "skipped" in r:
            lines.append(f"{head}| | skipped: {r['skipped']} | |")
            continue
        if "error" in r:
            lines.append(f"{head}{r['size']}² | {r['batch']} | failed: {r['error'][:80]} | |")
            continue
        if r["task"] == "inference":
            res = f"{r['ms_per_image']:.1f} ms/image ({r['images_per_s']:.1f} img/s)"
            size = f"{r['size']}²"
        else:
            res = f"{r['patches_per_s']:.1f} patches/s"
            size = f"{r['patch']}²"
        lines.append(f"{head}{size} | {r['batch']} | {res} | {r['peak_mb']:.0f} MB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

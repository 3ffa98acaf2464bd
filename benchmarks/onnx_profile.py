"""Where ONNX Runtime spends its time on a moceir ONNX file: total per operator type, from ORT's own profiler.

    python -m moceir export default /tmp/moce_ir_s.onnx
    python benchmarks/onnx_profile.py /tmp/moce_ir_s.onnx --size 256 --threads 1 --runs 3

Prints a markdown table of the operator types by total time over ``--runs`` forwards (after one warm-up) and the
share of each. Compare with PyTorch's profile in benchmarks/profile_forward.py.
"""

import argparse
import json
import os
import tempfile
from collections import defaultdict

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("onnx")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--opt_level", default="all", choices=["all", "extended", "basic"],
                   help="ORT graph optimisation level (extended: no NCHWc layout transformation)")
    a = p.parse_args()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{a.opt_level.upper()}")
    opts.log_severity_level = 3  # the conditional graph's unused branch initializers are noted at warning level
    opts.intra_op_num_threads, opts.inter_op_num_threads = a.threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(a.onnx, opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((1, 3, a.size, a.size), dtype=np.float32)
        name = session.get_inputs()[0].name
        session.run(None, {name: x})  # warm-up, excluded below
        for _ in range(a.runs):
            session.run(None, {name: x})
        events = json.load(open(session.end_profiling()))
    runs = [e for e in events if e.get("name") == "model_run"]
    per_op, count = defaultdict(float), defaultdict(int)
    start = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up's nodes
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"] / 1e3
            count[op] += 1
    total = sum(per_op.values())
    wall = sum(r["dur"] for r in runs[1:]) / 1e3
    print(f"{a.onnx}, {a.size}x{a.size}, {a.threads} thread(s), optimisation {a.opt_level}, {a.runs} runs: {wall / a.runs:.0f} ms per run, "
          f"{total / a.runs:.0f} ms in kernels")
    print("| operator | ms per run | share | calls per run |")
    print("|---|---|---|---|")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"| {op} | {ms / a.runs:.1f} | {100 * ms / total:.1f}% | {count[op] // a.runs} |")


if __name__ == "__main__":
    main()

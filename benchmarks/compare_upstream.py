"""Side-by-side CPU/GPU timing of upstream's MoCEIR and ours, same weights, same input, one process.

Upstream's code is not part of this repository: pass the `src` folder of a checkout of eduardzamfir/MoCE-IR.

    git clone https://github.com/eduardzamfir/MoCE-IR /tmp/MoCE-IR
    python benchmarks/compare_upstream.py --upstream_src /tmp/MoCE-IR/src --size 256

Upstream's router adds noise even in eval; its noise is set to 0 here so that both networks route alike and
their outputs can be compared.
"""

import argparse
import importlib
import sys
import types

import torch

import moceir
from common import timeit
from moceir.models import fused
from moceir.runtime import tune_cpu_allocator


def load_upstream(src: str, cfg):
    sys.path.insert(0, src)
    # upstream imports fvcore at module level only for its __main__ demo
    fv = types.ModuleType("fvcore")
    fv.nn = types.SimpleNamespace(FlopCountAnalysis=None, flop_count_table=None)
    sys.modules.setdefault("fvcore", fv)
    sys.modules.setdefault("fvcore.nn", fv.nn)
    mod = importlib.import_module("net.moce_ir")
    net = mod.MoCEIR(dim=cfg.dim, num_blocks=list(cfg.num_blocks), num_dec_blocks=list(cfg.num_dec_blocks),
                     levels=cfg.levels, heads=list(cfg.heads), num_refinement_blocks=cfg.num_refinement_blocks,
                     topk=cfg.topk, num_experts=cfg.num_exp_blocks, rank=cfg.latent_dim,
                     with_complexity=cfg.with_complexity, depth_type=cfg.depth_type,
                     stage_depth=list(cfg.stage_depth), rank_type=cfg.rank_type,
                     complexity_scale=cfg.complexity_scale)
    for m in net.modules():
        if hasattr(m, "noise_std"):
            m.noise_std = 0.0
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream_src", required=True)
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    device = torch.device(a.device)
    ours = moceir.create_model(a.model).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in ours.parameters():
            prm.mul_(0).add_(torch.randn_like(prm) * 0.05)
    up = load_upstream(a.upstream_src, ours.config).eval()
    up.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(1, 3, a.size, a.size, device=device)
    rows = {}
    variants = {
        "upstream (NCHW)": (up.to(device), x),
        "upstream + channels_last": None,
        "moceir (NCHW)": (ours.to(device), x),
        "moceir + channels_last, CPU fusion off": None,
        "moceir + channels_last": None,  # what the moceir command runs (CPU fusion on where it applies)
    }
    outs = {}
    for name in list(variants):
        if variants[name] is None:
            base = up if name.startswith("upstream") else ours
            model = base.to(memory_format=torch.channels_last)
            variants[name] = (model, x.contiguous(memory_format=torch.channels_last))
        model, inp = variants[name]
        fused.set_enabled("fusion off" not in name)
        with torch.no_grad():
            outs[name] = model(inp).float()
            rows[name] = timeit(lambda: model(inp), device, warmup=1, repeats=a.repeats)
        fused.set_enabled(True)
        if name.startswith("upstream"):  # restore NCHW for the next variant's own conversion
            up.to(memory_format=torch.contiguous_format)
        else:
            ours.to(memory_format=torch.contiguous_format)
    ref = rows["upstream (NCHW)"]
    threads = torch.get_num_threads() if device.type == "cpu" else torch.cuda.get_device_name(device)
    tuned = tune_cpu_allocator()  # already applied by `common`; True unless MOCEIR_NO_ALLOCATOR_TUNING=1
    print(f"{a.model} inference, batch 1, {a.size}x{a.size}, fp32, {device.type} ({threads}); median of {a.repeats}; "
          f"glibc allocator tuning {'on' if tuned else 'off'} for both")
    print("| variant | seconds | speed-up vs upstream | max abs diff vs upstream |\n|---|---|---|---|")
    for name, sec in rows.items():
        diff = (outs[name] - outs["upstream (NCHW)"]).abs().max().item()
        print(f"| {name} | {sec:.3f} | {ref / sec:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()

"""Does a fast training path train like its reference? Same weights, same batches, same router noise.

    python benchmarks/precision_check.py --device cuda --steps 80      # bf16 autocast against fp32: loss curves

`compare_losses` is also the check that `train_throughput.py --matrix` applies to every fast configuration (bf16,
torch.compile, fused AdamW, the matmul FFT): the loss of the first batch (same weights, nothing stepped yet) and the
losses of the next few optimizer steps must agree with the reference's within a relative tolerance.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import moceir
from common import autocast
from moceir.losses import restoration_loss

# (first batch, later steps) relative loss tolerances. bf16 keeps 8 mantissa bits; later steps also carry AdamW's
# sign-like first updates of weights whose gradients are near zero, so they may drift further than the first loss.
TOLERANCES = {"fp32": (2e-3, 5e-2), "bf16": (2e-2, 5e-2)}


def fixed_batches(n: int, batch: int, patch: int, device: torch.device, channels_last: bool = True,
                  seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (lq, gt) pairs, each [batch, 3, patch, patch]: gt uniform, lq = gt + σ=25 noise, clamped to [0, 1].

    Drawn from a seeded CPU generator, so every process and device sees the same batches.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for _ in range(n):
        gt = torch.rand(batch, 3, patch, patch, generator=gen)
        lq = (gt + 25 / 255 * torch.randn(gt.shape, generator=gen)).clamp(0, 1)
        out.append(tuple(t.to(device).contiguous(memory_format=layout) for t in (lq, gt)))
    return out


def compare_losses(reference: list[float], fast: list[float], precision: str) -> dict:
    """The check of ``fast`` against ``reference`` (losses of the same steps) at the tolerances of ``precision``."""
    first_tol, steps_tol = TOLERANCES[precision]
    rel = [abs(f - r) / max(abs(r), 1e-8) for r, f in zip(reference, fast)]
    finite = all(math.isfinite(x) for x in fast + reference)
    first, later = (rel[0] if rel else math.inf), max(rel[1:], default=0.0)
    return {"reference_losses": reference, "losses": fast, "first_rel_diff": first, "steps_max_rel_diff": later,
            "first_tol": first_tol, "steps_tol": steps_tol,
            "passed": bool(finite and first <= first_tol and later <= steps_tol)}


def run(precision: str, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Losses of ``args.steps`` AdamW steps of a fresh model (seed 0) on fixed batches under ``precision``."""
    torch.manual_seed(0)
    model = moceir.create_model(args.model).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    losses = []
    for i, (lq, gt) in enumerate(fixed_batches(args.steps, args.batch, args.patch, device)):
        torch.manual_seed(i)  # same router noise in both runs
        with autocast(device, precision):
            out = model(lq)
            loss = restoration_loss(out.image, gt, out.balance_loss, "fft")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(x) for x in losses]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--out", default="precision_check.json")
    a = p.parse_args()
    device = torch.device(a.device)
    curves = {prec: run(prec, a, device) for prec in ("fp32", "bf16")}
    k = max(1, a.steps // 8)
    for prec, c in curves.items():
        print(prec, " ".join(f"{sum(c[i:i + k]) / len(c[i:i + k]):.4f}" for i in range(0, len(c), k)))
    last = {prec: sum(c[-k:]) / k for prec, c in curves.items()}
    print(f"mean loss over the last {k} steps: fp32 {last['fp32']:.4f}, bf16 {last['bf16']:.4f}")
    check = compare_losses(curves["fp32"][:3], curves["bf16"][:3], "bf16")
    print(f"first 3 steps, bf16 against fp32: {'passed' if check['passed'] else 'FAILED'} "
          f"(first loss {check['first_rel_diff']:.1e}, later {check['steps_max_rel_diff']:.1e} relative)")
    with open(a.out, "w") as f:
        json.dump({**curves, "check_first_3_steps": check}, f)


if __name__ == "__main__":
    main()

"""Does bf16 autocast train like fp32? Same init, same batches, N steps each; prints both loss curves.

    python benchmarks/precision_check.py --device cuda --steps 80
"""

import argparse
import json

import torch

import moceir
from common import autocast
from moceir.losses import restoration_loss


def run(precision: str, args, device) -> list[float]:
    torch.manual_seed(0)
    model = moceir.create_model(args.model).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    gen = torch.Generator(device="cpu").manual_seed(1)
    losses = []
    for _ in range(args.steps):
        gt = torch.rand(args.batch, 3, args.patch, args.patch, generator=gen).to(device)
        lq = (gt + 25 / 255 * torch.randn(gt.shape, generator=gen).to(device)).clamp(0, 1)
        torch.manual_seed(len(losses))  # same router noise in both runs
        with autocast(device, precision):
            out = model(lq.contiguous(memory_format=torch.channels_last))
            loss = restoration_loss(out.image, gt, out.balance_loss, "fft")["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


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
    with open(a.out, "w") as f:
        json.dump(curves, f)


if __name__ == "__main__":
    main()

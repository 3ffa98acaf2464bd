"""Training throughput (patches/s) of a preset at a batch and patch size on the available device.

    python benchmarks/train_throughput.py --model MoCE_IR_S --batch_size 2 --patch_size 128
"""

import argparse

import torch

from common import build, train_patches_per_second


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MoCE_IR_S")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--patch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = build(a.model, device, a.channels_last, a.compile)
    rate = train_patches_per_second(model, device, a.batch_size, a.patch_size, a.precision, a.warmup, a.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"{a.model} train batch {a.batch_size} patch {a.patch_size} {a.precision} "
          f"{'channels_last ' if a.channels_last else ''}{'compiled ' if a.compile else ''}on {name}: "
          f"{rate:.2f} patches/s ({a.batch_size / rate:.3f} s/step)")


if __name__ == "__main__":
    main()

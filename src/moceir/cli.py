"""The ``moceir`` command: info, train, test, restore, routing, plot-logs. argparse lives here only."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

from .data.datasets import BENCHMARKS, DEHAZE_SOURCES, TASKS, TRAINSETS
from .losses import LOSS_TYPES
from .models.config import COMPLEXITY_SCALES, PRESETS, RANK_TYPES


def _positive(kind=int):
    def parse(v: str):
        x = kind(v)
        if x <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
        return x
    return parse


def _non_negative(v: str) -> int:
    x = int(v)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _patch(v: str) -> int:
    x = int(v)
    if x <= 0 or x % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {v}")
    return x


def _repeat(v: str) -> tuple[str, int]:
    task, _, n = v.partition("=")
    if task not in (*TASKS, "cdd11") or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected TASK=N with TASK in {', '.join(TASKS)}, cdd11; got {v!r}")
    return task, int(n)


def _add_arch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture (default: the --model preset)")
    g.add_argument("--dim", type=_positive())
    g.add_argument("--num_blocks", nargs="+", type=_non_negative)
    g.add_argument("--num_dec_blocks", nargs="+", type=_positive())
    g.add_argument("--latent_dim", type=_positive())
    g.add_argument("--num_exp_blocks", type=_positive())
    g.add_argument("--num_refinement_blocks", type=_non_negative)
    g.add_argument("--heads", nargs="+", type=_positive())
    g.add_argument("--stage_depth", nargs="+", type=_positive())
    g.add_argument("--with_complexity", action=argparse.BooleanOptionalAction, default=None,
                   help="complexity-biased balance loss (default on: the paper's method; --no-with_complexity to drop)")
    g.add_argument("--complexity_scale", choices=COMPLEXITY_SCALES)
    g.add_argument("--rank_type", choices=RANK_TYPES)
    g.add_argument("--depth_type")
    g.add_argument("--topk", type=_positive())


ARCH_FIELDS = ("dim", "num_blocks", "num_dec_blocks", "latent_dim", "num_exp_blocks", "num_refinement_blocks",
               "heads", "stage_depth", "with_complexity", "complexity_scale", "rank_type", "depth_type", "topk")


def _config_from_args(args: argparse.Namespace):
    from .models import get_config

    overrides = {k: getattr(args, k) for k in ARCH_FIELDS if getattr(args, k, None) is not None}
    return get_config(args.model, **overrides)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


def _dtype(name: str):
    """torch dtype for "fp16" / "bf16"; None for "fp32" (keep float32)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _checkpoint_note(path: str) -> str:
    """The 'note' a bundled/safetensors checkpoint carries (e.g. that it is a small CPU-trained model)."""
    from .models.checkpoints import resolve_path

    p = resolve_path(path)
    if p.suffix != ".safetensors":
        return ""
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        return (f.metadata() or {}).get("note", "")


# ---------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import load_model
    from .flops import expert_flops_per_pixel, moe_layer_scales, network_flops
    from .models import create_model

    model = create_model(args.target) if args.target in PRESETS else load_model(args.target)
    cfg = model.config
    print(f"model: {args.target}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:24s} {v}")
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n:,}")
    size = args.size
    per_pixel = expert_flops_per_pixel(model)
    scales = torch.tensor(moe_layer_scales(model), dtype=torch.float64)
    per_expert = (per_pixel * (size * size / scales**2)[:, None]).sum(0)
    print(f"FLOPs at {size}x{size} (2 x MACs; FFTs not counted):")
    for i, f in enumerate(per_expert.tolist()):
        print(f"  expert {i} (rank C/{2 ** (cfg.num_exp_blocks - 1 - i)}, patch {cfg.expert_patch_sizes()[i]}): "
              f"{f / 1e9:.2f} GFLOPs over its {model.num_moe_layers} MoE layers")
    lo, hi = network_flops(model, size, 0), network_flops(model, size, cfg.num_exp_blocks - 1)
    print(f"  total: {lo / 1e9:.2f} GFLOPs (expert 0 everywhere) .. {hi / 1e9:.2f} GFLOPs (expert "
          f"{cfg.num_exp_blocks - 1} everywhere)")
    return 0


# ---------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainSettings, train

    if args.trainset == "standard" and not args.de_type:
        raise SystemExit("error: --de_type is required with --trainset standard (e.g. denoise_15 derain dehaze)")
    if args.batch_size < args.accum_grad:
        raise SystemExit(f"error: --batch_size {args.batch_size} is below --accum_grad {args.accum_grad}: "
                         "each step takes batch_size // accum_grad images (as upstream)")
    data_dir = Path(args.data_file_dir)
    if not data_dir.is_dir():
        raise SystemExit(f"error: --data_file_dir {data_dir} does not exist; point it at the folder holding "
                         "denoising/, deraining/, dehazing/ ... (upstream layout, see README)")
    config = _config_from_args(args)
    settings = TrainSettings(
        de_type=tuple(args.de_type or ()), trainset=args.trainset, data_file_dir=str(data_dir),
        dehaze_source=args.dehaze_source, repeats=dict(args.repeat or []), holdout_val=args.holdout_val,
        epochs=args.epochs, max_steps=args.max_steps, max_time=args.max_time, batch_size=args.batch_size,
        accum_grad=args.accum_grad, patch_size=args.patch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
        schedule_epochs=args.schedule_epochs, loss_type=args.loss_type, fft_loss_weight=args.fft_loss_weight,
        balance_loss_weight=args.balance_loss_weight, num_workers=args.num_workers, num_gpus=args.num_gpus,
        num_cpu_processes=args.num_cpu_processes, precision=args.precision, compile=args.compile,
        dispatch=args.dispatch, channels_last=args.channels_last, seed=args.seed, ckpt_dir=args.ckpt_dir, run_name=args.run_name,
        save_every_n_epochs=args.save_every_n_epochs, resume_from=args.resume_from,
        fine_tune_from=args.fine_tune_from, log_every_n_steps=args.log_every_n_steps)
    run_dir = train(config, settings)
    print(f"done: {run_dir} (last.ckpt, model.safetensors, training_curves.png, logs/)")
    return 0


# ---------------------------------------------------------------------------------------------------- test
def _load_for_eval(args: argparse.Namespace):
    from . import load_model
    from .training import resolve_checkpoint

    if args.ckpt:
        path = args.ckpt
    elif args.checkpoint_id:
        path = str(resolve_checkpoint(args.checkpoint_id, args.ckpt_dir))
    else:
        path = "default"
    config = _config_from_args(args) if args.model else None
    device = _device(args.device)
    model = load_model(path, device=device, config=config, channels_last=True)
    note = _checkpoint_note(path)
    if note:
        print(f"model note: {note}")
    return model, device, path


def _cdd11_subset(args: argparse.Namespace) -> str:
    if "cdd11" not in args.benchmarks:
        return "all"
    if not args.trainset.startswith("CDD11_"):
        raise SystemExit("error: --benchmarks cdd11 needs --trainset CDD11_<all|single|double|triple|folder>")
    return args.trainset.split("_", 1)[1]


def cmd_test(args: argparse.Namespace) -> int:
    from .data.datasets import DatasetLayoutError
    from .evaluation import evaluate_benchmark, markdown_table, write_reports

    model, device, path = _load_for_eval(args)
    subset = _cdd11_subset(args)
    out_dir = Path(args.output_path)
    results, failed = [], False
    for bench in args.benchmarks:
        save_dir = out_dir / "images" / bench if args.save_results else None
        try:
            results.append(evaluate_benchmark(model, args.data_file_dir, bench, device, args.y_channel, save_dir,
                                              subset))
        except (DatasetLayoutError, ValueError) as e:
            print(f"error: {bench}: {e}", file=sys.stderr)
            failed = True
    if results:
        title = f"moceir test: {path}"
        print(markdown_table(results, title))
        paths = write_reports(results, out_dir, title)
        print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']}")
    return 1 if failed or not results else 0


# ---------------------------------------------------------------------------------------------------- routing
def cmd_routing(args: argparse.Namespace) -> int:
    from .evaluation import BenchmarkResult, evaluate_benchmark, routing_counts, routing_flops
    from .plots import plot_routing_heatmap

    model, device, path = _load_for_eval(args)
    if args.from_results:  # reuse the per-image experts that `moceir test` recorded with this checkpoint
        saved = json.loads(Path(args.from_results).read_text())["per_image"]
        results = [BenchmarkResult(b, saved[b]) for b in args.benchmarks if b in saved]
        missing = [b for b in args.benchmarks if b not in saved]
        if missing:
            raise SystemExit(f"error: {args.from_results} has no results for {missing}")
    else:
        subset = _cdd11_subset(args)
        results = [evaluate_benchmark(model, args.data_file_dir, b, device, cdd11_subset=subset)
                   for b in args.benchmarks]
    counts = routing_counts(results, model.num_moe_layers, model.config.num_exp_blocks)
    out = Path(args.output_path)
    out.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in results]
    png = plot_routing_heatmap(counts, names, out / "routing_heatmap.png",
                               f"experts picked per task and MoE layer ({Path(path).name})")
    flops = routing_flops(model, results)
    lines = ["| benchmark | " + " | ".join(f"L{i}" for i in range(counts.shape[1])) + " |",
             "|---|" + "---|" * counts.shape[1]]
    for name, c in zip(names, counts):
        lines.append(f"| {name} | " + " | ".join("/".join(str(v) for v in layer) for layer in c) + " |")
    lines += ["", "Each cell: images per expert E0/E1/E2/E3 in that MoE layer.", "",
              "| benchmark | expert GFLOPs spent / image | all experts / image | share |", "|---|---|---|---|"]
    lines += [f"| {f['benchmark']} | {f['expert_gflops_spent']:.2f} | {f['expert_gflops_all']:.2f} | "
              f"{100 * f['share']:.1f}% |" for f in flops]
    table = "\n".join(lines) + "\n"
    (out / "routing.md").write_text(table)
    (out / "routing.json").write_text(json.dumps({"benchmarks": names, "counts": counts.tolist(), "flops": flops},
                                                 indent=1))
    print(table)
    print(f"wrote {png}, {out / 'routing.md'}, {out / 'routing.json'}")
    return 0


# ---------------------------------------------------------------------------------------------------- restore
def _gather_inputs(specs: list[str]) -> tuple[list[Path], list[str]]:
    from .io import list_images

    files, errors = [], []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = list_images(p)
            if not found:
                errors.append(f"{p}: folder has no images (png, jpg, bmp, tif, webp); nothing to restore there")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec) if Path(m).is_file())
            if not matches:
                errors.append(f"{spec}: no such file, folder or matching glob")
            files += matches
    unique = list(dict.fromkeys(f.resolve() for f in files))
    return unique, errors


def _memory_budget(device) -> float:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return 0.25 * info.get("MemAvailable", info["MemTotal"])
    except OSError:
        return 4e9


def cmd_restore(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from . import load_model
    from .inference import auto_tile, restore_tensor
    from .io import ImageReadError, load_image, save_image
    from .models.checkpoints import CheckpointError

    device = _device(args.device)
    if args.precision != "fp32" and device.type != "cuda":
        raise SystemExit(f"error: --precision {args.precision} needs a CUDA device; use fp32 on {device.type}")
    try:
        model = load_model(args.checkpoint, device=device, channels_last=True)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = _checkpoint_note(args.checkpoint)
    if note:
        print(f"model: {note}")
    files, errors = _gather_inputs(args.inputs)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = set(files)
    dtype = _dtype(args.precision)
    budget = _memory_budget(device)
    report: list[dict] = []
    failed: list[str] = list(errors)

    def fail(path: Path, e: BaseException) -> None:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "out of memory" in msg.lower() or isinstance(e, MemoryError):
            msg = "out of memory; retry with --tile 256 (or smaller) and --batch_size 1"
        line = msg if str(path) in msg else f"{path}: {msg}"
        failed.append(line)
        print(f"error: {line}", file=sys.stderr)

    def run(batch: list[tuple]) -> None:
        """Restore same-size images together (a tiled image always alone) and write each atomically."""
        tile = batch[0][3]
        try:
            x = torch.from_numpy(np.stack([img.rgb.transpose(2, 0, 1) for _, _, img, _ in batch])).to(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                y, experts = restore_tensor(model, x, tile, args.tile_overlap, args.tile_routing, return_experts=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / len(batch)
            y = y.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        except (RuntimeError, MemoryError) as e:
            for path, *_ in batch:
                fail(path, e)
            return
        for i, (path, target, img, _) in enumerate(batch):
            try:
                tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
                save_image(tmp, y[i], img.alpha, img.bit_depth, img.grayscale)
                os.replace(tmp, target)
            except (OSError, ValueError) as e:
                fail(path, e)
                continue
            report.append({"input": str(path), "output": str(target), "size": list(img.rgb.shape[:2]),
                           "seconds": round(seconds, 3), "batch": len(batch), "tile": tile,
                           "experts": experts[:, min(i, experts.shape[1] - 1), 0].tolist()})

    pending: list[tuple] = []
    with tqdm(total=len(files), desc="restoring", unit="img", disable=args.quiet) as bar:
        for path in files:
            ext = ("." + args.ext.lstrip(".")) if args.ext else path.suffix
            target = (out_dir / f"{path.stem}{args.suffix}{ext}").resolve()
            try:
                if target in inputs:
                    raise ValueError(f"output {target} would overwrite an input; choose another -o or --suffix")
                if target.exists() and not args.overwrite:
                    raise ValueError(f"output {target} exists; pass --overwrite to replace it")
                img = load_image(path)
            except (ImageReadError, ValueError, OSError) as e:
                fail(path, e)
                bar.update(1)
                continue
            h, w = img.rgb.shape[:2]
            item = (path, target, img, args.tile or auto_tile(model, h, w, budget))
            if pending and (item[3] is not None or pending[0][3] is not None or len(pending) >= args.batch_size
                            or pending[0][2].rgb.shape != img.rgb.shape):
                run(pending)
                bar.update(len(pending))
                pending = []
            pending.append(item)
        if pending:
            run(pending)
            bar.update(len(pending))
    if args.report:
        Path(args.report).write_text(json.dumps({"checkpoint": args.checkpoint, "images": report,
                                                 "errors": failed}, indent=1))
    print(f"restored {len(report)} image(s) into {out_dir}; {len(failed)} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- plot-logs
def cmd_plot_logs(args: argparse.Namespace) -> int:
    from .plots import plot_training_logs

    try:
        print(plot_training_logs(args.run_dir, args.out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import load_model, save_model
    from .models.checkpoints import CheckpointError

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; choose another name or pass --overwrite", file=sys.stderr)
        return 1
    try:
        model = load_model(args.checkpoint, device="cpu")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as restore: the checkpoint itself is unusable
    path = save_model(model, out, dtype=_dtype(args.dtype), note=args.note)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype}, config embedded)")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list(PRESETS), help="preset; optional when the checkpoint describes itself")
    p.add_argument("--ckpt", help="checkpoint path (any format moceir.load_model reads)")
    p.add_argument("--checkpoint_id", help="run name under --ckpt_dir (uses its last.ckpt)")
    p.add_argument("--ckpt_dir", default="checkpoints")
    p.add_argument("--benchmarks", nargs="+", required=True, choices=BENCHMARKS)
    p.add_argument("--trainset", default="standard", help="CDD11_<subset> selects the cdd11 test subset")
    p.add_argument("--de_type", nargs="*", help="accepted for upstream compatibility; not needed")
    p.add_argument("--data_file_dir", default="datasets")
    p.add_argument("--output_path", default="output/")
    p.add_argument("--device", default="auto")
    _add_arch_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moceir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="configuration, parameter count and FLOPs of a preset or checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint path")
    p.add_argument("--size", type=_patch, default=256)
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("train", help="train with PyTorch Lightning (upstream's flags)")
    p.add_argument("--model", choices=list(PRESETS), default="MoCE_IR_S")
    p.add_argument("--epochs", type=_positive(), default=120)
    p.add_argument("--max_steps", type=int, default=-1, help="stop after N optimizer steps (the LR schedule spans them)")
    p.add_argument("--max_time", help="wall-clock limit DD:HH:MM:SS")
    p.add_argument("--batch_size", type=_positive(), default=8, help="per device (with --accum_grad a: batch_size//a per step, as upstream)")
    p.add_argument("--lr", type=_positive(float), default=2e-4)
    p.add_argument("--warmup_epochs", type=float, default=15)
    p.add_argument("--schedule_epochs", type=_positive(float), default=150)
    p.add_argument("--de_type", nargs="+", choices=TASKS)
    p.add_argument("--trainset", choices=TRAINSETS, default="standard")
    p.add_argument("--dehaze_source", choices=DEHAZE_SOURCES, default="reside",
                   help="synthetic: haze made on the clean BSD images (RESIDE OTS substitute)")
    p.add_argument("--repeat", type=_repeat, action="append", help="override a task's repeat factor, e.g. derain=20")
    p.add_argument("--holdout_val", action="store_true", help="keep the RainTrainL validation split (ids %% 10 == 0) out")
    p.add_argument("--loss_type", type=str.lower, choices=LOSS_TYPES, default="l1", help="L1 or FFT (case-insensitive)")
    p.add_argument("--fft_loss_weight", type=float, default=0.1)
    p.add_argument("--balance_loss_weight", type=float, default=0.01)
    p.add_argument("--patch_size", type=_patch, default=128)
    p.add_argument("--num_workers", type=_non_negative, default=4)
    p.add_argument("--accum_grad", type=_positive(), default=1)
    p.add_argument("--resume_from", help="run name under --ckpt_dir or a checkpoint path: restores optimizer and step")
    p.add_argument("--fine_tune_from", help="any checkpoint moceir.load_model reads: weights only, fresh optimizer")
    p.add_argument("--data_file_dir", default="datasets")
    p.add_argument("--ckpt_dir", default="checkpoints")
    p.add_argument("--run_name")
    p.add_argument("--num_gpus", "--gpus", type=_non_negative, default=None, help="0: CPU (default: 1 if CUDA)")
    p.add_argument("--num_cpu_processes", type=_positive(), default=1, help="CPU DDP (gloo) processes")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--dispatch", choices=["auto", "dense", "sparse"], default="auto")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save_every_n_epochs", type=_positive(), default=5)
    p.add_argument("--log_every_n_steps", type=_positive(), default=10)
    _add_arch_flags(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("test", help="PSNR/SSIM on the benchmarks (upstream's protocol)")
    _add_eval_flags(p)
    p.add_argument("--save_results", action="store_true", help="write the restored PNGs")
    p.add_argument("--y_channel", action="store_true", help="also report PSNR/SSIM on the Y channel")
    p.set_defaults(fn=cmd_test)

    p = sub.add_parser("routing", help="which expert each task picks per MoE layer: heatmap, table, FLOPs")
    _add_eval_flags(p)
    p.add_argument("--from_results", help="results.json of `moceir test` with the same checkpoint: no re-run")
    p.set_defaults(fn=cmd_routing, output_path="docs/routing")

    p = sub.add_parser("restore", help="restore images (files, folders, globs) with the bundled or a given model")
    p.add_argument("inputs", nargs="+")
    p.add_argument("-o", "--output", default="restored")
    p.add_argument("--checkpoint", default="default")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch_size", type=_positive(), default=4, help="same-size images restored together")
    p.add_argument("--tile", type=_patch, help="tile size (default: automatic when the image would not fit)")
    p.add_argument("--tile_overlap", type=_non_negative, default=32)
    p.add_argument("--tile_routing", choices=["tile", "global"], default="tile",
                   help="tile: each tile picks its experts; global: one decision from a downscaled pass")
    p.add_argument("--ext", help="output format, e.g. png (default: the input's)")
    p.add_argument("--suffix", default="", help="appended to output names")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (never inputs)")
    p.add_argument("--report", help="write a JSON report: size, time and experts per image")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_restore)

    p = sub.add_parser("export", help="write any checkpoint as self-describing safetensors (e.g. fp16 to ship)")
    p.add_argument("checkpoint", help="any checkpoint moceir.load_model reads (upstream last.ckpt included)")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--note", help="text stored in the file and printed when the model is used")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("plot-logs", help="PNG plots of loss, balance loss and LR of a training run")
    p.add_argument("run_dir")
    p.add_argument("--out")
    p.set_defaults(fn=cmd_plot_logs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .runtime import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    return int(args.fn(args) or 0)

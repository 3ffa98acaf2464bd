"""The ``moceir`` command and its subcommands; argparse lives here only."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from .data.datasets import BENCHMARKS, DEHAZE_SOURCES, TASKS, TRAINSETS
from .losses import LOSS_TYPES
from .models.config import COMPLEXITY_SCALES, FFT_IMPLS, PRESETS, RANK_TYPES
from .onnx import EXPORT_DISPATCHES, onnx_name_problem
from .runtime import COMPILE_MODES, COMPILE_SCOPES, Terminated, is_rank_zero


def _number(kind, v: str):
    try:
        x = kind(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole' if kind is int else 'a'} number, got {v!r}") from None
    if kind is float and not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {v}")
    return x


def _positive(kind=int):
    def parse(v: str):
        x = _number(kind, v)
        if x <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
        return x
    return parse


def _max_steps(v: str) -> int:
    x = _number(int, v)
    if x == 0:
        raise argparse.ArgumentTypeError("must be > 0, or -1 for no limit, got 0 (0 would train nothing)")
    if x < -1:
        raise argparse.ArgumentTypeError(f"must be > 0, or -1 for no limit, got {v}")
    return x


MAX_DAYS = 99_999  # --max_time
MAX_REPEAT = 10_000  # --repeat TASK=N: N copies of the task's pairs are listed in memory


def _duration(v: str) -> str:
    """DD:HH:MM:SS, as Lightning's Timer reads it, and longer than zero."""
    import re

    parts = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", v, re.ASCII)  # Lightning's Timer refuses 0:1:30:0
    if parts is None:
        raise argparse.ArgumentTypeError(f"expected DD:HH:MM:SS with two-digit hours, minutes and seconds (e.g. "
                                         f"00:01:30:00), got {v!r}")
    if not any(int(p) for p in parts.groups()):
        raise argparse.ArgumentTypeError(f"must be longer than zero, got {v} (it would train nothing)")
    if int(parts.group(1)) > MAX_DAYS:  # Python's timedelta, which Lightning makes of it, overflows
        raise argparse.ArgumentTypeError(f"at most {MAX_DAYS} days, got {v}")
    return v


def _finite(v: str) -> float:
    return _number(float, v)


def _non_negative_float(v: str) -> float:
    x = _number(float, v)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _non_negative(v: str) -> int:
    x = _number(int, v)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return x


def _bytes(v: str) -> float:
    """'4GB', '512MB', '2.5GiB' or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = v.strip().upper()
    num = text.rstrip("KMGTIB")
    unit = text[len(num):]
    try:
        x = float(num) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 4GB or 512MB, got {v!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {v!r}")
    return x


def _patch(v: str) -> int:
    x = _number(int, v)
    if x <= 0 or x % 8 or x > 2**16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, at most {2**16}, got {v}")
    return x


def _port(v: str) -> int:
    x = _number(int, v)
    if not 1 <= x <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {v}")
    return x


def _path(v: str, advice: str = "give a path or leave the flag out") -> str:
    """A path or name that is not empty: an unset shell variable (`--resume_from "$RUN"`) silently meant "none"."""
    if not v:
        raise argparse.ArgumentTypeError(f"is empty (an unset shell variable?); {advice}")
    return v


def _given_path(v: str) -> str:
    """:func:`_path` of an argument that must be there (a positional one)."""
    return _path(v, "give a path")


def _text(v: str) -> str:
    """Text stored in a file as UTF-8: bytes that are not UTF-8 (a shell's $'\\xff') failed at the end of an export."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("holds bytes that are not UTF-8 text; give the note as UTF-8") from None
    return v


def _repeat(v: str) -> tuple[str, int]:
    task, _, n = v.partition("=")
    if task not in (*TASKS, "cdd11") or not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected TASK=N with TASK in {', '.join(TASKS)}, cdd11; got {v!r}")
    if int(n) > MAX_REPEAT:  # 1e9 ran out of memory listing the pairs; 1e20 overflowed
        raise argparse.ArgumentTypeError(f"N is at most {MAX_REPEAT} (upstream repeats a task up to 120 times), "
                                         f"got {v!r}")
    return task, int(n)


def _add_arch_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture (default: the --model preset, or what the checkpoint describes)")
    g.add_argument("--dim", type=_positive(), help="width of the first level")
    g.add_argument("--num_blocks", nargs="+", type=_non_negative, help="encoder blocks per level, then latent blocks")
    g.add_argument("--num_dec_blocks", nargs="+", type=_positive(), help="decoder blocks per level, shallowest first")
    g.add_argument("--latent_dim", type=_positive(), help="expert rank for the non-spread rank types")
    g.add_argument("--num_exp_blocks", type=_positive(), help="complexity experts per MoE layer")
    g.add_argument("--num_refinement_blocks", type=_non_negative, help="refinement blocks after the decoder")
    g.add_argument("--heads", nargs="+", type=_positive(), help="attention heads per level")
    g.add_argument("--stage_depth", nargs="+", type=_positive(), help="kept for upstream compatibility")
    g.add_argument("--with_complexity", action=argparse.BooleanOptionalAction, default=None,
                   help="complexity-biased balance loss (on unless --no-with_complexity: the paper's method)")
    g.add_argument("--complexity_scale", choices=COMPLEXITY_SCALES, help="how expert complexity is normalised")
    g.add_argument("--rank_type", choices=RANK_TYPES, help="rule for the experts' ranks")
    g.add_argument("--depth_type", help="kept for upstream compatibility (depth never changes the output)")
    g.add_argument("--topk", type=_positive(), help="experts chosen per image and MoE layer")


ARCH_FIELDS = ("dim", "num_blocks", "num_dec_blocks", "latent_dim", "num_exp_blocks", "num_refinement_blocks",
               "heads", "stage_depth", "with_complexity", "complexity_scale", "rank_type", "depth_type", "topk")


def _given_arch_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The architecture flags given on the command line (ARCH_FIELDS not left at None), in ARCH_FIELDS order."""
    return {k: getattr(args, k) for k in ARCH_FIELDS if getattr(args, k, None) is not None}


def _config_from_args(args: argparse.Namespace):
    from .models import get_config

    from .pipeline import UsageError

    overrides = _given_arch_flags(args)
    model = args.model or "MoCE_IR_S"
    try:
        return get_config(model, **overrides)
    except ValueError as e:  # flags that make no network (ranks of 10^12, a width the heads do not divide)
        flags = " ".join(f"--{k} {v}" for k, v in overrides.items())
        raise UsageError(f"--model {model}{' ' + flags if flags else ''}: {e}") from None


def _device(name: str):
    from .pipeline import resolve_device

    return resolve_device(name)


# ---------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import load_model
    from .flops import ExpertCosts, network_flops
    from .models import MoCEIR, create_model

    from .models.checkpoints import CheckpointError, checkpoint_note
    from .pipeline import is_onnx_file, load_network

    engine = ""
    try:
        if is_onnx_file(args.target):
            onnx = load_network(args.target, torch.device("cpu"))
            model, engine = MoCEIR(onnx.config), "ONNX (ONNX Runtime); counts from its config"
            if onnx.note:
                print(f"note: {onnx.note}")
        else:
            model = create_model(args.target) if args.target in PRESETS else load_model(args.target)
            if args.target not in PRESETS and (note := checkpoint_note(args.target)):
                print(f"note: {note}")
    except CheckpointError as e:
        hint = "" if Path(args.target).exists() else f" (presets: {', '.join(PRESETS)})"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    cfg, size = model.config, args.size
    if size % cfg.size_multiple:
        from .pipeline import UsageError

        fit = size + cfg.size_multiple - size % cfg.size_multiple
        raise UsageError(f"--size {size}: this network's {cfg.levels} levels need a multiple of {cfg.size_multiple} "
                         f"(e.g. {fit})")
    print(f"model: {args.target}{f' [{engine}]' if engine else ''}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:24s} {v}")
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n:,}")
    per_expert = ExpertCosts(model).at(size, size).sum(0)
    print(f"FLOPs at {size}x{size} (2 x MACs, attention per head as upstream computes it; FFTs not counted):")
    for i, f in enumerate(per_expert.tolist()):
        rank = f"C/{2 ** (cfg.num_exp_blocks - 1 - i)}" if cfg.rank_type == "spread" else cfg.expert_ranks(0)[i]
        print(f"  expert {i} (rank {rank}, patch {cfg.expert_patch_sizes()[i]}): "
              f"{f / 1e9:.2f} GFLOPs over its {model.num_moe_layers} MoE layers")
    # the k cheapest and the k costliest experts in each layer (a top-k network runs k different ones)
    k, n = cfg.topk, cfg.num_exp_blocks
    extremes = [range(k)] if k == n else [range(k), range(n - k, n)]  # every expert runs: one figure
    ends = [f"{network_flops(model, size, ex) / 1e9:.2f} GFLOPs (expert{'s' * (k > 1)} {'+'.join(map(str, ex))} "
            "everywhere)" for ex in extremes]
    print(f"  total: {' .. '.join(ends)}")
    return 0


# ---------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import UsageError
    from .training import TrainingSetupError, TrainSettings, train

    if args.trainset == "standard" and not args.de_type:
        raise UsageError("--de_type is required with --trainset standard (e.g. denoise_15 derain dehaze)")
    if args.batch_size < args.accum_grad:
        raise UsageError(f"--batch_size {args.batch_size} is below --accum_grad {args.accum_grad}: "
                         "each step takes batch_size // accum_grad images (as upstream)")
    de_type, repeats = _task_lists(args.de_type or [], args.repeat or [])
    data_dir = Path(args.data_file_dir)
    if not data_dir.is_dir():
        what = "is not a folder" if os.path.lexists(data_dir) else "does not exist"
        raise UsageError(f"--data_file_dir {data_dir} {what}; point it at the folder holding "
                         "denoising/, deraining/, dehazing/ ... (upstream layout, see README)")
    flags = _given_arch_flags(args)
    if args.fine_tune_from and flags:  # --topk and the like included: training takes the checkpoint's config
        first = next(iter(flags))
        raise UsageError(f"--{first} with --fine_tune_from: fine-tuning keeps the checkpoint's configuration; "
                         f"leave --{first} out")
    # a --model given with --fine_tune_from is checked against the checkpoint (training would ignore it); without
    # --model, --fine_tune_from and --resume_from take the checkpoint's own architecture (--resume_from with the
    # flags given changed, so that they are checked against the run, not against MoCE_IR_S)
    from_checkpoint = not args.model and bool(args.fine_tune_from or args.resume_from)
    config = None if from_checkpoint else _config_from_args(args)
    settings = TrainSettings(
        de_type=de_type, trainset=args.trainset, data_file_dir=str(data_dir),
        dehaze_source=args.dehaze_source, repeats=repeats, holdout_val=args.holdout_val,
        epochs=args.epochs, max_steps=args.max_steps, max_time=args.max_time, batch_size=args.batch_size,
        accum_grad=args.accum_grad, patch_size=args.patch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
        schedule_epochs=args.schedule_epochs, loss_type=args.loss_type, fft_loss_weight=args.fft_loss_weight,
        balance_loss_weight=args.balance_loss_weight, num_workers=args.num_workers, num_gpus=args.num_gpus,
        num_cpu_processes=args.num_cpu_processes, num_nodes=args.num_nodes, precision=args.precision, compile=args.compile,
        compile_scope=args.compile_scope,
        fused_adamw=args.fused_adamw, cuda_graphs=args.cuda_graphs, fft_impl=args.fft_impl, ema_decay=args.ema_decay,
        dispatch=args.dispatch,
        channels_last=args.channels_last, seed=args.seed, ckpt_dir=args.ckpt_dir, run_name=args.run_name,
        save_every_n_epochs=args.save_every_n_epochs, resume_from=args.resume_from,
        fine_tune_from=args.fine_tune_from, log_every_n_steps=args.log_every_n_steps)
    try:
        run_dir = train(config, settings, changes=flags if from_checkpoint else None)
    except TrainingSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if is_rank_zero():  # the process that wrote the final settings.json
        print(_training_summary(run_dir))
    return 0


def _task_lists(de_type: list[str], repeat: list[tuple[str, int]]) -> tuple[tuple[str, ...], dict[str, int]]:
    """--de_type without its repeated names (noted: each task trains once) and --repeat as a dict, where the last
    factor given for a task counts, as for any repeated flag (noted where they differ)."""
    repeats: dict[str, int] = {}
    for task, n in repeat:
        if task in repeats and repeats[task] != n and is_rank_zero():
            print(f"note: --repeat {task} is given twice ({repeats[task]}, then {n}); the last one counts",
                  file=sys.stderr)
        repeats[task] = n
    twice = sorted({t for t in de_type if de_type.count(t) > 1})
    if twice and is_rank_zero():
        print(f"note: --de_type names {', '.join(twice)} more than once; each task trains once (weigh a task "
              "with --repeat TASK=N)", file=sys.stderr)
    return tuple(dict.fromkeys(de_type)), repeats


def _training_summary(run_dir: Path) -> str:
    """What this call of train did, from the run's settings.json, naming only the files that exist."""
    try:
        done = json.loads((run_dir / "settings.json").read_text())
    except (OSError, ValueError):
        done = {}
    start, end = done.get("start_step", 0), done.get("global_step")
    files = ", ".join(f for f in ("last.ckpt", "model.safetensors", "model_ema.safetensors", "training_curves.png",
                                  "logs/") if (run_dir / f).exists())
    if end is None:
        return f"done: {run_dir} ({files})"
    if end == start:
        return (f"nothing trained: {run_dir} is at step {end} already (--max_steps, --epochs or --max_time reached); "
                f"raise them to train on ({files})")
    return f"done: {run_dir}, steps {start} to {end} ({files})"


# ---------------------------------------------------------------------------------------------------- test
def _load_for_eval(args: argparse.Namespace, cpu: bool = False):
    from . import load_model
    from .models.checkpoints import checkpoint_note
    from .pipeline import UsageError, is_onnx_file
    from .training import resolve_checkpoint

    if args.ckpt and args.checkpoint_id:
        raise UsageError(f"--ckpt {args.ckpt} and --checkpoint_id {args.checkpoint_id} name two models; give one")
    if args.ckpt:
        path = args.ckpt
    elif args.checkpoint_id:
        try:
            path = str(resolve_checkpoint(args.checkpoint_id, args.ckpt_dir))
        except FileNotFoundError as e:
            raise UsageError(f"--checkpoint_id: {e}") from None
    else:
        path = "default"
    given = list(_given_arch_flags(args))
    if given and not args.model:
        raise UsageError(f"--{given[0]} takes effect only with --model NAME; without it the checkpoint's own "
                         "configuration is used")
    if is_onnx_file(path):
        raise UsageError(f"{path} is an ONNX graph; `moceir {args.command}` needs the PyTorch checkpoint "
                         "(.safetensors or .ckpt) it was exported from")
    config = _config_from_args(args) if args.model else None
    device = _device("cpu" if cpu else args.device)  # a distributed run moves the network to each rank's device
    model = load_model(path, device=device, config=config, channels_last=True)
    note = checkpoint_note(path)
    if note and not args.quiet and is_rank_zero():
        print(f"model note: {note}")
    if "raintrainl_val" in args.benchmarks and is_rank_zero() and (trained := _trained_on_validation(path)):
        print(f"note: raintrainl_val: {trained}", file=sys.stderr)
    return model, device, path


def _cdd11_subset(args: argparse.Namespace) -> str:
    from .pipeline import UsageError

    if args.trainset != "standard" and not args.trainset.startswith("CDD11_"):
        raise UsageError(f"--trainset {args.trainset}: choose standard or CDD11_<all|single|double|triple|folder>")
    if "cdd11" not in args.benchmarks:
        if args.trainset != "standard" and is_rank_zero():
            print(f"note: --trainset {args.trainset} selects which cdd11 images are scored; --benchmarks has no cdd11, "
                  "so it changes nothing here", file=sys.stderr)
        return "all"
    if not args.trainset.startswith("CDD11_"):
        raise UsageError("--benchmarks cdd11 needs --trainset CDD11_<all|single|double|triple|folder>")
    return args.trainset.split("_", 1)[1]


def cmd_test(args: argparse.Namespace) -> int:
    from functools import partial

    from .data.datasets import DatasetLayoutError
    from .distributed import Launch, evaluate_distributed
    from .evaluation import (benchmark_dataset, check_results_folder, collect, markdown_table, save_targets,
                             score_image, write_reports)

    from .models.experts import set_expert_bypass
    from .pipeline import one_line

    out_dir = Path(args.output_path)
    check_results_folder(out_dir, args.benchmarks, args.save_results, overwrite=args.overwrite)  # before any work
    if not args.save_results and (out_dir / "images").is_dir() and is_rank_zero() and not args.quiet:
        print(f"note: {out_dir / 'images'} holds an earlier run's restored images; without --save_results they are "
              "left as they are, not replaced", file=sys.stderr)
    launch = Launch(args.num_gpus or 0, args.num_nodes, args.num_cpu_processes)
    subset = _cdd11_subset(args)
    model, device, path = _load_for_eval(args, cpu=launch.world_size > 1)
    set_expert_bypass(model, args.experts == "skip")
    failed = False
    entries = []
    for bench in args.benchmarks:
        try:
            entries.append((bench, benchmark_dataset(args.data_file_dir, bench, subset)))
        except (DatasetLayoutError, ValueError) as e:
            print(f"error: {bench}: {e}", file=sys.stderr)
            failed = True
    score = partial(score_image, y_channel=args.y_channel, context_pad=args.context_pad, overwrite=args.overwrite)
    saves = []
    for bench, ds in entries:
        targets, notes = save_targets(ds, out_dir / "images" / bench) if args.save_results else (None, [])
        for note in notes if is_rank_zero() else ():
            print(f"note: {bench}: {note}", file=sys.stderr)
        saves.append((ds, targets))
    if launch.world_size > 1:
        scored = evaluate_distributed(model, saves, [len(ds) for ds, _ in saves], score, launch)
    else:
        from tqdm import tqdm

        scored = [[score(model, entry, i, device) for i in tqdm(range(len(entry[0])), desc=bench, leave=False,
                                                                 disable=args.quiet)]
                  for (bench, _), entry in zip(entries, saves)]
    results = []
    for (bench, ds), rows in zip(entries, scored):
        result = collect(bench, rows, ds.unmatched)
        if is_rank_zero():
            for line in result.errors:
                print(one_line(f"error: {bench}: {line} (skipped)"), file=sys.stderr)
            for line in result.not_saved:
                print(one_line(f"error: {bench}: {line} (scored, not saved)"), file=sys.stderr)
        failed = failed or bool(result.errors) or bool(result.not_saved)
        if result.rows:
            results.append(result)
        if args.save_results and is_rank_zero():
            _note_earlier_images(out_dir / "images" / bench, result.rows)
    if results and is_rank_zero():
        unlike = [what for what, differs in (("experts bypassed: --experts skip", args.experts == "skip"),
                                             (f"--context_pad {args.context_pad}, not upstream's protocol",
                                              args.context_pad != 0)) if differs]
        title = f"moceir test: {path}" + (f" ({'; '.join(unlike)})" if unlike else "")
        try:  # written before the table is printed: a reader that left (| head) does not cost the files
            paths = write_reports(results, out_dir, title, overwrite=args.overwrite, experts=args.experts,
                                  checked=True, context_pad=args.context_pad,
                                  checkpoint="default" if path == "default" else os.path.abspath(path))
        finally:  # and printed when they cannot be written (a full disk), so that the scores are not lost
            print(markdown_table(results, title))
        print(f"wrote {paths['md']}, {paths['json']}, {paths['csv']}")
    elif is_rank_zero():
        print(f"error: no image of {', '.join(b for b, _ in entries) or 'any benchmark'} could be scored; no results "
              "written", file=sys.stderr)
    return 1 if failed or not results else 0


def _trained_on_validation(checkpoint: str | Path) -> str:
    """Why a score on the RainTrainL validation split is not one, where a call of train that made ``checkpoint``
    (its run's settings.json, with the earlier calls it continued or was fine-tuned from) trained derain without
    --holdout_val, on those very images; "" otherwise or unknown."""
    from .training import run_history

    if str(checkpoint) == "default":  # the bundled model's runs held the split out (docs/model-card.md)
        return ""
    history = run_history(checkpoint)
    try:
        trained = [i for i, call in enumerate(history)
                   if "derain" in call["settings"]["de_type"] and not call["settings"]["holdout_val"]]
    except (KeyError, TypeError):
        return ""
    if not trained:
        return ""
    when = "" if trained[-1] == len(history) - 1 else " in an earlier call of train it continued or was fine-tuned from"
    return (f"{checkpoint} comes from a run that trained derain without --holdout_val{when}, so these images were "
            "among its training images: the score is not a validation score")


def _note_earlier_images(folder: Path, rows: list[dict]) -> None:
    """A note where ``folder`` holds restored images this run did not write (an earlier run's, of images that are
    gone from the benchmark or were skipped now): they are left, not mistaken for this run's."""
    written = {(folder / row["saved"]).resolve() for row in rows if "saved" in row}
    others = sorted(p for p in folder.rglob("*.png") if p.resolve() not in written) if folder.is_dir() else []
    if others:
        print(f"note: {folder}: {len(others)} image(s) there are not from this run (e.g. {others[0].name}); an earlier "
              f"run left them; remove them, or use a new --output_path", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------- routing
def _refuse_benchmark_folder(out: Path, data_dir: str, benchmarks: list[str], subset: str) -> None:
    """A UsageError where ``out`` is a folder of a benchmark's images (with or without --from_results, when the
    benchmarks can be listed) or of a task's training images: routing_heatmap.png would be read as one of them by
    the next run."""
    from .data.datasets import DatasetLayoutError, data_folders, training_folders
    from .evaluation import benchmark_dataset
    from .pipeline import UsageError

    for b in benchmarks:
        try:
            folders = data_folders(benchmark_dataset(data_dir, b, subset).pairs)
        except (DatasetLayoutError, ValueError):  # scoring it says why; with --from_results it is not read
            continue
        if os.path.realpath(out) in folders:
            raise UsageError(f"--output_path {out} is a folder of {b}'s images: routing_heatmap.png would be scored "
                             "as one of them; choose an --output_path outside the data")
    training = [f for f in training_folders(data_dir) if os.path.realpath(f) == os.path.realpath(out)]
    if training:  # BSD400: the next `moceir train` trained on the heatmap
        raise UsageError(f"--output_path {out} is a folder of training images ({training[0]}): routing_heatmap.png "
                         "would be trained on as one of them; choose an --output_path outside the data")


def cmd_routing(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_benchmark, finite_or_null, routing_counts, routing_flops
    from .io import write_files_atomically
    from .plots import plot_routing_heatmap

    out = Path(args.output_path)
    files = _routing_files(out, args.overwrite)
    subset = None if args.from_results else _cdd11_subset(args)
    _refuse_benchmark_folder(out, args.data_file_dir, args.benchmarks, subset or "all")
    model, device, path = _load_for_eval(args)
    if args.from_results:  # reuse the per-image experts that `moceir test` recorded with this checkpoint
        results, failed = _routing_results_from_file(args.from_results, args.benchmarks, model, str(path)), False
    else:
        results, failed = _routing_results_scored(args, model, device, subset)
        if not results:
            print("error: no image of any benchmark could be scored; nothing written", file=sys.stderr)
            return 1
    bypassed = {}
    if args.bypass_column and not args.from_results:  # the ablation: the same images with every expert bypassed
        from .models.experts import set_expert_bypass

        set_expert_bypass(model, True)
        for r in results:
            bypassed[r.name] = evaluate_benchmark(model, args.data_file_dir, r.name, device, cdd11_subset=subset,
                                                  progress=not args.quiet).mean("psnr")
        set_expert_bypass(model, False)
    counts = routing_counts(results, model.num_moe_layers, model.config.num_exp_blocks)
    flops = routing_flops(model, results)
    names, psnr = [r.name for r in results], {r.name: r.mean("psnr") for r in results}
    table = _routing_table(names, counts, flops, psnr, bypassed, model.config.topk)
    data = json.dumps(finite_or_null({"benchmarks": names, "counts": counts.tolist(), "flops": flops, "psnr": psnr,
                                      "psnr_experts_bypassed": bypassed}), indent=1, allow_nan=False)
    print(table)  # first: should the files fail to be written, the scores are not lost
    out.mkdir(parents=True, exist_ok=True)
    png, title = files["routing_heatmap.png"], f"experts picked per task and MoE layer ({Path(path).name})"
    write_files_atomically({png: lambda tmp: plot_routing_heatmap(counts, names, tmp, title, model.config.topk),
                            files["routing.md"]: lambda tmp: tmp.write_text(table),
                            files["routing.json"]: lambda tmp: tmp.write_text(data)}, args.overwrite)  # as one set
    print(f"wrote {png}, {out / 'routing.md'}, {out / 'routing.json'}")
    return 1 if failed else 0


def _routing_files(out: Path, overwrite: bool) -> dict[str, Path]:
    """The three files `routing` writes into ``out``, checked before any work as `moceir test` checks its own
    (a UsageError names the problem)."""
    from .evaluation import check_results_folder

    names = ("routing_heatmap.png", "routing.md", "routing.json")
    check_results_folder(out, overwrite=overwrite, names=names)
    return {name: out / name for name in names}


def _routing_results_from_file(path: str, benchmarks: list[str], model: Any, checkpoint: str) -> list:
    """The per-image experts that `moceir test` recorded in ``path`` (its results.json) for ``benchmarks``, checked
    against ``model`` and the ``checkpoint`` it was loaded from; an unusable file is a UsageError."""
    from .evaluation import results_from_json
    from .io import file_problem
    from .pipeline import UsageError

    advice = "pass the results.json that `moceir test` wrote with this checkpoint"
    if problem := file_problem(path):  # a FIFO would block, /dev/zero fill the memory
        raise UsageError(f"--from_results {path} {problem}; {advice}")
    try:
        return results_from_json(json.loads(Path(path).read_text()), benchmarks, model.num_moe_layers,
                                 model.config.num_exp_blocks, model.config.topk, checkpoint)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UsageError(f"--from_results {path}: {why}; {advice}") from None


def _routing_results_scored(args: argparse.Namespace, model, device, subset) -> tuple[list, bool]:
    """Each benchmark scored with ``model`` -> (results with at least one image, whether anything failed); a
    benchmark or an image that fails gets an error line and the others go on."""
    from .data.datasets import DatasetLayoutError
    from .evaluation import evaluate_benchmark
    from .pipeline import one_line

    results, failed = [], False
    for b in args.benchmarks:
        try:
            r = evaluate_benchmark(model, args.data_file_dir, b, device, cdd11_subset=subset, progress=not args.quiet)
        except (DatasetLayoutError, ValueError) as e:
            print(f"error: {b}: {e}", file=sys.stderr)
            failed = True
            continue
        for line in r.errors:
            print(one_line(f"error: {b}: {line} (skipped)"), file=sys.stderr)
        failed = failed or bool(r.errors)
        if r.rows:
            results.append(r)
    return results, failed


def _routing_table(names: list[str], counts, flops: list[dict], psnr: dict[str, float],
                   bypassed: dict[str, float], topk: int) -> str:
    """routing.md: images per expert ([benchmarks, layers, experts] ``counts``), then FLOPs and PSNR per task."""
    lines = ["| benchmark | " + " | ".join(f"L{i}" for i in range(counts.shape[1])) + " |",
             "|---|" + "---|" * counts.shape[1]]
    for name, c in zip(names, counts):
        lines.append(f"| {name} | " + " | ".join("/".join(str(v) for v in layer) for layer in c) + " |")
    top_k = "" if topk == 1 else f" (top-{topk}: an image counts for each of its {topk} experts)"
    lines += ["", f"Each cell: images per expert {'/'.join(f'E{i}' for i in range(counts.shape[2]))} in that MoE "
              f"layer{top_k}.", "",
              "| benchmark | expert GFLOPs spent / image | all experts / image | share | PSNR | PSNR, experts bypassed |",
              "|---|---|---|---|---|---|"]
    for f in flops:
        name = f["benchmark"]
        skipped = f"{bypassed[name]:.3f}" if name in bypassed else "-"
        lines.append(f"| {name} | {f['expert_gflops_spent']:.2f} | {f['expert_gflops_all']:.2f} | "
                     f"{100 * f['share']:.1f}% | {psnr[name]:.3f} | {skipped} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- restore
def cmd_restore(args: argparse.Namespace) -> int:
    from .models.checkpoints import checkpoint_note
    from .pipeline import ReportError, UsageError, is_onnx_file, restore_files

    def say(line: str) -> None:
        if line.startswith("error") or not args.quiet:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)  # above the progress bar, not inside it

    model = args.checkpoint
    if args.experts == "skip" and is_onnx_file(args.checkpoint):
        raise UsageError(f"--experts skip needs a PyTorch checkpoint; {args.checkpoint} is an ONNX graph, whose "
                         "experts are fixed at export")
    if args.experts == "skip":
        from .models.checkpoints import load_model
        from .models.experts import set_expert_bypass

        model = set_expert_bypass(load_model(args.checkpoint))
    report_error = None
    try:
        rows = restore_files(args.inputs, args.output, model, device=args.device, tile=args.tile,
                             tile_overlap=args.tile_overlap, tile_routing=args.tile_routing,
                             batch_size=args.batch_size, precision=args.precision, ext=args.ext, suffix=args.suffix,
                             overwrite=args.overwrite, report=args.report, context_pad=args.context_pad,
                             max_memory=args.max_memory, num_workers=args.num_workers,
                             progress=not args.quiet and is_rank_zero(), log=say,
                             num_gpus=args.num_gpus or 0, num_nodes=args.num_nodes,
                             num_cpu_processes=args.num_cpu_processes, cuda_graphs=args.cuda_graphs,
                             strip_metadata=args.strip_metadata)
    except ReportError as e:
        rows, report_error = e.rows, e
    failed = sum("error" in r for r in rows)
    if is_rank_zero():
        if report_error is not None:
            print(f"error: {report_error}", file=sys.stderr)
        note = "" if args.quiet else checkpoint_note(args.checkpoint)  # after the work: an -o error stays one line
        if note:
            print(f"model: {note}")
        print(f"restored {len(rows) - failed} image(s) into {args.output}; {failed} failed")
    return 1 if failed or report_error is not None else 0


# ---------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import AddressError, GradioMissing, launch

    try:
        launch(args.checkpoint, host=args.host, port=args.port, device=args.device, max_pixels=args.max_pixels,
               concurrency=args.concurrency)
    except (GradioMissing, AddressError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken or the address cannot be bound
        reason = str(e).split(". ")[0]
        print(f"error: cannot serve at {args.host}:{args.port} ({reason}); choose another --port", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------------------------------- plot-logs
def cmd_plot_logs(args: argparse.Namespace) -> int:
    from matplotlib.figure import Figure

    from .pipeline import UsageError, folder_problem
    from .plots import MetricsError, plot_training_logs

    if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):  # its --out was blamed, given or not
        raise UsageError(f"{args.run_dir} is a file; pass the run folder written by `moceir train` (it holds "
                         "logs/metrics.csv)")
    out = Path(args.out) if args.out else Path(args.run_dir) / "training_curves.png"
    formats = {k: v for k, v in Figure().canvas.get_supported_filetypes().items() if k != "pgf"}  # needs LaTeX
    if out.name.startswith(".") and out.name[1:].lower() in formats:  # ".png": a hidden file without a suffix
        raise UsageError(f"--out {out} is only a suffix; name the file (e.g. {out.with_name('curves' + out.name)})")
    if out.suffix.lower()[1:] not in formats:
        raise UsageError(f"--out {out}: name it .png (or .{', .'.join(f for f in formats if f != 'png')})")
    problem = folder_problem(out.parent)
    if problem or out.is_dir():
        raise UsageError(f"--out {out}: {problem or 'is a folder'}; choose another --out")
    if args.out and os.path.lexists(out) and not args.overwrite:  # the run's own training_curves.png is redrawn
        raise UsageError(f"--out {out} exists; pass --overwrite or choose another --out")
    try:
        print(plot_training_logs(args.run_dir, out, overwrite=args.overwrite or not args.out))
    except (FileNotFoundError, MetricsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        from .io import write_error_advice

        advice = write_error_advice(e.errno, "--out")
        if advice is None:
            raise UsageError(f"--out {out}: cannot write ({e.strerror or e}); choose another --out") from None
        print(f"error: {out}: cannot write ({e.strerror}); {advice}", file=sys.stderr)
        return 1
    return 0


EXPORT_FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}


def cmd_export(args: argparse.Namespace) -> int:
    from . import load_model, save_model
    from .models.checkpoints import checkpoint_note, resolve_path
    from .pipeline import PRECISIONS, UsageError

    out = Path(args.output)
    if out.is_dir():
        raise UsageError(f"{out} is a folder; name the file to write (e.g. {out / 'model.safetensors'})")
    if out.name.lower() in {f".{ext}" for ext in EXPORT_FORMATS.values()}:  # no stem: a hidden file, suffix ""
        raise UsageError(f"{out} is only a suffix; name the file (e.g. {out.with_name('model' + out.name)})")
    fmt = args.format or EXPORT_FORMATS.get(out.suffix.lower())
    if out.suffix.lower() in EXPORT_FORMATS and fmt != EXPORT_FORMATS[out.suffix.lower()]:
        raise UsageError(f"--format {fmt} would write {out} in a format its suffix does not name; drop --format "
                         f"or name the file .{fmt}")
    if fmt is None:
        raise UsageError(f"cannot tell the format of {out} from its suffix; name it .safetensors or .onnx, "
                         "or pass --format")
    if fmt == "onnx" and (problem := onnx_name_problem(out)):  # before loading; export_onnx refuses it too
        raise UsageError(problem)
    if out.exists() and os.path.samefile(out, resolve_path(args.checkpoint)):  # --overwrite never means the input
        raise UsageError(f"{out} is the checkpoint being exported; choose another output name")
    if out.exists() and not args.overwrite:  # before loading; a dangling link: save_model's own refusal (also 2)
        raise UsageError(f"{out} exists; choose another name or pass --overwrite")
    model = load_model(args.checkpoint, device="cpu", channels_last=False)  # a CheckpointError exits 2 in main()
    note = args.note if args.note is not None else checkpoint_note(args.checkpoint)  # it travels unless replaced
    if fmt == "onnx":
        from .onnx import export_onnx

        if args.dtype != "fp32":
            raise UsageError("ONNX export is fp32 only; drop --dtype")
        try:
            path = export_onnx(model, out, note=note, overwrite=args.overwrite, optimize=args.optimize,
                               dispatch=args.dispatch)
        except (ImportError, ValueError) as e:  # onnx missing; a model with router noise in eval
            raise UsageError(str(e)) from None
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, ONNX fp32, dynamic batch/height/width in "
              f"multiples of {model.config.size_multiple}, config in its metadata)")
        return 0
    path = save_model(model, out, dtype=PRECISIONS[args.dtype], note=note or None, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.dtype}, config embedded)")
    return 0


# ---------------------------------------------------------------------------------------------------- parser
class _NoRepeats(argparse.Action):
    """A list flag whose values must differ (``--benchmarks lolv1 lolv1`` scored one benchmark twice)."""

    def __call__(self, parser, namespace, values, option_string=None):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            parser.error(f"{option_string} names {', '.join(twice)} more than once")
        setattr(namespace, self.dest, values)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; flags without one (None) show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        if action.default == "":
            return text + " (default: none)"
        return super()._get_help_string(action)


def _add_scale_flags(p: argparse.ArgumentParser, training: bool = False) -> None:
    g = p.add_argument_group("scale-out (Lightning DDP; under torchrun or SLURM's srun the launcher's processes are used)")
    g.add_argument("--num_gpus", "--gpus", type=_non_negative, default=None,
                   help="GPUs per node (0: CPU; default: 1 if CUDA)" if training else "GPUs per node (default: none)")
    g.add_argument("--num_nodes", type=_positive(), default=1, help="machines taking part")
    g.add_argument("--num_cpu_processes", type=_positive(), default=1, help="CPU processes per node (gloo)")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list(PRESETS), help="preset; optional when the checkpoint describes itself")
    p.add_argument("--ckpt", type=_path, help="checkpoint path (any format moceir.load_model reads); default: "
                   "the bundled model unless --checkpoint_id is given")
    p.add_argument("--checkpoint_id", type=_path, help="run name under --ckpt_dir (uses its last.ckpt)")
    p.add_argument("--ckpt_dir", type=_path, default="checkpoints", help="folder of training runs")
    p.add_argument("--benchmarks", nargs="+", required=True, choices=BENCHMARKS, action=_NoRepeats,
                   help="test sets to evaluate")
    p.add_argument("--trainset", default="standard", help="CDD11_<subset> selects the cdd11 test subset")
    p.add_argument("--de_type", nargs="*", help="accepted for upstream compatibility; not needed")
    p.add_argument("--data_file_dir", type=_path, default="datasets", help="folder holding denoising/, deraining/, ...")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_arch_flags(p)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix such as `--mode` or `--resume` is an error, never silently another flag
    parser = argparse.ArgumentParser(prog="moceir", formatter_class=_HelpFormatter, allow_abbrev=False, description=(
        "MoCE-IR all-in-one image restoration: restore photos, train, test and inspect models. "
        "`moceir COMMAND --help` shows a command's options."))
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter, allow_abbrev=False)

    p = command("info", "configuration, parameter count and FLOPs of a preset or checkpoint")
    p.add_argument("target", type=_given_path, help=f"a preset ({', '.join(PRESETS)}), a checkpoint path or 'default'")
    p.add_argument("--size", type=_patch, default=256, help="side of the square image the FLOPs are counted for")
    p.set_defaults(fn=cmd_info)

    p = command("train", "train with PyTorch Lightning (upstream's flags)")
    p.add_argument("--model", choices=list(PRESETS), help="architecture preset (default MoCE_IR_S; with "
                   "--fine_tune_from, the checkpoint's own)")
    p.add_argument("--epochs", type=_positive(), default=120, help="training epochs")
    p.add_argument("--max_steps", type=_max_steps, default=-1,
                   help="stop after N optimizer steps (the LR schedule spans them); -1: no limit")
    p.add_argument("--max_time", type=_duration, help="wall-clock limit DD:HH:MM:SS")
    p.add_argument("--batch_size", type=_positive(), default=8,
                   help="per device (with --accum_grad a: batch_size//a per step, as upstream)")
    p.add_argument("--lr", type=_positive(float), default=2e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup_epochs", type=_non_negative_float, default=15, help="linear warm-up length")
    p.add_argument("--schedule_epochs", type=_positive(float), default=150, help="cosine schedule length")
    p.add_argument("--de_type", nargs="+", choices=TASKS,
                   help="degradation tasks to train on; 'identity' (not upstream) adds clean patches as their own target")
    p.add_argument("--trainset", choices=TRAINSETS, default="standard", help="training set layout")
    p.add_argument("--dehaze_source", choices=DEHAZE_SOURCES, default="reside",
                   help="synthetic: haze made on the clean BSD images (RESIDE OTS substitute)")
    p.add_argument("--repeat", type=_repeat, action="append", help="override a task's repeat factor, e.g. derain=20")
    p.add_argument("--holdout_val", action="store_true", help="keep the RainTrainL validation split (ids %% 10 == 0) out")
    p.add_argument("--loss_type", type=str.lower, choices=LOSS_TYPES, default="l1", help="L1 or FFT (case-insensitive)")
    p.add_argument("--fft_loss_weight", type=_non_negative_float, default=0.1, help="weight of the FFT term "
                                                                                      "with --loss_type fft")
    p.add_argument("--balance_loss_weight", type=_non_negative_float, default=0.01,
                   help="weight of the router's balance loss")
    p.add_argument("--patch_size", type=_patch, default=128,
                   help="training crop side (every training image must be at least this large)")
    p.add_argument("--num_workers", type=_non_negative, default=4, help="data loader processes")
    p.add_argument("--accum_grad", type=_positive(), default=1, help="gradient accumulation steps")
    p.add_argument("--resume_from", type=_path,
                   help="run name under --ckpt_dir or a checkpoint path: restores optimizer and step")
    p.add_argument("--fine_tune_from", type=_path,
                   help="any checkpoint moceir.load_model reads: weights only, fresh optimizer")
    p.add_argument("--data_file_dir", type=_path, default="datasets", help="folder holding denoising/, deraining/, ...")
    p.add_argument("--ckpt_dir", type=_path, default="checkpoints", help="where run folders are made")
    p.add_argument("--run_name", help="run folder name (default: a timestamp)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"],
                   help="Lightning precision")
    p.add_argument("--compile", nargs="?", const="default", default="none",
                   choices=["none", *COMPILE_MODES],
                   help="torch.compile the network in this mode (--compile alone: default)")
    p.add_argument("--compile_scope", choices=COMPILE_SCOPES, default="network",
                   help="what one compiled graph covers: the network, or each transformer block (blocks of one level "
                        "share their code: 7 graphs for MoCE_IR_S, a shorter compile)")
    p.add_argument("--fused_adamw", action="store_true", help="fused AdamW: one kernel per step for all weights")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="capture the whole step (forward, loss, backward, AdamW) in one CUDA graph and replay it for "
                        "every batch: one GPU, no --accum_grad, dense dispatch")
    p.add_argument("--fft_impl", choices=FFT_IMPLS,
                   help="experts' FFT product while training: fft, or matmul (real-valued, which Inductor compiles); "
                        "saved files keep the config's (default: the config's)")
    p.add_argument("--ema_decay", type=_non_negative_float, default=0.0,
                   help="keep an exponential moving average of the weights (e.g. 0.999; 0: off), saved as "
                        "model_ema.safetensors in the run folder")
    p.add_argument("--dispatch", choices=["auto", "dense", "sparse"], default="auto",
                   help="expert dispatch: dense on CUDA, sparse on CPU when auto")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory layout")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--save_every_n_epochs", type=_positive(), default=5, help="checkpoint period")
    p.add_argument("--log_every_n_steps", type=_positive(), default=10, help="logging period")
    _add_arch_flags(p)
    _add_scale_flags(p, training=True)
    p.set_defaults(fn=cmd_train)

    p = command("test", "PSNR/SSIM on the benchmarks (upstream's protocol)")
    _add_eval_flags(p)
    p.add_argument("--output_path", type=_path, default="output/", help="where results.md/json/csv are written")
    p.add_argument("--save_results", action="store_true", help="write the restored PNGs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in --output_path (results.md/json, per_image.csv, "
                        "and the images of images/<benchmark> this run writes; others are left, with a note)")
    p.add_argument("--y_channel", action="store_true", help="also report PSNR/SSIM on the Y channel")
    p.add_argument("--context_pad", type=_non_negative, default=0,
                   help="reflected context around each image (0: upstream's protocol)")
    p.add_argument("--experts", choices=["run", "skip"], default="run",
                   help="skip: every complexity expert replaced by the identity (an ablation: what do they add?)")
    _add_scale_flags(p)
    p.set_defaults(fn=cmd_test)

    p = command("routing", "which expert each task picks per MoE layer: heatmap, table, FLOPs")
    _add_eval_flags(p)
    p.add_argument("--output_path", type=_path,
                   default="routing", help="folder for routing_heatmap.png, routing.md/json")
    p.add_argument("--from_results", type=_path,
                   help="results.json of `moceir test` with the same checkpoint: no re-run")
    p.add_argument("--overwrite", action="store_true", help="replace existing routing files")
    p.add_argument("--bypass_column", action=argparse.BooleanOptionalAction, default=True,
                   help="also score every benchmark with the experts bypassed (twice the time; not with "
                        "--from_results)")
    p.set_defaults(fn=cmd_routing)

    p = command("restore", "restore images (files, folders, globs) with the bundled or a given model")
    p.add_argument("inputs", nargs="+", help="image files, folders (not recursive) or globs")
    p.add_argument("-o", "--output", type=_path, default="restored", help="folder for the restored images")
    p.add_argument("--checkpoint", type=_path,
                   default="default", help="checkpoint path; 'default' is the bundled model")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision (CUDA)")
    p.add_argument("--batch_size", type=_positive(), help="same-size images restored together (default: 1 on CPU, "
                                                          "where batches ran slower per image; 4 on CUDA)")
    p.add_argument("--tile", type=_patch, help="tile size (default: automatic when the image would not fit "
                                               "--max_memory)")
    p.add_argument("--tile_overlap", type=_non_negative, default=32, help="pixels shared by neighbouring tiles")
    p.add_argument("--tile_routing", choices=["tile", "global"], default="tile",
                   help="tile: each tile picks its experts; global: one decision from a downscaled pass")
    p.add_argument("--max_memory", type=_bytes, help="memory budget for automatic tiling, e.g. 4GB (default: "
                                                     "half the free RAM, at most 2.5 GB; on CUDA 70%% of free memory)")
    p.add_argument("--context_pad", type=_non_negative, default=16,
                   help="reflected context around each image, cropped away (removes dark borders; 0: off)")
    p.add_argument("--num_workers", type=_non_negative, default=0, help="loader processes decoding ahead")
    p.add_argument("--experts", choices=["run", "skip"], default="run",
                   help="skip: bypass every complexity expert (an ablation; also skips their cost)")
    p.add_argument("--cuda_graphs", action="store_true",
                   help="CUDA: replay a captured graph for each image or tile size seen twice (tiles of a large "
                        "image, a data set of one size); far less host work per forward")
    _add_scale_flags(p)
    p.add_argument("--ext", help="output format: png, jpg, tif, webp, bmp or gif (default: the input's; png where "
                                 "moceir does not write the input's format)")
    p.add_argument("--suffix", default="", help="appended to output names")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs and report (never inputs)")
    p.add_argument("--strip_metadata", action="store_true",
                   help="write no EXIF (camera, date, GPS place), XMP or resolution; by default they are kept where "
                        "the output format holds them (the colour profile is always kept)")
    p.add_argument("--report", type=_path, help="write a JSON report: size, time and experts per image")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes; errors only")
    p.set_defaults(fn=cmd_restore)

    p = command("demo", "a web page on this machine: restore a photo, compare before/after, see which experts ran "
                        "(needs pip install -e '.[demo]')")
    p.add_argument("--checkpoint", type=_path,
                   default="default", help="checkpoint path; 'default' is the bundled model")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on; 0.0.0.0 opens the page to your network (it has no login)")
    p.add_argument("--port", type=_port, default=7860, help="port to serve on (1-65535)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--max_pixels", type=_positive(float), default=24e6,
                   help="largest image the page accepts (width x height); larger ones: moceir restore")
    p.add_argument("--concurrency", type=_positive(), default=1,
                   help="restores that run at once; more requests wait in a queue")
    p.set_defaults(fn=cmd_demo)

    p = command("export", "write any checkpoint as self-describing safetensors (e.g. fp16 to ship) or ONNX")
    p.add_argument("checkpoint", type=_given_path,
                   help="any checkpoint moceir.load_model reads (upstream last.ckpt included)")
    p.add_argument("output", type=_given_path,
                   help="the file to write: .safetensors or .onnx (the suffix picks the format)")
    p.add_argument("--format", choices=["safetensors", "onnx"],
                   help="the format, where the suffix does not say (safetensors under another name; ONNX needs .onnx)")
    p.add_argument("--optimize", action=argparse.BooleanOptionalAction, default=True,
                   help="ONNX: run onnxscript's graph optimizer (about 2x the export time; ONNX Runtime ran 16%% "
                        "faster with it)")
    p.add_argument("--dispatch", choices=EXPORT_DISPATCHES, default="conditional",
                   help="ONNX: run only the experts some image chose (an If per expert), or all of them, gated")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the stored weights")
    p.add_argument("--note", type=_text, help="text stored in the file and printed when the model is used "
                   "(default: the checkpoint's own note; \"\" for none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(fn=cmd_export)

    p = command("plot-logs", "PNG plots of loss, balance loss and LR of a training run")
    p.add_argument("run_dir", type=_given_path, help="a training run folder (holding logs/metrics.csv), or a folder "
                   "holding a metrics.csv kept on its own")
    p.add_argument("--out", type=_path,
                   help="PNG path (default: <run_dir>/training_curves.png, which training also writes and "
                                 "this redraws)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(fn=cmd_plot_logs)
    return parser


def _to_devnull(fd: int) -> None:
    """Point file descriptor ``fd`` (stdout's or stderr's) at /dev/null: its reader has gone, it cannot be written,
    or it is closed, and later writes must not fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    if devnull == fd:  # fd was closed, and /dev/null took its number
        return
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _ReaderMayLeave:
    """sys.stdout or sys.stderr for a command whose work must not depend on its reader: once a pipe's reader has
    gone (``moceir train ... 2>&1 | head``) or the stream cannot be written (``> /dev/full``), what is printed goes
    nowhere and the work goes on (training to its checkpoint, ``moceir test`` to its results files). A write error
    other than a reader leaving is kept in ``lost``, so that the exit code can still tell the truth."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.lost: OSError | None = None  # main() reports it for stdout (a lost stderr has nowhere to be told)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            self._cannot_write(e)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            self._cannot_write(e)

    def _cannot_write(self, error: OSError) -> None:
        if not isinstance(error, BrokenPipeError) and self.lost is None:
            self.lost = error
        _to_devnull(self._stream.fileno())  # the buffer's rest and the exit's flush

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _guard(name: str) -> _ReaderMayLeave | None:
    """Wrap ``sys.<name>`` if it is the process's own stream (not a caller's capture, such as pytest's)."""
    stream = getattr(sys, name)
    if stream is None or stream is not getattr(sys, f"__{name}__"):
        return None
    if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
        # a file name that is not UTF-8 (its bytes as surrogates) failed in print with a traceback after the work
        # was done, where the locale (or PYTHONIOENCODING) makes stdout strict; it is printed as \udcff instead
        stream.reconfigure(errors="backslashreplace")
    guarded = _ReaderMayLeave(stream)
    setattr(sys, name, guarded)
    return guarded


def _unguard(name: str, guarded: _ReaderMayLeave | None) -> None:
    if guarded is not None and getattr(sys, name) is guarded:
        guarded.flush()  # while wrapped: the exit's own flush would meet a reader that left (exit 120)
        setattr(sys, name, guarded._stream)


def _closed_streams() -> None:
    """Put standard streams that started closed (``moceir info >&-``) on /dev/null: else the next file opened
    would take their number, and what is printed there (by a library, a child process) would go into that file."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            _to_devnull(fd)


def main(argv: list[str] | None = None) -> int:
    _closed_streams()
    lost = sys.stdout is None  # Python found no stdout (it started closed): what is printed goes nowhere
    stdout, stderr = _guard("stdout"), _guard("stderr")  # before Lightning's log handler takes hold of sys.stderr
    try:
        code = _main(argv)
        if lost:
            print("error: standard output is closed; what moceir printed there is lost", file=sys.stderr)
            code = code or 1
        elif stdout is not None:
            stdout.flush()  # a write error of the buffer's rest counts too
            if stdout.lost is not None:  # through the stderr guard: it may be gone as well
                print(f"error: standard output: {stdout.lost.strerror}; what moceir printed there is lost",
                      file=sys.stderr)
                code = code or 1
    finally:
        _unguard("stdout", stdout)
        _unguard("stderr", stderr)
    return code


_SIGTERM_PID: list[int] = []  # the process that installed _raise_terminated


def _raise_terminated(signum: int, frame: Any) -> None:
    if _SIGTERM_PID and os.getpid() != _SIGTERM_PID[-1]:  # a forked loader worker, ended by its parent: it dies
        import signal                                      # as SIGTERM's default does, without a traceback

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated


def _catch_sigterm() -> Any:
    """Make SIGTERM raise :class:`moceir.runtime.Terminated`; returns the handler it replaced, or None where it
    was left alone (a handler or SIG_IGN set by the caller, or not the main thread: an in-process caller's)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None
    _SIGTERM_PID[:] = [os.getpid()]
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def _apply_pixel_limit() -> None:
    """PIL's decompression-bomb limit (it refuses images above twice it) from MOCEIR_MAX_IMAGE_PIXELS, for a
    trusted image above the default's 179 megapixels."""
    from PIL import Image

    from .io import PIXEL_LIMIT_VARIABLE
    from .pipeline import UsageError

    value = os.environ.get(PIXEL_LIMIT_VARIABLE, "").strip()
    if not value:  # unset, or set empty (VAR= moceir ...)
        return
    if not (value.isascii() and value.isdigit()) or int(value) < 1:  # "²".isdigit(), but int("²") fails
        raise UsageError(f"{PIXEL_LIMIT_VARIABLE}={value!r}: give a whole number of pixels (images above twice it "
                         "are refused), or unset it")
    Image.MAX_IMAGE_PIXELS = int(value)


def _main(argv: list[str] | None) -> int:
    from .runtime import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    if args.command != "demo":  # a long-lived server: keep glibc's defaults, which return memory after each photo
        tune_cpu_allocator()  # restore's memory model follows it (moceir.inference.bytes_per_pixel)
    import warnings

    from PIL import Image

    from .models.checkpoints import CheckpointError
    from .pipeline import UsageError

    # SIGTERM (kill, timeout, SLURM) stops the command as Ctrl-C does, so that its half-written temporary files are
    # removed; train has Lightning's handling, the demo its own
    replaced = _catch_sigterm() if args.command not in ("train", "demo") else None
    pixel_limit = Image.MAX_IMAGE_PIXELS  # set back when the command ends: main() may be called again
    try:
        _apply_pixel_limit()
        with warnings.catch_warnings():
            # PIL warns in two lines, naming its own source file, of images of 89 to 179 megapixels, which moceir
            # restores tiled; above that, reading them is refused in one line (moceir.io.load_image)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return int(args.fn(args) or 0)
    except (CheckpointError, UsageError) as e:  # unusable checkpoint or options: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: not a bug; every file is written whole or not at all (atomic writes)
        how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
        if is_rank_zero():  # once, not once per process
            print(f"error: moceir {args.command} {how}; files written before it are complete, the rest was not "
                  "done", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `moceir info ... | head` stopped reading: not a bug, and nothing more to print
        _to_devnull(sys.stdout.fileno())  # so that the exit's flush stays quiet
        return 1
    except OSError as e:  # a full disk, a read-only folder: one line naming the file; anything else is a bug
        from .io import SPECIAL_FILE, OutputAppeared, write_error_advice

        if isinstance(e, OutputAppeared):  # another program wrote an output meanwhile: kept, not replaced
            print(f"error: {e}", file=sys.stderr)
            return 1
        if e.filename and e.strerror == SPECIAL_FILE:  # one that appeared after the checks
            print(f"error: {e.filename} {SPECIAL_FILE}", file=sys.stderr)
            return 1
        if e.errno in (errno.EMFILE, errno.ENFILE):  # a loader's worker pipes under a low `ulimit -n`
            print(f"error: too many open files ({e.strerror}); raise the limit (ulimit -n) or pass a lower "
                  "--num_workers", file=sys.stderr)
            return 1
        advice = write_error_advice(e.errno, "output path")
        if advice is None or not e.filename:
            raise
        print(f"error: {e.filename}: {e.strerror}; {advice}", file=sys.stderr)
        return 1
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit
        if replaced is not None:  # an in-process caller (tests, a notebook) gets its own SIGTERM back
            import signal

            signal.signal(signal.SIGTERM, replaced)

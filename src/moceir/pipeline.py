"""The batch restore pipeline behind ``moceir restore``, :func:`moceir.restore_files` and the demo.

Inputs (files, folders, globs) become planned outputs up front: collision-free, never an input, never an
existing file without ``overwrite``, never written through a link. Loader workers decode images; same-size
images are restored together; images too large for the memory budget are tiled; a background writer encodes
each output atomically; every failure is one line naming the file, and the rest of the batch goes on.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .inference import ROUTING_MODES, auto_tile, memory_budget, restore_tensor
from .io import IMAGE_EXTS, ImageReadError, LoadedImage, list_images, load_image, save_image

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CONTEXT_PAD = 16


class UsageError(ValueError):
    """Options that cannot work (a report path that is an input, fp16 on a CPU, ...): one line, nothing done."""


@dataclass(frozen=True)
class Job:
    """One input image and the file its restoration goes to."""

    input: Path
    output: Path


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> CUDA if available else CPU; a CUDA request without CUDA is a UsageError."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} requested but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def gather_inputs(specs: list[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files, folders (their images, not recursive) and globs -> (unique absolute files, [(spec, error line)])."""
    files, errors = [], []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = list_images(p)
            if not found:
                errors.append((str(spec), f"{p}: folder has no images ({', '.join(e[1:] for e in IMAGE_EXTS)}); "
                                          "nothing to restore there"))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(spec)) if Path(m).is_file())
            if not matches:
                errors.append((str(spec), f"{spec}: no such file, folder or matching glob"))
            files += matches
    return list(dict.fromkeys(f.resolve() for f in files)), errors


def plan_outputs(files: list[Path], out_dir: Path, ext: str | None = None,
                 suffix: str = "") -> tuple[list[Job], list[str]]:
    """Name every output before anything is written; returns (jobs, notes about renamed outputs).

    Outputs are ``<stem><suffix><ext>`` in ``out_dir``. Inputs that would share a name (``a/x.png`` and
    ``b/x.png``, or ``y.png`` and ``y.jpg`` with ``--ext png``; compared case-insensitively) each get their
    parent folder's name, else their own extension, else a number appended, and a note says so.
    """
    out_dir = Path(os.path.abspath(out_dir))

    def target_ext(f: Path) -> str:
        return ("." + ext.lstrip(".")) if ext else f.suffix

    names = {f: f"{f.stem}{suffix}{target_ext(f)}" for f in files}
    clashes = Counter(n.lower() for n in names.values())
    taken = {n.lower() for n, c in clashes.items() if c == 1}
    notes = []
    for name in [n for n, c in clashes.items() if c > 1]:
        group = [f for f in files if names[f].lower() == name]
        parents = [f.parent.name for f in group]
        exts = [f.suffix.lstrip(".").lower() for f in group]
        tags = parents if len(set(parents)) == len(group) else exts if len(set(exts)) == len(group) else None
        for i, f in enumerate(group):
            tag = tags[i] if tags else str(i + 1)
            new = f"{f.stem}{suffix}_{tag}{target_ext(f)}"
            n = 2
            while new.lower() in taken or new.lower() in clashes:
                new, n = f"{f.stem}{suffix}_{tag}_{n}{target_ext(f)}", n + 1
            taken.add(new.lower())
            names[f] = new
        notes.append(f"{len(group)} inputs would share the output name {name}: writing "
                     + ", ".join(f"{f} -> {names[f]}" for f in group))
    return [Job(f, out_dir / names[f]) for f in files], notes


def output_problem(job: Job, inputs: set[Path], overwrite: bool) -> str | None:
    """Why ``job.output`` must not be written, or None. Links are judged as links, never followed."""
    out = job.output
    if out in inputs or (out.exists() and out.resolve() in inputs):
        return f"output {out} would overwrite an input; choose another -o or --suffix"
    if out.is_dir():
        return f"output {out} is a folder; choose another -o or --suffix"
    if os.path.lexists(out) and not overwrite:
        kind = "a link" if out.is_symlink() else "a file"
        return f"output {out} exists ({kind}); pass --overwrite to replace it"
    return None


def check_report_path(report: str | Path, inputs: set[Path], outputs: set[Path], overwrite: bool) -> Path:
    """The report follows the outputs' rules; a problem is a UsageError before any image is restored."""
    path = Path(os.path.abspath(report))
    if path in inputs or (path.exists() and path.resolve() in inputs):
        raise UsageError(f"--report {report} is one of the inputs; choose another path")
    if path in outputs:
        raise UsageError(f"--report {report} is also an output image's path; choose another path")
    if not path.parent.is_dir():
        raise UsageError(f"--report {report}: folder {path.parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise UsageError(f"--report {report} is a folder; give a file name such as report.json")
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"--report {report} exists; pass --overwrite to replace it")
    return path


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write through ``write(tmp)`` into a fresh temporary file beside ``target``, then move it into place.

    Without ``overwrite`` the move is a hard link, which fails if anything (a file, a dangling link) appeared
    at ``target`` meanwhile; with it, ``os.replace`` swaps the name itself, so a link there is replaced, not
    followed.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target, follow_symlinks=False)
            except FileExistsError:
                raise OSError(f"output {target} appeared while restoring; pass --overwrite to replace it") from None
            except OSError:  # a filesystem without hard links
                if os.path.lexists(target):
                    raise
                os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item in a loader worker: (index, LoadedImage or None, error line or None)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, LoadedImage | None, str | None]:
        try:
            return i, load_image(self.paths[i]), None
        except ImageReadError as e:
            return i, None, str(e)
        except MemoryError:
            return i, None, f"{self.paths[i]}: out of memory while decoding; restore a downscaled copy"


def _as_is(item: Any) -> Any:
    return item


def _error_line(path: Path, e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "out of memory" in msg.lower() or isinstance(e, MemoryError):
        msg = "out of memory; retry with --max_memory 2GB (or --tile 256) and --batch_size 1"
    return msg if str(path) in msg else f"{path}: {msg}"


def _load(model: Any, device: torch.device) -> Any:
    from .models import MoCEIR
    from .models.checkpoints import load_model

    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    if isinstance(model, MoCEIR):
        return model.to(device).eval()
    return model


def restore_files(inputs: list[str | Path] | str | Path, output_dir: str | Path, model: Any = "default", *,
                  device: str | torch.device = "auto", tile: int | None = None, tile_overlap: int = 32,
                  tile_routing: str = "tile", batch_size: int = 4, precision: str = "fp32", ext: str | None = None,
                  suffix: str = "", overwrite: bool = False, report: str | Path | None = None,
                  context_pad: int = DEFAULT_CONTEXT_PAD, max_memory: float | None = None, num_workers: int = 0,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> list[dict]:
    """Restore image files, folders and globs into ``output_dir``, as ``moceir restore`` does.

    model: "default", a checkpoint path or a loaded network. Images of one size go through the network
    ``batch_size`` at a time; an image whose estimated peak memory exceeds ``max_memory`` bytes (default:
    :func:`moceir.inference.memory_budget`) is tiled (``tile`` forces a tile size). ``context_pad`` px of
    reflected context are added around each image and cropped away, which removes the dark frame that the
    network's zero-padded convolutions leave (0 turns it off). ``num_workers`` loader processes decode ahead.

    Returns one dict per input: ``input, output, height, width, seconds, batch, tile, experts`` (the expert
    per MoE layer) for restored images, ``input, error`` for failures. Raises :class:`UsageError` for options
    that cannot work, before any image is read, and ``CheckpointError`` for an unusable checkpoint.
    """
    from tqdm import tqdm

    say = log or (lambda line: print(line, file=sys.stderr))
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if tile_routing not in ROUTING_MODES:
        raise UsageError(f"tile_routing must be one of {ROUTING_MODES}, got {tile_routing!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    if batch_size < 1 or tile_overlap < 0 or context_pad < 0 or num_workers < 0:
        raise UsageError("batch_size must be >= 1 and tile_overlap, context_pad, num_workers >= 0")
    device = resolve_device(device)
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA device; use fp32 on {device.type}")
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"-o {out_dir} is a file; give a folder for the restored images")

    files, errors = gather_inputs(specs)
    rows: dict[int, dict] = {}
    failures = [{"input": spec, "error": e} for spec, e in errors]
    for row in failures:
        say(f"error: {row['error']}")
    jobs, notes = plan_outputs(files, out_dir, ext, suffix)
    for n in notes:
        say(f"note: {n}")
    input_set = set(files)
    report_path = (check_report_path(report, input_set, {j.output for j in jobs}, overwrite)
                   if report is not None else None)
    net = _load(model, device)
    budget = max_memory if max_memory is not None else memory_budget(device)

    def fail(i: int, e: BaseException | str) -> None:
        line = e if isinstance(e, str) else _error_line(jobs[i].input, e)
        rows[i] = {"input": str(jobs[i].input), "error": line}
        say(f"error: {line}")

    todo = []
    for i, job in enumerate(jobs):
        problem = output_problem(job, input_set, overwrite)
        if problem:
            fail(i, problem)
        else:
            todo.append(i)
    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moceir-writer")
    pending_writes: list[Future] = []

    def write(i: int, y: np.ndarray, img: LoadedImage, row: dict) -> None:
        try:
            write_atomically(jobs[i].output, lambda tmp: save_image(tmp, y, img.alpha, img.bit_depth, img.grayscale),
                             overwrite)
            rows[i] = row
        except (OSError, ValueError) as e:
            fail(i, e)

    def run(batch: list[tuple[int, LoadedImage, int | None]], bar: tqdm) -> None:
        """Restore same-size images together (a tiled image always alone); hand each result to the writer."""
        tile_size = batch[0][2]
        tiles_bar = None
        try:
            x = torch.from_numpy(np.stack([img.rgb.transpose(2, 0, 1) for _, img, _ in batch])).to(device)
            on_tile = None
            if tile_size is not None and progress:
                tiles_bar = tqdm(desc=f"  tiles of {jobs[batch[0][0]].input.name}", unit="tile", leave=False)
                on_tile = lambda done, total: (setattr(tiles_bar, "total", total), tiles_bar.update(1))  # noqa: E731
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                y, experts = restore_tensor(net, x, tile_size, tile_overlap, tile_routing, return_experts=True,
                                            on_tile=on_tile, context_pad=context_pad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / len(batch)
            h, w = batch[0][1].rgb.shape[:2]
            y = y.float().clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()
            del x
        except (RuntimeError, MemoryError) as e:
            for i, *_ in batch:
                fail(i, e)
            return
        finally:
            if tiles_bar is not None:
                tiles_bar.close()
        for b, (i, img, _) in enumerate(batch):
            row = {"input": str(jobs[i].input), "output": str(jobs[i].output), "height": h, "width": w,
                   "seconds": round(seconds, 3), "batch": len(batch), "tile": tile_size,
                   "experts": experts[:, min(b, experts.shape[1] - 1), 0].tolist()}
            while len([f for f in pending_writes if not f.done()]) >= 2 * batch_size:  # bound queued outputs
                next(f for f in pending_writes if not f.done()).result()
            pending_writes.append(writer.submit(write, i, y[b], img, row))

    loader = torch.utils.data.DataLoader(_ImageFiles([jobs[i].input for i in todo]), batch_size=None,
                                         num_workers=num_workers, collate_fn=_as_is)
    m = net.config.size_multiple
    pending: list[tuple[int, LoadedImage, int | None]] = []
    try:
        with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="restoring", unit="img",
                  disable=not progress) as bar:
            for k, img, err in loader:
                i = todo[k]
                if err is not None:
                    fail(i, err)
                    bar.update(1)
                    continue
                if img.frames > 1:
                    say(f"note: {jobs[i].input} has {img.frames} frames; only the first is restored")
                h, w = img.rgb.shape[:2]
                side = 2 * min(context_pad, h - 1, w - 1)
                tile_size = tile or auto_tile(net, h + side + m, w + side + m, budget)
                if pending and (tile_size is not None or pending[0][2] is not None or len(pending) >= batch_size
                                or pending[0][1].rgb.shape != img.rgb.shape):
                    run(pending, bar)
                    bar.update(len(pending))
                    pending = []
                pending.append((i, img, tile_size))
            if pending:
                run(pending, bar)
                bar.update(len(pending))
    finally:
        writer.shutdown(wait=True)
    ordered = failures + [rows[i] for i in sorted(rows)]
    if report_path is not None:
        doc = {"checkpoint": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
               "images": [r for r in ordered if "error" not in r], "errors": [r["error"] for r in ordered
                                                                              if "error" in r]}
        write_atomically(report_path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)), overwrite)
    return ordered

"""The batch restore pipeline behind ``moceir restore``, :func:`moceir.restore_files` and the demo.

Inputs (files, folders, globs) become planned outputs up front: collision-free, never an input, never an
existing file without ``overwrite``, never written through a link. Loader workers decode images; same-size
images are restored together; images too large for the memory budget are tiled; a background writer encodes
each output atomically; every failure is one line naming the file, and the rest of the batch goes on.
"""

from __future__ import annotations

import errno
import gc
import glob
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import numpy as np
import torch

from . import metadata
from .checks import is_whole, not_a_bool
from .cuda_graphs import GraphedNetwork
from .flops import image_experts
from .inference import auto_tile, batch_that_fits, check_restore_options, memory_budget, restore_tensor
from .io import (NO_ALPHA_EXTS, ON_OFF_ALPHA_EXTS, SIXTEEN_BIT_EXTS, SPECIAL_FILE, WRITABLE_EXTS, ImageReadError,
                 LoadedImage, OutputAppeared, file_problem, format_size_problem, image_size, load_image_noting,
                 save_image, special_file, write_atomically, write_error_advice)
from .models import MoCEIR
from .models.checkpoints import CheckpointError
from .runtime import UsageError, resolve_device  # noqa: F401 - both long lived here; callers import them from here
from .runtime import is_rank_zero

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CONTEXT_PAD = 16


@dataclass(frozen=True)
class Job:
    """One input image and the file its restoration goes to."""

    input: Path
    output: Path


def gather_inputs(specs: list[str | Path], output_dir: str | Path | None = None
                  ) -> tuple[list[Path], list[tuple[str, str]], list[str]]:
    """Files, folders (their images, not recursive, hidden files left out) and globs -> (absolute files, [(spec,
    error line)], notes).

    A file is named as given (a link keeps its own name, which its output takes), and restored once: a second
    name for it (a link to it, the folder it is in reached through a link) is dropped with a note. A glob's match
    that is ``output_dir`` is left out, with a note: a rerun would restore the earlier run's outputs.
    """
    files, errors, notes = [], [], []
    skip = os.path.realpath(output_dir) if output_dir is not None else None
    for spec in specs:
        try:
            found, problems, said = _gather(spec, skip)
        except OSError as e:  # a name longer than the file system allows, a folder that cannot be listed
            why = write_error_advice(e.errno, "input") or "check the path"
            found, problems, said = [], [f"{spec}: {e.strerror or e}; {why}"], []
        files += found
        errors += [(str(spec), line) for line in problems]
        notes += said
    first: dict[Path, Path] = {}  # the file itself -> the name it is restored under
    again: dict[tuple[Path, Path], list[tuple[Path, Path]]] = {}  # (folder, its first folder) -> second names
    # the folder resolved (link/.. is the link's parent), not the name; a name given twice counts once
    for f in dict.fromkeys(Path(os.path.realpath(f.parent)) / f.name for f in files):
        same = first.setdefault(f.resolve(), f)
        if same != f:
            again.setdefault((f.parent, same.parent), []).append((f, same))
    notes += [f"{pairs[0][0]} is the same file as {pairs[0][1]}; restoring it once, under the name {pairs[0][1].name}"
              if len(pairs) == 1 else f"{len(pairs)} files in {folder} are the same files as in {kept}; restoring "
              "each once, under its name there" for (folder, kept), pairs in again.items()]
    return list(first.values()), errors, notes


def _gather(spec: str | Path, output_dir: str | None = None) -> tuple[list[Path], list[str], list[str]]:
    """The image files that one input names, error lines for what it names that cannot be read, and notes.
    ``output_dir``: the output folder's real path, left out where a glob matches it."""
    p = Path(spec)
    if p.is_dir():  # the benchmarks' formats and GIF, which restore reads too; not hidden files (as training)
        found, problems = _files_and_problems(f for f in p.iterdir() if f.suffix.lower() in WRITABLE_EXTS
                                              and not f.name.startswith("."))
        if not found and not problems:
            hidden = sorted(f.name for f in p.iterdir() if f.suffix.lower() in WRITABLE_EXTS)
            left_out = (f" but {len(hidden)} hidden file(s) ({', '.join(hidden[:3])}{', ...' * (len(hidden) > 3)}), "
                        "left out as training leaves them out; name them to restore them" if hidden else
                        "; nothing to restore there")
            problems = [f"{p}: folder has no images ({', '.join(e[1:] for e in WRITABLE_EXTS)}){left_out}"]
        return found, problems, []
    if p.is_file():
        return [p], [], []
    if os.path.lexists(p):  # a link loop or to nothing, a pipe, a device: say so, not "no such file"
        return [], [f"{p}: {file_problem(p)}; pass an image file"], []
    matches = [Path(m) for m in glob.glob(str(spec))]
    files = [m for m in matches if not m.is_dir()]
    in_output = [m for m in files if os.path.realpath(m.parent) == output_dir]
    if len(in_output) == len(files):  # all in the output folder: restoring in place ('photos/*.jpg' -o photos)
        in_output = []
    found, problems = _files_and_problems(m for m in files if m not in in_output)
    notes = [f"{len(in_output)} file(s) in the output folder {in_output[0].parent}, which {spec} matches, are left "
             "out (earlier outputs); name them to restore them"] if in_output else []
    for folder in sorted(m for m in matches if m.is_dir()):  # as the shell's expansion of the glob would give
        if os.path.realpath(folder) == output_dir:
            notes.insert(0, f"{folder}: the output folder, which {spec} matches, is left out (its images are "
                         "earlier outputs)")
            continue
        in_folder, trouble, _ = _gather(folder)
        found, problems = found + in_folder, problems + trouble
    if not found and not problems and not notes:
        problems = [f"{spec}: no such file, folder or matching glob"]
    return found, problems, notes


def _files_and_problems(paths: Iterable[Path]) -> tuple[list[Path], list[str]]:
    """The regular files among ``paths``, sorted, and an error line for each one that is neither a file nor a
    folder (a folder's or a glob's link that leads nowhere, pipe or device: they were skipped without a word)."""
    paths = sorted(paths)
    odd = [p for p in paths if not p.is_file() and not p.is_dir()]
    return [p for p in paths if p.is_file()], [
        f"{p}: {file_problem(p)}; {'fix or remove the link' if p.is_symlink() else 'pass an image file'}" for p in odd]


def plan_outputs(files: list[Path], out_dir: Path, ext: str | None = None,
                 suffix: str = "") -> tuple[list[Job], list[str]]:
    """Name every output before anything is written; returns (jobs, notes about renamed outputs).

    Outputs are ``<stem><suffix><ext>`` in ``out_dir``; without ``ext``, the input's extension, or ``.png`` where
    :func:`moceir.io.save_image` cannot write it (a note says so). Inputs that would share a name (``a/x.png`` and
    ``b/x.png``, or ``y.png`` and ``y.jpg`` with ``--ext png``; compared case-insensitively) each get their
    parent folder's name, else their own extension, else a number appended, and a note says so.
    """
    out_dir = Path(os.path.abspath(out_dir))
    check_name_parts(ext, suffix)
    notes = []

    def target_ext(f: Path) -> str:
        if ext:
            return "." + ext.lstrip(".")
        return f.suffix if f.suffix.lower() in WRITABLE_EXTS else ".png"

    for f in files:
        if not ext and f.suffix.lower() not in WRITABLE_EXTS:
            notes.append(f"{f}: moceir does not write {f.suffix or 'files without an extension'}; writing PNG")
    names = {f: f"{f.stem}{suffix}{target_ext(f)}" for f in files}
    sharing: dict[str, list[Path]] = {}  # a name, lower-case -> the inputs whose output would take it
    for f in files:
        sharing.setdefault(names[f].lower(), []).append(f)
    clashes = {n: len(group) for n, group in sharing.items()}
    taken = {n for n, c in clashes.items() if c == 1}
    for name in [n for n, c in clashes.items() if c > 1]:
        group = sharing[name]
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


NAME_MAX = 255  # bytes in a file name on Linux and macOS file systems (NTFS: 255 characters)


def check_name_parts(ext: str | None, suffix: str) -> None:
    """A UsageError for an ``ext`` save_image cannot write or a ``suffix`` that would leave the output folder."""
    if ext and "." + ext.lstrip(".").lower() not in WRITABLE_EXTS:
        raise UsageError(f"--ext {ext}: cannot write that format; use one of "
                         + ", ".join(e[1:] for e in WRITABLE_EXTS))
    try:
        size = len(os.fsencode(suffix))
    except UnicodeEncodeError:  # a lone surrogate from Python code
        raise UsageError(f"--suffix {suffix!r} holds characters a file name cannot; give plain text") from None
    if size > NAME_MAX - 5:  # room for a one-character name and ".png"
        raise UsageError(f"--suffix of {size} bytes leaves no room for a name and an extension "
                         f"within the {NAME_MAX} bytes a file name can hold; give a shorter --suffix")
    if any(c in suffix for c in ("/", "\\", os.sep, "\0")) or suffix in (".", ".."):
        raise UsageError(f"--suffix {suffix!r} is or holds a path part (a separator, '.' or '..'); give text to "
                         "append to the file names")


def folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be made or written in (a file on its path, no write permission), or None."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if os.path.lexists(p))
    if existing.is_symlink() and not existing.exists():  # a link loop, or a link to nothing
        return f"{existing} {file_problem(existing)}, not a folder"
    if not existing.is_dir():
        return f"{existing} is {_not_a_folder(existing)}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        return f"folder {existing} is {'on a read-only file system' if read_only else 'not writable'}"
    return None


def _not_a_folder(path: Path) -> str:
    """What ``path``, which exists and is no folder, is: "a file" or "a device, pipe or socket"."""
    return "a file" if os.path.isfile(path) else "a device, pipe or socket"


def check_output_dir(out_dir: Path) -> None:
    """A UsageError, before any work, where the output folder cannot be made or written."""
    out_dir = Path(os.path.abspath(out_dir))
    # os.path, not Path.exists, which raised in a folder without search permission: folder_problem names that
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"-o {out_dir} is {_not_a_folder(out_dir)}; give a folder for the restored images")
    problem = folder_problem(out_dir)
    if problem:
        raise UsageError(f"-o {out_dir}: {problem}; choose another -o")


def output_problem(job: Job, inputs: set[Path], overwrite: bool, skipped: Collection[Path] = ()) -> str | None:
    """Why ``job.output`` must not be written, or None. Links are judged as links, never followed. ``skipped``:
    inputs left out as another input's output name (see :func:`plan_restore`), which are not replaced either."""
    out = job.output
    if Path(os.path.realpath(out.parent)) / out.name in skipped:
        return (f"output {out} is an input too (left out above); it is not replaced: move it away to restore "
                f"{job.input} again, or choose another -o or --suffix")
    if out in inputs or (out.exists() and out.resolve() in inputs):
        return f"output {out} would overwrite an input; choose another -o or --suffix"
    if out.is_dir():
        return f"output {out} is a folder; choose another -o or --suffix"
    if len(os.fsencode(out.name)) > NAME_MAX:
        return (f"{job.input}: its output name {out.name[:40]}...{out.suffix} is {len(os.fsencode(out.name))} bytes, "
                f"more than the {NAME_MAX} a file name can hold; rename the input (or shorten --suffix or --ext)")
    if os.path.lexists(out) and not overwrite:
        kind = "a link" if out.is_symlink() else "a file"
        return f"output {out} exists ({kind}); pass --overwrite to replace it"
    return None


def check_report_path(report: str | Path, inputs: set[Path], outputs: set[Path], overwrite: bool,
                      out_dir: Path | None = None) -> Path:
    """The report follows the outputs' rules; a problem is a UsageError before any image is restored.

    Its folder must exist and be writable, or be ``out_dir`` (the output folder, made before restoring).
    """
    path = Path(os.path.abspath(report))
    if path in inputs or (path.exists() and path.resolve() in inputs):
        raise UsageError(f"--report {report} is one of the inputs (an image or the checkpoint); choose another "
                         "path")

    def real(p: Path) -> Path:  # through linked folders, without following a link at the name itself
        return Path(os.path.realpath(p.parent)) / p.name

    if path in outputs or real(path) in {real(o) for o in outputs}:
        raise UsageError(f"--report {report} is also an output image's path; choose another path")
    if out_dir is not None and os.path.realpath(path) == os.path.realpath(out_dir):
        raise UsageError(f"--report {report} is the output folder; give a file name such as report.json")
    if path.suffix.lower() in WRITABLE_EXTS:  # JSON under an image's name: a later restore of the folder fails on it
        raise UsageError(f"--report {report}: the report is JSON; name it .json, not {path.suffix}")
    in_out_dir = out_dir is not None and path.parent == Path(os.path.abspath(out_dir))
    if not os.path.lexists(path.parent) and not in_out_dir:
        raise UsageError(f"--report {report}: folder {path.parent} does not exist; create it or choose another path")
    problem = folder_problem(path.parent)
    if problem:
        raise UsageError(f"--report {report}: {problem}; choose another path")
    if path.is_dir():
        raise UsageError(f"--report {report} is a folder; give a file name such as report.json")
    if special_file(path):  # found only when the report was written, after every image
        raise UsageError(f"--report {report} {SPECIAL_FILE}")
    if os.path.lexists(path) and not overwrite:
        raise UsageError(f"--report {report} exists; pass --overwrite to replace it")
    return path


def _through_links(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` with its folders resolved where it names ``..``: the kernel takes ``link/..`` as the parent of the
    link's target, and ``os.path.abspath`` as the folder the link is in, so `-o link/../out` was made in one
    place and written in the other (every image failed)."""
    if ".." not in Path(path).parts:
        return path
    parent, name = os.path.split(os.fspath(path))
    if name in ("", "..", "."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(parent or "."), name)


def _checkpoint_files(model: Any) -> set[Path]:
    """The file ``model`` names ("default": the bundled weights), by its name and its real path; none for a
    loaded network."""
    if not isinstance(model, (str, Path)):
        return set()
    from .models.checkpoints import DEFAULT_WEIGHTS

    path = DEFAULT_WEIGHTS if str(model) == "default" else Path(os.path.abspath(model))
    return {path, path.resolve()}


@dataclass(frozen=True)
class RestoreOptions:
    """How images are restored; see :func:`restore_files` for each field."""

    tile: int | None = None
    tile_overlap: int = 32
    tile_routing: str = "tile"
    batch_size: int | None = None  # None: 1 on CPU, 4 on CUDA (see restore_files)
    precision: str = "fp32"
    context_pad: int = DEFAULT_CONTEXT_PAD
    max_memory: float | None = None
    overwrite: bool = False
    cuda_graphs: bool = False  # replay a captured CUDA graph per input shape (moceir.cuda_graphs)
    strip_metadata: bool = False  # write no EXIF, XMP or resolution (a photo's camera, date, place)

    def __post_init__(self) -> None:
        for flag in ("overwrite", "cuda_graphs", "strip_metadata"):  # files replaced on a "no"
            if problem := not_a_bool(flag, getattr(self, flag)):
                raise UsageError(problem)
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {tuple(PRECISIONS)}, got {self.precision!r}")
        if self.batch_size is not None and not (is_whole(self.batch_size) and self.batch_size >= 1):
            raise UsageError(f"batch_size must be an integer >= 1 (or None), got {self.batch_size!r}")
        try:
            check_restore_options(self.tile, self.tile_overlap, self.tile_routing, self.context_pad, self.max_memory,
                                  overlap_name="tile_overlap", routing_name="tile_routing")
        except ValueError as e:
            raise UsageError(str(e)) from None


@dataclass
class Plan:
    """Everything decided before an image is decoded: outputs, refusals, and batches of same-size images."""

    jobs: list[Job]
    batches: list[list[int]]  # indices into jobs; each batch restored in one pass (a tiled image alone)
    failures: list[dict]  # rows of inputs refused up front
    report: Path | None


def _earlier_outputs(inputs: list[str | Path], jobs: list[Job], out_dir: Path) -> dict[Path, Path]:
    """{input a folder or glob gave that bears another input's output name, where -o is its folder (a rerun:
    ``a_r.png`` of ``a.png``): that input}. A file named on the command line is never among them."""
    named = {Path(s).resolve() for s in map(str, inputs) if os.path.isfile(s)}  # the files themselves
    real_out = Path(os.path.realpath(out_dir))
    made_here = {real_out / job.output.name: job.input for job in jobs}
    # a_r_r.png, a_r.png's output name, goes too where a_r.png does: it is an earlier rerun's output
    return {job.input: made_here[job.input] for job in jobs
            if made_here.get(job.input, job.input) != job.input and job.input.resolve() not in named}


def plan_restore(inputs: list[str | Path], output_dir: str | Path, model: Any, options: RestoreOptions,
                 ext: str | None = None, suffix: str = "", report: str | Path | None = None,
                 budget: float | None = None, log: Callable[[str], None] = print,
                 checkpoint_files: set[Path] = frozenset()) -> Plan:
    """Gather inputs, name and check outputs, check the report path, group same-size images into batches.

    ``checkpoint_files``: the model's file (see :func:`_checkpoint_files`), which the report must not replace.

    Raises UsageError for options that cannot work (nothing has been written then).
    """
    out_dir = Path(output_dir)
    check_output_dir(out_dir)
    files, errors, same_files = gather_inputs(inputs, out_dir)
    failures = [{"input": spec, "error": e} for spec, e in errors]
    protected = set(files) | {f.resolve() for f in files}  # the names given and the files they lead to
    jobs, notes = plan_outputs(files, out_dir, ext, suffix)
    if skipped := _earlier_outputs(inputs, jobs, out_dir):  # named again without them
        jobs, notes = plan_outputs([f for f in files if f not in skipped], out_dir, ext, suffix)
    notes = same_files + [f"{f}: has the name of {by}'s output (an earlier run's?): it is neither restored nor "
                          "replaced" for f, by in skipped.items()] + notes
    for row in failures:
        log(f"error: {row['error']}")
    for n in notes:
        log(f"note: {n}")
    input_set = protected | checkpoint_files  # `--report` naming the checkpoint replaced the model
    report_path = (check_report_path(report, input_set, {j.output for j in jobs}, options.overwrite, out_dir)
                   if report is not None else None)
    by_size: dict[tuple[int, int] | int, list[int]] = {}
    for i, job in enumerate(jobs):
        problem = output_problem(job, input_set, options.overwrite, skipped)
        if problem:
            failures.append({"input": str(job.input), "error": problem})
            log(f"error: {problem}")
            continue
        size = image_size(job.input)
        problem = format_size_problem(job.output, *size) if size is not None else None
        if problem:  # before restoring it: the output could not be written
            failures.append({"input": str(job.input), "error": problem})
            log(f"error: {problem}")
            continue
        alone = size is None or options.tile is not None or (
            budget is not None and auto_tile(model, *_padded(size, options.context_pad), budget) is not None)
        by_size.setdefault(-i - 1 if alone else size, []).append(i)
    batches = []
    for size, group in by_size.items():
        n = options.batch_size or 1
        if budget is not None and isinstance(size, tuple):  # never more together than the budget allows
            n = batch_that_fits(model, *_padded(size, options.context_pad), budget, n)
        batches += [group[k:k + n] for k in range(0, len(group), n)]
    return Plan(jobs, sorted(batches), failures, report_path)


def _partly_transparent(alpha: np.ndarray) -> bool:
    """Whether an alpha plane [H, W] in [0, 1] holds values other than fully opaque or transparent."""
    return bool(((alpha > 0) & (alpha < 1)).any())


def _padded(size: tuple[int, int], context_pad: int) -> tuple[int, int]:
    h, w = size
    side = 2 * max(0, min(context_pad, h - 1, w - 1))
    return h + side + 8, w + side + 8


class ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item, in a loader worker: (index, LoadedImage or None, error line or None)."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> tuple[int, LoadedImage | None, str | None]:
        try:
            return i, load_image_noting(self.jobs[i].input), None
        except ImageReadError as e:
            return i, None, str(e)
        except MemoryError:
            return i, None, f"{self.jobs[i].input}: out of memory while decoding; restore a downscaled copy"


def as_list(items: list) -> list:
    """collate_fn that keeps decoded images as they are."""
    return items


# Line breaks and other control characters, as escapes: str.translate's table.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(32), 127, 0x85)} | {c: f"\\u{c:04x}" for c in (0x2028, 0x2029)}


def one_line(text: str) -> str:
    """``text`` with line breaks and control characters escaped (a newline becomes ``\\x0a``): a file name that
    holds them cannot split a message that is one line per image, or forge another line."""
    return text.translate(_CONTROL_ESCAPES)


def _error_line(path: Path, e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "out of memory" in msg.lower() or isinstance(e, MemoryError):
        msg = "out of memory; retry with --max_memory 2GB (or --tile 256) and --batch_size 1"
    return msg if str(path) in msg else f"{path}: {msg}"


def _write_error_line(job: Job, e: OSError) -> str:
    """The input, the output that could not be written, why, and what to do (a disk full, a permission)."""
    advice = write_error_advice(e.errno, "-o") or "choose another -o"
    return f"{job.input}: cannot write {job.output}: {e.strerror or e}; {advice}"


class OnnxNetwork:
    """An ONNX Runtime model (:func:`moceir.onnx.load_onnx`) behind the calls restore_tensor makes of a network.

    It runs on ONNX Runtime's providers; its results come back as CPU tensors.
    """

    def __init__(self, onnx_model: Any):
        from types import SimpleNamespace

        self.onnx, self.config, self.note = onnx_model, onnx_model.config, onnx_model.note
        self.num_moe_layers = onnx_model.num_moe_layers
        self._output = SimpleNamespace

    def __call__(self, x: torch.Tensor, return_aux: bool = False, experts: torch.Tensor | None = None) -> Any:
        if experts is not None:
            raise UsageError("--tile_routing global needs the PyTorch model; ONNX models route each tile (tile)")
        image, chosen = self.onnx(x.float())
        return self._output(image=image, expert_indices=chosen) if return_aux else image

    def eval(self) -> "OnnxNetwork":
        return self


def is_onnx_file(model: Any) -> bool:
    """Whether ``model`` names an ONNX file (by its suffix, case-insensitive), which ONNX Runtime runs."""
    return isinstance(model, (str, Path)) and str(model).lower().endswith(".onnx")


def load_network(model: Any, device: torch.device) -> Any:
    """A checkpoint path, "default" or a ``.onnx`` file -> the network on ``device``; a network is moved there.

    ``.onnx`` files run in ONNX Runtime (:class:`OnnxNetwork`) on the CPU, or on CUDA where its GPU package is
    installed and ``device`` is a GPU.
    """
    from .models.checkpoints import load_model

    if is_onnx_file(model):
        from .onnx import load_onnx

        providers = None if device.type == "cuda" else ["CPUExecutionProvider"]
        try:
            return OnnxNetwork(load_onnx(model, providers=providers))
        except CheckpointError:  # its embedded configuration, refused with its own line
            raise
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError(f"cannot use ONNX model {model}: {str(e).splitlines()[0] if str(e) else e!r}") from None
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's own errors for a damaged file
            raise CheckpointError(f"cannot read ONNX model {model}: {type(e).__name__} (is the file complete and "
                                  "written by `moceir export ... model.onnx`?)") from None
    if isinstance(model, (str, Path)):
        return load_model(model, device=device)
    if isinstance(model, MoCEIR):
        return model.to(device).eval()
    if not hasattr(model, "config"):  # a wrapper (torch.compile's, GraphedNetwork, OnnxNetwork) carries one
        raise TypeError(f"model must be \"default\", a checkpoint or .onnx path, or a loaded network, not "
                        f"{type(model).__name__}")
    return model


class Restorer:
    """Restores decoded batches and hands each result to a background writer; collects the report rows.

    Used by :func:`restore_files` in one process and by each rank of a distributed run.
    """

    def __init__(self, net: Any, device: torch.device, jobs: list[Job], options: RestoreOptions, budget: float,
                 log: Callable[[str], None], progress: bool = True,
                 on_tile: Callable[[int, int], None] | None = None):
        self.net, self.device, self.jobs, self.opts, self.budget = net, device, jobs, options, budget
        self.log, self.progress, self.on_tile = log, progress, on_tile
        if options.cuda_graphs:
            self.net = GraphedNetwork(net, log=log)
        self.rows: dict[int, dict] = {}
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moceir-writer")
        self._pending: list[Future] = []
        self.writer_error: BaseException | None = None
        self.gone: Path | None = None  # the output folder, once a write found it removed: nothing more is restored

    def fail(self, i: int, e: BaseException | str, write_errno: int | None = None) -> None:
        """Row i failed; ``write_errno``: its output could not be written (a full disk), the input was fine."""
        line = e if isinstance(e, str) else _error_line(self.jobs[i].input, e)
        self.rows[i] = {"input": str(self.jobs[i].input), "error": line}
        if write_errno is not None:
            self.rows[i]["write_errno"] = write_errno
        self.log(f"error: {line}")

    def process(self, items: list[tuple[int, LoadedImage | None, str | None]]) -> None:
        """Restore one planned batch and queue its outputs for the writer; once the output folder is gone, mark
        the batch's images not restored instead (hours of work whose outputs could not be written)."""
        if self.gone is not None:
            for i, _, err in items:
                self.fail(i, err or f"{self.jobs[i].input}: not restored: the output folder {self.gone} was removed")
            return
        for group in self.groups(items):
            self.submit(self.compute(group))

    def groups(self, items: list[tuple[int, LoadedImage | None, str | None]]) -> list[list[tuple[int, LoadedImage]]]:
        """A planned batch of decoded items -> groups to restore in one pass each.

        Decode failures are reported here; images whose decoded size differs from the header's go alone.
        """
        good = []
        for i, img, err in items:
            if err is not None:
                self.fail(i, err)
            else:
                for said in img.decoder_warnings:
                    self.log(f"note: {self.jobs[i].input}: its decoder warned: {one_line(said)}")
                for said in img.conversions:
                    self.log(f"note: {self.jobs[i].input}: {said}")
                if img.frames > 1:
                    self.log(f"note: {self.jobs[i].input} has {img.frames} frames; only the first is restored")
                if self.opts.strip_metadata:
                    img = replace(img, photo=metadata.without_metadata(img.photo))
                out_ext = self.jobs[i].output.suffix.lower()
                if img.alpha is not None and out_ext in NO_ALPHA_EXTS:
                    self.log(f"note: {self.jobs[i].input} has an alpha channel, which {out_ext} cannot hold; it is "
                             "dropped (--ext png keeps it)")
                elif img.alpha is not None and out_ext in ON_OFF_ALPHA_EXTS and _partly_transparent(img.alpha):
                    self.log(f"note: {self.jobs[i].input} has partial transparency, which {out_ext} cannot hold; "
                             "pixels under half opacity become transparent, the others opaque (--ext png keeps it)")
                if lost := metadata.dropped(img.photo, out_ext):
                    limit = " (a JPEG holds at most 64 kB of each)" if out_ext in (".jpg", ".jpeg") else ""
                    what = ", ".join(lost[:-1]) + " and " * (len(lost) > 1) + lost[-1]
                    self.log(f"note: {self.jobs[i].input}: its {what} cannot be kept in a {out_ext} file{limit}; "
                             f"{'they are' if len(lost) > 1 else 'it is'} dropped (--ext png keeps "
                             f"{'them' if len(lost) > 1 else 'it'})")
                if img.photo.exif_unreadable:
                    self.log(f"note: {self.jobs[i].input}: its EXIF block could not be read, so it is dropped "
                             "(kept unread, an orientation in it could turn the restored picture wrongly)")
                if img.bit_depth == 16 and out_ext not in SIXTEEN_BIT_EXTS:
                    self.log(f"note: {self.jobs[i].input} has 16 bits per sample, which {out_ext} cannot hold; it "
                             "is written with 8 (--ext png or tif keeps 16)")
                good.append((i, img))
        if len({img.rgb.shape for _, img in good}) <= 1:
            return [good] if good else []
        return [[g] for g in good]

    def compute(self, group: list[tuple[int, LoadedImage]]) -> list[tuple[int, np.ndarray, LoadedImage, dict]]:
        """Restore same-size images in one pass -> [(job index, restored [H, W, 3] float, image, report row)].

        A failure (e.g. out of memory) is reported for each image of the group, which then returns nothing.
        """
        from tqdm import tqdm

        h, w = group[0][1].rgb.shape[:2]
        opts = self.opts
        tile = opts.tile or auto_tile(self.net, *_padded((h, w), opts.context_pad), self.budget)
        tiles_bar = None
        try:
            x = torch.from_numpy(np.stack([img.rgb.transpose(2, 0, 1) for _, img in group])).to(self.device)
            on_tile = self.on_tile
            if tile is not None and self.progress:
                tiles_bar = tqdm(desc=f"  tiles of {self.jobs[group[0][0]].input.name}", unit="tile", leave=False)

                def on_tile(done: int, total: int) -> None:
                    tiles_bar.total = total
                    tiles_bar.update(1)
                    if self.on_tile is not None:
                        self.on_tile(done, total)
            dtype = PRECISIONS[opts.precision]
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                y, experts = restore_tensor(self.net, x, tile, opts.tile_overlap, opts.tile_routing,
                                            return_experts=True, on_tile=on_tile, context_pad=opts.context_pad)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = (time.perf_counter() - t0) / len(group)
            del x
            finite = torch.isfinite(y).flatten(1).all(1).tolist()
            y = y.float().clamp_(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        except CheckpointError:  # the model, not this image: every image would fail alike
            raise
        except (RuntimeError, MemoryError) as e:
            for i, _ in group:
                self.fail(i, e)
            return []
        finally:
            if tiles_bar is not None:
                tiles_bar.close()
        experts = torch.as_tensor(experts).cpu()
        for b, (i, _) in enumerate(group):
            if not finite[b]:  # clamp keeps NaN, which would be written as black: never write it
                self.fail(i, f"{self.jobs[i].input}: the model's output holds NaN or inf values, not written; with "
                             "--precision fp16 use bf16 or fp32, else the checkpoint is damaged")
        return [(i, y[b], img, {"input": str(self.jobs[i].input), "output": str(self.jobs[i].output), "height": h,
                                "width": w, "seconds": round(seconds, 3), "batch": len(group), "tile": tile,
                                "experts": image_experts(experts, min(b, experts.shape[1] - 1))})
                for b, (i, img) in enumerate(group) if finite[b]]

    def submit(self, results: list[tuple[int, np.ndarray, LoadedImage, dict]]) -> None:
        """Queue restored images for the background writer (at most 2 x batch_size wait at a time)."""
        for i, y, img, row in results:
            while len(busy := [f for f in self._pending if not f.done()]) >= 2 * self.opts.batch_size:
                wait(busy, return_when=FIRST_COMPLETED)  # not .result(): a writer's bug is raised by close()
            self._pending.append(self._writer.submit(self._write, i, y, img, row))

    def _write(self, i: int, y: np.ndarray, img: LoadedImage, row: dict) -> None:
        try:
            write_atomically(self.jobs[i].output,
                             lambda tmp: save_image(tmp, y, img.alpha, img.bit_depth, img.grayscale, img.icc_profile,
                                                  img.png_colour, img.photo),
                             self.opts.overwrite)
            self.rows[i] = row
        except OSError as e:
            if e.errno is None or isinstance(e, OutputAppeared):  # not the disk's doing: no write_errno
                self.fail(i, e)
            else:
                self.fail(i, _write_error_line(self.jobs[i], e), e.errno)
                folder = self.jobs[i].output.parent
                if e.errno == errno.ENOENT and self.gone is None and not os.path.isdir(folder):
                    self.gone = folder
                    self.log(f"error: the output folder {folder} was removed while restoring; the images not "
                             "restored yet are left, each with a line; restore them again into a folder")
        except ValueError as e:
            self.fail(i, e)
        except BaseException as e:  # a bug: the image is counted as failed, and close() raises it
            self.fail(i, e)
            raise

    def close(self) -> dict[int, dict]:
        """Wait for every output to be written; returns the rows by job index.

        An unexpected error in the writer (a bug) is kept in ``writer_error`` (its image's row holds the error),
        for the caller to raise after writing the report: no image is ever dropped without a word.
        """
        self._writer.shutdown(wait=True)
        self.writer_error = next((e for f in self._pending if (e := f.exception()) is not None), None)
        return self.rows


class ReportError(OSError):
    """The report could not be written after the images were restored; ``rows`` holds what restore_files would
    have returned."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def write_report(path: Path, model: Any, rows: list[dict], overwrite: bool) -> None:
    """The report as JSON; a write failure (a full disk) is a ReportError naming the file."""
    doc = {"checkpoint": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
           "images": [r for r in rows if "error" not in r], "errors": [r["error"] for r in rows if "error" in r]}
    try:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)), overwrite)
    except OSError as e:
        advice = write_error_advice(e.errno, "--report") or ("choose another --report" if e.errno else None)
        written = sum("error" not in r for r in rows)
        raise ReportError(f"cannot write the report {path}: {e.strerror or e}; {written} of {len(rows)} image(s) "
                          "were written, not the report" + (f" ({advice})" if advice else ""), rows) from None


def restore_files(inputs: list[str | Path] | str | Path, output_dir: str | Path, model: Any = "default", *,
                  device: str | torch.device = "auto", tile: int | None = None, tile_overlap: int = 32,
                  tile_routing: str = "tile", batch_size: int | None = None, precision: str = "fp32", ext: str | None = None,
                  suffix: str = "", overwrite: bool = False, report: str | Path | None = None,
                  context_pad: int = DEFAULT_CONTEXT_PAD, max_memory: float | None = None, num_workers: int = 0,
                  progress: bool = True, log: Callable[[str], None] | None = None,
                  on_tile: Callable[[int, int], None] | None = None, num_gpus: int = 0, num_nodes: int = 1,
                  num_cpu_processes: int = 1, cuda_graphs: bool = False, strip_metadata: bool = False) -> list[dict]:
    """Restore image files, folders and globs into ``output_dir``, as ``moceir restore`` does.

    model: "default", a checkpoint path or a loaded network (moved to ``device``, left in eval mode). Same-size
    images go through the network ``batch_size`` at a time (default: 1 on CPU, where batches ran slower per image, 4
    on CUDA), and never more than the memory budget allows; an image whose estimated peak memory exceeds
    ``max_memory`` bytes (default: :func:`moceir.inference.memory_budget`) is tiled (``tile`` forces a tile size;
    ``tile_overlap`` and ``tile_routing`` as in :func:`moceir.inference.restore_tensor`). ``context_pad`` px of
    reflected context are added around each image and cropped away, which removes the dark frame that the network's
    zero-padded convolutions leave (0 turns it off). ``num_workers`` loader processes decode ahead; a background
    thread writes. ``ext`` (e.g. "png") and ``suffix`` shape output names; ``overwrite`` allows replacing existing
    outputs (never inputs); ``report`` is a JSON file to write. ``log`` receives notes and error lines;
    ``on_tile(done, total)`` is called after each tile of a tiled image (e.g. for a progress bar in a page).

    ``num_gpus`` (per node), ``num_nodes`` and ``num_cpu_processes`` (per node, on CPU) spread the images over
    processes with Lightning (:mod:`moceir.distributed`); each image is restored exactly once and the outputs
    equal a one-process run. The calling script is re-run once per local process (Lightning's "ddp" launcher) or
    started by ``torchrun`` / SLURM. Every rank returns all rows; rank 0 writes the report.

    ``cuda_graphs`` (CUDA, PyTorch models) replays a captured CUDA graph for every input shape seen twice, e.g. the
    tiles of a large image or a data set of one size (:class:`moceir.cuda_graphs.GraphedNetwork`).

    A photo's EXIF (camera, date, GPS), XMP and resolution are kept where the output format holds them
    (:mod:`moceir.metadata`); ``strip_metadata`` writes none of them (the colour profile is kept).

    Returns one dict per input: ``input, output, height, width, seconds, batch, tile, experts`` (the expert
    chosen in each MoE layer; with top-k routing, the list of its k experts) for restored images, ``input, error``
    for failures (and ``write_errno`` where the image was restored but its output could not be written: a full
    disk). Raises :class:`UsageError`
    for options that cannot work, before any image is read, ``CheckpointError`` for an unusable checkpoint, and
    :class:`ReportError` (its ``rows`` as above) where the images were written but the report could not be.
    """
    from tqdm import tqdm

    from .distributed import Launch, restore_distributed

    launch = Launch(0 if num_gpus is None else num_gpus, num_nodes, num_cpu_processes)
    emit = log or (lambda line: tqdm.write(line, file=sys.stderr))  # above the progress bar, not inside it

    def say(line: str) -> None:
        emit(one_line(line))

    quiet_rank = not is_rank_zero()  # a re-run process: notes and progress come from rank 0 only
    plan_log = (lambda line: say(line) if line.startswith("error") else None) if quiet_rank else say
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise UsageError(f"output_dir must be a folder path (a non-empty str or Path), not {output_dir!r}")
    if inputs is None or isinstance(inputs, bytes):
        raise UsageError(f"inputs must be a path, a glob or a list of them, not {type(inputs).__name__}")
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    bad = [spec for spec in specs if not isinstance(spec, (str, os.PathLike)) or not str(spec)]
    if bad:  # "" would mean the working folder
        raise UsageError(f"inputs must be non-empty paths or globs; got {bad[0]!r}")
    if report is not None and (not isinstance(report, (str, os.PathLike)) or not str(report)):
        raise UsageError(f"report must be a file path (a non-empty str or Path) or None, not {report!r}")
    output_dir = _through_links(output_dir)
    report = _through_links(report) if report is not None else None
    if not isinstance(suffix, str) or (ext is not None and not isinstance(ext, str)):
        raise UsageError(f"suffix and ext must be strings, got {suffix!r} and {ext!r}")
    opts = RestoreOptions(tile=tile, tile_overlap=tile_overlap, tile_routing=tile_routing, batch_size=batch_size,
                          precision=precision, context_pad=context_pad, max_memory=max_memory, overwrite=overwrite,
                          cuda_graphs=cuda_graphs, strip_metadata=strip_metadata)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UsageError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    device = resolve_device("cuda" if num_gpus else "cpu") if launch.world_size > 1 else resolve_device(device)
    if PRECISIONS[precision] is not None and device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA device; use fp32 on {device.type}")
    if cuda_graphs and is_onnx_file(model):
        raise UsageError(f"--cuda_graphs needs a PyTorch checkpoint; {model} runs in ONNX Runtime")
    if cuda_graphs and device.type != "cuda":
        raise UsageError(f"--cuda_graphs needs a CUDA device; leave it out on {device.type}")
    opts = replace(opts, batch_size=batch_size if batch_size is not None else 4 if device.type == "cuda" else 1)
    net = load_network(model, torch.device("cpu") if launch.world_size > 1 else device)
    if cuda_graphs and not isinstance(net, MoCEIR):
        raise UsageError(f"--cuda_graphs needs a MoCE-IR PyTorch network, got {type(net).__name__}")
    if opts.tile_routing == "global" and isinstance(net, OnnxNetwork):  # before any image, not at the first tiled one
        raise UsageError(f"--tile_routing global needs a PyTorch checkpoint; {model} is an ONNX graph, which routes "
                         "each tile (--tile_routing tile)")
    budget = max_memory if max_memory is not None else memory_budget(device)
    plan = plan_restore(specs, output_dir, net, opts, ext, suffix, report, budget, plan_log, _checkpoint_files(model))
    if plan.batches or (plan.report is not None and not plan.report.parent.exists()):  # the report may go in -o
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    if launch.world_size > 1:
        rows, writer_error = restore_distributed(net, plan, opts, budget, launch, num_workers, say)
        ordered = plan.failures + [rows[i] for i in sorted(rows)]
        return _finish(plan.report if is_rank_zero() else None, model, ordered, overwrite, writer_error)
    restorer = Restorer(net, device, plan.jobs, opts, budget, say, progress, on_tile)
    todo = sum(len(b) for b in plan.batches)
    try:
        batches = _decoded_batches(plan, min(num_workers, len(plan.batches)), say)  # a worker per batch at most
        with tqdm(total=len(plan.jobs), initial=len(plan.jobs) - todo, desc="restoring", unit="img",
                  disable=not progress or not todo) as bar:
            for items in batches:
                restorer.process(items)
                bar.update(len(items))
    finally:
        rows = restorer.close()
    ordered = plan.failures + [rows[i] for i in sorted(rows)]
    return _finish(plan.report, model, ordered, overwrite, restorer.writer_error)


def _decoded_batches(plan: Plan, workers: int, log: Callable[[str], None]) -> Iterator[list]:
    """The planned batches, decoded by ``workers`` loader processes, or in this one where the open-file limit
    (``ulimit -n``) leaves no room for their pipes (os.pipe failed with a traceback)."""
    def loader(n: int) -> Iterator[list]:
        return iter(torch.utils.data.DataLoader(ImageFiles(plan.jobs), batch_sampler=plan.batches, num_workers=n,
                                                collate_fn=as_list))
    try:
        return loader(workers)
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE) or not workers:
            raise
        hook, sys.unraisablehook = sys.unraisablehook, lambda _: None
        try:  # torch's half-made iterator fails in __del__ ("no attribute '_workers_status'"): a page of noise
            e.__traceback__ = None
            gc.collect()
        finally:
            sys.unraisablehook = hook
        log(f"note: too many open files to start {workers} loader worker(s) ({e.strerror}; see ulimit -n); "
            "decoding in this process")
    return loader(0)


def _finish(report: Path | None, model: Any, rows: list[dict], overwrite: bool,
            writer_error: BaseException | None) -> list[dict]:
    """Write the report (if asked), then raise a writer's unexpected error (a bug) if there was one."""
    try:
        if report is not None:
            write_report(report, model, rows, overwrite)
    finally:
        if writer_error is not None:
            raise writer_error
    return rows

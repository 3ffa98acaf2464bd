"""``moceir demo``: a local web page (Gradio) that restores a photo, compares it before and after, and shows
which complexity expert worked in each MoE layer.

Gradio is an optional extra (``pip install -e '.[demo]'``), imported inside functions only: the package itself
never needs it. Every restore goes through :func:`moceir.restore_files`, the pipeline of ``moceir restore``
(tiling within a memory budget, atomic writes, one error line per bad file); the page adds only what a web
upload needs (a pixel cap read from the header, messages instead of tracebacks) and the display.

Files: each app owns one temporary folder ``moceir-demo-*``. Gradio's uploads and cache live in it
(``GRADIO_TEMP_DIR`` points there unless you set it yourself; :func:`delete_cached_files` empties it hourly and
at shutdown), and each request works in a ``TemporaryDirectory`` inside it. :func:`close_app` (called by
:func:`launch` on exit) removes the whole folder; a finalizer does the same at interpreter exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .data.degradations import add_gaussian_noise, crop_to_multiple, random_haze, seeded_rng
from .flops import layer_picks
from .io import ImageReadError, bomb_pixels, image_size, load_image, save_image
from .metrics import psnr, ssim
from .models.checkpoints import CheckpointError
from .runtime import UsageError

INSTALL_HINT = "moceir demo needs Gradio, an optional extra: pip install -e '.[demo]'"
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # the repository's examples (a source checkout)
PREVIEW_MAX_SIDE = 2048  # the page shows at most this; the download is always full resolution
CACHE_CLEANUP = (3600, 3600)  # every hour, the cached files older than an hour (and all at close_app)


class GradioMissing(ImportError):
    """Gradio is not installed; the message says how to install the extra."""


class DemoError(ValueError):
    """A request the page refuses or could not restore: one line, shown in the page."""


class AddressError(OSError):
    """The page cannot be served at the given host and port; the message says which of the two to change."""


# ------------------------------------------------------------------------------------- degradations (tab 2)
def _noise(sigma: int) -> Callable[[np.ndarray, str], np.ndarray]:
    def apply(clean: np.ndarray, name: str) -> np.ndarray:
        return add_gaussian_noise(clean, sigma, seeded_rng(name, sigma))  # the noise `moceir test` adds
    return apply


def _haze(clean: np.ndarray, name: str) -> np.ndarray:
    return random_haze(clean, np.random.default_rng(zlib.crc32(f"{name}:haze".encode())))


# Degradation shown in the page -> function(clean uint8 [H, W, 3], image name) -> degraded uint8, seeded by the
# name so the same image always gets the same degradation. moceir has no synthetic rain (the model learned rain
# from RainTrainL pairs), so rain is not offered.
DEGRADATIONS: dict[str, Callable[[np.ndarray, str], np.ndarray]] = {
    "Gaussian noise σ=15": _noise(15),
    "Gaussian noise σ=25": _noise(25),
    "Gaussian noise σ=50": _noise(50),
    "Synthetic haze": _haze,
}


# ------------------------------------------------------------------------------------- the work, without Gradio
@dataclass
class Restoration:
    """One restored image: what the page shows and the report row of :func:`moceir.restore_files`."""

    name: str
    output: Path  # full-resolution PNG, in a folder that outlives the request (Gradio's cache)
    before: np.ndarray  # uint8 previews, at most PREVIEW_MAX_SIDE
    after: np.ndarray
    row: dict
    wall_seconds: float
    notes: list[str] = field(default_factory=list)


def _preview(rgb: np.ndarray) -> np.ndarray:
    from PIL import Image

    img = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    h, w = img.shape[:2]
    scale = PREVIEW_MAX_SIDE / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))


def _named(message: str, path: Path, name: str) -> str:
    """A pipeline message with the server's path of an upload replaced by the file's own name."""
    for p in sorted({str(path.resolve()), str(path)}, key=len, reverse=True):
        message = message.replace(p, name)
    return message


def _cannot_store(name: str, e: OSError) -> str:
    """A DemoError's text for a server that cannot write its work or result files (a full or read-only disk)."""
    return (f"{name}: the server cannot store images right now ({e.strerror or e}); try again later, or tell whoever "
            "runs this page")


class DemoSession:
    """The loaded network and everything the page computes with it; one per app, shared by its requests."""

    def __init__(self, checkpoint: str, device: str, max_pixels: float, work_dir: Path, results_dir: Path):
        from .models.checkpoints import checkpoint_note
        from .flops import ExpertCosts
        from .models.checkpoints import load_model
        from .pipeline import resolve_device

        self.device = resolve_device(device)
        self.model = load_model(checkpoint, device=self.device)
        self.checkpoint = "the bundled default model" if checkpoint == "default" else Path(checkpoint).name
        self.note = checkpoint_note(checkpoint)
        self.max_pixels = max_pixels
        self.work_dir, self.results_dir = work_dir, results_dir
        self.costs = ExpertCosts(self.model)

    def check_size(self, path: Path, name: str) -> None:
        """Refuse an image above ``max_pixels`` from its header, before anything decodes it."""
        size = image_size(path)
        pixels = size[0] * size[1] if size is not None else bomb_pixels(path)  # PIL refuses to say a bomb's size
        if pixels is not None and pixels > self.max_pixels:
            shown = f"{size[1]}x{size[0]} = " if size is not None else ""
            raise DemoError(f"{name} is {shown}{pixels / 1e6:.1f} MP, above this page's limit of "
                            f"{self.max_pixels / 1e6:g} MP; downscale it or use `moceir restore`, which tiles "
                            "any size")

    def restore(self, path: Path, name: str, on_tile: Callable[[int, int], None] | None = None) -> Restoration:
        """Restore one image file through :func:`moceir.restore_files`; a failure is a DemoError."""
        from .pipeline import UsageError, restore_files

        name = _display_name(name)
        self.check_size(path, name)
        notes: list[str] = []
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
                out_dir = Path(tmp) / "out"
                try:
                    rows = restore_files([path], out_dir, model=self.model, device=self.device, ext="png",
                                         suffix="_restored", batch_size=1, progress=False, log=notes.append,
                                         on_tile=on_tile)
                except UsageError as e:
                    raise DemoError(_named(str(e), path, name)) from None
                except CheckpointError as e:  # a model whose graph returns the wrong shapes: the server's to fix
                    raise DemoError(f"the server's model cannot restore images: {str(e).split(': ', 1)[-1]}") from None
                row = rows[0]
                if "write_errno" in row:  # "choose another -o" is not the page user's to do
                    raise OSError(row["write_errno"], os.strerror(row["write_errno"]))
                if "error" in row:  # the output's folder is the server's too: its files are shown by name
                    raise DemoError(_named(row["error"], path, name).replace(f"{out_dir}{os.sep}", ""))
                before = _preview(load_image(path).rgb)
                after_full = Path(row["output"])
                after = _preview(load_image(after_full).rgb)
                keep = self.results_dir / uuid.uuid4().hex / f"{Path(name).stem}_restored.png"
                try:
                    keep.parent.mkdir(parents=True)
                    shutil.move(after_full, keep)
                except OSError:  # no half-moved file for the page to serve
                    shutil.rmtree(keep.parent, ignore_errors=True)
                    raise
        except OSError as e:
            raise DemoError(_cannot_store(name, e)) from None
        notes = [_named(line, path, name).removeprefix("note: ") for line in notes if line.startswith("note")]
        return Restoration(name, keep, before, after, row, time.perf_counter() - t0, notes)

    def degrade(self, path: Path, name: str, degradation: str) -> tuple[np.ndarray, np.ndarray, Path]:
        """(clean, degraded, degraded PNG): uint8 images, centre-cropped to multiples of 16 as the benchmarks
        are; the PNG lies in a fresh folder of the work dir, which the caller removes."""
        if not isinstance(degradation, str) or degradation not in DEGRADATIONS:
            shown = repr(degradation) if len(repr(degradation)) <= 80 else repr(degradation)[:77] + "..."
            raise DemoError(f"unknown degradation {shown}; choose one of {', '.join(DEGRADATIONS)}")
        name = _display_name(name)
        self.check_size(path, name)
        try:
            rgb = load_image(path).rgb
        except ImageReadError as e:
            raise DemoError(_named(str(e), path, name)) from None
        clean = crop_to_multiple(np.round(rgb * 255).astype(np.uint8), 16)
        if min(clean.shape[:2]) == 0:
            raise DemoError(f"{name} is smaller than 16x16 pixels; choose a larger image")
        degraded = DEGRADATIONS[degradation](clean, name)
        folder = None
        try:
            folder = Path(tempfile.mkdtemp(dir=self.work_dir))
            target = folder / f"{Path(name).stem}_degraded.png"
            save_image(target, degraded.astype(np.float32) / 255.0)
        except OSError as e:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise DemoError(_cannot_store(name, e)) from None
        return clean, degraded, target

    def expert_table(self, experts: list, h: int, w: int) -> tuple[list[list[str]], float, float]:
        """Rows (layer, scale, expert, rank, patch, GFLOPs, cost against the layer's costliest expert) and the
        expert GFLOPs spent and those of running every expert, for an h x w image (as ``moceir routing``).
        ``experts``: a report's entry (:func:`moceir.flops.image_experts`); top-k layers show their k experts."""
        cfg = self.model.config
        table = self.costs.at(h, w)  # [layers, experts]
        rows = []
        for layer, entry in enumerate(experts):
            picks = layer_picks(entry)
            width = self.model.adapters[layer].proj_out.in_channels
            flops = table[layer]
            cost = sum(flops[e] for e in picks)
            rows.append([f"L{layer}", f"1/{int(self.costs.scales[layer])}", "+".join(f"E{e}" for e in picks),
                         " + ".join(f"{cfg.expert_ranks(width)[e]}" for e in picks) + f" of {width} ch",
                         " + ".join(f"{cfg.expert_patch_sizes()[e]}" for e in picks) + " px",
                         f"{cost / 1e9:.3f}", f"{100 * cost / flops.max():.0f}%"])
        return rows, self.costs.spent(table, experts) / 1e9, float(table.sum()) / 1e9

    def summary(self, r: Restoration) -> str:
        """Markdown: size, time, tiles, expert FLOPs against running all experts."""
        row = r.row
        h, w = row["height"], row["width"]
        _, spent, every = self.expert_table(row["experts"], h, w)
        n = self.model.config.num_exp_blocks
        how = "the whole image in one pass" if row["tile"] is None else f"in tiles of {row['tile']} px"
        lines = [f"**{r.name}**, {w}×{h}: restored in {r.wall_seconds:.2f} s, {row['seconds']:.2f} s of it in the "
                 f"network on {self.device.type.upper()}, {how}.",
                 f"**Expert FLOPs:** {spent:.2f} of {every:.2f} GFLOPs, **{100 * spent / every:.0f}%** of running "
                 f"all {n} experts in each of the {len(row['experts'])} MoE layers (FFTs not counted)."]
        if row["tile"] is not None:
            lines.append("Each tile picks its own experts; the table shows the first tile's.")
        if max(h, w) > PREVIEW_MAX_SIDE:
            lines.append(f"The comparison is downscaled to {PREVIEW_MAX_SIDE} px; the PNG is full resolution.")
        lines += [f"Note: {note}" for note in r.notes]
        return "\n\n".join(lines)

    def model_line(self) -> str:
        return f"**Model:** {self.checkpoint} on {self.device.type.upper()}." + (f" {self.note}" if self.note else "")


EXPERT_HEADERS = ["MoE layer", "scale", "expert", "rank", "patch", "GFLOPs", "cost vs. costliest"]
METRIC_HEADERS = ["image", "PSNR (dB)", "SSIM"]


def _upload_path(value: Any, served: tuple[Path, ...]) -> tuple[Path, str]:
    """(path, file name) of an uploaded image as Gradio passes it unprocessed (a FileData dict) or a path.

    The endpoints skip Gradio's preprocessing, so a request names any path it likes: only a file inside ``served``
    (Gradio's upload folder, the examples) is read, never another file, folder or glob on the server.
    """
    if value is None:
        raise DemoError("no image yet: upload one, paste one or pick an example")
    if isinstance(value, dict):
        if not isinstance(value.get("path"), str) or not value["path"]:
            raise DemoError("the image did not arrive as a file; upload it again")
        path = Path(value["path"])
        name = Path(str(value.get("orig_name") or path.name)).name
    elif isinstance(value, str):
        path, name = Path(value), Path(value).name
    else:
        raise DemoError("the image did not arrive as a file; upload it again")
    real = path.resolve()
    if not (real.is_file() and any(real.is_relative_to(root) for root in served)):
        raise DemoError("the image did not arrive as an upload; upload it again")
    return path, name  # DemoSession.restore and .degrade make it safe to show and to name files after


MAX_PIXELS_LIMIT = 1e12  # --max_pixels above it: Gradio's upload limit (8 bytes a pixel) leaves 64 bits
MAX_NAME_BYTES = 120  # of an upload's name as shown and used for result files (file systems allow 255)


def _display_name(name: str) -> str:
    """An upload's name without control characters or lone surrogates (a NUL cannot be in a path, a surrogate
    cannot be encoded) or leading dots, cut to MAX_NAME_BYTES (UTF-8) with its extension kept: result files are
    named after it, and Gradio refuses to serve a hidden one ("Dotfiles ... cannot be moved to the cache")."""
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cs")).lstrip(".") or "image"
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    suffix = Path(name).suffix if len(Path(name).suffix.encode()) <= 10 else ""
    stem = name[:len(name) - len(suffix)].encode()[:MAX_NAME_BYTES - len(suffix.encode()) - 3]
    return stem.decode(errors="ignore") + "…" + suffix


def _served_roots(session: "DemoSession") -> tuple[Path, ...]:
    """Where uploads may come from: Gradio's upload folder (GRADIO_TEMP_DIR, else its default), the examples,
    the app's own folder."""
    gradio_temp = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return tuple(Path(p).resolve() for p in (gradio_temp, EXAMPLES_DIR, session.work_dir))


def _examples(prefix: str = "") -> list[str]:
    from .io import list_images

    if not EXAMPLES_DIR.is_dir():
        return []
    return [str(p) for p in list_images(EXAMPLES_DIR) if p.name.startswith(prefix)]


# ------------------------------------------------------------------------------------- the page
def _import_gradio():
    try:
        import gradio
    except ImportError:
        raise GradioMissing(INSTALL_HINT) from None
    return gradio


@dataclass
class _Workspace:
    """The app's temporary folder and the GRADIO_TEMP_DIR setting it replaced."""

    root: Path
    previous_gradio_temp: str | None
    owns_gradio_temp: bool

    def cleanup(self) -> None:
        if self.owns_gradio_temp and os.environ.get("GRADIO_TEMP_DIR") == str(self.root / "gradio"):
            if self.previous_gradio_temp is None:
                os.environ.pop("GRADIO_TEMP_DIR", None)
            else:
                os.environ["GRADIO_TEMP_DIR"] = self.previous_gradio_temp
        shutil.rmtree(self.root, ignore_errors=True)


_WORKSPACES: "weakref.WeakKeyDictionary[Any, tuple[_Workspace, weakref.finalize]]" = weakref.WeakKeyDictionary()
_OUR_GRADIO_TEMPS: set[str] = set()  # GRADIO_TEMP_DIR values this module set (not the user's own)


def _make_workspace() -> _Workspace:
    root = Path(tempfile.mkdtemp(prefix="moceir-demo-"))
    (root / "work").mkdir()
    previous = os.environ.get("GRADIO_TEMP_DIR")
    owns = previous is None or previous in _OUR_GRADIO_TEMPS
    if owns:
        os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # read by Gradio when components and the server start
        _OUR_GRADIO_TEMPS.add(str(root / "gradio"))
    return _Workspace(root, previous, owns)


def _comparison(gr, label: str, elem_id: str):
    """Components that show (before, after): a slider where this Gradio has one, else two images."""
    if hasattr(gr, "ImageSlider"):
        slider = gr.ImageSlider(label=label, type="numpy", format="png", elem_id=elem_id, interactive=False)
        return [slider], lambda before, after: [(before, after)]
    with gr.Row(elem_id=elem_id):
        a = gr.Image(label="before", format="png", interactive=False)
        b = gr.Image(label="after", format="png", interactive=False)
    return [a, b], lambda before, after: [before, after]


def build_app(checkpoint: str = "default", device: str = "auto", max_pixels: float = 24e6,
              concurrency: int = 1):
    """The demo page as a queued ``gr.Blocks``: one network loaded once, ``concurrency`` requests at a time.

    Its API endpoint ``/restore`` takes one image file and returns the full-resolution restored PNG first
    (then the comparison, the expert table and the summary). Raises GradioMissing without the extra and
    CheckpointError for an unusable checkpoint. Close it with :func:`close_app` to remove its temporary folder.
    """
    gr = _import_gradio()
    workspace = _make_workspace()  # before any component is made: components read GRADIO_TEMP_DIR
    try:
        results_dir = Path(gr.utils.get_upload_folder()) / "moceir-results"  # Gradio serves these as they are
        session = DemoSession(checkpoint, device, max_pixels, workspace.root / "work", results_dir)
        app = _build_blocks(gr, session, concurrency)
    except BaseException:
        workspace.cleanup()
        raise
    _WORKSPACES[app] = (workspace, weakref.finalize(app, workspace.cleanup))
    stop = threading.Event()
    _CLEANERS[app] = stop
    threading.Thread(target=_clean_hourly, args=(weakref.ref(app), stop), daemon=True,
                     name="moceir-demo-cache-cleanup").start()
    return app


_CLEANERS: "weakref.WeakKeyDictionary[Any, threading.Event]" = weakref.WeakKeyDictionary()


def delete_cached_files(app: Any, age: float | None) -> None:
    """Remove the files Gradio cached for ``app`` (a ``gr.Blocks``: uploads, results) older than ``age`` seconds
    (None: all). Only regular files and links are removed; anything else is forgotten (a request can make Gradio
    record a folder, on which its own ``delete_cache`` failed and stopped for good), and a file that cannot be
    removed is left for the next round."""
    keep = set().union(*(getattr(block, "keep_in_cache", set()) for block in list(app.blocks.values())))
    now = time.time()
    for files in list(app.temp_file_sets):
        for name in list(files):  # a copy: requests add files meanwhile
            if name in keep:
                continue
            try:
                info = os.lstat(name)
                if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                    files.discard(name)
                elif age is None or now - info.st_ctime > age:
                    os.remove(name)
                    files.discard(name)
            except FileNotFoundError:
                files.discard(name)
            except OSError:  # left for the next round
                continue


def _clean_hourly(app_ref: "weakref.ref", stop: threading.Event) -> None:
    every, age = CACHE_CLEANUP
    while not stop.wait(every):
        app = app_ref()
        if app is None:
            return
        try:
            delete_cached_files(app, age)
        except Exception as e:  # noqa: BLE001 - a bug, said in one line: it must not end the cleanup for good
            print(f"moceir demo: the cache cleanup failed ({type(e).__name__}: {e}); it tries again in {every} s",
                  file=sys.stderr, flush=True)
        del app


def _build_blocks(gr, session: DemoSession, concurrency: int):
    def tiles_to(progress) -> Callable[[int, int], None]:
        """The pipeline's on_tile(done, total) -> the page's progress bar (images too large to restore whole)."""
        return lambda done, total: progress((done, total), desc="restoring tiles", unit="tiles")

    def restore(image, progress=gr.Progress()):
        try:
            path, name = _upload_path(image, _served_roots(session))
            progress(0, desc="restoring")
            r = session.restore(path, name, tiles_to(progress))
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None
        for note in r.notes:
            gr.Warning(note)
        table, _, _ = session.expert_table(r.row["experts"], r.row["height"], r.row["width"])
        return [str(r.output), *compare(r.before, r.after), table, session.summary(r)]

    def degrade_and_restore(image, degradation, progress=gr.Progress()):
        try:
            path, name = _upload_path(image, _served_roots(session))
            progress(0, desc="degrading")
            clean, degraded, degraded_path = session.degrade(path, name, degradation)
            try:
                progress(0, desc="restoring")
                r = session.restore(degraded_path, degraded_path.name, tiles_to(progress))
            finally:
                shutil.rmtree(degraded_path.parent, ignore_errors=True)
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None
        reference, degraded = clean.astype(np.float32) / 255.0, degraded.astype(np.float32) / 255.0
        restored = load_image(r.output).rgb
        shutil.rmtree(r.output.parent, ignore_errors=True)  # not offered for download: nothing to keep
        metrics = [[f"{label} vs. clean", f"{psnr(reference, x):.2f}", f"{ssim(reference, x):.4f}"]
                   for label, x in (("degraded", degraded), ("restored", restored))]
        gain = psnr(reference, restored) - psnr(reference, degraded)
        metrics.append(["gain", f"{gain:+.2f}", f"{ssim(reference, restored) - ssim(reference, degraded):+.4f}"])
        table, _, _ = session.expert_table(r.row["experts"], r.row["height"], r.row["width"])
        return [*compare2(r.before, r.after), metrics, table, session.summary(r)]

    examples = _examples()
    clean_examples = _examples("clean_")
    with gr.Blocks(title="MoCE-IR demo", analytics_enabled=False) as app:  # its cache: delete_cached_files
        gr.Markdown("# MoCE-IR: restore a photo\nOne network for noise, rain and haze: in each of its "
                    f"{session.model.num_moe_layers} MoE layers a router picks "
                    f"{'one' if session.model.config.topk == 1 else session.model.config.topk} of "
                    f"{session.model.config.num_exp_blocks} *complexity experts*, E0 (cheap) to "
                    f"E{session.model.config.num_exp_blocks - 1} (costly), for each image.")
        gr.Markdown(session.model_line(), elem_id="model-note")
        with gr.Tab("Restore"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Degraded photo (upload, paste or pick an example)", type="filepath",
                                     sources=["upload", "clipboard"], elem_id="restore-input")
                    button = gr.Button("Restore", variant="primary", elem_id="restore-button")
                    if examples:
                        gr.Examples([[p] for p in examples], inputs=[image], label="Bundled examples")
                with gr.Column(scale=2):
                    shown, compare = _comparison(gr, "before | after (drag the handle)", "restore-compare")
                    download = gr.File(label="Restored PNG, full resolution", height=120, elem_id="restore-download")
            gr.Markdown("## What happened inside")
            summary = gr.Markdown(elem_id="restore-summary")
            experts = gr.Dataframe(headers=EXPERT_HEADERS, datatype="str", interactive=False,
                                   label="Expert chosen in each MoE layer", elem_id="expert-table")
            button.click(restore, inputs=[image], outputs=[download, *shown, experts, summary], api_name="restore",
                         preprocess=False, concurrency_id="network")
        with gr.Tab("Degrade, then restore"):
            gr.Markdown("Degrade a clean image (noise is seeded by the file name and σ as in `moceir test`; the "
                        "image is centre-cropped to multiples of 16 as the benchmarks are), restore it, and score "
                        "both against the clean image. There is no synthetic rain in moceir, so no rain here.")
            with gr.Row():
                with gr.Column(scale=1):
                    clean = gr.Image(label="Clean image", type="filepath", sources=["upload", "clipboard"],
                                     elem_id="degrade-input")
                    kind = gr.Radio(list(DEGRADATIONS), value="Gaussian noise σ=25", label="Degradation",
                                    elem_id="degrade-kind")
                    button2 = gr.Button("Degrade and restore", variant="primary", elem_id="degrade-button")
                    if clean_examples:
                        gr.Examples([[p] for p in clean_examples], inputs=[clean], label="Clean examples")
                with gr.Column(scale=2):
                    shown2, compare2 = _comparison(gr, "degraded | restored", "degrade-compare")
                    metrics = gr.Dataframe(headers=METRIC_HEADERS, datatype="str", interactive=False,
                                           label="Against the clean image (RGB, data range 1)",
                                           elem_id="degrade-metrics")
            summary2 = gr.Markdown(elem_id="degrade-summary")
            experts2 = gr.Dataframe(headers=EXPERT_HEADERS, datatype="str", interactive=False,
                                    label="Expert chosen in each MoE layer", elem_id="degrade-expert-table")
            button2.click(degrade_and_restore, inputs=[clean, kind], outputs=[*shown2, metrics, experts2, summary2],
                          api_name="degrade_and_restore", preprocess=False, concurrency_id="network")
    app.queue(default_concurrency_limit=concurrency)  # both tabs share "network": `concurrency` runs in all
    return app


def close_app(app) -> None:
    """Stop the app's server (if running) and remove its temporary folder (uploads, Gradio's cache, results)."""
    app.close(verbose=False)
    stop = _CLEANERS.pop(app, None)
    if stop is not None:
        stop.set()
    delete_cached_files(app, None)  # where GRADIO_TEMP_DIR is the user's own, the workspace does not hold them
    entry = _WORKSPACES.pop(app, None)
    if entry is not None:
        entry[1]()  # the finalizer: runs workspace.cleanup once


def server_host(host: str) -> str:
    """The address the server binds, as Gradio reads ``server_name``: "" is GRADIO_SERVER_NAME or 127.0.0.1,
    and "[::1]" (the form a URL needs) is ::1 (which :func:`check_address` refuses: Gradio cannot serve it)."""
    host = host.strip() or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_address(host: str, port: int) -> None:
    """Bind every address ``host`` resolves to at ``port`` once, as the server will (address reuse on, as uvicorn),
    so that a bad host or a taken port is named before the model loads; raises AddressError, one line."""
    import errno
    import socket

    host = server_host(host)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:  # 0: any free port
        raise AddressError(f"port {port!r} is not a port number; choose a --port from 1 to 65535")
    if ":" in host:  # Gradio's launch builds http://::1:7860 and fails in an httpx InvalidURL traceback
        raise AddressError(f"--host {host}: the demo's server (Gradio) cannot serve at an IPv6 address; use "
                           "127.0.0.1 (this machine only) or 0.0.0.0 (every IPv4 address of this machine)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise AddressError(f"--host {host}: {getattr(e, 'strerror', None) or e}; use 127.0.0.1 (this machine only) "
                           "or 0.0.0.0 (every network interface)") from None
    advice = {errno.EADDRINUSE: f"port {port} is in use; choose another --port",
              errno.EADDRNOTAVAIL: f"{host} is not an address of this machine; choose another --host "
                                   "(127.0.0.1: this machine only, 0.0.0.0: every network interface)",
              errno.EACCES: f"port {port} needs administrator rights here; choose a --port of 1024 or more"}
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's create_server: IPv6 sockets do not take IPv4 too
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except OSError as e:
            if e.errno == errno.EAFNOSUPPORT:  # a name that resolves to IPv6 too, on a machine without it
                continue
            raise AddressError(f"cannot serve at {host}:{port}: "
                               + advice.get(e.errno, f"{e.strerror or e}; check --host and --port")) from None


def launch(checkpoint: str = "default", host: str = "127.0.0.1", port: int = 7860, device: str = "auto",
           max_pixels: float = 24_000_000, concurrency: int = 1, block: bool = True):
    """Serve the demo at http://host:port (127.0.0.1 by default: this machine only; never a public share link).

    With ``block`` (the command) it serves until Ctrl+C or SIGTERM, then removes its temporary folder; without,
    it returns the running app (for tests and notebooks; stop it with :func:`close_app`).
    """
    if not (type(max_pixels) in (int, float) and 0 < max_pixels <= MAX_PIXELS_LIMIT):
        raise UsageError(f"--max_pixels {max_pixels!r}: choose a number of pixels above 0 and up to "
                         f"{MAX_PIXELS_LIMIT:g} (24e6, the default, is 24 megapixels)")
    host = server_host(host)
    check_address(host, port)
    app = build_app(checkpoint, device, max_pixels, concurrency)
    try:
        # An upload larger than a 16-bit RGBA image of max_pixels cannot be one the page accepts.
        app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                   max_file_size=int(8 * max_pixels + 2**20))
        if not block:
            return app
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop (and clean up) as on Ctrl+C
        print(f"moceir demo: serving at http://{host}:{port} (Ctrl+C stops it)", flush=True)
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("moceir demo: stopped")
    except BaseException:
        close_app(app)
        raise
    close_app(app)
    return None

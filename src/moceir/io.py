"""Image reading and writing with one-line errors that name the file, and atomic file writes."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import os
import re
import stat
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .checks import not_a_bool
from .metadata import PhotoInfo, pil_save_options, png_chunks, read_photo_info, tifffile_options

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# What save_image writes: the formats read from folders, and GIF (an animation's first frame, as a GIF).
WRITABLE_EXTS = IMAGE_EXTS + (".gif",)
MAX_SIDE = {".gif": 65535, ".jpg": 65500, ".jpeg": 65500, ".webp": 16383}  # what these formats can store
SIXTEEN_BIT_EXTS = (".png", ".tif", ".tiff")  # formats save_image writes with 16 bits per sample
NO_ALPHA_EXTS = (".jpg", ".jpeg", ".bmp")  # formats save_image writes without an alpha channel (PIL's BMP drops it)
ON_OFF_ALPHA_EXTS = (".gif",)  # formats that keep only opaque or transparent pixels
# PIL's EXIF orientations (tag 0x0112) as array operations on [H, W, ...], as ImageOps.exif_transpose applies them.
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}


class OutputAppeared(FileExistsError):
    """An output that was free when the work was planned exists when it is to be written (another program wrote
    it meanwhile); it is not replaced. The message is one line naming the file."""

    def __init__(self, message: str, path: str | Path):
        super().__init__(errno.EEXIST, message, str(path))

    def __str__(self) -> str:
        return self.strerror


class ImageReadError(RuntimeError):
    """An image file could not be read; the message names the file and what to do."""


def list_images(folder: Path) -> list[Path]:
    """The files of ``folder`` (not recursive) with an image extension of :data:`IMAGE_EXTS` (any case), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def read_rgb(path: str | Path) -> np.ndarray:
    """Read any image :func:`load_image` reads as uint8 RGB [H, W, 3], EXIF orientation applied, alpha dropped
    (16-bit images rounded to 8 bits): what training and the benchmarks see. Unreadable files, and files too large
    to decode, raise ImageReadError."""
    path = Path(path)
    if path.is_file():  # else load_image says why (a FIFO would block Image.open)
        try:
            with Image.open(path) as im:
                if not (im.mode.startswith(("I", "F")) or _more_than_8_bits(path, im.format)):
                    im.load()
                    return np.asarray(upright(im).convert("RGB"))
        except Exception:  # noqa: BLE001 - load_image below names the file and the reason
            pass
    try:
        image = load_image(path)
    except MemoryError:
        raise ImageReadError(f"{path}: out of memory while decoding; use a smaller copy") from None
    return np.round(image.rgb * 255).astype(np.uint8)


def _more_than_8_bits(path: Path, fmt: str | None) -> bool:
    """A 16-bit PNG or TIFF, which PIL opens as 8-bit RGB by dropping the low byte (load_image rounds instead), or
    a PGM/PPM of more than 8 bits (PIL reads a PPM's as 8 bits and a PGM's as 32-bit integers)."""
    return ((fmt == "PNG" and _png_bit_depth(path) == 16) or (fmt == "TIFF" and _tiff_samples(path) == np.uint16)
            or (fmt == "PPM" and (pnm := _pnm_header(path)) is not None and pnm[3] > 255))


def _pnm_header(path: Path) -> tuple[int, int, int, int, int] | None:
    """(channels, height, width, maxval, offset of the samples) of a binary PGM (P5) or PPM (P6), else None."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] not in (b"P5", b"P6"):
        return None
    numbers, i = [], 2
    while len(numbers) < 3:
        while i < len(head) and (head[i:i + 1].isspace() or head[i:i + 1] == b"#"):
            if head[i:i + 1] == b"#":  # a comment runs to the line's end
                i = head.find(b"\n", i)
                if i < 0:
                    return None
            i += 1
        start = i
        while i < len(head) and head[i:i + 1].isdigit():
            i += 1
        if i == start or i >= len(head):
            return None
        numbers.append(int(head[start:i]))
    width, height, maxval = numbers
    return (1 if head[:2] == b"P5" else 3), height, width, maxval, i + 1  # one whitespace byte ends the header


def write_error_advice(code: int | None, where: str) -> str | None:
    """What to do about an OSError's errno that the machine, not the program, causes (a full disk, a read-only or
    unwritable folder); ``where`` names the option that picks another place. None for other errors."""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free some space or choose another {where}"
    if code in (errno.EACCES, errno.EPERM):
        return f"check the permissions or choose another {where}"
    if code == errno.EROFS:
        return f"the file system is read-only; choose another {where}"
    if code == errno.EIO:
        return "the disk reported an input/output error; check it"
    if code == errno.ENAMETOOLONG:
        return "a file or folder name in it is longer than the file system allows (often 255 bytes); shorten it"
    return None


@dataclass
class LoadedImage:
    """An image as the network sees it plus what is needed to write it back like the input.

    rgb: float32 [H, W, 3] in [0, 1]; alpha: float32 [H, W] or None; bit_depth: 8 or 16; grayscale: input had one
    channel; frames: how many frames (GIF, WebP) or pages (TIFF) the file holds.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int
    grayscale: bool
    format: str
    frames: int = 1  # frames or pages in the file; only the first is read
    icc_profile: bytes | None = None  # the file's colour profile, written into the output where its format can
    png_colour: tuple[tuple[bytes, bytes], ...] = ()  # a PNG's gAMA, cHRM, sRGB and cICP chunks: (type, data)
    decoder_warnings: tuple[str, ...] = ()  # what PIL or tifffile warned while decoding, with load_image_noting
    photo: PhotoInfo = PhotoInfo()  # EXIF, resolution, XMP and compression, kept in the output where it can be
    conversions: tuple[str, ...] = ()  # what reading changed that a user should know of, for a note


def _png_bit_depth(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25 else 8


def _load_16bit(path: Path, fmt: str) -> tuple[np.ndarray, bytes | None]:
    """16-bit PNG (pypng), TIFF (tifffile) or PGM/PPM -> (float32 [H, W, C] in [0, 1], a TIFF's ICC profile); PIL
    would reduce RGB to 8 bits. ``fmt`` is what the file holds ("PNG", "TIFF" or "PPM", a PGM or PPM of more than
    8 bits), whatever its name says."""
    icc = None
    if fmt == "PNG":
        import png

        with open(path, "rb") as f:  # png.Reader(filename=...) leaves its file to the garbage collector
            w, h, rows, info = png.Reader(file=f).asDirect()
            planes = info["planes"]
            arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
        # asDirect() shifts the samples down to an sBIT chunk's significant bits (e.g. 12) and says so here
        return arr.astype(np.float32) / float(2 ** info["bitdepth"] - 1), icc
    if fmt == "PPM":
        channels, h, w, maxval, offset = _pnm_header(path)
        samples = np.fromfile(path, dtype=">u2", count=h * w * channels, offset=offset)
        if samples.size < h * w * channels or not 0 < maxval < 65536:
            raise ImageReadError(f"{path}: a {'PGM' if channels == 1 else 'PPM'} of {w}x{h} with maxval {maxval} "
                                 f"but {samples.size} of its {h * w * channels} samples; the file is truncated or "
                                 "damaged")
        return np.minimum(samples.reshape(h, w, channels), maxval).astype(np.float32) / float(maxval), icc
    arr, icc = _read_tiff_page(path)
    return arr.astype(np.float32) / 65535.0, icc


def _read_tiff_page(path: Path) -> tuple[np.ndarray, bytes | None]:
    """The first page of a TIFF as ([H, W, C] gray, gray + alpha, RGB or RGBA, its ICC profile), planar
    (channels-first) layouts included, read as its tags say: min-is-white inverted, a palette looked up,
    premultiplied alpha divided out and an extra channel that is not alpha left out. Other colour spaces (CMYK,
    YCbCr, Lab) are refused in one line."""
    import tifffile

    with tifffile.TiffFile(str(path)) as t:
        page = t.pages[0]
        arr = page.asarray()
        axes, photometric, colormap = page.axes, int(page.photometric), page.colormap
        extra = tuple(int(e) for e in (page.extrasamples or ()))
        tagged = 262 in page.tags  # PhotometricInterpretation: tifffile says 0 (min-is-white) when it is missing
        icc = page.tags.get(34675)  # InterColorProfile
        icc = bytes(icc.value) if icc is not None else None
    if arr.ndim == 3 and axes[0] in "SC" and axes[1:] == "YX":  # planar config "separate": [C, H, W]
        arr = np.moveaxis(arr, 0, -1)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if not tagged:  # as libtiff reads such files: gray for 1 or 2 samples, else RGB
        photometric = tifffile.PHOTOMETRIC.MINISBLACK if arr.shape[2] <= 2 else tifffile.PHOTOMETRIC.RGB
    if photometric == tifffile.PHOTOMETRIC.PALETTE and colormap is not None and arr.shape[2] == 1:
        arr = np.moveaxis(colormap[:, arr[..., 0]], 0, -1).astype(np.uint16)
        photometric = tifffile.PHOTOMETRIC.RGB
    elif photometric not in (tifffile.PHOTOMETRIC.MINISWHITE, tifffile.PHOTOMETRIC.MINISBLACK,
                             tifffile.PHOTOMETRIC.RGB):
        name = {5: "CMYK", 6: "YCbCr", 8: "CIELab"}.get(photometric, f"photometric {photometric}")
        raise ImageReadError(f"{path}: a 16-bit TIFF in the {name} colour space is not supported; convert it to RGB "
                             "(e.g. an 8- or 16-bit RGB PNG)")
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"{path}: a TIFF of shape {arr.shape} (axes {axes}) is not a gray, RGB or RGBA "
                             "image; convert it to one (e.g. an 8- or 16-bit RGB PNG)")
    colours = 3 if photometric == tifffile.PHOTOMETRIC.RGB else 1
    if arr.shape[2] > colours:  # extra samples: alpha, premultiplied alpha, or something else
        kind = extra[0] if extra else tifffile.EXTRASAMPLE.UNASSALPHA  # unspecified: not transparency (a mask)
        arr = arr[..., :colours + (kind != tifffile.EXTRASAMPLE.UNSPECIFIED)]  # alpha, if any, and no further one
        if kind == tifffile.EXTRASAMPLE.ASSOCALPHA:
            alpha = arr[..., colours:colours + 1].astype(np.float64)
            colour = np.divide(arr[..., :colours] * 65535.0, alpha, out=np.zeros_like(alpha.repeat(colours, 2)),
                               where=alpha > 0)
            arr = np.concatenate([np.clip(np.round(colour), 0, 65535), alpha], axis=2).astype(np.uint16)
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        arr = arr.copy()
        arr[..., 0] = np.iinfo(np.uint16).max - arr[..., 0]
    return arr, icc


def _sixteen_bit(path: Path, fmt: str, frames: int, orientation: int = 1, icc: bytes | None = None,
                 photo: PhotoInfo = PhotoInfo()) -> LoadedImage:
    """``icc``: the profile PIL found, else the TIFF's own (PIL cannot open 16-bit gray + alpha)."""
    arr, file_icc = _load_16bit(path, fmt)
    icc = icc or file_icc
    if orientation in _ORIENT:
        arr = np.ascontiguousarray(_ORIENT[orientation](arr))
    gray = arr.shape[2] in (1, 2)
    alpha = arr[..., -1] if arr.shape[2] in (2, 4) else None
    rgb = arr[..., :1].repeat(3, axis=2) if gray else arr[..., :3]
    return LoadedImage(np.ascontiguousarray(rgb), alpha, 16, gray, fmt, frames, icc, photo=photo)


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file that can be opened ("does not exist", "is a link loop", "is a folder",
    ...), or None. A FIFO or device is refused: a decoder would block on it forever."""
    try:
        os.stat(path)
    except OSError as e:
        if not os.path.lexists(path):
            return "does not exist"
        if e.errno in (errno.ELOOP, errno.ENOENT) and os.path.islink(path):
            return "is a link loop" if e.errno == errno.ELOOP else "is a link to nothing (dangling)"
        return f"cannot be opened ({e.strerror})"
    if not os.path.isfile(path):
        return "is a folder" if os.path.isdir(path) else "is not a regular file (a pipe or device)"
    return None


def load_image(path: str | Path) -> LoadedImage:
    """Read 8/16-bit gray, RGB or RGBA (PNG, JPEG, TIFF, WebP, BMP), applying the EXIF orientation."""
    path = Path(path)
    if problem := file_problem(path):
        raise ImageReadError(f"{path}: {problem}; pass an image file")
    img = _load_image(path)
    if img.format != "PNG":
        return img
    try:
        return dataclasses.replace(img, png_colour=_png_colour_chunks(path))
    except OSError:  # gone or changed since it was decoded: the pixels read stand
        return img


_WARNINGS_LOCK = threading.RLock()  # the warnings filters and the tifffile logger are global state
_CAPTURES: list[Callable[[], None]] = []  # how to undo each capture under way (for a forked child)


def _in_forked_child() -> None:
    """A loader worker forked while another thread captured warnings: it gets a free lock, and its warnings and
    tifffile's log as they were before the capture (else they would go to a list nobody reads)."""
    global _WARNINGS_LOCK
    _WARNINGS_LOCK = threading.RLock()
    while _CAPTURES:
        _CAPTURES.pop()()


os.register_at_fork(after_in_child=_in_forked_child)


@functools.cache  # asked at every decode; the answer does not change
def _decoder_sources() -> tuple[str, ...]:
    """The folders and files of the decoders' own code (PIL, tifffile, pypng): warnings raised there are theirs."""
    import importlib.util

    found = []
    for name in ("PIL", "tifffile", "png"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            found.append(os.path.dirname(spec.origin) + os.sep if spec.submodule_search_locations else spec.origin)
    return tuple(found)


@contextlib.contextmanager
def _decoder_warnings() -> Iterator[list[str]]:
    """Collects what PIL, tifffile and pypng warn, and tifffile logs (a warning or worse), in this thread meanwhile,
    instead of printing it; other warnings go on as they would have."""
    import logging
    import warnings

    me, others = threading.get_ident(), []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me:
                caught.append(record.getMessage())
            else:  # handled as usual once the capture ends
                others.append(record)

    caught: list[str] = []
    tifffile_log, handler = logging.getLogger("tifffile"), Collect(logging.WARNING)
    with _WARNINGS_LOCK:
        capture = warnings.catch_warnings(record=True)
        said = capture.__enter__()
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # tiled or refused, which moceir says
        propagate, tifffile_log.propagate = tifffile_log.propagate, False
        tifffile_log.addHandler(handler)

        def undo() -> None:
            tifffile_log.removeHandler(handler)
            tifffile_log.propagate = propagate
            capture.__exit__(None, None, None)

        _CAPTURES.append(undo)
        try:
            yield caught
        finally:
            _CAPTURES.remove(undo)
            undo()
    sources, theirs = _decoder_sources(), []
    for w in said:
        if w.filename.startswith(sources) and not issubclass(w.category, (ResourceWarning, DeprecationWarning)):
            theirs.append(str(w.message))
        else:  # another thread's, or not the decoder's: as it would have been shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    caught[:0] = theirs
    for record in others:
        tifffile_log.handle(record)


def load_image_noting(path: str | Path) -> LoadedImage:
    """:func:`load_image`, with what the decoders warned (PIL's "Truncated File Read" of a damaged EXIF block,
    tifffile's log of a bad tag) in :attr:`LoadedImage.decoder_warnings`, for a note naming the image, instead
    of on stderr."""
    with _decoder_warnings() as caught:
        img = load_image(path)
    return dataclasses.replace(img, decoder_warnings=tuple(dict.fromkeys(caught))) if caught else img


_PNG_COLOUR_CHUNKS = (b"gAMA", b"cHRM", b"sRGB", b"cICP")  # how a viewer maps the samples to colours


def _png_chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """(type, data length) of each chunk of the PNG open as ``f``, by its headers alone (a seek per chunk), with
    ``f`` at the chunk's data while the caller has it; it ends at IEND or where the file is cut short."""
    size = os.fstat(f.fileno()).st_size
    f.seek(8)  # the signature
    while len(head := f.read(8)) == 8:
        length, kind, start = int.from_bytes(head[:4], "big"), head[4:], f.tell()
        if length > size - start or kind == b"IEND":  # truncated or damaged: decoding says so
            return
        yield kind, length
        f.seek(start + length + 4)  # past the data and its CRC


def _png_colour_chunks(path: Path) -> tuple[tuple[bytes, bytes], ...]:
    """A PNG's colour chunks before its image data, as (type, data); a viewer that honours gAMA 1.0 shows the
    samples far brighter than one that assumes sRGB, so the restored file keeps them."""
    found: dict[bytes, bytes] = {}
    with open(path, "rb") as f:
        for kind, length in _png_chunks(f):
            if kind == b"IDAT":
                break
            if kind in _PNG_COLOUR_CHUNKS and length <= 64 and kind not in found:  # one each, of 4-32 bytes
                found[kind] = f.read(length)
    return tuple(found.items())


def _load_image(path: Path) -> LoadedImage:
    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            fmt = im.format or path.suffix.lstrip(".").upper()
            icc = im.info.get("icc_profile") or None
            if fmt == "TIFF" and _tiff_samples(path) == np.uint16:  # before im.load(): PIL cannot decode planar 16-bit
                turn = exif_orientation(im)
                return _sixteen_bit(path, fmt, frames, turn, icc, read_photo_info(im, path, fmt, turn in _TRANSPOSE))
            im.load()  # before _orientation: a PNG's getexif() decodes the image and would hide a decoding error
            turn = exif_orientation(im)
            photo = read_photo_info(im, path, fmt, turn in _TRANSPOSE)  # after load(): a PNG's eXIf may follow IDAT
            if (fmt == "PNG" and _png_bit_depth(path) == 16) or (fmt == "PPM" and _more_than_8_bits(path, fmt)):
                return _sixteen_bit(path, fmt, frames, turn, icc, photo)
            if im.mode.startswith(("I", "F")):  # convert("RGB") would clip 32-bit or signed samples to 0..255
                kind = ("floating-point" if im.mode.startswith("F") else f"16-bit {fmt}" if im.mode.startswith("I;16")
                        else "32-bit or signed integer")
                raise ImageReadError(f"{path}: {kind} samples (PIL mode {im.mode}) are not supported; convert it "
                                     "to an 8- or 16-bit (unsigned) PNG or TIFF")
            if fmt == "PNG" and im.mode == "L" and isinstance(im.info.get("transparency"), int) and \
                    (depth := _png_bit_depth(path)) < 8:  # PIL scales a 2- or 4-bit gray PNG's samples, not its key
                im.info["transparency"] = im.info["transparency"] * 255 // (2 ** depth - 1)
            conversions = ()
            if im.mode == "CMYK":  # PIL's formula ignores the printing conditions a CMYK profile describes
                profile = " without its CMYK colour profile" if icc and icc[16:20] == b"CMYK" else ""
                conversions = (f"its CMYK pixels were converted to RGB by a simple formula{profile}, so colours may "
                               "be off; for exact colours convert it to RGB in a colour-managed editor first",)
            im = upright(im, turn)
            grayscale = im.mode in ("L", "LA", "1") or (im.mode in ("P", "PA") and _gray_palette(im))
            # "transparency" in P, 1, L or RGB mode: a palette entry's or a colour key's (PNG tRNS, GIF) alpha
            if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("P", "1", "L", "RGB") and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
                return LoadedImage(np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].copy(), 8, grayscale, fmt,
                                   frames, icc, photo=photo, conversions=conversions)
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            return LoadedImage(rgb, None, 8, grayscale, fmt, frames, icc, photo=photo, conversions=conversions)
    except Image.DecompressionBombError as e:
        raise _too_large(path, str(e), _bomb_size(e)) from None
    except (ImageReadError, MemoryError):  # a MemoryError gets its own advice from the caller
        raise
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied; make the file readable") from None
    except Exception as e:
        page = _tiff_first_page(path)
        samples = page[0] if page else None
        if samples == np.uint16:  # e.g. 16-bit gray + alpha, which PIL cannot identify
            _refuse_bomb(path, *page[1:3])  # Image.open checks this for the files it opens
            try:
                return _sixteen_bit(path, "TIFF", 1, page[3])
            except ImageReadError:
                raise
            except Exception:  # noqa: BLE001 - the generic line below names the file
                pass
        if samples is not None and samples not in (np.uint8, np.uint16):
            kind = f"floating-point ({samples.name})" if samples.kind == "f" else samples.name
            raise ImageReadError(f"{path}: a TIFF of {kind} samples is not supported; convert it "
                                 "to an 8- or 16-bit (unsigned) PNG or TIFF") from None
        if "imagecodecs" in str(e):  # "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
            raise ImageReadError(f"{path}: its compression needs the imagecodecs package, which moceir depends on; "
                                 "pip install imagecodecs") from None
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {detail}); the file is truncated, "
                             "empty, not an image, or in a variant moceir does not read (8- and 16-bit PNG, "
                             "JPEG, TIFF, WebP, BMP)") from None


def image_size(path: str | Path) -> tuple[int, int] | None:
    """(height, width) from the file header, after EXIF orientation; None where the header cannot say."""
    if not Path(path).is_file():  # a FIFO would block; decoding reports missing files with their names
        return None
    try:
        with _decoder_warnings(), Image.open(path) as im:  # decoding warns of the same, naming the file
            w, h = im.size
            if im.format == "TIFF" and (page := _tiff_first_page(Path(path))):
                _, h, w, orientation = page  # from the tags: PIL (12) reports a TIFF's size already turned
            elif im.format == "PNG" and "exif" not in im.info:  # PIL's getexif() would decode the whole image
                orientation = _png_exif_orientation(Path(path))
            else:
                orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - decoding reports the real reason, with the file's name
        page = _tiff_first_page(Path(path))  # a TIFF PIL cannot open (16-bit gray + alpha)
        if not page or page[0] != np.uint16:
            return None
        _, h, w, orientation = page
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # EXIF orientations that swap the sides


def _bomb_size(e: Exception) -> int | None:
    """The pixel count in PIL's "Image size (182000000 pixels) exceeds limit of ..."."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    return int(found.group(1)) if found else None


def bomb_pixels(path: str | Path) -> int | None:
    """The pixel count of an image that PIL refuses to open as a decompression bomb (above twice
    ``Image.MAX_IMAGE_PIXELS``), where :func:`image_size` says None; None for any other file."""
    if not Path(path).is_file():
        return None
    try:
        with _decoder_warnings(), Image.open(path):
            return None
    except Image.DecompressionBombError as e:
        return _bomb_size(e)
    except Exception:  # noqa: BLE001 - decoding reports the real reason, with the file's name
        return None


def _exif_orientation(data: bytes) -> int:
    exif = Image.Exif()
    exif.load(data)
    return int(exif.get(0x0112, 1))


_RAW_EXIF_KEY = b"Raw profile type exif\0"  # ImageMagick's text chunk: EXIF as hex after three header lines
_TEXT_CHUNK_LIMIT = 1 << 20  # bytes read or inflated from one such chunk, as PIL's own limit on text chunks


def _raw_profile_text(kind: bytes, data: bytes) -> str:
    """The text of a tEXt/zTXt/iTXt chunk's data, which starts with ImageMagick's EXIF keyword."""
    rest = data[len(_RAW_EXIF_KEY):]
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":
        compressed, rest = True, rest[1:]
    else:  # iTXt: compression flag, method, language and translated keyword (each ended by a zero byte)
        compressed = rest[:1] == b"\1"
        rest = rest[2:].split(b"\0", 2)[-1]
    if compressed:
        rest = zlib.decompressobj().decompress(rest, _TEXT_CHUNK_LIMIT)
    return rest.decode("latin-1" if kind == b"zTXt" else "utf-8")


def _png_exif_orientation(path: Path) -> int:
    """The EXIF orientation of a PNG whose EXIF PIL finds only when decoding: an eXIf chunk after the image
    data, or ImageMagick's "Raw profile type exif" text chunk anywhere (eXIf wins, as in PIL). Found by walking
    the chunk headers (a seek per chunk) up to where PIL stops reading (IEND, or an animation's second frame);
    1 where there is none."""
    raw, after_image = None, False
    with open(path, "rb") as f:
        for kind, length in _png_chunks(f):
            if kind == b"eXIf":
                return _exif_orientation(f.read(length))
            if kind == b"fcTL" and after_image:
                break
            after_image = after_image or kind == b"IDAT"
            if kind in (b"tEXt", b"zTXt", b"iTXt") and length <= _TEXT_CHUNK_LIMIT:
                data = f.read(length)
                if data.startswith(_RAW_EXIF_KEY):
                    raw = _raw_profile_text(kind, data)  # the last one wins, as in PIL's info
    return _exif_orientation(bytes.fromhex("".join(raw.split("\n")[3:]))) if raw else 1


def _gray_palette(im: Image.Image) -> bool:
    """Whether every colour of a palette image is a gray (a gray GIF), which comes back gray."""
    palette = im.getpalette() or []
    return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def upright(im: Image.Image, orientation: int | None = None) -> Image.Image:
    """``im`` turned by its EXIF orientation (its ``info`` kept; ``orientation``: :func:`exif_orientation`, where
    already read), as ``ImageOps.exif_transpose`` does, which raises on a damaged EXIF block (a PNG's eXIf chunk):
    such an image is read as stored."""
    method = _TRANSPOSE.get(exif_orientation(im) if orientation is None else orientation)
    return im.transpose(method) if method is not None else im


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 to 8), 1 where the file has none or its EXIF cannot be read."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a readable image unreadable
        return 1


def _tiff_samples(path: Path) -> np.dtype | None:
    """The sample type of a TIFF's first page (tifffile reads what PIL cannot identify: 16-bit, planar, float),
    None if not a TIFF or unreadable by tifffile (decoding then reports the file)."""
    page = _tiff_first_page(path)
    return page[0] if page else None


def _tiff_first_page(path: Path) -> tuple[np.dtype, int, int, int] | None:
    """(sample type, height, width, orientation tag) of a TIFF's first page from its tags, without decoding it;
    None if not a TIFF or unreadable by tifffile."""
    try:
        with open(path, "rb") as f:
            if f.read(4) not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
                return None
        import tifffile

        with tifffile.TiffFile(str(path)) as t:
            page = t.pages[0]
            orientation = page.tags.get(274)  # Orientation, as EXIF numbers it
            orientation = int(orientation.value) if orientation is not None else 1
            return np.dtype(page.dtype), int(page.imagelength), int(page.imagewidth), orientation
    except Exception:  # noqa: BLE001 - the caller decodes with PIL, whose error names the file
        return None


def _refuse_bomb(path: Path, height: int, width: int) -> None:
    """PIL's decompression-bomb limit (more than twice ``Image.MAX_IMAGE_PIXELS``) for a file PIL cannot open,
    read by tifffile: an ImageReadError as load_image gives for one PIL opens."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and height * width > 2 * limit:
        raise _too_large(path, f"{height * width} pixels, {height} x {width}, is more than twice the {limit} of "
                               "PIL.Image.MAX_IMAGE_PIXELS", height * width)


PIXEL_LIMIT_VARIABLE = "MOCEIR_MAX_IMAGE_PIXELS"  # PIL.Image.MAX_IMAGE_PIXELS for moceir's commands


def _too_large(path: Path, why: str, pixels: int | None) -> ImageReadError:
    limit = f"={pixels // 2 + 1}" if pixels else ""
    return ImageReadError(f"{path}: image too large ({why}); restore a downscaled copy, or, if you trust the file, "
                          f"raise the limit ({PIXEL_LIMIT_VARIABLE}{limit} for moceir's commands, "
                          "PIL.Image.MAX_IMAGE_PIXELS in Python)")


def format_size_problem(path: str | Path, height: int, width: int) -> str | None:
    """Why an image of ``height`` x ``width`` cannot be written as ``path``'s format (GIF, JPEG and WebP cap the
    side), or None."""
    limit = MAX_SIDE.get(Path(path).suffix.lower())
    if limit is None or max(height, width) <= limit:
        return None
    return (f"{path}: a {Path(path).suffix[1:].upper()} holds at most {limit} px a side, and this image is "
            f"{width}x{height}; write PNG or TIFF (restore --ext png)")


def save_image(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None, bit_depth: int = 8,
               grayscale: bool = False, icc_profile: bytes | None = None,
               png_colour: Sequence[tuple[bytes, bytes]] = (), photo: PhotoInfo | None = None) -> None:
    """Write float [H, W, 3] in [0, 1] (clipped) as 8- or 16-bit gray/RGB(+alpha); the format follows the suffix.

    16 bits are kept for PNG and TIFF; other formats are written with 8. ``icc_profile`` (the input's colour
    profile, :attr:`LoadedImage.icc_profile`) is embedded in PNG, JPEG, TIFF and WebP (GIF and BMP cannot hold
    one); ``png_colour`` (:attr:`LoadedImage.png_colour`) in PNG only, without sRGB where a profile is written (the
    standard allows one of the two). ``photo`` (:attr:`LoadedImage.photo`: EXIF, resolution, XMP, a WebP's
    losslessness, a JPEG's chroma subsampling) is kept where the format holds it (:data:`moceir.metadata.HOLDS`).
    An existing file is replaced, as PIL's ``save`` does (moceir's commands
    write through :func:`write_atomically`, which never follows a link).
    Integer arrays, NaN pixels, other layouts and bit depths raise ValueError: they were written as 0/255 or black.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_EXTS:
        raise ValueError(f"{path}: cannot write {suffix or 'a file without an extension'}; name it "
                         f"{', '.join(WRITABLE_EXTS)}")
    if bit_depth not in (8, 16) or isinstance(bit_depth, bool):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    for name, x, shape in (("rgb", rgb, "[H, W, 3]"), ("alpha", alpha, "[H, W]")):
        if x is None:
            continue
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            what = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"{name} must be a float array {shape} in [0, 1], not {what} (divide 8-bit data by 255)")
        if x.shape != ((*rgb.shape[:2], 3) if name == "rgb" else rgb.shape[:2]) or x.size == 0:
            raise ValueError(f"{name} must be {shape}{' (the size of rgb)' if name == 'alpha' else ''}, got {x.shape}")
        if np.isnan(x.min()):  # one pass, no temporary array
            raise ValueError(f"{name} holds NaN pixels; nothing was written to {path}")
    too_large = format_size_problem(path, *rgb.shape[:2])
    if too_large:  # PIL's GIF writer failed in a struct.error, its JPEG one printed libjpeg's words
        raise ValueError(too_large)
    planes = [rgb.mean(axis=2, keepdims=True) if grayscale else rgb]
    if alpha is not None and suffix not in NO_ALPHA_EXTS:
        planes.append(alpha[..., None])
    # float32: float16 would overflow at x 65535
    data = np.concatenate(planes, axis=2, dtype=np.float32) if len(planes) > 1 else planes[0].astype(np.float32)
    icc_profile = icc_profile if _profile_fits(icc_profile, data.shape[2]) else None
    chunks = []  # a PNG's colour chunks: the profile, then the others, without sRGB beside a profile
    if suffix == ".png":
        if icc_profile:
            chunks.append((b"iCCP", b"ICC profile\0\0" + zlib.compress(icc_profile)))
        chunks += [(kind, data) for kind, data in png_colour if not (kind == b"sRGB" and icc_profile)]
        chunks += png_chunks(photo, with_exif_and_dpi=bit_depth == 16)  # PIL writes an 8-bit PNG's EXIF and dpi
    np.clip(data, 0.0, 1.0, out=data)  # in place: a 12-megapixel image costs one float copy here, not four
    if bit_depth == 16 and suffix in SIXTEEN_BIT_EXTS:
        data *= 65535
        u16 = np.round(data, out=data).astype(np.uint16)
        if suffix == ".png":
            import png

            h, w, c = u16.shape
            writer = png.Writer(w, h, greyscale=c <= 2, alpha=c in (2, 4), bitdepth=16)
            encoded = io.BytesIO()
            writer.write(encoded, u16.reshape(h, w * c))
            with open(path, "wb") as f:
                f.write(_with_chunks(encoded.getvalue(), chunks))
        else:
            import tifffile

            options = {**({"iccprofile": icc_profile} if icc_profile else {}), **tifffile_options(photo)}
            if u16.shape[2] == 2:  # gray + alpha: without these tags tifffile writes H pages of W x 2
                tifffile.imwrite(str(path), u16, photometric="minisblack", extrasamples=["unassalpha"], **options)
            else:
                tifffile.imwrite(str(path), u16[..., 0] if u16.shape[2] == 1 else u16, **options)
        return
    data *= 255
    u8 = np.round(data, out=data).astype(np.uint8)
    if suffix == ".gif" and u8.shape[2] in (2, 4):
        _save_gif_with_alpha(path, u8)
        return
    im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
    kwargs = pil_save_options(photo, suffix)
    if suffix == ".png" and chunks:
        encoded = io.BytesIO()
        im.save(encoded, format="PNG", **kwargs)
        with open(path, "wb") as f:
            f.write(_with_chunks(encoded.getvalue(), chunks))
        return
    if icc_profile and suffix in (".jpg", ".jpeg", ".tif", ".tiff", ".webp"):
        kwargs["icc_profile"] = icc_profile
    im.save(path, **kwargs)


def _profile_fits(icc_profile: bytes | None, channels: int) -> bool:
    """Whether an ICC profile describes the colour space written (gray for 1-2 channels, else RGB): a CMYK photo's
    profile is dropped, for its pixels were converted to RGB, and a viewer would misread them through it."""
    space = icc_profile[16:20] if icc_profile and len(icc_profile) >= 20 else b""
    return space == (b"GRAY" if channels <= 2 else b"RGB ")


def _with_chunks(png_bytes: bytes, chunks: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A PNG with ``chunks`` ((type, data): colour chunks, which come before the image data) after its IHDR, as
    neither pypng nor PIL writes them all."""
    end_of_ihdr = 8 + 8 + 13 + 4  # signature, then IHDR's length, type, 13 bytes and CRC
    added = b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                     for kind, data in chunks)
    return png_bytes[:end_of_ihdr] + added + png_bytes[end_of_ihdr:]


def _save_gif_with_alpha(path: Path, u8: np.ndarray) -> None:
    """Gray/RGB + alpha uint8 [H, W, 2|4] as a GIF: 255 colours, and pixels under half opacity transparent.

    PIL's own RGBA-to-GIF conversion marks a transparent palette entry that no pixel uses, losing the alpha whole.
    """
    colour = u8[..., :-1]
    rgb = np.repeat(colour, 3, axis=2) if colour.shape[2] == 1 else colour
    quantized = Image.fromarray(np.ascontiguousarray(rgb)).quantize(255)
    index = np.asarray(quantized).copy()
    index[u8[..., -1] < 128] = 255
    im = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
    im.putpalette(quantized.getpalette()[:255 * 3] + [0, 0, 0])
    im.save(path, transparency=255)


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write through ``write(tmp)`` into a fresh temporary file beside ``target``, then move it into place.

    Without ``overwrite`` the move is a hard link, which fails if anything (a file, a dangling link) appeared
    at ``target`` meanwhile; with it, ``os.replace`` swaps the name itself, so a link there is replaced, not
    followed. An OSError with an errno (a full disk, a read-only folder) is raised with ``target`` as its filename.
    """
    write_files_atomically({target: write}, overwrite)


SPECIAL_FILE = "is a device, pipe or socket (or a link to one), which moceir does not replace; name a regular file"


def write_files_atomically(writes: dict[Path, Callable[[Path], None]], overwrite: bool) -> None:
    """:func:`write_atomically` for files that belong together: each is written to its temporary file first, and
    all are moved into place only once every one was written, so a failure (a full disk) leaves the earlier set
    whole rather than a mix of old and new."""
    if problem := not_a_bool("overwrite", overwrite):  # files replaced on a "no"
        raise TypeError(problem)
    temps: dict[Path, Path] = {}
    placed: list[Path] = []
    try:
        for target, write in writes.items():
            with _named(target):
                temps[target] = _written_temp(target, write)
        if overwrite and (special := [t for t in temps if special_file(t)]):  # before any is moved: no mixed set
            raise OSError(errno.EINVAL, SPECIAL_FILE, str(special[0]))
        if not overwrite and (there := [t for t in temps if os.path.lexists(t)]):
            raise OutputAppeared(f"output {there[0]} appeared meanwhile; nothing of this set of {len(temps)} files "
                                 "was written; pass --overwrite to replace it", there[0])
        for target, tmp in temps.items():
            with _named(target):
                _move_into_place(tmp, target, overwrite)
            placed.append(target)
    except BaseException:
        if not overwrite:  # the files placed were new: take them back, so that none of the set is left
            for target in placed:
                target.unlink(missing_ok=True)
        raise
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _named(target: Path) -> Iterator[None]:
    """Re-raise an OSError with an errno (a full disk, a read-only or unwritable folder) with ``target`` as its
    file name, not a temporary file's or none."""
    try:
        yield
    except OSError as e:
        if e.errno is None or e.filename == str(target):
            raise
        raise OSError(e.errno, e.strerror, str(target)) from e


def _written_temp(target: Path, write: Callable[[Path], None]) -> Path:
    """A fresh temporary file beside ``target``, written through ``write(tmp)``; removed if that fails."""
    # The stem is cut so that the temporary name (8 random characters added) is legal wherever the target's is.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem[:32]}.", suffix=target.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        if special_file(target):  # `--report /dev/stdout --overwrite` as root would replace the system's link
            raise OSError(errno.EINVAL, SPECIAL_FILE, str(target))
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target, follow_symlinks=False)
    except FileExistsError:
        raise OutputAppeared(f"output {target} appeared meanwhile; pass --overwrite to replace it", target) from None
    except OSError:  # a filesystem without hard links
        if os.path.lexists(target):
            raise
        os.replace(tmp, target)


def special_file(path: str | Path) -> bool:
    """Whether ``path`` is, or links to, something other than a regular file or folder (/dev/null, a FIFO), or is a
    link through /proc: /dev/stdout leads, through /proc/self/fd/1, to whatever file stdout is, and replacing it
    replaced the system's link."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or a dangling link: replaced as documented
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or _links_through_system(Path(path))


def _links_through_system(path: Path) -> bool:
    """Whether ``path`` is a link whose chain of links reaches /proc (/dev/stdout -> /proc/self/fd/1, whose
    "target" is whatever file the stream is)."""
    p = os.path.abspath(path)
    if not os.path.islink(p):
        return False
    for _ in range(40):  # the kernel's own limit on a chain of links
        if p.startswith("/proc/"):
            return True
        if not os.path.islink(p):
            return False
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return True

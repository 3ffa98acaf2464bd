"""What a photo carries besides its pixels and colour (EXIF, resolution, XMP, how it was compressed), read from the
input and written into the restored file where its format can hold it."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

JPEG_MARKER_MAX = 65533  # bytes in one JPEG APP segment after its length field


@dataclass(frozen=True)
class PhotoInfo:
    """exif: the EXIF block (a TIFF structure, without JPEG's "Exif\\0\\0"), its Orientation set to 1 as the pixels
    are turned already, its thumbnail unlinked; dpi: (x, y), where the file states it; xmp: the XMP packet, its
    tiff:Orientation set to 1 likewise; lossless: a lossless WebP; jpeg_subsampling: PIL's code of a JPEG's chroma
    subsampling (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0); exif_unreadable: the file had an EXIF block that could not be
    made upright, and that is left out."""

    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    xmp: bytes | None = None
    lossless: bool = False
    jpeg_subsampling: int | None = None
    exif_unreadable: bool = False

    @property
    def kept(self) -> tuple[str, ...]:
        """The names of what there is to keep, as notes name them."""
        return tuple(name for name, there in (("EXIF", self.exif), ("XMP", self.xmp), ("resolution", self.dpi))
                     if there)


# What each output format keeps of PhotoInfo's EXIF, XMP and resolution. A TIFF's EXIF tags would share the
# image's own directory, where some (ImageWidth, PhotometricInterpretation, ...) would contradict the pixels.
HOLDS = {".jpg": {"EXIF", "XMP", "resolution"}, ".jpeg": {"EXIF", "XMP", "resolution"},
         ".png": {"EXIF", "XMP", "resolution"}, ".webp": {"EXIF", "XMP"}, ".tif": {"XMP", "resolution"},
         ".tiff": {"XMP", "resolution"}, ".bmp": {"resolution"}, ".gif": set()}
DPI_RANGE = (1.0, 100_000.0)  # a resolution outside is no real one, and PNG's and BMP's fields cannot hold all


def read_photo_info(im: Image.Image, path: Path, fmt: str, turned: bool) -> PhotoInfo:
    """``im``: the input, opened by PIL (a PNG's EXIF after IDAT is known once it is loaded); ``turned``: whether
    its pixels are turned by their orientation (then every orientation the XMP states is set to 1, else none is).
    A TIFF's EXIF tags share its image's own directory, and are not kept."""
    raw = im.info.get("exif") if fmt in ("JPEG", "MPO", "PNG", "WEBP") else None
    raw = raw.removeprefix(b"Exif\0\0") if isinstance(raw, bytes) and raw else None
    exif = exif_upright(raw) if raw else None
    xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
    xmp = xmp.encode() if isinstance(xmp, str) else xmp if isinstance(xmp, bytes) else None
    xmp = xmp_upright(xmp) if xmp and turned else xmp
    subsampling = None
    if fmt in ("JPEG", "MPO"):
        from PIL import JpegImagePlugin

        subsampling = JpegImagePlugin.get_sampling(im)
        subsampling = subsampling if subsampling in (0, 1, 2) else None
    return PhotoInfo(exif, _stated_dpi(im, fmt), xmp or None, fmt == "WEBP" and webp_is_lossless(path), subsampling,
                     exif_unreadable=bool(raw) and exif is None)


def _stated_dpi(im: Image.Image, fmt: str) -> tuple[float, float] | None:
    """The resolution the file states; PIL makes one up where it states none (a TIFF's 1 dpi, a JPEG's 72)."""
    dpi = im.info.get("dpi")
    try:
        dpi = (float(dpi[0]), float(dpi[1])) if dpi else None
    except (TypeError, ValueError, IndexError):
        return None
    if dpi is None or not all(math.isfinite(d) and DPI_RANGE[0] <= d <= DPI_RANGE[1] for d in dpi):
        return None
    if fmt == "TIFF" and 282 not in getattr(im, "tag_v2", {}):  # XResolution
        return None
    if fmt in ("JPEG", "MPO") and im.info.get("jfif_unit") not in (1, 2) and 0x011A not in im.getexif():
        return None
    return dpi


_XMP_ORIENTATION = (re.compile(rb"(tiff:Orientation\s*=\s*[\"'])\s*\d+\s*([\"'])"),
                    re.compile(rb"(<tiff:Orientation>)\s*\d+\s*(</tiff:Orientation>)"))


def xmp_upright(xmp: bytes) -> bytes:
    """The XMP packet with its tiff:Orientation (attribute or element, in any quoting) set to 1, for pixels that
    are turned already; PIL's getexif() falls back to it, and a stale one turns the picture a second time."""
    for pattern in _XMP_ORIENTATION:
        xmp = pattern.sub(rb"\g<1>1\g<2>", xmp)
    return xmp


def exif_upright(data: bytes) -> bytes | None:
    """EXIF with its Orientation (in IFD0) set to 1 and its thumbnail (IFD1, of the unrestored picture, unturned)
    unlinked, its bytes left in place; None where the block cannot be read, for a stale orientation kept beside
    turned pixels would turn the picture twice in every viewer. Only values are changed in place: offsets
    (MakerNotes) stay valid."""
    if data[:4] not in (b"II*\0", b"MM\0*"):
        return None
    order = "<" if data[:2] == b"II" else ">"
    out = bytearray(data)
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag, kind, n = struct.unpack_from(order + "HHI", data, at)
            if tag == 0x0112:
                if n != 1 or kind not in (3, 4):  # one SHORT or LONG, its value in the entry itself
                    return None
                struct.pack_into(order + ("H" if kind == 3 else "I"), out, at + 8, 1)
        struct.pack_into(order + "I", out, ifd + 2 + 12 * count, 0)  # no next directory: the thumbnail goes
    except struct.error:
        return None
    return bytes(out)


def webp_is_lossless(path: Path) -> bool:
    """Whether a WebP's first image is VP8L (lossless), from its RIFF chunks."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] != b"RIFF" or head[8:12] != b"WEBP":
                return False
            while len(chunk := f.read(8)) == 8:
                kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if kind in (b"VP8 ", b"VP8L"):
                    return kind == b"VP8L"
                if kind == b"ANMF":  # an animation's first frame: its 16-byte header, then its chunks
                    f.seek(16, 1)
                    continue
                f.seek(size + (size & 1), 1)
    except OSError:
        return False
    return False


def pil_save_options(info: PhotoInfo | None, suffix: str) -> dict[str, Any]:
    """PIL ``save`` keywords that keep ``info`` in an 8-bit ``suffix`` file, with its quality settings: JPEG at
    95 with the input JPEG's chroma subsampling (else 4:4:4, which keeps the colour detail restored), WebP
    lossless where the input was, else at 95."""
    info = info or PhotoInfo()
    options: dict[str, Any] = {}
    holds = HOLDS.get(suffix, set())
    if suffix in (".jpg", ".jpeg"):
        options.update(quality=95, subsampling=0 if info.jpeg_subsampling is None else info.jpeg_subsampling)
    elif suffix == ".webp" and info.lossless:
        options.update(lossless=True, exact=True)  # exact: the colour under transparent pixels is kept too
    elif suffix == ".webp":
        options["quality"] = 95
    if info.exif and "EXIF" in holds and fits(info, "EXIF", suffix):
        options["exif"] = b"Exif\0\0" + info.exif if suffix in (".jpg", ".jpeg") else info.exif
    if info.dpi and "resolution" in holds:
        options["dpi"] = info.dpi
    if info.xmp and "XMP" in holds and suffix in (".tif", ".tiff"):
        options["tiffinfo"] = {700: info.xmp}  # XMLPacket: PIL's TIFF writer takes no xmp=
    elif info.xmp and "XMP" in holds and suffix != ".png" and fits(info, "XMP", suffix):
        options["xmp"] = info.xmp  # a PNG's XMP is a chunk PIL does not write: png_chunks
    return options


def tifffile_options(info: PhotoInfo | None) -> dict[str, Any]:
    """tifffile ``imwrite`` keywords that keep ``info`` in a 16-bit TIFF: its resolution and XMP (tag 700)."""
    options: dict[str, Any] = {}
    if info and info.dpi:
        options.update(resolution=info.dpi, resolutionunit="INCH")
    if info and info.xmp:
        options["extratags"] = [(700, "B", len(info.xmp), info.xmp, True)]  # XMLPacket
    return options


def without_metadata(info: PhotoInfo) -> PhotoInfo:
    """``info`` with no EXIF, XMP or resolution (``--strip_metadata``); how the image was compressed stays."""
    return PhotoInfo(lossless=info.lossless, jpeg_subsampling=info.jpeg_subsampling)


def fits(info: PhotoInfo, what: str, suffix: str) -> bool:
    """Whether ``what`` fits its place in a ``suffix`` file: a JPEG holds EXIF and XMP in one marker each."""
    if suffix not in (".jpg", ".jpeg"):
        return True
    if what == "EXIF":
        return len(b"Exif\0\0") + len(info.exif or b"") <= JPEG_MARKER_MAX
    if what == "XMP":
        return len(b"http://ns.adobe.com/xap/1.0/\0") + len(info.xmp or b"") <= JPEG_MARKER_MAX
    return True


def png_chunks(info: PhotoInfo | None, with_exif_and_dpi: bool) -> list[tuple[bytes, bytes]]:
    """PNG chunks (type, data) for ``info``: the XMP packet (iTXt), and, for a PNG that PIL does not write
    (16 bits, by pypng), the EXIF (eXIf) and resolution (pHYs, in pixels per metre)."""
    if info is None:
        return []
    chunks = []
    if with_exif_and_dpi and info.exif:
        chunks.append((b"eXIf", info.exif))
    if with_exif_and_dpi and info.dpi:
        chunks.append((b"pHYs", struct.pack(">IIB", *(max(1, round(d / 0.0254)) for d in info.dpi), 1)))
    if info.xmp:
        chunks.append((b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + info.xmp))
    return chunks


def dropped(info: PhotoInfo, suffix: str) -> list[str]:
    """What of ``info`` a ``suffix`` file cannot keep, as notes name it."""
    holds = HOLDS.get(suffix, set())
    return [what for what in info.kept if what not in holds or not fits(info, what, suffix)]

"""A photo's EXIF, resolution, XMP and compression are kept in the restored file (a hostile probe of restore,
2026-12-08, found them all dropped without a note: dpi None, EXIF empty, lossless WebP written lossy)."""

import struct

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

import moceir
from moceir.cli import main
from moceir.metadata import PhotoInfo, exif_upright, webp_is_lossless

XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/>' \
      b'</x:xmpmeta>'


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model):
    return str(moceir.save_model(tiny_model, tmp_path / "tiny.safetensors"))


def _exif(orientation=None):
    exif = Image.Exif()
    exif[0x010F] = "MakerCo"  # Make
    exif[0x8298] = "(c) someone"  # Copyright
    if orientation:
        exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"  # DateTimeOriginal, in the Exif sub-directory
    return exif


def _photo(path, size=(20, 12), **save):
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, **save)


def _restore(tiny_ckpt, out, *inputs, extra=()):
    return main(["restore", *map(str, inputs), "-o", str(out), "--checkpoint", tiny_ckpt, *extra])


@pytest.mark.parametrize("order", ["<", ">"])
def test_exif_upright_sets_only_the_orientation(order):
    exif = _exif(orientation=6)
    data = exif.tobytes()[6:] if order == ">" else _little_endian(exif)
    upright = exif_upright(data)
    assert len(upright) == len(data) and sum(a != b for a, b in zip(upright, data)) == 1
    turned = Image.Exif()
    turned.load(b"Exif\0\0" + upright)
    assert turned[0x0112] == 1 and turned[0x010F] == "MakerCo"
    assert exif_upright(b"not exif") is None and exif_upright(data[:12]) is None  # damaged: dropped, never stale


def _little_endian(exif):
    """The same tags as a little-endian ("II") block."""
    little = Image.Exif()
    little.endian = "<"
    for k, v in exif.items():
        little[k] = v
    data = little.tobytes()[6:]
    assert data[:2] == b"II"
    return data


def test_a_turned_jpeg_keeps_its_exif_upright_and_its_resolution_and_xmp(tmp_path, tiny_ckpt):
    _photo(tmp_path / "photo.jpg", exif=_exif(orientation=6), dpi=(300, 300), xmp=XMP, quality=95, subsampling=2)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.jpg") == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        exif = out.getexif()
        assert out.size == (12, 20)  # turned by the orientation, which is now 1
        assert exif[0x0112] == 1 and exif[0x010F] == "MakerCo" and exif[0x8298] == "(c) someone"
        assert exif.get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
        assert out.info["dpi"] == (300, 300) and out.info["xmp"] == XMP
        assert JpegImagePlugin.get_sampling(out) == 2  # the input's 4:2:0


@pytest.mark.parametrize("bits", [8, 16])
def test_a_png_keeps_its_exif_resolution_and_xmp(tmp_path, tiny_ckpt, bits):
    path = tmp_path / "photo.png"
    if bits == 8:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP.decode())
        _photo(path, exif=_exif(), dpi=(72, 144), pnginfo=info)
    else:
        import io

        png = pytest.importorskip("png")
        from moceir.io import _with_chunks

        buf = io.BytesIO()
        png.Writer(20, 12, greyscale=False, bitdepth=16).write(buf, np.full((12, 60), 4000, np.uint16).tolist())
        chunks = [(b"eXIf", _exif().tobytes()[6:]), (b"pHYs", struct.pack(">IIB", 2835, 5669, 1)),
                  (b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP)]
        path.write_bytes(_with_chunks(buf.getvalue(), chunks))
    assert _restore(tiny_ckpt, tmp_path / "out", path) == 0
    with Image.open(tmp_path / "out" / "photo.png") as out:
        out.load()
        assert out.getexif()[0x010F] == "MakerCo" and out.getexif().get_ifd(0x8769)[0x9003] == "2024:05:06 07:08:09"
        assert [round(d) for d in out.info["dpi"]] == [72, 144]
        assert out.info["XML:com.adobe.xmp"] == XMP.decode()


def test_a_16_bit_tiff_keeps_resolution_and_xmp_and_says_exif_is_dropped(tmp_path, tiny_ckpt, capsys):
    tifffile = pytest.importorskip("tifffile")
    png = pytest.importorskip("png")
    import io

    from moceir.io import _with_chunks

    buf = io.BytesIO()
    png.Writer(20, 12, greyscale=False, bitdepth=16).write(buf, np.full((12, 60), 4000, np.uint16).tolist())
    chunks = [(b"eXIf", _exif().tobytes()[6:]), (b"pHYs", struct.pack(">IIB", 11811, 11811, 1)),
              (b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP)]
    (tmp_path / "photo.png").write_bytes(_with_chunks(buf.getvalue(), chunks))
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.png", extra=["--ext", "tif"]) == 0
    with tifffile.TiffFile(tmp_path / "out" / "photo.tif") as t:
        page = t.pages[0]
        assert page.dtype == np.uint16 and round(page.tags["XResolution"].value[0] / page.tags[
            "XResolution"].value[1]) == 300 and bytes(page.tags[700].value) == XMP
    assert "photo.png: its EXIF cannot be kept in a .tif file; it is dropped (--ext png keeps it)" in \
        capsys.readouterr().err


def test_gif_output_notes_all_it_drops(tmp_path, tiny_ckpt, capsys):
    _photo(tmp_path / "photo.jpg", exif=_exif(), dpi=(300, 300), xmp=XMP)
    assert main(["restore", str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "out"), "--checkpoint", tiny_ckpt,
                 "--ext", "gif"]) == 0
    assert "photo.jpg: its EXIF, XMP and resolution cannot be kept in a .gif file; they are dropped (--ext png " \
           "keeps them)" in capsys.readouterr().err


@pytest.mark.parametrize("lossless", [True, False])
def test_a_lossless_webp_stays_lossless(tmp_path, tiny_ckpt, lossless):
    _photo(tmp_path / "photo.webp", lossless=lossless, exif=_exif(), xmp=XMP)
    assert webp_is_lossless(tmp_path / "photo.webp") == lossless
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.webp") == 0
    assert webp_is_lossless(tmp_path / "out" / "photo.webp") == lossless
    with Image.open(tmp_path / "out" / "photo.webp") as out:
        assert out.getexif()[0x010F] == "MakerCo" and out.info["xmp"] == XMP


def test_a_png_written_as_jpeg_keeps_full_colour_resolution(tmp_path, tiny_ckpt):
    """PIL's default for quality 95 is 4:2:0, which halves the colour detail just restored."""
    _photo(tmp_path / "photo.png")
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.png", extra=["--ext", "jpg"]) == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        assert JpegImagePlugin.get_sampling(out) == 0


def test_save_image_without_photo_info_writes_none(tmp_path):
    from moceir.io import save_image

    save_image(tmp_path / "a.jpg", np.zeros((4, 4, 3), np.float32), photo=PhotoInfo())
    with Image.open(tmp_path / "a.jpg") as out:
        assert not out.getexif() and "xmp" not in out.info


@pytest.mark.parametrize("with_profile", [False, True])
def test_a_cmyk_photo_is_said_to_be_converted_without_colour_management(tmp_path, tiny_ckpt, with_profile, capsys):
    """Probe: a CMYK JPEG with its CMYK profile came out RGB through PIL's formula, the profile dropped, no note."""
    from PIL import ImageCms

    icc = {}
    if with_profile:  # an sRGB profile marked CMYK: only its header is read
        srgb = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
        srgb[16:20] = b"CMYK"
        icc = {"icc_profile": bytes(srgb)}
    Image.new("CMYK", (16, 12), (10, 200, 30, 5)).save(tmp_path / "print.jpg", **icc)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "print.jpg") == 0
    profile = " without its CMYK colour profile" if with_profile else ""
    assert (f"print.jpg: its CMYK pixels were converted to RGB by a simple formula{profile}, so colours may be off"
            in capsys.readouterr().err)


def test_an_8_bit_tiff_keeps_xmp_and_resolution_but_not_exif(tmp_path, tiny_ckpt, capsys):
    """Review: EXIF merged into a TIFF's own directory overrode its structure (a phone's ImageWidth of the unturned
    picture gave a scrambled file; a gray JPEG's PhotometricInterpretation=2 an unreadable one)."""
    exif = _exif(orientation=6)
    exif[0x0100], exif[0x0101], exif[0x0106], exif[0x0115] = 20, 12, 2, 3  # width, length, RGB, 3 samples
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "gray.jpg", exif=exif, dpi=(300, 300), xmp=XMP)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "gray.jpg", extra=["--ext", "tif"]) == 0
    with Image.open(tmp_path / "out" / "gray.tif") as out:
        out.load()
        assert out.size == (12, 20) and out.mode == "L" and 0x010F not in out.getexif()
        assert out.info["dpi"] == (300, 300) and out.info["xmp"] == XMP
    assert "gray.jpg: its EXIF cannot be kept in a .tif file; it is dropped" in capsys.readouterr().err


def test_an_xmp_orientation_is_set_upright_with_the_pixels(tmp_path, tiny_ckpt):
    """Review: a JPEG whose XMP said tiff:Orientation="6" (no EXIF) came out turned, its XMP still saying 6: PIL
    (which falls back to XMP) showed it turned twice, and each restore turned it again."""
    from PIL import ImageOps

    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b'</x:xmpmeta>')
    _photo(tmp_path / "photo.jpg", xmp=xmp)
    with Image.open(tmp_path / "photo.jpg") as im:
        shown = ImageOps.exif_transpose(im).size
    assert shown == (12, 20)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.jpg") == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        assert out.size == shown and ImageOps.exif_transpose(out).size == shown
        assert b'tiff:Orientation="1"' in out.info["xmp"]
    from moceir.metadata import xmp_upright

    assert xmp_upright(b"<tiff:Orientation> 8 </tiff:Orientation>") == b"<tiff:Orientation>1</tiff:Orientation>"


def test_exif_upright_drops_the_thumbnail_and_sets_a_long_orientation():
    """Review: IFD1's thumbnail (the unrestored picture, unturned) was kept; an Orientation stored as LONG dropped
    the whole EXIF without a note."""
    entry = struct.pack(">HHII", 0x0112, 4, 1, 6)  # Orientation, LONG, 1 value: 6
    data = b"MM\0*" + struct.pack(">I", 8) + struct.pack(">H", 1) + entry + struct.pack(">I", 26) + b"IFD1..."
    upright = exif_upright(data)
    assert struct.unpack_from(">I", upright, 10 + 8)[0] == 1 and struct.unpack_from(">I", upright, 22)[0] == 0
    assert exif_upright(data.replace(struct.pack(">HHII", 0x0112, 4, 1, 6), struct.pack(">HHII", 0x0112, 3, 2, 6))) \
        is None  # two values: cannot be set in place


def test_an_unreadable_exif_block_is_noted_when_dropped(tmp_path, tiny_ckpt, capsys):
    _photo(tmp_path / "photo.png", exif=b"Exif\0\0not a tiff structure")
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.png") == 0
    assert "photo.png: its EXIF block could not be read, so it is dropped" in capsys.readouterr().err
    from moceir.io import read_rgb  # a damaged eXIf chunk made the whole PNG unreadable (ImageOps.exif_transpose)

    assert read_rgb(tmp_path / "photo.png").shape == (12, 20, 3)


def test_a_resolution_the_file_does_not_state_is_not_written(tmp_path, tiny_ckpt, capsys):
    """Review: PIL makes up 1 dpi for a TIFF without XResolution and 72 for a JPEG without a density unit; they
    were written into the outputs as the photo's, and --ext webp noted a resolution "dropped"."""
    _photo(tmp_path / "plain.tif")
    _photo(tmp_path / "unitless.jpg", exif=_exif())
    assert Image.open(tmp_path / "plain.tif").info["dpi"] == (1, 1)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "plain.tif", tmp_path / "unitless.jpg",
                    extra=["--ext", "webp"]) == 0
    assert _restore(tiny_ckpt, tmp_path / "png", tmp_path / "plain.tif", tmp_path / "unitless.jpg",
                    extra=["--ext", "png"]) == 0
    assert "resolution" not in capsys.readouterr().err
    for name in ("plain.png", "unitless.png"):
        with Image.open(tmp_path / "png" / name) as out:
            assert "dpi" not in out.info


@pytest.mark.parametrize("ext", ["png", "bmp", "tif"])
def test_an_absurd_resolution_is_not_written(tmp_path, tiny_ckpt, ext):
    """Review: a TIFF of 4294967295 dpi ended the run in a traceback (PNG's and BMP's fields cannot hold it)."""
    _photo(tmp_path / "huge.tif", dpi=(4294967295, 4294967295))
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "huge.tif", extra=["--ext", ext]) == 0
    with Image.open(tmp_path / "out" / f"huge.{ext}") as out:
        assert out.info.get("dpi", (0, 0))[0] < 1e6


def test_a_jpeg_note_names_only_what_does_not_fit(tmp_path, tiny_ckpt, capsys):
    """Review: a 70 kB XMP was noted as "its XMP and resolution cannot be kept" though the dpi was kept."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "x" * 70_000 + "</x:xmpmeta>")
    _photo(tmp_path / "photo.png", dpi=(300, 300), pnginfo=info)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.png", extra=["--ext", "jpg"]) == 0
    assert "photo.png: its XMP cannot be kept in a .jpg file (a JPEG holds at most 64 kB of each); it is dropped" in \
        capsys.readouterr().err
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        assert out.info["dpi"] == (300, 300)


def test_strip_metadata_writes_none_of_it_but_keeps_the_colour_profile(tmp_path, tiny_ckpt, capsys):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    _photo(tmp_path / "photo.jpg", exif=_exif(), dpi=(300, 300), xmp=XMP, icc_profile=icc)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.jpg", extra=["--strip_metadata", "--ext",
                                                                             "gif"]) == 0
    assert "cannot be kept" not in capsys.readouterr().err  # nothing is dropped that was asked for
    assert _restore(tiny_ckpt, tmp_path / "jpg", tmp_path / "photo.jpg", extra=["--strip_metadata"]) == 0
    with Image.open(tmp_path / "jpg" / "photo.jpg") as out:
        assert not out.getexif() and "xmp" not in out.info and out.info.get("jfif_unit") != 1
        assert out.info["icc_profile"] == icc


def test_an_xmp_orientation_pil_does_not_read_is_left_as_it_is_when_nothing_turned(tmp_path, tiny_ckpt):
    """Probe: tiff:Orientation='6' (single quotes), which PIL does not read, was set to 1 though the pixels were not
    turned: a viewer reading it then showed the output otherwise than the input."""
    xmp = (b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:Description xmlns:tiff='http://ns.adobe.com/tiff/1.0/' "
           b"tiff:Orientation='6'/></x:xmpmeta>")
    _photo(tmp_path / "photo.jpg", xmp=xmp)
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "photo.jpg") == 0
    with Image.open(tmp_path / "out" / "photo.jpg") as out:
        assert out.size == (20, 12) and out.info["xmp"] == xmp
    _photo(tmp_path / "both.jpg", xmp=xmp, exif=_exif(orientation=6))  # turned by EXIF: the XMP's 6 goes too
    assert _restore(tiny_ckpt, tmp_path / "out", tmp_path / "both.jpg") == 0
    with Image.open(tmp_path / "out" / "both.jpg") as out:
        assert out.size == (12, 20) and b"tiff:Orientation='1'" in out.info["xmp"]


def test_a_gray_gif_comes_back_gray(tmp_path):
    """Probe: a GIF of a gray palette came back in colour (a palette image was never taken as gray)."""
    from moceir.io import load_image

    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    gray.save(tmp_path / "g.gif")
    assert load_image(tmp_path / "g.gif").grayscale
    Image.new("RGB", (8, 8), (200, 10, 10)).convert("P").save(tmp_path / "red.gif")
    assert not load_image(tmp_path / "red.gif").grayscale

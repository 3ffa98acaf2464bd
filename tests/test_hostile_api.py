"""Hostile calls of the Python API (moceir.restore, load_model, save_model), of image size probing and of the demo's
checks: each is a one-line ValueError/TypeError or a correct result, never NaN pixels, clipped data or a traceback
from deep inside torch."""

from __future__ import annotations

import os
import socket
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import moceir

IMAGE = np.random.default_rng(0).random((20, 28, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ restore options
@pytest.mark.parametrize("option, match", [
    (dict(tile=16, overlap=-1), "overlap must be"),  # returned NaN pixels: blend weights summed to zero
    (dict(tile=0), "tile must be"), (dict(tile=-5), "tile must be"), (dict(tile=2.5), "tile must be"),
    (dict(tile=True), "tile must be"), (dict(context_pad=-3), "context_pad must be"),
    (dict(max_memory=0), "max_memory must be"), (dict(max_memory=-1.0), "max_memory must be"),
    (dict(max_memory=float("nan")), "max_memory must be"), (dict(max_memory="2GB"), "max_memory must be"),
    (dict(routing="every"), "routing must be"),
])
def test_options_that_cannot_work_are_refused(tiny_model, option, match):
    with pytest.raises(ValueError, match=match):
        moceir.restore(tiny_model, IMAGE, **option)


def test_tiled_restore_with_zero_overlap_is_finite(tiny_model):
    out = moceir.restore(tiny_model, IMAGE, tile=16, overlap=0, context_pad=0)
    assert out.shape == IMAGE.shape and np.isfinite(out).all()


def test_restore_files_keeps_its_option_names(tmp_path, tiny_model):
    with pytest.raises(moceir.UsageError, match="tile_overlap must be"):
        moceir.restore_files([tmp_path / "x.png"], tmp_path / "o", model=tiny_model, tile_overlap=-2)


@pytest.mark.parametrize("device, match", [("bogus", "unknown device"), ("meta", "cannot restore"),
                                           (2.0, "device must")])
def test_a_device_that_cannot_run_is_one_line(tiny_model, device, match):
    with pytest.raises(ValueError, match=match):
        moceir.restore(tiny_model, IMAGE, device=device)


def test_a_cuda_index_beyond_the_gpus_is_one_line(monkeypatch):
    from moceir.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(moceir.UsageError, match="'cuda:3' requested but this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device(0) == torch.device("cuda:0") == resolve_device(torch.device("cuda", 0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="requested but .*use cpu"):
        moceir.restore(tiny_model, IMAGE, device="cuda")
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="requested but .*use cpu"):  # was an AssertionError from torch
        moceir.load_model(path, device="cuda")


def test_the_network_must_come_first(tmp_path):
    with pytest.raises(TypeError, match="network first"):
        moceir.restore(IMAGE, IMAGE)


# ------------------------------------------------------------------------------------------------ pixel types
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.dtype(">f4")])
def test_float_arrays_come_back_in_their_own_dtype(tiny_model, dtype):
    out = moceir.restore(tiny_model, IMAGE.astype(dtype))  # float64 and float16 came back float32
    assert out.dtype == np.dtype(dtype) and out.shape == IMAGE.shape
    reference = moceir.restore(tiny_model, IMAGE)
    assert np.abs(out.astype(np.float32) - reference).max() < 2e-3


def test_big_endian_uint16_is_read_as_its_values(tiny_model):
    native = (IMAGE * 65535).round().astype(np.uint16)
    swapped = native.astype(">u2")
    assert np.array_equal(moceir.restore(tiny_model, swapped), moceir.restore(tiny_model, native))


@pytest.mark.parametrize("array", [IMAGE.astype(np.complex64), IMAGE.astype(object), IMAGE > 0.5,
                                   (IMAGE * 255).astype(np.int32), (IMAGE * 255).astype(np.int8)])
def test_unsupported_pixel_types_are_named(tiny_model, array):
    # complex was called "integer", object arrays a TypeError from torch
    with pytest.raises(ValueError, match=f"pixels of type {array.dtype} are not supported"):
        moceir.restore(tiny_model, array)


def test_unsupported_tensor_types_are_named(tiny_model):
    with pytest.raises(ValueError, match="pixels of type torch.int64 are not supported"):
        moceir.restore(tiny_model, torch.zeros(3, 8, 8, dtype=torch.int64))
    out = moceir.restore(tiny_model, torch.from_numpy(IMAGE).permute(2, 0, 1).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ PIL modes
def test_16bit_pil_images_stay_16bit(tiny_model):
    gray = (IMAGE[..., 0] * 65535).round().astype(np.uint16)
    expected = moceir.restore(tiny_model, gray)
    for image in (Image.fromarray(gray), Image.fromarray(gray.astype(">u2"))):  # I;16 and I;16B
        out = moceir.restore(tiny_model, image)  # both were clipped to 0..255 by convert("RGB")
        assert out.mode == image.mode and np.array_equal(np.asarray(out).astype(np.uint16), expected)


def test_pil_mode_i_is_refused_not_guessed(tiny_model):
    # 32-bit integers: L.convert("I") holds 0..255, a 16-bit scan 0..65535; either guess ruins the other
    for values in (np.full((8, 8), 200, np.int32), np.full((8, 8), 70000, np.int32)):
        with pytest.raises(ValueError, match="mode I .* no fixed white level"):
            moceir.restore(tiny_model, Image.fromarray(values))


def test_float_pil_images_are_floats(tiny_model):
    out = moceir.restore(tiny_model, Image.fromarray(IMAGE[..., 0]))
    assert out.mode == "F"
    assert np.allclose(np.asarray(out), moceir.restore(tiny_model, IMAGE[..., 0]), atol=1e-6)
    with pytest.raises(ValueError, match=r"floats must lie in \[0, 1\]"):  # was clipped to black and white
        moceir.restore(tiny_model, Image.fromarray(IMAGE[..., 0] * 255))


def test_palette_alpha_and_bilevel_modes(tiny_model):
    rgb = Image.fromarray((IMAGE * 255).astype(np.uint8))
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, IMAGE.shape[1]).astype(np.uint8), (IMAGE.shape[0], 1)))
    rgba = rgb.copy()
    rgba.putalpha(ramp)
    # PA lost its alpha; La raised PIL's "conversion from La to L not supported"
    for image in (rgba.convert("PA"), rgba.convert("LA").convert("La"), rgba.convert("RGBa")):
        out = moceir.restore(tiny_model, image)
        assert out.mode == ("LA" if image.mode == "La" else "RGBA")
        assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(ramp))
    keyed = rgb.convert("P")
    keyed.info["transparency"] = 0
    assert moceir.restore(tiny_model, keyed).mode == "RGBA"
    assert moceir.restore(tiny_model, rgb.convert("1")).mode == "L"
    assert moceir.restore(tiny_model, rgb.convert("CMYK")).mode == "RGB"


def test_a_gray_image_restores_alike_as_pil_and_as_an_array(tiny_model):
    """Probe (mutation audit): PIL's L, LA and 1 were restored as RGB and turned gray by PIL's luma weights, arrays
    and the restore command by the channels' mean: the same picture came out up to 4 levels apart."""
    gray = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
    expected = moceir.restore(tiny_model, gray)
    assert np.array_equal(np.asarray(moceir.restore(tiny_model, Image.fromarray(gray))), expected)
    with_alpha = Image.fromarray(gray).convert("LA")
    with_alpha.putalpha(Image.fromarray(gray[::-1].copy()))
    out = moceir.restore(tiny_model, with_alpha)
    assert out.mode == "LA" and np.array_equal(np.asarray(out.getchannel("L")), expected)
    bilevel = Image.fromarray(gray).convert("1")
    assert np.array_equal(np.asarray(moceir.restore(tiny_model, bilevel)),
                          moceir.restore(tiny_model, np.asarray(bilevel.convert("L"))))


def test_wrapped_networks_are_taken(tiny_model, tmp_path):
    compiled = torch.compile(tiny_model, backend="eager")
    assert moceir.restore(compiled, IMAGE).shape == IMAGE.shape
    path = moceir.save_model(compiled, tmp_path / "c.safetensors")  # was refused as "not a MoCEIR network"
    assert moceir.load_model(path).state_dict().keys() == tiny_model.state_dict().keys()


# ------------------------------------------------------------------------------------------------ load and save
@pytest.mark.parametrize("path", [None, 5, b"default"])
def test_load_model_of_a_non_path_is_one_line(path):
    with pytest.raises(TypeError, match="must be a str or Path"):
        moceir.load_model(path)


def test_load_model_config_as_a_dict_or_refused(tiny_model, tmp_path):
    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    assert moceir.load_model(path, config=tiny_model.config.to_dict()).config == tiny_model.config
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['foo'\]"):
        moceir.load_model(path, config={**tiny_model.config.to_dict(), "foo": 1})
    with pytest.raises(TypeError, match="config must be a MoCEConfig"):  # was an AttributeError in the network
        moceir.load_model(path, config="MoCE_IR_tiny")


def test_network_input_of_another_layout_is_one_line(tiny_model):
    for shape in ((1, 1, 16, 16), (3, 16, 16), (1, 4, 16, 16)):  # conv and channels-last errors from torch before
        with pytest.raises(ValueError, match=r"input must be \[B, 3, H, W\]"):
            tiny_model(torch.rand(shape))


def test_restore_files_of_a_non_path_or_non_network(tiny_model, tmp_path):
    with pytest.raises(moceir.UsageError, match="output_dir must be a folder path"):
        moceir.restore_files([tmp_path], None, model=tiny_model, progress=False)
    with pytest.raises(TypeError, match="model must be"):  # an AttributeError deep in the memory model
        moceir.restore_files([tmp_path], tmp_path / "o", model=5, progress=False)
    assert not (tmp_path / "o").exists()


def test_save_model_refuses_a_state_dict(tiny_model, tmp_path):
    with pytest.raises(TypeError, match="not a state_dict"):
        moceir.save_model(tiny_model.state_dict(), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, "float16", torch.bool, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
def test_save_model_refuses_a_dtype_that_truncates(tiny_model, tmp_path, dtype):
    with pytest.raises(ValueError, match="dtype must be one of torch.float16"):  # int8 truncated every weight to 0
        moceir.save_model(tiny_model, tmp_path / "m.safetensors", dtype=dtype)
    assert not (tmp_path / "m.safetensors").exists()


def test_save_model_of_a_network_without_weights_and_a_string_flag_are_clear(tmp_path, tiny_ckpt):
    """Probe: save_model of a network built on the meta device failed in a NotImplementedError traceback, and
    load_model(channels_last="no") stored the weights channels-last (a non-empty string is true)."""
    with torch.device("meta"):
        empty = moceir.MoCEIR(moceir.get_config("MoCE_IR_tiny"))
    with pytest.raises(ValueError, match="no weights to save: .* on the meta device"):
        moceir.save_model(empty, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(TypeError, match="channels_last must be True or False, not 'no'"):
        moceir.load_model(tiny_ckpt, channels_last="no")


def test_an_overwrite_that_is_not_a_bool_replaces_nothing(tmp_path, tiny_model):
    """Probe: restore_files(..., overwrite="no") and save_model(..., overwrite="False") replaced the files there."""
    from moceir.io import save_image, write_atomically

    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "a.png", np.zeros((16, 16, 3), np.float32))
    for name in ("out/a.png", "m.safetensors", "plot.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("precious")
    with pytest.raises(moceir.UsageError, match="overwrite must be True or False, not 'no'"):
        moceir.restore_files([tmp_path / "in" / "a.png"], tmp_path / "out", tiny_model, overwrite="no", progress=False)
    with pytest.raises(TypeError, match="overwrite must be True or False, not 'False'"):
        moceir.save_model(tiny_model, tmp_path / "m.safetensors", overwrite="False")
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        write_atomically(tmp_path / "plot.png", lambda tmp: tmp.write_text("new"), overwrite=0)
    assert all((tmp_path / n).read_text() == "precious" for n in ("out/a.png", "m.safetensors", "plot.png"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn, torch.complex64])
def test_a_checkpoint_of_weights_that_are_not_floats_is_one_line(tiny_model, tmp_path, dtype, capsys):
    """Probe: int8 weights were cast silently (restore wrote its input back, exit 0), bool ones failed later with
    "output holds NaN", float8 and complex ones in a NotImplementedError traceback."""
    from safetensors.torch import save_file

    from moceir.cli import main

    path = tmp_path / "odd.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    with pytest.raises(moceir.CheckpointError, match=f"holds {str(dtype)[6:]} values .*not the floating-point"):
        moceir.load_model(path)
    assert main(["info", str(path)]) == 2 and "floating-point weights" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("report", True), ("report", 3), ("num_nodes", "2"), ("num_gpus", -1),
                                           ("num_cpu_processes", 0), ("num_cpu_processes", 1.5)])
def test_restore_files_refuses_options_of_the_wrong_kind_in_one_line(tmp_path, tiny_model, option, value):
    """Probe: report=True and num_nodes="2" were raw TypeErrors from deep inside; num_gpus=-1 and
    num_cpu_processes=0 were accepted."""
    from moceir.io import save_image

    save_image(tmp_path / "a.png", np.zeros((16, 16, 3), np.float32))
    with pytest.raises(moceir.UsageError, match=f"{option} must be"):
        moceir.restore_files([tmp_path / "a.png"], tmp_path / "out", tiny_model, progress=False, **{option: value})
    assert not (tmp_path / "out").exists()


def test_save_model_refuses_nan_weights(tmp_path):
    from moceir.models.checkpoints import NonFiniteWeights

    model = moceir.create_model("MoCE_IR_tiny")
    with torch.no_grad():
        model.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match="patch_embed.proj.weight.*nothing was written"):
        moceir.save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_model_refuses_weights_that_overflow_float16(tmp_path):
    from moceir.models.checkpoints import NonFiniteWeights

    model = moceir.create_model("MoCE_IR_tiny")
    with torch.no_grad():
        model.patch_embed.proj.weight[0, 0, 0, 0] = 1e6
    with pytest.raises(NonFiniteWeights, match="overflow"):
        moceir.save_model(model, tmp_path / "m.safetensors", dtype=torch.float16)
    assert moceir.load_model(moceir.save_model(model, tmp_path / "m.safetensors", dtype=torch.bfloat16)) is not None


def test_export_to_fp16_that_overflows_is_refused(tmp_path, capsys):
    from moceir.cli import main

    model = moceir.create_model("MoCE_IR_tiny")
    with torch.no_grad():
        model.patch_embed.proj.weight[0, 0, 0, 0] = 1e6
    source = moceir.save_model(model, tmp_path / "big.safetensors")
    assert main(["export", str(source), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overflow" in err and "--dtype fp32 or bf16" in err  # was written with inf
    assert not (tmp_path / "half.safetensors").exists()


# ------------------------------------------------------------------------------------------------ image files
def _png_with_late_exif(path, h: int, w: int, orientation: int) -> None:
    """A PNG whose eXIf chunk follows the image data (PIL writes it before, so build it by hand)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = b"".join(b"\0" + bytes(3 * w) for _ in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"eXIf", exif.tobytes()[6:])
                     + chunk(b"IEND", b""))


def test_image_size_reads_a_late_exif_orientation(tmp_path):
    from moceir.io import image_size, load_image

    path = tmp_path / "late.png"
    _png_with_late_exif(path, 30, 50, 6)
    assert image_size(path) == (50, 30) == load_image(path).rgb.shape[:2]
    _png_with_late_exif(path, 30, 50, 1)
    assert image_size(path) == (30, 50)


def test_image_size_does_not_decode_a_png(tmp_path, monkeypatch):
    """The demo's size check and restore's planning called getexif(), which decodes a whole PNG without an early
    eXIf chunk (773 MB peak to size a 0.4 MB 12000 x 12000 PNG, 224 MB now: docs/performance.md). Now a
    few chunk headers are read: decoding fails the test."""
    from PIL import PngImagePlugin

    from moceir.io import image_size

    for orientation in (1, 8):
        path = tmp_path / f"o{orientation}.png"
        _png_with_late_exif(path, 40, 60, orientation)

        def decode(*_):
            raise AssertionError("image_size decoded the image")

        with monkeypatch.context() as m:
            m.setattr(PngImagePlugin.PngImageFile, "load", decode)
            assert image_size(path) == ((60, 40) if orientation == 8 else (40, 60))
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "plain.png")
    with monkeypatch.context() as m:
        m.setattr(PngImagePlugin.PngImageFile, "load", decode)
        assert image_size(tmp_path / "plain.png") == (40, 60)


def _before_iend(png: bytes, kind: bytes, data: bytes) -> bytes:
    assert png[-12:-8] == b"\0\0\0\0" and png[-8:-4] == b"IEND"
    return png[:-12] + struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) \
        + png[-12:]


def test_image_size_agrees_with_load_image_where_pil_reads_exif_elsewhere(tmp_path):
    import io

    from PIL import PngImagePlugin

    from moceir.io import image_size, load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()
    info = PngImagePlugin.PngInfo()  # ImageMagick's form: EXIF as hex in a compressed text chunk
    info.add_text("Raw profile type exif", f"\nexif\n{len(data):8d}\n{data.hex()}", zip=True)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "magick.png", pnginfo=info)
    frames = [Image.fromarray(np.full((30, 50, 3), v, np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    exif[0x0112] = 8  # after the second frame, where PIL stops reading
    (tmp_path / "animated.png").write_bytes(_before_iend(buffer.getvalue(), b"eXIf", exif.tobytes()[6:]))
    for name in ("magick.png", "animated.png"):
        assert image_size(tmp_path / name) == load_image(tmp_path / name).rgb.shape[:2], name
    assert image_size(tmp_path / "magick.png") == (50, 30)


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt", b"iTXt"])
def test_image_size_finds_imagemagick_exif_after_the_image_data(tmp_path, kind):
    import io

    from moceir.io import image_size, load_image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(buffer, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    text = f"\nexif\n{len(exif.tobytes()):8d}\n{exif.tobytes().hex()}".encode()
    key = b"Raw profile type exif\0"
    data = {b"tEXt": key + text, b"zTXt": key + b"\0" + zlib.compress(text),
            b"iTXt": key + b"\1\0\0\0" + zlib.compress(text)}[kind]
    png = tmp_path / "late.png"
    png.write_bytes(_before_iend(buffer.getvalue(), kind, data))
    assert image_size(png) == load_image(png).rgb.shape[:2] == (50, 30)


def test_image_size_lets_a_late_exif_chunk_win_over_imagemagick_text_as_pil_does(tmp_path):
    import io

    from PIL import PngImagePlugin

    from moceir.io import image_size, load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    data = exif.tobytes()
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(data):8d}\n{data.hex()}", zip=True)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(buffer, format="PNG", pnginfo=info)
    exif[0x0112] = 1
    png = tmp_path / "both.png"
    png.write_bytes(_before_iend(buffer.getvalue(), b"eXIf", exif.tobytes()[6:]))
    assert image_size(png) == load_image(png).rgb.shape[:2] == (30, 50)


@pytest.mark.parametrize("name", ["model.png", "model.JPG", "model.gif", "model.onnx"])
def test_save_model_refuses_a_name_of_another_format(tiny_model, tmp_path, name):
    from moceir.models.checkpoints import OutputPathError

    with pytest.raises(OutputPathError, match="save_model writes safetensors.*name it .safetensors"):
        moceir.save_model(tiny_model, tmp_path / name)
    assert not any(tmp_path.iterdir())


def test_save_image_keeps_gif_transparency_on_or_off(tmp_path):
    from moceir.io import load_image, save_image

    rgb = np.random.default_rng(0).random((8, 12, 3)).astype(np.float32)
    alpha = np.tile(np.linspace(0, 1, 12, dtype=np.float32), (8, 1))
    for grayscale in (False, True):
        save_image(tmp_path / f"a{grayscale}.gif", rgb, alpha=alpha, grayscale=grayscale)
        back = load_image(tmp_path / f"a{grayscale}.gif")
        assert np.array_equal(back.alpha, (alpha >= 0.5).astype(np.float32))  # PIL's own conversion: all opaque
        expected = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2) if grayscale else rgb
        assert np.abs(back.rgb - expected)[alpha >= 0.5].mean() < 0.05  # 255 colours for 96 random pixels


def test_a_png_chunk_claiming_gigabytes_is_not_read(tmp_path):
    from moceir.io import image_size

    png = (tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(png)
    raw = png.read_bytes()
    png.write_bytes(raw[:-12] + struct.pack(">I", 0xFFFFFFF0) + b"eXIf" + b"\0" * 16)  # truncated, huge length
    assert image_size(png) == (4, 6)


def test_float_and_32bit_rgb_tiffs_are_named(tmp_path):
    import tifffile

    from moceir.io import ImageReadError, load_image

    for dtype, kind in ((np.float32, "floating-point"), (np.float64, "floating-point"), (np.uint32, "uint32")):
        path = tmp_path / f"{np.dtype(dtype).name}.tif"
        tifffile.imwrite(path, (np.random.default_rng(0).random((8, 8, 3)) * 100).astype(dtype), photometric="rgb")
        with pytest.raises(ImageReadError, match=f"{path.name}: a TIFF of {kind}.* not supported"):  # "not an image"
            load_image(path)


# ------------------------------------------------------------------------------------------------ demo
def test_demo_address_errors_name_what_to_change():
    from moceir.demo import AddressError, check_address

    with pytest.raises(AddressError, match="--host no.such.host.invalid"):  # was blamed on the port
        check_address("no.such.host.invalid", 7860)
    with pytest.raises(AddressError, match="not an address of this machine; choose another --host"):
        check_address("192.0.2.1", 7860)  # TEST-NET-1: never assigned to a machine
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AddressError, match=f"port {port} is in use; choose another --port"):
            check_address("127.0.0.1", port)
    check_address("127.0.0.1", 0)
    for host in ("::1", "[::1]"):  # Gradio's launch failed on them in an httpx InvalidURL traceback
        with pytest.raises(AddressError, match="--host ::1: the demo's server .* cannot serve at an IPv6 address"):
            check_address(host, 0)


def test_demo_host_is_read_as_gradio_reads_it(monkeypatch):
    from moceir.demo import server_host

    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    assert server_host("[::1]") == "::1" and server_host("") == "127.0.0.1" and server_host("0.0.0.0") == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert server_host(" ") == "0.0.0.0"


def test_demo_address_error_is_one_line_from_the_command(capsys, monkeypatch):
    from moceir import demo
    from moceir.cli import main

    def build_app(*_, **__):  # a machine that may bind any address (ip_nonlocal_bind) must not serve here
        raise AssertionError("the address check let 192.0.2.1 through")

    monkeypatch.setattr(demo, "build_app", build_app)
    assert main(["demo", "--host", "192.0.2.1", "--port", "7860"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host" in err and "Traceback" not in err


def _demo_session(tmp_path: Path, model: torch.nn.Module):
    """A DemoSession of ``model`` (work and results folders under tmp_path) and an uploaded image's path."""
    from moceir.demo import DemoSession

    path = moceir.save_model(model, tmp_path / "m.safetensors")
    (tmp_path / "work").mkdir()
    session = DemoSession(str(path), "cpu", 1e6, tmp_path / "work", tmp_path / "results")
    image = tmp_path / "upload.png"
    Image.fromarray((IMAGE * 255).astype(np.uint8)).save(image)
    return session, image


def test_demo_degradation_that_is_not_a_name(tmp_path, tiny_model):
    from moceir.demo import DemoError

    session, image = _demo_session(tmp_path, tiny_model)
    for value in (["noise_25"], None, 3):  # a list was an uncaught TypeError (unhashable)
        with pytest.raises(DemoError, match="unknown degradation"):
            session.degrade(image, "a.png", value)


def test_a_bad_embedded_config_does_not_advise_a_flag_the_demo_lacks(tmp_path):
    from moceir.models.checkpoints import CheckpointError, config_from_dict

    with pytest.raises(CheckpointError, match=r"--model in test and routing, config= in load_model"):
        config_from_dict({"dim": "wide"}, "m.safetensors")


# ------------------------------------------------------------------------------------------------ second probe
def test_16bit_gray_alpha_tiff_round_trips(tmp_path, tiny_model):
    """It was written as H pages of W x 2 (load_image read back [16, 2, 3], no alpha) while the row said success."""
    from moceir.io import load_image, save_image

    rgb = np.repeat(IMAGE[..., :1], 3, axis=2)
    alpha = IMAGE[..., 1].copy()
    save_image(tmp_path / "ga.tif", rgb, alpha=alpha, bit_depth=16, grayscale=True)
    back = load_image(tmp_path / "ga.tif")
    assert back.rgb.shape == rgb.shape and back.bit_depth == 16 and back.grayscale
    assert np.abs(back.alpha - alpha).max() < 1e-4
    rows = moceir.restore_files([tmp_path / "ga.tif"], tmp_path / "o", model=tiny_model, progress=False)
    out = load_image(rows[0]["output"])
    assert out.rgb.shape == rgb.shape and np.abs(out.alpha - alpha).max() < 1e-4


def test_16bit_tiffs_are_read_as_their_tags_say(tmp_path):
    """Probe: the 16-bit TIFF reader ignored the colour tags: min-is-white read inverted, palette indices read as
    grey, CMYK white read black and transparent, an unspecified extra channel read as alpha (a transparent output),
    premultiplied alpha not divided out (100 for 199)."""
    import tifffile

    from moceir.io import ImageReadError, load_image

    palette = np.zeros((3, 65536), np.uint16)
    palette[:, 1] = 65535
    rgbx = np.full((4, 4, 4), 40000, np.uint16)
    rgbx[..., 3] = 0
    premultiplied = np.full((4, 4, 4), 100 * 257, np.uint16)
    premultiplied[..., 3] = 128 * 257
    cases = {"mw": (np.full((4, 4), 1000, np.uint16), {"photometric": "miniswhite"}, 1 - 1000 / 65535, None),
             "pal": (np.ones((4, 4), np.uint16), {"photometric": "palette", "colormap": palette}, 1.0, None),
             "rgbx": (rgbx, {"photometric": "rgb", "extrasamples": ["unspecified"]}, 40000 / 65535, None),
             "assoc": (premultiplied, {"photometric": "rgb", "extrasamples": ["assocalpha"]}, 100 / 128, 128 / 255)}
    for name, (data, tags, colour, alpha) in cases.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", data, **tags)
        img = load_image(tmp_path / f"{name}.tif")
        assert img.bit_depth == 16 and np.allclose(img.rgb, colour, atol=1e-4), name
        assert (img.alpha is None) if alpha is None else np.allclose(img.alpha, alpha, atol=1e-4), name
    tifffile.imwrite(tmp_path / "cmyk.tif", np.zeros((4, 4, 4), np.uint16), photometric="separated")
    with pytest.raises(ImageReadError, match="cmyk.tif: a 16-bit TIFF in the CMYK colour space is not supported"):
        load_image(tmp_path / "cmyk.tif")


def test_16bit_tiffs_without_a_photometric_tag_and_gray_with_extra_channels_read_as_libtiff_does(tmp_path):
    """Review: tifffile reports a missing PhotometricInterpretation as min-is-white, so such files (gray, RGB) were
    read inverted; a min-is-black TIFF with two extra channels was read as red."""
    import struct

    import tifffile

    from moceir.io import load_image

    for name, data in (("gray", np.full((4, 4), 1000, np.uint16)), ("rgb", np.full((4, 4, 3), 1000, np.uint16))):
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, data)
        raw = bytearray(path.read_bytes())
        ifd = struct.unpack_from("<I", raw, 4)[0]
        for i in range(struct.unpack_from("<H", raw, ifd)[0]):
            if struct.unpack_from("<H", raw, ifd + 2 + 12 * i)[0] == 262:
                struct.pack_into("<H", raw, ifd + 2 + 12 * i, 65000)  # the tag renamed: no Photometric left
        path.write_bytes(raw)
        assert np.allclose(load_image(path).rgb, 1000 / 65535, atol=1e-6), name
    tifffile.imwrite(tmp_path / "mb3.tif", np.full((4, 4, 3), 20000, np.uint16), photometric="minisblack",
                     extrasamples=["unspecified", "unspecified"], planarconfig="contig")
    img = load_image(tmp_path / "mb3.tif")
    assert img.grayscale and img.alpha is None and np.allclose(img.rgb, 20000 / 65535, atol=1e-6)
    tifffile.imwrite(tmp_path / "mba.tif", np.full((4, 4, 3), 20000, np.uint16), photometric="minisblack",
                     extrasamples=["unassalpha", "unspecified"], planarconfig="contig")
    img = load_image(tmp_path / "mba.tif")
    assert img.grayscale and np.allclose(img.rgb, 20000 / 65535) and np.allclose(img.alpha, 20000 / 65535)


def test_a_colour_profile_is_written_only_where_it_describes_the_pixels(tmp_path):
    """Review: a CMYK photo's profile was embedded in its RGB output (viewers misread or reject it)."""
    from PIL import ImageCms

    from moceir.io import load_image, save_image

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk, gray = srgb[:16] + b"CMYK" + srgb[20:], srgb[:16] + b"GRAY" + srgb[20:]  # only the header is checked
    rgb = np.full((4, 4, 3), 0.5, np.float32)
    for name, profile, bits, grayscale, kept in (("a.png", cmyk, 8, False, None), ("b.png", srgb, 16, False, srgb),
                                                 ("c.tif", cmyk, 16, False, None), ("d.jpg", srgb, 8, True, None),
                                                 ("e.png", gray, 8, True, gray), ("f.tif", gray, 16, True, gray)):
        save_image(tmp_path / name, rgb, bit_depth=bits, grayscale=grayscale, icc_profile=profile)
        assert load_image(tmp_path / name).icc_profile == kept, name
    alpha = np.ones((4, 4), np.float32)  # 16-bit gray + alpha TIFF: PIL cannot open it, tifffile reads the profile
    save_image(tmp_path / "ga.tif", rgb, alpha, bit_depth=16, grayscale=True, icc_profile=gray)
    assert load_image(tmp_path / "ga.tif").icc_profile == gray


def test_a_report_through_a_linked_folder_never_replaces_an_image(tmp_path, tiny_model):
    from moceir.io import save_image

    (tmp_path / "in").mkdir()
    save_image(tmp_path / "in" / "a.png", IMAGE)
    (tmp_path / "link").symlink_to(tmp_path / "o")
    for report in (tmp_path / "link" / "a.png", tmp_path / "o"):  # an output through a link; the output folder
        with pytest.raises(moceir.UsageError, match="output image's path|is the output folder"):
            moceir.restore_files([tmp_path / "in"], tmp_path / "o", model=tiny_model, report=report, overwrite=True,
                                 progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("call, match", [
    (lambda p: __import__("moceir.io").io.save_image(p, (IMAGE * 255).astype(np.uint8)), "float array"),
    (lambda p: __import__("moceir.io").io.save_image(p, np.full_like(IMAGE, np.nan)), "NaN"),
    (lambda p: __import__("moceir.io").io.save_image(p, IMAGE, bit_depth=12), "bit_depth must be 8 or 16"),
    (lambda p: __import__("moceir.io").io.save_image(p.with_suffix(".pdf"), IMAGE), "cannot write .pdf"),
    (lambda p: __import__("moceir.io").io.save_image(p, IMAGE.transpose(2, 0, 1)), r"\[H, W, 3\]"),
])
def test_save_image_refuses_what_it_would_write_wrongly(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):  # uint8 came out as 0/255, NaN black, 12 bits as 8
        call(tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_degradations_refuse_inputs_they_would_garble():
    from moceir.data import degradations as d

    rng = np.random.default_rng(0)
    u8 = (IMAGE * 255).astype(np.uint8)
    depth = d.pseudo_depth(*IMAGE.shape[:2], rng)
    for call, match in ((lambda: d.add_gaussian_noise(IMAGE, 25, rng), "uint8 array"),  # came back uint8 0..77
                        (lambda: d.add_gaussian_noise(u8.astype(np.uint16), 25, rng), "uint8 array"),
                        (lambda: d.add_gaussian_noise(u8, float("nan"), rng), "sigma must be"),
                        (lambda: d.random_haze(IMAGE, rng), "uint8 array"),
                        (lambda: d.add_haze(u8, depth, 1.0, 0.9), "float array"),
                        (lambda: d.add_haze(IMAGE[..., 0], depth, 1.0, 0.9), r"\[H, W, 3\]"),
                        (lambda: d.add_haze(IMAGE, depth, float("nan"), 0.9), "beta must be"),
                        (lambda: d.add_haze(np.where(IMAGE > 0.5, np.nan, IMAGE), depth, 1, 0.9), "clean holds"),
                        (lambda: d.add_haze(IMAGE, np.full_like(depth, np.inf), 1.0, 0.9), "depth holds NaN"),
                        (lambda: d.add_haze(IMAGE, depth, 1.0, 230), "airlight must lie"),
                        (lambda: d.crop_to_multiple(IMAGE, 0), "base must be"),
                        (lambda: d.augment(IMAGE, 2.5), "mode must be an int"),
                        (lambda: d.pseudo_depth(0, 0, rng), "pseudo_depth needs"),
                        (lambda: d.sigma_for_task([]), "not a denoising task")):
        with pytest.raises(ValueError, match=match):
            call()
    assert d.add_gaussian_noise(u8, 25, rng).dtype == np.uint8 and d.random_haze(u8, rng).shape == u8.shape
    assert d.add_gaussian_noise(u8[..., 0], 25, rng).shape == u8.shape[:2]  # any channel count, as documented
    assert d.add_haze(IMAGE, depth, 1.0, np.full((1, 1, 3), 0.9)).shape == IMAGE.shape  # a broadcasting airlight


def test_review_fixes_float16_alpha_cpu_index_numpy_range_float64_tensor(tmp_path, tiny_model):
    from moceir.inference import restore_tensor
    from moceir.io import load_image, save_image
    from moceir.metrics import psnr

    alpha = np.full(IMAGE.shape[:2], 0.9, np.float16)
    save_image(tmp_path / "h.png", IMAGE.astype(np.float16), alpha=alpha, bit_depth=16)  # alpha came back 0.0
    assert np.abs(load_image(tmp_path / "h.png").alpha - 0.9).max() < 1e-3
    assert moceir.restore(tiny_model, IMAGE, device="cpu:0").shape == IMAGE.shape  # "move it to cpu:0"
    u8 = (IMAGE * 255).astype(np.uint8)
    noisy = np.clip(u8.astype(int) + 9, 0, 255).astype(np.uint8)
    assert psnr(u8, noisy, data_range=np.uint8(255)) == pytest.approx(psnr(u8, noisy, data_range=255))  # -9.5 dB
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(restore_tensor(tiny_model, x.double()).float(), restore_tensor(tiny_model, x), atol=1e-5)


def test_restore_tensor_checks_its_options_and_input(tiny_model):
    from moceir.inference import restore_tensor

    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="overlap must be"):  # NaN pixels before
        restore_tensor(tiny_model, x, tile=16, overlap=-8)
    with pytest.raises(ValueError, match="tile must be"):  # silently 8 before
        restore_tensor(tiny_model, x, tile=0)
    with pytest.raises(ValueError, match="float tensor"):
        restore_tensor(tiny_model, (x * 255).to(torch.uint8))
    assert torch.isfinite(restore_tensor(tiny_model, x, tile=16, overlap=4)).all()


def test_metrics_refuse_pairs_that_give_wrong_numbers():
    from moceir.metrics import psnr, ssim

    b = np.clip(IMAGE + 0.05, 0, 1).astype(np.float32)
    for call, match in ((lambda: psnr(IMAGE, b[..., :1]), "shapes differ"),  # broadcast to 9.38 dB before
                        (lambda: psnr((IMAGE * 255).astype(np.uint8), (b * 255).astype(np.uint8)), "data_range"),
                        (lambda: psnr(IMAGE, b, crop_border=-1), "crop_border"),
                        (lambda: psnr(IMAGE, b, crop_border=10), "after crop_border"),
                        (lambda: psnr(IMAGE, b, data_range=0), "data_range must be"),
                        (lambda: ssim(IMAGE[:7, :7], b[:7, :7]), "at least 11x11"),  # NaN before
                        (lambda: ssim(IMAGE.transpose(2, 0, 1), b.transpose(2, 0, 1)), r"\[H, W, C\]"),
                        (lambda: psnr(IMAGE[..., :1], b[..., :1], test_y_channel=True), "RGB")):
        with pytest.raises(ValueError, match=match):
            call()
    u8a, u8b = (IMAGE * 255).astype(np.uint8), (b * 255).astype(np.uint8)
    assert psnr(u8a, u8b, data_range=255) == pytest.approx(psnr(u8a / 255.0, u8b / 255.0), abs=1e-6)
    assert psnr(IMAGE[..., 0], b[..., 0]) > 0 and 0 < ssim(IMAGE[..., 0], b[..., 0]) <= 1


def test_empty_paths_and_odd_arguments_of_restore_files(tmp_path, tiny_model):
    for kwargs in (dict(inputs=""), dict(inputs=None), dict(inputs=[None]), dict(inputs=b"x"),
                   dict(output_dir=""), dict(suffix=None), dict(num_workers=1.5), dict(precision=[])):
        args = {"inputs": [tmp_path], "output_dir": tmp_path / "o", **kwargs}  # "" restored the working folder
        with pytest.raises(moceir.UsageError):
            moceir.restore_files(args.pop("inputs"), args.pop("output_dir"), model=tiny_model, progress=False, **args)
    assert not (tmp_path / "o").exists()


def test_each_modules_mode_is_kept_and_low_precision_models_run(tiny_model):
    model = moceir.create_model("MoCE_IR_tiny")
    model.load_state_dict(tiny_model.state_dict())
    model.train()
    model.patch_embed.eval()  # a frozen part: restore set it back to train
    moceir.restore(model, IMAGE)
    assert model.training and not model.patch_embed.training
    bundled = moceir.load_model("default")
    reference = moceir.restore(bundled, IMAGE)
    for dtype, tolerance in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):  # "expected scalar type Float"
        out = moceir.restore(moceir.load_model("default").to(dtype), IMAGE)
        assert out.dtype == np.float32 and np.abs(out - reference).max() < tolerance
    overflowing = moceir.create_model("MoCE_IR_tiny").eval()
    overflowing.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        overflowing.output.weight.mul_(1e4)  # outputs beyond float16's range: came back as NaN pixels
    with pytest.raises(ValueError, match="float16 model overflows"):
        moceir.restore(overflowing.half(), IMAGE)


def test_a_pipe_is_refused_not_read_forever(tmp_path):
    import os
    import threading

    from moceir.io import ImageReadError, image_size, load_image

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            load_image(fifo)
        except ImageReadError as e:
            outcome.append(str(e))
        outcome.append(image_size(fifo))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert outcome and "not a regular file" in outcome[0] and outcome[1] is None, "load_image blocked on a FIFO"
    for path, says in ((tmp_path / "missing.png", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(ImageReadError, match=says):  # "truncated, empty, not an image" before
            load_image(path)


def test_arrays_and_tensors_whose_kind_cannot_be_kept_are_refused(tiny_model):
    with pytest.raises(ValueError, match="masked array"):
        moceir.restore(tiny_model, np.ma.masked_array(IMAGE, mask=IMAGE > 0.5))
    dense = torch.from_numpy(IMAGE).permute(2, 0, 1).contiguous()
    for tensor in (dense.to_sparse(), torch.empty(3, 20, 28, device="meta")):
        with pytest.raises(ValueError, match="dense tensor"):
            moceir.restore(tiny_model, tensor)


def test_configs_that_cannot_build_and_unknown_presets_are_one_line():
    with pytest.raises(ValueError, match=r"expert ranks \[0, 1, 3, 7\]"):  # torch's "groups must be a positive integer"
        moceir.create_model("MoCE_IR_tiny", dim=7)
    with pytest.raises(KeyError) as e:
        moceir.get_config("MoCE_IR_XL")
    assert str(e.value).startswith("unknown model 'MoCE_IR_XL'") and isinstance(e.value, ValueError)


@pytest.mark.parametrize("ext", ["bmp", "jpg"])
def test_alpha_that_the_output_format_cannot_hold_is_announced(tmp_path, tiny_model, ext):
    # gray+alpha to .bmp was PIL's "cannot write mode LA as BMP"; RGBA to .bmp or .jpg dropped alpha without a word
    for mode in ("LA", "RGBA"):
        src = tmp_path / f"{mode}.png"
        Image.fromarray((IMAGE * 255).astype(np.uint8)).convert(mode).save(src)
        lines = []
        rows = moceir.restore_files([src], tmp_path / f"o{mode}", model=tiny_model, ext=ext, progress=False,
                                    log=lines.append)
        assert "error" not in rows[0] and Path(rows[0]["output"]).is_file()
        assert any("alpha channel" in line and f".{ext} cannot hold" in line for line in lines), lines


def test_a_model_on_another_device_than_asked_is_refused():
    # no GPU here: a model on the meta device stands for one on another device than ``device=``
    model = moceir.create_model("MoCE_IR_tiny").to("meta")
    with pytest.raises(ValueError, match=r"the model is on meta, not cpu: move it first \(model.to\('cpu'\)\)"):
        moceir.restore(model, np.zeros((16, 16, 3), np.float32), device="cpu")


@pytest.mark.parametrize("name", ["x" * 250 + ".png", "中" * 200 + ".png", "a\x00b.png"])
def test_demo_upload_names_too_long_or_with_a_nul_are_shortened_not_tracebacks(tmp_path, tiny_model, name):
    from moceir.demo import MAX_NAME_BYTES

    session, image = _demo_session(tmp_path, tiny_model)
    result = session.restore(image, name)  # was OSError: File name too long / ValueError: embedded null byte
    assert result.output.is_file() and len(result.output.name.encode()) <= MAX_NAME_BYTES + len("_restored")
    assert "\x00" not in result.name and len(result.name.encode()) <= MAX_NAME_BYTES
    _, _, degraded = session.degrade(image, name, "Gaussian noise σ=25")
    assert degraded.is_file() and session.restore(degraded, degraded.name).output.is_file()


def test_demo_errors_do_not_show_server_paths(tmp_path, tiny_model):
    from moceir.demo import DemoError

    session, image = _demo_session(tmp_path, tiny_model)
    truncated = tmp_path / "work" / "upload.png"
    truncated.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DemoError) as raised:
        session.restore(truncated, "photo.png")
    message = str(raised.value)
    assert message.startswith("photo.png: ") and str(tmp_path) not in message and "upload" not in message, message
    truncated.unlink()


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_read_rgb_rounds_16bit_rgb_as_load_image_does(tmp_path, suffix):
    from moceir.io import load_image, read_rgb, save_image

    path = tmp_path / f"rgb16{suffix}"
    save_image(path, np.random.default_rng(0).random((16, 24, 3)).astype(np.float32), bit_depth=16)
    assert np.array_equal(read_rgb(path), np.round(load_image(path).rgb * 255).astype(np.uint8))  # PIL: high byte


def test_a_lone_surrogate_suffix_is_refused_up_front(tmp_path, tiny_model):
    from moceir.io import save_image

    save_image(tmp_path / "a.png", IMAGE)
    with pytest.raises(moceir.UsageError, match="holds characters a file name cannot"):
        moceir.restore_files(tmp_path / "a.png", tmp_path / "out", tiny_model, suffix="\ud800", progress=False)


def test_demo_names_keep_printable_unicode_and_lose_control_characters():
    from moceir.demo import _display_name

    shot = "Screenshot 2026-12-06 at 10.00.00\u202fAM.png"  # macOS puts a narrow no-break space before AM
    assert _display_name(shot) == shot and _display_name("👩\u200d💻.png") == "👩\u200d💻.png"
    assert _display_name("a\x00b\nc\ud800.png") == "abc.png" and _display_name("\x07") == "image"


def test_demo_on_a_full_disk_is_a_demo_error_and_leaves_nothing(tmp_path, tiny_model, monkeypatch):
    import errno
    import shutil

    from moceir import demo
    from moceir.demo import DemoError

    session, image = _demo_session(tmp_path, tiny_model)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "save_image", full)
        with pytest.raises(DemoError, match="upload.png: the server cannot store images right now"):
            session.degrade(image, "upload.png", "Gaussian noise σ=25")  # was an OSError
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "move", full)
        with pytest.raises(DemoError, match="No space left on device"):
            session.restore(image, "upload.png")  # was an OSError, leaving an empty result for the page
    with monkeypatch.context() as patch:  # the restored image itself cannot be written
        patch.setattr("moceir.pipeline.save_image", full)
        with pytest.raises(DemoError) as failed:
            session.restore(image, "upload.png")
        assert str(failed.value).startswith("upload.png: the server cannot store images right now (No space left")
        assert "-o" not in str(failed.value)  # was "free some space or choose another -o": not the page user's to do
    assert list((tmp_path / "work").iterdir()) == [] and list((tmp_path / "results").iterdir()) == []


def test_restore_training_and_demo_say_the_same_of_a_path_that_is_not_an_image_file(tmp_path):
    """Probe: load_image and the training data check each had their own words for these ("is a link to a missing
    file (or a link loop)" against "cannot be opened (Too many levels of symbolic links)", "does not exist" against
    "is missing")."""
    from moceir.data.datasets import image_size as training_size
    from moceir.io import ImageReadError, load_image

    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    for name, why in (("missing.png", "does not exist"), ("loop.png", "is a link loop"),
                      ("dangling.png", "is a link to nothing (dangling)"), ("folder.png", "is a folder"),
                      ("fifo.png", "is not a regular file (a pipe or device)")):
        path = tmp_path / name
        with pytest.raises(ImageReadError) as raised:
            load_image(path)
        assert str(raised.value) == f"{path}: {why}; pass an image file"
        assert training_size(path) == why


@pytest.mark.parametrize("value", [1e300, 2e12, 0.0, float("nan"), "24e6"])
def test_demo_max_pixels_beyond_what_it_can_serve_is_one_line_before_anything_starts(value):
    """Probe: `moceir demo --max_pixels 1e300` failed in Gradio ("Integer exceeds 64-bit range"), then a traceback."""
    from moceir import demo
    from moceir.pipeline import UsageError

    with pytest.raises(UsageError, match="choose a number of pixels above 0 and up to 1e\\+12"):
        demo.launch("default", port=1, device="cpu", max_pixels=value, block=False)


def test_a_cuda_index_equal_to_the_gpu_count_is_refused(monkeypatch):
    """Mutation: ``index > device_count()`` accepted cuda:1 on a machine with one GPU (indices are 0-based)."""
    from moceir.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(moceir.UsageError, match="'cuda:1' requested but this machine has 1 CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize("flag", [True, False])
def test_a_bool_is_not_a_device_index(flag):
    """Mutation: without the bool check, device=True was cuda:1 and device=False cuda:0."""
    from moceir.runtime import resolve_device

    with pytest.raises(moceir.UsageError, match="device must be"):
        resolve_device(flag)


def test_a_child_forked_while_another_thread_reads_an_image_can_read_images(tmp_path):
    """Review: decoding holds a lock (warnings are global state); a loader worker forked while another thread of
    the program (a server's) held it would have waited forever on its first image, and its own warnings and
    tifffile's log would have gone to the other thread's capture, which nobody reads in the child."""
    import logging
    import threading
    import time
    import warnings

    import moceir.io as mio

    path = tmp_path / "a.png"
    mio.save_image(path, np.zeros((8, 8, 3), np.float32))
    held, release = threading.Event(), threading.Event()
    filters, tifffile_log = list(warnings.filters), logging.getLogger("tifffile")
    handlers = list(tifffile_log.handlers)

    def hold() -> None:
        with mio._decoder_warnings():
            held.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    held.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it decodes
        code = 0
        try:
            restored = warnings.filters == filters and tifffile_log.propagate and tifffile_log.handlers == handlers
            mio.load_image_noting(path)
            code = 0 if restored else 2
        except BaseException:  # noqa: BLE001
            code = 1
        os._exit(code)
    try:
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid, "the forked child hung"
        assert os.waitstatus_to_exitcode(done[1]) == 0, "the child failed (1) or kept the other thread's capture (2)"
    finally:
        release.set()


def test_decoder_warnings_are_the_decoders_own(tmp_path):
    """Review: a 16-bit PNG got the note "its decoder warned: unclosed file <_io.BufferedReader ...>" (pypng's
    file left to the garbage collector), and another thread's warnings were caught as the image's and hidden."""
    import threading
    import warnings

    import moceir.io as mio

    mio.save_image(tmp_path / "a16.png", np.random.default_rng(0).random((8, 8, 3)).astype(np.float32),
                   bit_depth=16)
    assert mio.load_image_noting(tmp_path / "a16.png").decoder_warnings == ()
    mio.save_image(tmp_path / "big.png", np.random.default_rng(0).random((600, 600, 3)).astype(np.float32))
    stop = threading.Event()

    def warn_meanwhile() -> None:
        while not stop.is_set():
            warnings.warn("a warning from another thread", UserWarning)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        other = threading.Thread(target=warn_meanwhile)
        other.start()
        try:
            for _ in range(3):
                assert mio.load_image_noting(tmp_path / "big.png").decoder_warnings == ()
        finally:
            stop.set()
            other.join()
    assert any("another thread" in str(w.message) for w in shown)  # shown as before, not kept as the image's

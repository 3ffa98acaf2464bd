"""Hostile calls of the Python API (moceir.restore, load_model, save_model), of image size probing and of the demo's
checks: each is a one-line ValueError/TypeError or a correct result, never NaN pixels, clipped data or a traceback
from deep inside torch."""

from __future__ import annotations

import socket
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import moceir
from conftest import fill_deterministic


@pytest.fixture(scope="module")
def tiny_model():
    model = moceir.create_model("MoCE_IR_tiny").eval()
    fill_deterministic(model, 0.05)
    return model


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_cuda_index_beyond_the_gpus_is_one_line(monkeypatch):
    from moceir.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(moceir.UsageError, match="'cuda:3' requested but this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device(0) == torch.device("cuda:0") == resolve_device(torch.device("cuda", 0))


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
    with pytest.raises(TypeError, match="output_dir must be a folder path"):
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


def test_demo_degradation_that_is_not_a_name(tmp_path, tiny_model):
    from moceir.demo import DemoError, DemoSession

    path = moceir.save_model(tiny_model, tmp_path / "m.safetensors")
    session = DemoSession(str(path), "cpu", 1e6, tmp_path, tmp_path)
    image = tmp_path / "a.png"
    Image.fromarray((IMAGE * 255).astype(np.uint8)).save(image)
    for value in (["noise_25"], None, 3):  # a list was an uncaught TypeError (unhashable)
        with pytest.raises(DemoError, match="unknown degradation"):
            session.degrade(image, "a.png", value)


def test_a_bad_embedded_config_does_not_advise_a_flag_the_demo_lacks(tmp_path):
    from moceir.models.checkpoints import CheckpointError, config_from_dict

    with pytest.raises(CheckpointError, match=r"--model in test and routing, config= in load_model"):
        config_from_dict({"dim": "wide"}, "m.safetensors")

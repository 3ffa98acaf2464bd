"""moceir.restore's own conversions and options, exactly: pixel scaling, rounding, clamping, gray output and
layouts (through an identity network, whose output convolution is zeroed so the image is its input), option checks at
their edges, context padding with tiles, and eval mode. Each test catches a bug that a mutation audit made and that
no earlier test saw."""

import numpy as np
import pytest
import torch
from PIL import Image

import moceir
from moceir.checks import is_real, not_a_bool
from moceir.inference import restore_tensor

from conftest import counted_tiny, fill_deterministic


@pytest.fixture(scope="module")
def identity():
    """A tiny network whose output is its input: its output convolution is zeroed."""
    model = fill_deterministic(moceir.create_model("MoCE_IR_tiny").eval(), 0.05)
    with torch.no_grad():
        model.output.weight.zero_()
        if model.output.bias is not None:
            model.output.bias.zero_()
    return model


@pytest.fixture(scope="module")
def loud(tiny_model):
    """The tiny test network with its output convolution x200: its restorations leave [0, 1] far."""
    model = moceir.create_model("MoCE_IR_tiny").eval()
    model.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        model.output.weight.mul_(200.0)
    return model


def test_integer_pixels_come_back_exactly_through_an_identity_network(identity):
    """Mutations: uint16 white taken as 65536 (white wraps to black), uint16 scaled by 255, rounding dropped
    (x / 255 * 255 truncates to x - 1 for some x)."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    u8[0, :3] = [0, 255, 128]
    u16 = rng.integers(0, 65536, (24, 32, 3), dtype=np.uint16)
    u16[0, :3] = [0, 65535, 32768]
    for arr in (u8, u16, u8[..., 0], u16[..., 0]):
        out = moceir.restore(identity, arr)
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
    t = torch.from_numpy(u8).permute(2, 0, 1).contiguous()
    assert torch.equal(moceir.restore(identity, t), t)
    pil16 = Image.fromarray(u16[..., 0])
    assert np.array_equal(np.asarray(moceir.restore(identity, pil16)), u16[..., 0])


def test_outputs_beyond_range_are_clamped_not_wrapped(loud):
    """Mutation: without the clamp, uint8 outputs above 255 wrapped around and float outputs left [0, 1]."""
    x = np.random.default_rng(1).random((24, 32, 3)).astype(np.float32)
    raw = restore_tensor(loud, torch.from_numpy(x).permute(2, 0, 1)[None], context_pad=16)
    assert raw.min() < -0.5 and raw.max() > 1.5  # the network really leaves the range
    out = moceir.restore(loud, x)
    assert out.min() >= 0 and out.max() <= 1
    expected = raw[0].clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    u8 = moceir.restore(loud, (x * 255).round().astype(np.uint8))
    assert set(np.unique(u8[out == 1.0])) <= {254, 255} and set(np.unique(u8[out == 0.0])) <= {0, 1}


def test_gray_output_is_the_mean_of_the_restored_channels(tiny_model):
    """Mutation: a gray image returned the red channel of its restoration instead of the mean of the three."""
    gray = np.random.default_rng(2).random((24, 32)).astype(np.float32)
    rgb = torch.from_numpy(gray)[None, None].expand(1, 3, 24, 32)
    restored = restore_tensor(tiny_model, rgb, context_pad=16).clamp(0, 1)[0]
    assert (restored[0] - restored[1]).abs().max() > 1e-4  # the channels differ, so the choice is seen
    np.testing.assert_allclose(moceir.restore(tiny_model, gray), restored.mean(0).numpy(), atol=1e-6)


def test_a_numpy_image_three_pixels_high_is_hwc(tiny_model):
    """Mutation: the rule "a [3, H, 3] tensor is [3, H, W]" applied to numpy arrays too, which are never CHW."""
    x = np.random.default_rng(3).random((3, 24, 3)).astype(np.float32)
    out = moceir.restore(tiny_model, x)
    assert out.shape == (3, 24, 3)
    expected = restore_tensor(tiny_model, torch.from_numpy(x).permute(2, 0, 1)[None], context_pad=16).clamp(0, 1)
    np.testing.assert_allclose(out, expected[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_negative_floats_are_refused(tiny_model):
    """Mutation: only the upper bound was checked; -0.5 was silently clamped."""
    x = np.random.default_rng(4).random((16, 16, 3)).astype(np.float32)
    x[2, 3, 0] = -0.5
    with pytest.raises(ValueError, match=r"values in \[-0.5, .*must lie in \[0, 1\]"):
        moceir.restore(tiny_model, x)


def test_a_nan_input_is_named_as_the_input(tiny_model):
    """Mutation: without the input check, a NaN pixel reached the network and was blamed on it."""
    x = np.random.default_rng(5).random((16, 16, 3)).astype(np.float32)
    x[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="image holds NaN or infinite values"):
        moceir.restore(tiny_model, x)


def test_clamped_white_is_the_integer_white(loud):
    """Mutation: uint16 white taken as 65536; round trips through an identity network agree, but a restored pixel
    at 1.0 became 65536, which wraps to 0: white turned black."""
    x = np.random.default_rng(6).random((24, 32, 3)).astype(np.float32)
    for dtype, white in ((np.uint8, 255), (np.uint16, 65535)):
        q = (x * white).round().astype(dtype)
        ref = moceir.restore(loud, q.astype(np.float32) / white)  # the same pixels, as floats
        assert (ref == 1.0).any()
        out = moceir.restore(loud, q)
        assert out.dtype == dtype and (out[ref == 1.0] == white).all()
        assert np.abs(out.astype(np.float64) - np.round(ref.astype(np.float64) * white)).max() <= 1


OPTION_IMAGE = np.random.default_rng(0).random((20, 28, 3)).astype(np.float32)


@pytest.mark.parametrize("value", [float("inf"), True])
def test_max_memory_that_is_infinite_or_a_bool_is_refused(tiny_model, value):
    """Mutations: without isfinite, max_memory=inf was taken; without the bool rule, True was 1 byte."""
    with pytest.raises(ValueError, match="max_memory must be"):
        moceir.restore(tiny_model, OPTION_IMAGE, max_memory=value)


def test_max_memory_and_tile_of_numpy_types_and_the_smallest_tile_are_taken(tiny_model):
    """Mutations: np.float32 budgets (from a numpy computation) refused; tile=1 (documented: >= 1) refused."""
    assert is_real(np.float32(2e9)) and not is_real(np.bool_(True)) and not is_real(1 + 0j)
    for kwargs in (dict(max_memory=np.float32(4e9)), dict(tile=1, overlap=0, context_pad=0),
                   dict(tile=np.int64(16), context_pad=0)):
        assert moceir.restore(tiny_model, OPTION_IMAGE, **kwargs).shape == OPTION_IMAGE.shape


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_a_switch_takes_only_a_bool(value):
    """Mutation: ints accepted as switches (overwrite=1 replaced files without a real True)."""
    assert not_a_bool("overwrite", value) == f"overwrite must be True or False, not {value!r}"
    assert not_a_bool("overwrite", True) is None and not_a_bool("overwrite", False) is None


def test_context_pad_of_a_tall_narrow_image_is_limited_by_its_width(tiny_model):
    """Mutation: the pad was limited by the height twice; a 64 x 6 image then failed in reflect padding."""
    for shape in ((64, 6, 3), (6, 64, 3)):
        x = np.random.default_rng(0).random(shape).astype(np.float32)
        assert moceir.restore(tiny_model, x, context_pad=16).shape == shape


def test_global_routing_and_progress_survive_context_padding(tiny_model, monkeypatch):
    """Mutations: the padded call routed each tile itself ("tile") or dropped on_tile (no progress for the
    pipeline and demo, which always pass context_pad)."""
    calls, progress = [], []
    forward = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda x, return_aux=None, experts=None:
                        calls.append(experts) or forward(x, return_aux, experts))
    x = torch.rand(1, 3, 80, 64, generator=torch.Generator().manual_seed(0))
    restore_tensor(tiny_model, x, tile=32, overlap=8, routing="global", context_pad=8,
                   on_tile=lambda done, total: progress.append((done, total)))
    forced = [c for c in calls if c is not None]
    assert calls[0] is None and len(forced) == len(calls) - 1 > 1
    total = len(forced)
    assert progress == [(n, total) for n in range(1, total + 1)]


def test_an_image_wider_than_the_tile_is_tiled_even_when_it_is_short(tiny_model):
    """Mutation: "h <= tile or w <= tile" ran a 16 x 160 image whole, tile or not."""
    progress = []
    restore_tensor(tiny_model, torch.rand(1, 3, 16, 160), tile=32, overlap=8,
                   on_tile=lambda done, total: progress.append(total))
    assert progress and progress[0] > 1


def test_api_passes_overlap_and_routing_to_the_tiles(tiny_model, monkeypatch):
    """Mutations: restore dropped overlap (restore_tensor's default 32 used) or routing ("tile" used). Random
    weights route random images alike, so routing is seen in restore_tensor's arguments; overlap in the image."""
    import moceir.inference as inference

    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    expected = restore_tensor(tiny_model, x, tile=32, overlap=4).clamp(0, 1)
    torch.testing.assert_close(moceir.restore(tiny_model, x, tile=32, overlap=4, context_pad=0), expected,
                               rtol=0, atol=1e-6)
    assert (expected - restore_tensor(tiny_model, x, tile=32, overlap=16).clamp(0, 1)).abs().max() > 1e-4
    seen = []
    real = inference.restore_tensor

    def spy(model, batch, tile=None, overlap=32, routing="tile", *args, **kwargs):
        seen.append((tile, overlap, routing))
        return real(model, batch, tile, overlap, routing, *args, **kwargs)

    monkeypatch.setattr(inference, "restore_tensor", spy)
    moceir.restore(tiny_model, x, tile=32, overlap=4, routing="global", context_pad=0)
    assert seen == [(32, 4, "global")]


def test_a_model_in_training_mode_restores_as_in_eval_mode():
    """Mutation: without model.eval() during restore, the routers' training noise changed every result."""
    model = counted_tiny()
    x = np.random.default_rng(2).random((32, 40, 3)).astype(np.float32)
    reference = moceir.restore(model, x)
    model.train()
    torch.manual_seed(0)
    out = moceir.restore(model, x)
    assert model.training
    np.testing.assert_array_equal(out, reference)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16", "CMYK"])
def test_a_pil_image_keeps_its_profile_resolution_exif_and_xmp(identity, mode):
    """Probe: moceir.restore of a PIL image returned one with an empty .info: colour profile, dpi and EXIF gone."""
    from PIL import ImageCms

    image = Image.new(mode, (16, 8))
    exif = Image.Exif()
    exif[0x010F] = "MakerCo"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image.info.update(icc_profile=icc, dpi=(300, 300), exif=exif.tobytes(), xmp=b"<x:xmpmeta/>")
    out = moceir.restore(identity, image)
    assert out.info["dpi"] == (300, 300) and out.info["exif"] == exif.tobytes() and out.info["xmp"] == b"<x:xmpmeta/>"
    assert out.info.get("icc_profile") == (None if mode == "CMYK" else icc)  # CMYK comes back RGB

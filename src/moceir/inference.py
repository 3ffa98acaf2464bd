"""Inference at any size: padding to the network's multiple, overlapping tiles with seamless blending,
batching, and ``restore`` for numpy arrays, PIL images and tensors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checks import is_real, is_whole
from .models import MoCEIR
from .runtime import allocator_tuned, release_freed_memory

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ROUTING_MODES = ("tile", "global")


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad [B, C, H, W] at the bottom/right to multiples of ``multiple``; returns (padded, (H, W)).

    Sides shorter than the pad use edge replication, which reflection cannot do.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def _blend_window(size: int, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D weights: a linear ramp over the overlap on each side, 1 inside (never 0, so every pixel is covered)."""
    w = torch.ones(size, device=device)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = ramp
        w[-overlap:] = ramp.flip(0)
    return w


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


@torch.no_grad()
def global_experts(model: MoCEIR, x: torch.Tensor, max_side: int = 512) -> torch.Tensor:
    """One routing decision per image from a downscaled pass: [layers, B, k] expert indices."""
    h, w = x.shape[-2:]
    scale = min(1.0, max_side / max(h, w))
    # floor, as scale_factor would, but at least 1 px: the short side of a 1 x 5000 image would become 0
    size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
    small = F.interpolate(x, size=size, mode="area") if scale < 1 else x
    small, _ = pad_to_multiple(small, model.config.size_multiple)
    return model(small, return_aux=True).expert_indices


@torch.no_grad()
def restore_tensor(model: MoCEIR, x: torch.Tensor, tile: int | None = None, overlap: int = 32,
                   routing: str = "tile", return_experts: bool = False,
                   on_tile: Callable[[int, int], None] | None = None, context_pad: int = 0):
    """Restore [B, 3, H, W] in [0, 1] of any size -> [B, 3, H, W] (same size; not clamped).

    With ``tile``, the image is processed in overlapping tile x tile windows blended with linear ramps, so
    memory is bounded by the tile size. ``routing="tile"`` lets each tile pick its experts;
    ``routing="global"`` routes every tile by one decision from a downscaled pass of the whole image.
    With ``return_experts`` also returns the experts ([layers, B, k]; for tiles, of the global pass or the
    first tile). ``on_tile(done, total)`` is called after each tile. ``context_pad`` px of reflected context
    are added on every side and cropped away again: the network zero-pads its convolutions, which darkens a
    frame of a few pixels at the image border without it.
    """
    check_restore_options(tile, overlap, routing, context_pad, None)
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or 0 in x.shape:
        what = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"restore_tensor takes a float tensor [B, 3, H, W] in [0, 1], not a {what}; "
                         "moceir.restore takes arrays, PIL images and other layouts")
    weights = getattr(model, "parameters", None)
    weight = next(weights(), None) if callable(weights) else None
    if weight is not None and x.dtype != weight.dtype:  # a float64 image, or a half model
        x = x.to(weight.dtype)
    pad = min(context_pad, x.shape[-2] - 1, x.shape[-1] - 1)
    if pad > 0:
        h, w = x.shape[-2:]
        xc = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        y, experts = restore_tensor(model, xc, tile, overlap, routing, True, on_tile)
        y = y[..., pad:pad + h, pad:pad + w]
        return (y, experts) if return_experts else y
    m = model.config.size_multiple
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        xp, _ = pad_to_multiple(x, m)
        out = model(xp, return_aux=True)
        y = out.image[..., :h, :w]
        return (y, out.expert_indices) if return_experts else y
    tile = max(m, tile - tile % m)
    overlap = min(overlap, tile // 2)
    forced = global_experts(model, x) if routing == "global" else None
    xp, _ = pad_to_multiple(x, m)
    hp, wp = xp.shape[-2:]
    out = torch.zeros_like(xp)
    weight = torch.zeros((1, 1, hp, wp), device=x.device, dtype=torch.float32)
    stride = tile - overlap
    first = None
    windows = [(top, left) for top in _tile_starts(hp, tile, stride) for left in _tile_starts(wp, tile, stride)]
    for n, (top, left) in enumerate(windows, 1):
        patch = xp[..., top:top + tile, left:left + tile]
        res = model(patch, return_aux=True, experts=forced)
        if first is None:
            first = res.expert_indices
        th, tw = patch.shape[-2:]
        wy = _blend_window(th, overlap if th == tile and hp > tile else 0, x.device)
        wx = _blend_window(tw, overlap if tw == tile and wp > tile else 0, x.device)
        win = (wy[:, None] * wx[None, :])[None, None]
        out[..., top:top + th, left:left + tw] += res.image.float() * win
        weight[..., top:top + th, left:left + tw] += win
        del res, patch
        release_freed_memory()
        if on_tile is not None:
            on_tile(n, len(windows))
    del xp
    y = out.div_(weight)[..., :h, :w]
    return (y, forced if forced is not None else first) if return_experts else y


# The memory model behind automatic tiling (CPU, fp32, channels-last; checked by
# `python benchmarks/memory.py --restore_size ...`, see docs/performance.md):
#   peak ≈ RUNTIME_BYTES + IMAGE_BYTES_PER_PIXEL * H * W + per-pixel bytes * dim * forward-pass pixels
# A forward pass has a large fixed part (oneDNN's reordered weights and scratch, FFT plans): MoCE-IR-S peaked at
# 1.18 GB above the loaded model at 512x512 and 2.2 GB at 1024x1024, i.e. about 0.85 GB + 1.3 kB per pixel.
# With glibc's allocator tuned (moceir.runtime.tune_cpu_allocator, which the command line applies) freed blocks
# stay in a fragmented heap and a forward pass peaks higher: 4.7 GB at 760x760 (6.4 kB per pixel above the rest).
RUNTIME_BYTES = 1.15e9  # torch and the loaded model (0.3 GB) plus the fixed part of a forward pass
IMAGE_BYTES_PER_PIXEL = 64.0  # whole-image float32 copies: decoded, padded, blended output and weights, encoding
TILE_BYTES_PER_PIXEL_PER_DIM = 55.0  # activations per input pixel, with slack across tiles: 1.76 kB at dim 32
TUNED_TILE_BYTES_PER_PIXEL_PER_DIM = 200.0  # the same with the tuned allocator: 6.4 kB at dim 32
DEFAULT_CPU_BUDGET = 2.5e9  # restore stays within about 3 GB of RSS unless told otherwise (--max_memory)


def bytes_per_pixel(model: MoCEIR) -> float:
    """Estimated bytes of one forward pass per input pixel above its fixed part (fp32): 1.76 kB at dim 32, or
    6.4 kB when this process tuned glibc's allocator."""
    per_dim = TUNED_TILE_BYTES_PER_PIXEL_PER_DIM if allocator_tuned() else TILE_BYTES_PER_PIXEL_PER_DIM
    return per_dim * model.config.dim


def estimate_peak_bytes(model: MoCEIR, h: int, w: int, tile: int | None = None, batch: int = 1) -> float:
    """Estimated peak memory of restoring ``batch`` h x w images together, whole (tile None) or (one image) in
    tile x tile windows."""
    pixels = batch * h * w if tile is None else min(h, tile) * min(w, tile)
    return RUNTIME_BYTES + IMAGE_BYTES_PER_PIXEL * batch * h * w + bytes_per_pixel(model) * pixels


def batch_that_fits(model: MoCEIR, h: int, w: int, budget_bytes: float, at_most: int) -> int:
    """How many untiled h x w images (1 to ``at_most``) can be restored together within ``budget_bytes``."""
    low, high = 1, max(1, at_most)  # the estimate grows with the batch: bisection (one step down per try took
    while low < high:               # minutes for --batch_size 10**9)
        mid = (low + high + 1) // 2
        if estimate_peak_bytes(model, h, w, batch=mid) > budget_bytes:
            high = mid - 1
        else:
            low = mid
    return low


def memory_budget(device: torch.device) -> float:
    """Bytes restore may use: on CUDA 70% of free device memory; on CPU half the available RAM, at most
    DEFAULT_CPU_BUDGET."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.7 * free
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        return DEFAULT_CPU_BUDGET
    return min(0.5 * available, DEFAULT_CPU_BUDGET)


def auto_tile(model: MoCEIR, h: int, w: int, budget_bytes: float, minimum: int = 128, batch: int = 1) -> int | None:
    """The largest tile whose estimated peak stays within ``budget_bytes``, or None if one whole image fits
    (restore ``batch`` images together when they fit too: see :func:`batch_that_fits`). For a batch restored in
    tiles (each window holds ``batch`` tiles) the tile is sized for all of them.

    When even the whole-image buffers exceed the budget, the smallest tile (``minimum``) is used.
    """
    if estimate_peak_bytes(model, h, w) <= budget_bytes:
        return None
    room = budget_bytes - RUNTIME_BYTES - IMAGE_BYTES_PER_PIXEL * batch * h * w
    side = int(math.sqrt(max(room, 0.0) / (batch * bytes_per_pixel(model))))
    m = model.config.size_multiple
    return max(minimum, side - side % m)


def check_restore_options(tile: int | None, overlap: int, routing: str, context_pad: int, max_memory: float | None,
                          overlap_name: str = "overlap", routing_name: str = "routing") -> None:
    """Refuse tiling options that cannot work with a one-line ValueError: a negative overlap blends with weights
    that sum to zero (NaN pixels), a tile below 1 or a non-integer one, negative context, a memory budget that is
    not a positive number. ``*_name``: the names the caller's users know them by."""
    if tile is not None and not (is_whole(tile) and tile >= 1):
        raise ValueError(f"tile must be a whole number of pixels >= 1 (or None: automatic), got {tile!r}")
    if not (is_whole(overlap) and overlap >= 0):
        raise ValueError(f"{overlap_name} must be a whole number of pixels >= 0, got {overlap!r}")
    if not (is_whole(context_pad) and context_pad >= 0):
        raise ValueError(f"context_pad must be a whole number of pixels >= 0, got {context_pad!r}")
    if not isinstance(routing, str) or routing not in ROUTING_MODES:
        raise ValueError(f"{routing_name} must be one of {ROUTING_MODES}, got {routing!r}")
    if max_memory is not None and not (is_real(max_memory) and math.isfinite(max_memory) and max_memory > 0):
        raise ValueError(f"max_memory must be a positive number of bytes (or None: automatic), got {max_memory!r}")


def _check_values(x: torch.Tensor | np.ndarray, what: str) -> None:
    t = torch.as_tensor(x)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or infinite values; restore needs finite pixels")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"{what} is a float image with values in [{lo:.3g}, {hi:.3g}]; floats must lie in "
                         "[0, 1] (divide 0..255 data by 255, or pass uint8)")


# Pixel types restore takes, and the value of white for the integer ones.
_INTEGER_WHITE = {torch.uint8: 255.0, torch.uint16: 65535.0}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_PIXELS = (np.uint8, np.uint16, np.float16, np.float32, np.float64)


def _pixel_type_error(dtype: Any) -> ValueError:
    return ValueError(f"pixels of type {dtype} are not supported; pass uint8 (0-255), uint16 (0-65535) or floats "
                      "in [0, 1] (float16, float32, float64; bfloat16 tensors)")


def restore(model: MoCEIR, image, device: str | torch.device | None = None, tile: int | None = None,
            overlap: int = 32, routing: str = "tile", context_pad: int = 16, max_memory: float | None = None):
    """Restore one image (or a batch of tensors) and return it in the kind, layout and dtype it came in.

    Accepted ``image`` kinds:
      - numpy array [H, W, 3] or [H, W] of uint8, uint16 (scaled by their range) or float16/32/64 in [0, 1];
      - torch tensor [3, H, W], [B, 3, H, W] or [H, W, 3]: the same types, and bfloat16 (a [3, H, 3] tensor is
        read as [3, H, W]);
      - PIL image: RGB, RGBA, L, LA, P, PA, 1 (returned as L), CMYK, YCbCr, ... (returned as RGB); an alpha
        channel is passed through; 16-bit gray (I;16) stays 16-bit and F (float gray, in [0, 1]) float. Mode I
        (32-bit integers) has no fixed white level and is refused: convert it to L or I;16 first. Its pixels are
        taken as stored: EXIF orientation is not applied (``PIL.ImageOps.exif_transpose`` does; files read by
        :func:`moceir.io.load_image` have it applied). The result's ``info`` keeps the input's ``icc_profile``
        (not a CMYK one), ``dpi``, ``exif`` and ``xmp``, for ``result.save(path, **result.info)``-style use.
    A gray image (any kind) comes back as the mean of the three channels that the network restores.
    NaN or infinite pixels, floats outside [0, 1], other pixel types and other shapes raise ValueError; other
    kinds TypeError.

    device: where to run ("auto", "cpu", "cuda[:N]"; default: the model's device). tile / overlap / routing: see
    :func:`restore_tensor`; with ``tile=None`` an image whose estimated peak memory exceeds ``max_memory`` bytes
    (default :func:`memory_budget`) is tiled automatically. context_pad: reflected context in pixels (0: none).
    The model must be on ``device``; a half or bfloat16 model is fed inputs of its type. Options that cannot work
    raise ValueError. Each module's training/eval flag is left as it was (the model is switched to eval meanwhile:
    two threads restoring with one model in training mode race on it). Returns the restored image, values clamped
    to range.
    """
    from PIL import Image

    from .runtime import resolve_device

    check_restore_options(tile, overlap, routing, context_pad, max_memory)
    if not callable(getattr(model, "parameters", None)):  # MoCEIR, or a wrapper: torch.compile's, GraphedNetwork
        raise TypeError(f"restore takes the network first (from moceir.load_model or create_model), not "
                        f"{type(model).__name__}")
    weight = next(model.parameters())
    device = resolve_device(device) if device is not None else weight.device
    if device.type != weight.device.type or (device.type == "cuda" and device.index not in (None, weight.device.index)):
        raise ValueError(f"the model is on {weight.device}, not {device}: move it first (model.to({str(device)!r})) "
                         "or leave device out")
    # each module's own flag, so that frozen parts stay frozen (a GraphedNetwork is no Module: its own flag)
    modes = {m: m.training for m in (model.modules() if isinstance(model, torch.nn.Module) else [model])}
    model.eval()
    try:
        if isinstance(image, Image.Image):
            return _restore_pil(model, image, device, tile, overlap, routing, context_pad, max_memory)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return _restore_array(model, image, device, tile, overlap, routing, context_pad, max_memory)
        raise TypeError(f"restore takes a numpy array, PIL image or torch tensor, not {type(image).__name__}")
    finally:
        for m, training in modes.items():
            if isinstance(m, torch.nn.Module):
                m.training = training
            else:
                m.train(training)


def _restore_pil(model, image, device, tile, overlap, routing, context_pad, max_memory):
    """A PIL image -> the restored PIL image, in the input's mode where that mode is gray or RGB(A) (see restore)."""
    from PIL import Image

    def run(arr: np.ndarray) -> np.ndarray:
        return _restore_array(model, arr, device, tile, overlap, routing, context_pad, max_memory)

    if image.mode == "I":  # convert("RGB") clips to 0..255; 8-bit data (L.convert("I")) and 16-bit look alike
        raise ValueError("a PIL image of mode I (32-bit integers) has no fixed white level; convert it first: "
                         "image.convert('L') for 8-bit data, or np.asarray(image).astype(np.uint16) for 16-bit")
    if image.mode.startswith(("I;16", "F")):  # 16-bit or float gray: convert("RGB") would clip to 0..255
        arr = np.asarray(image)
        out = run(arr) if image.mode == "F" else run(arr.astype(np.uint16)).astype(arr.dtype)
        return _with_info(Image.fromarray(out), image)  # uint16 -> I;16 (>u2 -> I;16B), float32 -> F
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these to their plain form only
        image = image.convert(image.mode.upper())
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    alpha = image.convert("RGBA").getchannel("A") if has_alpha else None
    gray = image.mode in ("L", "LA", "1")  # restored as [H, W]: gray is the mean of the channels, as for arrays
    out = Image.fromarray(run(np.asarray(image.convert("L" if gray else "RGB"))))
    if alpha is not None:
        out.putalpha(alpha)
    return _with_info(out, image)


def _with_info(out: PILImage, image: PILImage) -> PILImage:
    """``out`` with what ``image.info`` says of the picture rather than of its encoding: its colour profile,
    resolution, EXIF and XMP (the pixels are restored as stored, so the EXIF orientation still holds)."""
    keep = ("icc_profile", "dpi", "exif", "xmp") if image.mode != "CMYK" else ("dpi", "exif", "xmp")
    out.info.update({k: image.info[k] for k in keep if k in image.info})
    return out


def _restore_array(model, image, device, tile, overlap, routing, context_pad, max_memory):
    """numpy or torch, [H, W], [H, W, 3], [3, H, W] or [B, 3, H, W] -> the same kind, layout and dtype."""
    is_torch = isinstance(image, torch.Tensor)
    if is_torch:
        if image.is_nested or image.layout != torch.strided or image.device.type == "meta":
            raise ValueError(f"restore takes a dense tensor with data, not a {image.layout} / nested / meta one; "
                             "convert it first (to_dense(), or a list of images)")
        if image.dtype not in _INTEGER_WHITE and image.dtype not in _FLOATS:
            raise _pixel_type_error(image.dtype)
        t = image.detach()
    else:
        if isinstance(image, np.ma.MaskedArray):  # the mask cannot be honoured, and would be dropped
            raise ValueError("restore cannot honour a masked array's mask; pass image.filled(...) or image.data")
        native = image.dtype.newbyteorder("=")  # torch reads only this machine's byte order
        if native.type not in _NUMPY_PIXELS:
            raise _pixel_type_error(image.dtype)
        t = torch.from_numpy(np.array(image, dtype=native))  # a copy: inputs may be read-only
    shape = tuple(t.shape)
    if t.dim() == 2:
        layout, x = "HW", t[None, None].expand(1, 3, *shape)
    elif t.dim() == 3 and shape[-1] == 3 and (not is_torch or shape[0] != 3):
        layout, x = "HWC", t.permute(2, 0, 1)[None]
    elif is_torch and t.dim() == 3 and shape[0] == 3:
        layout, x = "CHW", t[None]
    elif is_torch and t.dim() == 4 and shape[1] == 3:
        layout, x = "BCHW", t
    else:
        accepted = "[3, H, W], [B, 3, H, W] or [H, W, 3]" if is_torch else "[H, W, 3] or [H, W]"
        raise ValueError(f"image of shape {list(shape)}: accepted layouts are {accepted}")
    if x.numel() == 0:
        raise ValueError(f"image of shape {list(shape)} holds no pixels")
    scale = _INTEGER_WHITE.get(t.dtype)
    if scale is not None:
        x = x.float() / scale
    else:
        _check_values(x, "image")
    x = x.to(device, torch.float32)  # restore_tensor feeds a half or bfloat16 model inputs of its own type
    chunk = x.shape[0]
    if tile is None:
        budget = max_memory if max_memory is not None else memory_budget(device)
        hp, wp = x.shape[-2] + 2 * context_pad, x.shape[-1] + 2 * context_pad
        tile = auto_tile(model, hp, wp, budget, batch=x.shape[0])
        if tile is None:  # each image fits whole: as many together as fit
            chunk = batch_that_fits(model, hp, wp, budget, x.shape[0])
    y = torch.cat([restore_tensor(model, c, tile, overlap, routing, context_pad=context_pad)
                   for c in x.split(chunk)])
    if not bool(torch.isfinite(y).all()):
        low = y.dtype in (torch.float16, torch.bfloat16)  # the model's type
        raise ValueError("the network returned NaN or infinite pixels" + (
            f"; this {y.dtype} model overflows: restore with it in float32 (model.float())" if low
            else "; its weights or the input are broken"))
    y = y.clamp_(0, 1)
    if layout == "HW":
        y = y[0].mean(0)
    elif layout == "HWC":
        y = y[0].permute(1, 2, 0)
    elif layout == "CHW":
        y = y[0]
    if scale is not None:
        y = torch.round(y * scale)
    y = y.to(t.dtype).cpu()
    if is_torch:
        return y.to(image.device)
    return y.numpy().astype(image.dtype, copy=False)

"""Inference at any size: padding to the network's multiple, overlapping tiles with seamless blending,
batching, and ``restore`` for numpy arrays, PIL images and tensors."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .models import MoCEIR

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
    small = F.interpolate(x, scale_factor=scale, mode="area") if scale < 1 else x
    small, _ = pad_to_multiple(small, model.config.size_multiple)
    return model(small, return_aux=True).expert_indices


@torch.no_grad()
def restore_tensor(model: MoCEIR, x: torch.Tensor, tile: int | None = None, overlap: int = 32,
                   routing: str = "tile", return_experts: bool = False):
    """Restore [B, 3, H, W] in [0, 1] of any size -> [B, 3, H, W] (same size; not clamped).

    With ``tile``, the image is processed in overlapping tile x tile windows blended with linear ramps, so
    memory is bounded by the tile size. ``routing="tile"`` lets each tile pick its experts;
    ``routing="global"`` routes every tile by one decision from a downscaled pass of the whole image.
    With ``return_experts`` also returns the experts ([layers, B, k]; for tiles, of the global pass or the
    first tile).
    """
    if routing not in ROUTING_MODES:
        raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
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
    for top in _tile_starts(hp, tile, stride):
        for left in _tile_starts(wp, tile, stride):
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
    y = (out / weight)[..., :h, :w]
    return (y, forced if forced is not None else first) if return_experts else y


def bytes_per_pixel(model: MoCEIR) -> float:
    """fp32 inference peak memory per input pixel, with a margin: `python benchmarks/memory.py --size 1024`
    measured 2.3 kB/pixel for MoCE-IR-S (dim 32) on CPU, and tiles add allocator fragmentation on top;
    this returns 3.2 kB at dim 32."""
    return 100.0 * model.config.dim


def auto_tile(model: MoCEIR, h: int, w: int, budget_bytes: float) -> int | None:
    """A tile size that keeps the estimated peak under ``budget_bytes``, or None if the whole image fits."""
    if h * w * bytes_per_pixel(model) <= budget_bytes:
        return None
    side = int(math.sqrt(budget_bytes / bytes_per_pixel(model)))
    return max(64, side - side % model.config.size_multiple)


def restore(model: MoCEIR, image, device: str | torch.device | None = None, tile: int | None = None,
            overlap: int = 32, routing: str = "tile"):
    """Restore one image and return the same kind:

    - numpy [H, W, 3] (uint8 -> uint8, float in [0, 1] -> float32), or [H, W] grayscale;
    - PIL image (mode kept; alpha passed through);
    - tensor [3, H, W] or [B, 3, H, W] in [0, 1].
    """
    from PIL import Image

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        y = restore_tensor(model, x.to(device, torch.float32), tile, overlap, routing).clamp(0, 1)
        return (y[0] if image.dim() == 3 else y).to(image.device, image.dtype)
    if isinstance(image, Image.Image):
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        arr = np.asarray(image.convert("RGB"))
        out = Image.fromarray(restore(model, arr, device, tile, overlap, routing))
        if image.mode in ("L", "LA"):
            out = out.convert("L")
        if alpha is not None:
            out.putalpha(alpha)
        return out
    if isinstance(image, np.ndarray):
        arr = image
        gray = arr.ndim == 2
        if gray:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] or [H, W] array, got shape {image.shape}")
        is_int = np.issubdtype(arr.dtype, np.integer)
        scale = float(np.iinfo(arr.dtype).max) if is_int else 1.0
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div(scale)[None]
        y = restore_tensor(model, x.to(device), tile, overlap, routing).clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0)
        if gray:
            y = y.mean(axis=2)
        return np.round(y * scale).astype(image.dtype) if is_int else y.astype(np.float32)
    raise TypeError(f"restore takes a numpy array, PIL image or tensor, not {type(image).__name__}")

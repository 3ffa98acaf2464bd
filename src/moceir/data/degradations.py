"""Degradations as pure functions of arrays. Images are HxWx3; uint8 in [0, 255] or float in [0, 1] as stated."""

from __future__ import annotations

import zlib

import numpy as np

from ..checks import is_real, is_whole

DENOISE_SIGMAS = {"denoise_15": 15, "denoise_25": 25, "denoise_50": 50}


def _check_image(img: np.ndarray, kind: str, name: str = "clean", any_channels: bool = False) -> None:
    """Refuse what a degradation would silently turn into garbage: another dtype than it is written for
    (``kind`` "uint8" or "float"), not [H, W, 3] ([H, W] or [H, W, C] with ``any_channels``). (An image cropped
    to nothing passes: callers check sizes.)"""
    ok_type = isinstance(img, np.ndarray) and (img.dtype == np.uint8 if kind == "uint8" else img.dtype.kind == "f")
    if not ok_type:
        what = img.dtype if isinstance(img, np.ndarray) else type(img).__name__
        scale = "0..255" if kind == "uint8" else "[0, 1]"
        raise ValueError(f"{name} must be a {kind} array [H, W, 3] in {scale}, not {what}")
    if not (img.ndim in (2, 3) if any_channels else img.ndim == 3 and img.shape[2] == 3):
        raise ValueError(f"{name} must be {'[H, W] or [H, W, C]' if any_channels else '[H, W, 3]'}, got {img.shape}")


def _check_number(name: str, value: float, low: float, high: float = float("inf")) -> None:
    if not is_real(value) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def sigma_for_task(task: str) -> int:
    """Noise level named by the task: "denoise_25" -> 25. (Upstream took it from the task's list position.)"""
    if not isinstance(task, str) or task not in DENOISE_SIGMAS:
        raise ValueError(f"{task!r} is not a denoising task; valid: {', '.join(DENOISE_SIGMAS)}")
    return DENOISE_SIGMAS[task]


def add_gaussian_noise(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, C] -> uint8: ``clip(clean + sigma * N(0, 1), 0, 255)`` truncated to uint8, as upstream."""
    _check_image(clean, "uint8", any_channels=True)
    _check_number("sigma", sigma, 0)
    noisy = clean.astype(np.float64) + rng.standard_normal(clean.shape) * sigma
    return np.clip(noisy, 0, 255).astype(np.uint8)


def seeded_rng(name: str, sigma: float) -> np.random.Generator:
    """Noise generator for evaluation, fixed by the image's name and sigma (independent of run order)."""
    # surrogateescape: a file name that is not UTF-8 keeps its own bytes (the same seed as before for UTF-8 ones)
    return np.random.default_rng(zlib.crc32(f"{name}:{sigma}".encode("utf-8", "surrogateescape")))


def pseudo_depth(h: int, w: int, rng: np.random.Generator, grid: int = 4) -> np.ndarray:
    """Smooth pseudo-depth in [0, 1], [H, W] float32: a top-far vertical ramp plus bilinear low-frequency noise."""
    if min(h, w) < 1 or not is_whole(grid) or grid < 1:
        raise ValueError(f"pseudo_depth needs h, w >= 1 and a grid >= 1, got {h}, {w}, {grid!r}")
    coarse = rng.random((grid + 1, grid + 1))
    ys, xs = np.linspace(0, grid, h), np.linspace(0, grid, w)
    y0, x0 = np.minimum(ys.astype(int), grid - 1), np.minimum(xs.astype(int), grid - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c = coarse
    field = (c[y0][:, x0] * (1 - fy) * (1 - fx) + c[y0 + 1][:, x0] * fy * (1 - fx)
             + c[y0][:, x0 + 1] * (1 - fy) * fx + c[y0 + 1][:, x0 + 1] * fy * fx)
    ramp = np.linspace(1.0, 0.0, h)[:, None] * np.ones((1, w))
    depth = 0.6 * ramp + 0.4 * field
    depth = (depth - depth.min()) / max(depth.max() - depth.min(), 1e-6)
    return depth.astype(np.float32)


def add_haze(clean: np.ndarray, depth: np.ndarray, beta: float, airlight: np.ndarray | float) -> np.ndarray:
    """Atmospheric scattering model: ``I = J t + A (1 - t)``, ``t = exp(-beta d)``.

    clean: float [H, W, 3] in [0, 1]; depth: [H, W]; airlight: scalar or [3] -> float [H, W, 3] in [0, 1].
    """
    _check_image(clean, "float")
    if not isinstance(depth, np.ndarray) or depth.shape != clean.shape[:2]:
        what = depth.shape if isinstance(depth, np.ndarray) else type(depth).__name__
        raise ValueError(f"depth must be a numpy array [H, W] {clean.shape[:2]}, got {what}")
    for name, array in (("clean", clean), ("depth", depth)):
        if not np.isfinite(array).all():  # np.clip keeps NaN: the hazy image would carry it on
            raise ValueError(f"{name} holds NaN or infinite values")
    _check_number("beta", beta, 0)
    air = np.asarray(airlight, dtype=np.float64)
    if not ((air >= 0) & (air <= 1)).all():  # NaN fails too
        raise ValueError(f"airlight must lie in [0, 1] (a number, 3 numbers, or an array that broadcasts), got "
                         f"{airlight!r}")
    t = np.exp(-beta * depth)[..., None]
    return np.clip(clean * t + np.asarray(airlight, dtype=np.float32) * (1.0 - t), 0.0, 1.0).astype(np.float32)


def random_haze(clean_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 clean -> uint8 hazy with random beta in [0.6, 2.0] and a slightly tinted airlight in [0.7, 1.0]."""
    _check_image(clean_u8, "uint8", "clean_u8")
    h, w = clean_u8.shape[:2]
    beta = rng.uniform(0.6, 2.0)
    airlight = np.clip(rng.uniform(0.7, 1.0) + rng.uniform(-0.03, 0.03, size=3), 0, 1)
    hazy = add_haze(clean_u8.astype(np.float32) / 255.0, pseudo_depth(h, w, rng), beta, airlight)
    return np.round(hazy * 255.0).astype(np.uint8)


def augment(img: np.ndarray, mode: int) -> np.ndarray:
    """One of the 8 flips/rotations (upstream's modes 0..7) of an [H, W, C] array."""
    if not is_whole(mode) or not 0 <= mode < 8:
        raise ValueError(f"augmentation mode must be an int in 0..7, got {mode!r} ({type(mode).__name__})")
    out = np.rot90(img, k=mode // 2) if mode >= 2 else img
    if mode == 1 or (mode >= 2 and mode % 2 == 1):
        out = np.flipud(out)
    return np.ascontiguousarray(out)


def crop_to_multiple(img: np.ndarray, base: int = 16) -> np.ndarray:
    """Centre-crop [H, W, ...] to multiples of ``base`` (upstream's ``crop_img``); a side shorter than ``base``
    crops to nothing, which callers check."""
    if not is_whole(base) or base < 1:
        raise ValueError(f"base must be a whole number >= 1, got {base!r}")
    h, w = img.shape[:2]
    ch, cw = h % base, w % base
    return img[ch // 2:h - ch + ch // 2, cw // 2:w - cw + cw // 2]

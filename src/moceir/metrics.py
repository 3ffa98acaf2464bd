"""PSNR and SSIM as the all-in-one restoration papers compute them (upstream's scikit-image protocol).

Inputs are float arrays [H, W, 3] in [0, 1]. ``test_y_channel`` evaluates the BT.601 luma (BasicSR's
convention) and ``crop_border`` drops a border, for comparison with papers that report those.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .checks import is_whole


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] RGB in [0, 1] -> [H, W, 1] Y of YCbCr (ITU-R BT.601, range 16..235) in [0, 1]."""
    y = 16.0 + img.astype(np.float64) @ np.array([65.481, 128.553, 24.966])
    return (y / 255.0)[..., None]


SSIM_WINDOW = 2 * int(3.5 * 1.5 + 0.5) + 1  # 11: the Gaussian window's side (sigma 1.5, truncate 3.5)


def _check_pair(clean: np.ndarray, restored: np.ndarray, data_range: float, crop_border: int,
                test_y_channel: bool, image_layout: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Refuse, in one line, inputs whose score would be a plausible-looking wrong number; returns the pair
    ([H, W] made [H, W, 1] where ``image_layout`` is needed, as SSIM's window is) and ``data_range`` as a float.

    NaN pixels are not refused: they give a NaN score, as in numpy and scikit-image."""
    for name, x in (("clean", clean), ("restored", restored)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a numpy array [H, W, C], not {type(x).__name__}")
    if clean.shape != restored.shape:  # psnr broadcast [H, W, 3] against [H, W, 1] to a number before
        raise ValueError(f"image shapes differ: {clean.shape} vs {restored.shape}")
    if clean.ndim == 2 and (image_layout or test_y_channel or crop_border):
        clean, restored = clean[..., None], restored[..., None]
    if clean.size == 0 or ((image_layout or crop_border) and (clean.ndim != 3 or clean.shape[2] > 4)):
        raise ValueError(f"images must be [H, W] or [H, W, C] with C <= 4, got {clean.shape}")  # [3, H, W] too
    if test_y_channel and (clean.ndim != 3 or clean.shape[2] != 3):
        raise ValueError(f"test_y_channel needs RGB images [H, W, 3], got {clean.shape}")
    kinds = {clean.dtype.kind, restored.dtype.kind}
    if not kinds <= {"f", "u", "i"}:
        raise ValueError(f"images must be float or integer arrays, got {clean.dtype} and {restored.dtype}")
    try:
        value = float(data_range)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(data_range, bool) or not (value > 0 and np.isfinite(value)):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    if kinds != {"f"} and (clean.dtype != restored.dtype or value == 1.0):
        raise ValueError(f"integer images ({clean.dtype}, {restored.dtype}) need one type and their data_range "
                         "(255 for uint8); or convert both to floats in [0, 1]")
    if not is_whole(crop_border) or crop_border < 0:
        raise ValueError(f"crop_border must be a whole number of pixels >= 0, got {crop_border!r}")
    need = SSIM_WINDOW if image_layout else 1
    h, w = clean.shape[0] - 2 * crop_border, clean.shape[1] - 2 * crop_border
    if min(h, w) < need:
        raise ValueError(f"{clean.shape[1]}x{clean.shape[0]} images leave {max(w, 0)}x{max(h, 0)} pixels after "
                         f"crop_border={crop_border}; this score needs at least {need}x{need}")
    return clean, restored, value


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, test_y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def psnr(clean: np.ndarray, restored: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
         test_y_channel: bool = False) -> float:
    """``10 log10(range^2 / MSE)`` over all pixels and channels (scikit-image's peak_signal_noise_ratio).

    clean, restored: [H, W, C] or [H, W] arrays of one shape, floats in [0, 1] (integers with their
    ``data_range``). Inputs that cannot give a true score raise ValueError; NaN pixels give NaN."""
    clean, restored, data_range = _check_pair(clean, restored, data_range, crop_border, test_y_channel)
    if not test_y_channel:  # as scikit-image: the difference in the inputs' float type, the mean in float64
        dtype = np.result_type(clean.dtype, restored.dtype, np.float32)
        clean, restored = clean.astype(dtype), restored.astype(dtype)
        if crop_border:
            clean = clean[crop_border:-crop_border, crop_border:-crop_border]
            restored = restored[crop_border:-crop_border, crop_border:-crop_border]
        mse = np.mean((clean - restored) ** 2, dtype=np.float64)
    else:
        a, b = _prepare(clean, restored, crop_border, test_y_channel)
        mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(data_range**2 / mse))


def ssim(clean: np.ndarray, restored: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
         test_y_channel: bool = False) -> float:
    """Gaussian-weighted SSIM (sigma 1.5, truncate 3.5), averaged over channels.

    Equals scikit-image's ``structural_similarity(..., channel_axis=2, gaussian_weights=True, data_range=1)``.
    Inputs as :func:`psnr`; images need at least 11x11 pixels after ``crop_border`` (smaller ones gave NaN).
    """
    clean, restored, data_range = _check_pair(clean, restored, data_range, crop_border, test_y_channel, True)
    a, b = _prepare(clean, restored, crop_border, test_y_channel)
    if not test_y_channel:  # compute in the inputs' float type, as scikit-image does
        dtype = np.result_type(clean.dtype, restored.dtype, np.float32)
        a, b = a.astype(dtype), b.astype(dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    win = SSIM_WINDOW
    pad = (win - 1) // 2
    cov_norm = win**2 / (win**2 - 1)  # scikit-image's default use_sample_covariance=True

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma=1.5, truncate=3.5, mode="reflect", output=x.dtype)

    scores = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        ux, uy = blur(x), blur(y)
        vx = cov_norm * (blur(x * x) - ux * ux)
        vy = cov_norm * (blur(y * y) - uy * uy)
        vxy = cov_norm * (blur(x * y) - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        scores.append(s[pad:-pad, pad:-pad].mean(dtype=np.float64))
    return float(np.mean(scores))

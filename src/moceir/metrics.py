"""PSNR and SSIM as the all-in-one restoration papers compute them (upstream's scikit-image protocol).

Inputs are float arrays [H, W, 3] in [0, 1]. ``test_y_channel`` evaluates the BT.601 luma (BasicSR's
convention) and ``crop_border`` drops a border, for comparison with papers that report those.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] RGB in [0, 1] -> [H, W, 1] Y of YCbCr (ITU-R BT.601, range 16..235) in [0, 1]."""
    y = 16.0 + img.astype(np.float64) @ np.array([65.481, 128.553, 24.966])
    return (y / 255.0)[..., None]


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, test_y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    if crop_border:
        a, b = a[crop_border:-crop_border, crop_border:-crop_border], b[crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def psnr(clean: np.ndarray, restored: np.ndarray, data_range: float = 1.0, crop_border: int = 0,
         test_y_channel: bool = False) -> float:
    """``10 log10(range^2 / MSE)`` over all pixels and channels (scikit-image's peak_signal_noise_ratio)."""
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
    """
    a, b = _prepare(clean, restored, crop_border, test_y_channel)
    if not test_y_channel:  # compute in the inputs' float type, as scikit-image does
        dtype = np.result_type(clean.dtype, restored.dtype, np.float32)
        a, b = a.astype(dtype), b.astype(dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    win = 2 * int(3.5 * 1.5 + 0.5) + 1
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

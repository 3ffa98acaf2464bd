"""Metrics against scikit-image, and the losses."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from moceir.losses import fft_loss, restoration_loss
from moceir.metrics import psnr, rgb_to_y, ssim


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    clean = rng.random((37, 52, 3)).astype(np.float32)
    return clean, np.clip(clean + rng.normal(0, 0.08, clean.shape), 0, 1).astype(np.float32)


def test_psnr_and_ssim_equal_scikit_image(pair):
    clean, noisy = pair
    assert psnr(clean, noisy) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=1), abs=1e-10)
    ref = structural_similarity(clean, noisy, channel_axis=2, gaussian_weights=True, data_range=1.0)
    assert ssim(clean, noisy) == pytest.approx(ref, abs=1e-10)


def test_metrics_on_real_images(datasets_dir):
    from moceir.io import read_rgb

    clean = read_rgb(datasets_dir / "llie/LOLv1/Test/target/1.png")[:96, :128].astype(np.float32) / 255
    low = read_rgb(datasets_dir / "llie/LOLv1/Test/input/1.png")[:96, :128].astype(np.float32) / 255
    assert psnr(clean, low) == pytest.approx(peak_signal_noise_ratio(clean, low, data_range=1), abs=1e-10)
    ref = structural_similarity(clean, low, channel_axis=2, gaussian_weights=True, data_range=1.0)
    assert ssim(clean, low) == pytest.approx(ref, abs=1e-10)


def test_y_channel_and_crop_border(pair):
    clean, noisy = pair
    y = rgb_to_y(np.ones((1, 1, 3)))
    assert y.item() == pytest.approx(235 / 255)
    yc, yn = rgb_to_y(clean)[2:-2, 2:-2], rgb_to_y(noisy)[2:-2, 2:-2]
    assert psnr(clean, noisy, crop_border=2, test_y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(yc, yn, data_range=1))
    assert psnr(clean, clean) == float("inf")
    with pytest.raises(ValueError):
        psnr(clean, noisy[:-1])


def test_fft_loss_is_l1_of_spectra():
    a, b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    b[0, 0, 0, 0] = 1.0  # spectrum of a delta: all ones (real), 4x3 bins
    assert fft_loss(a, b).item() == pytest.approx(12 / 24)


@pytest.mark.parametrize("loss_type", ["L1", "l1", "FFT", "fft"])
def test_loss_type_is_case_insensitive_and_fft_runs(loss_type):
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    # weights other than the defaults (0.1, 0.01): with those, a loss that ignored its arguments passed
    parts = restoration_loss(pred, target, torch.tensor(0.5), loss_type, fft_weight=0.3, balance_weight=0.07)
    expected = parts["l1"] + 0.07 * 0.5 + (0.3 * parts["fft"] if loss_type.lower() == "fft" else 0)
    assert ("fft" in parts) == (loss_type.lower() == "fft")
    assert parts["loss"].item() == pytest.approx(expected.item())


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="l1"):
        restoration_loss(torch.zeros(1), torch.zeros(1), torch.tensor(0.0), "ssim")


def test_y_weights_and_the_border_crop_of_every_metric(pair):
    """Mutation audit: Y weights in BGR order, and SSIM or RGB PSNR ignoring crop_border, passed (the Y reference
    was our own rgb_to_y, and the crop was tested only with the Y channel)."""
    np.testing.assert_allclose(rgb_to_y(np.eye(3, dtype=np.float32)[None]).ravel(),
                               (16 + np.array([65.481, 128.553, 24.966])) / 255, rtol=1e-6)
    clean, noisy = pair
    inner = clean[3:-3, 3:-3], noisy[3:-3, 3:-3]
    noisy = noisy.copy()
    noisy[:3] = 1 - clean[:3]  # a ruined border that the crop must drop
    assert psnr(clean, noisy, crop_border=3) == pytest.approx(psnr(*inner))
    assert ssim(clean, noisy, crop_border=3) == pytest.approx(ssim(*inner))
    assert psnr(clean, noisy) < psnr(*inner) - 1

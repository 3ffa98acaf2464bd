"""The bundled default model: it loads with no flags and measurably restores real benchmark images."""

from pathlib import Path

import numpy as np

import moceir
from moceir.cli import main
from moceir.data.datasets import benchmark_pairs
from moceir.data.degradations import add_gaussian_noise, seeded_rng
from moceir.io import read_rgb
from moceir.metrics import psnr


def test_default_model_loads_with_its_config():
    model = moceir.load_model("default")
    assert model.config == moceir.get_config("MoCE_IR_S") and not model.training


def test_default_model_denoises_cbsd68(datasets_dir):
    """Three CBSD68 crops at sigma 25 gain well over 5 dB (the model card measures +8.1 dB on all 68 images)."""
    model = moceir.load_model("default")
    pairs = benchmark_pairs(datasets_dir, "denoise_25")[:3]
    gains = []
    for pair in pairs:
        clean = read_rgb(pair.clean)[:128, :128]
        noisy = add_gaussian_noise(clean, 25, seeded_rng(pair.clean.name, 25))
        restored = moceir.restore(model, noisy)
        gains.append(psnr(clean, restored, data_range=255) - psnr(clean, noisy, data_range=255))
    assert min(gains) > 5.0, gains


def test_restore_command_uses_the_default_model_and_says_what_it_is(tmp_path, capsys):
    """`moceir restore` with no checkpoint flag: the bundled model, its note printed, a smoother image out."""
    src = Path(__file__).resolve().parents[1] / "examples" / "noisy_sigma25_cbsd68_0011.png"
    assert main(["restore", str(src), "-o", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "early, weak model" in out.out + out.err
    noisy, restored = read_rgb(src).astype(np.float32), read_rgb(tmp_path / src.name).astype(np.float32)
    assert restored.shape == noisy.shape

    def roughness(img: np.ndarray) -> float:  # mean absolute difference between horizontal neighbours
        return float(np.abs(np.diff(img, axis=1)).mean())

    assert roughness(restored) < 0.5 * roughness(noisy)

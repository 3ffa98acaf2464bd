import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden"
SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fill_deterministic(model: torch.nn.Module, std: float) -> None:
    """The goldens' weight rule: each parameter ~ N(0, std^2) from a generator seeded by crc32(name)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)


def save_damaged(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` as moceir's safetensors (config embedded) without save_model's checks: for tests of how
    commands treat a damaged model file (NaN weights), which save_model refuses to write."""
    import json

    from safetensors.torch import save_file

    from moceir.models.checkpoints import CONFIG_KEY

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={CONFIG_KEY: json.dumps(model.config.to_dict()), "format": "moceir"})
    return path


def require_datasets() -> Path:
    """The shared datasets folder, or a skip; under CI (CI=true) a missing folder fails instead."""
    if not SHARED_DATASETS.is_dir():
        message = f"needs ../shared/datasets (not found at {SHARED_DATASETS})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return SHARED_DATASETS


@pytest.fixture
def datasets_dir() -> Path:
    return require_datasets()


def make_tiny_layout(root: Path, n: int = 3, size: tuple[int, int] = (40, 48)) -> Path:
    """A few random images in upstream's layout: RainTrainL pairs, BSD400, cBSD68, SOTS and LOL test pairs."""
    rng = np.random.default_rng(0)

    def write(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for i in (1, 2, 10)[:n]:
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        worse = np.clip(img.astype(int) // 2 + 40, 0, 255).astype(np.uint8)
        write(root / "deraining/RainTrainL/gt" / f"norain-{i}.png", img)
        write(root / "deraining/RainTrainL/rainy" / f"rain-{i}.png", np.clip(img.astype(int) + 30, 0, 255).astype(np.uint8))
        write(root / "denoising/BSD400" / f"{i}.jpg", img)
        write(root / "denoising/cBSD68/original_png" / f"{i:04d}.png", img)
        write(root / "dehazing/SOTS/outdoor/gt" / f"{i:04d}.png", img)
        write(root / "dehazing/SOTS/outdoor/hazy" / f"{i:04d}_0.8_0.2.jpg", worse)
        write(root / "llie/LOLv1/Test/target" / f"{i}.png", img)
        write(root / "llie/LOLv1/Test/input" / f"{i}.png", worse // 4)
    return root


@pytest.fixture
def tiny_layout(tmp_path) -> Path:
    return make_tiny_layout(tmp_path / "data")


@pytest.fixture
def small_layout(tmp_path) -> Path:
    """Two 24x32 images per benchmark: the smallest layout that still scores."""
    return make_tiny_layout(tmp_path / "data", n=2, size=(24, 32))


@pytest.fixture
def tiny_ckpt(tmp_path) -> str:
    """The tiny preset with deterministic weights, saved as safetensors (some modules define their own)."""
    import moceir

    model = moceir.create_model("MoCE_IR_tiny")
    fill_deterministic(model, 0.05)
    return str(moceir.save_model(model, tmp_path / "tiny.safetensors"))


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny preset with deterministic weights, in eval mode; one per test module (tests may not mutate it)."""
    import moceir

    model = moceir.create_model("MoCE_IR_tiny").eval()
    fill_deterministic(model, 0.05)
    return model

import os
import zlib
from pathlib import Path

import pytest
import torch

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


def require_datasets() -> Path:
    """The shared datasets folder, or a skip (which .ci/run turns into a failure)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"needs ../shared/datasets (not found at {SHARED_DATASETS})")
    return SHARED_DATASETS


@pytest.fixture
def datasets_dir() -> Path:
    return require_datasets()

import importlib.util
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

# two threads, or one in each of two parallel workers (pytest -n 2: the README's test command)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if "PYTEST_XDIST_WORKER" not in os.environ else 1)


def fill_deterministic(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """The goldens' weight rule: each parameter ~ N(0, std^2) from a generator seeded by crc32(name)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return model


def let_experts_count(model: torch.nn.Module) -> torch.nn.Module:
    """Rescale a tiny model filled by ``fill_deterministic(model, 0.1)`` so that its experts change the image.

    With weights of 0.1 the experts' branches reach the restored image at ~1e-7, below every tolerance, so a
    dispatch that ran the wrong expert, or none, would pass a comparison of images. Experts x8, the decoder's
    cross-attention sharp (temperature 20) and its values, output projections and shared branch x3: bypassing
    the experts then moves the MoCE_IR_tiny image by ~0.05 (mean ~0.01). The routers are left as they are.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mixer.temperature"):
                p.fill_(20.0)
            elif p.dim() > 1 and any(f".{part}." in name for part in ("mixer.kv", "mixer.project_out", "shared")):
                p.mul_(3.0)
            elif p.dim() > 1 and ".experts." in name:
                p.mul_(8.0)
    return model


def counted_tiny() -> torch.nn.Module:
    """The tiny preset in eval mode, filled by ``fill_deterministic(model, 0.1)``, with experts that count
    (:func:`let_experts_count`)."""
    import moceir

    return let_experts_count(fill_deterministic(moceir.create_model("MoCE_IR_tiny").eval(), 0.1))


def routed_tiny(images: torch.Tensor) -> torch.nn.Module:
    """:func:`counted_tiny` whose routers send image b of ``images`` [B, 3, H, W] to expert (b + layer) % 4.

    Random weights route a batch of random images alike, so the routers are calibrated: the pooled-feature
    gate is zeroed and the frequency gate solved by least squares for one-hot target logits.
    """
    model = counted_tiny()
    captured = {}
    hook = model.freq_embed.register_forward_hook(lambda m, i, o: captured.setdefault("e", o))
    with torch.no_grad():
        model(images)
        hook.remove()
        e = captured["e"]  # [B, 8d]
        for layer, adapter in enumerate(model.adapters):
            target = 8.0 * torch.nn.functional.one_hot((torch.arange(len(e)) + layer) % 4, 4).float()
            adapter.routing.gate[2].weight.zero_()
            adapter.routing.freq_gate.weight.copy_(torch.linalg.lstsq(e, target).solution.T)
    return model


def moe_layer_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE layer's output [B, C, H, W] in one forward pass of ``model`` (without gradients)."""
    seen = []
    hooks = [a.register_forward_hook(lambda m, i, o: seen.append(o[0])) for a in model.adapters]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


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


# ONNX: one export of the tiny preset takes about a minute on CI's 2 cores, so the routed tiny model's file written
# by `moceir export` serves tests/test_onnx_cli.py and the conditional-dispatch case of tests/test_onnx.py alike.
ONNX_NOTE = "tiny test export"  # asserted as a literal by tests/test_onnx.py and tests/test_onnx_cli.py


def need_onnx() -> None:
    """Skip where the [onnx] extra is missing (CI installs it, and fails on any skip)."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (pip install 'moceir[onnx]')")


@pytest.fixture(scope="session")
def onnx_two_images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * torch.tensor([1.0, 0.3]).view(2, 1, 1, 1)


@pytest.fixture(scope="session")
def onnx_routed_tiny(onnx_two_images):
    """:func:`routed_tiny` for `onnx_two_images`. Shared by the session: tests may not mutate it."""
    return routed_tiny(onnx_two_images)


@pytest.fixture(scope="session")
def onnx_cli_export(onnx_routed_tiny, tmp_path_factory):
    """`onnx_routed_tiny` saved as safetensors and exported by ``moceir export`` with the default (conditional)
    dispatch, ``--note ONNX_NOTE`` and ``--no-optimize`` (which halves the export time): (folder, checkpoint, .onnx)."""
    need_onnx()
    import moceir
    from moceir.cli import main

    root = tmp_path_factory.mktemp("onnx")
    ckpt = moceir.save_model(onnx_routed_tiny, root / "tiny.safetensors")
    assert main(["export", str(ckpt), str(root / "tiny.onnx"), "--note", ONNX_NOTE, "--no-optimize"]) == 0
    return root, str(ckpt), str(root / "tiny.onnx")


# Parallel runs (`pytest -n 2 --dist loadfile`, pytest-xdist): each test file runs whole on one worker, so that a
# module-scoped fixture (the GPU window's dry run) is computed once, and the ONNX files share one worker and so the
# session's one export (onnx_cli_export). (xdist 3.8's --dist loadgroup groups nothing under pytest 9.2.)
_SAME_WORKER = {"tests/test_onnx_cli.py": "tests/test_onnx.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return _SAME_WORKER.get(scope, scope)

    return FileScheduling(config, log)

"""Fidelity to upstream MoCE-IR: the goldens computed by running upstream's code (see fixtures/golden/README.md)."""

import numpy as np
import pytest
import torch

import moceir
from moceir.models import fused
from moceir.models.router import importance_loss, load_loss

from conftest import GOLDEN, fill_deterministic

# Every golden that runs the experts' patch FFT product runs with each way of computing it.
FFT_IMPLS = pytest.mark.parametrize("fft_impl", ["fft", "matmul"])


def _golden(name: str) -> dict:
    path = GOLDEN / f"{name}.npz"
    if not path.exists():  # a missing golden is a failure, never a skip
        pytest.fail(f"golden fixture {path} is missing")
    return dict(np.load(path))


@FFT_IMPLS
@pytest.mark.parametrize("preset,name,cases", [
    ("MoCE_IR_S", "moce_ir_s_forward", ["square", "rect"]),
    ("MoCE_IR", "moce_ir_forward", ["square"]),
])
def test_network_forward_matches_upstream(preset, name, cases, fft_impl):
    g = _golden(name)
    model = moceir.create_model(preset, fft_impl=fft_impl).eval()
    fill_deterministic(model, float(g["fill_std"]))
    for case in cases:
        x = torch.from_numpy(g[f"{case}_input"])
        with torch.no_grad():
            out = model(x, return_aux=True)
        np.testing.assert_allclose(out.image.numpy(), g[f"{case}_output"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(out.experts.numpy(), g[f"{case}_experts"])


@pytest.mark.parametrize("tag", ["max_bias", "max_nobias", "min_bias", "min_nobias"])
def test_routing_losses_match_upstream(tag):
    g = _golden("routing_losses")
    logits = torch.from_numpy(g[f"{tag}_logits"])
    noisy = torch.from_numpy(g[f"{tag}_noisy_logits"])
    scale, bias = tag.split("_")
    raw = torch.from_numpy(g["raw_complexity"])
    buffer = raw / (raw.max() if scale == "max" else raw.min())
    np.testing.assert_allclose(buffer.numpy(), g[f"{tag}_complexity_buffer"], rtol=1e-6)
    imp = importance_loss(logits.softmax(-1), buffer if bias == "bias" else None)
    load = load_loss(logits, noisy, float(g[f"{tag}_noise_std"]), k=1)
    np.testing.assert_allclose(imp.item(), g[f"{tag}_importance_loss"], rtol=1e-5)
    np.testing.assert_allclose(load.item(), g[f"{tag}_load_loss"], rtol=1e-5)


def _rel(y: torch.Tensor, ref: np.ndarray) -> float:
    ref = torch.from_numpy(ref)
    return ((y - ref).norm() / ref.norm()).item()


MODULE_BLOCKS = ["dec.0.2.layers.0", "dec.2.2.layers.1"]


@pytest.fixture(scope="module", params=["fft", "matmul"], ids=lambda impl: f"fft_impl={impl}")
def module_golden(request):
    g = _golden("moce_ir_s_modules")
    model = moceir.create_model("MoCE_IR_S", fft_impl=request.param).eval()
    fill_deterministic(model, float(g["fill_std"]))
    return model, {k: torch.from_numpy(v) if v.ndim else v for k, v in g.items()}


def test_modules_freq_embed(module_golden):
    model, g = module_golden
    with torch.no_grad():
        assert _rel(model.freq_embed(g["freq_embed__in"]), g["freq_embed__out"].numpy()) <= 1e-5


@pytest.mark.parametrize("path", MODULE_BLOCKS)
def test_modules_decoder_block_and_parts(module_golden, path):
    model, g = module_golden
    block = model.get_submodule(path)
    checks = {
        path: lambda: block(g[f"{path}__in"], g[f"{path}__freq"], add_noise=False)[0],
        f"{path}.shared": lambda: block.shared(g[f"{path}.shared__in"]),
        f"{path}.mixer": lambda: block.mixer(g[f"{path}.mixer__x"], g[f"{path}.mixer__y"]),
        f"{path}.ffn": lambda: block.ffn(g[f"{path}.ffn__in"]),
        f"{path}.norms.0": lambda: block.norms[0](g[f"{path}.norms.0__in"]),
    }
    with torch.no_grad():
        for name, run in checks.items():
            assert _rel(run(), g[f"{name}__out"].numpy()) <= 1e-5, name


@pytest.mark.parametrize("path", MODULE_BLOCKS)
def test_modules_router_experts_adapter(module_golden, path):
    model, g = module_golden
    adapter = model.get_submodule(f"{path}.adapter")
    x, freq, shared = g[f"{path}.adapter__x"], g[f"{path}.adapter__freq"], g[f"{path}.adapter__shared"]
    with torch.no_grad():
        logits = adapter.routing(x, freq, add_noise=False).logits
        assert _rel(logits, g[f"{path}.adapter.routing__logits"].numpy()) <= 1e-5
        for i in range(4):
            expert = model.get_submodule(f"{path}.adapter.experts.{i}.0")
            assert _rel(expert(x, shared), g[f"{path}.adapter.experts.{i}.0__out"].numpy()) <= 1e-5, i
            body_in = g[f"{path}.adapter.experts.{i}.0.body__in"]
            assert _rel(expert.body(body_in), g[f"{path}.adapter.experts.{i}.0.body__out"].numpy()) <= 1e-5, i
        for mode in ("dense", "sparse"):
            adapter.dispatch = mode
            out, _ = adapter(x[:1], freq[:1], shared[:1], add_noise=False)
            assert _rel(out, g[f"{path}.adapter__out_image0"].numpy()) <= 1e-5, mode
        adapter.dispatch = "auto"


@FFT_IMPLS
def test_upstream_lightning_checkpoint_loads_and_reproduces(fft_impl):
    g = _golden("upstream_tiny_forward")
    model = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt", fft_impl=fft_impl)
    assert model.config.dim == 8 and model.config.heads == (1, 1, 2, 2)
    x = torch.from_numpy(g["input"])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), g["output"], atol=1e-4, rtol=0)
    noisy = moceir.load_model(GOLDEN / "upstream_tiny_last.ckpt", eval_router_noise=True, fft_impl=fft_impl)
    outs = []
    for i in range(len(x)):  # upstream's golden: manual_seed(0) before each image's forward
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(noisy(x[i:i + 1]))
    got = torch.cat(outs).numpy()
    np.testing.assert_allclose(got, g["output_router_noise_seed0"], atol=1e-6, rtol=0)
    # The noise is real: the noisy golden differs from the clean one by more than our error.
    assert np.abs(got - g["output_router_noise_seed0"]).max() < np.abs(g["output"] - g["output_router_noise_seed0"]).max() / 5


@FFT_IMPLS
@pytest.mark.parametrize("cpu_fusion", [True, False])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_channels_last_fast_path_matches_goldens(dispatch, cpu_fusion, fft_impl):
    """The channels-last attention and LayerNorm paths, both dispatch modes, with and without the oneDNN
    fused CPU path, reproduce upstream too."""
    fused.set_enabled(cpu_fusion)
    try:
        _check_channels_last_forward(dispatch, fft_impl)
    finally:
        fused.set_enabled(True)


def _check_channels_last_forward(dispatch: str, fft_impl: str) -> None:
    g = _golden("moce_ir_s_forward")
    model = moceir.create_model("MoCE_IR_S", fft_impl=fft_impl).eval().set_dispatch(dispatch)
    fill_deterministic(model, float(g["fill_std"]))
    model = model.to(memory_format=torch.channels_last)
    for case in ("square", "rect"):
        x = torch.from_numpy(g[f"{case}_input"]).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = model(x, return_aux=True)
        np.testing.assert_allclose(out.image.numpy(), g[f"{case}_output"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(out.experts.numpy(), g[f"{case}_experts"])


@FFT_IMPLS
def test_channels_last_modules_match_goldens(fft_impl):
    g = _golden("moce_ir_s_modules")
    model = moceir.create_model("MoCE_IR_S", fft_impl=fft_impl).eval()
    fill_deterministic(model, float(g["fill_std"]))
    model = model.to(memory_format=torch.channels_last)
    cl = {k: torch.from_numpy(v).contiguous(memory_format=torch.channels_last) if v.ndim == 4 else torch.from_numpy(v)
          for k, v in g.items() if v.ndim}
    for path in MODULE_BLOCKS:
        block = model.get_submodule(path)
        with torch.no_grad():
            assert _rel(block(cl[f"{path}__in"], cl[f"{path}__freq"], add_noise=False)[0], g[f"{path}__out"]) <= 1e-5
            assert _rel(block.shared(cl[f"{path}.shared__in"]), g[f"{path}.shared__out"]) <= 1e-5
            assert _rel(block.mixer(cl[f"{path}.mixer__x"], cl[f"{path}.mixer__y"]), g[f"{path}.mixer__out"]) <= 1e-5
            assert _rel(block.norms[0](cl[f"{path}.norms.0__in"]), g[f"{path}.norms.0__out"]) <= 1e-5

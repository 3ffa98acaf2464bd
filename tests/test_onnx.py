"""The real-valued patch product (fft_impl="matmul") and the ONNX export that uses it, run in ONNX Runtime.

The ONNX tests skip only where onnxruntime / onnxscript are missing (CI installs them, and fails on skips).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moceir
from moceir.models import MoCEConfig
from moceir.models.attention import patch_fft_product
from moceir.models.checkpoints import CONFIG_KEY

from conftest import need_onnx


def test_fft_impl_is_validated_with_the_choices():
    with pytest.raises(ValueError, match=r"fft_impl must be one of \('fft', 'matmul'\), got 'dft'"):
        MoCEConfig(fft_impl="dft")


def test_configs_without_fft_impl_still_load(tmp_path):
    """Configs and checkpoints written before the field existed get the default, "fft"."""
    from safetensors.torch import save_file

    old = moceir.get_config("MoCE_IR_tiny").to_dict()
    del old["fft_impl"]
    assert MoCEConfig.from_dict(old).fft_impl == "fft"
    model = moceir.create_model("MoCE_IR_tiny")
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={CONFIG_KEY: json.dumps(old)})
    assert moceir.load_model(path).config.fft_impl == "fft"
    assert moceir.load_model(path, fft_impl="matmul").config.fft_impl == "matmul"


def test_dft_matrices_are_not_weights():
    fft = moceir.create_model("MoCE_IR_tiny")
    mm = moceir.create_model("MoCE_IR_tiny", fft_impl="matmul")
    assert fft.state_dict().keys() == mm.state_dict().keys()
    assert not any("dft" in k for k in mm.state_dict())
    mm.load_state_dict(fft.state_dict(), strict=True)
    assert {m.fft_impl for m in mm.modules() if hasattr(m, "fft_impl")} == {"matmul"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_product_stays_fp32_under_autocast(dtype):
    """Under autocast the transform still runs in fp32: equal to the fft path on the same (rounded) inputs."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 20, 36, generator=g).to(dtype) for _ in range(2))
    for p in (4, 8, 16, 32):
        ref = patch_fft_product(q, k, p, "fft")
        with torch.autocast("cpu", dtype=dtype):
            out = patch_fft_product(q, k, p, "matmul")
        assert out.dtype == torch.float32
        assert ((out - ref).norm() / ref.norm()).item() <= 1e-5, p


# --- ONNX export (needs onnx, onnxscript, onnxruntime) ---

@pytest.fixture(scope="module")
def two_images(onnx_two_images):
    return onnx_two_images


@pytest.fixture(scope="module")
def routed_tiny(onnx_routed_tiny):
    """Tiny model whose routers send image b of `two_images` to expert (b + layer) % 4 (as in test_model.py)."""
    return onnx_routed_tiny


@pytest.fixture(scope="module", params=["conditional", "dense"])
def exported(routed_tiny, tmp_path_factory, request):
    """The routed tiny model exported with each dispatch: experts behind an If each (the default), or all run.

    "conditional" is the file `moceir export` wrote (the CLI's default dispatch, conftest.onnx_cli_export); "dense"
    is exported here through the API (optimized, the default), over a stale file; both with the note "tiny test
    export"."""
    need_onnx()
    import onnx

    from moceir.onnx import export_onnx, load_onnx

    if request.param == "conditional":
        path = Path(request.getfixturevalue("onnx_cli_export")[2])
        before = path.read_bytes()
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export_onnx(routed_tiny, path)
        assert path.read_bytes() == before
    else:
        path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
        path.write_text("stale")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            export_onnx(routed_tiny, path)
        # optimized, as users export by default (about 10 s more here); the CLI's export in conftest.py is not
        assert export_onnx(routed_tiny, path, note="tiny test export", overwrite=True,
                           dispatch=request.param) == path
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ("If" in ops) == (request.param == "conditional")
    assert not path.with_name(path.name + ".tmp").exists()
    return load_onnx(path, threads=2)


def test_onnx_metadata(exported, routed_tiny):
    assert exported.config == routed_tiny.config.replace(fft_impl="matmul")
    assert exported.note == "tiny test export"
    assert exported.num_moe_layers == routed_tiny.num_moe_layers == 3


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 3, 24, 40), (3, 3, 16, 48)])
def test_onnx_matches_pytorch_at_dynamic_sizes(exported, routed_tiny, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    image, experts = exported(x)
    with torch.no_grad():
        ref = routed_tiny(x, return_aux=True)
    assert image.shape == ref.image.shape and experts.shape == (3, shape[0], 1)
    np.testing.assert_allclose(image.numpy(), ref.image.numpy(), atol=1e-4, rtol=0)
    assert torch.equal(experts, ref.expert_indices)


def test_onnx_routes_each_image_of_a_batch_to_its_own_experts(exported, routed_tiny, two_images):
    image, experts = exported(two_images)
    assert (experts[:, 0] != experts[:, 1]).all(), "the two images must take different experts in every layer"
    with torch.no_grad():  # the experts count (conftest.let_experts_count): swapped ones would fail the 1e-4 below
        swapped = routed_tiny(two_images, experts=experts[..., 0].flip(1))
    assert (swapped - image).abs().amax(dim=(1, 2, 3)).min() > 1e-2
    for i in range(2):
        with torch.no_grad():
            ref = routed_tiny(two_images[i:i + 1], return_aux=True)
        np.testing.assert_allclose(image[i:i + 1].numpy(), ref.image.numpy(), atol=1e-4, rtol=0)
        assert torch.equal(experts[:, i], ref.expert_indices[:, 0])


def test_onnx_rejects_sizes_off_the_multiple(exported):
    with pytest.raises(ValueError, match="multiples of 8"):
        exported(torch.rand(1, 3, 20, 16))


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    from moceir.onnx import load_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match=r"pip install 'moceir\[onnx\]'"):
        load_onnx(tmp_path / "x.onnx")


def test_onnx_model_counts_every_decoder_block_as_a_moe_layer():
    from moceir.onnx import OnnxModel

    config = moceir.get_config("MoCE_IR_tiny", num_dec_blocks=[2, 1, 3])
    from moceir.models import MoCEIR

    assert OnnxModel(None, config, None).num_moe_layers == MoCEIR(config).num_moe_layers == 6


@pytest.mark.parametrize("shape", [(1, 3, 16, 20), (1, 3, 20, 16)])
def test_onnx_model_refuses_a_height_or_width_off_the_multiple(shape):
    from moceir.onnx import OnnxModel

    model = OnnxModel(None, moceir.get_config("MoCE_IR_tiny"), None)  # the session is never reached
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(*shape))

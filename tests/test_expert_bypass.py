"""The expert-bypass ablation (--experts skip): every complexity expert becomes the identity."""

import copy
import json

import numpy as np
import torch

import moceir
from moceir.cli import main
from moceir.models.experts import MoCEAdapter, set_expert_bypass

from conftest import counted_tiny, moe_layer_outputs


def test_bypass_equals_experts_with_zero_branch():
    model = counted_tiny()
    zeroed = copy.deepcopy(model)
    for module in zeroed.modules():
        if isinstance(module, MoCEAdapter):
            for expert in module.experts:
                expert[0].proj[2].weight.data.zero_()
    x = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        skipped = set_expert_bypass(model)(x)
        torch.testing.assert_close(skipped, zeroed(x))
        assert (skipped - full).abs().max() > 1e-2
        assert torch.equal(set_expert_bypass(model, False)(x), full)
    # where the experts act (the image sees the MoE layers through normalised queries, blind to a gate's scale)
    full, ref = moe_layer_outputs(model, x), moe_layer_outputs(zeroed, x)
    skipped = moe_layer_outputs(set_expert_bypass(model), x)
    assert max((a - b).abs().max() for a, b in zip(full, skipped)) > 0.05
    for a, b in zip(skipped, ref):
        torch.testing.assert_close(a, b)


def _scores(tmp_path, tiny_layout, command: str, mode: str | None = None) -> dict:
    ckpt = tmp_path / "m.safetensors"
    if not ckpt.exists():
        moceir.save_model(counted_tiny(), ckpt)
    out = tmp_path / f"{command}_{mode}"
    assert main([command, "--ckpt", str(ckpt), "--benchmarks", "denoise_25", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(out), *(["--experts", mode] if mode else []), "--quiet"]) == 0
    return {"dir": out, **json.loads((out / f"{'results' if command == 'test' else command}.json").read_text())}


def test_test_command_with_experts_skipped(tmp_path, tiny_layout):
    run, skip = (_scores(tmp_path, tiny_layout, "test", mode)["per_image"]["denoise_25"] for mode in ("run", "skip"))
    assert len(skip) == 3
    gaps = [abs(a["psnr"] - b["psnr"]) for a, b in zip(run, skip)]
    assert max(gaps) > 1e-3 and max(gaps) < 0.5, gaps  # measured 0.065-0.078 dB


def test_routing_reports_psnr_with_experts_bypassed(tmp_path, tiny_layout):
    data = _scores(tmp_path, tiny_layout, "routing")
    out = data["dir"]
    assert set(data["psnr_experts_bypassed"]) == {"denoise_25"}
    assert 1e-3 < abs(data["psnr_experts_bypassed"]["denoise_25"] - data["psnr"]["denoise_25"]) < 0.5
    assert "PSNR, experts bypassed" in (out / "routing.md").read_text()


def test_restore_with_experts_skipped(tmp_path):
    from PIL import Image

    ckpt = str(moceir.save_model(counted_tiny(), tmp_path / "m.safetensors"))
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray((np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)).save(src)
    outs = {}
    for mode in ("run", "skip"):
        assert main(["restore", str(src), "-o", str(tmp_path / mode), "--checkpoint", ckpt, "--experts", mode,
                     "--quiet"]) == 0
        outs[mode] = np.asarray(Image.open(tmp_path / mode / "a.png")).astype(int)
    assert np.abs(outs["run"] - outs["skip"]).max() >= 2  # grey levels; measured 7

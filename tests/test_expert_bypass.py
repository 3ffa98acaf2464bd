"""The expert-bypass ablation (--experts skip): every complexity expert becomes the identity."""

import copy
import json

import torch

import moceir
from moceir.cli import main
from moceir.models.experts import MoCEAdapter, set_expert_bypass

from conftest import fill_deterministic


def test_bypass_equals_experts_with_zero_branch():
    model = moceir.create_model("MoCE_IR_tiny").eval()
    fill_deterministic(model, 0.1)
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
        assert torch.equal(set_expert_bypass(model, False)(x), full)


def test_test_command_with_experts_skipped(tmp_path, tiny_layout):
    model = moceir.create_model("MoCE_IR_tiny")
    fill_deterministic(model, 0.1)
    ckpt = str(moceir.save_model(model, tmp_path / "m.safetensors"))
    scores = {}
    for mode in ("run", "skip"):
        out = tmp_path / mode
        assert main(["test", "--ckpt", ckpt, "--benchmarks", "denoise_25", "--data_file_dir", str(tiny_layout),
                     "--output_path", str(out), "--experts", mode, "--quiet", "--device", "cpu"]) == 0
        scores[mode] = json.loads((out / "results.json").read_text())["per_image"]["denoise_25"]
    assert len(scores["skip"]) == 3
    # for this small random network the experts change the scores only slightly
    assert all(abs(a["psnr"] - b["psnr"]) < 0.5 for a, b in zip(scores["run"], scores["skip"]))


def test_routing_reports_psnr_with_experts_bypassed(tmp_path, tiny_layout):
    model = moceir.create_model("MoCE_IR_tiny")
    fill_deterministic(model, 0.1)
    ckpt = str(moceir.save_model(model, tmp_path / "m.safetensors"))
    out = tmp_path / "routing"
    assert main(["routing", "--ckpt", ckpt, "--benchmarks", "denoise_25", "--data_file_dir", str(tiny_layout),
                 "--output_path", str(out), "--quiet"]) == 0
    data = json.loads((out / "routing.json").read_text())
    assert set(data["psnr_experts_bypassed"]) == {"denoise_25"}
    assert abs(data["psnr_experts_bypassed"]["denoise_25"] - data["psnr"]["denoise_25"]) < 0.5
    assert "PSNR, experts bypassed" in (out / "routing.md").read_text()

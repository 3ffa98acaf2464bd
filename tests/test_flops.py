"""FLOP counts and `moceir info`'s FLOP lines agree with the network they describe."""

import re

import pytest
import torch

import moceir
from moceir.cli import main
from moceir.flops import expert_flops_per_pixel, moe_layer_scales, network_flops
from moceir.models import fused


def _expected_expert_flops(model, size):
    """[experts] FLOPs of each expert summed over the MoE layers at size x size, from its per-pixel cost."""
    scales = torch.tensor(moe_layer_scales(model), dtype=torch.float64)
    return (expert_flops_per_pixel(model) * (size * size / scales**2)[:, None]).sum(0)


def test_forcing_the_costliest_expert_adds_exactly_its_flops():
    """network_flops(expert=e) - network_flops(expert=0) is expert e's cost minus expert 0's in every MoE layer,
    each at its own resolution."""
    model = moceir.create_model("MoCE_IR_tiny").eval()
    assert moe_layer_scales(model) == [4, 2, 1]
    lo, hi = network_flops(model, 64, 0), network_flops(model, 64, 3)
    per_expert = _expected_expert_flops(model, 64)
    assert hi > lo
    assert hi - lo == pytest.approx(float(per_expert[3] - per_expert[0]), rel=1e-9)


def test_network_flops_count_the_fused_cpu_convolutions_too():
    """Bug found by a mutation audit: at 4096 px and up, the CPU's fused oneDNN convolutions were invisible to
    FlopCounterMode, so `moceir info` said 60.2 GFLOPs for MoCE_IR_S at 256², not 91.4 (tiny: 1.77, not 2.35)."""
    if fused._OPS is None:
        pytest.skip("this torch build has no fused oneDNN convolutions: nothing to miss")
    model = moceir.create_model("MoCE_IR_tiny").eval()
    counted = network_flops(model, 256, 0)
    assert fused._enabled  # the count leaves the fused path on for what runs next
    with fused.disabled():
        assert counted == network_flops(model, 256, 0)


def test_info_totals_and_per_expert_flops_agree(capsys):
    """The spread between "expert 0 everywhere" and "expert 3 everywhere" is expert 3's cost minus expert 0's."""
    assert main(["info", "MoCE_IR_tiny", "--size", "256"]) == 0
    out = capsys.readouterr().out
    experts = {int(i): float(g) for i, g in re.findall(r"expert (\d) \(rank [^)]*\): ([\d.]+) GFLOPs", out)}
    lo, hi = map(float, re.search(r"total: ([\d.]+) GFLOPs \(expert 0 everywhere\) \.\. ([\d.]+) GFLOPs \(expert 3 "
                                  r"everywhere\)", out).groups())
    assert sorted(experts) == [0, 1, 2, 3]
    assert experts[0] < experts[1] < experts[2] < experts[3]
    assert abs((hi - lo) - (experts[3] - experts[0])) <= 0.02, out  # each printed value is rounded to 0.01
    with fused.disabled():
        assert lo == pytest.approx(network_flops(moceir.create_model("MoCE_IR_tiny").eval(), 256, 0) / 1e9, abs=0.01)


@pytest.mark.parametrize("rank_type", ["exp", "fact"])
def test_info_labels_each_expert_with_its_own_rank(tmp_path, capsys, rank_type):
    model = moceir.create_model("MoCE_IR_tiny", rank_type=rank_type, latent_dim=2)
    ranks = [model.adapters[0].expert(i).proj[0].out_channels for i in range(4)]
    assert len(set(ranks)) > 1  # else a reversed label would pass
    path = moceir.save_model(model, tmp_path / "m.safetensors")
    assert main(["info", str(path), "--size", "32"]) == 0
    out = capsys.readouterr().out
    for i, rank in enumerate(ranks):
        assert f"expert {i} (rank {rank}, " in out, out

"""FLOP counts and `moceir info`'s FLOP lines agree with the network they describe."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import moceir
from moceir import flops
from moceir.cli import main
from moceir.flops import counted_network_flops, expert_flops_per_pixel, moe_layer_scales, network_flops
from moceir.models import MoCEIR, fused, get_config
from moceir.models.attention import FFTAttention


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
    FlopCounterMode, so `moceir info` said 60.2 GFLOPs for MoCE_IR_S at 256², not 91.4 (tiny: 1.77, not 2.35; both
    counted the channels-last attention then: 84.8 and 2.31 per head, below)."""
    if fused._OPS is None:
        pytest.skip("this torch build has no fused oneDNN convolutions: nothing to miss")
    model = moceir.create_model("MoCE_IR_tiny").eval()
    counted = network_flops(model, 256, 0)
    assert fused._enabled  # the count leaves the fused path on for what runs next
    with fused.disabled():
        assert counted == network_flops(model, 256, 0)


def test_the_count_is_the_architectures_whatever_the_memory_layout():
    """Bug: `moceir info` of a checkpoint (loaded channels-last) said 2.35 GFLOPs for the tiny model at 256, of
    the same model's .onnx (its config, built channels-first) 2.31. The channels-last attention multiplies the
    whole C x C Gram matrix and masks the blocks between heads; upstream's attention, per head, does not."""
    last = moceir.create_model("MoCE_IR_tiny").eval()
    first = moceir.create_model("MoCE_IR_tiny", channels_last=False).eval()
    assert counted_network_flops(last, 64, 0) > counted_network_flops(first, 64, 0)  # its levels of 2 heads
    for expert in (0, 3):
        assert network_flops(last, 64, expert) == network_flops(first, 64, expert) == counted_network_flops(
            first, 64, expert)
        assert network_flops(last, 256, expert) == counted_network_flops(first, 256, expert)
    assert last.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)  # counted on a copy
    assert not last.patch_embed.proj.weight.is_contiguous()


def test_a_top2_network_is_counted_with_two_different_experts(tmp_path, capsys):
    """Probe: `moceir info` of a top-2 network ran expert 0 in both slots for its lower total (and expert 3 twice
    for the upper): 2.35 .. 3.02 GFLOPs for the tiny model at 256, where it runs experts 0+1 .. 2+3."""
    top1 = moceir.create_model("MoCE_IR_tiny").eval()
    top2 = moceir.create_model("MoCE_IR_tiny", topk=2).eval()
    per_expert = _expected_expert_flops(top1, 64)
    assert network_flops(top2, 64, (0, 1)) - network_flops(top1, 64, 0) == pytest.approx(float(per_expert[1]))
    assert network_flops(top2, 64, (2, 3)) - network_flops(top1, 64, 3) == pytest.approx(float(per_expert[2]))
    with pytest.raises(ValueError, match="3 experts given for a network that runs 2"):
        network_flops(top2, 64, (0, 1, 2))
    assert main(["info", str(moceir.save_model(top2, tmp_path / "top2.safetensors")), "--size", "64"]) == 0
    lo, hi = (network_flops(top2, 64, e) / 1e9 for e in ((0, 1), (2, 3)))
    assert f"total: {lo:.2f} GFLOPs (experts 0+1 everywhere) .. {hi:.2f} GFLOPs (experts 2+3 everywhere)" in (
        capsys.readouterr().out)


def test_the_count_takes_any_integer_ids_and_any_model_and_refuses_what_is_no_expert():
    """A hostile review (2026-12-07): numpy and 0-d tensor ids were refused; a model holding a lock or a hook could
    not be copied; a generator was spent by the first small count; a half model and dense dispatch (all experts
    run, "auto" on CUDA) gave an error and another count; 0.5 or True were taken as experts, 7 as torch's index
    error."""
    import threading

    model = moceir.create_model("MoCE_IR_tiny").eval()
    base = network_flops(model, 64, 0)
    assert [network_flops(model, 64, e) for e in (np.int64(0), torch.tensor(0), [0], (e for e in [0]))] == [base] * 4
    model.lock = threading.Lock()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert network_flops(model, 64, 0) == base and not calls
    assert network_flops(moceir.create_model("MoCE_IR_tiny").eval().half(), 64, 0) == base
    assert network_flops(torch.compile(moceir.create_model("MoCE_IR_tiny").eval()), 64, 0) == base
    dense = moceir.create_model("MoCE_IR_tiny").eval().set_dispatch("dense")
    assert network_flops(dense, 64, 0) == base < network_flops(dense, 64, 3)
    for bad, error in ((True, TypeError), (0.5, TypeError), (1.0, TypeError), ("0", TypeError), ((7,), ValueError),
                       ((-1,), ValueError)):
        with pytest.raises(error, match="expert"):
            network_flops(model, 64, bad)


def test_info_of_a_network_that_runs_every_expert_prints_one_total(tmp_path, capsys):
    model = moceir.create_model("MoCE_IR_tiny", topk=4)
    assert main(["info", str(moceir.save_model(model, tmp_path / "all.safetensors")), "--size", "64"]) == 0
    total = [line for line in capsys.readouterr().out.splitlines() if "total:" in line]
    assert total == [f"  total: {network_flops(model, 64, range(4)) / 1e9:.2f} GFLOPs (experts 0+1+2+3 everywhere)"]


def test_info_of_a_damaged_or_half_checkpoint(tmp_path, capsys):
    """Probes of the count's fresh float32 network: NaN weights and a truncated file are one-line errors naming the
    file (exit 2); an fp16 export counts as its float32 model."""
    from conftest import save_damaged

    model = moceir.create_model("MoCE_IR_tiny").eval()
    half = moceir.save_model(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert main(["info", "MoCE_IR_tiny", "--size", "64"]) == 0 and main(["info", str(half), "--size", "64"]) == 0
    counts = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("  expert ", "  total: "))]
    assert len(counts) == 10 and counts[:5] == counts[5:], counts
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(half.read_bytes()[:1000])
    with torch.no_grad():
        model.output.weight.fill_(float("nan"))
    for path in (save_damaged(model, tmp_path / "nan.safetensors"), truncated):
        assert main(["info", str(path), "--size", "64"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and err.startswith("error: "), err


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


@pytest.mark.parametrize("impl", ["fft", "matmul"])
def test_extrapolated_counts_equal_the_counted_ones(impl):
    """network_flops extrapolates from three small sizes; it must give the count of a real run, at sizes that are
    and are not multiples of the experts' patch sizes, whichever kernels compute the FFT products."""
    model = moceir.create_model("MoCE_IR_tiny", channels_last=False).eval().set_fft_impl(impl)
    for size in (40, 136):  # 40: not a multiple of the 32 px patch; 136: of no patch above 8
        for expert in (0, 3):
            assert network_flops(model, size, expert) == counted_network_flops(model, size, expert), (size, expert)
    assert torch.equal(expert_flops_per_pixel(model), expert_flops_per_pixel(moceir.create_model("MoCE_IR_tiny")))
    assert {m.fft_impl for m in model.modules() if isinstance(m, FFTAttention)} == {impl}  # restored after counting


def test_a_count_that_is_not_affine_is_run_at_its_own_size(monkeypatch):
    """The extrapolation is checked on its third point: a network whose cost is not a + b * size**2 is run at the
    size asked for, never extrapolated."""
    calls = []

    def quartic(model, size, expert=None):  # the line through 16 and 24 gives an integer at 96: 7,520,256
        calls.append(size)
        return size**4

    monkeypatch.setattr(flops, "counted_network_flops", quartic)
    model = moceir.create_model("MoCE_IR_tiny")
    assert network_flops(model, 96, 0) == 96**4
    assert calls == [16, 24, 32, 96]


def _counted_sizes(monkeypatch) -> list[int]:
    """The sizes network_flops runs the network at, from now on (refusing any above 1024)."""
    calls, count = [], flops.counted_network_flops

    def spy(model, size, expert=None):
        calls.append(size)
        assert size <= 1024, f"counted directly at {size} x {size}"
        return count(model, size, expert)

    monkeypatch.setattr(flops, "counted_network_flops", spy)
    return calls


@pytest.mark.parametrize("build", ["channels_first", "plain"])
def test_a_channels_first_network_is_extrapolated_too(monkeypatch, build):
    """Probe: at 8 px a channels-first network's 1 x 1 bottleneck took the channels-last path, so its three small
    counts never lay on one line and every size was run for real: `moceir info x.onnx --size 16384` (whose network
    is a plain MoCEIR) ran out of memory."""
    model = (moceir.create_model("MoCE_IR_tiny", channels_last=False) if build == "channels_first"
             else MoCEIR(get_config("MoCE_IR_tiny"))).eval()
    exact = {e: counted_network_flops(model, 256, e) for e in (0, 3)}
    calls = _counted_sizes(monkeypatch)
    assert {e: network_flops(model, 256, e) for e in (0, 3)} == exact
    assert 256 not in calls, calls


def test_routing_left_to_the_routers_is_counted_at_its_own_size(monkeypatch):
    """Probe: with expert=None the routing chosen at 16-32 px was scaled up to the size asked for."""
    model = moceir.create_model("MoCE_IR_tiny").eval()
    calls = _counted_sizes(monkeypatch)
    network_flops(model, 136)
    assert calls == [136]


@pytest.mark.parametrize("size", [20, 100, 1001])
def test_a_size_the_network_refuses_is_refused_by_the_count(size):
    """Probe: extrapolation answered for 100 px, which a 4-level network (multiples of 8) cannot run."""
    with pytest.raises(ValueError, match="multiple"):
        network_flops(moceir.create_model("MoCE_IR_tiny").eval(), size, 0)


def test_info_at_a_size_no_machine_could_run_stays_small(tmp_path):
    """`moceir info --size 16384` needs no 16384² activations (MoCE_IR_tiny's would be ~17 GB each): under a 6 GB
    address-space limit it still answers, with the totals that two direct counts extrapolate to."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "from moceir.cli import main; sys.exit(main(['info', 'MoCE_IR_tiny', '--size', '16384']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lo, hi = map(float, re.search(r"total: ([\d.]+) GFLOPs \(expert 0 everywhere\) \.\. ([\d.]+) GFLOPs",
                                  done.stdout).groups())
    model = moceir.create_model("MoCE_IR_tiny", channels_last=False).eval()  # per head, as network_flops counts
    for expert, printed in ((0, lo), (3, hi)):
        f64, f128 = counted_network_flops(model, 64, expert), counted_network_flops(model, 128, expert)
        expected = f64 + (f128 - f64) * (16384**2 - 64**2) / (128**2 - 64**2)
        assert printed == pytest.approx(expected / 1e9, abs=0.01)


def test_info_of_an_onnx_file_at_a_huge_size_stays_small(monkeypatch):
    """`moceir info x.onnx` counts a plain (channels-first) MoCEIR of the file's config: extrapolated too."""
    import types

    import moceir.pipeline as pipeline

    monkeypatch.setattr(pipeline, "is_onnx_file", lambda target: True)
    monkeypatch.setattr(pipeline, "load_network", lambda target, device: types.SimpleNamespace(
        config=get_config("MoCE_IR_tiny"), note=""))
    calls = _counted_sizes(monkeypatch)
    assert main(["info", "fake.onnx", "--size", "16384"]) == 0
    assert max(calls) <= 32, calls

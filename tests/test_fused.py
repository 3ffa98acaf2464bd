"""The oneDNN-fused CPU inference path against the reference path (see moceir/models/fused.py)."""

import pytest
import torch

import moceir
from moceir.models import fused
from moceir.models.layers import FeedForward

from conftest import counted_tiny

pytestmark = pytest.mark.skipif(fused._OPS is None, reason="this torch build has no oneDNN pointwise convolutions")


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("with_residual", [False, True])
def test_feedforward_fused_matches_reference(with_residual):
    torch.manual_seed(0)
    ffn = FeedForward(16, 2.66, bias=True).to(memory_format=torch.channels_last)
    x, r = _cl(torch.randn(2, 16, 64, 72)), _cl(torch.randn(2, 16, 64, 72))
    residual = r if with_residual else None
    with torch.no_grad():
        assert fused.applies(x) and not fused.applies(x[:, :, :32, :32].contiguous(memory_format=torch.channels_last))
        got = ffn(x, residual)
        with fused.disabled():
            assert not fused.applies(x)
            ref = ffn(x, residual)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_network_fused_matches_reference_batch_1_and_8(dispatch):
    """Tiny model, channels-last, 8 images; images are forced onto different experts in every layer.

    At 64x64 the first level takes the fused path and the deeper (smaller) levels the reference path."""
    model = counted_tiny().set_dispatch(dispatch).to(memory_format=torch.channels_last)
    x = _cl(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    experts = (torch.arange(8)[None] + torch.arange(model.num_moe_layers)[:, None]) % 4  # [layers, B]
    with torch.no_grad():
        got = model(x, experts=experts)
        one = model(x[:1], experts=experts[:, :1])
        with fused.disabled():
            ref = model(x, experts=experts)
    assert (got - ref).abs().max() <= 1e-4
    assert (one - ref[:1]).abs().max() <= 1e-4


def test_fused_path_is_taken_only_without_autograd(monkeypatch):
    """With gradients on (training) the reference path runs; under no_grad on CPU the fused one does."""
    model = moceir.create_model("MoCE_IR_tiny").eval().to(memory_format=torch.channels_last)
    x = _cl(torch.rand(1, 3, 64, 64))

    class Taken(Exception):
        pass

    def boom(*args, **kwargs):
        raise Taken

    monkeypatch.setattr(fused, "_OPS", type("Ops", (), {"default": staticmethod(boom), "binary": staticmethod(boom)}))
    model(x).sum().backward()  # gradients on: never reaches the fused ops
    with torch.no_grad(), pytest.raises(Taken):
        model(x.contiguous())  # NCHW input is made channels-last by the network, so the fused path runs
    fused.set_enabled(False)
    try:
        with torch.no_grad():
            model(x)  # switched off: the reference path
    finally:
        fused.set_enabled(True)

"""CUDA-graph replay for inference (moceir.cuda_graphs), on the CPU through a stand-in for graph capture.

The stand-in keeps what a real graph does to memory: the outputs of the capture are the tensors every replay
rewrites, and the input is read from the static buffer the capture saw. CUDA itself is checked by the GPU window.
"""

import numpy as np
import pytest
import torch

import moceir
from moceir.cuda_graphs import GraphedNetwork
from moceir.inference import restore_tensor
from moceir.pipeline import UsageError, restore_files

from conftest import fill_deterministic


def fake_capture(fn):
    """Run ``fn`` once for the outputs' memory, which holds nothing valid until the first replay (as a real capture
    runs no kernel); each replay runs ``fn`` again and copies into that memory."""
    outputs = fn()
    for t in outputs:
        t.fill_(float("nan") if t.is_floating_point() else -1)

    def replay():
        for static, new in zip(outputs, fn()):
            static.copy_(new)

    return replay, outputs


@pytest.fixture
def model():
    net = moceir.create_model("MoCE_IR_tiny").eval()
    fill_deterministic(net, 0.05)
    return net


def images(seed, shape=(2, 3, 32, 32)):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_replayed_outputs_equal_the_network_and_capture_waits_for_the_second_sighting(model):
    graphed = GraphedNetwork(model, capture=fake_capture)
    for n, seed in enumerate((0, 1, 2), 1):
        x = images(seed)
        out = graphed(x, return_aux=True)
        ref = model(x, return_aux=True)
        torch.testing.assert_close(out.image, ref.image, rtol=0, atol=0)
        assert torch.equal(out.expert_indices, ref.expert_indices)
        assert graphed.captures == (0 if n == 1 else 1)
    assert graphed.replays == 2
    torch.testing.assert_close(graphed(images(3)), model(images(3)), rtol=0, atol=0)  # without return_aux


def test_a_later_call_never_changes_an_earlier_result(model):
    graphed = GraphedNetwork(model, capture_after=1, capture=fake_capture)
    layers = model.num_moe_layers
    first = graphed(images(0), return_aux=True, experts=torch.full((layers, 2, 1), 2, dtype=torch.long))
    kept = (first.image.clone(), first.expert_indices.clone())
    graphed(images(1), return_aux=True, experts=torch.full((layers, 2, 1), 1, dtype=torch.long))  # same graph
    assert graphed.captures == 1 and graphed.replays == 2  # capture_after=1: the first call replays too
    assert torch.equal(first.image, kept[0]) and torch.equal(first.expert_indices, kept[1])


def test_least_recently_used_graph_is_dropped(model):
    graphed = GraphedNetwork(model, max_graphs=2, capture_after=1, capture=fake_capture)
    a, b, c = images(0, (1, 3, 16, 16)), images(1, (1, 3, 24, 24)), images(2, (1, 3, 32, 32))
    graphed(a), graphed(b), graphed(a), graphed(c)  # a used after b: b is the least recent when c comes
    shapes = [key.shape for key in graphed._graphs]
    assert shapes == [tuple(a.shape), tuple(c.shape)] and graphed.captures == 3
    torch.testing.assert_close(graphed(b), model(b), rtol=0, atol=0)  # captured again, still right
    assert graphed.captures == 4


def test_an_evicted_key_waits_for_its_sightings_again(model):
    """Shapes that take turns beyond max_graphs run eagerly instead of being captured again on every call."""
    graphed = GraphedNetwork(model, max_graphs=1, capture=fake_capture)
    a, b = images(0, (1, 3, 16, 16)), images(1, (1, 3, 24, 24))
    for x in (a, a, b, b, a, b):
        graphed(x)
    assert graphed.captures == 2 and graphed.replays == 3  # a, a captured, b, b captured (a dropped), a eager, b


def test_forced_experts_are_a_static_input_too(model):
    graphed = GraphedNetwork(model, capture_after=1, capture=fake_capture)
    x = images(0, (1, 3, 32, 32))
    layers = model.num_moe_layers
    for expert in (0, 3, 1):
        forced = torch.full((layers, 1, 1), expert, dtype=torch.long)
        out = graphed(x, return_aux=True, experts=forced)
        ref = model(x, return_aux=True, experts=forced)
        torch.testing.assert_close(out.image, ref.image, rtol=0, atol=0)
        assert torch.equal(out.expert_indices, forced)
    assert graphed.captures == 1 and graphed.replays == 3  # capture_after=1: the first call replays too
    free = graphed(x, return_aux=True)  # the same shape routed freely is another graph, not the forced one
    ref = model(x, return_aux=True)
    torch.testing.assert_close(free.image, ref.image, rtol=0, atol=0)
    assert torch.equal(free.expert_indices, ref.expert_indices) and graphed.captures == 2


def test_tiles_share_one_graph_and_match_the_network(model):
    """Every tile of an image larger than the tile has the tile's shape, so one capture serves all of them."""
    x = images(5, (1, 3, 96, 80))
    graphed = GraphedNetwork(model, capture=fake_capture)
    y, experts = restore_tensor(graphed, x, tile=32, overlap=8, return_experts=True)
    y_ref, experts_ref = restore_tensor(model, x, tile=32, overlap=8, return_experts=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert torch.equal(experts, experts_ref)  # the first tile's experts, kept while later tiles replay
    assert graphed.captures == 1 and graphed.replays == 11  # 4 x 3 tiles, the first one eager
    other = images(6, (1, 3, 64, 72))  # another image size: its tiles have the same shape and key
    restore_tensor(graphed, other, tile=32, overlap=8)
    assert graphed.captures == 1


def test_a_failed_capture_turns_capture_off_with_one_note(model):
    notes = []

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    graphed = GraphedNetwork(model, capture_after=1, capture=broken, log=notes.append)
    for seed in range(3):
        torch.testing.assert_close(graphed(images(seed)), model(images(seed)), rtol=0, atol=0)
    assert graphed.captures == 0 and len(notes) == 1
    assert "operation not permitted" in notes[0] and "more detail" not in notes[0] and "eagerly" in notes[0]


def test_out_of_memory_in_a_capture_leaves_that_shape_eager_and_the_others_captured(model):
    attempts = []

    def small_memory(fn):
        out = fn()
        attempts.append(out[0].shape[-1])
        if out[0].shape[-1] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return fake_capture(fn)

    graphed = GraphedNetwork(model, capture_after=1, capture=small_memory)
    big, small = images(0, (1, 3, 32, 32)), images(1, (1, 3, 16, 16))
    for _ in range(2):
        torch.testing.assert_close(graphed(small), model(small), rtol=0, atol=0)
        torch.testing.assert_close(graphed(big), model(big), rtol=0, atol=0)
    assert attempts == [16, 32, 16] and graphed.disabled is None  # the big shape was tried once only
    assert graphed.captures == 2  # its failure dropped the small shape's graph (its memory): captured again


def test_out_of_memory_in_an_eager_call_drops_the_graphs_and_runs_again(model):
    graphed = GraphedNetwork(model, capture_after=1, capture=fake_capture)
    small, big = images(1, (1, 3, 16, 16)), images(0, (1, 3, 32, 32))
    graphed(small)
    graphed._eager_keys.add(graphed._key(big, None))  # big runs eagerly
    calls = []
    real = graphed._forward

    def short_of_memory_once(x, experts):
        calls.append(x.shape[-1])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(x, experts)

    graphed._forward = short_of_memory_once
    torch.testing.assert_close(graphed(big), model(big), rtol=0, atol=0)
    assert calls == [32, 32] and not graphed._graphs


def test_autocast_is_part_of_the_key_and_runs_without_its_cast_cache(model):
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(torch.is_autocast_cache_enabled()))
    graphed = GraphedNetwork(model, capture_after=1, capture=fake_capture)
    x = images(0)
    plain = graphed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = graphed(x)
        ref = model(x)
    assert graphed.captures == 2 and seen == [False] * 4 + [True]  # capture and replay of each key, then ref
    torch.testing.assert_close(mixed, ref, rtol=0, atol=0)
    assert not torch.equal(plain, mixed)


def test_arguments_are_checked(model):
    for bad in ({"max_graphs": 0}, {"capture_after": 0}):
        with pytest.raises(ValueError, match="max_graphs and capture_after"):
            GraphedNetwork(model, **bad)


def test_restore_refuses_cuda_graphs_off_cuda(tmp_path, model):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(UsageError, match="--cuda_graphs needs a CUDA device"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", model, device="cpu", cuda_graphs=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="needs a PyTorch checkpoint; .*model.onnx runs in ONNX Runtime"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", tmp_path / "model.onnx", device="cpu", cuda_graphs=True)
    with pytest.raises(UsageError, match="needs a PyTorch checkpoint; .*MODEL.ONNX runs in ONNX Runtime"):
        restore_files([tmp_path / "a.png"], tmp_path / "out", str(tmp_path / "MODEL.ONNX"), device="cpu",
                      cuda_graphs=True)
    assert not (tmp_path / "out").exists()


def test_the_restorer_wraps_its_network_when_asked(monkeypatch, model):
    from moceir import cuda_graphs
    from moceir.pipeline import Restorer, RestoreOptions

    monkeypatch.setattr(cuda_graphs, "capture_cuda_graph", fake_capture)
    on = Restorer(model, torch.device("cpu"), [], RestoreOptions(batch_size=1, cuda_graphs=True), 1e9, print)
    off = Restorer(model, torch.device("cpu"), [], RestoreOptions(batch_size=1), 1e9, print)
    on.close(), off.close()
    assert isinstance(on.net, GraphedNetwork) and off.net is model
    on.net(images(0)), on.net(images(1))
    assert on.net.captures == 1


def test_cli_cuda_graphs_off_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    from PIL import Image

    from moceir.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code = main(["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--device", "cpu", "--cuda_graphs",
                 "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --cuda_graphs needs a CUDA device; leave it out on cpu"]
    assert not (tmp_path / "out").exists()


def test_moceir_restore_takes_a_graphed_network(model):
    """The Python API: ``moceir.restore(GraphedNetwork(net), image)`` replays from the second image of a size."""
    graphed = GraphedNetwork(model, capture=fake_capture)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    for photo in photos:
        assert np.array_equal(moceir.restore(graphed, photo), moceir.restore(model, photo))
    assert graphed.captures == 1 and graphed.replays == 2 and not graphed.training
    with pytest.raises(ValueError, match="eval-mode graphs"):
        graphed.train()

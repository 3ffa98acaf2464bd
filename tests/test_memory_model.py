"""The memory model behind automatic tiling and batching: it follows the allocator, and batches never exceed it."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import moceir
import moceir.inference as inference
import moceir.runtime as runtime
from moceir.inference import (DEFAULT_CPU_BUDGET, IMAGE_BYTES_PER_PIXEL, RUNTIME_BYTES, auto_tile, batch_that_fits,
                              bytes_per_pixel, estimate_peak_bytes, memory_budget)
from moceir.pipeline import RestoreOptions, plan_restore


@pytest.fixture
def model():
    torch.manual_seed(0)
    return moceir.create_model("MoCE_IR_S").eval()


def test_model_follows_the_allocator_state(model, monkeypatch):
    monkeypatch.setattr(runtime, "_tuned", False)
    plain, plain_tile = bytes_per_pixel(model), auto_tile(model, 3000, 4000, 2.5e9)
    monkeypatch.setattr(runtime, "_tuned", True)
    tuned, tuned_tile = bytes_per_pixel(model), auto_tile(model, 3000, 4000, 2.5e9)
    assert plain == pytest.approx(1760) and tuned == pytest.approx(6400)
    assert tuned_tile < plain_tile  # smaller tiles keep the same budget
    for tile in (plain_tile, tuned_tile):
        assert tile % model.config.size_multiple == 0


@pytest.mark.parametrize("tuned", [False, True])
def test_chosen_tile_and_batch_stay_within_the_budget(model, monkeypatch, tuned):
    monkeypatch.setattr(runtime, "_tuned", tuned)
    assert auto_tile(model, 3040, 4040, 1.9e9) == 128  # no tile fits: the smallest one
    for budget in (2.5e9, 3e9, 4e9):
        tile = auto_tile(model, 3040, 4040, budget)
        assert estimate_peak_bytes(model, 3040, 4040, tile) <= budget
        n = batch_that_fits(model, 353, 513, budget, at_most=16)
        assert n == 1 or estimate_peak_bytes(model, 353, 513, batch=n) <= budget
        assert n == 16 or estimate_peak_bytes(model, 353, 513, batch=n + 1) > budget
    assert batch_that_fits(model, 353, 513, 1.0, at_most=4) == 1  # never zero


def test_a_huge_batch_size_is_cut_to_what_fits_at_once(model):
    """Probe: `restore --batch_size 1000000000` hung: the batch was lowered one at a time (minutes, days for 1e12)."""
    import time

    start = time.perf_counter()
    n = batch_that_fits(model, 8, 8, 2.5e9, at_most=10**12)
    assert time.perf_counter() - start < 1  # bisection: about 40 estimates
    assert estimate_peak_bytes(model, 8, 8, batch=n) <= 2.5e9 < estimate_peak_bytes(model, 8, 8, batch=n + 1)


def test_tiles_of_a_batch_are_sized_for_the_whole_batch(model, monkeypatch):
    monkeypatch.setattr(runtime, "_tuned", False)
    one, four = auto_tile(model, 2000, 2000, 2.5e9), auto_tile(model, 2000, 2000, 2.5e9, batch=4)
    assert four < one


def test_plan_never_batches_more_than_the_budget_allows(model, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_tuned", False)
    for i in range(5):
        Image.fromarray(np.full((321, 481, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    two = estimate_peak_bytes(model, 321 + 32 + 8, 481 + 32 + 8, batch=2)
    plan = plan_restore([tmp_path], tmp_path / "out", model, RestoreOptions(batch_size=4), budget=two + 1, log=print)
    assert [len(b) for b in plan.batches] == [2, 2, 1]
    plan = plan_restore([tmp_path], tmp_path / "out", model, RestoreOptions(batch_size=4), budget=1e12, log=print)
    assert [len(b) for b in plan.batches] == [4, 1]


def test_api_splits_a_batch_that_does_not_fit_and_gives_the_same_images(monkeypatch):
    torch.manual_seed(0)
    tiny = moceir.create_model("MoCE_IR_tiny").eval()
    x = torch.rand(3, 3, 40, 48)
    calls = []
    real = inference.restore_tensor

    def spy(model, batch, *args, **kwargs):
        if kwargs.get("context_pad"):  # the API's call, not restore_tensor's own after padding
            calls.append(batch.shape[0])
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(inference, "restore_tensor", spy)
    one = estimate_peak_bytes(tiny, 40 + 32, 48 + 32)
    split = moceir.restore(tiny, x, max_memory=one + 1)
    assert calls == [1, 1, 1]
    calls.clear()
    whole = moceir.restore(tiny, x, max_memory=1e12)
    assert calls == [3]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-5)


def test_cpu_restore_goes_one_image_at_a_time_by_default(tmp_path):
    tiny = moceir.create_model("MoCE_IR_tiny").eval()
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = moceir.restore_files(tmp_path, tmp_path / "out", tiny, device="cpu", progress=False, log=lambda s: None)
    assert [r["batch"] for r in rows] == [1, 1, 1]
    rows = moceir.restore_files(tmp_path, tmp_path / "out2", tiny, device="cpu", batch_size=3, max_memory=1e12,
                                progress=False, log=lambda s: None)
    assert [r["batch"] for r in rows] == [3, 3, 3]


def _meminfo(monkeypatch, text):
    monkeypatch.setattr(inference, "open", lambda *a, **k: io.StringIO(text), raising=False)


@pytest.mark.parametrize("text, expected", [
    ("MemTotal: 16000000 kB\nMemFree: 100000 kB\nMemAvailable: 3000000 kB\n", 0.5 * 3000000 * 1024),
    ("MemTotal: 4000000 kB\nMemFree: 100000 kB\n", 0.5 * 4000000 * 1024),  # no MemAvailable: MemTotal
    ("MemTotal: 200000000 kB\nMemAvailable: 100000000 kB\n", 2.5e9),  # plenty: the default cap
    ("garbage\n", DEFAULT_CPU_BUDGET),
])
def test_cpu_budget_is_half_the_available_ram_capped_at_2_5_gb(monkeypatch, text, expected):
    """Mutations: max instead of min, kB read as bytes, MemTotal preferred to MemAvailable, a 25 GB cap."""
    _meminfo(monkeypatch, text)
    assert memory_budget(torch.device("cpu")) == pytest.approx(expected)


def test_cuda_budget_is_70_percent_of_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10e9, 80e9))
    assert memory_budget(torch.device("cuda", 0)) == pytest.approx(7e9)


def test_peak_estimate_is_linear_in_the_batch_and_a_large_tile_is_the_whole_image():
    """Mutations: the whole-image buffers counted once for a batch; a tile larger than the image counted whole."""
    tiny = moceir.create_model("MoCE_IR_tiny")
    one = estimate_peak_bytes(tiny, 100, 120) - RUNTIME_BYTES
    assert estimate_peak_bytes(tiny, 100, 120, batch=3) - RUNTIME_BYTES == pytest.approx(3 * one)
    assert estimate_peak_bytes(tiny, 100, 120, tile=512) == pytest.approx(estimate_peak_bytes(tiny, 100, 120))
    assert estimate_peak_bytes(tiny, 100, 900, tile=512) == pytest.approx(
        RUNTIME_BYTES + IMAGE_BYTES_PER_PIXEL * 100 * 900 + bytes_per_pixel(tiny) * 100 * 512)


def test_batch_tiles_leave_room_for_every_images_buffers(monkeypatch):
    """Mutation: auto_tile subtracted one image's whole-image buffers from the budget for a batch of four."""
    monkeypatch.setattr(runtime, "_tuned", False)
    model = moceir.create_model("MoCE_IR_tiny")
    m, h, w, batch = model.config.size_multiple, 2000, 2000, 4
    budget = RUNTIME_BYTES + IMAGE_BYTES_PER_PIXEL * batch * h * w + bytes_per_pixel(model) * batch * 300 * 300
    tile = auto_tile(model, h, w, budget, batch=batch)
    assert tile > 128  # not the minimum: the budget decides

    def peak(t):
        return RUNTIME_BYTES + IMAGE_BYTES_PER_PIXEL * batch * h * w + bytes_per_pixel(model) * batch * t * t

    assert peak(tile) <= budget < peak(tile + m)


def test_api_plans_with_the_padded_size_and_the_whole_batch(monkeypatch):
    """Mutations: the context counted on one side only; tiles sized for one image of a batch."""
    tiny = moceir.create_model("MoCE_IR_tiny").eval()
    seen = []
    real = inference.auto_tile
    monkeypatch.setattr(inference, "auto_tile", lambda model, h, w, budget, **k: seen.append((h, w, k)) or
                        real(model, h, w, budget, **k))
    moceir.restore(tiny, torch.rand(4, 3, 24, 40), context_pad=8, max_memory=1e12)
    assert seen == [(24 + 16, 40 + 16, {"batch": 4})]

"""Training speed flags (issue 14): --compile MODE, --ema_decay, --fused_adamw, --fft_impl, and the static step.

Every run is the tiny preset on 16x16 patches for a few steps on the CPU.
"""

import types

import pytest
import torch
import torch._inductor.config as inductor_config

import moceir
import moceir.models.attention as attention
import moceir.training as training
from moceir.cli import build_parser, main
from moceir.training import COMPILE_MODES, MoCEModule, TrainSettings, WeightEMA, build_dataloader


def _train(layout, ck, *extra: str) -> int:
    return main(["train", "--model", "MoCE_IR_tiny", "--de_type", "denoise_25", "derain",
                 "--data_file_dir", str(layout), "--batch_size", "2", "--patch_size", "16", "--num_workers", "0", "--ckpt_dir", str(ck),
                 "--num_gpus", "0", "--log_every_n_steps", "1", "--dispatch", "dense", "--max_steps", "3", *extra])


def _train_args(*extra: str):
    return build_parser().parse_args(["train", "--de_type", "derain", *extra])


def test_compile_flag_takes_a_mode_and_alone_means_default():
    assert [_train_args("--compile", mode).compile for mode in COMPILE_MODES] == list(COMPILE_MODES)
    with pytest.raises(SystemExit):
        _train_args("--compile", "max-autotune")
    assert _train_args().compile == "none"
    assert _train_args("--compile").compile == "default"
    assert _train_args("--compile", "reduce-overhead").compile == "reduce-overhead"
    assert TrainSettings(compile=True).compile == "default" and TrainSettings(compile=False).compile == "none"


@pytest.fixture
def inductor_restored():
    """--compile sets Inductor's fallback_random, a process-wide setting: put it back after the test."""
    with inductor_config.patch(fallback_random=False):
        yield


def test_compile_mode_reaches_torch_compile(tiny_layout, tmp_path, monkeypatch, inductor_restored):
    """The flag wires torch.compile with its mode (recorded, not compiled: a cold compile took 212 s here)."""
    calls = []

    def fake_compile(fn, *args, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "c", "--compile", "max-autotune-no-cudagraphs") == 0
    assert calls == [{"mode": "max-autotune-no-cudagraphs"}]
    assert inductor_config.fallback_random  # compiled steps draw eager's router noise, as the benchmark's check


def test_compile_scope_blocks_compiles_every_block_once_with_static_shapes(tiny_layout, tmp_path, monkeypatch,
                                                                           inductor_restored):
    """--compile_scope blocks: one torch.compile per transformer block (blocks of a level share the code), static
    shapes, the network itself not compiled; the dynamo limit leaves room for a graph per level and eval."""
    calls = []

    def fake_compile(fn, *args, **kwargs):
        calls.append((getattr(fn, "__self__", None), kwargs))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "b", "--compile", "--compile_scope", "blocks") == 0
    from moceir.models.blocks import DecoderBlock, EncoderBlock

    cfg = moceir.get_config("MoCE_IR_tiny")
    blocks = sum(cfg.num_blocks) + sum(cfg.num_dec_blocks) + cfg.num_refinement_blocks
    assert len(calls) == blocks == 9
    assert all(isinstance(m, (EncoderBlock, DecoderBlock)) for m, _ in calls)
    assert all(kw == {"mode": "default", "dynamic": False} for _, kw in calls)
    assert torch._dynamo.config.recompile_limit >= 32
    assert inductor_config.fallback_random


def test_compile_scope_without_compile_is_a_one_line_error_and_writes_nothing(tiny_layout, tmp_path, capsys):
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "n", "--compile_scope", "blocks") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --compile_scope blocks says what to compile; add --compile (or --compile MODE) to "
                   "compile it"]
    assert not (tmp_path / "ck").exists()


def test_compile_scope_is_checked(capsys):
    assert _train_args("--compile_scope", "blocks").compile_scope == "blocks"
    assert _train_args().compile_scope == "network"
    with pytest.raises(SystemExit):
        _train_args("--compile_scope", "layers")
    assert "invalid choice: 'layers'" in capsys.readouterr().err
    with pytest.raises(training.TrainingSetupError, match="--compile_scope is 'layers'; pass one of network, blocks"):
        TrainSettings(compile_scope="layers").validate()
    with pytest.raises(training.TrainingSetupError, match="--compile_scope blocks says what to compile; add --compile"):
        TrainSettings(compile_scope="blocks").validate()
    TrainSettings(compile="default", compile_scope="blocks").validate()
    from moceir.runtime import compile_network

    with pytest.raises(ValueError, match="compile scope must be one of"):
        compile_network(torch.nn.Linear(1, 1), "default", "layers")


def test_reduce_overhead_marks_each_step_for_cuda_graphs(tiny_layout, tmp_path, monkeypatch, inductor_restored):
    marks = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "r", "--compile", "reduce-overhead") == 0
    assert len(marks) == 3


def test_ema_file_differs_from_the_weights_and_loads(tiny_layout, tmp_path):
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "e", "--ema_decay", "0.5", "--lr", "1e-3") == 0
    run = tmp_path / "ck" / "e"
    raw, ema = moceir.load_model(run / "model.safetensors"), moceir.load_model(run / "model_ema.safetensors")
    assert ema.config == raw.config
    diffs = [(a - b).abs().max().item() for a, b in zip(raw.parameters(), ema.parameters())]
    assert max(diffs) > 1e-5
    saved = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"]["WeightEMA"]
    torch.testing.assert_close(saved["params"]["output.weight"], ema.state_dict()["output.weight"])


def test_ema_decay_zero_is_off_and_one_is_refused(tiny_layout, tmp_path, capsys):
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "off") == 0
    assert not (tmp_path / "ck" / "off" / "model_ema.safetensors").exists()
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "one", "--ema_decay", "1") == 2
    assert "--ema_decay is 1.0" in capsys.readouterr().err


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_weight_ema_tracks_the_weights(decay):
    """decay 0: the average is the weights, exactly; otherwise it lags behind them."""
    torch.manual_seed(0)
    net = moceir.create_model("MoCE_IR_tiny").train()
    ema, trainer = WeightEMA(decay), types.SimpleNamespace(global_step=0)
    ema.on_train_start(trainer, types.SimpleNamespace(net=net))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for step in range(1, 4):
        out = net(torch.rand(2, 3, 16, 16))
        (out.image.mean() + out.balance_loss).backward()
        opt.step()
        opt.zero_grad()
        trainer.global_step = step
        ema.on_train_batch_end(trainer, None, None, None, step)
    averaged = ema.network(net).state_dict()
    same = all(torch.equal(averaged[n], p.detach()) for n, p in net.named_parameters())
    assert same == (decay == 0.0)


def test_fused_adamw_flag_reaches_the_optimizer(tiny_layout, tmp_path):
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "f", "--fused_adamw") == 0
    ckpt = torch.load(tmp_path / "ck" / "f" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True


def test_fft_impl_matmul_trains_with_matmul_and_saves_the_config_unchanged(tiny_layout, tmp_path, monkeypatch):
    used = []
    real = attention.PATCH_PRODUCTS["matmul"]
    monkeypatch.setitem(attention.PATCH_PRODUCTS, "matmul", lambda *a: used.append(1) or real(*a))
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "m", "--fft_impl", "matmul") == 0
    assert used  # every expert ran the real-valued product
    assert moceir.load_model(tmp_path / "ck" / "m" / "model.safetensors").config.fft_impl == "fft"


def test_static_step_full_batches_of_one_patch_size(tiny_layout):
    settings = TrainSettings(de_type=("derain",), data_file_dir=str(tiny_layout), batch_size=2, patch_size=16,
                             num_workers=0, repeats={"derain": 3})
    loader, _ = build_dataloader(settings, settings.batch_size)
    assert loader.drop_last and len(loader.dataset) % 2 == 1  # 9 patches: the odd one is dropped
    assert {tuple(b["lq"].shape) for b in loader} == {(2, 3, 16, 16)}


SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist")  # tensor methods that wait for the device


def _refuse(*args, **kwargs):
    raise AssertionError("host synchronisation in the training step")


def guard_training_step(monkeypatch, steps: list[int]) -> None:
    """MoCEModule.training_step runs with the syncing tensor methods made to raise; ``steps`` gets each batch_idx."""
    real_step = MoCEModule.training_step

    def guarded(self, batch, batch_idx):
        steps.append(batch_idx)
        with pytest.MonkeyPatch.context() as mp:
            for name in SYNCING:
                mp.setattr(torch.Tensor, name, _refuse)
            return real_step(self, batch, batch_idx)

    monkeypatch.setattr(MoCEModule, "training_step", guarded)


def test_training_step_never_waits_for_the_device(tiny_layout, tmp_path, monkeypatch):
    """Dense dispatch, loss and logging read no tensor on the host; the NaN check waits for the log period."""
    steps = []
    guard_training_step(monkeypatch, steps)
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "s", "--ema_decay", "0.9") == 0
    assert steps == [0, 1, 2]


def test_non_finite_loss_is_caught_at_the_next_log_step(tiny_layout, tmp_path, monkeypatch, capsys):
    real_loss, calls = training.restoration_loss, []

    def nan_on_first_step(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(training, "restoration_loss", nan_on_first_step)
    assert _train(tiny_layout, tmp_path / "ck", "--run_name", "n", "--log_every_n_steps", "2") == 2
    assert len(calls) == 2  # stopped at the second step, the first log step
    assert "the training loss became NaN or inf" in capsys.readouterr().err


def test_the_throughput_matrix_offers_the_compile_modes_training_accepts():
    import subprocess
    import sys
    from pathlib import Path

    from moceir.runtime import COMPILE_MODES as modes

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    res = subprocess.run([sys.executable, "-c", "import sys, train_throughput as t; "
                          "print(list(t.COMPILE_MODES), 'torch' in sys.modules)"],
                         cwd=bench, capture_output=True, text=True, timeout=60)
    assert res.stdout.split() and res.stdout.strip() == f"{list(modes)} False", res.stderr[-2000:]

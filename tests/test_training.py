"""Training: learning on a fixed batch, checkpoints (ours and upstream's format), resume, CPU DDP."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import moceir
from moceir.cli import main
from moceir.losses import restoration_loss
from moceir.training import lr_factor

from conftest import GOLDEN


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    torch.manual_seed(0)
    model = moceir.create_model("MoCE_IR_tiny").train()
    gt = torch.rand(4, 3, 16, 16)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = model(lq)
        loss = restoration_loss(out.image, gt, out.balance_loss, "fft")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # measured: 0.211 -> 0.139


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == 0
    assert lr_factor(5, 10, 100) == pytest.approx(0.5)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def _train(tmp_path, layout, *extra):
    argv = ["train", "--model", "MoCE_IR_tiny", "--de_type", "denoise_25", "derain", "dehaze", "--dehaze_source",
            "synthetic", "--data_file_dir", str(layout), "--batch_size", "2", "--patch_size", "16",
            "--num_workers", "0", "--ckpt_dir", str(tmp_path / "ck"), "--num_gpus", "0", "--log_every_n_steps", "1",
            "--loss_type", "FFT", *extra]
    assert main(argv) == 0


def test_checkpoint_is_upstream_format_and_round_trips(tmp_path, tiny_layout):
    _train(tmp_path, tiny_layout, "--max_steps", "3", "--run_name", "r", "--lr", "5e-4")
    run = tmp_path / "ck" / "r"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 5e-4  # --lr is honoured
    upstream = torch.load(GOLDEN / "upstream_tiny_last.ckpt", map_location="cpu", weights_only=True)
    ours = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    theirs = {k: tuple(v.shape) for k, v in upstream["state_dict"].items()}
    assert ours == theirs  # upstream's test.py loads ours strictly, and we load theirs
    assert ckpt["moceir_config"]["dim"] == 8 and ckpt["global_step"] == 3
    model = moceir.load_model(run / "last.ckpt")
    torch.testing.assert_close(model.state_dict()["output.weight"], ckpt["state_dict"]["net.output.weight"])
    assert moceir.load_model(run / "model.safetensors").config == model.config
    assert (run / "training_curves.png").stat().st_size > 1000
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").iterdir())
    assert not list(run.glob("*.tmp"))


def test_resume_continues_step_and_optimizer(tmp_path, tiny_layout):
    _train(tmp_path, tiny_layout, "--max_steps", "3", "--run_name", "a")
    first = torch.load(tmp_path / "ck" / "a" / "last.ckpt", map_location="cpu", weights_only=True)
    _train(tmp_path, tiny_layout, "--max_steps", "5", "--run_name", "b", "--resume_from", "a")
    second = torch.load(tmp_path / "ck" / "b" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 3 and second["global_step"] == 5
    s1, s2 = first["optimizer_states"][0]["state"], second["optimizer_states"][0]["state"]
    assert s1[0]["step"].item() == 3 and s2[0]["step"].item() == 5
    assert first["lr_schedulers"][0]["last_epoch"] == 3 and second["lr_schedulers"][0]["last_epoch"] == 5


def test_fine_tune_from_any_checkpoint_format(tmp_path, tiny_layout):
    _train(tmp_path, tiny_layout, "--max_steps", "2", "--run_name", "ft", "--fine_tune_from",
           str(GOLDEN / "upstream_tiny_last.ckpt"))
    assert moceir.load_model(tmp_path / "ck" / "ft" / "last.ckpt").config.dim == 8


def test_two_process_cpu_ddp_runs_an_epoch(tmp_path, tiny_layout):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "moceir", "train", "--model", "MoCE_IR_tiny", "--de_type", "derain",
           "--data_file_dir", str(tiny_layout), "--batch_size", "1", "--patch_size", "16", "--num_workers", "0",
           "--ckpt_dir", str(tmp_path / "ck"), "--run_name", "ddp", "--num_gpus", "0", "--num_cpu_processes", "2",
           "--repeat", "derain=2", "--epochs", "1", "--save_every_n_epochs", "1", "--log_every_n_steps", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ck" / "ddp" / "last.ckpt", map_location="cpu", weights_only=True)
    # 3 pairs x 2 repeats = 6 samples, split over 2 processes at batch 1: 3 steps in the epoch
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3
    assert "distributed_backend=gloo" in res.stdout + res.stderr or "gloo" in (res.stdout + res.stderr).lower()
    assert res.stdout.count("training patches per task") == res.stdout.count("done: ") == 1  # rank 1 runs it too


def test_fine_tune_from_default_is_the_bundled_model(tmp_path):
    from moceir.training import TrainSettings, _fine_tune_source
    model, history = _fine_tune_source(TrainSettings(fine_tune_from="default", ckpt_dir=str(tmp_path)))
    assert history == []  # the bundled model has no run folder
    bundled = moceir.load_model("default")
    torch.testing.assert_close(model.state_dict()["output.weight"], bundled.state_dict()["output.weight"])


def test_fine_tune_from_default_prefers_a_run_of_that_name(tmp_path):
    import shutil

    from moceir.training import TrainSettings, _fine_tune_source
    (tmp_path / "default").mkdir()
    shutil.copy(GOLDEN / "upstream_tiny_last.ckpt", tmp_path / "default" / "last.ckpt")
    assert _fine_tune_source(TrainSettings(fine_tune_from="default", ckpt_dir=str(tmp_path)))[0].config.dim == 8


def test_the_logged_loss_uses_the_loss_weights_set(tiny_layout, tmp_path):
    """Mutation audit: training that dropped --fft_loss_weight and --balance_loss_weight (using the defaults)
    passed; no training test set other weights."""
    import csv

    from moceir.training import TrainSettings, train

    settings = TrainSettings(de_type=("denoise_25",), data_file_dir=str(tiny_layout), batch_size=2, patch_size=16,
                             num_workers=0, ckpt_dir=str(tmp_path), num_gpus=0, log_every_n_steps=1, run_name="w",
                             loss_type="fft", fft_loss_weight=0.5, balance_loss_weight=0.3, max_steps=2)
    run = train(moceir.get_config("MoCE_IR_tiny"), settings)
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2
    for r in rows:
        expected = float(r["train/l1"]) + 0.5 * float(r["train/fft"]) + 0.3 * float(r["train/balance"])
        assert float(r["train/loss"]) == pytest.approx(expected, rel=1e-5)


def _schedule(**kw):
    """The rate factor by step that MoCEModule.configure_optimizers sets, for a trainer of the given size."""
    from moceir.training import MoCEModule, TrainSettings

    trainer = kw.pop("trainer")
    module = MoCEModule(moceir.get_config("MoCE_IR_tiny"), TrainSettings(**kw))
    module._trainer = types.SimpleNamespace(**trainer)
    return module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]


def test_the_schedule_warms_up_and_decays_over_schedule_epochs_not_the_trained_ones():
    """Mutation audit: a cosine horizon of --epochs, or a --max_steps warmup of warmup_epochs steps, passed.
    Upstream trains 120 epochs on a 150-epoch cosine, so the rate at the end of training is not 0; with --max_steps
    the warmup is the share warmup/schedule of max_steps."""
    by_epoch = _schedule(epochs=120, warmup_epochs=15, schedule_epochs=150,
                         trainer=dict(estimated_stepping_batches=1200, max_epochs=120))
    assert by_epoch(75) == pytest.approx(0.5) and by_epoch(150) == pytest.approx(1.0)
    assert by_epoch(1200) == pytest.approx(0.5 * (1 + np.cos(np.pi * 1050 / 1350)))  # ~0.12, not 0
    by_step = _schedule(max_steps=200, warmup_epochs=15, schedule_epochs=150,
                        trainer=dict(estimated_stepping_batches=200, max_epochs=-1))
    assert by_step(10) == pytest.approx(0.5) and by_step(20) == pytest.approx(1.0)
    assert by_step(200) == pytest.approx(0.0)


def _ema_on(net, decay, loaded=None):
    from moceir.callbacks import WeightEMA

    ema, trainer = WeightEMA(decay), types.SimpleNamespace(global_step=0)
    if loaded is not None:
        ema.load_state_dict({"decay": decay, "params": loaded})
    ema.on_train_start(trainer, types.SimpleNamespace(net=net))
    return ema, trainer


def test_weight_ema_update_is_the_documented_formula_once_per_optimizer_step():
    """Mutation audit: an average updated on every batch (twice per step with --accum_grad 2), or with another
    mixing weight, passed. After one optimizer step, ema == decay * start + (1 - decay) * weights, however many
    batches end at that step."""
    net = moceir.create_model("MoCE_IR_tiny")
    ema, trainer = _ema_on(net, 0.75)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    trainer.global_step = 1
    for batch_idx in range(2):  # accum_grad 2: two batches end at global step 1
        ema.on_train_batch_end(trainer, None, None, None, batch_idx)
    averaged = ema.averaged()
    for n, p in net.named_parameters():
        torch.testing.assert_close(averaged[n], 0.75 * start[n] + 0.25 * p.detach())


def test_a_resumed_weight_ema_continues_from_the_saved_average():
    """Mutation audit: on resume the average starts from the checkpoint's, not from the current weights."""
    net = moceir.create_model("MoCE_IR_tiny")
    saved = {n: torch.full_like(p, 0.25) for n, p in net.named_parameters()}
    ema, _ = _ema_on(net, 0.9, loaded=saved)
    for n, v in ema.averaged().items():
        assert torch.equal(v, saved[n]), n


def test_accum_grad_divides_the_batch_each_step_sees(tmp_path, tiny_layout, monkeypatch):
    """Mutation audit: --batch_size 4 --accum_grad 2 loads batches of 2 (upstream: batch_size // accum_grad)."""
    from moceir import training

    seen = []

    def spy(settings, batch_size):
        seen.append(batch_size)
        raise KeyboardInterrupt  # stop before any folder is made

    monkeypatch.setattr(training, "build_dataloader", spy)
    settings = training.TrainSettings(de_type=("derain",), data_file_dir=str(tiny_layout), batch_size=4,
                                      accum_grad=2, patch_size=16, num_workers=0, ckpt_dir=str(tmp_path), num_gpus=0)
    with pytest.raises(KeyboardInterrupt):
        training.train(moceir.get_config("MoCE_IR_tiny"), settings)
    assert seen == [2]

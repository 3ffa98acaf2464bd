"""The training step captured in one CUDA graph (moceir.captured_step, `moceir train --cuda_graphs`), on the CPU.

A stand-in takes the place of graph capture and keeps what a real capture does: capturing runs no step (weights,
optimizer state and random state are as before it), the graph's outputs hold nothing until the first replay, and a
replay writes the gradients instead of adding to them. What only CUDA can show (that the learning rate is read from
device memory at every replay, the speed) is checked by the GPU window; the rate's in-place update is checked here.
"""

import csv
import dataclasses
import math

import pytest
import torch

import moceir
from moceir.captured_step import CapturedTrainStep, make_capturable, portable_optimizer_state
from moceir.cli import main
from moceir.losses import restoration_loss
from moceir.models.checkpoints import load_model
from moceir.training import TrainingSetupError, TrainSettings, lr_factor, train


def stand_in_capture(fn):
    owner = fn.__self__  # the CapturedTrainStep whose step is captured
    params = [p for group in owner.optimizer.param_groups for p in group["params"]]
    writes = all(p.grad is None for p in params)  # else the captured backward adds to what it finds
    weights, state = owner._snapshot()
    rng = torch.get_rng_state()
    outputs = fn()
    owner._restore(weights, state)
    torch.set_rng_state(rng)
    for t in outputs.values():
        t.fill_(float("nan"))
    grads = [p.grad for p in params]  # where the graph's backward writes, and its optimizer step reads

    def replay():
        for p, g in zip(params, grads):
            if p.grad is not g:
                raise RuntimeError("a gradient was unset or replaced after capture: the graph would not see it")
            if g is not None and writes:
                g.zero_()  # then backward adds to zeros, as a backward captured without gradients writes
        for name, t in fn().items():
            outputs[name].copy_(t)

    return replay, outputs


def loss_fn(out, gt):
    return restoration_loss(out.image, gt, out.balance_loss, "fft", 0.1, 0.01)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return moceir.create_model("MoCE_IR_tiny").set_dispatch("dense").train()


def batches(n, shape=(2, 3, 16, 16)):
    g = torch.Generator().manual_seed(7)
    return [(torch.rand(*shape, generator=g), torch.rand(*shape, generator=g)) for _ in range(n)]


def optimizer_and_schedule(net):
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, 2, 6))


def test_captured_steps_equal_eager_steps_router_noise_and_schedule_included():
    data = batches(5)
    eager, captured = tiny_net(), tiny_net()
    opt_e, sched_e = optimizer_and_schedule(eager)
    opt_c, sched_c = optimizer_and_schedule(captured)
    step = CapturedTrainStep(captured, opt_c, loss_fn, capture=stand_in_capture)
    for i, (lq, gt) in enumerate(data):
        torch.manual_seed(100 + i)
        opt_e.zero_grad(set_to_none=True)
        parts = loss_fn(eager(lq), gt)
        parts["loss"].backward()
        opt_e.step()
        sched_e.step()
        torch.manual_seed(100 + i)
        replayed = step(lq, gt)
        sched_c.step()
        assert replayed.keys() == parts.keys()
        for name in parts:  # the warm-up steps were undone: step i sees the weights and noise of eager step i
            torch.testing.assert_close(replayed[name], parts[name].detach(), rtol=1e-5, atol=1e-6)
    assert step.replays == 5
    for (name, a), b in zip(eager.state_dict().items(), captured.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_the_steps_outputs_are_copies_and_other_shapes_are_refused():
    net = tiny_net()
    opt, _ = optimizer_and_schedule(net)
    step = CapturedTrainStep(net, opt, loss_fn, capture=stand_in_capture)
    (lq, gt), (lq2, gt2) = batches(2)
    first = step(lq, gt)
    kept = first["loss"].clone()
    step(lq2, gt2)
    assert torch.equal(first["loss"], kept)
    with pytest.raises(ValueError, match=r"batches of \(2, 3, 16, 16\), got \(1, 3, 16, 16\)"):
        step(lq[:1], gt[:1])
    with pytest.raises(ValueError, match="warmup_steps"):
        CapturedTrainStep(net, opt, loss_fn, warmup_steps=0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_learning_rate_becomes_a_tensor_that_the_scheduler_fills_in_place():
    net = tiny_net()
    opt, sched = optimizer_and_schedule(net)
    make_capturable(opt, torch.device("cpu"))
    rate = opt.param_groups[0]["lr"]
    assert torch.is_tensor(rate) and rate.item() == 0.0  # warm-up starts at 0
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is rate  # the tensor a graph would read, not a new one
    assert rate.item() == pytest.approx(3e-3)
    assert opt.param_groups[0]["capturable"] is False  # on the CPU; True on CUDA


def test_saved_optimizer_state_is_portable_to_an_uncaptured_run():
    net = tiny_net()
    opt, _ = optimizer_and_schedule(net)
    step = CapturedTrainStep(net, opt, loss_fn, capture=stand_in_capture)
    step(*batches(1)[0])
    opt.param_groups[0]["capturable"] = True  # as on CUDA
    saved = portable_optimizer_state(opt.state_dict())
    assert saved["param_groups"][0]["lr"] == 0.0 and isinstance(saved["param_groups"][0]["lr"], float)
    assert saved["param_groups"][0]["capturable"] is False
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["capturable"]  # live groups untouched
    fresh = tiny_net()
    eager_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    eager_opt.load_state_dict(saved)
    fresh(batches(1)[0][0]).image.mean().backward()
    eager_opt.step()  # no "capturable needs CUDA" or "tensor lr" error


# ------------------------------------------------------------------------------------------ moceir train
def _settings(layout, ck, run, **kw) -> TrainSettings:
    return TrainSettings(de_type=("denoise_25", "derain"), data_file_dir=str(layout), batch_size=2, patch_size=16,
                         num_workers=0, ckpt_dir=str(ck), num_gpus=0, log_every_n_steps=1, dispatch="dense",
                         run_name=run, lr=2e-3, warmup_epochs=1, schedule_epochs=4, loss_type="fft", ema_decay=0.5,
                         **{"max_steps": 4, **kw})


def test_train_with_cuda_graphs_matches_eager_training(tiny_layout, tmp_path):
    config = moceir.get_config("MoCE_IR_tiny")
    eager = train(config, _settings(tiny_layout, tmp_path, "eager"))
    captures = []

    def counted(fn):
        captures.append(fn.__self__)
        return stand_in_capture(fn)

    graphed = train(config, _settings(tiny_layout, tmp_path, "graphed", cuda_graphs=True), capture=counted)
    assert len(captures) == 1 and captures[0].replays == 4  # the run went through the captured step
    for name in ("model.safetensors", "model_ema.safetensors"):  # same batches, noise, rates: same weights
        a, b = load_model(eager / name).state_dict(), load_model(graphed / name).state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    ckpt = torch.load(graphed / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4  # Lightning counted the replayed steps
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False
    assert all(isinstance(x, float) for x in ckpt["lr_schedulers"][0]["_last_lr"])
    rows = {}
    for run in (eager, graphed):
        with open(run / "logs" / "metrics.csv") as f:
            rows[run.name] = [(r["train/lr"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows["graphed"]) == len(rows["eager"]) == 4
    for (lr_e, loss_e), (lr_c, loss_c) in zip(rows["eager"], rows["graphed"]):
        assert float(lr_c) == pytest.approx(float(lr_e), rel=1e-6)  # the schedule, logged from the device tensor
        assert math.isclose(float(loss_c), float(loss_e), rel_tol=1e-4)
    # an uncaptured run resumes from the captured run's checkpoint, and a captured one from the eager run's: the same
    resumed = train(config, _settings(tiny_layout, tmp_path, "resumed", resume_from=str(graphed / "last.ckpt"),
                                      max_steps=6))
    captured = train(config, _settings(tiny_layout, tmp_path, "captured", resume_from=str(eager / "last.ckpt"),
                                       max_steps=6, cuda_graphs=True), capture=stand_in_capture)
    for run in (resumed, captured):
        assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
    a, b = (load_model(run / "model.safetensors").state_dict() for run in (resumed, captured))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("flags, says", [
    (["--accum_grad", "2"], "--accum_grad 2"),
    (["--precision", "16-mixed"], "--precision 16-mixed"),
    (["--compile", "reduce-overhead"], "--compile reduce-overhead"),
    (["--dispatch", "sparse"], "--dispatch sparse"),
    ([], "captures the step on a CUDA GPU"),  # this machine trains on the CPU
])
def test_cuda_graphs_conflicts_are_one_line_errors(tiny_layout, tmp_path, capsys, flags, says):
    argv = ["train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "--data_file_dir", str(tiny_layout),
            "--batch_size", "2", "--patch_size", "16", "--num_workers", "0", "--ckpt_dir", str(tmp_path / "ck"),
            "--max_steps", "1", "--num_gpus", "0", "--cuda_graphs", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --cuda_graphs") and says in err[0]
    assert not (tmp_path / "ck").exists()  # nothing made


def test_conditional_dispatch_is_refused_too():
    with pytest.raises(TrainingSetupError, match="--dispatch conditional"):
        TrainSettings(cuda_graphs=True, dispatch="conditional").validate()


@pytest.mark.parametrize("error, says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     r"capturing the training step failed \(out of memory at batch 2; lower --batch_size\)"),
    (RuntimeError("operation not permitted when stream is capturing\nmore lines"),
     r"failed \(operation not permitted when stream is capturing\), or train without --cuda_graphs$"),
])
def test_a_failed_capture_is_a_one_line_setup_error(tiny_layout, tmp_path, error, says):
    def failing_capture(fn):
        try:
            raise error
        except RuntimeError:  # as torch.cuda.graph's exit does: capture_end fails, the cause is its context
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    with pytest.raises(TrainingSetupError, match=says):
        train(moceir.get_config("MoCE_IR_tiny"), _settings(tiny_layout, tmp_path, "f", cuda_graphs=True),
              capture=failing_capture)


@pytest.mark.parametrize("capture_end_fails", [False, True])
def test_a_bug_in_the_step_is_not_dressed_as_a_capture_failure(tiny_layout, tmp_path, capture_end_fails):
    def broken_step(fn):
        try:
            raise ValueError("a bug")  # not an error of capture: it keeps its traceback
        except ValueError:
            if capture_end_fails:  # the graph's exit fails while the bug propagates: the bug is the context
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            raise

    with pytest.raises((ValueError, RuntimeError)) as caught:
        train(moceir.get_config("MoCE_IR_tiny"), _settings(tiny_layout, tmp_path, "b", cuda_graphs=True),
              capture=broken_step)
    assert not isinstance(caught.value, TrainingSetupError)
    assert "a bug" in str(caught.value) + str(caught.value.__context__)


def test_the_captured_training_step_never_waits_for_the_device(tiny_layout, tmp_path, monkeypatch):
    """As the eager step (test_training_speed_flags.py): setup, capture, replay and logging read no tensor on the
    host; the learning rate is logged from its device tensor."""
    from test_training_speed_flags import SYNCING, guard_training_step

    steps, unguarded = [], []
    real_methods = {name: getattr(torch.Tensor, name) for name in SYNCING}
    real_adamw_step = torch.optim.AdamW.step

    def adamw_step(self, *args, **kwargs):
        # The CPU's AdamW (capturable needs CUDA) reads its step count on the host; CUDA's capturable AdamW does not
        # (torch's _multi_tensor_adam and _fused_adam with capturable), so only the optimizer step is let through.
        unguarded.append(1)
        guards = {name: getattr(torch.Tensor, name) for name in SYNCING}
        for name, method in real_methods.items():
            setattr(torch.Tensor, name, method)
        try:
            return real_adamw_step(self, *args, **kwargs)
        finally:
            for name, method in guards.items():
                setattr(torch.Tensor, name, method)

    guard_training_step(monkeypatch, steps)
    monkeypatch.setattr(torch.optim.AdamW, "step", adamw_step)
    train(moceir.get_config("MoCE_IR_tiny"), _settings(tiny_layout, tmp_path, "s", cuda_graphs=True, max_steps=3),
          capture=stand_in_capture)
    assert steps == [0, 1, 2] and len(unguarded) == 3 + 1 + 3  # warm-up, the stand-in's capture, 3 replays


def test_a_non_finite_replayed_loss_stops_training(tiny_layout, tmp_path, monkeypatch):
    import moceir.training as training

    real_loss = training.restoration_loss

    def nan_loss(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(training, "restoration_loss", nan_loss)
    settings = dataclasses.replace(_settings(tiny_layout, tmp_path, "n", cuda_graphs=True), log_every_n_steps=2,
                                   ema_decay=0.0)
    with pytest.raises(training.NonFiniteLossError, match="the training loss became NaN or inf"):
        train(moceir.get_config("MoCE_IR_tiny"), settings, capture=stand_in_capture)
    assert not (tmp_path / "n" / "model.safetensors").exists()

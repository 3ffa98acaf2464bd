"""Training setup checked function by function, without training a step: settings limits, which checkpoint a
run resumes from, run folders, hardware, the loader, settings.json, and every `moceir train` flag reaching the
settings. Each test catches a bug that a mutation audit made and that no earlier test saw."""

import json
import os
import types
from pathlib import Path

import pytest
import torch

from moceir import training
from moceir.cli import main
from moceir.training import MAX_SEED, TrainingSetupError, TrainSettings


def test_validate_takes_the_largest_seed_and_refuses_a_zero_learning_rate():
    TrainSettings(seed=MAX_SEED).validate()  # numpy's limit itself is a valid seed
    with pytest.raises(TrainingSetupError, match="--seed"):
        TrainSettings(seed=MAX_SEED + 1).validate()
    TrainSettings(warmup_epochs=0, fft_loss_weight=0, balance_loss_weight=0).validate()  # zero: off, allowed
    for field in ("lr", "schedule_epochs"):
        with pytest.raises(TrainingSetupError, match=f"--{field} is 0; pass a finite number > 0"):
            TrainSettings(**{field: 0}).validate()


def test_a_requeued_job_resumes_its_newest_hpc_checkpoint(tmp_path, monkeypatch):
    """Several hpc_ckpt_N.ckpt (SLURM's warning signal more than once): the highest N, as a number, not as text."""
    for n in (1, 9, 10, 2):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    monkeypatch.setattr(training, "_requeued", lambda: True)
    steps = {"hpc_ckpt_1.ckpt": 1, "hpc_ckpt_2.ckpt": 2, "hpc_ckpt_9.ckpt": 9, "hpc_ckpt_10.ckpt": 10, "last.ckpt": 5}
    monkeypatch.setattr(training, "read_resume_point",
                        lambda path, label="": types.SimpleNamespace(path=path, step=steps[path.name]))
    assert training._requeued_checkpoint(tmp_path).path == tmp_path / "hpc_ckpt_10.ckpt"
    steps["last.ckpt"] = 12  # a node failed after the last signal: last.ckpt is further on (review, 2026-12-07)
    assert training._requeued_checkpoint(tmp_path).path == tmp_path / "last.ckpt"


def test_a_run_without_last_ckpt_is_continued_from_its_newest_checkpoint(tmp_path):
    """The advice after a stopped run (and for a refused run folder) names the newest checkpoint, last.ckpt first."""
    for i, name in enumerate(("epoch=0-step=2.ckpt", "epoch=2-step=6.ckpt", "epoch=1-step=4.ckpt")):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))  # written in this order
    ckpts = training._run_checkpoints(tmp_path)
    assert ckpts[0].name == "epoch=1-step=4.ckpt"  # the newest file
    assert training._resume_target(tmp_path, ckpts) == tmp_path / "epoch=1-step=4.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"x")
    os.utime(tmp_path / "last.ckpt", (999_999, 999_999))
    assert training._resume_target(tmp_path, training._run_checkpoints(tmp_path)) == tmp_path


def test_a_settings_json_is_moceirs_only_with_all_of_its_keys(tmp_path):
    """A user's settings.json that happens to hold a "config" key is still the user's (it would be replaced)."""
    (tmp_path / "settings.json").write_text(json.dumps({"config": {"theme": "dark"}}))
    assert training._foreign_files(tmp_path) == ["settings.json"]
    (tmp_path / "settings.json").write_text(json.dumps({"config": {}, "settings": {}, "start_step": 0}))
    assert training._foreign_files(tmp_path) == []


def test_hardware_defaults_to_one_gpu_and_counts_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert training._hardware(TrainSettings()) == ("gpu", 1, "auto")  # not all four without --num_gpus
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert training._hardware(TrainSettings()) == ("cpu", 1, "auto")
    with pytest.raises(TrainingSetupError, match="--num_gpus 1 but this machine has 0 CUDA device"):
        training._hardware(TrainSettings(num_gpus=1))


def test_the_loader_takes_the_settings_workers_and_shuffles(tiny_layout):
    s = TrainSettings(de_type=("derain",), data_file_dir=str(tiny_layout), batch_size=1, patch_size=16,
                      num_workers=2)
    loader, _ = training.build_dataloader(s, 1)  # not iterated: no worker starts
    assert loader.num_workers == 2 and loader.persistent_workers
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)


def test_several_launched_processes_without_a_run_name_are_refused(tmp_path, monkeypatch):
    """torchrun on one node (WORLD_SIZE=2, --num_nodes 1): each process would make its own timestamped folder."""
    monkeypatch.delenv("MOCEIR_RUN_NAME", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingSetupError, match="--run_name is required"):
        training._run_folder(TrainSettings(ckpt_dir=str(tmp_path / "ck")))
    assert not (tmp_path / "ck").exists()


def test_settings_json_records_the_trainers_step_and_epoch():
    from moceir.models import get_config

    trainer = types.SimpleNamespace(global_step=7, current_epoch=3)
    d = json.loads(training._settings_json(get_config("MoCE_IR_tiny"), TrainSettings(seed=5), 4, trainer))
    assert (d["start_step"], d["global_step"], d["epoch"]) == (4, 7, 3)
    assert d["settings"]["seed"] == 5 and d["settings"]["de_type"] == list(TrainSettings().de_type)
    d = json.loads(training._settings_json(get_config("MoCE_IR_tiny"), TrainSettings(), 4))
    assert (d["start_step"], d["global_step"], d["epoch"]) == (4, None, None)


@pytest.fixture
def trained_settings(tmp_path, monkeypatch) -> list:
    """training.train replaced by a stand-in that records the TrainSettings `moceir train` passes it."""
    seen = []
    monkeypatch.setattr(training, "train", lambda config, settings, capture=None, changes=None:
                        seen.append(settings) or tmp_path / "run")
    return seen


def test_moceir_train_passes_every_flag_on_to_the_settings(tmp_path, tiny_layout, trained_settings):
    """Each `moceir train` flag given a value other than its default reaches TrainSettings."""
    assert main(["train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "dehaze", "--data_file_dir",
                 str(tiny_layout), "--dehaze_source", "synthetic", "--holdout_val", "--max_time", "00:01:00:00",
                 "--batch_size", "6", "--accum_grad", "3", "--patch_size", "32", "--num_workers", "1",
                 "--precision", "bf16-mixed", "--seed", "123", "--ckpt_dir", str(tmp_path / "ck"),
                 "--run_name", "r", "--save_every_n_epochs", "2", "--num_gpus", "0", "--num_cpu_processes", "2",
                 "--log_every_n_steps", "3", "--epochs", "7", "--max_steps", "11"]) == 0
    (s,) = trained_settings
    assert s.de_type == ("derain", "dehaze") and s.dehaze_source == "synthetic" and s.holdout_val
    assert s.max_time == "00:01:00:00" and (s.batch_size, s.accum_grad, s.patch_size) == (6, 3, 32)
    assert (s.num_workers, s.precision, s.seed) == (1, "bf16-mixed", 123)
    assert (s.ckpt_dir, s.run_name, s.save_every_n_epochs) == (str(tmp_path / "ck"), "r", 2)
    assert (s.num_gpus, s.num_cpu_processes, s.log_every_n_steps, s.epochs, s.max_steps) == (0, 2, 3, 7, 11)


def test_a_batch_equal_to_accum_grad_is_accepted(tiny_layout, trained_settings):
    """--batch_size 2 --accum_grad 2: each step takes one image (batch_size // accum_grad), which is allowed."""
    assert main(["train", "--model", "MoCE_IR_tiny", "--de_type", "derain", "--data_file_dir", str(tiny_layout),
                 "--batch_size", "2", "--accum_grad", "2", "--num_gpus", "0"]) == 0
    assert [(s.batch_size, s.accum_grad) for s in trained_settings] == [(2, 2)]


def test_a_run_name_is_looked_up_under_ckpt_dir_before_the_working_directory(tmp_path, monkeypatch):
    """--resume_from r / --checkpoint_id r: ckpt_dir/r/last.ckpt (upstream's place), even where ./r/last.ckpt is too."""
    for folder in (tmp_path / "ck" / "r", tmp_path / "r"):
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert training.resolve_checkpoint("r", str(tmp_path / "ck")) == tmp_path / "ck" / "r" / "last.ckpt"
    assert training.resolve_checkpoint("r", str(tmp_path / "elsewhere")) == Path("r") / "last.ckpt"


def test_a_name_that_is_both_a_file_here_and_a_run_is_refused(tmp_path, monkeypatch, capsys):
    """Review: `--checkpoint_id r` took a file ./r over the run ckpt_dir/r (upstream's only meaning) without a word."""
    (tmp_path / "ck" / "r").mkdir(parents=True)
    (tmp_path / "ck" / "r" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "r").write_bytes(b"y")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^r names both the file r and the run .*ck/r/last.ckpt; pass the "):
        training.resolve_checkpoint("r", str(tmp_path / "ck"))
    assert training.resolve_checkpoint("ck/r/last.ckpt", "ck") == Path("ck/r/last.ckpt")  # the same file: no doubt
    assert main(["test", "--checkpoint_id", "r", "--ckpt_dir", "ck", "--benchmarks", "denoise_15"]) == 2
    assert capsys.readouterr().err.startswith("error: --checkpoint_id: r names both the file r and the run ")


def test_the_settings_json_written_at_the_start_of_a_resume_names_the_step_it_resumed_from(
        tmp_path, tiny_layout, monkeypatch):
    """settings.json is written when fitting starts (and kept if the run dies): a resumed run's start_step is the
    checkpoint's step, not 0."""
    from conftest import GOLDEN

    written = []

    class Spy:
        def __init__(self, path, text):
            written.append(json.loads(text))
            raise KeyboardInterrupt  # stop before the trainer is built

    monkeypatch.setattr(training, "WriteAtStart", Spy)
    s = TrainSettings(de_type=("derain",), data_file_dir=str(tiny_layout), batch_size=1, patch_size=16,
                      num_workers=0, ckpt_dir=str(tmp_path / "ck"), run_name="r", num_gpus=0,
                      resume_from=str(GOLDEN / "upstream_tiny_last.ckpt"))
    with pytest.raises(KeyboardInterrupt):
        training.train(None, s)
    assert written[0]["start_step"] == 4 and written[0]["global_step"] is None

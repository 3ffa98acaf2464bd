"""Training callbacks, called directly: epoch checkpoints every n epochs, a resumed run's metrics history, the
saved loop state of a finished epoch (the command-line tests only run --save_every_n_epochs 1 and resumes whose
history ends before the resumed step)."""

import csv
import types


def _fake_trainer(epoch: int) -> types.SimpleNamespace:
    progress = types.SimpleNamespace(is_last_batch=True, current=types.SimpleNamespace(ready=3))
    loop = types.SimpleNamespace(epoch_loop=types.SimpleNamespace(batch_progress=progress))
    return types.SimpleNamespace(current_epoch=epoch, num_training_batches=3, fit_loop=loop)


def test_epoch_checkpoints_every_n_epochs_count_epochs_from_one(tmp_path, monkeypatch):
    """Mutation: ``current_epoch % n`` saved after epochs 1, 3, 5 ... (0-based 0, 2, 4) with --save_every_n_epochs 2,
    instead of after epochs 2, 4, 6; the default of 5 then saved after the very first epoch."""
    from moceir.callbacks import RunCheckpoint

    saved = []
    cb = RunCheckpoint(dirpath=tmp_path, every_n_epochs=2, save_top_k=-1, save_last=True)
    monkeypatch.setattr(cb, "_should_skip_saving_checkpoint", lambda trainer: False)
    monkeypatch.setattr(cb, "_monitor_candidates", lambda trainer: {})
    monkeypatch.setattr(cb, "_save_topk_checkpoint", lambda trainer, c: saved.append(("epoch", trainer.current_epoch)))
    monkeypatch.setattr(cb, "_save_last_checkpoint", lambda trainer, c: saved.append(("last", trainer.current_epoch)))
    for epoch in range(5):
        cb.on_train_epoch_end(_fake_trainer(epoch), None)
    assert [e for kind, e in saved if kind == "epoch"] == [1, 3]  # after the 2nd and the 4th epoch
    assert [e for kind, e in saved if kind == "last"] == [0, 1, 2, 3, 4]


def test_a_resumed_metrics_csv_keeps_only_the_rows_before_the_resumed_step(tmp_path):
    """Mutation: ``step <= start_step`` kept the history's row of the resumed step, which the resumed run logs
    again: a duplicate step in metrics.csv and the plots (a run that logged a step and died before its checkpoint)."""
    from moceir.callbacks import _ResumedWriter

    history = tmp_path / "old.csv"
    with open(history, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "train/loss"])
        writer.writeheader()
        writer.writerows({"epoch": 0, "step": s, "train/loss": 1.0 / (s + 1)} for s in range(5))
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    _ResumedWriter(str(log_dir), history, start_step=3)
    with open(log_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2]


def test_count_epoch_completed_marks_a_finished_epoch_as_completed_and_not_at_its_last_batch():
    """Mutation: is_last_batch left True in the saved loop state."""
    from moceir.callbacks import count_epoch_completed

    counts = {"ready": 1, "started": 1, "processed": 1, "completed": 0}
    checkpoint = {"loops": {"fit_loop": {
        "epoch_progress": {"total": dict(counts), "current": dict(counts)},
        "epoch_loop.batch_progress": {"total": {"ready": 6, "completed": 6}, "current": {"ready": 3, "completed": 3},
                                      "is_last_batch": True}}}}
    count_epoch_completed(checkpoint)
    loop = checkpoint["loops"]["fit_loop"]
    assert loop["epoch_progress"]["total"]["completed"] == loop["epoch_progress"]["current"]["completed"] == 1
    batches = loop["epoch_loop.batch_progress"]
    assert batches["current"] == {"ready": 0, "completed": 0} and batches["total"] == {"ready": 6, "completed": 6}
    assert batches["is_last_batch"] is False

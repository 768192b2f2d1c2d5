"""progress.py: what is shown between epoch lines, on a terminal and in a log."""

from __future__ import annotations

import logging

from train_pytorch_model import progress
from train_pytorch_model.progress import Progress, Silent, fit_width


def test_silent_has_every_method_the_training_calls():
    """Other DDP ranks get Silent: a method only Progress has crashed rank 1 at the end of training."""
    public = {name for name in dir(Progress) if not name.startswith("_") and callable(getattr(Progress, name))}
    assert public - {"run_left"} <= {name for name in dir(Silent) if not name.startswith("_")}
    silent = Silent()
    silent.start_epoch(0, 3), silent.step(1), silent.step(2, 0.5), silent.phase("validation"), silent.end_epoch()
    silent.close()


def test_log_lines_give_the_epochs_and_the_whole_runs_eta(caplog, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    shown = Progress(epochs=3, batch_size=4, print_freq=2, terminal=False)
    with caplog.at_level(logging.INFO, logger="train_pytorch_model"):
        shown.start_epoch(0, 4)
        for step in (1, 2):
            clock[0] += 10.0
            shown.step(step, 0.5 if step == 2 else None)
    assert caplog.messages == ["  epoch 1/3  step 2/4  loss 0.5000  0.4 img/s  eta epoch 0m20s, run 1m40s"]
    clock[0] += 30.0  # two more steps and 10 s of validation: the first epoch took 50 s
    shown.end_epoch()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="train_pytorch_model"):
        shown.start_epoch(1, 4)
        clock[0] += 10.0
        shown.step(2, 0.4)  # steps every 5 s now; the next epoch counts as long as the first (50 s)
    assert caplog.messages[-1].endswith("eta epoch 0m10s, run 1m00s")


def test_summary_lines_fit_the_width():
    parts = ["Epoch 10/10", "train loss 0.1234 acc 99.0%", "valid loss 0.2345 top-1 98.0% top-5 100.0%", "lr 0.001",
             "123.4 img/s", "1m02s", "best so far (lowest valid loss)"]
    assert fit_width(parts[:4], 400) == "  ".join(parts[:4])
    for width in (60, 80, 100, 400):  # at most 120 columns, whatever the terminal
        lines = fit_width(parts, width).splitlines()
        assert len(lines) > 1 and all(len(line) <= min(width, 120) for line in lines)
        assert " ".join(" ".join(lines).split()) == " ".join(" ".join(parts).split())


def test_the_bar_counts_every_step_and_names_the_phases(monkeypatch):
    """The bar's count follows each step (tqdm redraws it at most 10 times a second, so a test on a terminal
    cannot rely on seeing every count drawn); the loss is shown from print steps, and a phase renames the bar."""
    import io

    stream = io.StringIO()
    monkeypatch.setattr(progress.sys, "stderr", stream)
    shown = Progress(epochs=2, batch_size=4, print_freq=2, terminal=True)
    shown.start_epoch(0, 3)
    counts = []
    for step in (1, 2, 3):
        shown.step(step, 0.25 if step == 2 else None)
        counts.append(shown.bar.n)
    assert counts == [1, 2, 3] and shown.bar.postfix == "loss=0.2500"
    shown.phase("validation")
    assert stream.getvalue().rsplit("\r", 1)[-1].startswith("epoch 1/2 validation: 100%")
    shown.end_epoch()
    assert shown.bar is None and len(shown.epoch_seconds) == 1

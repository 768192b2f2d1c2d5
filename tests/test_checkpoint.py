"""Checkpoint and resume (issue 6): SIGTERM, rerun, bit-identical weights; mismatched checkpoints refused."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST_TRAIN, REPO, write_image_folder
from train_pytorch_model import checkpoint, preemption
from train_pytorch_model.cli import main
from train_pytorch_model.errors import CheckpointMismatchError, TrainingInterruptedError
from train_pytorch_model.image_directory import load_image_directory

FAST = ["--image-size", "32", "--num-workers", "0", "--batch-size", "4"]
TRAIN = {"a": 10, "b": 10, "c": 9}
VALID = {"a": 5, "b": 4, "c": 4}


def train_args(untrained, train_dir, valid_dir, out, *extra) -> list[str]:
    return ["train", "--untrained-model", str(untrained), "--training-data", str(train_dir),
            "--validation-data", str(valid_dir), "--trained-model", str(out), *FAST, *extra]


def start(args: list[str]) -> subprocess.Popen:
    # One intra-op thread in every run: the same float summation order in each, whatever the load.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "train_pytorch_model", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


def weights(out) -> dict:
    return torch.load(out / "model", weights_only=True)


def metrics_without_timings(out) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in ("train_images_per_second", "data_wait_fraction", "seconds")}
                for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_sigterm_then_same_command_resumes_bit_identically(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", TRAIN)
    valid_dir = make_image_folder("valid", VALID, seed=1)
    out, checkpoints = tmp_path / "trained", tmp_path / "checkpoints"
    command = train_args(resnet18_dir, train_dir, valid_dir, out, "--epochs", "3", "--checkpoint-dir", str(checkpoints))
    # The uninterrupted reference runs alongside (one thread each: timing cannot change the bits).
    reference = start(train_args(resnet18_dir, train_dir, valid_dir, tmp_path / "reference", "--epochs", "3"))
    interrupted = start(command)
    deadline = time.monotonic() + 240
    while not (checkpoints / checkpoint.CHECKPOINT_FILE).exists():  # epoch 1 is done (written atomically)
        assert interrupted.poll() is None and time.monotonic() < deadline, finish(interrupted)[1][-3000:]
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)
    code, stderr = finish(interrupted)
    assert code == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("TrainingInterruptedError: Training of 3 epoch(s) stopped by SIGTERM; ")
    saved = torch.load(checkpoints / checkpoint.CHECKPOINT_FILE, weights_only=True)["next_epoch"]
    # The message says what the checkpoint on disk holds, not one epoch more.
    assert f"holds {saved} finished epoch(s): run the same command again to resume from epoch {saved + 1}" in last
    assert not out.exists() or not any(out.iterdir())  # no half-written output
    assert not list(checkpoints.glob(".*"))  # no temporary file left beside the checkpoint
    assert finish(reference)[0] == 0

    code, stderr = finish(start(command))
    assert code == 0, stderr[-3000:]
    assert "Resuming from the checkpoint" in stderr
    resumed, expected = weights(out), weights(tmp_path / "reference")
    assert resumed.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(resumed[k], expected[k])]
    assert not different, different[:5]
    assert metrics_without_timings(out) == metrics_without_timings(tmp_path / "reference")

    # After completion the checkpoint says so: running again trains nothing and writes the same model.
    again = tmp_path / "again"
    assert main(train_args(resnet18_dir, train_dir, valid_dir, again, "--epochs", "3",
                           "--checkpoint-dir", str(checkpoints))) == 0
    assert all(torch.equal(weights(again)[k], expected[k]) for k in expected)
    assert len(metrics_without_timings(again)) == 3


def test_checkpoint_of_other_inputs_is_refused(tmp_path, make_image_folder, resnet18_dir, densenet121_dir, capsys):
    train_dir = make_image_folder("train", {"a": 4, "b": 4})
    checkpoints = tmp_path / "checkpoints"
    assert main(train_args(resnet18_dir, train_dir, train_dir, tmp_path / "first", "--epochs", "1",
                           "--checkpoint-dir", str(checkpoints))) == 0
    capsys.readouterr()

    other_classes = make_image_folder("other", {"a": 4, "b": 4, "c": 4})
    assert main(train_args(resnet18_dir, other_classes, other_classes, tmp_path / "second", "--epochs", "2",
                           "--checkpoint-dir", str(checkpoints))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("CheckpointMismatchError: Checkpoint ")
    assert "classes: ['a', 'b'] in the checkpoint, ['a', 'b', 'c'] now" in last
    assert "epochs: 1 in the checkpoint, 2 now" in last and "training_data: '8 images" in last
    assert "empty --checkpoint-dir" in last

    assert main(train_args(densenet121_dir, train_dir, train_dir, tmp_path / "third", "--epochs", "1",
                           "--checkpoint-dir", str(checkpoints))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_name: 'resnet18' in the checkpoint, 'densenet121' now" in last
    assert not (tmp_path / "second").exists() and not (tmp_path / "third").exists()


def test_unreadable_checkpoint_is_refused_and_leftovers_are_removed(tmp_path):
    (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    (tmp_path / f".{checkpoint.CHECKPOINT_FILE}.tmp-123").write_bytes(b"half")
    with pytest.raises(CheckpointMismatchError, match="cannot be read"):
        checkpoint.read(tmp_path)
    assert not (tmp_path / f".{checkpoint.CHECKPOINT_FILE}.tmp-123").exists()
    assert checkpoint.read(tmp_path / "absent") is None


def test_data_fingerprint_follows_rows_labels_and_file_contents_not_the_mount_path(tmp_path, make_image_folder):
    import shutil

    first_folder = make_image_folder("one", {"a": 3, "b": 3})
    first = load_image_directory(first_folder)
    moved = load_image_directory(shutil.copytree(first_folder, tmp_path / "mounted elsewhere"))  # copy2 keeps mtimes
    other = load_image_directory(make_image_folder("three", {"a": 3, "b": 4}))
    assert checkpoint.data_fingerprint(first) == checkpoint.data_fingerprint(moved)
    assert checkpoint.data_fingerprint(first) != checkpoint.data_fingerprint(other)

    # Issue 21 item 26: an image changed in place (same name, same label) is another dataset.
    other_pixels = load_image_directory(make_image_folder("two", {"a": 3, "b": 3}, seed=5))
    assert checkpoint.data_fingerprint(first) != checkpoint.data_fingerprint(other_pixels)
    image = tmp_path / "mounted elsewhere" / moved.files[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))  # same bytes and size, edited later
    assert checkpoint.data_fingerprint(first) != checkpoint.data_fingerprint(moved)


def test_rng_states_round_trip():
    import random

    import numpy as np
    states = checkpoint.rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_states(states)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_sigterm_in_the_steps_sets_the_flag_elsewhere_stops_at_once_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    message = lambda: TrainingInterruptedError("stopped")
    with preemption.StopOnSigterm(message) as stop:
        with stop.deferred():
            assert not stop()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert stop()
        stop._timer.cancel()
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(TrainingInterruptedError, match="stopped"):
        with preemption.StopOnSigterm(message):  # not in the steps: reading inputs, writing outputs
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == before


BLOCKED_STEP = """
import os, sys
from train_pytorch_model import preemption
from train_pytorch_model.errors import TrainingInterruptedError
with preemption.StopOnSigterm(lambda: TrainingInterruptedError("stopped"), grace_seconds=1) as stop:
    with stop.deferred():
        print("reading", flush=True)
        open(sys.argv[1]).read()  # a FIFO nobody writes: blocks like a read on a stalled mount
print("never reached")
"""


@pytest.mark.slow
def test_sigterm_ends_a_step_blocked_in_a_read_within_the_grace_period(tmp_path):
    fifo = tmp_path / "stalled"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, "-c", BLOCKED_STEP, str(fifo)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "reading\n"
    time.sleep(0.2)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 143
    assert time.monotonic() - started < 10
    assert err.strip().splitlines()[-1].startswith("TrainingInterruptedError: stopped")
    assert "never reached" not in out


@pytest.mark.slow
def test_sigterm_before_training_starts_ends_the_command_at_once_with_143(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", TRAIN)
    process = start(train_args(resnet18_dir, train_dir, train_dir, tmp_path / "out", "--epochs", "3"))
    deadline = time.monotonic() + 240
    seen = ""
    while "Model resnet18 with" not in seen:  # printed while building the model, before the first step
        line = process.stderr.readline()
        assert line and time.monotonic() < deadline, seen[-2000:]
        seen += line
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code, stderr = finish(process)
    assert code == 143, stderr[-2000:]
    assert time.monotonic() - started < preemption.GRACE_SECONDS + 10
    assert stderr.strip().splitlines()[-1].startswith("TrainingInterruptedError: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("field, value, problem", [
    ("next_epoch", -3, "next_epoch -3"), ("next_epoch", 99, "next_epoch 99"), ("cpu_threads", "many", "cpu_threads"),
    ("early_stopping", {"best_loss": "low"}, "early_stopping.best_loss 'low'"), ("model", {"w": 1}, "model: not"),
    ("history", [], "history"), ("best_is_current", "yes", "best_is_current"),
])
def test_a_tampered_checkpoint_is_refused_field_by_field(tmp_path, field, value, problem):
    good = {"format": checkpoint.FORMAT, "identity": {"epochs": 3}, "next_epoch": 1, "cpu_threads": 2,
            "model": {"w": torch.zeros(1)}, "ema": None, "optimizer": {}, "scheduler": {}, "scaler": {},
            "early_stopping": {"best_loss": 0.5, "best_top1": 0.5, "best_epoch": 0, "bad_epochs": 0, "epochs_seen": 1},
            "best_state": None, "best_is_current": True, "history": [{}], "rng": {}}
    assert checkpoint.invalid_field(good) is None
    if field == "early_stopping":
        value = {**good["early_stopping"], **value}
    torch.save({**good, field: value}, tmp_path / checkpoint.CHECKPOINT_FILE)
    with pytest.raises(CheckpointMismatchError, match="damaged or was edited") as caught:
        checkpoint.read(tmp_path)
    assert problem in str(caught.value)


def test_the_background_writer_saves_the_state_of_the_save_call_not_later_changes(tmp_path):
    from train_pytorch_model.train import EarlyStopping, EpochMetrics, TrainingState

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    state = TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          torch.amp.GradScaler("cpu", enabled=False), EarlyStopping(3), next_epoch=1,
                          history=[EpochMetrics(1, 0.1, 1.0, 0.5, 10.0, 0.5, 0.5, None, 0.1, 1.0)])
    state.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    state.early_stopping.step(0, 0.5)
    expected = model.weight.detach().clone()
    writer = checkpoint.CheckpointWriter(tmp_path)
    writer.save(state, {"epochs": 3})
    with torch.no_grad():
        model.weight.add_(100)  # training goes on while the file is written
    writer.join()
    assert writer.saved_epochs == 1
    saved = checkpoint.read(tmp_path)
    assert torch.equal(saved["model"]["weight"], expected)


# --- issue 21: checkpoints of other starting weights, edited RNG states, shared folders, full disks -----------------

@pytest.mark.slow
def test_a_checkpoint_of_other_starting_weights_is_refused_by_name(tmp_path, make_image_folder, capsys):
    data = make_image_folder("data", {"a": 4, "b": 4})
    checkpoints = tmp_path / "checkpoints"
    for seed in ("1", "2"):
        assert main(["init-model", "--model-name", "resnet18", "--untrained-model", str(tmp_path / f"start{seed}"),
                     "--random-seed", seed]) == 0
    assert main(train_args(tmp_path / "start1", data, data, tmp_path / "a", "--epochs", "1",
                           "--checkpoint-dir", str(checkpoints))) == 0
    capsys.readouterr()
    assert main(train_args(tmp_path / "start2", data, data, tmp_path / "b", "--epochs", "1",
                           "--checkpoint-dir", str(checkpoints))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("CheckpointMismatchError: ") and "untrained_weights: 'sha256 " in last, last
    assert not (tmp_path / "b").exists()


def small_training_state():
    from train_pytorch_model.train import EarlyStopping, TrainingState

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                         torch.amp.GradScaler("cpu", enabled=False), EarlyStopping(3), next_epoch=1,
                         best_state={k: v.clone() for k, v in model.state_dict().items()}, history=[])


@pytest.mark.parametrize("field, value, problem", [
    ("numpy", {"positions": [1, 2, 3]}, "rng: numpy"), ("python", (3, (1, 2), None), "rng: python"),
    ("torch", torch.zeros(3), "rng: torch"), ("numpy", {"key": "PCG64"}, "rng: numpy"),
])
def test_an_edited_rng_state_is_a_named_error(tmp_path, field, value, problem):
    from train_pytorch_model.train import EpochMetrics

    state = small_training_state()
    state.history = [EpochMetrics(1, 0.1, 1.0, 0.5, 10.0, 0.5, 0.5, None, 0.1, 1.0)]
    state.early_stopping.step(0, 0.5)
    saved = checkpoint.payload_of(state, {"epochs": 3})
    if field == "numpy":
        value = {**saved["rng"]["numpy"], **value}
    saved["rng"] = {**saved["rng"], field: value}
    torch.save(saved, tmp_path / checkpoint.CHECKPOINT_FILE)
    edited, fresh = checkpoint.read(tmp_path), small_training_state()
    torch_state = torch.get_rng_state()
    with pytest.raises(CheckpointMismatchError, match="does not fit this model and run") as caught:
        checkpoint.restore(edited, fresh, tmp_path / checkpoint.CHECKPOINT_FILE)
    assert problem in str(caught.value)
    assert torch.equal(torch.get_rng_state(), torch_state)  # refused before any generator was changed


def test_a_refused_second_run_leaves_the_first_runs_save_in_progress_alone(tmp_path):
    import fcntl

    in_progress = tmp_path / f"{checkpoint.TEMPORARY_PREFIX}first-run"
    abandoned = tmp_path / f"{checkpoint.TEMPORARY_PREFIX}killed-run"
    abandoned.write_bytes(b"half a checkpoint")
    with open(in_progress, "wb") as writing:  # the first run's writer holds its file locked while it writes
        fcntl.flock(writing, fcntl.LOCK_EX)
        writing.write(b"half of the first run's checkpoint")
        (tmp_path / checkpoint.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
        with pytest.raises(CheckpointMismatchError):  # the second run reads the folder and is refused
            checkpoint.read(tmp_path)
        assert in_progress.exists() and not abandoned.exists()
    # The writer's own names are unique: two saves never share a temporary file.
    first = checkpoint.write(tmp_path / "x", {"next_epoch": 1})
    assert first.name == checkpoint.CHECKPOINT_FILE and not list((tmp_path / "x").glob(".*"))


@pytest.fixture
def full_disk(tmp_path):
    """A real file system with 1 MiB of room (tmpfs), as a full disk looks to a writer."""
    folder = tmp_path / "small"
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode(errors='replace').strip()})")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_checkpoint_that_does_not_fit_is_a_named_warning_and_training_goes_on(full_disk, caplog):
    import logging

    from train_pytorch_model.train import EarlyStopping, TrainingState

    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: more than the disk holds
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                          torch.amp.GradScaler("cpu", enabled=False), EarlyStopping(3), next_epoch=1)
    writer = checkpoint.CheckpointWriter(full_disk)
    with caplog.at_level(logging.WARNING):
        writer.save(state, {"epochs": 3})
        writer.join()  # no exception: the run goes on
    assert writer.failed_epochs == [1] and writer.saved_epochs is None
    assert "CheckpointWriteError: Cannot write the checkpoint of epoch 1" in caplog.text
    assert "holds no finished epoch" in caplog.text
    assert list(full_disk.iterdir()) == []  # the temporary file is gone too
    message = str(writer.interrupted_error(3))  # and a SIGTERM now says what is really on disk
    assert "holds no finished epoch yet" in message


def test_a_checkpoint_dir_inside_an_input_is_refused_before_training(tmp_path, make_image_folder, resnet18_dir,
                                                                     capsys):
    data = make_image_folder("data", {"a": 4, "b": 4})
    for inside in (data / "checkpoints", tmp_path / "untrained" / "ckpt"):
        untrained = tmp_path / "untrained"
        if not untrained.exists():
            import shutil
            shutil.copytree(resnet18_dir, untrained)
        assert main(train_args(untrained, data, data, tmp_path / "out", "--checkpoint-dir", str(inside))) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith('InvalidParameterError: Parameter "Checkpoint dir"') and "must not be inside" in last
        assert not inside.exists()


@pytest.mark.slow
def test_training_with_a_full_checkpoint_disk_warns_each_epoch_and_writes_its_model(tmp_path, make_image_folder,
                                                                                    resnet18_dir, full_disk):
    data = make_image_folder("data", {"a": 4, "b": 4})
    process = start(train_args(resnet18_dir, data, data, tmp_path / "out", "--epochs", "2",
                               "--checkpoint-dir", str(full_disk)))
    code, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    for epoch in (1, 2):
        assert f"CheckpointWriteError: Cannot write the checkpoint of epoch {epoch} " in stderr
    assert (tmp_path / "out" / "model").is_file() and list(full_disk.iterdir()) == []


def test_a_checkpoint_dir_without_validation_data_trains(tmp_path, resnet18_dir):
    """No --validation-data (the split is automatic): the checkpoint folder's checks skip the absent input."""
    data = write_image_folder(tmp_path / "data", {"a": 6, "b": 6})
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data),
                 "--trained-model", str(out), "--epochs", "1", "--batch-size", "4", *FAST_TRAIN,
                 "--checkpoint-dir", str(checkpoints)]) == 0
    assert (out / "model").is_file() and (checkpoints / checkpoint.CHECKPOINT_FILE).is_file()

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

from conftest import REPO
from train_pytorch_model import checkpoint
from train_pytorch_model.cli import main
from train_pytorch_model.errors import CheckpointMismatchError
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
    assert last.startswith("TrainingInterruptedError: Training stopped by SIGTERM during epoch ")
    assert "run the same command again to resume" in last
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


def test_data_fingerprint_follows_rows_and_labels_not_the_mount_path(tmp_path, make_image_folder):
    first = load_image_directory(make_image_folder("one", {"a": 3, "b": 3}))
    same = load_image_directory(make_image_folder("two", {"a": 3, "b": 3}, seed=5))  # other pixels, other path
    other = load_image_directory(make_image_folder("three", {"a": 3, "b": 4}))
    assert checkpoint.data_fingerprint(first) == checkpoint.data_fingerprint(same)
    assert checkpoint.data_fingerprint(first) != checkpoint.data_fingerprint(other)


def test_rng_states_round_trip():
    import random

    import numpy as np
    states = checkpoint.rng_states()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_states(states)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_sigterm_sets_the_flag_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.StopOnSigterm() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop()
    assert signal.getsignal(signal.SIGTERM) == before

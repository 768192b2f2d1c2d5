"""The `train` command end to end: the core contract of issue 3."""

from __future__ import annotations

import base64
import csv
import json
import os
import sys
import traceback
import warnings
from array import array

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from train_pytorch_model.cli import main
from train_pytorch_model.data import class_targets
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.train import EarlyStopping

FAST = ["--image-size", "32", "--num-workers", "0", "--batch-size", "4"]


def train(untrained, train_dir, valid_dir, out, *extra) -> int:
    return main(["train", "--untrained-model", str(untrained), "--training-data", str(train_dir),
                 "--validation-data", str(valid_dir), "--trained-model", str(out), *FAST, *extra])


def read_metrics(out) -> list[dict]:
    with open(out / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_cli_trains_resnet18_on_the_legacy_fixtures(cli, tmp_path, legacy_image_dir, resnet18_dir):
    out = tmp_path / "trained"
    result = cli("train", "--untrained-model", str(resnet18_dir), "--training-data", str(legacy_image_dir),
                 "--validation-data", str(legacy_image_dir), "--trained-model", str(out),
                 "--epochs", "2", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 2/2" in result.stderr
    # Legacy ModelDirectory part (spec section 4) ...
    for name in ("model", "index_to_label.csv", "model_spec.yaml", "_schema.json", "_samples.json", "_meta.yaml"):
        assert (out / name).is_file(), name
    assert (out / "index_to_label.csv").read_text() == ",label\n0,cat\n1,dog\n2,fox\n"
    assert len(json.loads((out / "_samples.json").read_text())) == 3
    # The original's scorer rebuilds the net from init_params and loads `model` strictly: that must work.
    import torchvision
    import yaml
    init_params = yaml.safe_load((out / "model_spec.yaml").read_text())["flavor_extras"]["init_params"]
    assert init_params == {"model_name": "resnet18", "pretrained": False, "zero_init_residual": False, "num_classes": 3}
    legacy = torch.nn.Module()
    legacy.model = torchvision.models.resnet18(num_classes=init_params["num_classes"])
    legacy.load_state_dict(torch.load(out / "model", weights_only=True), strict=True)
    # ... and an MLflow model that predicts category names from bytes or base64.
    model = mlflow.pyfunc.load_model(str(out))
    images = sorted((legacy_image_dir / "image").iterdir())
    frame = pd.DataFrame({"image": [images[0].read_bytes(), base64.b64encode(images[-1].read_bytes()).decode()]})
    predictions = model.predict(frame)
    assert set(predictions["Scored Labels"]) <= {"cat", "dog", "fox"}
    probabilities = predictions[[f"Scored Probabilities_{c}" for c in ("cat", "dog", "fox")]].to_numpy()
    assert probabilities.shape == (2, 3) and abs(probabilities.sum(axis=1) - 1).max() < 1e-5


@pytest.mark.slow
def test_cli_trains_densenet121(cli, tmp_path, legacy_image_dir, densenet121_dir):
    out = tmp_path / "trained"
    result = cli("train", "--untrained-model", str(densenet121_dir), "--training-data", str(legacy_image_dir),
                 "--validation-data", str(legacy_image_dir), "--trained-model", str(out), "--epochs", "1", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = read_trained_model_directory(out)
    assert trained.spec.model_name == "densenet121" and trained.classes == ["cat", "dog", "fox"]
    assert trained.model.num_classes == 3


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_other_seeds_differ(tmp_path, make_image_folder, resnet18_dir):
    data = make_image_folder("data", {"a": 6, "b": 6})
    runs = {}
    for name, seed in (("first", "7"), ("again", "7"), ("other", "8")):
        assert train(resnet18_dir, data, data, tmp_path / name, "--epochs", "2", "--random-seed", seed,
                     "--num-workers", "1") == 0
        runs[name] = torch.load(tmp_path / name / "model", weights_only=True)
    assert all(torch.equal(runs["first"][k], runs["again"][k]) for k in runs["first"])
    assert not all(torch.equal(runs["first"][k], runs["other"][k]) for k in runs["first"])


@pytest.mark.slow
def test_saved_weights_are_the_best_epochs(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", {"a": 8, "b": 8, "c": 8})
    valid_dir = make_image_folder("valid", {"a": 3, "b": 3, "c": 3}, seed=1)
    out = tmp_path / "out"
    # A large learning rate makes later epochs worse, so "best" and "last" differ.
    assert train(resnet18_dir, train_dir, valid_dir, out, "--epochs", "4", "--patience", "0",
                 "--learning-rate", "0.3", "--augmentation", "none") == 0
    metrics = read_metrics(out)
    losses = [float(m["valid_loss"]) for m in metrics]
    info = json.loads((out / "training_info.json").read_text())["training"]
    assert info["best_epoch"] == losses.index(min(losses)) + 1
    # Re-evaluate the saved weights: they reproduce the best epoch's validation loss, not the last one's.
    trained = read_trained_model_directory(out)
    directory = load_image_directory(valid_dir)
    transform = trained.preprocessing.eval_transform()
    from train_pytorch_model.preprocessing import decode_image
    batch = torch.stack([transform(decode_image(directory.path(i))) for i in range(len(directory))])
    targets = torch.tensor(list(directory.labels))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(trained.model(trained.preprocessing.normalize(batch)), targets).item()
    assert loss == pytest.approx(min(losses), rel=1e-4)


def test_early_stopping_counts_from_the_best_epoch_not_the_previous():
    stopper = EarlyStopping(patience=3)
    history = [1.0, 0.9, 0.95, 0.92, 0.91]  # never beats 0.9 again, though it keeps decreasing
    decisions = []
    for epoch, loss in enumerate(history):
        stopper.step(epoch, loss)
        decisions.append(stopper.should_stop)
    assert decisions == [False, False, False, False, True]
    assert stopper.best_epoch == 1
    assert not EarlyStopping(patience=0).should_stop


def test_early_stopping_ends_the_run(tmp_path, make_image_folder, resnet18_dir):
    data = make_image_folder("data", {"a": 6, "b": 6})
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--epochs", "8", "--patience", "1", "--learning-rate", "1.5") == 0
    epochs_run = len(read_metrics(out))
    assert epochs_run < 8
    losses = [float(m["valid_loss"]) for m in read_metrics(out)]
    assert losses[-1] >= min(losses[:-1])  # stopped right after an epoch that did not beat the best


def test_validation_labels_are_matched_by_name_not_by_id(tmp_path, legacy_image_dir):
    # A validation set with its own numbering: fox=0, cat=1 (and no dog).
    train_dir = load_image_directory(legacy_image_dir)
    valid_root = tmp_path / "valid"
    (valid_root / "fox").mkdir(parents=True)
    (valid_root / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(valid_root / "fox" / "1.png")
    Image.new("RGB", (8, 8)).save(valid_root / "cat" / "1.png")
    valid_dir = load_image_directory(valid_root)
    assert valid_dir.categories == ["cat", "fox"]  # its own ids differ from training's cat=0, dog=1, fox=2
    index = {name: i for i, name in enumerate(train_dir.categories)}
    targets = class_targets(valid_dir, index)
    assert [train_dir.categories[t] for t in targets] == [valid_dir.categories[label] for label in valid_dir.labels]
    assert targets == array("l", [0, 2])


def test_validation_categories_must_be_a_subset(tmp_path, make_image_folder, resnet18_dir, capsys):
    train_dir = make_image_folder("train", {"a": 4, "b": 4})
    valid_dir = make_image_folder("valid", {"a": 2, "wolf": 2})
    code = train(resnet18_dir, train_dir, valid_dir, tmp_path / "out", "--epochs", "1")
    assert code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("InvalidDatasetError:") and "'wolf'" in last
    assert not (tmp_path / "out").exists()


def test_mixed_image_sizes_and_small_training_set(tmp_path, resnet18_dir, caplog):
    root = tmp_path / "mixed"
    for label, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (root / label).mkdir(parents=True)
        for n, size in enumerate([(40, 30), (64, 64), (33, 90)]):
            Image.new("RGB", size, color).save(root / label / f"{n}.jpg")
    out = tmp_path / "out"
    assert train(resnet18_dir, root, root, out, "--epochs", "1", "--batch-size", "16") == 0
    assert "Batch size 16 is larger than the 6 training images" in caplog.text
    assert json.loads((out / "training_info.json").read_text())["training"]["batch_size"] == 6


def test_unreadable_images_are_skipped_by_name_or_fail_the_run(tmp_path, make_image_folder, resnet18_dir, caplog,
                                                              capsys):
    data = make_image_folder("data", {"a": 10, "b": 10})
    (data / "a" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--epochs", "1") == 0
    assert "Skipping unreadable training image 'a/broken.png'" in caplog.text

    for path in data.rglob("*.png"):
        path.write_bytes(b"garbage")
    assert train(resnet18_dir, data, data, tmp_path / "out2", "--epochs", "1") != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("InvalidDatasetError:") and "cannot be read" in last
    assert not (tmp_path / "out2").exists()


def test_metrics_are_logged_per_epoch_to_mlflow(tmp_path, make_image_folder, resnet18_dir):
    data = make_image_folder("data", {c: 3 for c in "abcde"})
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--epochs", "2") == 0
    run_id = json.loads((out / "training_info.json").read_text())["training"]["mlflow_run_id"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.params["model_name"] == "resnet18" and run.data.params["num_classes"] == "5"
    # What the run used, not the flag's auto: AdamW's weight decay (it was logged empty, and null in the info).
    assert run.data.params["weight_decay"] == "0.05" and run.data.params["bn_recalibration"] == "True"
    assert run.data.params["task"] == "multiclass"  # --task auto, as the data decided it
    assert json.loads((out / "training_info.json").read_text())["training"]["weight_decay"] == 0.05
    for key in ("train_loss", "valid_loss", "valid_top1", "valid_top5", "lr", "train_images_per_second"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.csv", "training_curves.png"} <= artifacts


@pytest.mark.slow
def test_not_labeled_training_data_is_refused(cli, tmp_path, resnet18_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in range(4):
        Image.new("RGB", (8, 8)).save(flat / f"{n}.png")
    result = cli("train", "--untrained-model", str(resnet18_dir), "--training-data", str(flat),
                 "--validation-data", str(flat), "--trained-model", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("NotLabeledDatasetError:")


# --- reliability: nothing broken is ever written with exit 0 (issue 14) -----------------------------------------


def test_a_diverging_run_fails_named_and_writes_nothing(tmp_path, make_image_folder, resnet18_dir, capsys):
    data = make_image_folder("data", {"a": 6, "b": 6})
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--epochs", "2", "--learning-rate", "1e9") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("TrainingDivergedError: Training diverged") and "--learning-rate" in last
    assert not out.exists() or not any(out.iterdir())


def test_batch_size_one_is_refused_before_training(tmp_path, make_image_folder, resnet18_dir, capsys):
    data = make_image_folder("data", {"a": 4, "b": 4})
    assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data),
                 "--validation-data", str(data), "--trained-model", str(tmp_path / "out"), "--batch-size", "1",
                 "--image-size", "32", "--num-workers", "0"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('InvalidParameterError: Parameter "Batch size" value 1 is invalid: must be at least 2')


def test_a_checkpoint_dir_inside_the_output_is_refused_before_training(tmp_path, make_image_folder, resnet18_dir,
                                                                       capsys):
    data = make_image_folder("data", {"a": 4, "b": 4})
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--checkpoint-dir", str(out / "ck")) == 1
    err = capsys.readouterr().err
    assert 'InvalidParameterError: Parameter "Checkpoint dir"' in err and "Epoch 1" not in err


# Host reads: each waits for the device on a GPU. Counted where our code or torch's weight averaging (the EMA's
# old per-step sync) reads a value, outside the workers' work (a dataset's __getitem__, collate: host data only).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
COUNTED_FILES = ("train_pytorch_model", f"torch{os.sep}optim{os.sep}swa_utils.py")


def count_host_reads(monkeypatch, calls: list):
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            frame = sys._getframe(1)
            if any(part in frame.f_code.co_filename for part in COUNTED_FILES):
                outer = frame
                while outer is not None and outer.f_code.co_name not in ("__getitem__", "collate"):
                    outer = outer.f_back
                if outer is None:
                    calls.append(f"{_name} {frame.f_code.co_filename.rsplit(os.sep, 1)[-1]}:{frame.f_lineno}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)


def count_device_syncs(monkeypatch, calls: list):
    """On CUDA, torch's own detector (set_sync_debug_mode): every host sync warns; each is kept with where it came
    from, except the device JPEG decoder's waits on its own stream (gpu_decode: never the training stream)."""
    def show(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()
        if "synchroniz" in str(message) and not any(frame.name == "_decode_jpegs" for frame in stack):
            ours = [f"{frame.filename.rsplit(os.sep, 1)[-1]}:{frame.lineno}" for frame in stack
                    if "train_pytorch_model" in frame.filename]
            calls.append(f"{message} at {ours[-1] if ours else filename}")
    warnings.simplefilter("always")
    monkeypatch.setattr(warnings, "showwarning", show)
    torch.cuda.set_sync_debug_mode("warn")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch's sync detector needs a CUDA device"))])
@pytest.mark.parametrize("options", [
    {},
    {"ema_decay": 0.9},
    {"mixup": 0.2, "cutmix": 1.0},
    {"class_weights": "balanced", "label_smoothing": 0.1},
    {"decode": "gpu"},
    {"task": "multilabel", "positive_class_weights": "balanced", "label_smoothing": 0.1},
], ids=["plain", "ema", "mixup-cutmix", "class-weights", "decode-gpu", "multilabel"])
@pytest.mark.slow
def test_the_step_loop_reads_device_values_only_at_print_steps(tmp_path, make_image_folder, resnet18_dir, monkeypatch,
                                                               options, device):
    """0 host syncs per step outside print steps, with every option: the count of host reads (.item(),
    .tolist(), bool(), ...; on CUDA every sync torch detects) is the same for 3 and 9 steps."""
    from train_pytorch_model import distributed, train_command
    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.preprocessing import Preprocessing

    def count_reads(images_per_class: int) -> list:
        data_dir = make_image_folder(f"d{images_per_class}", {"a": images_per_class, "b": images_per_class},
                                     suffix=".jpg")
        if options.get("task") == "multilabel":  # an MLTable of label lists over the same images
            from train_pytorch_model.tables import write_mltable

            write_mltable(data_dir, ((f"{c}/{n}.jpg", [c] if n % 2 else ["a", "b"])
                                     for c in "ab" for n in range(images_per_class)))
        ctx = distributed.Context(torch.device(device))
        config = TrainConfig(untrained_model=resnet18_dir, training_data=data_dir, validation_data=data_dir,
                             trained_model=tmp_path / "o", image_size=32, batch_size=2, num_workers=0,
                             print_freq=1000, epochs=1, device=device, **options)
        data = train_command.read_data(config, ctx)
        model, spec = train_command.build_model(resnet18_dir, 2)
        config, _ = train_command.settle(config, ctx, spec, model, training_images=len(data.train))
        trainer = train_command.make_trainer(config, ctx, data, Preprocessing(32))
        state = train_command.make_training_state(model, config, ctx, len(trainer.train_loader))
        calls = []
        with warnings.catch_warnings():
            (count_device_syncs if device == "cuda" else count_host_reads)(monkeypatch, calls)
            try:
                trainer.train_epoch(state, 0)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
                monkeypatch.undo()
        assert len(trainer.train_loader) == images_per_class
        return calls

    few, many = count_reads(3), count_reads(9)
    assert 1 <= len(few) == len(many) <= 3, (few, many)


def test_the_old_ema_update_is_caught_by_the_host_read_count(monkeypatch):
    """The count above sees AveragedModel's per-step reads of its counter, which WeightAverage has not."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from train_pytorch_model.train import WeightAverage

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    old = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    new = WeightAverage(model, 0.9)
    counts = []
    for ema in (old, new):
        calls = []
        count_host_reads(monkeypatch, calls)
        for _ in range(3):
            ema.update_parameters(model)
        monkeypatch.undo()
        counts.append(len(calls))
    assert counts[0] >= 3 and counts[1] == 0, counts
    with torch.no_grad():
        model[0].weight.add_(1.0)
    expected = new.module[0].weight * 0.9 + model[0].weight * 0.1
    new.update_parameters(model)
    assert torch.allclose(new.module[0].weight, expected)
    assert int(new.n_averaged) == 5 and set(new.state_dict()) == set(old.state_dict())
    # The tensor lists are kept between steps: still right after a checkpoint is loaded into the average (in
    # place), and rebuilt for another model.
    new.load_state_dict(old.state_dict())
    new.update_parameters(model)
    assert torch.allclose(new.module[0].weight, old.module[0].weight * 0.9 + model[0].weight * 0.1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    expected = new.module[0].weight * 0.9 + other[0].weight * 0.1
    new.update_parameters(other)
    assert torch.allclose(new.module[0].weight, expected)


@pytest.mark.parametrize("flags", [
    ("--label-smoothing", "0.1", "--class-weights", "balanced"),
    ("--mixup", "0.2", "--cutmix", "1.0", "--ema-decay", "0.9"),
    ("--freeze-backbone-epochs", "1", "--early-stopping-metric", "valid_top1", "--early-stopping-min-epochs", "2"),
])
@pytest.mark.slow
def test_fine_tuning_controls_train_and_are_recorded(tmp_path, make_image_folder, resnet18_dir, flags):
    data = make_image_folder("data", {"a": 4, "b": 4})
    out = tmp_path / "out"
    before = torch.load(resnet18_dir / "model", weights_only=True) if (resnet18_dir / "model").exists() else None
    assert train(resnet18_dir, data, data, out, "--epochs", "2", *flags) == 0
    recorded = json.loads((out / "training_info.json").read_text())["training"]
    for name, value in zip(flags[::2], flags[1::2]):
        key = name[2:].replace("-", "_")
        assert str(recorded[key]) == value or recorded[key] == float(value), key
    assert before is None or before  # the untrained directory is never modified


@pytest.mark.slow
def test_progress_is_a_bar_on_a_terminal_and_lines_with_eta_in_logs(tmp_path, make_image_folder, resnet18_dir):
    import fcntl
    import pty
    import re
    import struct
    import subprocess
    import sys
    import termios

    data = make_image_folder("data", {"a": 4, "b": 4})
    args = [sys.executable, "-m", "train_pytorch_model", "train", "--untrained-model", str(resnet18_dir),
            "--training-data", str(data), "--validation-data", str(data), "--epochs", "2", *FAST]
    logged = subprocess.run([*args, "--print-freq", "1", "--trained-model", str(tmp_path / "a")], capture_output=True,
                            text=True, timeout=300)
    assert logged.returncode == 0, logged.stderr[-2000:]
    # In a log: timestamped lines, each step's line with the epoch's and the whole run's ETA.
    step_line = re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ   epoch 1/2  step 1/2  loss \d.*eta epoch 0m\d\ds, "
                          r"run 0m\d\ds$", logged.stderr, re.MULTILINE)
    assert step_line, logged.stderr
    assert "best so far (lowest valid loss)" in logged.stderr
    # The result summary alone on stdout (progress and logs on stderr), saying how the best epoch was chosen.
    assert logged.stdout.startswith(f"Trained model written to {tmp_path / 'a'}: epoch ")
    assert "the lowest valid loss" in logged.stdout and "Trained model written" not in logged.stderr

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # a terminal 100 columns wide
    process = subprocess.Popen([*args, "--trained-model", str(tmp_path / "b")], stdout=secondary, stderr=secondary)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not chunk:
            break
        screen += chunk
    assert process.wait(timeout=300) == 0, screen[-2000:]
    text = screen.decode(errors="replace")
    assert "epoch 1/2:" in text and ("step/s" in text or "s/step" in text)  # tqdm's bar
    assert "  epoch 1/2  step 1/2" not in text
    # The bar is drawn before the first step and full when the phases after the steps are named (tqdm draws at
    # most 10 times a second, so whether step 1's count is drawn depends on the machine: test_progress counts it).
    assert " 0/2 [" in text and "epoch 1/2 validation: 100%" in text and " 2/2 [" in text
    lines = [line for chunk in text.split("\r") for line in chunk.split("\n")]
    summaries = [line for line in lines if line.startswith("Epoch ") or line.startswith("    ")]
    assert summaries and all(len(line) <= 100 for line in summaries), summaries


def test_decode_gpu_trains_end_to_end_through_the_cli(tmp_path, make_image_folder, resnet18_dir):
    """`--decode gpu` on this CPU: the same code path (workers read bytes, decode_batch decodes on the device)."""
    data = make_image_folder("data", {"a": 4, "b": 4}, suffix=".jpg")
    out = tmp_path / "out"
    assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data),
                 "--validation-data", str(data), "--trained-model", str(out), "--epochs", "1", "--image-size", "32",
                 "--batch-size", "4", "--num-workers", "1", "--decode", "gpu"]) == 0
    assert json.loads((out / "training_info.json").read_text())["training"]["decode"] == "gpu"
    assert len(read_metrics(out)) == 1


@pytest.mark.slow
def test_a_restart_that_finds_its_own_finished_output_exits_0_without_training(tmp_path, make_image_folder,
                                                                                resnet18_dir, capsys, caplog):
    """An Azure ML preemption between the write and the job's end: the restarted command is done at once."""
    import logging

    data = make_image_folder("data", {"a": 4, "b": 4})
    out = tmp_path / "out"
    assert train(resnet18_dir, data, data, out, "--epochs", "1") == 0
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert train(resnet18_dir, data, data, out, "--epochs", "1") == 0
    said = capsys.readouterr().out
    assert "already holds the trained model of this run" in said and "give --trained-model a new folder" in said
    assert "Epoch 1/1" not in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    # Another run (other parameters) still refuses the non-empty output.
    assert train(resnet18_dir, data, data, out, "--epochs", "2") == 1
    assert "OutputDirectoryError" in capsys.readouterr().err.strip().splitlines()[-1]


def train_one_epoch_on(batches: list[torch.Tensor], config):
    """One epoch of a 2-class toy net over the given uint8 batches (targets 0), no data loader: the Trainer alone.
    Returns (trainer, model)."""
    from types import SimpleNamespace

    from torch import nn

    from train_pytorch_model.data import BadImageTracker, Batch
    from train_pytorch_model.distributed import Context
    from train_pytorch_model.preprocessing import Preprocessing
    from train_pytorch_model.train import Trainer, TrainingState, make_optimizer, make_scaler, make_scheduler

    class Loader(list):
        sampler = SimpleNamespace(set_epoch=lambda epoch: None)

    loader = Loader(Batch(images, torch.zeros(len(images), dtype=torch.int64), []) for images in batches)
    cpu = torch.device("cpu")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    optimizer = make_optimizer(model, config, 0.01, cpu)
    state = TrainingState(model, optimizer, make_scheduler(optimizer, config, len(loader)), make_scaler(cpu, "fp32"),
                          EarlyStopping(0))
    tracker = BadImageTracker(None, "Training", 1.0)
    trainer = Trainer(Context(cpu), config, Preprocessing(32), 2, loader, None, tracker, tracker)
    trainer.train_epoch(state, 0)
    return trainer, model


def test_device_cuda_without_a_gpu_is_a_named_error(tmp_path, make_image_folder, resnet18_dir, capsys):
    data = make_image_folder("data", {"a": 4, "b": 4})
    assert train(resnet18_dir, data, data, tmp_path / "out", "--device", "cuda") == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("InvalidParameterError: Parameter \"Device\" value 'cuda' is invalid: no CUDA GPU")


def test_a_filler_step_for_a_one_image_batch_stays_out_of_the_batchnorm_re_estimation():
    """A batch that bad files shrank to one image trains as a weight-0 filler of zeros (DDP lockstep); those zeros
    are no training images, so the images kept to re-estimate BatchNorm statistics are the real batches only."""
    from train_pytorch_model.config import TrainConfig

    torch.manual_seed(0)
    real = [torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8) for n in (4, 1, 3)]
    trainer, _ = train_one_epoch_on(real, TrainConfig(epochs=1, image_size=32, precision="fp32",
                                                      bn_recalibration=True))
    assert [len(kept) for kept in trainer.recent] == [4, 3]
    assert all(kept.min() > 0 for kept in trainer.recent)


@pytest.mark.slow
def test_decode_gpu_with_a_validation_cache_decodes_validation_once_on_the_cpu(tmp_path, make_image_folder,
                                                                               resnet18_dir):
    """The cache keeps decoded images; `--decode gpu` batches hold JPEG bytes. With both, the validation set is
    decoded once by the CPU path and replayed, and training still decodes on the device."""
    data = make_image_folder("data", {"a": 4, "b": 4}, suffix=".jpg")
    out = tmp_path / "out"
    assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(data),
                 "--validation-data", str(data), "--trained-model", str(out), "--epochs", "2", "--image-size", "32",
                 "--batch-size", "4", "--num-workers", "1", "--decode", "gpu", "--cache-validation", "true",
                 "--patience", "0"]) == 0
    training = json.loads((out / "training_info.json").read_text())["training"]
    assert training["decode"] == "gpu" and training["cache_validation"] is True
    assert len(read_metrics(out)) == 2


def test_any_documented_seed_trains_up_to_2_pow_63_minus_1(tmp_path, make_image_folder, resnet18_dir):
    """--random-seed 2000000 overflowed the per-sample augmentation seed (UnexpectedError after reading the data)."""
    from train_pytorch_model.data import sample_seed

    assert sample_seed(1, 2, 3) == (1 * 1_000_003 + 2) * 10_000_019 + 3  # small seeds: the same crops as before
    assert all(0 <= sample_seed(seed, 99, 10**6) < 2**64 for seed in (2_000_000, 2**63 - 1))
    data = make_image_folder("data", {"a": 4, "b": 4})
    assert train(resnet18_dir, data, data, tmp_path / "out", "--epochs", "1", "--random-seed", str(2**63 - 1),
                 "--augmentation", "flip_crop") == 0
    training = json.loads((tmp_path / "out" / "training_info.json").read_text())["training"]
    assert training["random_seed"] == 2**63 - 1
    run = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(training["mlflow_run_id"])
    assert run.info.run_name == "train resnet18 2 classes 1 epoch"  # not "1 epochs"


def test_batchnorm_re_estimation_keeps_a_quarter_of_an_epoch_between_128_and_1024_images():
    """The re-estimation's forward pass costs about a third of a training step per image: on a quarter of the
    epoch's images it costs under a tenth of the epoch (issue 22), with at least 128 images of statistics."""
    from train_pytorch_model.config import TrainConfig
    from train_pytorch_model.train import bn_recalibration_images

    assert [bn_recalibration_images(n) for n in (36, 512, 2048, 100_000)] == [128, 128, 512, 1024]

    batches = [torch.full((16, 3, 8, 8), step, dtype=torch.uint8) for step in range(1, 33)]  # 512 images
    trainer, model = train_one_epoch_on(batches, TrainConfig(epochs=1, image_size=32, batch_size=16,
                                                             precision="fp32", bn_recalibration=True))
    assert [int(kept[0, 0, 0, 0]) for kept in trainer.recent] == list(range(25, 33))  # the last 8 batches: 128
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    trainer.recalibrate_batchnorm(model)
    assert sum(seen) == 128 and model[1].num_batches_tracked == 8

"""The pictures a run shows of itself (issue 25): training curves, the best epoch's validation confusion matrix,
augmented training images; logged to MLflow and written into the trained model folder."""

from __future__ import annotations

import csv
import json
import os

import mlflow
import numpy as np
import torch
from PIL import Image

from train_pytorch_model import reports
from train_pytorch_model.cli import main

FAST = ["--image-size", "32", "--num-workers", "0", "--batch-size", "4"]


def test_a_training_run_writes_and_logs_its_pictures(tmp_path, make_image_folder, resnet18_dir):
    train_dir = make_image_folder("train", {"a": 5, "b": 5, "c": 5})
    valid_dir = make_image_folder("valid", {"a": 3, "b": 2, "c": 2}, seed=1)
    out = tmp_path / "out"
    assert main(["train", "--untrained-model", str(resnet18_dir), "--training-data", str(train_dir),
                 "--validation-data", str(valid_dir), "--trained-model", str(out), "--epochs", "2", *FAST]) == 0
    training = json.loads((out / "training_info.json").read_text())["training"]
    for name in reports.TRAINING_FILES:
        assert (out / name).is_file(), name
    artifacts = {a.path for a in mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
                 .list_artifacts(training["mlflow_run_id"])}
    assert set(reports.TRAINING_FILES) <= artifacts

    # The confusion matrix is the saved (best) epoch's: all 7 validation images, its top-1 on the diagonal.
    with open(out / reports.VALID_CONFUSION_CSV) as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["true label", "a", "b", "c"] and [r[0] for r in rows[1:]] == ["a", "b", "c"]
    matrix = np.array([[int(v) for v in r[1:]] for r in rows[1:]])
    assert matrix.sum(axis=1).tolist() == [3, 2, 2]
    assert np.trace(matrix) / 7 == training["best_valid_top1"]

    # 4 augmented images of each of the 3 classes: a 3x4 grid.
    with Image.open(out / reports.TRAINING_IMAGES_PNG) as mosaic:
        assert mosaic.width > mosaic.height > 300


def test_confusion_helpers_count_pairs_and_pick_the_worst_cells():
    pairs = np.array([[0, 0], [0, 1], [0, 1], [1, 1], [2, 0], [5, 0], [-1, 2]])  # the last two are out of range
    matrix = reports.confusion_from_pairs(pairs, 3)
    assert matrix.tolist() == [[1, 2, 0], [0, 1, 0], [1, 0, 0]]
    assert reports.top_confusions(matrix, ["x", "y", "z"], k=5) == [
        {"true": "x", "predicted": "y", "count": 2, "share": 2 / 3},
        {"true": "z", "predicted": "x", "count": 1, "share": 1.0}]
    assert reports.row_normalized(np.array([[0, 0], [1, 3]])).tolist() == [[0, 0], [0.25, 0.75]]
    big = np.eye(100, dtype=np.int64) * 5
    big[7, 42] = big[42, 7] = big[3, 99] = 1
    assert reports.most_confused_classes(big, 4).tolist() == [3, 7, 42, 99]


def test_a_large_confusion_matrix_draws_only_its_most_confused_classes(tmp_path):
    matrix = np.eye(300, dtype=np.int64) * 3
    labels = [f"class {i}" for i in range(300)]
    reports.plot_confusion_matrix(tmp_path / "big.png", matrix, labels, "300 classes", normalize=True)
    with Image.open(tmp_path / "big.png") as image:
        assert max(image.size) < 2000  # a readable picture, not 300 x 300 cells


def test_checkpoint_keeps_the_best_epochs_predictions():
    from train_pytorch_model.checkpoint import invalid_field

    base = {"identity": {"epochs": 2}, "next_epoch": 1, "cpu_threads": 1, "model": {"w": torch.zeros(1)},
            "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": {}, "ema": None, "best_is_current": True,
            "early_stopping": {"best_loss": 1.0, "best_top1": 0.5, "best_epoch": 0, "bad_epochs": 0,
                               "epochs_seen": 1}, "history": [{}]}
    assert invalid_field({**base, "best_predictions": torch.tensor([[0, 1], [1, 1]])}) is None
    assert invalid_field({**base, "best_predictions": None}) is None
    assert "best_predictions" in invalid_field({**base, "best_predictions": torch.zeros(3)})


def test_class_names_are_drawn_as_written_never_as_tex(tmp_path):
    """A class named like TeX ("$\\foo$" is not valid math text) is a name: every plot draws it as written."""
    import pandas as pd

    labels = ["$\\foo$", "$5$", "cat"]
    matrix = np.array([[3, 1, 0], [0, 2, 1], [1, 0, 4]])
    reports.plot_confusion_matrix(tmp_path / "matrix.png", matrix, labels, "title $x$")
    decisions = pd.DataFrame([[1, 2, 3, 4]] * 3, index=labels,
                             columns=["true positive", "false positive", "false negative", "true negative"])
    reports.plot_label_confusion(tmp_path / "decisions.png", decisions)
    for name in ("matrix.png", "decisions.png"):
        assert Image.open(tmp_path / name).size[0] > 100

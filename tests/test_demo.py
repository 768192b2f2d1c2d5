"""The `make demo` pipeline: its data preparation, and a short run through the same code path."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from train_pytorch_model import demo

pytestmark = pytest.mark.slow  # processes, servers or long runs: in `make test`, not in `make test-fast`


def test_digit_folders_are_stratified_real_digits(tmp_path):
    split = demo.write_digit_folders(tmp_path, per_class=12)
    assert (split["train"], split["valid"], split["test"]) == (84, 12, 24)
    assert 0.0 <= split["svc_accuracy"] <= 1.0
    for name, count in (("train", 84), ("valid", 12), ("test", 24)):
        folders = sorted(p.name for p in (tmp_path / name).iterdir())
        assert folders == [str(d) for d in range(10)], name
        assert sum(len(list((tmp_path / name / d).iterdir())) for d in folders) == count
    # Each PNG is the digit's 8x8 image, its 0..16 levels scaled to 0..255.
    digits = load_digits()
    path = next((tmp_path / "test" / "7").iterdir())
    row = int(path.stem)
    assert digits.target[row] == 7
    with Image.open(path) as image:
        assert image.mode == "L" and image.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(image), np.round(digits.images[row] * 255 / 16).astype(np.uint8))
    # The same seed gives the same split.
    again = demo.write_digit_folders(tmp_path / "again", per_class=12)
    assert sorted(p.name for p in (tmp_path / "again" / "test" / "7").iterdir()) == \
        sorted(p.name for p in (tmp_path / "test" / "7").iterdir())
    assert again == split


def test_output_folder_is_only_cleared_when_the_demo_made_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="was not made by the demo"):
        demo.prepare_output(foreign)
    assert (foreign / "thesis.tex").is_file()
    ours = tmp_path / "demo"
    demo.prepare_output(ours)
    (ours / "old_result").mkdir()
    demo.prepare_output(ours)
    assert sorted(p.name for p in ours.iterdir()) == [demo.MARKER]


def test_short_demo_runs_the_whole_pipeline(tmp_path, capfd):
    out = tmp_path / "demo_output"
    assert demo.main(["--output", str(out), "--per-class", "12", "--epochs", "1"]) == 0
    captured = capfd.readouterr()
    printed = captured.out
    # Training progress reaches the terminal as it happens: per-step lines, not only the epoch summary.
    assert re.search(r"epoch 1/1\s+step \d+/\d+\s+loss", captured.out + captured.err), captured.err[-2000:]
    for command in ("convert --input", "init-model --model-name resnet18", "train --untrained-model",
                    "score --trained-model", "evaluate --scored-data"):
        assert f"$ python -m train_pytorch_model {command}" in printed, command
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["evaluated_rows"] == metrics["rows"] == 24
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["classes"] == [str(d) for d in range(10)]
    assert f"Test accuracy (resnet18, 24 held-out images): {metrics['accuracy']:.2%}" in printed
    for path in ("train_images/_meta.yaml", "untrained_model/model", "trained_model/MLmodel",
                 "trained_model/training_curves.png", "trained_model/metrics.csv", "scored/scored.csv",
                 "evaluation/confusion_matrix.png", "evaluation/report.html"):
        assert (out / path).is_file(), path
        assert str(out / path.split("/")[0]) in printed or path.startswith(("train_images", "untrained")), path
    # It ends with the report a newcomer opens: its absolute path is the last line.
    assert printed.strip().splitlines()[-1].endswith(str((out / "evaluation" / "report.html").resolve()))
    # Training curves and metrics reach MLflow too (the demo uses the store the environment names).
    run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.mlflow.runName LIKE 'train %'",
                             output_format="list")[0]
    assert "training_curves.png" in [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "valid_top1")) == 1

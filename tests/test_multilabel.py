"""Multi-label classification (issue 24): label-set data, sigmoid/BCE training, its metrics, named refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from conftest import MULTILABEL_CLASSES, SHARED_FIXTURES, write_image_folder, write_multilabel_mltable
from train_pytorch_model import multilabel_metrics
from train_pytorch_model.cli import main
from train_pytorch_model.config import TrainConfig
from train_pytorch_model.errors import InvalidParameterError, SingleLabelFormatError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.tables import write_mltable
from train_pytorch_model.tasks import MultiClass, MultiLabel, resolve_task

UNTRAINED = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"


def train_argv(data: Path, out: Path, *flags: str) -> list[str]:
    """The five designer parameters at their defaults (epochs aside), tiny images, no workers."""
    return ["train", "--untrained-model", str(UNTRAINED), "--training-data", str(data), "--trained-model", str(out),
            "--epochs", "2", "--batch-size", "16", "--learning-rate", "0.001", "--random-seed", "1",
            "--patience", "3", "--image-size", "32", "--num-workers", "0", *flags]


# --- data ---------------------------------------------------------------------------------------------


def test_an_automl_multilabel_mltable_reads_as_label_sets(tmp_path):
    directory = load_image_directory(write_multilabel_mltable(tmp_path / "ml"), "Training")
    assert directory.is_multilabel and directory.categories == sorted(MULTILABEL_CLASSES)
    rows = [json.loads(line) for line in (tmp_path / "ml" / "images.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        assert directory.files[i] == row["image_url"]
        assert directory.label_names(i) == sorted(row["label"])  # the empty list is an image with no label
    assert rows[-1]["label"] == [] and len(directory) == len(rows)


def test_label_lists_as_json_text_in_a_csv_and_as_a_parquet_list_column(tmp_path):
    import pandas as pd

    write_image_folder(tmp_path / "img", {"a": 2, "b": 1})
    files = ["img/a/0.png", "img/a/1.png", "img/b/0.png"]
    labels = [["a"], ["b", "a"], []]
    with open(tmp_path / "t.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_path", "label"])
        writer.writerows([(f, json.dumps(label)) for f, label in zip(files, labels)])
    pd.DataFrame({"image": files, "label": labels}).to_parquet(tmp_path / "t.parquet")
    for table in ("t.csv", "t.parquet"):
        directory = load_image_directory(tmp_path / table, "Training")
        assert directory.is_multilabel, table
        assert [directory.label_names(i) for i in range(3)] == [["a"], ["a", "b"], []], table


def test_a_table_turns_multilabel_at_its_first_list_row(tmp_path):
    write_image_folder(tmp_path, {"a": 2, "b": 2})
    write_mltable(tmp_path, iter([("a/0.png", "b"), ("a/1.png", "a"), ("b/0.png", ["a", "b"]), ("b/1.png", None)]))
    directory = load_image_directory(tmp_path, "Training")
    assert [directory.label_names(i) for i in range(len(directory))] == [["b"], ["a"], ["a", "b"]]


def test_the_task_is_detected_and_forced_by_name(tmp_path, make_image_folder):
    multi = load_image_directory(write_multilabel_mltable(tmp_path / "ml"), "Training")
    folder = load_image_directory(make_image_folder("folder", {"a": 2, "b": 2}), "Training")
    assert isinstance(resolve_task("auto", multi, None), MultiLabel)
    assert isinstance(resolve_task("auto", folder, None), MultiClass)
    with pytest.raises(SingleLabelFormatError, match="label lists.*--task multilabel"):
        resolve_task("multiclass", multi, None).prepare(multi, "Training")
    with pytest.raises(SingleLabelFormatError, match="<class>/<image> folder tree.*one label per image"):
        resolve_task("multilabel", folder, None).prepare(folder, "Training")
    with pytest.raises(SingleLabelFormatError, match="designer ImageDirectory"):
        MultiLabel().prepare(load_image_directory(SHARED_FIXTURES / "legacy_image_directory"), "Validation")
    # A single-label table forced to multilabel: one-label sets.
    write_mltable(tmp_path / "folder", iter([("a/0.png", "a"), ("b/0.png", "b")]))
    single = MultiLabel().prepare(load_image_directory(tmp_path / "folder", "Training"), "Training")
    assert [single.label_names(i) for i in range(2)] == [["a"], ["b"]]


def test_label_sets_stay_compact(tmp_path):
    directory = load_image_directory(write_multilabel_mltable(tmp_path / "ml", count=64), "Training")
    sets = directory.label_sets
    assert len(sets.offsets) == 65 and len(sets.members) == sum(len(sets[i]) for i in range(64))
    assert sets.offsets.itemsize == 8 and sets.members.itemsize <= 8  # flat integer arrays, no per-row objects


# --- training pieces --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, name", [
    ({"mixup": 0.2}, "Mixup"), ({"cutmix": 1.0}, "Cutmix"), ({"class_weights": "balanced"}, "Class weights"),
    ({"early_stopping_metric": "valid_top1"}, "Early stopping metric"),
])
def test_what_multilabel_cannot_do_is_refused_by_name(flags, name):
    with pytest.raises(InvalidParameterError, match=name):
        MultiLabel().check_config(TrainConfig(**flags))
    with pytest.raises(InvalidParameterError, match="Positive class weights"):
        MultiClass().check_config(TrainConfig(positive_class_weights="balanced"))


def test_bce_loss_label_smoothing_and_positive_weights(tmp_path):
    task = MultiLabel()
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    expected = torch.nn.BCEWithLogitsLoss()(logits, targets)
    assert torch.allclose(task.loss(logits, targets, None, 0.0), expected)
    smoothed = torch.nn.BCEWithLogitsLoss()(logits, torch.tensor([[0.95, 0.05, 0.95]]))
    assert torch.allclose(task.loss(logits, targets, None, 0.1), smoothed)
    assert task.correct(torch.tensor([[1.0, -1.0, 0.5], [1.0, 1.0, 1.0]]), targets.repeat(2, 1)).item() == 1
    directory = load_image_directory(write_multilabel_mltable(tmp_path / "ml", count=8), "Training")
    from train_pytorch_model.data import class_targets

    targets = class_targets(directory, {c: i for i, c in enumerate(directory.categories)})
    weights = task.loss_weights(TrainConfig(positive_class_weights="balanced"), targets, 4)
    positives = np.array(directory.label_sets.counts(4))
    assert np.allclose(weights.numpy(), (8 - positives) / positives)
    assert targets[1].tolist() == [1.0, 1.0, 0.0, 0.0]  # image 1: can, carton


def test_the_metrics_are_automls_at_threshold_half():
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    probs = np.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.6], [0.7, 0.6, 0.1], [0.2, 0.1, 0.3]])
    m = multilabel_metrics.summary(truth, probs)
    # predicted sets: {0}, {1,2}, {0,1}, {} -> Jaccard 1/2, 1/2, 1, 1 (empty vs empty)
    assert m["iou"] == pytest.approx(0.75)
    assert m["exact_match"] == pytest.approx(0.5)
    # micro: tp 4, fp 1, fn 1 -> F1 0.8; macro: class F1s 1, 1, 0
    assert m["f1_micro"] == pytest.approx(0.8)
    assert m["f1_macro"] == pytest.approx(2 / 3)
    # AP: classes 0 and 1 rank their positives first (1, 1); class 2's positive (0.4) ranks 2nd of 4 (AP 1/2)
    assert m["map"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_the_validation_pass_sums_what_the_metrics_need_and_nothing_that_grows_with_the_images():
    """Training's validation (tasks.LabelSetValidation) keeps per-class sums, not every image's probabilities:
    IoU, F1 and exact match equal scikit-learn's on the whole set; AP is scikit-learn's on the logits rounded
    to their histogram bin, and within a hair of the exact AP."""
    from sklearn.metrics import average_precision_score

    from train_pytorch_model.distributed import Context
    from train_pytorch_model.tasks import LabelSetValidation

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(257, 7, generator=generator) * 3
    targets = (torch.rand(257, 7, generator=generator) < 0.3).float()
    targets[:, 6] = 0  # a class no image has: left out of mAP, F1 0
    logits[:5] = 40.0  # beyond the histogram's range: ties at its top
    validation = LabelSetValidation(7, torch.device("cpu"))
    state = (validation.sums, validation.decisions, validation.histogram)
    sizes = [t.numel() for t in state]
    for start in range(0, 257, 50):
        validation.add(logits[start:start + 50], targets[start:start + 50])
    assert [t.numel() for t in state] == sizes  # the same few tensors, whatever the number of images
    result = validation.result(Context(torch.device("cpu")))

    truth = targets.numpy() > 0.5
    exact = multilabel_metrics.summary(truth, logits.sigmoid().numpy())
    for name in ("iou", "f1_micro", "f1_macro", "exact_match"):
        assert result[name] == pytest.approx(exact[name], abs=1e-12), name
    bins = multilabel_metrics.score_bins(logits, validation.bins).numpy()
    rounded = np.mean([average_precision_score(truth[:, k], bins[:, k]) for k in range(6)])
    assert result["map"] == pytest.approx(rounded, abs=1e-12)
    assert result["map"] == pytest.approx(exact["map"], abs=1e-3) and result["map"] != exact["map"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).mean()
    assert result["loss"] == pytest.approx(float(loss), rel=1e-6)
    # No image (a rank's share can be empty): the pass says so rather than dividing by zero.
    assert LabelSetValidation(7, torch.device("cpu")).result(Context(torch.device("cpu")))["loss"] == float("inf")


def test_the_validation_histogram_stays_bounded_for_many_classes():
    """2,048 bins a class (1/64 of a logit) up to 4,096 classes; past that fewer, so the histogram stays within
    HISTOGRAM_CELLS (64 MiB of int32) up to 131,072 classes, more than MAX_CLASSES allows."""
    from train_pytorch_model.categories import MAX_CLASSES

    assert multilabel_metrics.histogram_bins(4) == multilabel_metrics.histogram_bins(4096) == 2048
    for classes in (4097, 20_000, MAX_CLASSES):
        bins = multilabel_metrics.histogram_bins(classes)
        assert 64 <= bins < 2048 and 2 * classes * bins <= multilabel_metrics.HISTOGRAM_CELLS
    edges = multilabel_metrics.score_bins(torch.tensor([-100.0, -16.0, 0.0, 15.99, 16.0, 100.0]), 2048)
    assert edges.tolist() == [0, 0, 1024, 2047, 2047, 2047]
    assert 0 <= int(multilabel_metrics.score_bins(torch.tensor([float("nan")]), 2048)) < 2048


# --- end to end -------------------------------------------------------------------------------------------


def test_a_multilabel_mltable_trains_at_the_designer_defaults(tmp_path):
    data = write_multilabel_mltable(tmp_path / "ml", count=24)
    out = tmp_path / "model"
    assert main(train_argv(data, out, "--validation-data", str(data), "--positive-class-weights", "balanced")) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["task"] == "multilabel" and info["threshold"] == 0.5 and "validation_split" not in info
    assert info["classes"] == sorted(MULTILABEL_CLASSES)
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and "valid_top1" not in rows[0]
    for column in ("valid_iou", "valid_f1_micro", "valid_f1_macro", "valid_map", "valid_exact_match"):
        assert 0.0 <= float(rows[-1][column]) <= 1.0, column
    assert info["training"]["best_valid_iou"] == pytest.approx(float(rows[info["training"]["best_epoch"] - 1]
                                                                     ["valid_iou"]))
    run = mlflow.get_run(info["training"]["mlflow_run_id"])
    assert {"valid_iou", "valid_f1_micro", "valid_f1_macro", "valid_map", "valid_exact_match"} <= set(run.data.metrics)
    assert run.data.params["task"] == "multilabel"  # what ran, not the flag's auto (issue 20: one settle step)


def test_a_forced_multiclass_run_on_label_lists_fails_by_name(tmp_path, capsys):
    data = write_multilabel_mltable(tmp_path / "ml", count=8)
    assert main(train_argv(data, tmp_path / "model", "--task", "multiclass")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("SingleLabelFormatError: ")
    assert not (tmp_path / "model").exists()


# --- outputs: score, evaluate, the MLflow model, export -----------------------------------------------------


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory):
    """A multi-label model trained without validation data (a recorded split), and its data."""
    root = tmp_path_factory.mktemp("multilabel")
    data = write_multilabel_mltable(root / "ml", count=24)
    out = root / "model"
    assert main(train_argv(data, out, "--mlflow-tracking-uri", f"sqlite:///{root / 'mlflow.db'}")) == 0
    return out, data


@pytest.mark.slow
def test_score_and_evaluate_a_multilabel_model(multilabel_model, tmp_path):
    import pandas as pd

    model, data = multilabel_model
    info = json.loads((model / "training_info.json").read_text())
    assert info["validation_split"]["validation_images"] == 5 and info["task"] == "multilabel"
    scored = tmp_path / "scored"
    assert main(["score", "--trained-model", str(model), "--image-directory", str(data), "--scored-data",
                 str(scored), "--num-workers", "0"]) == 0
    table = pd.read_parquet(scored / "scored.parquet")
    probabilities = table[[f"Scored Probabilities_{c}" for c in sorted(MULTILABEL_CLASSES)]].to_numpy()
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # one sigmoid per class, not a softmax
    for row, (cell, probs) in enumerate(zip(table["Scored Labels"], probabilities)):
        assert json.loads(cell) == [c for c, p in zip(sorted(MULTILABEL_CLASSES), probs) if p >= 0.5], row
    rows = [json.loads(line) for line in (data / "images.jsonl").read_text().splitlines()]
    assert [json.loads(c) for c in table["category"]] == [sorted(r["label"]) for r in rows]
    csv_table = pd.read_csv(scored / "scored.csv", dtype=str, keep_default_na=False)
    assert list(csv_table["Scored Labels"]) == list(table["Scored Labels"])

    # A lower threshold predicts supersets.
    low = tmp_path / "low"
    assert main(["score", "--trained-model", str(model), "--image-directory", str(data), "--scored-data", str(low),
                 "--num-workers", "0", "--threshold", "0.1"]) == 0
    low_table = pd.read_parquet(low / "scored.parquet")
    assert all(set(json.loads(a)) <= set(json.loads(b)) for a, b in zip(table["Scored Labels"],
                                                                        low_table["Scored Labels"]))

    for source in (scored, scored / "scored.csv"):  # the CSV has no metadata: its list cells say multi-label
        evaluation = tmp_path / f"evaluation-{source.name}"
        assert main(["evaluate", "--scored-data", str(source), "--evaluation", str(evaluation)]) == 0
        metrics = json.loads((evaluation / "metrics.json").read_text())
        assert metrics["task"] == "multilabel" and metrics["evaluated_rows"] == 24
        # The threshold score used, where the table recorded it (Parquet); a CSV does not, and none is guessed.
        report = (evaluation / "report.html").read_text()
        if source == scored:
            assert metrics["threshold"] == 0.5 and "probability reaches 0.5." in report
        else:
            assert metrics["threshold"] is None and "does not record the threshold" in report
        truth = np.array([[c in r["label"] for c in sorted(MULTILABEL_CLASSES)] for r in rows])
        expected = multilabel_metrics.summary(truth, probabilities)
        assert metrics["iou"] == pytest.approx(expected["iou"]) and metrics["map"] == pytest.approx(expected["map"])
        assert metrics["accuracy"] == pytest.approx(expected["exact_match"])
        assert metrics["micro"]["f1"] == pytest.approx(expected["f1_micro"])
        assert metrics["macro"]["f1"] == pytest.approx(expected["f1_macro"])
        assert set(metrics["per_class"]) == set(MULTILABEL_CLASSES)
        assert {"precision", "recall", "f1", "average_precision", "support"} == set(metrics["per_class"]["can"])
        per_class = pd.read_csv(evaluation / "per_class_metrics.csv")
        assert list(per_class["support"]) == [int(truth[:, i].sum()) for i in range(4)]
        assert (evaluation / "confusion_matrix.png").is_file()


def test_the_mlflow_model_returns_label_sets_with_an_overridable_threshold(multilabel_model):
    import pandas as pd

    model, data = multilabel_model
    images = pd.DataFrame({"image": [(data / "images" / f"{n}.png").read_bytes() for n in range(6)]})
    loaded = mlflow.pyfunc.load_model(str(model))
    result = loaded.predict(images)
    columns = [f"Scored Probabilities_{c}" for c in sorted(MULTILABEL_CLASSES)]
    probabilities = result[columns].to_numpy()
    assert list(result.columns) == ["Scored Labels", *columns]
    assert [json.loads(c) for c in result["Scored Labels"]] == \
        [[c for c, p in zip(sorted(MULTILABEL_CLASSES), row) if p >= 0.5] for row in probabilities]
    everything = loaded.predict(images, params={"threshold": 0.0})
    assert all(json.loads(c) == sorted(MULTILABEL_CLASSES) for c in everything["Scored Labels"])
    nothing = mlflow.pyfunc.load_model(str(model), model_config={"threshold": 1.0}).predict(images)
    assert all(json.loads(c) == [c2 for c2, p in zip(sorted(MULTILABEL_CLASSES), row) if p >= 1.0]
               for c, row in zip(nothing["Scored Labels"], nothing[columns].to_numpy()))
    assert loaded.metadata.metadata["task"] == "multilabel" and loaded.metadata.metadata["threshold"] == 0.5
    assert "threshold" in [p["name"] for p in loaded.metadata.get_params_schema().to_dict()]


@pytest.mark.slow
def test_export_keeps_parity_with_a_sigmoid(multilabel_model, tmp_path):
    import onnxruntime
    import pandas as pd

    from train_pytorch_model.model_directory import read_trained_model_directory
    from train_pytorch_model.preprocessing import decode_image

    model, data = multilabel_model
    out = tmp_path / "exported"
    assert main(["export", "--trained-model", str(model), "--output", str(out), "--format", "onnx"]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["task"] == "multilabel" and info["threshold"] == 0.5 and "sigmoid" in info["output"]
    files = [data / "images" / f"{n}.png" for n in range(5)]
    trained = read_trained_model_directory(model)
    transform = trained.preprocessing.eval_transform()
    batch = torch.stack([transform(decode_image(f, trained.preprocessing.resize_size)) for f in files])
    expected = mlflow.pyfunc.load_model(str(model)).predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"images": batch.numpy()})[0]
    want = expected[[f"Scored Probabilities_{c}" for c in sorted(MULTILABEL_CLASSES)]].to_numpy()
    assert np.abs(got - want).max() <= 1e-4

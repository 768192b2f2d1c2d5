"""`evaluate`: scored table with true labels -> metrics, confusion matrix (numbers and PNG), MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_fscore_support

from conftest import free_port
from train_pytorch_model.cli import main
from train_pytorch_model.evaluate import evaluate_table

NAN = float("nan")


def scored_table(classes, rows) -> pd.DataFrame:
    """rows: (true label, scored label, probabilities, error) as `score` writes them."""
    table = pd.DataFrame({
        "id": range(len(rows)), "file": [f"image/{i}.png" for i in range(len(rows))],
        "category": [r[0] for r in rows], "Scored Labels": [r[1] for r in rows],
    })
    for j, name in enumerate(classes):
        table[f"Scored Probabilities_{name}"] = [r[2][j] for r in rows]
    table["error"] = [r[3] for r in rows]
    return table


HAND_MADE = scored_table(["a", "b", "c"], [
    ("a", "a", (0.7, 0.2, 0.1), ""),
    ("a", "b", (0.3, 0.6, 0.1), ""),
    ("b", "b", (0.1, 0.8, 0.1), ""),
    ("c", "a", (0.5, 0.1, 0.4), ""),
    ("c", "c", (0.1, 0.1, 0.8), ""),
    ("z", "a", (0.6, 0.3, 0.1), ""),  # a label the model does not know
    ("b", None, (NAN, NAN, NAN), "UnidentifiedImageError: cannot identify image file"),
    (None, "a", (0.9, 0.05, 0.05), ""),  # unlabeled row
])


def test_metrics_of_a_hand_made_table():
    metrics, confusion = evaluate_table(HAND_MADE, "category", [1, 2, 3, 5])
    counts = (metrics["rows"], metrics["evaluated_rows"], metrics["unscored_rows"], metrics["unlabeled_rows"])
    assert counts == (8, 6, 1, 1)
    assert metrics["classes"] == ["a", "b", "c"] and metrics["labels_unknown_to_model"] == ["z"]
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["top_k_accuracy"] == pytest.approx({"1": 3 / 6, "2": 5 / 6, "3": 5 / 6})  # k=5 > 3 classes: left out
    assert list(metrics["per_class"]) == ["a", "b", "c", "z"]
    per_class = [(m["precision"], m["recall"], m["f1"], m["support"]) for m in metrics["per_class"].values()]
    expected = [(1 / 3, 1 / 2, 0.4, 2), (1 / 2, 1, 2 / 3, 1), (1, 1 / 2, 2 / 3, 2), (0, 0, 0, 1)]
    for got, want in zip(per_class, expected):
        assert got == pytest.approx(want)
    # Macro and weighted averages agree with scikit-learn's own on the evaluated rows.
    y_true, y_pred = ["a", "a", "b", "c", "c", "z"], ["a", "b", "b", "a", "c", "a"]
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        got = (metrics[average]["precision"], metrics[average]["recall"], metrics[average]["f1"])
        assert got == pytest.approx((p, r, f))
    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.7, 0.3, 0.8, 0.4, 0.8])))
    assert list(confusion.index) == list(confusion.columns) == ["a", "b", "c", "z"]
    assert confusion.to_numpy().tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]]


def digits_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    classes = [str(d) for d in range(10)]
    rows = []
    for i in range(60):
        true = classes[i % 10]
        p = rng.dirichlet(np.ones(10))
        if i % 4:  # three in four right
            p[int(true)] += 2
            p /= p.sum()
        rows.append((true, classes[int(p.argmax())], tuple(p), ""))
    return scored_table(classes, rows)


@pytest.mark.slow
def test_cli_writes_metrics_files_and_logs_to_mlflow(tmp_path, capsys):
    table = digits_table()
    (tmp_path / "scored").mkdir()
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    table.to_csv(tmp_path / "scored.csv", index=False)
    out = tmp_path / "evaluation"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.csv", "confusion_matrix.png",
                                                     "confusion_matrix_normalized.png", "metrics.json",
                                                     "per_class_metrics.csv", "pr_roc_curves.png", "report.html"]
    metrics = json.loads((out / "metrics.json").read_text())
    expected = float((table["category"] == table["Scored Labels"]).mean())
    assert metrics["accuracy"] == pytest.approx(expected) and 0.6 < expected < 0.9
    assert f"Accuracy {expected:.2%}" in printed and "top-3" in printed
    assert set(metrics["top_k_accuracy"]) == {"1", "3", "5"}
    assert metrics["top_k_accuracy"]["1"] <= metrics["top_k_accuracy"]["3"] <= metrics["top_k_accuracy"]["5"]
    confusion = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert confusion.to_numpy().sum() == 60 and np.trace(confusion.to_numpy()) == round(expected * 60)
    per_class = pd.read_csv(out / "per_class_metrics.csv", dtype={"label": str})
    assert list(per_class["label"]) == [str(d) for d in range(10)] and per_class["support"].sum() == 60
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.size[0] >= 400

    # The CSV of the same table gives the same metrics: digit labels stay text.
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored.csv"), "--evaluation", str(tmp_path / "e2")]) == 0
    from_csv = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert from_csv["per_class"].keys() == metrics["per_class"].keys()
    assert from_csv["accuracy"] == metrics["accuracy"] and from_csv["top_k_accuracy"] == metrics["top_k_accuracy"]
    assert from_csv["log_loss"] == pytest.approx(metrics["log_loss"], rel=1e-9)

    # Logged to MLflow (the job's run in Azure ML; here the test's sqlite store).
    runs = mlflow.search_runs(search_all_experiments=True,
                              filter_string="tags.mlflow.runName = 'evaluate 60 images, 10 classes'")
    assert len(runs) == 2
    assert runs["metrics.accuracy"].tolist() == pytest.approx([expected, expected])
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs["run_id"][0], "evaluation")]
    assert "evaluation/confusion_matrix.png" in artifacts and "evaluation/metrics.json" in artifacts


@pytest.mark.parametrize("case, error", [
    ("no_labels", "NotLabeledDatasetError: "),
    ("not_scored", "InvalidDatasetError: "),
    ("empty_folder", "InvalidDatasetError: "),
    ("bad_top_k", "InvalidParameterError: "),
    ("nothing_to_evaluate", "InvalidDatasetError: "),
])
def test_errors(tmp_path, capsys, case, error):
    table, extra = digits_table(), []
    if case == "no_labels":
        table = table.drop(columns=["category"])
    elif case == "not_scored":
        table = table[["id", "file", "category"]]
    elif case == "bad_top_k":
        extra = ["--top-k", "0,two"]
    elif case == "nothing_to_evaluate":
        table["category"] = None
    source = tmp_path / "scored"
    source.mkdir()
    if case != "empty_folder":
        table.to_parquet(source / "scored.parquet", index=False)
    assert main(["evaluate", "--scored-data", str(source), "--evaluation", str(tmp_path / "out"), *extra]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(error), line
    assert not (tmp_path / "out").exists()


def test_a_scored_label_that_is_not_a_class_is_refused_by_row(tmp_path, capsys):
    """`score` predicts only its classes; an edited table would otherwise drop out of the matrix silently."""
    table = digits_table()
    table.loc[5, "Scored Labels"] = "banana"
    (tmp_path / "scored").mkdir()
    table.to_csv(tmp_path / "scored" / "scored.csv", index=False)
    out = tmp_path / "out"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("InvalidDatasetError: Row 5: 'Scored Labels' is 'banana', not one of the classes"), line
    assert not out.exists()


@pytest.mark.parametrize("value", ["abc", -1.0, NAN, 1.5, float("inf")])
def test_a_probability_that_is_not_one_is_refused_by_row_and_column(tmp_path, capsys, value):
    table = digits_table().astype({"Scored Probabilities_3": object})
    table.loc[7, "Scored Probabilities_3"] = value
    (tmp_path / "scored").mkdir()
    table.to_csv(tmp_path / "scored" / "scored.csv", index=False)
    out = tmp_path / "out"
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(out)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("InvalidDatasetError: Row 7 (counting from 0) of the scored table, column "
                           "'Scored Probabilities_3'"), line
    assert not out.exists()


def test_metrics_json_is_strict_json(tmp_path):
    table = digits_table()
    (tmp_path / "scored").mkdir()
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(tmp_path / "out")]) == 0

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    json.loads((tmp_path / "out" / "metrics.json").read_text(), parse_constant=refuse)


def test_the_evaluate_run_is_tagged_with_the_training_run_and_back(tmp_path):
    training = mlflow.start_run(run_name="train resnet18 1ep")
    mlflow.end_run()
    table = digits_table()
    table.attrs["train_pytorch_model.training_run_id"] = training.info.run_id  # what `score` records
    (tmp_path / "scored").mkdir()
    table.to_parquet(tmp_path / "scored" / "scored.parquet", index=False)
    assert main(["evaluate", "--scored-data", str(tmp_path / "scored"), "--evaluation", str(tmp_path / "out")]) == 0
    client = mlflow.MlflowClient()
    [evaluation] = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                      filter_string="tags.mlflow.runName LIKE 'evaluate%'")
    assert evaluation.data.tags["train_pytorch_model.training_run_id"] == training.info.run_id
    tags = client.get_run(training.info.run_id).data.tags
    assert tags["train_pytorch_model.evaluation_run_id"] == evaluation.info.run_id


@pytest.mark.slow
def test_an_unreachable_tracking_server_falls_back_to_a_local_store_in_seconds(tmp_path):
    """Nothing listens on the port: one short probe, a warning, and the run goes to ./mlflow.db (no minutes of
    MLflow's HTTP retries). A real process, so MLflow's own retry settings are the defaults."""
    import subprocess
    import sys
    import time

    port = free_port()  # nothing listens there
    digits_table().to_parquet(tmp_path / "scored.parquet", index=False)
    work = tmp_path / "work"
    work.mkdir()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "train_pytorch_model", "evaluate", "--scored-data",
                             str(tmp_path / "scored.parquet"), "--evaluation", str(tmp_path / "out"),
                             "--mlflow-tracking-uri", f"http://127.0.0.1:{port}"],
                            capture_output=True, text=True, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.monotonic() - started < 120  # generous bound: MLflow's retries alone take about 4 minutes
    assert f"server http://127.0.0.1:{port} is unreachable" in result.stderr
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.metrics["evaluated_rows"] for r in runs] == [60]

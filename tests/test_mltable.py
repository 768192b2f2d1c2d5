"""MLTable folders and CSV/TSV/Parquet/JSONL tables as training inputs (tables.py), written per Azure ML's
documented format: an `MLTable` file with `paths: - file:` and `read_json_lines` + `convert_column_types`
(`image_url` as stream_info), JSON Lines rows `{"image_url": "azureml://.../paths/<dir>/img.jpg", "label": ...}`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.convert import convert
from train_pytorch_model.errors import InvalidDatasetError
from train_pytorch_model.image_directory import load_image_directory

REPO = Path(__file__).resolve().parents[1]
UNTRAINED = REPO / "examples" / "legacy_untrained_model" / "resnet18"
AZUREML = ("azureml://subscriptions/0000/resourcegroups/rg/workspaces/ws/datastores/workspaceblobstore"
           "/paths/{}")
MLTABLE_TEXT = textwrap.dedent("""\
    paths:
      - file: ./train_annotations.jsonl
    transformations:
      - read_json_lines:
          encoding: utf8
          invalid_lines: error
          include_path_column: false
      - convert_column_types:
          - columns: image_url
            column_type: stream_info
    """)


def write_mltable(folder: Path, rows: list[dict], text: str = MLTABLE_TEXT) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "MLTable").write_text(text)
    with open(folder / "train_annotations.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return folder


def labeled_mltable(tmp_path: Path, uri=True) -> Path:
    """A data labeling export: the images under `fridge/<class>/`, the MLTable beside them."""
    folder = tmp_path / "mltable"
    write_image_folder(folder / "fridge", {"can": 4, "milk": 4}, size=(32, 32))
    rows = []
    for name in sorted(os.listdir(folder / "fridge")):
        for image in sorted(os.listdir(folder / "fridge" / name)):
            # The datastore path has one more folder ("data/") than the mounted input: it is found and dropped.
            path = f"data/fridge/{name}/{image}"
            rows.append({"image_url": AZUREML.format(path) if uri else f"fridge/{name}/{image}",
                         "image_details": {"format": "png", "width": "32px", "height": "32px"}, "label": name})
    return write_mltable(folder, rows)


def labeled_csv(tmp_path: Path, name="labels.csv", delimiter=",", header=("image_path", "label")) -> Path:
    folder = tmp_path / "table"
    write_image_folder(folder / "images", {"cat": 4, "dog": 4}, size=(32, 32))
    with open(folder / name, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        for label in ("dog", "cat"):
            for image in sorted(os.listdir(folder / "images" / label)):
                writer.writerow([f"images/{label}/{image}", label])
    return folder


# --- reading ---------------------------------------------------------------------------------------------


def test_mltable_with_azureml_uris_resolves_inside_the_mounted_folder(tmp_path):
    folder = labeled_mltable(tmp_path)
    directory = load_image_directory(folder, "Training")
    assert directory.layout == "mltable"
    assert directory.categories == ["can", "milk"]
    assert len(directory) == 8 and all(directory.path(i).is_file() for i in range(8))
    assert directory.files[0] == "fridge/can/0.png"
    assert [directory.categories[label] for label in directory.labels] == ["can"] * 4 + ["milk"] * 4
    # The MLTable file itself is an accepted input too.
    assert load_image_directory(folder / "MLTable", "Training").files == directory.files


def test_mltable_with_relative_and_https_urls(tmp_path):
    folder = labeled_mltable(tmp_path, uri=False)
    assert load_image_directory(folder, "Training").categories == ["can", "milk"]
    for url in ("https://acct.blob.core.windows.net/container/fridge/can/0.png?sv=2024&sig=x",
                "azureml://datastores/workspaceblobstore/paths/fridge/can/0.png",
                "wasbs://container@acct.blob.core.windows.net/fridge/can/0.png",
                "abfss://fs@acct.dfs.core.windows.net/fridge/can/0.png",
                "AmlDatastore://fridge/can/0.png", "./fridge/can/0.png",
                "azureml://datastores/d/paths/fridge/can/%30.png"):
        write_mltable(folder, [{"image_url": url, "label": "can"}])
        assert load_image_directory(folder, "Training").files == ["fridge/can/0.png"], url


@pytest.mark.parametrize("row, expected", [
    ({"image_url": AZUREML.format("../../etc/passwd"), "label": "a"}, "outside"),
    ({"image_url": "../outside.png", "label": "a"}, "outside"),
    ({"image_url": "/etc/passwd", "label": "a"}, "outside"),
    ({"image_url": AZUREML.format("nowhere/x.png"), "label": "a"}, "not found inside the input folder"),
    ({"image_url": "s3://bucket/x.png", "label": "a"}, "scheme that is not read"),
    ({"image_url": "fridge/can/0.png", "label": {"x": 1}}, "not a category name"),
    ({"image_url": 7, "label": "a"}, "not a file path"),
    ({"image_url": "fridge/can/0.png", "label": "x" * 5000}, "longer than 1024"),
    ({"image_url": "fridge/can/0.png", "label": "bad\udc80name"}, "not valid UTF-8"),
    ({"url": "fridge/can/0.png", "label": "a"}, "no image column"),
])
def test_bad_mltable_rows_are_named_by_line(tmp_path, row, expected):
    folder = labeled_mltable(tmp_path, uri=False)
    good = {"image_url": "fridge/can/1.png", "label": "can"}
    write_mltable(folder, [good, row] if "url" not in row else [row])
    with pytest.raises(InvalidDatasetError, match=expected) as caught:
        load_image_directory(folder, "Training")
    if "url" not in row:
        assert "line 2" in str(caught.value)
    assert len(str(caught.value)) < 1000  # a 5000-character label is quoted, bounded


@pytest.mark.parametrize("text, expected", [
    ("paths: []\n", "needs a 'paths' list"),
    ("paths:\n  - folder: ./\ntransformations:\n  - read_json_lines: {}\n", "paths entry"),
    ("paths:\n  - file: ./train_annotations.jsonl\ntransformations:\n  - take: 5\n", "'take' is not supported"),
    ("paths:\n  - file: ./train_annotations.jsonl\n", "no read transformation"),
    ("paths:\n  - file: ../x.jsonl\ntransformations:\n  - read_json_lines: {}\n", "not found inside"),
    ("a: &a [1, 2]\nb: *a\n", "anchor or alias"),
    ("paths:\n  - file: ./train_annotations.jsonl\ntransformations:\n  - read_json_lines: {encoding: latin1}\n",
     "encoding"),
])
def test_bad_mltable_files_are_named_errors(tmp_path, text, expected):
    folder = labeled_mltable(tmp_path, uri=False)
    (folder / "MLTable").write_text(text)
    with pytest.raises(InvalidDatasetError, match=expected):
        load_image_directory(folder, "Training")


def test_csv_tsv_parquet_and_jsonl_tables(tmp_path):
    folder = labeled_csv(tmp_path)
    directory = load_image_directory(folder, "Training")
    assert directory.layout == "table" and directory.categories == ["cat", "dog"]
    assert directory.files[0] == "images/dog/0.png" and directory.categories[directory.labels[0]] == "dog"
    # The table file itself as input; TSV; custom column names.
    assert load_image_directory(folder / "labels.csv", "Training").files == directory.files
    (folder / "labels.csv").unlink()
    tsv = labeled_csv(tmp_path, "labels.tsv", "\t", header=("picture", "species"))
    with pytest.raises(InvalidDatasetError, match="no image column"):
        load_image_directory(tsv, "Training")
    named = load_image_directory(tsv, "Training", image_column="picture", label_column="species")
    assert named.files == directory.files and list(named.labels) == list(directory.labels)
    (tsv / "labels.tsv").unlink()
    pq.write_table(pa.table({"path": directory.files, "class": [directory.categories[i] for i in directory.labels]}),
                   folder / "labels.parquet", row_group_size=3)
    parquet = load_image_directory(folder, "Training")
    assert parquet.files == directory.files and list(parquet.labels) == list(directory.labels)
    # A second table makes the folder ambiguous: the message says to give the file.
    (folder / "more.csv").write_text("path,label\n")
    with pytest.raises(InvalidDatasetError, match="give the table file itself"):
        load_image_directory(folder, "Training")


def test_a_table_without_label_column_is_unlabeled(tmp_path):
    folder = labeled_csv(tmp_path, header=("file", "note"))
    directory = load_image_directory(folder, "Scoring", keep_unlabeled=True)
    assert directory.categories is None and set(directory.labels) == {-1} and len(directory) == 8


@pytest.mark.parametrize("line, expected", [
    ("images/cat/0.png,cat,extra", "line 3 has 3 fields"),
    ("../secret.png,cat", "line 3: image '../secret.png' points outside"),
    (",cat", "line 3: image '' is not a file path"),
])
def test_bad_csv_rows_are_named_by_line(tmp_path, line, expected):
    folder = tmp_path / "t"
    write_image_folder(folder / "images", {"cat": 1}, size=(32, 32))
    (folder / "labels.csv").write_text(f"path,label\nimages/cat/0.png,cat\n{line}\n")
    with pytest.raises(InvalidDatasetError, match=expected):
        load_image_directory(folder, "Training")


@pytest.mark.slow
def test_a_fifo_as_mltable_or_csv_is_refused_promptly(tmp_path):
    """A named pipe would block a read forever: it is refused before any read, in a real process."""
    for name in ("MLTable", "labels.csv"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        os.mkfifo(folder / name)
        code = f"from train_pytorch_model.image_directory import load_image_directory as l; l({str(folder)!r})"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        assert result.returncode != 0
        assert "InvalidDatasetError" in result.stderr and "not a regular file" in result.stderr


# --- convert, both ways ------------------------------------------------------------------------------------


def test_round_trip_image_folder_to_mltable_to_image_directory(tmp_path):
    source = write_image_folder(tmp_path / "folder", {"a": 3, "b": 2}, size=(32, 32))
    result = convert(source, tmp_path / "as_mltable", to="mltable")
    assert result.categories == ["a", "b"]
    spec = (tmp_path / "as_mltable" / "MLTable").read_text()
    assert "read_json_lines" in spec and "stream_info" in spec
    table = load_image_directory(tmp_path / "as_mltable", "Training")
    assert table.layout == "mltable" and table.categories == ["a", "b"]
    convert(tmp_path / "as_mltable", tmp_path / "back")
    back = load_image_directory(tmp_path / "back", "Training")
    assert back.layout == "meta" and back.categories == ["a", "b"]

    def contents(directory):
        return sorted((directory.categories[directory.labels[i]], directory.path(i).read_bytes())
                      for i in range(len(directory)))
    assert contents(back) == contents(load_image_directory(source, "Training"))
    # An ImageDirectory converts to an MLTable, a CSV to an ImageDirectory.
    convert(tmp_path / "back", tmp_path / "again", to="mltable")
    assert contents(load_image_directory(tmp_path / "again", "Training")) == contents(back)
    folder = labeled_csv(tmp_path)
    convert(folder / "labels.csv", tmp_path / "from_csv")
    assert load_image_directory(tmp_path / "from_csv", "Training").categories == ["cat", "dog"]


def test_convert_skips_unreadable_table_rows_by_name(tmp_path, capsys):
    folder = labeled_csv(tmp_path)
    (folder / "images" / "cat" / "0.png").write_bytes(b"not a png")
    with open(folder / "labels.csv", "a") as handle:
        handle.write("images/cat/missing.png,cat\n")
    result = convert(folder, tmp_path / "out")
    assert len(result.files) == 7
    reasons = dict(result.skipped)
    assert set(reasons) == {"images/cat/0.png", "images/cat/missing.png"}
    assert reasons["images/cat/0.png"].startswith("not a readable image")
    assert reasons["images/cat/missing.png"] == "file not found"


# --- end to end --------------------------------------------------------------------------------------------


def train(data: Path, out: Path) -> int:
    return main(["train", "--untrained-model", str(UNTRAINED), "--training-data", str(data),
                 "--validation-data", str(data), "--trained-model", str(out), "--image-size", "32",
                 "--batch-size", "4", "--epochs", "1", "--num-workers", "0"])


def test_a_labeled_mltable_trains_through_the_cli(tmp_path):
    out = tmp_path / "model"
    assert train(labeled_mltable(tmp_path), out) == 0
    info = json.loads((out / "training_info.json").read_text())
    assert info["classes"] == ["can", "milk"]


def test_a_csv_trains_through_the_cli(tmp_path):
    out = tmp_path / "model"
    assert train(labeled_csv(tmp_path) / "labels.csv", out) == 0
    assert json.loads((out / "training_info.json").read_text())["classes"] == ["cat", "dog"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mltable", "csv"])
def test_mltable_and_csv_train_through_run_component(tmp_path, kind):
    data = labeled_mltable(tmp_path) if kind == "mltable" else labeled_csv(tmp_path)
    out = tmp_path / "trained"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "train_pytorch_model", "run-component", str(REPO / "component.yaml"),
         "--input", f"untrained_model={UNTRAINED}", "--input", f"training_data={data}",
         "--input", f"validation_data={data}", "--output", f"trained_model={out}",
         "--output", f"checkpoints={tmp_path / 'checkpoints'}", "--input", "epochs=1", "--input", "batch_size=4",
         "--input", "image_size=32", "--input", "num_workers=0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "MLmodel").is_file()
    assert len(json.loads((out / "training_info.json").read_text())["classes"]) == 2


def test_sdk_binds_an_mltable_asset_to_the_uri_folder_data_inputs():
    """An input has one type: training_data stays uri_folder (designer ports), and azure-ai-ml accepts an
    mltable data asset bound to it (it mounts as the MLTable's folder)."""
    from azure.ai.ml import Input, load_component
    from azure.ai.ml.dsl import pipeline

    component = load_component(str(REPO / "component.yaml"))

    @pipeline(default_compute="cpu-cluster")
    def job():
        component(untrained_model=Input(type="uri_folder", path="azureml:untrained:1"),
                  training_data=Input(type="mltable", path="azureml:fridge_train_mltable:1"),
                  validation_data=Input(type="mltable", path="azureml://datastores/ds/paths/fridge/valid_mltable/"))

    assert job()._validate().passed
    assert load_component(str(REPO / "components" / "convert.yaml"))._validate().passed


def test_an_mltable_of_two_files_one_without_labels(tmp_path):
    folder = labeled_mltable(tmp_path, uri=False)
    (folder / "more.jsonl").write_text(json.dumps({"image_url": "fridge/can/0.png"}) + "\n")
    (folder / "MLTable").write_text(MLTABLE_TEXT.replace("paths:\n", "paths:\n  - file: ./more.jsonl\n"))
    training = load_image_directory(folder, "Training")
    assert len(training) == 8 and min(training.labels) >= 0
    scoring = load_image_directory(folder, "Scoring", keep_unlabeled=True)
    assert len(scoring) == 9 and list(scoring.labels).count(-1) == 1

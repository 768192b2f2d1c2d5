"""`score`: trained model directory + image directory -> scored table (designer's Score Image Model)."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from train_pytorch_model.cli import main
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.score import score_directory

from conftest import SHARED_FIXTURES, write_image_folder

LEGACY_IMAGES = SHARED_FIXTURES / "legacy_image_directory"
CLASSES = ["cat", "dog", "fox"]
PROBABILITIES = [f"Scored Probabilities_{c}" for c in CLASSES]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """One real training run (1 epoch on the legacy fixture) shared by this module's tests."""
    root = tmp_path_factory.mktemp("trained")
    out = root / "model"
    rc = main(["train", "--untrained-model", str(SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"),
               "--training-data", str(LEGACY_IMAGES), "--validation-data", str(LEGACY_IMAGES),
               "--trained-model", str(out), "--epochs", "1", "--batch-size", "6", "--image-size", "32",
               "--num-workers", "0", "--mlflow-tracking-uri", f"sqlite:///{root / 'mlflow.db'}"])
    assert rc == 0
    return out


def score(model, images, out, *extra) -> int:
    return main(["score", "--trained-model", str(model), "--image-directory", str(images),
                 "--scored-data", str(out), "--num-workers", "0", *extra])


def test_scores_every_image_with_designer_column_names(trained_dir, tmp_path, capsys):
    out = tmp_path / "scored"
    assert score(trained_dir, LEGACY_IMAGES, out) == 0
    assert "Scored 18 of 18 images on cpu" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["scored.csv", "scored.parquet"]
    table = pd.read_parquet(out / "scored.parquet")
    assert list(table.columns) == ["id", "file", "category", "Scored Labels", *PROBABILITIES, "error"]
    assert list(table["id"]) == list(range(18))
    assert list(table["file"]) == [f"image/{i // 6}_{i}.jpg" for i in range(18)]
    assert list(table["category"]) == [c for c in CLASSES for _ in range(6)]
    probabilities = table[PROBABILITIES].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert list(table["Scored Labels"]) == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    assert (table["error"] == "").all()
    # The CSV is the same table.
    csv = pd.read_csv(out / "scored.csv", keep_default_na=False)
    assert list(csv.columns) == list(table.columns)
    np.testing.assert_allclose(csv[PROBABILITIES].to_numpy(), probabilities, rtol=1e-6)
    assert list(csv["Scored Labels"]) == list(table["Scored Labels"])

    # Same numbers as the MLflow model serves for the same files (one preprocessing recipe).
    served = mlflow.pyfunc.load_model(str(trained_dir)).predict(
        pd.DataFrame({"image": [(LEGACY_IMAGES / f).read_bytes() for f in table["file"]]}))
    np.testing.assert_allclose(served[[f"probability_{c}" for c in CLASSES]].to_numpy(), probabilities, atol=1e-5)


def test_batch_size_does_not_change_the_scores(trained_dir):
    trained = read_trained_model_directory(trained_dir)
    directory = load_image_directory(LEGACY_IMAGES)
    one = score_directory(trained, directory, device=torch.device("cpu"), batch_size=1)
    seven = score_directory(trained, directory, device=torch.device("cpu"), batch_size=7, num_workers=1)
    np.testing.assert_allclose(one[PROBABILITIES].to_numpy(), seven[PROBABILITIES].to_numpy(), atol=1e-5)
    assert list(one["Scored Labels"]) == list(seven["Scored Labels"])


def test_unreadable_image_gets_a_row_with_the_reason(trained_dir, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((LEGACY_IMAGES / "image").iterdir())[:4]:
        shutil.copy(path, flat / path.name)
    (flat / "1_10.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "scored"
    assert score(trained_dir, flat, out, "--batch-size", "2") == 0
    assert "1 images could not be read" in capsys.readouterr().out
    table = pd.read_parquet(out / "scored.parquet")
    assert "category" not in table.columns  # a flat folder is not labeled
    bad = table[table["file"] == "1_10.jpg"].iloc[0]
    assert bad["error"] and bad["Scored Labels"] is None and np.isnan(bad[PROBABILITIES].to_numpy(dtype=float)).all()
    good = table[table["file"] != "1_10.jpg"]
    assert len(good) == 4 and (good["error"] == "").all() and good["Scored Labels"].isin(CLASSES).all()


def test_model_without_resize_scores_mixed_sizes(trained_dir, tmp_path):
    # A directory written by the original module has no resize in its recipe (no training_info.json).
    legacy = tmp_path / "legacy_model"
    shutil.copytree(trained_dir, legacy)
    (legacy / "training_info.json").unlink()
    assert read_trained_model_directory(legacy).preprocessing.image_size is None
    images = write_image_folder(tmp_path / "images", {"cat": 2, "dog": 2}, size=(40, 36))
    write_image_folder(tmp_path / "images", {"fox": 2}, size=(33, 47), seed=1)
    out = tmp_path / "scored"
    assert score(legacy, images, out, "--batch-size", "8") == 0
    table = pd.read_parquet(out / "scored.parquet")
    assert len(table) == 6 and (table["error"] == "").all()
    np.testing.assert_allclose(table[PROBABILITIES].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("case, error", [
    ("all_unreadable", "InvalidDatasetError: "),
    ("no_model", "DirectoryNotFoundError: "),
    ("untrained_model", "InvalidModelDirectoryError: "),
    ("bad_batch_size", "InvalidParameterError: "),
])
def test_errors(trained_dir, tmp_path, capsys, case, error):
    model, images, extra = trained_dir, tmp_path / "images", []
    images.mkdir()
    (images / "a.png").write_bytes(b"broken")
    if case != "all_unreadable":
        images = LEGACY_IMAGES
    if case == "no_model":
        model = tmp_path / "missing"
    elif case == "untrained_model":
        model = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"
    elif case == "bad_batch_size":
        extra = ["--batch-size", "0"]
    assert score(model, images, tmp_path / "out", *extra) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(error), line
    assert not (tmp_path / "out").exists()


def test_rows_without_a_label_are_scored_too(trained_dir, tmp_path, legacy_image_dir):
    # Designer scored every row; training leaves unlabeled rows out, scoring must not.
    images = tmp_path / "images"
    shutil.copytree(legacy_image_dir, images)
    rows = (images / "images.lst").read_text().splitlines()
    rows[0] = rows[0].replace('"category": "cat"', '"category": ""')
    (images / "images.lst").write_text("\n".join(rows) + "\n")
    assert score(trained_dir, images, tmp_path / "scored") == 0
    table = pd.read_parquet(tmp_path / "scored" / "scored.parquet")
    assert len(table) == 18
    assert table["category"].isna().sum() == 1 and pd.isna(table["category"][0])
    assert table["Scored Labels"].notna().all()

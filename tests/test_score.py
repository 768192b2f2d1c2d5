"""`score`: trained model directory + image directory -> scored table (designer's Score Image Model)."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHARED_FIXTURES, write_image_folder
from train_pytorch_model.cli import main
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.model_directory import read_trained_model_directory
from train_pytorch_model.score import score_directory

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
    np.testing.assert_allclose(served[PROBABILITIES].to_numpy(), probabilities, atol=1e-5)


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


def test_a_single_image_a_list_of_images_and_an_archive(trained_dir, tmp_path):
    import tarfile
    import zipfile

    images = sorted((LEGACY_IMAGES / "image").iterdir())[:3]
    assert score(trained_dir, images[0], tmp_path / "one") == 0
    one = pd.read_parquet(tmp_path / "one" / "scored.parquet")
    assert list(one["file"]) == [images[0].name] and one["Scored Labels"].isin(CLASSES).all()

    assert main(["score", "--trained-model", str(trained_dir), "--image-directory", *map(str, images),
                 "--scored-data", str(tmp_path / "list"), "--num-workers", "0"]) == 0
    listed = pd.read_parquet(tmp_path / "list" / "scored.parquet")
    assert list(listed["file"]) == [p.name for p in images]
    assert listed["Scored Labels"].iloc[0] == one["Scored Labels"].iloc[0]

    tree = write_image_folder(tmp_path / "tree", {"cat": 2, "dog": 1})
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in sorted(tree.rglob("*.png")):
            archive.write(path, f"dataset/{path.relative_to(tree).as_posix()}")
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        archive.add(tree, "dataset")
    for name in ("images.zip", "images.tar.gz"):
        assert score(trained_dir, tmp_path / name, tmp_path / f"from-{name}") == 0
        table = pd.read_parquet(tmp_path / f"from-{name}" / "scored.parquet")
        assert list(table["file"]) == ["cat/0.png", "cat/1.png", "dog/0.png"]
        assert list(table["category"]) == ["cat", "cat", "dog"] and (table["error"] == "").all()


def test_files_that_are_not_images_are_refused(trained_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    image = next((LEGACY_IMAGES / "image").iterdir())
    assert main(["score", "--trained-model", str(trained_dir), "--image-directory", str(image),
                 str(tmp_path / "notes.txt"), "--scored-data", str(tmp_path / "out")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("InvalidDatasetError: Scoring data") and "notes.txt' is not an image file" in line
    assert score(trained_dir, tmp_path / "notes.txt", tmp_path / "out") == 1  # neither archive nor images
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.split(":")[0] in ("DirectoryNotFoundError", "InvalidDatasetError") and "notes.txt" in line, line
    assert not (tmp_path / "out").exists()


def test_csv_cells_a_spreadsheet_would_run_are_escaped_and_parquet_keeps_them(trained_dir, tmp_path):
    """CSV injection: a class folder named like a formula. The CSV escapes it, evaluate reads it back right."""
    evil = ["=cmd|' -C calc'!A0", "+1", "@sum", "-2", "'quoted"]
    images = write_image_folder(tmp_path / "images", {name: 1 for name in evil})
    assert score(trained_dir, images, tmp_path / "scored") == 0
    table = pd.read_parquet(tmp_path / "scored" / "scored.parquet")
    assert sorted(table["category"]) == sorted(evil)
    raw = pd.read_csv(tmp_path / "scored" / "scored.csv", dtype=str, keep_default_na=False)
    assert sorted(raw["category"]) == sorted("'" + name for name in evil)
    assert not raw["category"].str.match(r"[=+\-@\t\r]").any()
    from train_pytorch_model.evaluate import read_scored_table
    assert sorted(read_scored_table(tmp_path / "scored" / "scored.csv")["category"]) == sorted(evil)


def test_the_scored_table_names_the_training_run(trained_dir, tmp_path):
    import json

    run_id = json.loads((trained_dir / "training_info.json").read_text())["training"]["mlflow_run_id"]
    assert run_id
    assert score(trained_dir, LEGACY_IMAGES, tmp_path / "scored") == 0
    table = pd.read_parquet(tmp_path / "scored" / "scored.parquet")
    assert table.attrs["train_pytorch_model.training_run_id"] == run_id

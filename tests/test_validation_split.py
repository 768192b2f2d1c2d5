"""Validation data optional (issue 24): a stratified, seeded, recorded split of the training images."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pytest

from conftest import SHARED_FIXTURES, write_image_folder, write_multilabel_mltable
from train_pytorch_model.cli import main
from train_pytorch_model.errors import ValidationSplitError
from train_pytorch_model.image_directory import load_image_directory
from train_pytorch_model.tables import write_mltable
from train_pytorch_model.tasks import MultiClass, MultiLabel
from train_pytorch_model.validation_split import split_validation

UNTRAINED = SHARED_FIXTURES / "legacy_untrained_model" / "resnet18"


def split(directory, task, fraction=0.2, seed=1):
    return split_validation(directory, task.stratum(directory), fraction, seed, method="test")


def classes_of(directory):
    return Counter(directory.categories[label] for label in directory.labels)


def test_the_split_is_stratified_disjoint_and_decided_by_the_seed(tmp_path):
    directory = load_image_directory(write_image_folder(tmp_path / "d", {"a": 10, "b": 5, "c": 2}), "Training")
    train, valid, record = split(directory, MultiClass())
    assert classes_of(valid) == {"a": 2, "b": 1, "c": 1}  # a fifth of each class, at least one
    assert classes_of(train) == {"a": 8, "b": 4, "c": 1}
    assert not set(train.files) & set(valid.files)
    assert record["validation_files"] == sorted(valid.files)
    assert record["validation_files_sha256"] == hashlib.sha256("\n".join(sorted(valid.files)).encode()).hexdigest()
    assert (record["training_images"], record["validation_images"], record["seed"]) == (13, 4, 1)
    assert split(directory, MultiClass())[1].files == valid.files  # same seed, same split
    others = [split(directory, MultiClass(), seed=seed)[1].files for seed in range(2, 6)]
    assert any(files != valid.files for files in others)


def test_one_image_in_two_rows_stays_on_one_side(tmp_path):
    write_image_folder(tmp_path, {"a": 4, "b": 4})
    rows = [(f"{c}/{n}.png", c) for c in "ab" for n in range(4)] + [("a/0.png", "a"), ("b/1.png", "b")] * 3
    write_mltable(tmp_path, iter(rows))
    directory = load_image_directory(tmp_path, "Training")
    for seed in range(1, 8):
        train, valid, _ = split(directory, MultiClass(), fraction=0.5, seed=seed)
        assert not set(train.files) & set(valid.files), seed
        assert len(train) + len(valid) == len(directory)


def test_a_class_with_one_image_cannot_be_split(tmp_path):
    directory = load_image_directory(write_image_folder(tmp_path / "d", {"a": 5, "lonely": 1}), "Training")
    with pytest.raises(ValidationSplitError, match="'lonely'.*single image.*--validation-data"):
        split(directory, MultiClass())


def test_a_multilabel_split_keeps_every_label_in_training(tmp_path):
    directory = MultiLabel().prepare(load_image_directory(write_multilabel_mltable(tmp_path / "ml", count=40),
                                                          "Training"), "Training")
    train, valid, record = split(directory, MultiLabel())
    assert not set(train.files) & set(valid.files) and len(train) + len(valid) == 40
    assert all(train.label_sets.counts(4)) and all(valid.label_sets.counts(4))
    assert 6 <= len(valid) <= 10


def test_training_without_validation_data_records_its_split(tmp_path):
    data = write_image_folder(tmp_path / "d", {"a": 6, "b": 6})
    out = tmp_path / "model"
    assert main(["train", "--untrained-model", str(UNTRAINED), "--training-data", str(data), "--trained-model",
                 str(out), "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--num-workers", "0",
                 "--validation-fraction", "0.25"]) == 0
    info = json.loads((out / "training_info.json").read_text())
    record = info["validation_split"]
    assert record["fraction"] == 0.25 and record["seed"] == 1 and record["validation_images"] == 4
    held_out = set(record["validation_files"])
    assert Counter(name.split("/")[0] for name in held_out) == {"a": 2, "b": 2}
    assert info["training"]["validation_images"] == 4 and info["training"]["training_images"] == 8
    directory = load_image_directory(data, "Training")  # the record recreates the split
    assert sorted(split(directory, MultiClass(), fraction=0.25, seed=1)[1].files) == sorted(held_out)

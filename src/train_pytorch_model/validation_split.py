"""Validation data split off the training data, when none is given (AutoML's behaviour; designer required it).

- Stratified: rows are grouped by stratum (multi-class: the class; multi-label: the image's rarest label,
  tasks.py) and each stratum gives `fraction` of its images (rounded, at least one, never all) to validation,
  so every class keeps its share in both sets.
- By image, not by row: rows naming the same file go to the same side, so no image is in both sets.
- Decided by the seed alone (numpy's PCG64 from `--random-seed`): the same data and seed give the same split on
  every rank and every restart. `record` is written to training_info.json: method, fraction, seed, counts, a
  sha256 of the validation file list, and the list itself up to RECORDED_FILES names.
- A class with a single image cannot be in both sets: a named error (ValidationSplitError) says which.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from .errors import ValidationSplitError, quote
from .image_directory import ImageDirectory

RECORDED_FILES = 10_000  # beyond this, the seed and method recreate the split and the sha256 checks it


def split_validation(directory: ImageDirectory, strata: list[int], fraction: float, seed: int, method: str
                     ) -> tuple[ImageDirectory, ImageDirectory, dict]:
    """(training part, validation part, record). `strata[i]` is row i's stratum (-1: images without a label)."""
    if directory.shards is not None:
        raise ValidationSplitError(
            f"Training data '{directory.root}' is a set of Parquet shards, which is not split into training and "
            "validation rows: give --validation-data (e.g. a validation split of the same dataset)."
        )
    rows_of: dict[str, list[int]] = {}
    for row, name in enumerate(directory.files):
        rows_of.setdefault(name, []).append(row)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for name, rows in rows_of.items():
        by_stratum[strata[rows[0]]].append(name)
    check_splittable(directory, rows_of)

    rng = np.random.default_rng(seed)
    held_out: set[str] = set()
    for stratum in sorted(by_stratum):
        names = by_stratum[stratum]
        if len(names) < 2:
            continue  # stays in training: a multi-label stratum's labels have images elsewhere (checked above)
        take = min(len(names) - 1, max(1, round(len(names) * fraction)))
        held_out.update(names[i] for i in rng.permutation(len(names))[:take])

    train_rows = [row for row, name in enumerate(directory.files) if name not in held_out]
    valid_rows = [row for row, name in enumerate(directory.files) if name in held_out]
    valid_files = sorted(held_out)
    record = {
        "method": method, "fraction": fraction, "seed": seed,
        "training_images": len(rows_of) - len(held_out), "validation_images": len(held_out),
        "validation_files_sha256": hashlib.sha256("\n".join(valid_files).encode()).hexdigest(),
    }
    if len(valid_files) <= RECORDED_FILES:
        record["validation_files"] = valid_files
    return directory.subset(train_rows), directory.subset(valid_rows), record


def check_splittable(directory: ImageDirectory, rows_of: dict[str, list[int]]) -> None:
    """Every class needs two images (one for each set); counted by image, not by row."""
    images: dict[str, set[str]] = defaultdict(set)
    for name, rows in rows_of.items():
        for row in rows:
            for category in directory.label_names(row):
                images[category].add(name)
    few = sorted(c for c in directory.categories if 0 < len(images[c]) < 2)
    if few:
        raise ValidationSplitError(
            f"Training data '{directory.root}' cannot be split into training and validation images: class(es) "
            f"{quote(few)} have a single image, which cannot be in both sets. Add images of them, or give "
            "--validation-data."
        )

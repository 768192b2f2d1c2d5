"""`score`: a trained model directory + images -> a table of predictions (designer's
"Score Image Model", spec section 4).

Images: an ImageDirectory (or `<class>/<image>` tree or flat folder, table, MLTable, Parquet shards), a
zip/tar of one, a single image file, or several image files (`--image-directory a.jpg b.png`).

Output folder:
- `scored.parquet` and `scored.csv`, the same table, one row per image in the directory's row
  order: `id`, `file` (path inside the image directory), `category` (the true label, when the
  directory is labeled), `Scored Labels` (the most probable class), one
  `Scored Probabilities_<class>` column per class in the model's class order (designer's column
  names), and `error`: empty, or why the image could not be read. Such a row is kept, with no
  label and empty probabilities, so the table still lists every image. The parquet file's metadata
  names the MLflow run that trained the model (`evaluate` tags its run with it); the CSV escapes
  text that a spreadsheet would run as a formula (`predictions.csv_safe`).
- A multi-label model: `Scored Labels` is the predicted set as JSON list text (`["can", "milk_bottle"]`)
  at the model's threshold (or `--threshold`), each probability its class's own sigmoid; a multi-label
  table's true `category` is its set as JSON list text too. The parquet metadata says so
  (`train_pytorch_model.task`, `train_pytorch_model.threshold`), for `evaluate`.
- with `--explain`: `explanations/<row>.png` per scored image, named in column `explanation`: the
  image as the model saw it (resized and cropped) under a Grad-CAM heat map of what drove the
  predicted class (explain.py).

Images are decoded and resized in DataLoader workers with the model's own evaluation recipe
(`training_info.json`), batched, and run under `torch.inference_mode` on the GPU when present.
Directories trained by the original module have no resize in their recipe; images of different
sizes then run in separate batches instead of failing as they did in designer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
import time
from array import array
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .archives import (
    MAX_EXTRACTED_GIB,
    MAX_EXTRACTED_HELP,
    archive_in,
    extract_archive,
    extracted_bytes_limit,
    space_hint,
)
from .config import auto_or_int
from .data import ImageDataset, default_num_workers, shard_loader
from .distributed import pick_device
from .errors import (
    DirectoryNotFoundError,
    InvalidDatasetError,
    InvalidModelDirectoryError,
    InvalidParameterError,
    TemporaryFolderError,
)
from .explain import explained_images, labels_to_explain, png_bytes
from .image_directory import IMAGE_SUFFIXES, ImageDirectory, default_schema, load_image_directory
from .init_model import parse_bool
from .label_sets import label_set_text
from .legacy_format import read_json
from .model_directory import INFO_FILE, TrainedModel, read_trained_model_directory
from .output_folder import reserved_output, staged_output
from .predictions import (
    ERROR_COLUMN,
    EXPLANATION_COLUMN,
    EXPLANATIONS_DIR,
    LABEL_COLUMN,
    SCORED_CSV,
    SCORED_LABELS,
    SCORED_PARQUET,
    TASK_ATTR,
    THRESHOLD_ATTR,
    TRAINING_RUN_ATTR,
    csv_safe,
    predicted_labels,
    probability_column,
)
from .preprocessing import Preprocessing

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"[\w-]{1,64}", re.ASCII)  # MLflow's hex ids and Azure ML's job names
MAX_SCORE_BATCH = 64
# Input pixels per forward pass when --batch-size is not given: activations grow with the pixels (~140 bytes per
# input pixel for resnet18, more for deeper nets), so 64 images of 512 px, 16 of 1024 px, 1 of 4096 px
# (a 4096-px model at batch 64 needed ~2.3 GB per image, 150 GB a batch).
MAX_BATCH_PIXELS = MAX_SCORE_BATCH * 512 * 512


def default_batch_size(preprocessing: Preprocessing) -> int:
    """The scoring batch for the model's image size, within MAX_BATCH_PIXELS; a legacy recipe without a resize
    (images at their own sizes, scored one shape group at a time) keeps MAX_SCORE_BATCH."""
    size = preprocessing.image_size
    return MAX_SCORE_BATCH if size is None else max(1, min(MAX_SCORE_BATCH, MAX_BATCH_PIXELS // (size * size)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trained-model", required=True, type=Path, help="trained model directory (output of train)")
    parser.add_argument("--image-directory", required=True, type=Path, nargs="+", metavar="PATH",
                        help="images to score: an ImageDirectory, <class>/<image> tree or flat folder, a zip/tar "
                             "of one, or one or more image files")
    parser.add_argument("--scored-data", required=True, type=Path,
                        help=f"output folder (new or empty) for {SCORED_PARQUET} and {SCORED_CSV}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per forward pass (default: {MAX_SCORE_BATCH}, fewer when the model's image size "
                             f"is over 512 px: at most {MAX_BATCH_PIXELS // 2**20} M input pixels per batch)")
    parser.add_argument("--num-workers", default="auto", type=auto_or_int, metavar="auto|N",
                        help="image decoding processes (default %(default)s)")
    parser.add_argument("--image-column", default=None, metavar="NAME", help="image path column of a table input")
    parser.add_argument("--label-column", default=None, metavar="NAME", help="label column of a table input")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--threshold", default=None, type=float,
                        help="multi-label models: a class is in the predicted set when its probability reaches this "
                             "(default: the model's, 0.5)")
    parser.add_argument("--max-extracted-gib", type=float, default=MAX_EXTRACTED_GIB,
                        help="an archive is unpacked to a temporary folder (TMPDIR): " + MAX_EXTRACTED_HELP)
    parser.add_argument("--explain", type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                        help=f"also write a Grad-CAM heat map over each image (what the model looked at for its "
                             f"prediction) as {EXPLANATIONS_DIR}/<row>.png, named in column '{EXPLANATION_COLUMN}'; "
                             "about 3x the scoring time")


def run(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise InvalidParameterError("Batch size", args.batch_size, "must be an integer >= 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise InvalidParameterError("Threshold", args.threshold, "must be a number from 0 to 1")
    max_extracted_bytes = extracted_bytes_limit(args.max_extracted_gib)
    device = pick_device(args.device)
    with reserved_output(args.scored_data, inputs=[args.trained_model, *args.image_directory]):
        trained = read_trained_model_directory(args.trained_model)
        if args.threshold is not None:
            trained.threshold = args.threshold
        workers = default_num_workers(device) if args.num_workers is None else args.num_workers
        started = time.perf_counter()
        columns = dict(image_column=args.image_column, label_column=args.label_column)
        images = images_to_score(args.image_directory, max_extracted_bytes=max_extracted_bytes,
                                 **columns)
        with staged_output(args.scored_data) as stage, images as directory:
            table = score_directory(trained, directory, device=device, num_workers=workers,
                                    batch_size=args.batch_size or default_batch_size(trained.preprocessing),
                                    explain_to=stage / EXPLANATIONS_DIR if args.explain else None)
            table.attrs[TRAINING_RUN_ATTR] = training_run_id(args.trained_model)
            write_table(stage, table)
        seconds = time.perf_counter() - started
    failed = int((table[ERROR_COLUMN] != "").sum())
    print(f"Scored {len(table) - failed} of {len(table)} images on {device} in {seconds:.1f}s "
          f"({len(trained.classes)} classes); table written to {Path(args.scored_data) / SCORED_PARQUET} and .csv")
    if failed:
        print(f"{failed} images could not be read: their rows have an empty '{SCORED_LABELS}' and a reason in "
              f"'{ERROR_COLUMN}'.")
    return 0


@contextmanager
def images_to_score(paths: list[Path], max_extracted_bytes: int = int(MAX_EXTRACTED_GIB * 2**30), **columns):
    """The ImageDirectory for `--image-directory`: a folder, an archive or a folder holding only one
    (archives.archive_in; unpacked to a temporary folder for the duration), or image files."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.exists():
            raise DirectoryNotFoundError(f"Scoring data '{path}' does not exist.")
    single = paths[0] if len(paths) == 1 else None
    archive = archive_in(single) if single is not None else None
    if archive is not None:
        with tempfile.TemporaryDirectory(prefix="score-") as temporary:
            skipped: list[tuple[str, str]] = []
            root = extract_archive(archive, Path(temporary) / "images", max_extracted_bytes, skipped,
                                   _temporary_write_error)
            if skipped:
                log.warning("%d archive members were not extracted, e.g. '%s': %s", len(skipped), *skipped[0])
            yield load_image_directory(root, "Scoring", keep_unlabeled=True, **columns)
    elif single is not None and single.suffix.lower() not in IMAGE_SUFFIXES:  # a folder (or what else it reads)
        yield load_image_directory(single, "Scoring", keep_unlabeled=True, **columns)
    else:
        yield image_files_directory(paths)


def _temporary_write_error(path: Path, exc: OSError) -> TemporaryFolderError:
    return TemporaryFolderError(
        f"Cannot unpack the archive to the temporary folder ('{path}': {exc.strerror or exc}{space_hint(exc)}). "
        "This is the temporary extraction folder, not --scored-data: free space there, point TMPDIR at a "
        "larger disk, or score the unpacked folder."
    )


def image_files_directory(paths: list[Path]) -> ImageDirectory:
    """An unlabeled ImageDirectory of image files, rooted at their common folder."""
    for path in paths:
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            kind = "a folder" if path.is_dir() else "not an image file"
            raise InvalidDatasetError(
                f"Scoring data '{path}' is {kind}: give one folder or archive, or image files with one of the "
                f"extensions {sorted(IMAGE_SUFFIXES)}.")
    real = [Path(os.path.realpath(p)) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in real]))
    files = [p.relative_to(root).as_posix() for p in real]
    return ImageDirectory(root, "flat", files, array("q", range(len(files))), array("l", [-1] * len(files)), None,
                          default_schema(None), None)


def training_run_id(model_dir: Path) -> str | None:
    """The MLflow run that trained the model (`training_info.json` -> training.mlflow_run_id), if recorded."""
    path = Path(model_dir) / INFO_FILE
    info = read_json(path, InvalidModelDirectoryError) if path.is_file() else None
    training = info.get("training") if isinstance(info, dict) else None
    run_id = training.get("mlflow_run_id") if isinstance(training, dict) else None
    return run_id if isinstance(run_id, str) and RUN_ID.fullmatch(run_id) else None


def _keep_items(items):
    """Collate that keeps the per-image tuples: images may differ in size, failures must be kept."""
    return items


@torch.inference_mode()
def score_directory(trained: TrainedModel, directory: ImageDirectory, *, device: torch.device,
                    batch_size: int = 64, num_workers: int = 0, explain_to: Path | None = None) -> pd.DataFrame:
    """The scored table for every row of `directory` (see the module docstring). With `explain_to`, a heat-map
    overlay per scored image is written there as <row>.png, and named in column EXPLANATION_COLUMN."""
    prep = trained.preprocessing
    dataset = ImageDataset(directory, array("l", [0] * len(directory)), prep.eval_transform(), prep.resize_size, seed=0)
    if directory.shards is not None:  # every row once, a row group at a time
        loader = shard_loader(dataset, train=False, batch_size=batch_size, rank=0, world_size=1,
                              num_workers=num_workers, collate_fn=_keep_items, device=device)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_keep_items,
                            num_workers=num_workers, persistent_workers=False, pin_memory=device.type == "cuda")
    model = trained.model.to(device).eval()
    probabilities = np.full((len(directory), len(trained.classes)), np.nan, dtype=np.float32)
    errors = [""] * len(directory)
    explanations = [""] * len(directory)
    if explain_to is not None:
        explain_to.mkdir()
    for items in loader:
        by_shape: dict[tuple, list] = {}
        for image, _target, index, error in items:
            if image is None:
                errors[index] = error or "unreadable image"
                log.warning("Cannot score '%s': %s", directory.files[index], errors[index])
            else:
                by_shape.setdefault(tuple(image.shape), []).append((index, image))
        for group in by_shape.values():
            indices = [index for index, _ in group]
            batch = torch.stack([image for _, image in group]).to(device, non_blocking=True)
            probabilities[indices] = trained.probabilities(model(prep.normalize(batch))).float().cpu().numpy()
            if explain_to is not None:
                targets = labels_to_explain(probabilities[indices], trained.is_multilabel, trained.threshold)
                explain_batch(model, prep, batch, indices, targets, explain_to, explanations, trained.is_multilabel)
    if errors.count("") == 0:
        raise InvalidDatasetError(f"None of the {len(directory)} images in '{directory.root}' could be read; "
                                  f"first: '{directory.files[0]}' ({errors[0]}).")
    table = scored_table(directory, trained.classes, probabilities, errors, trained.is_multilabel, trained.threshold)
    if trained.is_multilabel:
        table.attrs.update({TASK_ATTR: trained.task, THRESHOLD_ATTR: str(trained.threshold)})
    if explain_to is not None:
        table[EXPLANATION_COLUMN] = explanations
    return table


def explain_batch(model, prep, batch: torch.Tensor, indices: list[int], targets: list[list[int]], folder: Path,
                  explanations: list[str], multilabel: bool) -> None:
    """Heat-map PNGs of a batch into `folder`, one per explained class of each row: `<row>.png` (single-label), or
    `<row>_<class index>.png` per predicted label, listed as JSON text (multi-label: see labels_to_explain)."""
    jobs = [(position, label) for position, labels in enumerate(targets) for label in labels]
    pictures = explained_images(model, prep.normalize, batch[torch.tensor([p for p, _ in jobs], dtype=torch.long)],
                                torch.tensor([label for _, label in jobs])) if jobs else []
    names: dict[int, list[str]] = {}
    for (position, label), picture in zip(jobs, pictures):
        name = f"{EXPLANATIONS_DIR}/{indices[position]:06d}" + (f"_{label}" if multilabel else "") + ".png"
        (folder.parent / name).write_bytes(png_bytes(picture))
        names.setdefault(position, []).append(name)
    for position, index in enumerate(indices):
        explanations[index] = json.dumps(names.get(position, [])) if multilabel else names[position][0]


def scored_table(directory: ImageDirectory, classes: list[str], probabilities: np.ndarray,
                 errors: list[str], multilabel: bool = False, threshold: float = 0.5) -> pd.DataFrame:
    columns: dict[str, object] = {"id": np.asarray(directory.ids, dtype=np.int64), "file": list(directory.files)}
    if directory.is_labeled:
        columns[LABEL_COLUMN] = [true_label(directory, row) for row in range(len(directory))]
    scored = np.array([e == "" for e in errors], dtype=bool)
    labels = predicted_labels(np.nan_to_num(probabilities), classes, multilabel, threshold) if len(classes) \
        else [None] * len(errors)
    columns[SCORED_LABELS] = [label if ok else None for label, ok in zip(labels, scored)]
    for index, label in enumerate(classes):
        columns[probability_column(label)] = probabilities[:, index].astype(np.float64)
    columns[ERROR_COLUMN] = errors
    return pd.DataFrame(columns)


def true_label(directory: ImageDirectory, row: int) -> str | None:
    """The `category` cell: the class name, a multi-label row's set as JSON list text, None when unlabeled."""
    if directory.labels[row] < 0:
        return None
    names = directory.label_names(row)
    return label_set_text(names) if directory.is_multilabel else names[0]


def write_table(folder: Path, table: pd.DataFrame) -> None:
    table.to_parquet(folder / SCORED_PARQUET, index=False)  # pandas keeps `table.attrs` in the metadata
    csv_safe(table).to_csv(folder / SCORED_CSV, index=False)

"""ModelDirectory folders: the untrained one we read (spec section 3) and the trained one we
write and read back (spec section 4).

The trained directory is at once a legacy ModelDirectory (`_meta.yaml`, `model_spec.yaml`, the
state dict `model`, `index_to_label.csv`, `_schema.json`, `_samples.json`) and an MLflow model
(`MLmodel`, see `pyfunc.py`). Our own recipe (classes, preprocessing) is in `training_info.json`,
so reading it back never depends on pandas' CSV type guessing.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .categories import MAX_CLASSES, category_list_problem
from .errors import DirectoryEmptyError, DirectoryNotFoundError, InvalidModelDirectoryError, quote
from .input_files import UnreadableInputError, read_input
from .legacy_format import (
    META_FILE,
    dump_json,
    dump_yaml,
    read_json,
    read_meta,
    read_text,
    read_yaml,
    resolves_inside,
    write_text,
)
from .models import (
    FAMILIES,
    MODEL_FAMILY,
    MODEL_NAMES,
    READERS_NOTE,
    TORCHVISION_FAMILY,
    Classifier,
    cpu_state_dict,
    family_of,
    find_cached_weights,
    flag_name_of,
    load_legacy_state,
    load_weights_file,
    preprocessing_defaults,
    pretrained_missing_error,
)
from .multilabel_metrics import DEFAULT_THRESHOLD
from .output_folder import JOURNAL, staged_output, unfinished_publication
from .preprocessing import ImageDecodeError, Preprocessing

log = logging.getLogger(__name__)

SPEC_FILE = "model_spec.yaml"
WEIGHTS_FILE = "model"
LABEL_MAP_FILE = "index_to_label.csv"
INFO_FILE = "training_info.json"
TASKS = ("multiclass", "multilabel")
MODEL_INFO_FILE = "model_info.json"  # untrained directory: architecture, weights source, preprocessing defaults
README_FILE = "README.txt"  # architectures beyond designer's 13: who can read the directory
TASK_TYPE = "MultiClassification"
MAX_SAMPLE_BYTES = 16 * 2**20  # an image copied into _samples.json


@dataclass
class ModelSpec:
    """What a model_spec.yaml says, validated."""

    model_name: str
    pretrained: bool = False
    flag_value: bool = False  # memory_efficient (DenseNet) or zero_init_residual (ResNet)
    num_classes: int | None = None

    @property
    def family(self) -> str:
        return MODEL_FAMILY[self.model_name]

    @property
    def flag_name(self) -> str | None:
        return flag_name_of(self.model_name)

    @property
    def is_designer(self) -> bool:
        """Designer's 13 architectures: the original reads the directory too."""
        return self.family != TORCHVISION_FAMILY

    @property
    def preprocessing_defaults(self) -> dict:
        """The architecture's ImageNet preprocessing (models.preprocessing_defaults), as model_info.json records."""
        return preprocessing_defaults(self.model_name)

    def to_yaml_dict(self, *, is_cuda: bool = False) -> dict:
        module, cls, _, _ = FAMILIES[self.family]
        init_params = {"model_name": self.model_name, "pretrained": self.pretrained}
        if self.flag_name:
            init_params[self.flag_name] = self.flag_value
        if self.num_classes is not None:
            init_params["num_classes"] = self.num_classes
        spec = {
            "flavor": {"name": "pytorch", "serialization_method": "state_dict"},
            "model_file": WEIGHTS_FILE,
            "time_created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f%z"),
            "flavor_extras": {"module": module, "class": cls, "is_cuda": is_cuda, "init_params": init_params},
            "task_type": TASK_TYPE,
        }
        if not self.is_designer:
            spec["readable_by"] = READERS_NOTE
        return spec


# --- reading -----------------------------------------------------------------------------------------------


def _check_folder(path: Path, role: str) -> None:
    if not path.exists():
        raise DirectoryNotFoundError(f"{role} folder '{path}' does not exist.")
    if not path.is_dir():
        raise DirectoryNotFoundError(f"{role} path '{path}' is a file; give the model directory (the folder).")
    if not any(path.iterdir()):
        raise DirectoryEmptyError(f"{role} folder '{path}' is empty.")
    if unfinished_publication(path):
        raise InvalidModelDirectoryError(
            f"{role} folder '{path}' is incomplete: the run writing it was stopped while moving its files in. Run "
            "the command that writes it again (it replaces the incomplete files).")


def read_model_spec(path: Path) -> ModelSpec:
    """Validate `_meta.yaml` + `model_spec.yaml` of a ModelDirectory. Nothing named in them is imported."""
    def invalid(reason: str) -> InvalidModelDirectoryError:
        return InvalidModelDirectoryError(
            f'ModelDirectory "{path}" is invalid: {reason} Create one with '
            "`python -m train_pytorch_model init-model` (or designer's DenseNet/ResNet module)."
        )

    meta = read_meta(path, InvalidModelDirectoryError)
    if meta is None:
        raise invalid(f"{META_FILE} is missing.")
    if meta["type"] != "ModelDirectory":
        raise invalid(f"{META_FILE} says type '{meta['type']}', expected 'ModelDirectory'.")
    if not (path / SPEC_FILE).is_file():
        raise invalid(f"{SPEC_FILE} is missing.")
    spec = read_yaml(path / SPEC_FILE, InvalidModelDirectoryError)
    if not isinstance(spec, dict):
        raise invalid(f"{SPEC_FILE} must be a YAML mapping.")
    if spec.get("file_name"):
        raise invalid("it holds a legacy pickled model, which is never loaded (unsafe). Re-create it.")
    flavor = spec.get("flavor") or {}
    if not isinstance(flavor, dict) or flavor.get("name") != "pytorch" \
            or flavor.get("serialization_method", "state_dict") != "state_dict":
        raise invalid(f"{SPEC_FILE} flavor must be pytorch / state_dict, got {flavor!r}.")
    task = spec.get("task_type", TASK_TYPE)
    if task != TASK_TYPE:
        raise invalid(f"task_type '{task}' is not supported; only {TASK_TYPE}.")
    if spec.get("model_file", WEIGHTS_FILE) != WEIGHTS_FILE:
        raise invalid(f"model_file must be '{WEIGHTS_FILE}', got {spec.get('model_file')!r}.")
    extras = spec.get("flavor_extras")
    if not isinstance(extras, dict) or not isinstance(extras.get("init_params"), dict):
        raise invalid(f"{SPEC_FILE} needs flavor_extras with module, class and init_params.")
    family = family_of(str(extras.get("module", "")), str(extras.get("class", "")))
    params = extras["init_params"]
    # The original's defaults when a legacy spec names no model; ours always names one.
    name = params.get("model_name", {"densenet": "densenet201", "resnet": "resnext101_32x8d"}.get(family))
    allowed = FAMILIES[family][2] or MODEL_NAMES
    if name not in allowed:
        raise invalid(f"{quote(name)} is not a supported {family} architecture; supported: "
                      f"{', '.join(allowed[:13])}{', ...' if len(allowed) > 13 else ''}.")
    flag_name = FAMILIES[family][3]
    unknown = set(params) - {"model_name", "pretrained", flag_name, "num_classes"}
    if unknown:
        raise invalid(f"init_params has unknown keys {quote(sorted(map(str, unknown)))} for {name}.")
    for key in ("pretrained", flag_name):
        if key and not isinstance(params.get(key, False), bool):
            raise invalid(f"init_params.{key} must be true or false, got {quote(params[key])}.")
    num_classes = params.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise invalid(f"init_params.num_classes must be an integer from 1 to {MAX_CLASSES}, got {quote(num_classes)}.")
    return ModelSpec(name, params.get("pretrained", True), params.get(flag_name, False) if flag_name else False,
                     num_classes)


def read_untrained_model_directory(path: str | os.PathLike) -> tuple[ModelSpec, Classifier | None]:
    """The spec, and the model with the directory's (or the local cache's) weights when there are any.

    Weights come from the directory's `model` file when present (this is how pretrained ImageNet
    weights reach training without network), else from the torch hub cache when `pretrained`.
    None means "initialise randomly" (`pretrained: false`, no file).
    """
    path = Path(path)
    _check_folder(path, "Untrained model")
    spec = read_model_spec(path)
    weights = _weights_path(path)
    if weights is not None:
        return spec, _load_model(weights, spec, inside=path)
    if spec.pretrained:
        cached = find_cached_weights(spec.model_name)
        if cached is None:
            raise pretrained_missing_error(spec.model_name, f"Model directory '{path}'")
        return spec, _load_model(cached, spec)
    return spec, None


def _weights_path(directory: Path) -> Path | None:
    """The directory's `model` entry whatever it is (load_weights_file refuses folders, FIFOs...), None if absent."""
    weights = directory / WEIGHTS_FILE
    if not os.path.lexists(weights):
        return None
    if not resolves_inside(directory, weights):
        raise InvalidModelDirectoryError(
            f"'{weights}' is a link to a file outside the model directory, which is never followed. "
            "Copy the weights file into the directory."
        )
    return weights


def _load_model(weights: Path, spec: ModelSpec, inside: Path | None = None) -> Classifier:
    state = load_weights_file(weights, spec.model_name, spec.flag_value, inside=inside)
    return load_legacy_state(spec.model_name, spec.flag_value, state, str(weights))


@dataclass
class TrainedModel:
    model: Classifier
    classes: list[str]
    preprocessing: Preprocessing
    spec: ModelSpec
    task: str = "multiclass"  # or "multilabel": one sigmoid per class, labels at or above `threshold`
    threshold: float = DEFAULT_THRESHOLD

    @property
    def is_multilabel(self) -> bool:
        return self.task == "multilabel"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the classes, or a multi-label model's sigmoid per class."""
        return logits.sigmoid() if self.is_multilabel else logits.softmax(dim=1)


def read_trained_model_directory(path: str | os.PathLike) -> TrainedModel:
    """Load a trained model directory (ours, or one written by the original module) on CPU, eval mode."""
    path = Path(path)
    _check_folder(path, "Trained model")
    spec = read_model_spec(path)
    weights = _weights_path(path)
    if weights is None:
        raise InvalidModelDirectoryError(f'ModelDirectory "{path}" has no weights file \'{WEIGHTS_FILE}\'.')
    model = _load_model(weights, spec, inside=path)
    info_path = path / INFO_FILE
    task, threshold = "multiclass", DEFAULT_THRESHOLD
    if info_path.is_file():
        info = read_json(info_path, InvalidModelDirectoryError)
        if not isinstance(info, dict) or not isinstance(info.get("classes"), list) \
                or not isinstance(info.get("preprocessing"), dict):
            raise InvalidModelDirectoryError(
                f"'{info_path}' needs a 'classes' list and a 'preprocessing' object; "
                "the trained model directory is damaged: train it again."
            )
        classes = info["classes"]
        task, threshold = info.get("task", task), info.get("threshold", threshold)
        if task not in TASKS or not valid_threshold(threshold):
            raise InvalidModelDirectoryError(
                f"'{info_path}' has task {quote(task)} and threshold {quote(threshold)}; the task must be one of "
                f"{list(TASKS)} and the threshold a number from 0 to 1. The trained model directory is damaged: "
                "train it again."
            )
        try:
            preprocessing = Preprocessing.from_dict(info["preprocessing"])
        except (TypeError, ValueError):
            preprocessing = None
        source = info_path
    else:  # written by the original: labels from the CSV, its normaliser, no resize
        classes = _read_label_map(path / LABEL_MAP_FILE, model.num_classes)
        preprocessing = _legacy_preprocessing(read_yaml(path / SPEC_FILE, InvalidModelDirectoryError))
        source = path / SPEC_FILE
    if preprocessing is None:  # (Preprocessing checks its own values: an out-of-range recipe is None here)
        raise InvalidModelDirectoryError(
            f"'{source}' has an invalid preprocessing recipe ({preprocessing}); the trained model directory is "
            "damaged: use an intact copy, or train again."
        )
    problem = category_list_problem(classes)
    if problem:  # a tampered list: ["a", "a"] would give one probability column the other class's value
        raise InvalidModelDirectoryError(
            f"'{source}' has an invalid class list: {problem}. The trained model directory is damaged or was "
            "edited: use an intact copy, or train again."
        )
    if len(classes) != model.num_classes:
        raise InvalidModelDirectoryError(
            f'ModelDirectory "{path}" lists {len(classes)} classes but its weights have {model.num_classes} outputs: '
            "its files come from different trainings. Use an intact trained model directory, or train again."
        )
    model.eval()
    return TrainedModel(model, classes, preprocessing, spec, task, float(threshold))


def valid_threshold(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _read_label_map(path: Path, num_classes: int) -> list[str]:
    names = [str(i) for i in range(num_classes)]
    if os.path.lexists(path):
        text = read_text(path, InvalidModelDirectoryError)  # the input opener: inside the directory, bounded
        try:
            for row in list(csv.reader(io.StringIO(text, newline="")))[1:]:
                if len(row) >= 2 and row[0].isascii() and row[0].isdigit() and int(row[0]) < num_classes:
                    names[int(row[0])] = row[1]
        except csv.Error as exc:
            raise InvalidModelDirectoryError(
                f"'{path}' cannot be read as a label map ({exc}); use an intact copy of the model directory."
            ) from None
    return names


def _legacy_preprocessing(spec: dict) -> Preprocessing | None:
    """The original's ImageNormalizer mean/std from model_spec.yaml `inputs`, else its default (0.5)."""
    inputs = spec.get("inputs") or []
    for item in inputs if isinstance(inputs, list) else []:
        processor = item.get("pre_processor") if isinstance(item, dict) else None
        params = processor.get("init_params") if isinstance(processor, dict) else None
        if isinstance(params, dict) and "mean" in params and "std" in params:
            if not isinstance(params["mean"], list) or not isinstance(params["std"], list):
                return None
            return Preprocessing(image_size=None, mean=tuple(params["mean"]), std=tuple(params["std"]))
    return Preprocessing(image_size=None, mean=(0.5,) * 3, std=(0.5,) * 3)


# --- writing -----------------------------------------------------------------------------------------------


def write_untrained_model_directory(out: Path, spec: ModelSpec, state_dict: dict | None, weights_source: str = "",
                                    inputs: tuple = ()) -> None:
    """What designer's DenseNet/ResNet modules write, plus `model_info.json` (and README.txt beyond designer's
    13); `state_dict` None writes no `model` file."""
    with staged_output(out, inputs=inputs) as stage:
        if state_dict is not None:
            torch.save(state_dict, stage / WEIGHTS_FILE)
        write_text(stage / SPEC_FILE, dump_yaml(spec.to_yaml_dict()))
        readers = "Azure ML designer, train-pytorch-model and MLflow" if spec.is_designer else READERS_NOTE
        info = {"format_version": 1, "model_name": spec.model_name, "pretrained": spec.pretrained,
                "weights": weights_source, "preprocessing": spec.preprocessing_defaults, "readable_by": readers}
        write_text(stage / MODEL_INFO_FILE, json.dumps(info, indent=2, allow_nan=False) + "\n")
        _write_readers_note(stage, spec)
        write_text(stage / META_FILE, dump_yaml({"type": "ModelDirectory", "extension": {}, "model": SPEC_FILE}))


def _write_readers_note(stage: Path, spec: ModelSpec) -> None:
    if not spec.is_designer:
        write_text(stage / README_FILE, f"{spec.model_name} model directory. {READERS_NOTE}\n")


def write_legacy_trained_files(stage: Path, *, model: Classifier, spec: ModelSpec, classes: list[str],
                               preprocessing: Preprocessing, is_cuda: bool, training_schema: dict,
                               training_samples: list[dict], extra_info: dict, run_identity: str | None = None) -> None:
    """The legacy ModelDirectory part of a trained model directory, in the original's write order.

    The spec says `pretrained: false` + `num_classes`: the head already fits the classes, so the
    original's scorer rebuilds the same net and needs no network (its defect 15). `run_identity`
    goes to `training_info.json` `training.run_identity`, which `finished_output` compares.
    """
    torch.save(cpu_state_dict(model), stage / WEIGHTS_FILE)
    with open(stage / LABEL_MAP_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["", "label"])
        writer.writerows(enumerate(classes))
    trained_spec = ModelSpec(spec.model_name, False, spec.flag_value, len(classes))
    spec_dict = trained_spec.to_yaml_dict(is_cuda=is_cuda)
    spec_dict["label_map_file"] = LABEL_MAP_FILE
    spec_dict["inputs"] = [{
        "name": "image",
        "pre_processor": {
            "module": "azureml.designer.core.model.model_spec.builtin_model_meta.pre_processor",
            "class": "ImageNormalizer",
            "init_params": {"mean": list(preprocessing.mean), "std": list(preprocessing.std)},
        },
    }]
    write_text(stage / SPEC_FILE, dump_yaml(spec_dict))
    write_text(stage / "_schema.json", dump_json(training_schema))
    write_text(stage / "_samples.json", dump_json(training_samples))
    info = {"format_version": 1, "model_name": spec.model_name, "classes": classes,
            "preprocessing": preprocessing.to_dict(), **extra_info}
    if run_identity is not None:
        info["training"] = {**info.get("training", {}), "run_identity": run_identity}
    write_text(stage / INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    _write_readers_note(stage, trained_spec)
    write_text(stage / META_FILE, dump_yaml({
        "type": "ModelDirectory", "extension": {}, "model": SPEC_FILE,
        "registerModel": True, "modelOutputPath": "trained_model_outputs",
    }))


COMPLETE_TRAINED_FILES = (META_FILE, SPEC_FILE, WEIGHTS_FILE, INFO_FILE, "MLmodel")


def finished_output(out: str | os.PathLike, run_identity: str) -> bool:
    """True when `out` already holds the complete trained model directory of this very run (same
    `run_identity` in training_info.json): a restarted job (Azure ML preemption after the write) is done."""
    out = Path(os.path.realpath(out))
    if not out.is_dir() or not all((out / name).is_file() for name in COMPLETE_TRAINED_FILES) \
            or os.path.lexists(out / JOURNAL):  # its publication did not finish: written again
        return False
    try:
        info = read_json(out / INFO_FILE, InvalidModelDirectoryError)
    except InvalidModelDirectoryError:
        return False
    training = info.get("training") if isinstance(info, dict) else None
    return isinstance(training, dict) and training.get("run_identity") == run_identity


def training_samples(directory, schema: dict, count: int = 3) -> list[dict]:
    """`_samples.json` rows (spec 2.4): the first rows, image bytes base64-encoded. The bytes are read through
    the input opener as training reads images: a file that is a link out of the folder, not a regular file
    or larger than MAX_SAMPLE_BYTES is written as null, never copied into the model."""
    samples = []
    column_names = [c["name"] for c in schema.get("columnAttributes", [])]
    for i in range(min(count, len(directory))):
        row = {}
        for name in column_names:
            if name == "image":
                try:
                    source = directory.image_source(i)  # a file, or a shard row's bytes
                    data = source if isinstance(source, bytes) else \
                        read_input(source, inside=directory.root, max_bytes=MAX_SAMPLE_BYTES)
                    row[name] = base64.b64encode(data).decode("ascii") if len(data) <= MAX_SAMPLE_BYTES else None
                except (UnreadableInputError, ImageDecodeError):
                    row[name] = None
            elif name == directory.annotation_column and directory.is_labeled:
                names = directory.label_names(i)  # a multi-label row: its list of categories
                row[name] = names if directory.is_multilabel else (names[0] if names else None)
            elif name == "id":
                row[name] = directory.ids[i]
        samples.append(row)
    return samples

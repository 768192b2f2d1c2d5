"""The one configuration of a training run: `TrainConfig`.

Every flag of `train` is a field here, with its default and help text, so the command line, the
checkpoint identity, the MLflow parameters and `training_info.json` all come from one object
(`dataclasses.asdict`). Fields marked `identity=False` do not change what is learned (paths, logging,
worker counts) and are left out of the checkpoint identity. This module imports no torch: argument
errors and `--help` are instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InvalidParameterError
from .limits import AUGMENTATIONS, DEFAULT_WEIGHT_DECAY, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, OPTIMIZERS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLASS_WEIGHTS = ("none", "balanced")
STOPPING_METRICS = ("valid_loss", "valid_top1")
TASKS = ("auto", "multiclass", "multilabel")
MAX_SEED = 2**63 - 1  # torch.manual_seed takes any 64-bit value; data.py derives per-sample seeds below it


def _field(default, help: str, *, group: str = "extras", identity: bool = True, **argparse_options):
    """A train flag. `help` says the default with argparse's %(default)s, never as a restated literal; `shown` is
    the default as the command line spells it when the field's own default is None (auto)."""
    return field(default=default, metadata={"help": help, "group": group, "identity": identity, **argparse_options})


def integer(text: str) -> int:
    """An integer flag: ASCII digits with an optional minus sign, nothing else (no `1_0`, spaces or other
    scripts' digits, which int() would accept)."""
    if not re.fullmatch(r"-?[0-9]{1,30}", text):
        raise argparse.ArgumentTypeError(f"must be an integer (digits 0-9), not {text!r}")
    return int(text)


integer.__name__ = "int"  # argparse's message: "invalid int value"


def number(text: str) -> float:
    """A number flag: a plain decimal (`0.001`, `1e-4`, `.5`), ASCII only (float() would also take `1_0`,
    spaces and other scripts' digits)."""
    if not re.fullmatch(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?|-?(nan|inf)", text, re.IGNORECASE) \
            or len(text) > 60:
        raise argparse.ArgumentTypeError(f"must be a number (digits 0-9, '.', 'e'), not {text!r}")
    return float(text)


number.__name__ = "float"


def seed(text: str) -> int:
    """A random seed flag: 0 to 2^63-1, what every generator we seed takes."""
    value = integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed from 0 to 2^63-1, not {text}")
    return value


def auto_or_int(text: str) -> int | None:
    try:
        return None if text == "auto" else integer(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer (digits 0-9), not {text!r}") from None


def _auto_or_float(text: str) -> float | None:
    try:
        return None if text == "auto" else number(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number (digits 0-9, '.', 'e'), not {text!r}") from None


def _true_false(text: str) -> bool:
    if text.lower() not in ("true", "false"):  # Azure ML binds booleans as True/False
        raise argparse.ArgumentTypeError(f"must be true or false, not {text!r}")
    return text.lower() == "true"


def _auto_true_false(text: str) -> bool | None:
    return None if text.lower() == "auto" else _true_false(text)


_BOOL = dict(type=_true_false, metavar="true|false")


@dataclass(frozen=True)
class TrainConfig:
    # directories
    untrained_model: Path = _field(None, "untrained model directory (`init-model` writes one)", group="directories",
                                   identity=False, required=True, type=Path)
    training_data: Path = _field(None, "labeled training images: ImageDirectory, class folders, table or MLTable",
                                 group="directories", identity=False, required=True, type=Path)
    validation_data: Path | None = _field(
        None, "labeled validation images, in any of the training data's formats; without it, --validation-fraction "
        "of the training images is held out (stratified, by the seed; recorded in training_info.json)",
        group="directories", identity=False, type=Path)
    trained_model: Path = _field(None, "output folder (new or empty)", group="directories", identity=False,
                                 required=True, type=Path)
    image_column: str | None = _field(None, "image path column of a table or MLTable input (default: the first of "
                                      "image_url, image_path, image, path, file, file_name, filename)",
                                      group="directories", identity=False, metavar="NAME")
    label_column: str | None = _field(None, "label column of a table or MLTable input (default: the first of label, "
                                      "category, class)", group="directories", identity=False, metavar="NAME")
    checkpoint_dir: Path | None = _field(
        None, "folder for the resume checkpoint, written every epoch; when it holds one, training resumes from it "
        "(same command after a preemption). Give it a new folder per training run", group="directories",
        identity=False, type=Path)
    # designer parameters: names and defaults fixed by the original module
    epochs: int = _field(5, "maximum number of epochs (default %(default)s)", group="designer parameters",
                         type=integer)
    batch_size: int = _field(16, "images per step, per process (default %(default)s)", group="designer parameters",
                             type=integer)
    learning_rate: float = _field(0.001, "peak learning rate (default %(default)s)", group="designer parameters",
                                  type=number)
    random_seed: int = _field(1, "seed of every random generator, 0 to 2^63-1 (default %(default)s)",
                              group="designer parameters", type=integer)
    patience: int = _field(3, "stop after this many epochs without a better validation loss; 0 never stops early "
                           "(default %(default)s)", group="designer parameters", type=integer)
    # extras
    task: str = _field("auto", "multiclass (one label per image, softmax) or multilabel (a set of labels per image, "
                       "one sigmoid per class); auto: multilabel when the table's labels are lists "
                       "(default %(default)s)", choices=TASKS)
    validation_fraction: float = _field(0.2, "without --validation-data: the fraction of training images held out "
                                        "for validation (default %(default)s, as AutoML)", type=number)
    positive_class_weights: str = _field("none", "multilabel: balanced weighs each class's positive images by "
                                         "negatives/positives, for rare labels (default %(default)s)",
                                         choices=CLASS_WEIGHTS)
    image_size: int | None = _field(None, f"square side images are resized/cropped to, {MIN_IMAGE_SIZE} to "
                                    f"{MAX_IMAGE_SIZE}; auto: the architecture's, 224 for designer's DenseNet/ResNet "
                                    "(default %(default)s)", type=auto_or_int, metavar="auto|N", shown="auto")
    augmentation: str = _field("crop", "training augmentation: random resized crop, crop + horizontal flip, or "
                               "none (default %(default)s: a flip changes the class of digits, text, arrows)",
                               choices=AUGMENTATIONS)
    optimizer: str = _field("adamw", "adamw, or sgd: momentum 0.9, Nesterov (the original's) (default %(default)s)",
                            choices=OPTIMIZERS)
    warmup_epochs: int = _field(0, "epochs of linear learning-rate warm-up (default %(default)s)", type=integer)
    weight_decay: float | None = _field(
        None, "weight decay, 0 to 1; auto: " + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_WEIGHT_DECAY.items())
        + " (default %(default)s)", type=_auto_or_float, metavar="auto|X", shown="auto")
    label_smoothing: float = _field(0.0, "label smoothing of the training loss, 0 to 1 (default %(default)s)",
                                    type=number)
    class_weights: str = _field("none", "balanced: weigh the training loss by inverse class frequency, for "
                                "imbalanced data (default %(default)s)", choices=CLASS_WEIGHTS)
    mixup: float = _field(0.0, "mixup alpha; 0 = off (default %(default)s)", type=number)
    cutmix: float = _field(0.0, "cutmix alpha; 0 = off (default %(default)s)", type=number)
    ema_decay: float = _field(0.0, "keep an exponential moving average of the weights with this decay (e.g. "
                              "0.999) and validate/save it; 0 = off (default %(default)s)", type=number)
    freeze_backbone_epochs: int = _field(0, "train only the classification head for the first N epochs, then "
                                         "everything (default %(default)s)", type=integer)
    bn_recalibration: bool = _field(True, "re-estimate BatchNorm statistics on the latest training images "
                                    "before each validation (default %(default)s)", **_BOOL)
    early_stopping_metric: str = _field("valid_loss", "what early stopping and the best epoch watch (default "
                                        "%(default)s)", choices=STOPPING_METRICS)
    early_stopping_min_epochs: int = _field(0, "never stop early before this many epochs (default %(default)s)",
                                            type=integer)
    decode: str = _field("cpu", "cpu: decode in worker processes (PIL); gpu: JPEGs decoded by nvJPEG on the device, "
                         "cropped and resized there (default %(default)s)", identity=False, choices=("cpu", "gpu"))
    cache_validation: bool = _field(False, "decode the validation images once and keep them in memory (bounded: "
                                    "a quarter of RAM, at most 16 GiB) (default %(default)s)", identity=False,
                                    **_BOOL)
    num_workers: int | None = _field(None, "image decoding processes per training process (default %(default)s)",
                                     identity=False, type=auto_or_int, metavar="auto|N", shown="auto")
    device: str = _field("auto", "auto (GPU when present), cpu, cuda, cuda:N (default %(default)s)", identity=False)
    precision: str = _field("auto", "auto: bf16 autocast on GPUs that support it, fp16 on older GPUs, fp32 on CPU "
                            "(default %(default)s)", choices=PRECISIONS)
    channels_last: bool | None = _field(None, "NHWC memory format; auto: on GPU only (default %(default)s)",
                                        identity=False, type=_auto_true_false, metavar="auto|true|false",
                                        shown="auto")
    compile: bool = _field(False, "torch.compile the model: faster steps on GPU for long runs, after a compile of a "
                           "minute or more (default %(default)s)", identity=False, **_BOOL)
    max_bad_image_fraction: float = _field(0.05, "unreadable images are skipped with a warning; fail when more than "
                                           "this fraction is bad (default %(default)s)", identity=False, type=number)
    print_freq: int = _field(10, "plain progress line (logs, not a terminal) every N steps (default %(default)s)",
                             identity=False, type=integer)
    mlflow_tracking_uri: str | None = _field(None, "MLflow tracking URI (default: the active run / "
                                             "MLFLOW_TRACKING_URI / sqlite:///mlflow.db)", identity=False)
    registered_model_name: str | None = _field(None, "register the trained model under this name in the MLflow "
                                               "model registry", identity=False)

    def __post_init__(self):
        if self.weight_decay is None:  # auto: it depends on the optimizer only, so every config holds the real value
            object.__setattr__(self, "weight_decay", DEFAULT_WEIGHT_DECAY.get(self.optimizer))
        _check("Epochs", self.epochs, self.epochs >= 1, "must be an integer >= 1")
        _check("Batch size", self.batch_size, self.batch_size >= 1, "must be an integer >= 1")
        _check("Learning rate", self.learning_rate, math.isfinite(self.learning_rate) and self.learning_rate > 0,
               "must be a finite number > 0")
        _check("Patience", self.patience, self.patience >= 0, "must be an integer >= 0 (0 disables early stopping)")
        _check("Image size", self.image_size,
               self.image_size is None or MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
               f"must be auto or between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE} pixels")
        _check("Warmup epochs", self.warmup_epochs, self.warmup_epochs == 0 or 0 < self.warmup_epochs < self.epochs,
               "must be >= 0 and smaller than epochs")
        _check("Max bad image fraction", self.max_bad_image_fraction,
               math.isfinite(self.max_bad_image_fraction) and 0 <= self.max_bad_image_fraction <= 1,
               "must be between 0 and 1")
        _check("Validation fraction", self.validation_fraction,
               math.isfinite(self.validation_fraction) and 0 < self.validation_fraction < 1,
               "must be a number between 0 and 1 (exclusive)")
        _check("Print frequency", self.print_freq, self.print_freq >= 1, "must be an integer >= 1")
        _check("Num workers", self.num_workers, self.num_workers is None or self.num_workers >= 0,
               "must be auto or an integer >= 0")
        for name, value in (("Label smoothing", self.label_smoothing), ("Mixup", self.mixup), ("Cutmix", self.cutmix)):
            _check(name, value, math.isfinite(value) and 0 <= value <= (1 if name == "Label smoothing" else 100),
                   "must be a number from 0 (off) to 1" if name == "Label smoothing" else "must be an alpha >= 0")
        _check("Weight decay", self.weight_decay, self.weight_decay is not None and math.isfinite(self.weight_decay)
               and 0 <= self.weight_decay < 1, "must be a number from 0 to 1")
        _check("EMA decay", self.ema_decay, math.isfinite(self.ema_decay) and 0 <= self.ema_decay < 1,
               "must be 0 (off) or a number below 1, e.g. 0.999")
        _check("Freeze backbone epochs", self.freeze_backbone_epochs, 0 <= self.freeze_backbone_epochs < self.epochs,
               "must be >= 0 and smaller than epochs")
        _check("Early stopping min epochs", self.early_stopping_min_epochs, self.early_stopping_min_epochs >= 0,
               "must be an integer >= 0")
        _check("Random seed", self.random_seed, 0 <= self.random_seed <= MAX_SEED,
               "must be an integer from 0 to 2^63-1")
        _check("Device", self.device, re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", self.device) is not None,
               "must be auto, cpu, cuda or cuda:N")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Every field, JSON-ready (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        """The fields that decide the training trajectory (the checkpoint must match them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["identity"]}


def _check(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise InvalidParameterError(name, value, rule)


def defaults() -> dict:
    """Each field's default as the command line spells it (what README and component.yaml must agree with)."""
    return {f.name: _spelled(f) for f in dataclasses.fields(TrainConfig)}


def _spelled(f: dataclasses.Field):
    if "shown" in f.metadata:
        return f.metadata["shown"]
    return str(f.default).lower() if isinstance(f.default, bool) else f.default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `train` flags, one per TrainConfig field: `--batch-size` for `batch_size`."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        options = {k: v for k, v in f.metadata.items() if k not in ("help", "group", "identity", "shown")}
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        if not options.get("required"):
            options["default"] = _spelled(f)  # argparse converts a string default with the flag's type
        group.add_argument("--" + f.name.replace("_", "-"), help=f.metadata["help"], **options)


"""What differs between the two tasks a classifier is trained for, in one place.

- multiclass: one label per image (designer's task); softmax over the classes, cross-entropy; top-1/top-5.
- multilabel: a set of labels per image (AutoML's image_classification_multilabel); one sigmoid per class,
  binary cross-entropy; IoU, micro/macro F1, mAP and exact-set accuracy at threshold 0.5 (multilabel_metrics.py).

`resolve_task` decides from the data and `--task`; the trainer calls the chosen strategy (`MultiClass` or
`MultiLabel`) and never asks which task it is. Validation metrics are summed on the device batch by batch
for both tasks (multi-label: decisions and a logit histogram per class, multilabel_metrics.py), so neither adds
a host sync per step nor holds memory that grows with the validation set.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import replace

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .distributed import Context
from .errors import InvalidDatasetError, InvalidParameterError, SingleLabelFormatError
from .image_directory import ImageDirectory
from .label_sets import LabelSets
from .multilabel_metrics import DEFAULT_THRESHOLD, SUMMARY, histogram_bins, score_bins, summary_from_counts

log = logging.getLogger(__name__)

SINGLE_LABEL_LAYOUTS = {"meta": "a designer ImageDirectory", "image_folder": "a <class>/<image> folder tree"}


def resolve_task(requested: str, train: ImageDirectory, valid: ImageDirectory | None) -> MultiClass | MultiLabel:
    """The task `--task` names, or for `auto` the one the data says: multilabel when a table's labels are lists."""
    if requested == "auto":
        multilabel = train.is_multilabel or (valid is not None and valid.is_multilabel)
        requested = "multilabel" if multilabel else "multiclass"
    return MultiLabel() if requested == "multilabel" else MultiClass()


def check_valid_categories(train: ImageDirectory, valid: ImageDirectory, used: set[int]) -> None:
    extra = sorted({valid.categories[i] for i in used} - set(train.categories))
    if extra:
        raise InvalidDatasetError(
            f"Validation data '{valid.root}' has categories {extra} that the training data '{train.root}' "
            f"does not have (training categories: {list(train.categories)[:20]}). Both must use the same category "
            "names."
        )


class MultiClass:
    name = "multiclass"
    primary_metric = "valid_top1"

    def check_config(self, config: TrainConfig) -> None:
        if config.positive_class_weights != "none":
            raise InvalidParameterError("Positive class weights", config.positive_class_weights,
                                        "applies to multi-label runs only; use --class-weights in a multi-class run")

    def prepare(self, directory: ImageDirectory, role: str) -> ImageDirectory:
        if directory.is_multilabel:
            raise SingleLabelFormatError(
                f"{role} data '{directory.root}' has label lists (multi-label), but --task multiclass needs one "
                "label per image. Train with --task multilabel (or auto)."
            )
        return directory

    def classes(self, train: ImageDirectory, valid: ImageDirectory) -> list[str]:
        """The class list (training categories by id order) after checking both datasets agree."""
        counts = Counter(train.labels)
        classes = list(train.categories)
        present = [c for i, c in enumerate(classes) if counts.get(i)]
        if len(present) < 2:
            raise InvalidDatasetError(
                f"Training data '{train.root}' has images of {len(present)} class(es) {present}; "
                "a classifier needs at least 2 classes with images."
            )
        empty = [c for i, c in enumerate(classes) if not counts.get(i)]
        if empty:
            log.warning("Training categories without any image (the model can never predict them): %s", empty)
        check_valid_categories(train, valid, set(valid.labels))
        return classes

    def stratum(self, directory: ImageDirectory) -> list[int]:
        """Each row's stratum for a validation split: its class."""
        return list(directory.labels)

    def loss_weights(self, config: TrainConfig, targets, num_classes: int) -> torch.Tensor | None:
        if config.class_weights != "balanced":
            return None
        counts = torch.bincount(torch.as_tensor(targets, dtype=torch.int64), minlength=num_classes).double()
        weights = counts.sum() / (num_classes * counts)  # scikit-learn's "balanced"; 1 for a class with no image
        return torch.where(counts > 0, weights, torch.ones_like(weights)).float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
             label_smoothing: float) -> torch.Tensor:
        return F.cross_entropy(logits, targets, weight=weights, label_smoothing=label_smoothing)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Right answers in a training batch."""
        return (logits.argmax(1) == targets).sum()

    def filler_targets(self, count: int, num_classes: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(count, dtype=torch.int64, device=device)

    def validation(self, num_classes: int, device: torch.device) -> ClassValidation:
        return ClassValidation(num_classes, device)

    def describe(self, m) -> str:
        top5 = f" top-5 {m.valid_top5:.1%}" if m.valid_top5 is not None else ""
        return f"valid loss {m.valid_loss:.4f} top-1 {m.valid_top1:.1%}{top5}"


class MultiLabel:
    name = "multilabel"
    primary_metric = "valid_iou"
    threshold = DEFAULT_THRESHOLD

    def check_config(self, config: TrainConfig) -> None:
        refused = [("Mixup", config.mixup), ("Cutmix", config.cutmix)]
        for name, value in refused:
            if value:
                raise InvalidParameterError(name, value, "is not supported for multi-label training (mixing images "
                                            "mixes their label sets); leave it at 0")
        if config.class_weights != "none":
            raise InvalidParameterError("Class weights", config.class_weights, "weighs one softmax's classes; in a "
                                        "multi-label run use --positive-class-weights balanced")
        if config.early_stopping_metric == "valid_top1":
            raise InvalidParameterError("Early stopping metric", "valid_top1", "multi-label runs have no top-1; "
                                        "they stop on valid_loss")

    def prepare(self, directory: ImageDirectory, role: str) -> ImageDirectory:
        """The directory as label sets; a single-label table becomes one-label sets."""
        if directory.is_multilabel:
            return directory
        if directory.layout in SINGLE_LABEL_LAYOUTS:
            raise SingleLabelFormatError(
                f"{role} data '{directory.root}' is {SINGLE_LABEL_LAYOUTS[directory.layout]}, which holds one "
                "label per image; multi-label data comes as an MLTable or a table whose label column holds lists "
                "(see docs/multilabel.md). Train it with --task multiclass (or auto)."
            )
        return replace(directory, label_sets=LabelSets.of_single_labels(directory.labels),
                       labels=type(directory.labels)("l", (0 if label >= 0 else -1 for label in directory.labels)))

    def classes(self, train: ImageDirectory, valid: ImageDirectory) -> list[str]:
        classes = list(train.categories)
        counts = train.label_sets.counts(len(classes))
        if not any(counts):
            raise InvalidDatasetError(f"Training data '{train.root}' has no image with a label; a multi-label "
                                      "classifier needs images of at least one class.")
        empty = [c for c, n in zip(classes, counts) if not n]
        if empty:
            log.warning("Training categories without any image (the model can never predict them): %s", empty)
        check_valid_categories(train, valid, set(valid.label_sets.members))
        return classes

    def stratum(self, directory: ImageDirectory) -> list[int]:
        """Each row's stratum for a validation split: its rarest label (-1: no label). Splitting each stratum in
        proportion keeps every label's share close to the fraction (an approximation of iterative
        stratification that is exact for single labels)."""
        sets = directory.label_sets
        counts = sets.counts(len(directory.categories))
        return [min(sets[row], key=lambda c: (counts[c], c)) if len(sets[row]) else -1 for row in range(len(sets))]

    def loss_weights(self, config: TrainConfig, targets, num_classes: int) -> torch.Tensor | None:
        """pos_weight: negatives / positives per class (1 for a class with no positive image)."""
        if config.positive_class_weights != "balanced":
            return None
        positives = torch.tensor(targets.label_sets.counts(num_classes), dtype=torch.float64)
        negatives = len(targets) - positives
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)).float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
             label_smoothing: float) -> torch.Tensor:
        if label_smoothing:  # each binary target moves towards 1/2
            targets = targets * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=weights)

    def correct(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images of a training batch whose predicted set is exactly the true set."""
        return ((logits > 0) == (targets > 0.5)).all(1).sum()

    def filler_targets(self, count: int, num_classes: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(count, num_classes, device=device)

    def validation(self, num_classes: int, device: torch.device) -> LabelSetValidation:
        return LabelSetValidation(num_classes, device)

    def describe(self, m) -> str:
        return (f"valid loss {m.valid_loss:.4f} IoU {m.valid_iou:.1%} F1 micro {m.valid_f1_micro:.1%} "
                f"macro {m.valid_f1_macro:.1%} mAP {m.valid_map:.1%} exact {m.valid_exact_match:.1%}")


class ClassValidation:
    """Loss, top-1 and top-5 of a validation pass, summed on the device; one sync at the end."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
        self.pairs: list[torch.Tensor] = []  # (true, predicted) per image, for the validation confusion matrix

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        hits = logits.topk(min(5, self.num_classes), dim=1).indices == targets[:, None]
        self.sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        self.sums[1] += hits[:, 0].sum()
        self.sums[2] += hits.any(dim=1).sum()
        self.sums[3] += len(targets)
        self.pairs.append(torch.stack((targets, logits.argmax(1)), dim=1))

    def result(self, ctx: Context) -> dict:
        predictions = torch.cat(self.pairs) if self.pairs else torch.zeros(0, 2, dtype=torch.int64, device=self.device)
        loss_sum, top1, top5, seen = ctx.all_reduce_sum(self.sums.tolist())  # the one sync of a validation
        if seen == 0:
            return {"loss": math.inf, "top1": 0.0, "top5": None, "predictions": predictions}
        return {"loss": loss_sum / seen, "top1": top1 / seen, "top5": top5 / seen if self.num_classes >= 5 else None,
                "predictions": predictions}


class LabelSetValidation:
    """A multi-label validation pass, summed on the device batch by batch and over ranks once at the end: the loss;
    the images, their IoUs and exact matches; per class the true/false positives and false negatives at the
    threshold, and a histogram of the logits of the images with and without the label (for AP)."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        self.bins = histogram_bins(num_classes)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, images, IoU, exact matches
        self.decisions = torch.zeros(3, num_classes, dtype=torch.int64, device=device)
        self.histogram = torch.zeros(2 * num_classes * self.bins, dtype=torch.int32, device=device)
        self.cell_of_class = torch.arange(num_classes, device=device) * self.bins

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        truth = targets > 0.5
        predicted = logits.sigmoid() >= MultiLabel.threshold  # as score and the MLflow model decide
        both, either = (truth & predicted).sum(1), (truth | predicted).sum(1)
        iou = torch.where(either > 0, both.double() / either.clamp(min=1), 1.0)  # none true or predicted: a match
        # The mean over classes per image, summed over images: the training loss's scale.
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum()
        self.sums[0] += loss.double()
        self.sums[1] += len(logits)
        self.sums[2] += iou.sum()
        self.sums[3] += (truth == predicted).all(1).sum()
        self.decisions += torch.stack([(truth & predicted).sum(0), (~truth & predicted).sum(0),
                                       (truth & ~predicted).sum(0)])
        cells = truth.long() * (self.num_classes * self.bins) + self.cell_of_class + score_bins(logits, self.bins)
        self.histogram.index_add_(0, cells.flatten(), torch.ones(cells.numel(), dtype=torch.int32, device=self.device))

    def result(self, ctx: Context) -> dict:
        loss_sum, images, iou_sum, exact = ctx.all_reduce_sum(self.sums.tolist())  # the one sync of a validation
        if images == 0:
            return {"loss": math.inf, "top1": None, "top5": None, **dict.fromkeys(SUMMARY, 0.0)}
        decisions, histogram = ctx.all_reduce_tensor(self.decisions), ctx.all_reduce_tensor(self.histogram)
        return {"loss": loss_sum / images, "top1": None, "top5": None,
                **summary_from_counts(images, iou_sum, exact, decisions.cpu().numpy(),
                                      histogram.view(2, self.num_classes, self.bins).cpu().numpy())}

"""The pictures and human-readable records of a run, one module for every plot: training curves, confusion
matrices, image grids (augmented training images, an evaluation's gallery) and one-vs-rest PR/ROC curves.

A training run writes `TRAINING_FILES` next to the model (`write_training_report`) and logs them to MLflow.
matplotlib is imported where a plot is drawn, with the headless Agg backend (compute nodes have no display).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "train_images_per_second",
           "valid_loss", "valid_top1", "valid_top5", "data_wait_fraction", "seconds")
MULTILABEL_COLUMNS = ("valid_iou", "valid_f1_micro", "valid_f1_macro", "valid_map", "valid_exact_match")
MULTILABEL_CURVES = {"valid_iou": "validation IoU", "valid_f1_micro": "validation F1 micro",
                     "valid_f1_macro": "validation F1 macro", "valid_map": "validation mAP",
                     "valid_exact_match": "validation exact set"}


METRICS_CSV = "metrics.csv"
CURVES_PNG = "training_curves.png"
VALID_CONFUSION_PNG = "validation_confusion_matrix.png"
VALID_CONFUSION_CSV = "validation_confusion_matrix.csv"
TRAINING_IMAGES_PNG = "training_images.png"
# (A multi-label run has no single confusion matrix: it writes the others; `evaluate` gives per-class decisions.)
TRAINING_FILES = (METRICS_CSV, CURVES_PNG, VALID_CONFUSION_PNG, VALID_CONFUSION_CSV, TRAINING_IMAGES_PNG)

MATRIX_CLASSES = 30  # a confusion matrix with more classes shows the MATRIX_CLASSES most confused ones
MOSAIC_CLASSES = 16  # augmented training images: at most this many classes ...
MOSAIC_PER_CLASS = 4  # ... and this many images of each
CURVE_CLASSES = 10  # one-vs-rest curves drawn per plot; beyond that, the classes with the lowest AUC


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    # Class names and file names are data, not TeX: "$5$" stays as written, "$\\foo$" cannot fail the plot.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> None:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)


# --- training ----------------------------------------------------------------------------------------------------

def is_multilabel(history) -> bool:
    return bool(history) and history[0].valid_iou is not None


def write_metrics_csv(path: Path, history) -> None:
    """One row per epoch; a multi-label run has its metrics instead of top-1/top-5."""
    columns = COLUMNS
    if is_multilabel(history):
        columns = tuple(c for c in COLUMNS if c not in ("valid_top1", "valid_top5")) + MULTILABEL_COLUMNS
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for m in history:
            writer.writerow(["" if getattr(m, c) is None else getattr(m, c) for c in columns])


def write_training_report(folder: Path, history, best_epoch: int, classes: list[str],
                          best_predictions: torch.Tensor | None, samples: list[tuple[torch.Tensor, int]]) -> None:
    """TRAINING_FILES in `folder`: per-epoch metrics, curves with the saved epoch marked, the validation confusion
    matrix of that epoch (multi-class runs), and augmented training images (uint8 CHW, class index) as the model
    saw them."""
    write_metrics_csv(folder / METRICS_CSV, history)
    plot_training_curves(folder / CURVES_PNG, history, best_epoch)
    if not is_multilabel(history):
        write_validation_confusion(folder, best_epoch, classes, best_predictions)
    images = [image.permute(1, 2, 0).numpy() for image, _ in samples]
    plot_image_grid(folder / TRAINING_IMAGES_PNG, images, [classes[label] for _, label in samples],
                    columns=MOSAIC_PER_CLASS, title="Training images after augmentation (what the model sees)")


def write_validation_confusion(folder: Path, best_epoch: int, classes: list[str],
                               best_predictions: torch.Tensor | None) -> None:
    pairs = np.zeros((0, 2), dtype=np.int64) if best_predictions is None else best_predictions.numpy()
    matrix = confusion_from_pairs(pairs, len(classes))
    write_confusion_csv(folder / VALID_CONFUSION_CSV, matrix, classes)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    plot_confusion_matrix(folder / VALID_CONFUSION_PNG, matrix, classes,
                          f"Validation, best epoch {best_epoch}: accuracy {accuracy:.1%}, {int(matrix.sum())} images")


def plot_training_curves(path: Path, history, best_epoch: int | None = None) -> None:
    plt = _pyplot()
    epochs = [m.epoch for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m.train_loss for m in history], "o-", label="training")
    loss_ax.plot(epochs, [m.valid_loss for m in history], "o-", label="validation")
    if is_multilabel(history):
        loss_ax.set(title="Loss", xlabel="epoch", ylabel="binary cross-entropy")
        acc_ax.plot(epochs, [m.train_accuracy for m in history], "o-", label="training exact set")
        for column, label in MULTILABEL_CURVES.items():
            acc_ax.plot(epochs, [getattr(m, column) for m in history], "o-", label=label)
    else:
        loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
        acc_ax.plot(epochs, [m.train_accuracy for m in history], "o-", label="training top-1")
        acc_ax.plot(epochs, [m.valid_top1 for m in history], "o-", label="validation top-1")
        if history and history[0].valid_top5 is not None:
            acc_ax.plot(epochs, [m.valid_top5 for m in history], "o-", label="validation top-5")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        if best_epoch:
            ax.axvline(best_epoch, color="tab:green", linestyle="--", label=f"saved model (epoch {best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    _save(fig, path)


# --- confusion matrices --------------------------------------------------------------------------------------------

def confusion_from_pairs(pairs: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (rows: true class, columns: predicted) of (true, predicted) class-index pairs; pairs out of range
    (a checkpoint is not trusted) are left out."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    pairs = pairs[((pairs >= 0) & (pairs < num_classes)).all(axis=1)]
    flat = np.bincount(pairs[:, 0] * num_classes + pairs[:, 1], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def write_confusion_csv(path: Path, matrix: np.ndarray, labels: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["true label", *labels])
        for label, row in zip(labels, matrix):
            writer.writerow([label, *(int(v) for v in row)])


def row_normalized(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the share of a true class given each prediction); empty rows stay 0."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


def top_confusions(matrix: np.ndarray, labels: list[str], k: int = 20) -> list[dict]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class), largest first."""
    off = np.array(matrix, dtype=np.int64, copy=True)
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None, kind="stable")[::-1][:k]
    totals = matrix.sum(axis=1)
    result = []
    for index in flat:
        row, column = divmod(int(index), off.shape[1])
        if off[row, column] == 0:
            break
        result.append({"true": labels[row], "predicted": labels[column], "count": int(off[row, column]),
                       "share": float(off[row, column] / totals[row])})
    return result


def most_confused_classes(matrix: np.ndarray, count: int = MATRIX_CLASSES) -> np.ndarray:
    """Indices of the `count` classes with the most errors (as true or as predicted class), in class order."""
    if len(matrix) <= count:
        return np.arange(len(matrix))
    errors = matrix.sum(axis=0) + matrix.sum(axis=1) - 2 * np.diag(matrix)
    return np.sort(np.argsort(-errors, kind="stable")[:count])


def plot_confusion_matrix(path: Path, matrix: np.ndarray, labels: list[str], title: str,
                          normalize: bool = False) -> None:
    """Counts (or row shares) with numbers in the cells. Over MATRIX_CLASSES classes, the sub-matrix of the most
    confused classes (a 1000x1000 picture shows nothing)."""
    plt = _pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    shares = row_normalized(matrix)
    keep = most_confused_classes(matrix)
    if len(keep) < len(matrix):
        title += f"\n(the {len(keep)} of {len(matrix)} classes with the most errors)"
    shown = (shares if normalize else matrix)[np.ix_(keep, keep)]
    count = len(keep)
    side = min(16.0, max(5.0, 0.42 * count + 2.5))
    fig, ax = plt.subplots(figsize=(side, side))
    display = ConfusionMatrixDisplay(shown, display_labels=[str(labels[i])[:20] for i in keep])
    display.plot(ax=ax, include_values=True, cmap="Blues", colorbar=False, values_format=".2f" if normalize else "d",
                 xticks_rotation="vertical" if count > 10 else "horizontal")
    if count > 15:  # small numbers for many cells
        for text in display.text_.ravel():
            text.set_fontsize(7)
    ax.set(title=title, xlabel="predicted label", ylabel="true label" + (" (each row sums to 1)" if normalize else ""))
    fig.tight_layout()
    _save(fig, path)


def plot_label_confusion(path: Path, confusion) -> None:
    """A multi-label evaluation's per-class decisions (a DataFrame: a row per class, columns true/false positives
    and negatives), as a table of cells."""
    plt = _pyplot()
    count = len(confusion)
    fig, ax = plt.subplots(figsize=(7, min(24.0, max(3.0, 0.4 * count + 1.5))))
    ax.imshow(confusion.to_numpy(), cmap="Blues", aspect="auto")
    ax.set_xticks(range(4), [c.replace(" ", "\n") for c in confusion.columns])
    ax.set_yticks(range(count), [str(name) for name in confusion.index])
    if count <= 40:
        for (r, c), value in np.ndenumerate(confusion.to_numpy()):
            ax.text(c, r, str(value), ha="center", va="center")
    ax.set(title="Per-class decisions (multi-label)")
    fig.tight_layout()
    _save(fig, path)


# --- images --------------------------------------------------------------------------------------------------------

def plot_image_grid(path: Path, images: list[np.ndarray], captions: list[str], columns: int, title: str) -> None:
    """uint8 HWC images in a grid, each captioned."""
    plt = _pyplot()
    columns = max(1, min(columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    # Constrained layout keeps the title clear of the first row (tight_layout ignores a suptitle).
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, caption in zip(axes.ravel(), images, captions):
        ax.imshow(image, interpolation="nearest" if max(image.shape[:2]) < 64 else "antialiased")
        ax.set_title(caption, fontsize=9)
    if not images:
        axes[0, 0].text(0.5, 0.5, "no image", ha="center", va="center")
    fig.suptitle(title)
    _save(fig, path)


# --- one-vs-rest curves ---------------------------------------------------------------------------------------------

def plot_one_vs_rest_curves(path: Path, y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Precision-recall and ROC curves, one class against the rest, with average precision and ROC AUC per class
    (returned, {class: {"average_precision", "roc_auc"}}, for classes with positives and negatives). Over
    CURVE_CLASSES classes, the curves of the CURVE_CLASSES classes with the lowest ROC AUC are drawn."""
    plt = _pyplot()
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    curves = {}
    for index, name in enumerate(classes):
        positive = y_true == index
        if positive.all() or not positive.any():
            continue
        scores = probabilities[:, index]
        fpr, tpr, _ = roc_curve(positive, scores)
        precision, recall, _ = precision_recall_curve(positive, scores)
        curves[name] = {"roc": (fpr, tpr), "pr": (recall, precision), "roc_auc": float(auc(fpr, tpr)),
                        "average_precision": float(average_precision_score(positive, scores))}
    drawn = sorted(curves, key=lambda c: curves[c]["roc_auc"])[:CURVE_CLASSES]
    drawn = [c for c in classes if c in drawn]
    fig, (pr_ax, roc_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name in drawn:
        c = curves[name]
        pr_ax.plot(*c["pr"], label=f"{str(name)[:20]} (AP {c['average_precision']:.3f})")
        roc_ax.plot(*c["roc"], label=f"{str(name)[:20]} (AUC {c['roc_auc']:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    note = "" if len(drawn) == len(curves) else f" ({len(drawn)} of {len(curves)} classes: lowest AUC)"
    pr_ax.set(title="Precision-recall, one class vs. rest" + note, xlabel="recall", ylabel="precision",
              xlim=(0, 1), ylim=(0, 1.02))
    roc_ax.set(title="ROC, one class vs. rest" + note, xlabel="false positive rate", ylabel="true positive rate",
               xlim=(0, 1), ylim=(0, 1.02))
    for ax in (pr_ax, roc_ax):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8, loc="lower left" if ax is pr_ax else "lower right")
    fig.tight_layout()
    _save(fig, path)
    return {name: {"average_precision": c["average_precision"], "roc_auc": c["roc_auc"]} for name, c in curves.items()}

"""Human-readable training records written next to the model: per-epoch CSV and curves PNG."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "train_images_per_second",
           "valid_loss", "valid_top1", "valid_top5", "data_wait_fraction", "seconds")
MULTILABEL_COLUMNS = ("valid_iou", "valid_f1_micro", "valid_f1_macro", "valid_map", "valid_exact_match")
MULTILABEL_CURVES = {"valid_iou": "validation IoU", "valid_f1_micro": "validation F1 micro",
                     "valid_f1_macro": "validation F1 macro", "valid_map": "validation mAP",
                     "valid_exact_match": "validation exact set"}


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


def plot_training_curves(path: Path, history) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: compute nodes have no display
    import matplotlib.pyplot as plt

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
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Human-readable training records written next to the model: per-epoch CSV and curves PNG."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = ("epoch", "lr", "train_loss", "train_accuracy", "train_images_per_second",
           "valid_loss", "valid_top1", "valid_top5", "data_wait_fraction", "seconds")


def write_metrics_csv(path: Path, history) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for m in history:
            writer.writerow(["" if getattr(m, c) is None else getattr(m, c) for c in COLUMNS])


def plot_training_curves(path: Path, history) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: compute nodes have no display
    import matplotlib.pyplot as plt

    epochs = [m.epoch for m in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [m.train_loss for m in history], "o-", label="training")
    loss_ax.plot(epochs, [m.valid_loss for m in history], "o-", label="validation")
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

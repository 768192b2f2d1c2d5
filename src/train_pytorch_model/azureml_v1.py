"""Optional per-epoch metrics for Azure ML SDK v1 (azureml-core) runs, under the original's names.

SDK v1 is out of support and not a dependency. When `azureml.core` is installed and the
process runs inside a live v1 run, each epoch is logged with `run.log_row` under the metric
names the designer module used, so existing dashboards and charts keep working. Everywhere
else (no azureml-core, an offline run, a rank other than 0) this is a silent no-op; MLflow
logging, done by the trainer, is the supported channel.
"""

from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

# Name of the v1 table metric that receives one row per epoch.
TABLE_NAME = "Training metrics"

# trainer key -> the original's metric name, in the original's order.
V1_NAMES = {
    "lr": "learning rate",
    "train_images_per_second": "Train images per second",
    "train_loss": "Train loss",
    "train_error": "Train error",
    "valid_loss": "Valid loss",
    "valid_top1": "Top-1 validation accuracy",
    "valid_top5": "Top-5 validation accuracy",
}


# A multi-label run (which the original did not have): its metrics instead of top-1/top-5.
MULTILABEL_V1_NAMES = {
    **{k: v for k, v in V1_NAMES.items() if k not in ("valid_top1", "valid_top5")},
    "valid_iou": "Validation IoU", "valid_f1_micro": "Validation F1 micro", "valid_f1_macro": "Validation F1 macro",
    "valid_map": "Validation mAP", "valid_exact_match": "Validation exact set accuracy",
}


def v1_metric_row(metrics: dict) -> dict[str, float]:
    """Map the trainer's epoch metrics to the original's names and order (pure)."""
    values = dict(metrics)
    values["train_error"] = 1.0 - float(metrics["train_accuracy"])
    if "valid_iou" in values:
        return {v1_name: float(values[key]) for key, v1_name in MULTILABEL_V1_NAMES.items()}
    if values.get("valid_top5") is None:
        values["valid_top5"] = 1.0  # under 5 classes every label is in the top 5, as the original logged
    return {v1_name: float(values[key]) for key, v1_name in V1_NAMES.items()}


@functools.lru_cache(maxsize=1)
def live_v1_run():
    """The current azureml-core run, or None when there is no live one."""
    try:
        from azureml.core import Run
    except ImportError:
        return None
    try:
        run = Run.get_context()
    except Exception as exc:  # a broken v1 install must not stop training
        log.debug("azureml-core run context unavailable: %s", exc)
        return None
    # Outside a job, get_context() returns an offline run that only prints.
    if type(run).__name__ == "_OfflineRun" or str(getattr(run, "id", "")).startswith("OfflineRun"):
        return None
    return run


def log_epoch_v1(epoch: int, metrics: dict) -> None:
    """Log one row for `epoch` (1-based) to a live v1 run; do nothing otherwise."""
    row = v1_metric_row(metrics)  # mapped first, so a missing key shows up in local runs too
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return  # like the original, only the first process reports
    run = live_v1_run()
    if run is None:
        return
    try:
        run.log_row(TABLE_NAME, epoch=epoch, **row)
    except Exception as exc:  # v1 logging is best effort
        log.warning("azureml-core metric logging failed: %s: %s", type(exc).__name__, exc)

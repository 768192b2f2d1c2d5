"""`evaluate` for a multi-label model's scored table (docs/multilabel.md).

A scored table is multi-label when its parquet metadata says so (`score` writes it) or, read from CSV, when
every scored `Scored Labels` cell is JSON list text. True labels (`category`): JSON list text, or one class
name (a one-label set); empty: unlabeled. Predicted sets are the `Scored Labels` cells (the threshold `score`
applied); average precision uses the probabilities.

metrics.json: `task`, `iou` (AutoML's primary metric), `accuracy` (exact set), micro and macro
precision/recall/F1, `map`, and per class precision/recall/F1/average precision/support.
confusion_matrix.csv/png: per class, the images that are true/false positives/negatives (a multi-label
model has no single confusion matrix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidDatasetError, NotLabeledDatasetError, quote
from .label_sets import as_label_list
from .multilabel_metrics import per_class, summary
from .predictions import (
    ERROR_COLUMN,
    LABEL_COLUMN,
    SCORED_LABELS,
    TASK_ATTR,
    THRESHOLD_ATTR,
    classes_of,
    probability_column,
)

if TYPE_CHECKING:
    import pandas as pd

CONFUSION_COLUMNS = ("true positive", "false positive", "false negative", "true negative")


def is_multilabel_table(table: pd.DataFrame) -> bool:
    if table.attrs.get(TASK_ATTR) == "multilabel":
        return True
    if SCORED_LABELS not in table.columns:
        return False
    cells = [c for c in table[SCORED_LABELS] if isinstance(c, str) and c]
    return bool(cells) and all(as_label_list(c) is not None for c in cells)


def label_set(value, where: str) -> list[str] | None:
    """A cell's label set; None when empty (unlabeled / unscored)."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    names = as_label_list(value)
    if names is None:
        return [str(value)]
    if not all(isinstance(n, str) for n in names):
        raise InvalidDatasetError(f"{where}: {quote(value)} is not a list of class names.")
    return names


def evaluate_multilabel_table(table: pd.DataFrame, label_column: str = LABEL_COLUMN) -> tuple[dict, pd.DataFrame]:
    import numpy as np
    import pandas as pd

    from .evaluate import checked_probabilities

    classes = classes_of(table.columns)
    if not classes:
        raise InvalidDatasetError("The table has no 'Scored Probabilities_<class>' columns; give the output of "
                                  "`score`.")
    if label_column not in table.columns:
        raise NotLabeledDatasetError(
            f"The scored table has no label column '{label_column}' (columns: {list(table.columns)[:8]}...). "
            "Score a labeled multi-label table or MLTable, or name the label column with --label-column."
        )
    truth_sets = [label_set(v, f"Row {i}, column {quote(label_column)}") for i, v in enumerate(table[label_column])]
    predicted_sets = [label_set(v, f"Row {i}, column {quote(SCORED_LABELS)}")
                      for i, v in enumerate(table[SCORED_LABELS])]
    errors = [str(e) if isinstance(e, str) else "" for e in table[ERROR_COLUMN]] if ERROR_COLUMN in table.columns \
        else [""] * len(table)
    labeled = np.array([t is not None for t in truth_sets])
    scored = np.array([p is not None and e == "" for p, e in zip(predicted_sets, errors)])
    use = labeled & scored
    if not use.any():
        raise InvalidDatasetError(f"No row has both a true label set in '{label_column}' and a prediction "
                                  f"({int(labeled.sum())} labeled, {int(scored.sum())} scored of {len(table)}).")
    probabilities = checked_probabilities(table, use, [probability_column(c) for c in classes])
    # True labels the model does not know count as misses: a column never predicted, probability 0.
    unknown = sorted({n for i in np.flatnonzero(use) for n in truth_sets[i]} - set(classes))
    labels = classes + unknown
    index = {name: i for i, name in enumerate(labels)}
    truth = np.zeros((int(use.sum()), len(labels)), dtype=bool)
    predicted = np.zeros_like(truth)
    for row, i in enumerate(np.flatnonzero(use)):
        truth[row, [index[n] for n in truth_sets[i]]] = True
        predicted[row, [index[n] for n in predicted_sets[i] if n in index]] = True
    probabilities = np.hstack([probabilities, np.zeros((len(truth), len(unknown)))])
    # The predicted sets are the table's own; the threshold `score` used is shown where the table recorded it (a
    # Parquet file does, a CSV keeps no metadata: None, shown as not recorded, rather than a guess).
    threshold = float(table.attrs[THRESHOLD_ATTR]) if THRESHOLD_ATTR in table.attrs else None
    overall = summary(truth, probabilities, predicted=predicted)
    micro = _averaged(truth, predicted, "micro")
    macro = _averaged(truth, predicted, "macro")
    classwise = per_class(truth, probabilities, predicted=predicted)
    metrics = {
        "task": "multilabel",
        "rows": int(len(table)), "evaluated_rows": int(use.sum()),
        "unlabeled_rows": int((~labeled).sum()), "unscored_rows": int((labeled & ~scored).sum()),
        "classes": classes, "labels_unknown_to_model": unknown, "threshold": threshold,
        "iou": overall["iou"], "accuracy": overall["exact_match"], "map": overall["map"],
        "micro": micro, "macro": macro,
        "per_class": {label: {"precision": classwise["precision"][i], "recall": classwise["recall"][i],
                              "f1": classwise["f1"][i], "average_precision": classwise["average_precision"][i],
                              "support": int(classwise["support"][i])} for i, label in enumerate(labels)},
    }
    counts = np.stack([(truth & predicted).sum(0), (~truth & predicted).sum(0), (truth & ~predicted).sum(0),
                       (~truth & ~predicted).sum(0)], axis=1)
    confusion = pd.DataFrame(counts, index=pd.Index(labels, name="label"), columns=list(CONFUSION_COLUMNS))
    return metrics, confusion


def _averaged(truth, predicted, average: str) -> dict:
    import warnings

    from sklearn.metrics import precision_recall_fscore_support

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, _ = precision_recall_fscore_support(truth, predicted, average=average, zero_division=0)
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def flat_metrics(metrics: dict) -> dict:
    """The headline numbers logged to MLflow."""
    return {"iou": metrics["iou"], "exact_match_accuracy": metrics["accuracy"], "map": metrics["map"],
            "micro_f1": metrics["micro"]["f1"], "macro_f1": metrics["macro"]["f1"],
            "micro_precision": metrics["micro"]["precision"], "micro_recall": metrics["micro"]["recall"],
            "macro_precision": metrics["macro"]["precision"], "macro_recall": metrics["macro"]["recall"],
            "evaluated_rows": metrics["evaluated_rows"]}


def summary_text(metrics: dict, folder) -> str:
    from pathlib import Path

    lines = [f"Evaluated {metrics['evaluated_rows']} of {metrics['rows']} rows (multi-label, threshold "
             f"{threshold_text(metrics['threshold'])}).",
             f"IoU {metrics['iou']:.3f}, exact-set accuracy {metrics['accuracy']:.2%}, mAP {metrics['map']:.3f}",
             f"Micro F1 {metrics['micro']['f1']:.3f}, macro F1 {metrics['macro']['f1']:.3f}",
             f"{'class':>16}  precision  recall     f1     AP  support"]
    for label, m in list(metrics["per_class"].items())[:50]:
        ap = "    -" if m["average_precision"] is None else f"{m['average_precision']:5.3f}"
        lines.append(f"{label[:16]:>16}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {ap}  "
                     f"{m['support']:7d}")
    lines.append(f"Metrics: {Path(folder) / 'metrics.json'}")
    lines.append(f"Report (open it in a browser): {Path(folder) / 'report.html'}")
    return "\n".join(lines)


def threshold_text(threshold: float | None) -> str:
    return "not recorded" if threshold is None else f"{threshold:g}"

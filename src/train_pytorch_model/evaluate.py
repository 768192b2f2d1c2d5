"""`evaluate`: a scored table (output of `score`) with true labels -> classification metrics
(designer's "Evaluate Model" for a multi-class image classifier; a multi-label model's table is evaluated by
evaluate_multilabel.py).

Input: the `score` output folder, or a `.parquet`/`.csv` file with the same columns. The true
labels are in `--label-column` (default `category`, which `score` fills from a labeled image
directory); the predictions in `Scored Labels` and `Scored Probabilities_<class>`.

Output folder:
- `metrics.json`: counts, accuracy, top-k accuracy, macro and weighted precision/recall/F1,
  log loss, and per-class precision/recall/F1/support;
- `per_class_metrics.csv`, `confusion_matrix.csv` (rows: true label, columns: predicted),
  `confusion_matrix.png` (counts) and `confusion_matrix_normalized.png` (each true class's row as shares;
  over 30 classes both show the 30 classes with the most errors), `pr_roc_curves.png` (one class vs. the rest);
- `report.html`: one self-contained page of all of it (images embedded, no network; phones and print), with the
  largest confusions and a gallery of the most confidently wrong images (`confident_mistakes.png` too). Given
  `--trained-model` and `--image-directory` (the model and images that `score` was given), the gallery shows each
  image as the model saw it and a Grad-CAM heat map of what drove the wrong prediction; without them, their names.
The headline metrics and the files are also logged to MLflow (the job's run in Azure ML).

Rows without a true label, and images that could not be scored (non-empty `error`), are left
out of every metric and counted in `metrics.json` (`unlabeled_rows`, `unscored_rows`). A probability
that is not a number in [0, 1] is an InvalidDatasetError naming its row and column.

The MLflow run is named after what it evaluated and, when the scored table names the run that
trained the model (`score` records it), tagged `train_pytorch_model.training_run_id`; that
training run gets `train_pytorch_model.evaluation_run_id` back.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidDatasetError, InvalidParameterError, NotLabeledDatasetError, quote
from .evaluate_multilabel import evaluate_multilabel_table, is_multilabel_table
from .evaluate_multilabel import flat_metrics as multilabel_flat_metrics
from .evaluate_multilabel import summary_text as multilabel_summary_text
from .legacy_format import open_regular
from .output_folder import reserved_output
from .predictions import (
    ERROR_COLUMN,
    LABEL_COLUMN,
    PROBABILITY_PREFIX,
    SCORED_CSV,
    SCORED_LABELS,
    SCORED_PARQUET,
    TRAINING_RUN_ATTR,
    classes_of,
    probability_column,
    unescape_csv,
)

if TYPE_CHECKING:  # numpy and pandas are imported where used: `evaluate --help` and usage errors stay instant
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class_metrics.csv"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_NORMALIZED_PNG = "confusion_matrix_normalized.png"
CURVES_PNG = "pr_roc_curves.png"
MISTAKES_PNG = "confident_mistakes.png"
REPORT_HTML = "report.html"
GALLERY_SIZE = 12  # most confidently wrong images in the report
TRAINING_RUN_TAG = TRAINING_RUN_ATTR
EVALUATION_RUN_TAG = "train_pytorch_model.evaluation_run_id"
PROBABILITY_TOLERANCE = 1e-6  # float32 softmax written as float64 may exceed 1 by rounding


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scored-data", required=True, type=Path,
                        help=f"output folder of `score`, or a {SCORED_PARQUET} / {SCORED_CSV} file")
    parser.add_argument("--evaluation", required=True, type=Path, help="output folder (new or empty) for the metrics")
    parser.add_argument("--label-column", default=LABEL_COLUMN,
                        help="column with the true labels (default %(default)s)")
    parser.add_argument("--top-k", default="1,3,5",
                        help="comma-separated k for top-k accuracy; values above the class count are left out "
                             "(default %(default)s)")
    parser.add_argument("--trained-model", type=Path, default=None,
                        help="the model that scored the table: heat maps for the report's gallery of mistakes "
                             "(with --image-directory)")
    parser.add_argument("--image-directory", type=Path, default=None,
                        help="the images that were scored (what score's --image-directory was): the report's gallery "
                             "shows them (with --trained-model)")
    parser.add_argument("--mlflow-tracking-uri", default=None,
                        help="MLflow tracking URI (default: the active run / MLFLOW_TRACKING_URI / "
                             "sqlite:///mlflow.db)")


def run(args: argparse.Namespace) -> int:
    ks = parse_top_k(args.top_k)
    if (args.trained_model is None) != (args.image_directory is None):
        given, missing = ("--trained-model", "--image-directory") if args.image_directory is None \
            else ("--image-directory", "--trained-model")
        raise InvalidParameterError(missing.lstrip("-").replace("-", " ").capitalize(), None,
                                    f"is needed with {given}: the gallery's heat maps take both the model and images")
    with reserved_output(args.evaluation, inputs=[args.scored_data, args.trained_model, args.image_directory]):
        table = read_scored_table(args.scored_data)
        if is_multilabel_table(table):  # a multi-label model's table: evaluate_multilabel.py
            metrics, confusion = evaluate_multilabel_table(table, args.label_column)
            write_evaluation(args.evaluation, metrics, confusion,
                             title=f"Evaluation report: {Path(args.scored_data).name}")
            log_to_mlflow(args.evaluation, metrics, args.mlflow_tracking_uri, table.attrs.get(TRAINING_RUN_ATTR))
            print(multilabel_summary_text(metrics, args.evaluation))
            return 0
        metrics, confusion = evaluate_table(table, args.label_column, ks)
        mistakes = confident_mistakes(table, args.label_column)
        pictures = None
        if args.trained_model is not None:
            from .evaluation_report import mistake_pictures  # torch: only when pictures are asked for

            pictures = mistake_pictures(mistakes, metrics["classes"], args.trained_model, args.image_directory)
        write_evaluation(args.evaluation, metrics, confusion, table=table, label_column=args.label_column,
                         mistakes=mistakes, pictures=pictures,
                         title=f"Evaluation report: {Path(args.scored_data).name}")
    log_to_mlflow(args.evaluation, metrics, args.mlflow_tracking_uri, table.attrs.get(TRAINING_RUN_ATTR))
    print(summary_text(metrics, args.evaluation))
    return 0


def parse_top_k(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise InvalidParameterError("Top k", text, "must be comma-separated integers >= 1, e.g. 1,3,5")
    return ks


def read_scored_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        for name in (SCORED_PARQUET, SCORED_CSV):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise InvalidDatasetError(f"Scored data folder '{path}' has neither {SCORED_PARQUET} nor {SCORED_CSV}; "
                                      "give the output folder of `score`.")
    if not os.path.lexists(path):
        raise InvalidDatasetError(f"Scored data '{path}' does not exist.")
    try:
        with open_regular(path, InvalidDatasetError, max_bytes=None) as handle:  # the input opener: no FIFO
            if path.suffix.lower() == ".csv":
                # Labels stay text: "0".."9" must not become numbers, or they no longer match the column names.
                return unescape_csv(pd.read_csv(handle, dtype=str, keep_default_na=False))
            return pd.read_parquet(handle)
    except InvalidDatasetError:
        raise
    except Exception as exc:  # pyarrow/pandas raise many types for one cause
        raise InvalidDatasetError(
            f"Scored data '{path}' cannot be read as a table: {type(exc).__name__}: {str(exc)[:300]}.") from None


def evaluate_table(table: pd.DataFrame, label_column: str = LABEL_COLUMN,
                   ks: list[int] = (1, 3, 5)) -> tuple[dict, pd.DataFrame]:
    """(metrics, confusion matrix as a labeled DataFrame) for a scored table."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    classes = classes_of(table.columns)
    probability_columns = [probability_column(c) for c in classes]
    if SCORED_LABELS not in table.columns or not classes:
        raise InvalidDatasetError(f"The table has no '{SCORED_LABELS}' and '{PROBABILITY_PREFIX}<class>' columns; "
                                  "give the output of `score`.")
    if label_column not in table.columns:
        raise NotLabeledDatasetError(
            f"The scored table has no label column '{label_column}' (columns: {list(table.columns)[:8]}...). "
            "Score a labeled image directory (<class>/<image> folders or a labeled ImageDirectory), "
            "or name the label column with --label-column."
        )
    true = table[label_column].map(_text)
    predicted = table[SCORED_LABELS].map(_text)
    errors = table[ERROR_COLUMN].map(_text) if ERROR_COLUMN in table.columns else pd.Series("", index=table.index)
    labeled = true != ""
    scored = (predicted != "") & (errors == "")
    use = (labeled & scored).to_numpy()
    if not use.any():
        raise InvalidDatasetError(f"No row has both a true label in '{label_column}' and a prediction "
                                  f"({int(labeled.sum())} labeled, {int(scored.sum())} scored of {len(table)}).")
    y_true = true[use].to_numpy(dtype=object)
    y_pred = predicted[use].to_numpy(dtype=object)
    strange = sorted(set(y_pred) - set(classes))
    if strange:  # `score` only predicts its classes: the table was edited, or its columns come from another model
        row = int(np.flatnonzero(use)[list(y_pred).index(strange[0])])
        raise InvalidDatasetError(f"Row {row}: '{SCORED_LABELS}' is {quote(strange[0])}, not one of the classes of "
                                  f"the '{PROBABILITY_PREFIX}<class>' columns ({len(strange)} such labels); give the "
                                  "output of `score` as it wrote it.")
    probabilities = checked_probabilities(table, use, probability_columns)

    # Labels the model does not know still count (as misses) and get their own confusion-matrix row.
    unknown = sorted(set(y_true) - set(classes))
    labels = classes + unknown
    class_index = {name: i for i, name in enumerate(classes)}
    true_index = np.array([class_index.get(label, -1) for label in y_true])
    known = true_index >= 0
    true_probability = np.where(known, probabilities[np.arange(len(y_true)), np.maximum(true_index, 0)], np.nan)
    # Rank of the true class: how many classes score strictly higher.
    rank = np.where(known, (probabilities > true_probability[:, None]).sum(axis=1), len(classes))
    top_k = {str(k): float(np.mean(rank < k)) for k in ks if k <= len(classes)}

    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [i for i, label in enumerate(labels) if support[i] > 0 or (y_pred == label).any()]

    def average(weights) -> dict:
        w = np.asarray(weights, dtype=np.float64)
        return {name: float(np.average(values[present], weights=w[present])) if w[present].sum() else 0.0
                for name, values in (("precision", precision), ("recall", recall), ("f1", f1))}

    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    eps = 1e-15
    log_loss = float(-np.mean(np.log(np.clip(true_probability[known], eps, 1.0)))) if known.any() else None
    metrics = {
        "rows": int(len(table)),
        "evaluated_rows": int(use.sum()),
        "unlabeled_rows": int((~labeled).sum()),
        "unscored_rows": int((labeled & ~scored).sum()),
        "classes": classes,
        "labels_unknown_to_model": unknown,
        "accuracy": float(np.mean(y_true == y_pred)),
        "top_k_accuracy": top_k,
        "macro": average(np.ones(len(labels))),
        "weighted": average(support),
        "log_loss": log_loss,
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
    }
    confusion = pd.DataFrame(matrix, index=pd.Index(labels, name="true label"), columns=labels)
    return metrics, confusion


def evaluated_rows(table: pd.DataFrame, label_column: str) -> np.ndarray:
    """Which rows count: a true label, a prediction and no error."""
    import pandas as pd

    errors = table[ERROR_COLUMN].map(_text) if ERROR_COLUMN in table.columns else pd.Series("", index=table.index)
    return ((table[label_column].map(_text) != "") & (table[SCORED_LABELS].map(_text) != "")
            & (errors == "")).to_numpy()


def labeled_probabilities(table: pd.DataFrame, label_column: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(true class index, probabilities) of the evaluated rows whose true label is one of the model's classes."""
    import numpy as np

    use = evaluated_rows(table, label_column)
    probabilities = checked_probabilities(table, use, [probability_column(c) for c in classes])
    index = {name: i for i, name in enumerate(classes)}
    y_true = np.array([index.get(v, -1) for v in table.loc[use, label_column].map(_text)], dtype=np.int64)
    return y_true[y_true >= 0], probabilities[y_true >= 0]


def checked_probabilities(table: pd.DataFrame, use: np.ndarray, columns: list[str]) -> np.ndarray:
    """The probabilities of the rows in use, each a number in [0, 1]; else an error naming the first bad cell."""
    import numpy as np
    import pandas as pd

    values = table.loc[use, columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1 + PROBABILITY_TOLERANCE))
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        position = int(np.flatnonzero(use)[row])
        raise InvalidDatasetError(
            f"Row {position} (counting from 0) of the scored table, column {quote(columns[column])}: "
            f"{quote(table[columns[column]].iloc[position])} is not a probability (a number from 0 to 1); "
            f"{int(bad.any(axis=1).sum())} rows have such values. Score the images again with `score`.")
    return values


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def confident_mistakes(table: pd.DataFrame, label_column: str = LABEL_COLUMN,
                       count: int = GALLERY_SIZE) -> pd.DataFrame:
    """The `count` wrongly predicted rows with the highest predicted probability, most confident first: columns
    `file` (when the table has it), `true`, `predicted`, `probability`."""
    import numpy as np
    import pandas as pd

    true, predicted = table[label_column].map(_text), table[SCORED_LABELS].map(_text)
    wrong = evaluated_rows(table, label_column) & (true != predicted).to_numpy()
    columns = [probability_column(c) for c in classes_of(table.columns)]
    probabilities = table.loc[wrong, columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    result = pd.DataFrame({
        "file": table.loc[wrong, "file"].map(_text) if "file" in table.columns else "",
        "true": true[wrong], "predicted": predicted[wrong],
        "probability": probabilities.max(axis=1) if len(probabilities) else np.zeros(0)})
    return result.sort_values("probability", ascending=False, kind="stable").head(count).reset_index(drop=True)


def write_evaluation(out: Path, metrics: dict, confusion: pd.DataFrame, *, title: str,
                     table: pd.DataFrame | None = None, label_column: str = LABEL_COLUMN,
                     mistakes: pd.DataFrame | None = None, pictures: list | None = None) -> None:
    """The output folder (module docstring). A multi-class evaluation gives the scored `table` and its `mistakes`
    (the pictures and the gallery come from them); a multi-label one needs neither."""
    import pandas as pd

    from . import reports
    from .output_folder import staged_output

    with staged_output(out) as stage:
        # Strict JSON: a NaN or Infinity would be a bug here, and is not JSON for most readers.
        text = json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False)
        (stage / METRICS_FILE).write_text(text + "\n", encoding="utf-8")
        per_class = pd.DataFrame.from_dict(metrics["per_class"], orient="index")
        per_class.index.name = "label"
        per_class.to_csv(stage / PER_CLASS_FILE)
        confusion.to_csv(stage / CONFUSION_CSV)
        if metrics.get("task") == "multilabel":  # per-class decisions; the pictures below are multi-class
            from .evaluation_report import write_multilabel_report_html

            reports.plot_label_confusion(stage / CONFUSION_PNG, confusion)
            write_multilabel_report_html(stage / REPORT_HTML, stage, metrics=metrics, title=title)
            return
        matrix, labels = confusion.to_numpy(), [str(c) for c in confusion.columns]
        caption = f"accuracy {metrics['accuracy']:.1%}, {int(matrix.sum())} images"
        reports.plot_confusion_matrix(stage / CONFUSION_PNG, matrix, labels, f"Confusion matrix ({caption})")
        reports.plot_confusion_matrix(stage / CONFUSION_NORMALIZED_PNG, matrix, labels,
                                      f"Confusion matrix, share of each true class ({caption})", normalize=True)
        classes = metrics["classes"]
        y_true, probabilities = labeled_probabilities(table, label_column, classes)
        curves = reports.plot_one_vs_rest_curves(stage / CURVES_PNG, y_true, probabilities, classes)
        if pictures:
            reports.plot_image_grid(
                stage / MISTAKES_PNG, [p["overlay"] for p in pictures if p],
                [f"{m.true} → {m.predicted} ({m.probability:.0%})" for m, p in
                 zip(mistakes.itertuples(), pictures) if p], columns=4,
                title="Most confidently wrong: true → predicted (probability), heat map of the prediction")
        from .evaluation_report import write_report_html

        write_report_html(stage / REPORT_HTML, stage, metrics=metrics, matrix=matrix, labels=labels, curves=curves,
                          mistakes=mistakes, pictures=pictures, title=title)


def log_to_mlflow(folder: Path, metrics: dict, tracking_uri: str | None, training_run_id: str | None = None) -> None:
    from .tracking import Tracker

    name = f"evaluate {metrics['evaluated_rows']} images, {len(metrics['classes'])} classes"
    tracker = Tracker(True, tracking_uri, run_name=name)
    if training_run_id:
        tracker.set_tags({TRAINING_RUN_TAG: training_run_id,
                          "mlflow.note.content": f"Evaluates the model trained by run {training_run_id}."})
    if metrics.get("task") == "multilabel":
        flat = multilabel_flat_metrics(metrics)
    else:
        flat = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"],
                "macro_precision": metrics["macro"]["precision"], "macro_recall": metrics["macro"]["recall"],
                "weighted_f1": metrics["weighted"]["f1"], "evaluated_rows": metrics["evaluated_rows"]}
        flat.update({f"top_{k}_accuracy": v for k, v in metrics["top_k_accuracy"].items()})
        if metrics["log_loss"] is not None:
            flat["log_loss"] = metrics["log_loss"]
    tracker.log_metrics(flat, step=0)
    for path in sorted(Path(folder).iterdir()):  # the report and every picture in it, too
        if path.is_file():
            tracker.log_artifact(str(path), "evaluation")
    if training_run_id and tracker.run_id:
        tracker.tag_run(training_run_id, {EVALUATION_RUN_TAG: tracker.run_id})
    tracker.close()


def summary_text(metrics: dict, folder: Path) -> str:
    lines = [f"Evaluated {metrics['evaluated_rows']} of {metrics['rows']} rows"
             + (f" ({metrics['unlabeled_rows']} unlabeled, {metrics['unscored_rows']} unscored left out)"
                if metrics["unlabeled_rows"] or metrics["unscored_rows"] else "") + ".",
             f"Accuracy {metrics['accuracy']:.2%}" + "".join(
                 f", top-{k} {v:.2%}" for k, v in metrics["top_k_accuracy"].items() if k != "1"),
             f"Macro precision {metrics['macro']['precision']:.3f}, recall {metrics['macro']['recall']:.3f}, "
             f"F1 {metrics['macro']['f1']:.3f}",
             f"{'class':>16}  precision  recall     f1  support"]
    for label, m in list(metrics["per_class"].items())[:50]:
        lines.append(f"{label[:16]:>16}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    if len(metrics["per_class"]) > 50:
        lines.append(f"... {len(metrics['per_class']) - 50} more classes in {PER_CLASS_FILE}")
    lines.append(f"Metrics: {Path(folder) / METRICS_FILE}; confusion matrix: {Path(folder) / CONFUSION_PNG}")
    lines.append(f"Report (open it in a browser): {Path(folder) / REPORT_HTML}")
    return "\n".join(lines)

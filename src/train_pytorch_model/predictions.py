"""The predictions table that `score` writes, `evaluate` reads and the MLflow model returns.

One shape everywhere, with designer's column names: `Scored Labels` (the most probable class) and
one `Scored Probabilities_<class>` column per class, in the model's class order. A multi-label model's
`Scored Labels` is the predicted label set as JSON list text (`["can", "milk_bottle"]`, `[]` for none):
the classes whose probability (their own sigmoid) reaches the threshold. Torch-free, so `evaluate`
and the CLI's argument parsing do not pay for importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .label_sets import label_set_text

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SCORED_PARQUET = "scored.parquet"
SCORED_CSV = "scored.csv"
LABEL_COLUMN = "category"
SCORED_LABELS = "Scored Labels"
PROBABILITY_PREFIX = "Scored Probabilities_"
ERROR_COLUMN = "error"
EXPLANATION_COLUMN = "explanation"  # `score --explain`: the heat-map PNG of the row, relative to the table's folder
EXPLANATIONS_DIR = "explanations"
# In `DataFrame.attrs`, which pandas keeps in the parquet file's metadata: the MLflow run that trained the model.
TRAINING_RUN_ATTR = "train_pytorch_model.training_run_id"
TASK_ATTR = "train_pytorch_model.task"  # "multilabel" for a multi-label model's table (absent: multi-class)
THRESHOLD_ATTR = "train_pytorch_model.threshold"

# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection); a leading `'`
# itself is escaped too, so that reading the CSV back can strip exactly one.
_ESCAPED_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def probability_column(label: str) -> str:
    """The column holding the probability of class `label`."""
    return f"{PROBABILITY_PREFIX}{label}"


def predicted_labels(probabilities: np.ndarray, classes: list[str], multilabel: bool = False,
                     threshold: float = 0.5) -> list[str]:
    """Each row's `Scored Labels` value: the most probable class, or a multi-label model's set as JSON text."""
    if multilabel:
        return [label_set_text([c for c, p in zip(classes, row) if p >= threshold]) for row in probabilities]
    return [classes[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else []


def classes_of(columns) -> list[str]:
    """The class names of a table's probability columns, in column order."""
    return [c[len(PROBABILITY_PREFIX):] for c in columns if str(c).startswith(PROBABILITY_PREFIX)]


def csv_safe(table: pd.DataFrame) -> pd.DataFrame:
    """A copy for CSV only: text cells that a spreadsheet would run as a formula get a leading `'`
    (`unescape_csv` undoes it). Parquet keeps the true values."""
    safe = table.copy()
    for column in safe.columns:
        if safe[column].dtype == object:
            safe[column] = safe[column].map(_escape)
    return safe


def unescape_csv(table: pd.DataFrame) -> pd.DataFrame:
    """The true values of a table read (as text) from a CSV written through `csv_safe`."""
    return table.map(lambda v: v[1:] if isinstance(v, str) and v.startswith("'") else v)


def _escape(value):
    return "'" + value if isinstance(value, str) and value.startswith(_ESCAPED_STARTS) else value

"""Multi-label metrics (scikit-learn), for the validation pass of every epoch and for `evaluate`.

Inputs are whole-set arrays on the host: `truth` (images x classes, bool) and `probabilities` (images x classes,
one sigmoid per class). A class is predicted when its probability reaches the threshold (0.5, as AutoML).

- iou: AutoML's primary metric for multi-label image classification: the Jaccard index |true ∩ predicted| /
  |true ∪ predicted| per image, averaged over images (an image with no true and no predicted label scores 1).
- f1_micro / f1_macro: F1 over all (image, class) decisions / the mean of the per-class F1s.
- map: mean average precision, the macro average over the classes that have a positive image (average
  precision is undefined for a class without one).
- exact_match: the fraction of images whose predicted set is exactly the true set (subset accuracy).
"""

from __future__ import annotations

import warnings

import numpy as np

DEFAULT_THRESHOLD = 0.5
SUMMARY = ("iou", "f1_micro", "f1_macro", "map", "exact_match")


def predicted_sets(probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    return np.asarray(probabilities) >= threshold


def summary(truth: np.ndarray, probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
            predicted: np.ndarray | None = None) -> dict[str, float]:
    """`predicted`: the predicted sets when already decided (a scored table's), else probabilities >= threshold."""
    from sklearn.metrics import accuracy_score, f1_score, jaccard_score

    truth = np.asarray(truth, dtype=bool)
    predicted = predicted_sets(probabilities, threshold) if predicted is None else predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's "ill-defined" warnings: zero_division says what we want
        return {
            "iou": float(jaccard_score(truth, predicted, average="samples", zero_division=1.0)),
            "f1_micro": float(f1_score(truth, predicted, average="micro", zero_division=0.0)),
            "f1_macro": float(f1_score(truth, predicted, average="macro", zero_division=0.0)),
            "map": mean_average_precision(truth, probabilities),
            "exact_match": float(accuracy_score(truth, predicted)),
        }


def average_precisions(truth: np.ndarray, probabilities: np.ndarray) -> list[float | None]:
    """Average precision per class; None for a class without a positive image."""
    from sklearn.metrics import average_precision_score

    truth = np.asarray(truth, dtype=bool)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    return [float(average_precision_score(truth[:, c], probabilities[:, c])) if truth[:, c].any() else None
            for c in range(truth.shape[1])]


def mean_average_precision(truth: np.ndarray, probabilities: np.ndarray) -> float:
    defined = [ap for ap in average_precisions(truth, probabilities) if ap is not None]
    return float(np.mean(defined)) if defined else 0.0


def per_class(truth: np.ndarray, probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
              predicted: np.ndarray | None = None) -> dict:
    """precision, recall, f1, average_precision (None where undefined) and support, each a list by class."""
    from sklearn.metrics import precision_recall_fscore_support

    truth = np.asarray(truth, dtype=bool)
    predicted = predicted_sets(probabilities, threshold) if predicted is None else predicted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        precision, recall, f1, support = precision_recall_fscore_support(
            truth, predicted, average=None, zero_division=0.0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "average_precision": average_precisions(truth, probabilities), "support": support.tolist()}

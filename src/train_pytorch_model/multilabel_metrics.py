"""Multi-label metrics (scikit-learn), for the validation pass of every epoch and for `evaluate`.

Inputs are whole-set arrays on the host: `truth` (images x classes, bool) and `probabilities` (images x classes,
one sigmoid per class). A class is predicted when its probability reaches the threshold (0.5, as AutoML).

- iou: AutoML's primary metric for multi-label image classification: the Jaccard index |true ∩ predicted| /
  |true ∪ predicted| per image, averaged over images (an image with no true and no predicted label scores 1).
- f1_micro / f1_macro: F1 over all (image, class) decisions / the mean of the per-class F1s.
- map: mean average precision, the macro average over the classes that have a positive image (average
  precision is undefined for a class without one).
- exact_match: the fraction of images whose predicted set is exactly the true set (subset accuracy).

`evaluate` has the whole table and computes them exactly (scikit-learn). Training's validation pass must not hold
every image's probabilities (memory would grow with the validation set, and DDP would gather them on every rank):
it sums, per class, the decisions at the threshold (exact IoU, F1 and exact match) and a histogram of the logits
(`score_bins`), from which `binned_average_precisions` gives each class's AP with tied scores inside a bin, as
if the scores had been rounded to 1/64 of a logit: scikit-learn's AP of the bin indices, to the last digit.
"""

from __future__ import annotations

import warnings

import numpy as np

DEFAULT_THRESHOLD = 0.5
SUMMARY = ("iou", "f1_micro", "f1_macro", "map", "exact_match")
LOGIT_RANGE = 16.0  # sigmoid(±16) is within 1.2e-7 of 0 and 1: logits beyond are ties at the ends
MAX_BINS = 2048  # 1/64 of a logit per bin
HISTOGRAM_CELLS = 1 << 24  # classes x bins x (negatives, positives), int32: 64 MiB at most, 2,048 bins to 4,096 classes


def histogram_bins(num_classes: int) -> int:
    """Bins per class for validation AP: MAX_BINS, fewer when that many classes would make the histogram large."""
    return max(64, min(MAX_BINS, HISTOGRAM_CELLS // (2 * max(num_classes, 1))))


def score_bins(logits, bins: int):
    """Each logit's bin, 0 (lowest) to bins - 1 (torch, on the logits' device). A NaN logit (a model that
    diverged on this batch) lands in a bin too: an index out of range would be a device-side assert on a GPU."""
    scaled = (logits.float().clamp(-LOGIT_RANGE, LOGIT_RANGE) + LOGIT_RANGE) * (bins / (2 * LOGIT_RANGE))
    return scaled.long().clamp_(0, bins - 1)


def binned_average_precisions(histogram: np.ndarray) -> list[float | None]:
    """Each class's average precision from `histogram` (2 x classes x bins: negatives, positives per bin, low to
    high); scikit-learn's formula, sum over thresholds of (recall step) x precision, with each bin one threshold.
    None for a class without a positive image."""
    negatives, positives = (np.cumsum(h[:, ::-1], axis=1, dtype=np.int64) for h in histogram)
    total = positives[:, -1]
    precision = positives / np.maximum(positives + negatives, 1)
    recall_steps = np.diff(positives, axis=1, prepend=0) / np.maximum(total, 1)[:, None]
    ap = (recall_steps * precision).sum(axis=1)
    return [float(a) if t > 0 else None for a, t in zip(ap, total)]


def summary_from_counts(images: float, iou_sum: float, exact: float, decisions: np.ndarray,
                        histogram: np.ndarray) -> dict[str, float]:
    """`summary`'s numbers from a validation pass's sums: `decisions` is 3 x classes (true positives, false
    positives, false negatives), `histogram` as binned_average_precisions takes it."""
    true_pos, false_pos, false_neg = (d.astype(np.float64) for d in decisions)
    f1_denominators = 2 * true_pos + false_pos + false_neg
    f1 = np.divide(2 * true_pos, f1_denominators, out=np.zeros_like(true_pos), where=f1_denominators > 0)
    micro_denominator = f1_denominators.sum()
    f1_micro = float(2 * true_pos.sum() / micro_denominator) if micro_denominator else 0.0
    defined = [ap for ap in binned_average_precisions(histogram) if ap is not None]
    return {"iou": iou_sum / images, "f1_micro": f1_micro, "f1_macro": float(f1.mean()),
            "map": float(np.mean(defined)) if defined else 0.0, "exact_match": exact / images}


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

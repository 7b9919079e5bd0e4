"""Metrics, written out so every number in a report can be checked by hand.

One aggregate function per task type (`TASK_METRICS`); per-example scores come from the task's own
`score`, so the gap, its confidence interval, the slices and the gate are the same code for every
task type. Extraction and generation register their aggregate metrics here when they arrive.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["TASK_METRICS", "task_metrics", "classification_metrics", "expected_calibration_error",
           "reliability_curve", "CALIBRATION_BINS"]

CALIBRATION_BINS = 10


def classification_metrics(predicted: list[str], reference: list[str], labels: list[str]) -> dict:
    """Accuracy, macro- and micro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows = reference, columns = predicted, in `labels` order).

    Macro-F1 averages the per-class F1 over classes present in the reference or the predictions.
    Micro-F1 pools true positives, false positives and false negatives over all classes; with one
    label per example it equals accuracy (every miss is one FP and one FN), which a test checks."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions but {len(reference)} references")
    n = len(reference)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({x for x in predicted + reference if x not in index})
    if unknown:
        raise ValueError(f"labels outside the task's label set: {', '.join(unknown)}")
    confusion = [[0] * len(labels) for _ in labels]
    for p, r in zip(predicted, reference):
        confusion[index[r]][index[p]] += 1
    per_class = {}
    f1s = []
    tp_all = fp_all = fn_all = 0
    for label, i in index.items():
        tp = confusion[i][i]
        predicted_i = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + predicted_i - tp, fn_all + support - tp
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted_i:  # a class absent from both sides says nothing about the model
            f1s.append(f1)
    correct = sum(confusion[i][i] for i in range(len(labels)))
    micro_denominator = 2 * tp_all + fp_all + fn_all
    return {
        "n": n,
        "accuracy": correct / n if n else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "micro_f1": 2 * tp_all / micro_denominator if micro_denominator else None,
        "per_class": per_class,
        "labels": labels,
        "confusion": confusion,
    }


TASK_METRICS: dict[str, Callable[..., dict]] = {"classification": classification_metrics}


def task_metrics(task_type: str, predicted: list[str], reference: list[str], labels: list[str]) -> dict:
    """The aggregate metrics of a task type (see `TASK_METRICS`)."""
    try:
        fn = TASK_METRICS[task_type]
    except KeyError:
        raise ValueError(f"no metrics for task type '{task_type}' (have: {', '.join(TASK_METRICS)})") from None
    return fn(predicted, reference, labels)


def _bin_of(confidence: float, bins: int) -> int:
    # Equal-width bins [0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1]: a confidence of exactly 1 joins the top bin.
    return min(int(confidence * bins), bins - 1)


def reliability_curve(confidences: list[float], correct: list[bool], bins: int = CALIBRATION_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, how many predictions fell in it, their mean
    confidence and how often they were right (None for an empty bin, never a silent zero)."""
    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} correctness flags")
    bad = [c for c in confidences if not 0.0 <= c <= 1.0]
    if bad:
        raise ValueError(f"confidences must lie in [0, 1]; got {bad[0]!r}")
    sums = [[0, 0.0, 0] for _ in range(bins)]  # count, confidence sum, correct count
    for conf, ok in zip(confidences, correct):
        b = sums[_bin_of(conf, bins)]
        b[0] += 1
        b[1] += conf
        b[2] += bool(ok)
    return [
        {"low": k / bins, "high": (k + 1) / bins, "n": n,
         "mean_confidence": s / n if n else None, "accuracy": hits / n if n else None}
        for k, (n, s, hits) in enumerate(sums)
    ]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = CALIBRATION_BINS) -> float | None:
    """ECE with equal-width bins: sum over bins of (share of predictions in the bin) x |accuracy in
    the bin - mean confidence in the bin|. 0 is perfectly calibrated; None when there is nothing."""
    curve = reliability_curve(confidences, correct, bins)
    n = len(confidences)
    if not n:
        return None
    return sum(b["n"] / n * abs(b["accuracy"] - b["mean_confidence"]) for b in curve if b["n"])

"""Metrics, written out so every number in a report can be checked by hand.

One aggregate function per task type (`TASK_METRICS`); per-example scores come from the task's own
`score` (through `example_score`, where an answer the task cannot parse scores 0), so the gap, its
confidence interval, the slices and the gate are the same code for every task type.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["TASK_METRICS", "task_metrics", "classification_metrics", "extraction_metrics", "generation_metrics",
           "example_score", "example_agrees", "parse_answer", "expected_calibration_error", "reliability_curve",
           "CALIBRATION_BINS", "LENGTH_EDGES", "ROW_METRICS", "field_name"]

CALIBRATION_BINS = 10


def classification_metrics(predicted: list[str], reference: list[str], labels: list[str],
                           parse: Callable[[str], str] | None = None) -> dict:
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


# ---- per-example scores, robust to answers the task cannot parse ------------------------------

def parse_answer(task, answer: str) -> str | None:
    """The task's canonical form of a student answer, or None when the task rejects it."""
    from stillroom.tasks.base import ParseError

    try:
        return task.parse(answer)
    except ParseError:
        return None


def example_score(task, prediction: str, reference: str) -> float:
    """`task.score`, with an answer the task cannot parse scoring 0. Classification answers are
    labels already (the scorecard checks them against the label set) and are scored as they are."""
    if task.type == "classification":
        return float(task.score(prediction, reference))
    parsed = parse_answer(task, prediction)
    return 0.0 if parsed is None else float(task.score(parsed, reference))


def example_agrees(task, prediction: str, reference: str) -> bool:
    """`task.agrees`, an unparseable answer never agreeing: for routing, ECE and error lists."""
    if task.type == "classification":
        return bool(task.agrees(prediction, reference))
    parsed = parse_answer(task, prediction)
    return parsed is not None and bool(task.agrees(parsed, reference))


def _valid(answer: str, parse: Callable[[str], str] | None) -> str | None:
    if parse is None:
        return answer
    from stillroom.tasks.base import ParseError

    try:
        return parse(answer)
    except ParseError:
        return None


# ---- extraction -------------------------------------------------------------------------------

def _prf(tp: int, predicted: int, expected: int) -> dict:
    """Precision, recall, F1 from counts; None where the denominator is empty (never a silent 0)."""
    return {"precision": tp / predicted if predicted else None,
            "recall": tp / expected if expected else None,
            "f1": 2 * tp / (predicted + expected) if predicted + expected else None}


def field_name(path: str) -> str:
    """The top-level field a record path belongs to: `address.city` and `items[]` -> `address`, `items`."""
    return path.split(".", 1)[0].split("[", 1)[0]


def extraction_metrics(predicted: list[str], reference: list[str], labels: list[str] | None = None,
                       parse: Callable[[str], str] | None = None) -> dict:
    """Field-level precision, recall and F1 pooled over (field path, value) pairs (micro), the same per
    top-level field (support = the field's pairs in the references), exact match per record and the
    schema validity rate. With `parse` (the task's), a prediction it rejects is invalid: it states
    nothing, so it costs recall and exact match and counts against validity; it is never dropped."""
    from collections import Counter

    from stillroom.tasks.extraction import record_fields

    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions but {len(reference)} references")
    n = len(reference)
    tp = n_pred = n_ref = exact = invalid = 0
    fields: dict[str, list[int]] = {}  # top-level field -> [matched, predicted, in the reference]
    for raw, ref in zip(predicted, reference):
        answer = _valid(raw, parse)
        invalid += answer is None
        pred_pairs = record_fields(answer) if answer is not None else Counter()
        ref_pairs = record_fields(ref)
        both = pred_pairs & ref_pairs
        m, p, r = sum(both.values()), sum(pred_pairs.values()), sum(ref_pairs.values())
        tp, n_pred, n_ref = tp + m, n_pred + p, n_ref + r
        exact += answer is not None and m == p == r
        for slot, pairs in enumerate((both, pred_pairs, ref_pairs)):
            for (path, _), count in pairs.items():
                fields.setdefault(field_name(path), [0, 0, 0])[slot] += count
    micro = _prf(tp, n_pred, n_ref)
    return {
        "n": n,
        "field_precision": micro["precision"],
        "field_recall": micro["recall"],
        "field_f1": micro["f1"],
        "pairs": {"matched": tp, "predicted": n_pred, "reference": n_ref},
        "per_field": {name: dict(_prf(*c), support=c[2], predicted=c[1]) for name, c in sorted(fields.items())},
        "exact_match": exact / n if n else None,
        "validity": (n - invalid) / n if n else None,
        "n_invalid": invalid,
    }


# ---- generation -------------------------------------------------------------------------------

# Word-count histogram edges for the report's length plot: [0, 5), [5, 10), ..., [500, inf).
LENGTH_EDGES = [0, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500]


def _length_stats(counts: list[int]) -> dict:
    import numpy as np

    if not counts:
        return {"mean": None, "p50": None, "p95": None}
    values = np.asarray(counts, dtype=float)
    # numpy's default (linear) percentiles: p50 of [1, 2, 3, 10] is 2.5, p95 is 8.95.
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95))}


def _histogram(counts: list[int]) -> list[int]:
    out = [0] * len(LENGTH_EDGES)
    for c in counts:
        out[max(k for k, edge in enumerate(LENGTH_EDGES) if c >= edge)] += 1
    return out


def generation_metrics(predicted: list[str], reference: list[str], labels: list[str] | None = None,
                       parse: Callable[[str], str] | None = None) -> dict:
    """Mean ROUGE-L F1 (`rouge-score`, stemmed), corpus BLEU and corpus chrF (`sacrebleu`), all on a
    0-1 scale, and length statistics in words (mean, p50, p95 of predictions and references, and the
    ratio of their means). With `parse`, a rejected prediction (empty, too long) is invalid: it
    scores 0 ROUGE-L and is an empty hypothesis for BLEU and chrF; its length still counts."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions but {len(reference)} references")
    from stillroom.tasks.generation import _missing, rouge_l

    n = len(reference)
    answers = [_valid(p, parse) for p in predicted]
    invalid = sum(a is None for a in answers)
    rouge = [rouge_l(a, r) if a is not None else 0.0 for a, r in zip(answers, reference)]
    bleu = chrf = None
    if n:
        try:
            from sacrebleu.metrics import BLEU, CHRF
        except ImportError:
            raise _missing("sacrebleu") from None
        hypotheses = [a if a is not None else "" for a in answers]
        bleu = BLEU().corpus_score(hypotheses, [list(reference)]).score / 100.0
        chrf = CHRF().corpus_score(hypotheses, [list(reference)]).score / 100.0
    pred_words = [len(str(p).split()) for p in predicted]
    ref_words = [len(r.split()) for r in reference]
    pred_stats, ref_stats = _length_stats(pred_words), _length_stats(ref_words)
    return {
        "n": n,
        "rouge_l": sum(rouge) / n if n else None,
        "bleu": bleu,
        "chrf": chrf,
        "length": {
            "unit": "words",
            "prediction": pred_stats,
            "reference": ref_stats,
            "ratio": (pred_stats["mean"] / ref_stats["mean"]) if n and ref_stats["mean"] else None,
            "edges": LENGTH_EDGES,
            "prediction_histogram": _histogram(pred_words),
            "reference_histogram": _histogram(ref_words),
        },
        "validity": (n - invalid) / n if n else None,
        "n_invalid": invalid,
    }


TASK_METRICS: dict[str, Callable[..., dict]] = {
    "classification": classification_metrics,
    "extraction": extraction_metrics,
    "generation": generation_metrics,
}

# The aggregate metrics a three-way comparison row shows, per task type (besides n and `score`).
ROW_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "micro_f1"),
    "extraction": ("field_precision", "field_recall", "field_f1", "exact_match", "validity"),
    "generation": ("rouge_l", "bleu", "chrf", "validity"),
}


def task_metrics(task_type: str, predicted: list[str], reference: list[str], labels: list[str],
                 parse: Callable[[str], str] | None = None) -> dict:
    """The aggregate metrics of a task type (see `TASK_METRICS`); `parse` (the task's) marks the
    predictions it rejects as invalid (extraction, generation)."""
    try:
        fn = TASK_METRICS[task_type]
    except KeyError:
        raise ValueError(f"no metrics for task type '{task_type}' (have: {', '.join(TASK_METRICS)})") from None
    return fn(predicted, reference, labels, parse=parse)


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

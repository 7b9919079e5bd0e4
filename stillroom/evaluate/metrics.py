"""Classification metrics, written out so every number in a report can be checked by hand."""

from __future__ import annotations


def classification_metrics(predicted: list[str], reference: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows = reference, columns = predicted, in `labels` order)."""
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
    for label, i in index.items():
        tp = confusion[i][i]
        predicted_i = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted_i:  # a class absent from both sides says nothing about the model
            f1s.append(f1)
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return {
        "n": n,
        "accuracy": correct / n if n else None,
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "per_class": per_class,
        "labels": labels,
        "confusion": confusion,
    }

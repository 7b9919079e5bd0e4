"""One scorecard for any set of student answers with teacher (and maybe human) references.

The locked eval split and logged production traffic (`--shadow`) both go through `scorecard`, so
"agreement", the gap and its interval, the slices and calibration mean the same thing everywhere.
Per-example scores come from the task's `score` (through `metrics.example_score`: an answer the task
cannot parse scores 0) and yes/no agreement from its `agrees`, for every task type; the aggregate
metrics come from `metrics.TASK_METRICS`. "agreement" is the mean score against the teacher: accuracy
for classification, mean field F1 (or exact match) for extraction, mean ROUGE-L (or chrF) for generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillroom.config import GateConfig
from stillroom.errors import StillroomError
from stillroom.evaluate.bootstrap import paired_gap_ci
from stillroom.evaluate.metrics import (
    ROW_METRICS, example_agrees, example_score, expected_calibration_error, field_name, reliability_curve,
    task_metrics,
)
from stillroom.evaluate.slices import SliceItem, compute_slices

__all__ = ["Scored", "scorecard", "NO_HUMANS", "LabelSetError"]

NO_HUMANS = ("no human labels on these examples: teacher vs human and student vs human are unmeasured "
             "(import some with `stillroom import FILE --as human`)")


class LabelSetError(StillroomError):
    """References carry labels the task does not list; the message names them."""


def _check_labels(labels: list[str], rows: list["Scored"]) -> None:
    known = set(labels)
    for who, values in (("teacher", [r.teacher for r in rows]), ("human", [r.human for r in rows if r.human]),
                        ("student", [r.student for r in rows])):
        unknown = sorted({v for v in values if v not in known})
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise LabelSetError(f"the {who}'s labels include {shown}, which stillroom.yaml's task does not list "
                                f"(labels: {', '.join(labels)}); add them to task.labels or fix the data")


@dataclass
class Scored:
    """One example with the student's answer and the references it is judged against."""

    example_id: int | str
    input: str
    teacher: str
    student: str
    confidence: float
    human: str | None = None
    source: str = ""
    tags: list[str] = field(default_factory=list)


def _row(metrics: dict | None, n: int, task_type: str) -> dict:
    keys = ROW_METRICS.get(task_type, ())
    if not metrics or not n:
        return {"n": n, "score": None, **{k: None for k in keys}}
    return {"n": n, "score": metrics["score"], **{k: metrics.get(k) for k in keys}}


def _fields_stated(reference: str) -> list[str]:
    """The top-level fields a reference record states (extraction's field-present slices)."""
    from stillroom.tasks.extraction import record_fields

    try:
        return sorted({field_name(path) for path, _ in record_fields(reference)})
    except ValueError:  # a reference that is not JSON states no field
        return []


def _slice_items(task, rows: list[Scored], reference: str) -> list[SliceItem]:
    items = []
    for r in rows:
        ref = r.teacher if reference == "teacher" else r.human
        keys = [("field", f) for f in _fields_stated(ref)] if task.type == "extraction" else []
        items.append(SliceItem(
            r.example_id, r.input, ref,
            teacher_score=example_score(task, r.teacher, ref), student_score=example_score(task, r.student, ref),
            source=r.source, tags=list(r.tags), keys=keys,
            detail={"teacher": r.teacher, "student": r.student, "human": r.human,
                    "confidence": round(r.confidence, 4)},
        ))
    return items


def _slices(task, rows: list[Scored], reference: str, gate: GateConfig) -> dict:
    if task.type == "classification":
        found = compute_slices(_slice_items(task, rows, reference), task.labels, gate.slice_min_examples)
    elif task.type == "extraction":
        found = compute_slices(_slice_items(task, rows, reference), None, gate.slice_min_examples,
                               by_class=False, fields=list(getattr(task, "fields", [])))
    else:
        found = compute_slices(_slice_items(task, rows, reference), None, gate.slice_min_examples, by_class=False)
    return dict(found, reference=reference)


def _metrics(task, task_type: str, predicted: list[str], reference: list[str]) -> dict:
    """The type's aggregate metrics plus `metric` (the gated per-example metric) and `score` (its mean)."""
    parse = None if task_type == "classification" else task.parse
    metrics = task_metrics(task_type, predicted, reference, task.labels, parse=parse)
    scores = [example_score(task, p, r) for p, r in zip(predicted, reference)]
    return dict(metrics, metric=getattr(task, "metric", "accuracy"),
                score=sum(scores) / len(scores) if scores else None)


def scorecard(task, rows: list[Scored], gate: GateConfig, task_type: str | None = None) -> dict:
    """Student vs teacher, the three-way comparison with human labels where they exist, the gap
    against each reference with a paired bootstrap 95% interval, slices, and calibration."""
    task_type = task_type or getattr(task, "type", "classification")
    if task_type == "classification":
        _check_labels(task.labels, rows)
    predicted = [r.student for r in rows]
    teacher = [r.teacher for r in rows]
    vs_teacher = _metrics(task, task_type, predicted, teacher)
    human_rows = [r for r in rows if r.human is not None]
    h_ref = [r.human for r in human_rows]
    student_h = _metrics(task, task_type, [r.student for r in human_rows], h_ref) if human_rows else None
    teacher_h = _metrics(task, task_type, [r.teacher for r in human_rows], h_ref) if human_rows else None

    boot = {"n_resamples": gate.bootstrap_resamples, "seed": gate.bootstrap_seed}
    scores = [example_score(task, p, t) for p, t in zip(predicted, teacher)]
    agrees = [example_agrees(task, p, t) for p, t in zip(predicted, teacher)]
    if task_type == "generation":
        # The teacher's text is its own reference, so "100 - mean ROUGE-L" would fail any paraphrase.
        # Against the teacher a generation student is gated on the share of its answers that agree
        # (score >= task.agreement_threshold), or on the judge's verdicts when a judge has run (gate.py).
        gap_teacher = dict(paired_gap_ci([1.0] * len(rows), [float(a) for a in agrees], **boot),
                           reference="teacher", basis="agree_rate")
    else:
        gap_teacher = dict(paired_gap_ci([1.0] * len(rows), scores, **boot), reference="teacher")
    gap = {"teacher": gap_teacher}
    slices = {"teacher": _slices(task, rows, "teacher", gate)}
    if human_rows:
        gap["human"] = dict(paired_gap_ci([example_score(task, r.teacher, r.human) for r in human_rows],
                                          [example_score(task, r.student, r.human) for r in human_rows], **boot),
                            reference="human")
        slices["human"] = _slices(task, human_rows, "human", gate)
    else:
        gap["human"] = None
        slices["human"] = None

    confidences = [r.confidence for r in rows]
    classification = task_type == "classification"
    return {
        "task_type": task_type,
        "metric": vs_teacher["metric"],
        "agreement": vs_teacher["score"],
        # share of answers that agree with the teacher's (task.agrees): the router's notion of right
        "agree_rate": sum(agrees) / len(agrees) if agrees else None,
        "agreement_threshold": task.config.agreement_threshold if task_type == "generation" else None,
        "vs_teacher": vs_teacher,
        "vs_human": {
            "n": len(human_rows),
            "metric": vs_teacher["metric"],
            "student_score": student_h["score"] if student_h else None,
            "teacher_score": teacher_h["score"] if teacher_h else None,
            # accuracy is the score of a classification task; other types have no accuracy
            "student_accuracy": student_h["accuracy"] if student_h and classification else None,
            "teacher_accuracy": teacher_h["accuracy"] if teacher_h and classification else None,
            "student_metrics": student_h,
            "teacher_metrics": teacher_h,
            "message": None if human_rows else NO_HUMANS,
        },
        "three_way": {
            "metric": vs_teacher["metric"],
            "student_vs_teacher": _row(vs_teacher, len(rows), task_type),
            "student_vs_human": _row(student_h, len(human_rows), task_type),
            "teacher_vs_human": _row(teacher_h, len(human_rows), task_type),
            "message": None if human_rows else NO_HUMANS,
        },
        "gap": gap,
        "slices": slices,
        "confidence_calibration": {
            "reference": "teacher",
            "ece": expected_calibration_error(confidences, agrees),
            "reliability": reliability_curve(confidences, agrees),
            "n": len(rows),
        },
    }

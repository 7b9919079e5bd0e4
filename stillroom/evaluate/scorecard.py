"""One scorecard for any set of student answers with teacher (and maybe human) references.

The locked eval split and logged production traffic (`--shadow`) both go through `scorecard`, so
"agreement", the gap and its interval, the slices and calibration mean the same thing everywhere.
Per-example scores come from the task's `score` (the single definition of "agrees").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stillroom.config import GateConfig
from stillroom.errors import StillroomError
from stillroom.evaluate.bootstrap import paired_gap_ci
from stillroom.evaluate.metrics import expected_calibration_error, reliability_curve, task_metrics
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


def _row(metrics: dict | None, n: int) -> dict:
    if not metrics or not n:
        return {"n": n, "accuracy": None, "macro_f1": None, "micro_f1": None}
    return {"n": n, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "micro_f1": metrics["micro_f1"]}


def _slice_items(task, rows: list[Scored], reference: str) -> list[SliceItem]:
    items = []
    for r in rows:
        ref = r.teacher if reference == "teacher" else r.human
        items.append(SliceItem(
            r.example_id, r.input, ref,
            teacher_score=float(task.score(r.teacher, ref)), student_score=float(task.score(r.student, ref)),
            source=r.source, tags=list(r.tags),
            detail={"teacher": r.teacher, "student": r.student, "human": r.human,
                    "confidence": round(r.confidence, 4)},
        ))
    return items


def scorecard(task, rows: list[Scored], gate: GateConfig, task_type: str = "classification") -> dict:
    """Student vs teacher, the three-way comparison with human labels where they exist, the gap
    against each reference with a paired bootstrap 95% interval, slices, and calibration."""
    labels = task.labels
    if task_type == "classification":
        _check_labels(labels, rows)
    predicted = [r.student for r in rows]
    teacher = [r.teacher for r in rows]
    vs_teacher = task_metrics(task_type, predicted, teacher, labels)
    human_rows = [r for r in rows if r.human is not None]
    h_ref = [r.human for r in human_rows]
    student_h = task_metrics(task_type, [r.student for r in human_rows], h_ref, labels) if human_rows else None
    teacher_h = task_metrics(task_type, [r.teacher for r in human_rows], h_ref, labels) if human_rows else None

    boot = {"n_resamples": gate.bootstrap_resamples, "seed": gate.bootstrap_seed}
    agrees = [float(task.score(p, t)) for p, t in zip(predicted, teacher)]
    gap = {"teacher": dict(paired_gap_ci([1.0] * len(rows), agrees, **boot), reference="teacher")}
    slices = {"teacher": dict(compute_slices(_slice_items(task, rows, "teacher"), labels, gate.slice_min_examples),
                              reference="teacher")}
    if human_rows:
        gap["human"] = dict(paired_gap_ci([task.score(r.teacher, r.human) for r in human_rows],
                                          [task.score(r.student, r.human) for r in human_rows], **boot),
                            reference="human")
        slices["human"] = dict(compute_slices(_slice_items(task, human_rows, "human"), labels,
                                              gate.slice_min_examples), reference="human")
    else:
        gap["human"] = None
        slices["human"] = None

    confidences = [r.confidence for r in rows]
    return {
        "agreement": vs_teacher["accuracy"],
        "vs_teacher": vs_teacher,
        "vs_human": {
            "n": len(human_rows),
            "student_accuracy": student_h["accuracy"] if student_h else None,
            "teacher_accuracy": teacher_h["accuracy"] if teacher_h else None,
            "student_metrics": student_h,
            "teacher_metrics": teacher_h,
            "message": None if human_rows else NO_HUMANS,
        },
        "three_way": {
            "student_vs_teacher": _row(vs_teacher, len(rows)),
            "student_vs_human": _row(student_h, len(human_rows)),
            "teacher_vs_human": _row(teacher_h, len(human_rows)),
            "message": None if human_rows else NO_HUMANS,
        },
        "gap": gap,
        "slices": slices,
        "confidence_calibration": {
            "reference": "teacher",
            "ece": expected_calibration_error(confidences, [a == 1.0 for a in agrees]),
            "reliability": reliability_curve(confidences, [a == 1.0 for a in agrees]),
            "n": len(rows),
        },
    }

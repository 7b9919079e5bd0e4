"""Quality control: teacher outputs that are not a valid answer are rejected with a reason.

A rejected output gives no label, so it never trains; it stays in the store, appears here and in
the review queue, where a reviewer can fix (label) or discard it. A label that is no longer in the
task's label set (the set was edited after labelling) is rejected the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from sqlalchemy import select
from sqlalchemy.engine import Connection

from stillroom.store import tables as T
from stillroom.store.records import TEACHER_PROVENANCE, split_assignments
from stillroom.tasks.base import ParseError

__all__ = ["Rejection", "rejections", "qc_report"]


@dataclass
class Rejection:
    example_id: int
    response_id: int | None
    model: str
    output: str
    reason: str  # not_a_label | ambiguous | empty | label_not_in_label_set
    message: str
    example_labelled: bool  # another teacher answer still labels the example


def _reason(output: str, exc: ParseError) -> str:
    if not output.strip():
        return "empty"
    return "ambiguous" if "names several labels" in str(exc) else "not_a_label"


def rejections(conn: Connection, task) -> list[Rejection]:
    """Every teacher response the task cannot parse, and every teacher label outside the label set."""
    labels = T.labels
    labelled = {ex: label for ex, label in conn.execute(
        select(labels.c.example_id, labels.c.label).where(labels.c.provenance.in_(TEACHER_PROVENANCE))
        .order_by(labels.c.id))}
    allowed = set(task.labels)
    out: list[Rejection] = []
    rows = conn.execute(select(T.responses.c.id, T.responses.c.example_id, T.responses.c.model, T.responses.c.output)
                        .where(T.responses.c.role == "teacher").order_by(T.responses.c.id))
    for r in rows:
        try:
            task.parse(r.output)
        except ParseError as exc:
            out.append(Rejection(r.example_id, r.id, r.model, r.output, _reason(r.output, exc), str(exc),
                                 labelled.get(r.example_id) in allowed))
    for row in conn.execute(select(labels.c.example_id, labels.c.label, labels.c.response_id, labels.c.decided_by)
                            .where(labels.c.provenance.in_(TEACHER_PROVENANCE)).order_by(labels.c.id)):
        if labelled[row.example_id] == row.label and row.label not in allowed:  # only the label in force
            out.append(Rejection(row.example_id, row.response_id, row.decided_by, row.label, "label_not_in_label_set",
                                 f"label {row.label!r} is not in the task's label set ({', '.join(task.labels)})",
                                 False))
            labelled[row.example_id] = None  # report each example once
    return out


def qc_report(project, max_examples: int = 10) -> dict:
    """Counts of accepted and rejected teacher outputs by reason, with examples."""
    with project.store.engine.connect() as conn:
        rejected = rejections(conn, project.task)
        n_responses = len(conn.execute(select(T.responses.c.id).where(T.responses.c.role == "teacher")).all())
        splits = split_assignments(conn)
    from_responses = [r for r in rejected if r.reason != "label_not_in_label_set"]
    unlabelled = sorted({r.example_id for r in rejected if not r.example_labelled})
    return {
        "teacher_responses": n_responses,
        "accepted": n_responses - len(from_responses),
        "rejected": len(from_responses),
        "labels_outside_label_set": len(rejected) - len(from_responses),
        "by_reason": dict(Counter(r.reason for r in rejected)),
        "examples_without_usable_label": len(unlabelled),
        "rejected_in_eval": sum(1 for r in rejected if splits.get(r.example_id) == "eval"),
        "examples": [asdict(r) for r in rejected[:max_examples]],
        "next": "the rejected items are in the review queue: `stillroom curate review export FILE`",
    }

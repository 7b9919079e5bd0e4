"""Quality control: teacher outputs that are not a valid answer are rejected with a reason.

A rejected output gives no label, so it never trains; it stays in the store, appears here and in
the review queue, where a reviewer can fix (label) or discard it. A label that is no longer valid
for the task (the label set or the schema was edited after labelling, or a generation answer is
over a lowered `max_output_chars`) is rejected the same way.

Reasons: classification `not_a_label`, `ambiguous`, `empty`, `label_not_in_label_set`; extraction
`not_json`, `not_an_object`, `schema`; generation `empty`, `too_long`; any type
`label_invalid_for_task`. The message is the task's own (`task.parse`), naming the schema path or
the length.
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
    reason: str  # see the module docstring
    message: str
    example_labelled: bool  # another teacher answer still labels the example


def _reason(task, output: str, exc: ParseError) -> str:
    if not output.strip():
        return "empty"
    message = str(exc)
    if task.type == "extraction":
        if "does not fit the schema" in message:
            return "schema"
        return "not_an_object" if "JSON but not an object" in message else "not_json"
    if task.type == "generation":
        return "too_long" if "max_output_chars" in message else "empty"
    return "ambiguous" if "names several labels" in message else "not_a_label"


def label_problem(task, label: str) -> str | None:
    """Why a label in force can no longer train (None: it can): outside the label set
    (classification), or no longer valid for the schema / length limit (other types)."""
    if task.type == "classification":
        if label in task.labels:
            return None
        return f"label {label!r} is not in the task's label set ({', '.join(task.labels)})"
    try:
        task.parse(label)
    except ParseError as exc:
        return f"label no longer valid for the task: {exc}"
    return None


def rejections(conn: Connection, task) -> list[Rejection]:
    """Every teacher response the task cannot parse, and every teacher label outside the label set."""
    labels = T.labels
    labelled = {ex: label for ex, label in conn.execute(
        select(labels.c.example_id, labels.c.label).where(labels.c.provenance.in_(TEACHER_PROVENANCE))
        .order_by(labels.c.id))}
    usable = {}  # label -> None (usable) or why not; answers repeat, parsing them once is enough
    for label in set(labelled.values()):
        usable[label] = label_problem(task, label)
    out: list[Rejection] = []
    rows = conn.execute(select(T.responses.c.id, T.responses.c.example_id, T.responses.c.model, T.responses.c.output)
                        .where(T.responses.c.role == "teacher").order_by(T.responses.c.id))
    for r in rows:
        try:
            task.parse(r.output)
        except ParseError as exc:
            out.append(Rejection(r.example_id, r.id, r.model, r.output, _reason(task, r.output, exc), str(exc),
                                 r.example_id in labelled and usable.get(labelled[r.example_id]) is None))
    for row in conn.execute(select(labels.c.example_id, labels.c.label, labels.c.response_id, labels.c.decided_by)
                            .where(labels.c.provenance.in_(TEACHER_PROVENANCE)).order_by(labels.c.id)):
        if labelled[row.example_id] == row.label and usable.get(row.label):  # only the label in force
            kind = "label_not_in_label_set" if task.type == "classification" else "label_invalid_for_task"
            out.append(Rejection(row.example_id, row.response_id, row.decided_by, row.label, kind,
                                 usable[row.label], False))
            labelled[row.example_id] = None  # report each example once
    return out


def qc_report(project, max_examples: int = 10) -> dict:
    """Counts of accepted and rejected teacher outputs by reason, with examples."""
    with project.store.engine.connect() as conn:
        rejected = rejections(conn, project.task)
        n_responses = len(conn.execute(select(T.responses.c.id).where(T.responses.c.role == "teacher")).all())
        splits = split_assignments(conn)
    from_responses = [r for r in rejected if r.reason not in ("label_not_in_label_set", "label_invalid_for_task")]
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

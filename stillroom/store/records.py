"""Reading and writing the records every stage shares (examples, responses, labels, splits, runs)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from stillroom.store import tables as T
from stillroom.store.db import now, to_json
from stillroom.tasks.base import content_hash, norm_hash

TEACHER_PROVENANCE = ("recorded", "teacher")


@dataclass
class Example:
    id: int
    input: str
    content_hash: str
    tags: list[str]
    source: str


def get_or_add_example(conn: Connection, text: str, source: str, tags: list[str]) -> tuple[int, bool]:
    """(example id, created?) -- examples are identified by the SHA-256 of their exact text."""
    h = content_hash(text)
    row = conn.execute(select(T.examples.c.id).where(T.examples.c.content_hash == h)).first()
    if row:
        return row[0], False
    res = conn.execute(
        insert(T.examples).values(
            input=text, content_hash=h, norm_hash=norm_hash(text), source=source,
            tags=to_json(sorted(set(tags))), created_at=now(),
        )
    )
    return res.inserted_primary_key[0], True


def response_hash(example_hash: str, role: str, model: str, origin: str, output: str, salt: str = "") -> str:
    parts = "\x1f".join([example_hash, role, model, origin, output, salt])
    return hashlib.sha256(parts.encode("utf-8")).hexdigest()


def add_response(conn: Connection, example_id: int, request_hash: str, **fields) -> tuple[int, bool]:
    """Record a model response once per request hash; (response id, created?)."""
    row = conn.execute(select(T.responses.c.id).where(T.responses.c.request_hash == request_hash)).first()
    if row:
        return row[0], False
    res = conn.execute(
        insert(T.responses).values(example_id=example_id, request_hash=request_hash, created_at=now(), **fields)
    )
    return res.inserted_primary_key[0], True


def add_label(conn: Connection, example_id: int, label: str, provenance: str, decided_by: str,
              response_id: int | None = None) -> bool:
    """Append a label unless the example already carries the same label with the same provenance."""
    latest = latest_label(conn, example_id, (provenance,))
    if latest == label:
        return False
    conn.execute(
        insert(T.labels).values(
            example_id=example_id, label=label, provenance=provenance, decided_by=decided_by,
            response_id=response_id, created_at=now(),
        )
    )
    return True


def latest_label(conn: Connection, example_id: int, provenances: tuple[str, ...]) -> str | None:
    row = conn.execute(
        select(T.labels.c.label)
        .where(T.labels.c.example_id == example_id, T.labels.c.provenance.in_(provenances))
        .order_by(T.labels.c.id.desc())
        .limit(1)
    ).first()
    return row[0] if row else None


def labels_by_example(conn: Connection, provenances: tuple[str, ...]) -> dict[int, str]:
    """Latest label per example among the given provenances (later rows override earlier)."""
    rows = conn.execute(
        select(T.labels.c.example_id, T.labels.c.label)
        .where(T.labels.c.provenance.in_(provenances))
        .order_by(T.labels.c.id)
    )
    return {ex: label for ex, label in rows}


def teacher_labels(conn: Connection) -> dict[int, str]:
    return labels_by_example(conn, TEACHER_PROVENANCE)


def human_labels(conn: Connection) -> dict[int, str]:
    return labels_by_example(conn, ("human",))


def all_examples(conn: Connection) -> dict[int, Example]:
    rows = conn.execute(select(T.examples).order_by(T.examples.c.id))
    return {
        r.id: Example(r.id, r.input, r.content_hash, json.loads(r.tags), r.source) for r in rows
    }


def split_assignments(conn: Connection) -> dict[int, str]:
    return {ex: split for ex, split in conn.execute(select(T.splits.c.example_id, T.splits.c.split))}


def split_rows(conn: Connection, split: str) -> list[tuple[Example, str]]:
    """(example, teacher label) for every teacher-labelled example in a split, by id."""
    examples = all_examples(conn)
    labels = teacher_labels(conn)
    ids = sorted(ex for ex, s in split_assignments(conn).items() if s == split)
    return [(examples[i], labels[i]) for i in ids if i in labels]


def counts(conn: Connection) -> dict:
    """Data counts for reports: examples, labels by provenance, split sizes."""
    n_examples = conn.execute(select(func.count()).select_from(T.examples)).scalar_one()
    by_split = dict(conn.execute(select(T.splits.c.split, func.count()).group_by(T.splits.c.split)).all())
    teacher = teacher_labels(conn)
    human = human_labels(conn)
    return {
        "examples": n_examples,
        "teacher_labelled": len(teacher),
        "human_labelled": len(human),
        "unlabelled": n_examples - len(teacher),
        "splits": {s: by_split.get(s, 0) for s in ("train", "validation", "calibration", "eval")},
    }


def start_run(conn: Connection, student: str, kind: str, config: dict, data_fingerprint: str,
              lock_id: int | None) -> int:
    res = conn.execute(
        insert(T.training_runs).values(
            student=student, kind=kind, status="running", config=to_json(config),
            data_fingerprint=data_fingerprint, lock_id=lock_id, started_at=now(),
        )
    )
    return res.inserted_primary_key[0]


def finish_run(conn: Connection, run_id: int, status: str, artifact_path: str | None = None,
               metrics: dict | None = None, error: str | None = None) -> None:
    conn.execute(
        update(T.training_runs).where(T.training_runs.c.id == run_id).values(
            status=status, artifact_path=artifact_path, metrics=to_json(metrics or {}), error=error,
            finished_at=now(),
        )
    )


def latest_run(conn: Connection, student: str) -> dict | None:
    """The newest finished training run of a student, or None."""
    row = conn.execute(
        select(T.training_runs)
        .where(T.training_runs.c.student == student, T.training_runs.c.status == "finished")
        .order_by(T.training_runs.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    run = dict(row._mapping)
    run["config"] = json.loads(run["config"])
    run["metrics"] = json.loads(run["metrics"] or "{}")
    return run

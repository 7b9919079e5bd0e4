"""Offline shadow evaluation: score a student on logged production traffic.

The inputs are what the gateway recorded in `routed_requests` where the teacher answered (route
`teacher`, answer the task can parse: a label, a record, a text), plus any request logs given as files (OpenAI chat JSONL or
CSV, the teacher's answer as the assistant turn / output column). They go through the same
`scorecard` as the locked eval split. Requests the student served carry no teacher answer and are
counted, not scored. Human labels are attached where a logged input is a known example.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import insert, select

from stillroom.capture.importers import read_records
from stillroom.curate.lock import active_lock
from stillroom.evaluate.scorecard import Scored, scorecard
from stillroom.project import Project, ProjectError
from stillroom.store import tables as T
from stillroom.store.db import now, to_json
from stillroom.store.records import human_labels, latest_run, split_assignments
from stillroom.tasks.base import ParseError, content_hash, norm_hash

__all__ = ["shadow_traffic", "shadow_evaluate"]

GATEWAY_SOURCE = "gateway"


def _read_log(path: Path):
    return read_records(Path(path))


def shadow_traffic(project: Project, logs: list[Path] = ()) -> tuple[list[dict], dict]:
    """(rows with input, teacher label, source, tags; counts of what was skipped and why)."""
    task = project.task
    counts = {"gateway_teacher_answers": 0, "gateway_student_served": 0, "gateway_errors": 0,
              "unparseable_teacher_answers": 0, "log_rows": 0, "log_problems": 0, "without_teacher_answer": 0}
    rows: list[dict] = []
    with project.store.engine.connect() as conn:
        logged = conn.execute(
            select(T.routed_requests.c.id, T.routed_requests.c.input, T.routed_requests.c.route,
                   T.routed_requests.c.output).order_by(T.routed_requests.c.id)
        ).all()
    for r in logged:
        if r.route == "student":
            counts["gateway_student_served"] += 1
            continue
        if r.route != "teacher" or not r.input or r.output is None:
            counts["gateway_errors"] += 1
            continue
        counts["gateway_teacher_answers"] += 1
        try:
            rows.append({"input": r.input, "teacher": task.parse(r.output), "source": GATEWAY_SOURCE,
                         "tags": [], "id": f"request:{r.id}"})
        except ParseError:
            counts["unparseable_teacher_answers"] += 1
    for path in map(Path, logs):
        records, problems = _read_log(path)
        counts["log_problems"] += len(problems)
        for rec in records:
            counts["log_rows"] += 1
            if rec.output is None:
                counts["without_teacher_answer"] += 1
                continue
            try:
                rows.append({"input": rec.input, "teacher": task.parse(rec.output), "source": path.name,
                             "tags": rec.tags, "id": f"{path.name}:{rec.line}"})
            except ParseError:
                counts["unparseable_teacher_answers"] += 1
    return rows, counts


def shadow_evaluate(project: Project, name: str, logs: list[Path] = ()) -> dict:
    """Score the newest run of a student on logged traffic; recorded as a `shadow` evaluation."""
    from stillroom.evaluate.evaluator import disagreements, load_run_student
    from stillroom.evaluate.metrics import example_agrees

    rows, counts = shadow_traffic(project, logs)
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
        lock = active_lock(conn)
        examples = {h: i for i, h in conn.execute(select(T.examples.c.id, T.examples.c.content_hash))}
        trained_on = {nh for nh, in conn.execute(
            select(T.examples.c.norm_hash).join(T.splits, T.splits.c.example_id == T.examples.c.id)
            .where(T.splits.c.split.in_(("train", "validation"))))}
        humans = human_labels(conn)
        splits = split_assignments(conn)
    if lock is None:
        raise ProjectError("the eval set is not locked; run `stillroom lock` (training needs it too)")
    if not rows:
        raise ProjectError(
            "no logged traffic with a teacher answer to score: the gateway has logged "
            f"{counts['gateway_teacher_answers']} teacher answer(s) "
            f"({counts['unparseable_teacher_answers']} unparseable) and {counts['gateway_student_served']} "
            "student-served request(s); serve traffic with `stillroom serve` or pass request logs with --log FILE")
    student = load_run_student(project, name, run)
    preds = student.predict([r["input"] for r in rows])
    scored = []
    seen_in_training = 0
    for r, p in zip(rows, preds):
        known = examples.get(content_hash(r["input"]))
        seen_in_training += norm_hash(r["input"]) in trained_on
        scored.append(Scored(r["id"], r["input"], r["teacher"], p.label, float(p.confidence),
                             humans.get(known) if known else None, r["source"], r["tags"]))
    card = scorecard(project.task, scored, project.config.gate)
    eval_inputs = sum(splits.get(examples.get(content_hash(r["input"]))) == "eval" for r in rows)
    result = {
        "student": name, "kind": run["kind"], "run_id": run["id"], "set": "shadow",
        "lock_id": lock.id, "lock_sha256": lock.manifest_sha256,
        **card,
        "traffic": dict(counts, scored=len(scored), seen_in_training=seen_in_training,
                        in_locked_eval=eval_inputs, logs=[str(p) for p in logs]),
        "n_disagreements": sum(not example_agrees(project.task, s.student, s.teacher) for s in scored),
        "errors": disagreements(project.task, scored),
    }
    with project.store.engine.begin() as conn:
        res = conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=lock.id, kind="shadow", metrics=to_json(result), created_at=now()))
    result["evaluation_id"] = res.inserted_primary_key[0]
    result["stale"] = False
    return result

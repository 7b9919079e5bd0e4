"""The evaluate stage: score a student on the locked eval split (and pick its routing threshold on
the calibration split), against the teacher and, where they exist, human labels."""

from __future__ import annotations

import json
import time

from sqlalchemy import insert, select

from stillroom.curate.lock import verify_lock
from stillroom.evaluate.metrics import classification_metrics
from stillroom.project import Project, ProjectError
from stillroom.route.calibrate import apply_threshold, coverage_curve, pick_threshold
from stillroom.store import tables as T
from stillroom.store.db import now, to_json
from stillroom.store.records import human_labels, latest_run, split_rows
from stillroom.train.registry import load_student


def _score(task, predicted: list[str], reference: list[str]) -> float | None:
    if not reference:
        return None
    return sum(task.score(p, r) for p, r in zip(predicted, reference)) / len(reference)


def human_comparison(task, labels: list[str], ids: list[int], predicted: list[str],
                     teacher: list[str], humans: dict[int, str]) -> dict:
    """Teacher vs human and student vs human on the examples that have a human label."""
    keep = [k for k, i in enumerate(ids) if i in humans]
    ref = [humans[ids[k]] for k in keep]
    student = [predicted[k] for k in keep]
    teach = [teacher[k] for k in keep]
    return {
        "n": len(keep),
        "student_accuracy": _score(task, student, ref),
        "teacher_accuracy": _score(task, teach, ref),
        "student_metrics": classification_metrics(student, ref, labels) if keep else None,
    }


def evaluate_student(project: Project, name: str) -> dict:
    """Evaluate the newest trained run of a student; records predictions and the evaluation."""
    lock = verify_lock(project)
    task = project.task
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
        eval_rows = split_rows(conn, "eval")
        cal_rows = split_rows(conn, "calibration")
        humans = human_labels(conn)
    if not eval_rows:
        raise ProjectError("the eval split has no teacher-labelled examples")
    student = load_student(run["artifact_path"])

    student.predict([eval_rows[0][0].input])  # warm-up: model loading is not throughput
    started = time.perf_counter()
    eval_preds = student.predict([ex.input for ex, _ in eval_rows])
    seconds = time.perf_counter() - started
    cal_preds = student.predict([ex.input for ex, _ in cal_rows]) if cal_rows else []

    ids = [ex.id for ex, _ in eval_rows]
    teacher = [label for _, label in eval_rows]
    predicted = [p.label for p in eval_preds]
    vs_teacher = classification_metrics(predicted, teacher, task.labels)
    human = human_comparison(task, task.labels, ids, predicted, teacher, humans)

    target = project.config.routing.target_agreement
    cal_agrees = [bool(task.score(p.label, label)) for p, (_, label) in zip(cal_preds, cal_rows)]
    calibration = pick_threshold([p.confidence for p in cal_preds], cal_agrees, target)
    eval_agrees = [bool(task.score(p, t)) for p, t in zip(predicted, teacher)]
    eval_conf = [p.confidence for p in eval_preds]
    at_threshold = apply_threshold(eval_conf, eval_agrees, calibration["threshold"])

    result = {
        "student": name,
        "kind": run["kind"],
        "run_id": run["id"],
        "lock_id": lock.id,
        "lock_sha256": lock.manifest_sha256,
        "agreement": vs_teacher["accuracy"],
        "vs_teacher": vs_teacher,
        "vs_human": human,
        "calibration": calibration,
        "at_threshold": at_threshold,
        "coverage_curve": coverage_curve(eval_conf, eval_agrees),
        "throughput": {"inputs": len(eval_rows), "seconds": seconds,
                       "inputs_per_s": len(eval_rows) / seconds if seconds else None},
        "errors": [
            {"example_id": i, "input": ex.input, "teacher": t, "student": p.label,
             "confidence": round(p.confidence, 4), "human": humans.get(i)}
            for i, (ex, t), p in zip(ids, eval_rows, eval_preds) if not task.score(p.label, t)
        ][:50],
    }
    created = now()
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.predictions), [
            {"run_id": run["id"], "example_id": ex.id, "label": p.label, "confidence": p.confidence,
             "created_at": created}
            for (ex, _), p in zip(eval_rows + cal_rows, eval_preds + cal_preds)
        ])
        conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=lock.id, kind="eval", metrics=to_json(result), created_at=created,
        ))
    return result


def latest_evaluation(project: Project, name: str) -> dict | None:
    """The newest evaluation of a student's newest run, marked stale if the lock has changed since."""
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            return None
        row = conn.execute(
            select(T.evaluations.c.metrics, T.evaluations.c.lock_id)
            .where(T.evaluations.c.run_id == run["id"], T.evaluations.c.kind == "eval")
            .order_by(T.evaluations.c.id.desc()).limit(1)
        ).first()
        active = conn.execute(
            select(T.eval_locks.c.id).where(T.eval_locks.c.active.is_(True))
        ).scalar_one_or_none()
    if row is None:
        return None
    result = json.loads(row.metrics)
    result["stale"] = row.lock_id != active
    return result

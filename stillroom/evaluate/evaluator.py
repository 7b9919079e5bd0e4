"""The evaluate stage: score a student on the locked eval split (and pick its routing threshold on
the calibration split), against the teacher and, where they exist, human labels.

Every evaluation records the eval lock it ran against; `latest_evaluation` marks it stale (with the
re-lock's recorded reason) once the lock has changed.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import insert, select

from stillroom.curate.lock import verify_lock
from stillroom.evaluate.scorecard import Scored, scorecard
from stillroom.project import Project, ProjectError
from stillroom.route.calibrate import apply_threshold, coverage_curve, pick_threshold
from stillroom.store import tables as T
from stillroom.store.db import now, to_json
from stillroom.store.records import human_labels, latest_run, split_rows
from stillroom.train.registry import load_student

__all__ = ["evaluate_student", "latest_evaluation", "deployed_evaluation", "deployed_model_path", "lock_status", "check_label_set", "load_run_student"]

MAX_ERRORS_KEPT = 50


def check_label_set(task, student, name: str) -> None:
    """Refuse a student whose label set differs from the task's: its scores would mean nothing."""
    student_labels = list(getattr(student, "labels", None) or task.labels)
    missing = [x for x in task.labels if x not in student_labels]
    unknown = [x for x in student_labels if x not in task.labels]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"it cannot answer {', '.join(missing)}")
        if unknown:
            parts.append(f"it answers labels the task does not have: {', '.join(unknown)}")
        raise ProjectError(f"student '{name}' was trained on a different label set than stillroom.yaml's task "
                           f"({'; '.join(parts)}); retrain it: `stillroom train {name} --force`")


def load_run_student(project: Project, name: str, run: dict):
    """The saved student of a training run, checked against the task's label set."""
    student = load_student(run["artifact_path"])
    check_label_set(project.task, student, name)
    return student


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
    student = load_run_student(project, name, run)

    student.predict([eval_rows[0][0].input])  # warm-up: model loading is not throughput
    started = time.perf_counter()
    eval_preds = student.predict([ex.input for ex, _ in eval_rows])
    seconds = time.perf_counter() - started
    cal_preds = student.predict([ex.input for ex, _ in cal_rows]) if cal_rows else []

    scored = [Scored(ex.id, ex.input, label, p.label, float(p.confidence), humans.get(ex.id), ex.source, ex.tags)
              for (ex, label), p in zip(eval_rows, eval_preds)]
    card = scorecard(task, scored, project.config.gate)

    target = project.config.routing.target_agreement
    cal_agrees = [bool(task.score(p.label, label)) for p, (_, label) in zip(cal_preds, cal_rows)]
    calibration = pick_threshold([p.confidence for p in cal_preds], cal_agrees, target)
    eval_agrees = [bool(task.score(s.student, s.teacher)) for s in scored]
    eval_conf = [s.confidence for s in scored]

    result = {
        "student": name,
        "kind": run["kind"],
        "run_id": run["id"],
        "set": "eval",
        "lock_id": lock.id,
        "lock_sha256": lock.manifest_sha256,
        "lock_reason": lock.reason,
        **card,
        "calibration": calibration,
        "at_threshold": apply_threshold(eval_conf, eval_agrees, calibration["threshold"]),
        "coverage_curve": coverage_curve(eval_conf, eval_agrees),
        "throughput": {"inputs": len(eval_rows), "seconds": seconds,
                       "inputs_per_s": len(eval_rows) / seconds if seconds else None},
        "errors": [
            {"example_id": s.example_id, "input": s.input, "teacher": s.teacher, "student": s.student,
             "confidence": round(s.confidence, 4), "human": s.human}
            for s in scored if not task.score(s.student, s.teacher)
        ][:MAX_ERRORS_KEPT],
    }
    created = now()
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.predictions), [
            {"run_id": run["id"], "example_id": ex.id, "label": p.label, "confidence": p.confidence,
             "created_at": created}
            for (ex, _), p in zip(eval_rows + cal_rows, eval_preds + cal_preds)
        ])
        res = conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=lock.id, kind="eval", metrics=to_json(result), created_at=created,
        ))
    result["evaluation_id"] = res.inserted_primary_key[0]
    result.update(stale=False, lock_status=None)
    return result


def lock_status(conn, evaluated_lock_id: int) -> dict:
    """Is an evaluation's lock still the active one? If not: which lock replaced it and why."""
    active = conn.execute(
        select(T.eval_locks.c.id, T.eval_locks.c.reason, T.eval_locks.c.created_at)
        .where(T.eval_locks.c.active.is_(True)).order_by(T.eval_locks.c.id.desc()).limit(1)
    ).first()
    if active is not None and active.id == evaluated_lock_id:
        return {"stale": False, "evaluated_lock_id": evaluated_lock_id, "active_lock_id": active.id,
                "relock_reason": None, "message": None}
    if active is None:
        message = (f"ran against eval lock {evaluated_lock_id}, but the eval set has no active lock now; "
                   "run `stillroom lock`, then `stillroom eval`")
        return {"stale": True, "evaluated_lock_id": evaluated_lock_id, "active_lock_id": None,
                "relock_reason": None, "message": message}
    when = active.created_at.strftime("%Y-%m-%d %H:%M") if active.created_at else "?"
    message = (f"ran against eval lock {evaluated_lock_id}; the eval set was re-locked since as lock {active.id} "
               f"({when}, reason: \"{active.reason}\"); re-run `stillroom eval`")
    return {"stale": True, "evaluated_lock_id": evaluated_lock_id, "active_lock_id": active.id,
            "relock_reason": active.reason, "message": message}


def latest_evaluation(project: Project, name: str, kind: str = "eval") -> dict | None:
    """The newest evaluation (`kind` eval or shadow) of a student's newest run, marked stale, with
    the re-lock's reason, if the eval lock has changed since."""
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            return None
        row = conn.execute(
            select(T.evaluations.c.id, T.evaluations.c.metrics, T.evaluations.c.lock_id)
            .where(T.evaluations.c.run_id == run["id"], T.evaluations.c.kind == kind)
            .order_by(T.evaluations.c.id.desc()).limit(1)
        ).first()
        if row is None:
            return None
        # Shadow traffic is not the locked set: a re-lock does not change what it measured.
        status = lock_status(conn, row.lock_id) if kind == "eval" else {"stale": False}
    result = json.loads(row.metrics)
    result["evaluation_id"] = row.id
    result["stale"] = status["stale"]
    result["lock_status"] = status if status["stale"] else None
    return result


def deployed_evaluation(project: Project, name: str) -> dict | None:
    """The evaluation of what will actually be deployed (`students[].deploy`): the fp32 training
    copy's, or the exported artifact's own re-evaluation. The gate and the gateway use this one."""
    fmt = project.config.student(name).deploy
    if fmt == "fp32":
        return latest_evaluation(project, name)
    from stillroom.train.artifacts import latest_artifact_evaluation

    evaluation = latest_artifact_evaluation(project, name, fmt)
    if evaluation is not None:
        evaluation.setdefault("student", name)
        evaluation["deployed_artifact"] = fmt
    return evaluation


def deployed_model_path(project: Project, name: str) -> str:
    """Where the deployed artifact of a student's newest run lives (see `deployed_evaluation`)."""
    fmt = project.config.student(name).deploy
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
        if fmt == "fp32":
            return run["artifact_path"]
        from stillroom.train.artifacts import latest_artifact

        artifact = latest_artifact(conn, run["id"], fmt)
    if artifact is None:
        raise ProjectError(f"student '{name}' deploys the {fmt} artifact, which has not been exported from "
                           f"run {run['id']}; run `stillroom export {name} --format {fmt}`")
    return artifact["path"]

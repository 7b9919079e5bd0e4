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
from stillroom.evaluate.metrics import example_agrees, example_score
from stillroom.evaluate.scorecard import Scored, scorecard
from stillroom.project import Project, ProjectError
from stillroom.route.calibrate import apply_threshold, coverage_curve, pick_threshold
from stillroom.store import tables as T
from stillroom.store.db import now, to_json
from stillroom.store.records import human_labels, latest_run, split_rows
from stillroom.train.registry import load_student

__all__ = ["evaluate_student", "disagreements", "latest_evaluation", "deployed_evaluation", "deployed_model_path", "lock_status", "check_label_set", "load_run_student",
           "ensemble_vs_members"]

MAX_ERRORS_KEPT = 50


def check_label_set(task, student, name: str) -> None:
    """Refuse a student whose label set differs from the task's: its scores would mean nothing.
    Only classification has a label set; extraction and generation students answer free text."""
    if getattr(task, "type", "classification") != "classification":
        return
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


def disagreements(task, scored: list[Scored], limit: int = MAX_ERRORS_KEPT) -> list[dict]:
    """The examples where the student does not agree with the teacher (`task.agrees`). For graded
    task types each carries its score and the worst come first; classification keeps eval order."""
    rows = [(s, example_score(task, s.student, s.teacher)) for s in scored
            if not example_agrees(task, s.student, s.teacher)]
    if task.type != "classification":
        rows.sort(key=lambda pair: pair[1])
    return [{"example_id": s.example_id, "input": s.input, "teacher": s.teacher, "student": s.student,
             "confidence": round(s.confidence, 4), "human": s.human,
             **({} if task.type == "classification" else {"score": round(score, 4)})}
            for s, score in rows[:limit]]


def _latencies(student, texts: list[str], samples: int) -> dict:
    import statistics

    latencies = []
    for text in texts[:samples]:
        started = time.perf_counter()
        student.predict([text])
        latencies.append((time.perf_counter() - started) * 1000)
    ordered = sorted(latencies)
    return {"n": len(latencies), "p50": statistics.median(latencies) if latencies else None,
            "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else None}


def evaluate_student(project: Project, name: str, student=None, *, kind: str = "eval", record: bool = True,
                     latency_samples: int = 0) -> dict:
    """Evaluate the newest trained run of a student on the locked eval split; records its predictions
    and the evaluation.

    `student`: any loaded object with `predict(texts) -> [Prediction]` (an exported artifact, say)
    evaluated in place of the run's saved model; `kind` names the evaluation (`eval`, or
    `artifact:<format>`, which `set` repeats). With `record=False` nothing is written and the
    answers come back as `predictions` ([example id, answer, confidence]) for the caller to keep.
    `latency_samples` > 0 also times that many single-input calls (`latency_ms`: n, p50, p95)."""
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
    if student is None:
        student = load_run_student(project, name, run)
    else:
        check_label_set(task, student, name)

    texts = [ex.input for ex, _ in eval_rows]
    student.predict(texts[:1])  # warm-up: model loading is not throughput
    latency = _latencies(student, texts, latency_samples) if latency_samples else None
    started = time.perf_counter()
    eval_preds = student.predict(texts)
    seconds = time.perf_counter() - started
    cal_preds = student.predict([ex.input for ex, _ in cal_rows]) if cal_rows else []

    scored = [Scored(ex.id, ex.input, label, p.label, float(p.confidence), humans.get(ex.id), ex.source, ex.tags)
              for (ex, label), p in zip(eval_rows, eval_preds)]
    card = scorecard(task, scored, project.config.gate)

    target = project.config.routing.target_agreement
    cal_agrees = [example_agrees(task, p.label, label) for p, (_, label) in zip(cal_preds, cal_rows)]
    calibration = pick_threshold([p.confidence for p in cal_preds], cal_agrees, target)
    eval_agrees = [example_agrees(task, s.student, s.teacher) for s in scored]
    eval_conf = [s.confidence for s in scored]

    result = {
        "student": name,
        "kind": run["kind"],
        "run_id": run["id"],
        "set": kind,
        "lock_id": lock.id,
        "lock_sha256": lock.manifest_sha256,
        "lock_reason": lock.reason,
        **card,
        "calibration": calibration,
        "at_threshold": apply_threshold(eval_conf, eval_agrees, calibration["threshold"]),
        "coverage_curve": coverage_curve(eval_conf, eval_agrees),
        "throughput": {"inputs": len(eval_rows), "seconds": seconds,
                       "inputs_per_s": len(eval_rows) / seconds if seconds else None},
        "n_disagreements": eval_agrees.count(False),
        "errors": disagreements(task, scored),
    }
    if latency is not None:
        result["latency_ms"] = latency
    if not record:
        result["predictions"] = [[s.example_id, s.student, round(s.confidence, 6)] for s in scored]
        return result
    created = now()
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.predictions), [
            {"run_id": run["id"], "example_id": ex.id, "label": p.label, "confidence": p.confidence,
             "created_at": created}
            for (ex, _), p in zip(eval_rows + cal_rows, eval_preds + cal_preds)
        ])
        res = conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=lock.id, kind=kind, metrics=to_json(result), created_at=created,
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
    """The newest evaluation (`kind` eval, shadow or judge) of a student's newest run, marked stale,
    with the re-lock's reason, if the eval lock has changed since."""
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
        status = lock_status(conn, row.lock_id) if kind != "shadow" else {"stale": False}
    result = json.loads(row.metrics)
    result["evaluation_id"] = row.id
    result["stale"] = status["stale"]
    result["lock_status"] = status if status["stale"] else None
    if kind == "eval" and result.get("task_type") == "generation":
        # The gate judges a generation student by the judge's verdicts on the same run, when it has them.
        judged = latest_evaluation(project, name, "judge")
        if judged is not None:
            result["judge"] = {k: judged.get(k) for k in ("evaluation_id", "stale", "win_rate", "outcomes",
                                                          "n_scored", "strict_win_rate")}
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


def ensemble_vs_members(project: Project, name: str, result: dict) -> dict | None:
    """For an ensemble's evaluation, its members' deployed evaluations on the same eval lock:
    {"members": {member: agreement}, "best_member", "below_best_member"}; None for other kinds or
    when no member has a current evaluation on that lock.

    With a small validation split the pooling weights are noisy, and an ensemble can score below one
    of its own members on the locked eval (Banking77 at 1,000 labels: 87.2% against 88.8% for the
    classifier-tuned encoder alone, at 18x its latency; docs/training.md). The CLI says so."""
    spec = project.config.student(name)
    if spec.kind != "ensemble" or result.get("agreement") is None:
        return None
    members = {}
    for member in spec.members:
        e = deployed_evaluation(project, member)
        if e is None or e.get("stale") or e.get("lock_id") != result.get("lock_id") or e.get("agreement") is None:
            continue
        members[member] = e["agreement"]
    if not members:
        return None
    best = max(members, key=lambda m: members[m])
    return {"members": members, "best_member": best, "below_best_member": members[best] > result["agreement"]}


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

"""`stillroom run`: every stage in order, each skipped when its inputs have not changed.

import -> split -> lock -> train (each student) -> eval (each student) -> report
A stage's fingerprint (a hash of what it reads) is recorded in `stage_runs`; a stage whose
fingerprint matches its last successful run is skipped. Training and evaluation keep their own,
finer records (a training run per data fingerprint, an evaluation per run and lock).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from sqlalchemy import insert, select

from stillroom.project import Project
from stillroom.store import tables as T
from stillroom.store.db import now, to_json

# progress(stage, done, total) -- lets the CLI draw bars without the pipeline knowing about rich.
Progress = Callable[[str, int, int], None]


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _last_fingerprint(project: Project, stage: str) -> str | None:
    with project.store.engine.connect() as conn:
        return conn.execute(
            select(T.stage_runs.c.fingerprint).where(T.stage_runs.c.stage == stage)
            .order_by(T.stage_runs.c.id.desc()).limit(1)
        ).scalar_one_or_none()


def _record(project: Project, stage: str, fingerprint: str, summary: dict) -> None:
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.stage_runs).values(stage=stage, fingerprint=fingerprint,
                                                 summary=to_json(summary), finished_at=now()))


def _import_fingerprint(project: Project) -> str:
    files = []
    for source in project.config.data:
        path = project.root / source.path
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        files.append([source.model_dump(), digest])
    return _digest({"files": files, "labels": project.task.labels})


def _split_fingerprint(project: Project) -> str:
    from stillroom.store.records import human_labels, teacher_labels

    with project.store.engine.connect() as conn:
        payload = {"teacher": sorted(teacher_labels(conn)), "human": sorted(human_labels(conn)),
                   "config": project.config.split.model_dump()}
    return _digest(payload)


class Stages:
    """Collects what each stage did, for the CLI's table and `--json`."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        row = {"stage": name, "status": "done", "seconds": 0.0, "detail": ""}
        start = time.perf_counter()
        try:
            yield row
        finally:
            row["seconds"] = round(time.perf_counter() - start, 2)
            self.rows.append(row)


def run_pipeline(project: Project, force: bool = False, progress: Progress | None = None) -> dict:
    """Run every stage; returns {"stages": [...], "gate": {...}, "report": {...}}."""
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import active_lock, lock_eval, verify_lock
    from stillroom.curate.split import split_project
    from stillroom.evaluate.evaluator import evaluate_student, latest_evaluation
    from stillroom.evaluate.gate import decide
    from stillroom.train.runner import train_student

    stages = Stages()
    with stages.stage("import") as row:
        fp = _import_fingerprint(project)
        if not project.config.data:
            row.update(status="skipped", detail="no data files in stillroom.yaml (use `stillroom import`)")
        elif fp == _last_fingerprint(project, "import") and not force:
            row.update(status="skipped", detail="data files unchanged")
        else:
            totals = {"examples_added": 0, "labels_added": 0, "problems": 0}
            for source in project.config.data:
                rep = import_file(project, project.root / source.path, role=source.role,
                                  input_column=source.input_column, output_column=source.output_column)
                totals["examples_added"] += rep.examples_added
                totals["labels_added"] += rep.labels_added
                totals["problems"] += len(rep.problems)
            _record(project, "import", fp, totals)
            row["detail"] = (f"{totals['examples_added']} new examples, {totals['labels_added']} labels, "
                             f"{totals['problems']} problem line(s)")

    with stages.stage("split") as row:
        fp = _split_fingerprint(project)
        if fp == _last_fingerprint(project, "split") and not force:
            row.update(status="skipped", detail="labels unchanged")
        else:
            rep = split_project(project)
            _record(project, "split", fp, rep.as_dict())
            row["detail"] = ", ".join(f"{k} {v}" for k, v in rep.total.items())

    with stages.stage("lock") as row:
        with project.store.engine.connect() as conn:
            had_lock = active_lock(conn) is not None
        lock = verify_lock(project) if had_lock else lock_eval(project)
        row.update(status="verified" if had_lock else "done",
                   detail=f"lock {lock.id}, {len(lock.manifest)} eval examples, sha256 {lock.manifest_sha256[:12]}")

    for student in project.config.students:
        with stages.stage(f"train {student.name}") as row:
            cb = (lambda done, total, _n=student.name: progress(f"train {_n}", done, total)) if progress else None
            run = train_student(project, student.name, force=force, progress=cb)
            metrics = run["metrics"]
            val = metrics.get("val_agreement")
            row.update(status="skipped" if run["skipped"] else "done",
                       detail=f"run {run['id']}" + (f" (identical to run {run['reused_run']}, reused)"
                                                    if run.get("reused_run") else "")
                       + ", validation agreement " + ("-" if val is None else f"{val:.1%}"))

    verdicts = {}
    for student in project.config.students:
        with stages.stage(f"eval {student.name}") as row:
            previous = latest_evaluation(project, student.name)
            with project.store.engine.connect() as conn:
                from stillroom.store.records import latest_run

                run_id = latest_run(conn, student.name)["id"]
            if previous and not previous["stale"] and previous["run_id"] == run_id and not force:
                evaluation = previous
                row["status"] = "skipped"
            else:
                if progress:
                    progress(f"eval {student.name}", 0, 1)
                evaluation = evaluate_student(project, student.name)
                if progress:
                    progress(f"eval {student.name}", 1, 1)
            if student.deploy != "fp32":
                from stillroom.train.export import export_deployed

                cb = (lambda what, done, total, _n=student.name: progress(f"export {_n}", done, total)
                      ) if progress else None
                evaluation = export_deployed(project, student.name, force, cb)
            verdict = decide(evaluation, project.config.gate)
            verdicts[student.name] = verdict.as_dict()
            row["detail"] = (f"agreement {evaluation['agreement']:.1%}, coverage "
                             f"{evaluation['at_threshold']['coverage']:.1%} at threshold "
                             f"{evaluation['calibration']['threshold']:.3f}; {'PASS' if verdict.passed else 'FAIL'}")

    report = {}
    with stages.stage("report") as row:
        from stillroom.report.render import write_report

        report = write_report(project)
        row["detail"] = str(report["html"])
    return {"stages": stages.rows, "gate": verdicts,
            "report": {"markdown": str(report.get("markdown")), "html": str(report.get("html"))}}

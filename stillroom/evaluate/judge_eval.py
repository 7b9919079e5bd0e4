"""`stillroom judge`: an LLM judge compares a student's answers with the teacher's on the locked eval split.

The run, top to bottom:
1. the student's answers on the eval split: its newest run's recorded predictions, the missing ones
   predicted now and recorded (`compare.run_predictions`, as `eval --compare` does);
2. every example judged pairwise in both orders and, unless `rubric=False`, on the 1-5 rubric
   (`judge.judge_items`), each call through `LedgeredJudge`: recorded in `responses` under its
   request hash, so a re-run (or a crash half-way) never pays for a call twice. The judge sees
   the input redacted by `curate/pii.py` (`curation.pii.input` types) and the three answers
   redacted with the `output` types, so a student that echoes an email is not judged against a
   teacher that saw `[EMAIL]`, and no personal data reaches the judge;
3. the summary (`judge.summarize`: win rate with a bootstrap 95% interval, outcomes, position
   consistency, rubric means, judge-human agreement, prompt versions) recorded as an `evaluations`
   row of kind `judge` against the eval lock, and every judgement in `judge_scores` with its
   prompt version.

Human preferences (`import_preferences`) are a CSV or JSONL file of `input`, `preferred` (student,
teacher or tie) and optionally `student` (the student they were given for; empty: any). Each import
is kept as an `evaluations` row of kind `human_preferences`; a later import wins per example.
"""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

from sqlalchemy import insert, select

from stillroom.errors import StillroomError

__all__ = ["JudgeRunError", "judge_student", "import_preferences", "human_preferences", "PREFERENCES"]

PREFERENCES = ("student", "teacher", "tie")
_PREF_KIND = "human_preferences"


class JudgeRunError(StillroomError):
    """The judge cannot run, or a preferences file cannot be read; the message says why."""


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise JudgeRunError(f"preferences file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JudgeRunError(f"{path}:{line_no} is not valid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise JudgeRunError(f"{path}:{line_no} is not a JSON object with input and preferred")
            rows.append((line_no, value))
        return rows
    reader = csv.DictReader(text.splitlines())
    missing = {"input", "preferred"} - set(reader.fieldnames or [])
    if missing:
        raise JudgeRunError(f"{path} has no {' and no '.join(sorted(missing))} column "
                            f"(columns: input, preferred, optionally student)")
    return [(line_no, row) for line_no, row in enumerate(reader, start=2)]


def import_preferences(project, path: Path) -> dict:
    """Record human preferences between the student's and the teacher's answers on eval examples."""
    from stillroom.curate.lock import active_lock
    from stillroom.store import tables as T
    from stillroom.store.db import now, to_json
    from stillroom.store.records import split_assignments
    from stillroom.tasks.base import content_hash

    path = Path(path)
    rows = _read_rows(path)
    with project.store.engine.connect() as conn:
        lock = active_lock(conn)
        ids = {h: i for i, h in conn.execute(select(T.examples.c.id, T.examples.c.content_hash))}
        splits = split_assignments(conn)
    if lock is None:
        raise JudgeRunError("the eval set is not locked; preferences are about eval answers: run `stillroom lock` first")
    students = {s.name for s in project.config.students}
    kept, problems = [], []
    for line_no, row in rows:
        text = row.get("input")
        preferred = str(row.get("preferred") or "").strip().lower()
        student = str(row.get("student") or "").strip() or None
        example = ids.get(content_hash(text)) if isinstance(text, str) else None
        if preferred not in PREFERENCES:
            problems.append(f"line {line_no}: preferred must be student, teacher or tie, got {row.get('preferred')!r}")
        elif example is None:
            problems.append(f"line {line_no}: the input is not a known example (import it first)")
        elif splits.get(example) != "eval":
            problems.append(f"line {line_no}: example {example} is not in the eval split, which the judge sees")
        elif student is not None and student not in students:
            problems.append(f"line {line_no}: unknown student {student!r} (known: {', '.join(sorted(students))})")
        else:
            kept.append({"example_id": example, "preferred": preferred, "student": student})
    if not kept:
        raise JudgeRunError(f"{path} holds no usable preference: " + ("; ".join(problems[:3]) or "it is empty"))
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.evaluations).values(
            run_id=None, lock_id=lock.id, kind=_PREF_KIND, created_at=now(),
            metrics=to_json({"source": str(path), "preferences": kept})))
    return {"file": str(path), "imported": len(kept), "problems": problems}


def human_preferences(project, student: str) -> dict[int, str]:
    """example id -> preferred (student | teacher | tie) for a student; a later import wins, and a
    preference given for this student wins over one given for any student."""
    from stillroom.store import tables as T

    with project.store.engine.connect() as conn:
        rows = conn.execute(select(T.evaluations.c.metrics).where(T.evaluations.c.kind == _PREF_KIND)
                            .order_by(T.evaluations.c.id)).scalars().all()
    general, specific = {}, {}
    for metrics in rows:
        for p in json.loads(metrics)["preferences"]:
            if p["student"] is None:
                general[p["example_id"]] = p["preferred"]
            elif p["student"] == student:
                specific[p["example_id"]] = p["preferred"]
    return {**general, **specific}


def judge_student(project, name: str, rubric: bool = True, progress=None) -> dict:
    """Judge the newest run of a student against the teacher on the locked eval split; records the
    judgements and a `judge` evaluation. `progress(done, total)` is called as examples finish."""
    from stillroom.curate.lock import verify_lock
    from stillroom.evaluate.compare import run_predictions
    from stillroom.evaluate.judge import JudgeItem, LedgeredJudge, judge_backend, judge_items, record_judgements, summarize
    from stillroom.project import ProjectError
    from stillroom.store import tables as T
    from stillroom.store.db import now, to_json
    from stillroom.store.records import human_labels, latest_run, split_rows

    project.config.student(name)
    task = project.task
    if task.type == "classification":
        raise JudgeRunError("the judge compares free-text and record answers; a classification task is scored "
                            "exactly by `stillroom eval`")
    config = project.config.judge
    lock = verify_lock(project)
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        rows = split_rows(conn, "eval")
        humans = human_labels(conn)
    if run is None:
        raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
    if not rows:
        raise ProjectError("the eval split has no teacher-labelled examples")
    backend = judge_backend(config)  # says so when no judge is configured
    answers = run_predictions(project, name, None, rows)
    preferences = human_preferences(project, name)
    from stillroom.curate.pii import Redactor

    redactor = Redactor.for_project(project)

    def out(text: str | None) -> str | None:
        return None if text is None else redactor(text, "output")

    items = [JudgeItem(str(ex.id), redactor(ex.input), student=out(answers[ex.id]), teacher=out(label),
                       reference=out(humans.get(ex.id)), human_preference=preferences.get(ex.id)) for ex, label in rows]
    redactor.record(project.store.engine)
    calls = {"sent": 0, "cached": 0}

    async def go():
        try:
            return await judge_items(
                backend, items, max_retries=config.max_retries, rubric=rubric, on_item=progress,
                backend_for=lambda item: LedgeredJudge(backend, project.store.engine, int(item.key), calls))
        finally:
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()

    judgements = asyncio.run(go())
    gate = project.config.gate
    summary = summarize(judgements, items, gate.bootstrap_resamples, gate.bootstrap_seed)
    result = {
        "student": name, "kind": run["kind"], "run_id": run["id"], "set": "judge",
        "lock_id": lock.id, "lock_sha256": lock.manifest_sha256, "lock_reason": lock.reason,
        "task_type": task.type,
        "judge": {"backend": config.backend, "model": config.model, "max_retries": config.max_retries,
                  "rubric": rubric},
        "calls": calls,
        "pii": redactor.summary(("input", "output")),
        **summary,
    }
    with project.store.engine.begin() as conn:
        evaluation_id = conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=lock.id, kind="judge", metrics=to_json(result), created_at=now(),
        )).inserted_primary_key[0]
    record_judgements(project, judgements, name, run["id"], evaluation_id)
    result.update(evaluation_id=evaluation_id, stale=False, lock_status=None)
    return result

"""Self-training: another student labels the project's unlabelled inputs, and its most confident
answers join a student's training rows (`students[].pseudo_labels`).

The unlabelled pool is every captured or imported input that has no label (teacher or human) and no
split, minus any that equals a locked eval input after case/space folding: the eval set stays unseen
by the labeller's answers too. The labeller is trained first (or reused), then its deployed artifact
answers the pool once; the answers are kept under `artifacts/pseudo-labels/`, keyed by the labeller's
run and the input's hash, so a retrain or a second student labelled by it costs nothing. Rows are
picked per label, most confident first, up to `per_label` and above `min_confidence`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from stillroom.config import StudentConfig
from stillroom.project import Project
from stillroom.store import tables as T
from stillroom.store.records import split_assignments

PREDICT_BATCH = 64  # pool inputs per predict() call: one progress step each
AUDIT_FILE = "pseudo-labels.jsonl"  # in the run folder: the rows the labeller added


def unlabelled_pool(project: Project) -> list[tuple[str, str]]:
    """(content hash, input) of every example with no label and no split that is not an eval input
    after case/space folding, in id order."""
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(T.examples.c.id, T.examples.c.input, T.examples.c.content_hash,
                                   T.examples.c.norm_hash).order_by(T.examples.c.id)).all()
        splits = split_assignments(conn)
        labelled = set(conn.execute(select(T.labels.c.example_id).distinct()).scalars())
    eval_norms = {r.norm_hash for r in rows if splits.get(r.id) == "eval"}
    return [(r.content_hash, r.input) for r in rows
            if r.id not in splits and r.id not in labelled and r.norm_hash not in eval_norms]


def _cache_file(project: Project, labeller: str, run_id: int, deploy: str) -> Path:
    return project.artifacts / "pseudo-labels" / f"{labeller}-run{run_id}-{deploy}.json"


def pool_answers(project: Project, labeller: str, pool: list[tuple[str, str]],
                 progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, list], int]:
    """{content hash: [label, confidence]} of the labeller's deployed artifact on `pool`, and its run
    id. Answers already cached for that run and artifact are not computed again."""
    from stillroom.evaluate.evaluator import check_label_set, deployed_model_path
    from stillroom.store.records import latest_run
    from stillroom.train.registry import load_student

    deploy = project.config.student(labeller).deploy
    with project.store.engine.connect() as conn:
        run_id = latest_run(conn, labeller)["id"]
    cache = _cache_file(project, labeller, run_id, deploy)
    answers = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    todo = [(h, text) for h, text in pool if h not in answers]
    if todo:
        student = load_student(deployed_model_path(project, labeller))
        check_label_set(project.task, student, labeller)
        for start in range(0, len(todo), PREDICT_BATCH):
            chunk = todo[start:start + PREDICT_BATCH]
            for (h, _), p in zip(chunk, student.predict([text for _, text in chunk])):
                answers[h] = [p.label, round(float(p.confidence), 6)]
            if progress:
                progress(min(start + PREDICT_BATCH, len(todo)), len(todo))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(answers), encoding="utf-8")
        os.replace(tmp, cache)  # a killed run leaves the old cache, never half of a new one
    return answers, run_id


def select_rows(pool: list[tuple[str, str]], answers: dict[str, list], per_label: int,
                min_confidence: float) -> list[tuple[str, str]]:
    """(input, label) rows: per label the `per_label` most confident answers at or above
    `min_confidence`; ties keep pool order. Returned in pool order."""
    by_label: dict[str, list[int]] = {}
    for i, (h, _) in enumerate(pool):
        label, confidence = answers[h]
        if confidence >= min_confidence:
            by_label.setdefault(label, []).append(i)
    keep = sorted(i for rows in by_label.values()
                  for i in sorted(rows, key=lambda i: -answers[pool[i][0]][1])[:per_label])
    return [(pool[i][1], answers[pool[i][0]][0]) for i in keep]


def pseudo_labelled_rows(project: Project, student: StudentConfig,
                         progress: Callable[[int, int], None] | None = None) -> tuple[list[tuple[str, str]], dict]:
    """The rows `student.pseudo_labels` adds to training, and what the run records about them. The
    labelling student is trained first when it has no current run for this data, and its deployed
    artifact exported (and re-evaluated) first when it is missing."""
    from stillroom.train.runner import train_student

    spec = student.pseudo_labels
    train_student(project, spec.student, progress=progress)
    if project.config.student(spec.student).deploy != "fp32":  # it labels with what it deploys, as in serving
        from stillroom.train.export import export_deployed

        export_deployed(project, spec.student)
    pool = unlabelled_pool(project)
    answers, run_id = pool_answers(project, spec.student, pool, progress=progress) if pool else ({}, None)
    rows = select_rows(pool, answers, spec.per_label, spec.min_confidence) if pool else []
    by_label: dict[str, int] = {}
    for _, label in rows:
        by_label[label] = by_label.get(label, 0) + 1
    confident = sum(1 for h, _ in pool if answers[h][1] >= spec.min_confidence)
    confidence = {text: answers[h][1] for h, text in pool}
    lowest = min((confidence[text] for text, _ in rows), default=None)
    return rows, {"labeller": spec.student, "labeller_run": run_id, "pool": len(pool),
                  "confident": confident, "rows": len(rows), "labels": len(by_label),
                  "per_label": spec.per_label, "min_confidence": spec.min_confidence,
                  "lowest_confidence_kept": lowest,
                  "audit": [{"input": text, "label": label, "confidence": confidence[text]} for text, label in rows]}


def write_audit(out_dir: Path, info: dict) -> dict:
    """Move the selected rows out of `info` into `<run folder>/pseudo-labels.jsonl`, one row each
    (input, label, the labeller's confidence), so what the student was taught can be read and
    reviewed; returns the rest of `info` for the run's metrics."""
    rest = {k: v for k, v in info.items() if k != "audit"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / AUDIT_FILE, "w", encoding="utf-8") as f:
        for row in info.get("audit", []):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {**rest, "file": AUDIT_FILE}

"""`stillroom calibrate`: the routing threshold for a target agreement, from recorded predictions."""

from __future__ import annotations

from sqlalchemy import select

from stillroom.curate.lock import verify_lock
from stillroom.evaluate.metrics import example_agrees
from stillroom.project import Project, ProjectError
from stillroom.route.calibrate import apply_threshold, pick_threshold
from stillroom.store import tables as T
from stillroom.store.records import latest_run, split_assignments, teacher_labels


def calibrate_student(project: Project, name: str, target: float | None = None) -> dict:
    """Threshold on the calibration split's recorded predictions; coverage and agreement on eval."""
    project.config.student(name)
    target = project.config.routing.target_agreement if target is None else target
    if not 0 < target <= 1:
        raise ProjectError(f"--target must be in (0, 1], got {target}")
    verify_lock(project)
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            raise ProjectError(f"student '{name}' has not been trained; run `stillroom train {name}`")
        rows = conn.execute(
            select(T.predictions.c.example_id, T.predictions.c.label, T.predictions.c.confidence)
            .where(T.predictions.c.run_id == run["id"]).order_by(T.predictions.c.id)
        ).all()
        splits = split_assignments(conn)
        teacher = teacher_labels(conn)
    if not rows:
        raise ProjectError(f"student '{name}' has no recorded predictions; run `stillroom eval {name}`")
    latest = {r.example_id: r for r in rows}  # the newest prediction per example
    by_split: dict[str, tuple[list[float], list[bool]]] = {"calibration": ([], []), "eval": ([], [])}
    for ex, r in latest.items():
        split = splits.get(ex)
        if split in by_split and ex in teacher:
            by_split[split][0].append(r.confidence)
            by_split[split][1].append(example_agrees(project.task, r.label, teacher[ex]))
    chosen = pick_threshold(*by_split["calibration"], target)
    return {
        "student": name, "run_id": run["id"], "target": target, "threshold": chosen["threshold"],
        "calibration_coverage": chosen["coverage"], "calibration_agreement": chosen["agreement"],
        "calibration_n": chosen["n"], "eval": apply_threshold(*by_split["eval"], chosen["threshold"]),
    }

"""CLI: train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, bar, emit, open_project, pct, table


@app.command()
def train(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names from stillroom.yaml (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if data and config are unchanged.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Train students on the train split. Refuses while the eval set is unlocked, changed, or leaks into training."""
    from stillroom.train.runner import train_student

    project = open_project(project_dir)
    names = students or [s.name for s in project.config.students]
    runs = {}
    for name in names:
        with bar(f"train {name}", enabled=not as_json) as update:
            run = train_student(project, name, force=force, progress=update)
        runs[name] = {"run_id": run["id"], "skipped": run["skipped"], "metrics": run["metrics"],
                      "artifact": run["artifact_path"]}
    emit(as_json, runs, lambda: table(
        "Training", ["student", "run", "status", "val agreement", "seconds"],
        [[n, r["run_id"], "unchanged (skipped)" if r["skipped"] else "trained",
          pct(r["metrics"].get("val_agreement")), r["metrics"].get("train_seconds")] for n, r in runs.items()]))

"""CLI: run (every stage in order)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, console, emit, open_project, table


@app.command()
def run(
    force: Annotated[bool, typer.Option(help="Re-run every stage even if its inputs are unchanged.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Run the whole pipeline: import -> split -> lock -> train -> eval -> report.

    Stages whose inputs did not change are skipped. Exit 1 if no student passes the gate."""
    from stillroom.pipeline import run_pipeline

    project = open_project(project_dir)
    if as_json:
        result = run_pipeline(project, force=force)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console(stderr=True)) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = run_pipeline(project, force=force, progress=progress)

    def show():
        table("stillroom run", ["stage", "status", "seconds", "detail"],
               [[r["stage"], r["status"], r["seconds"], r["detail"]] for r in result["stages"]])
        for v in result["gate"].values():
            console().print(("[green]" if v["passed"] else "[red]") + v["message"] + "[/]")
        console().print(f"\nReport: {result['report']['html']}")

    emit(as_json, result, show)
    if result["gate"] and not any(v["passed"] for v in result["gate"].values()):
        raise typer.Exit(1)

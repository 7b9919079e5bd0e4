"""CLI: report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, console, emit, open_project


@app.command()
def report(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: .stillroom/report).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Write report.html, report.md and report.json: data, the three-way eval table with the gap's 95%
    interval, gate verdicts (stale evaluations marked), calibration, worst slices, routing coverage,
    cost and payback."""
    from stillroom.report.render import write_report

    result = write_report(open_project(project_dir), out)
    emit(as_json, {k: str(v) if k != "summary" else v for k, v in result.items()},
          lambda: console().print(f"Report: {result['html']}\n        {result['markdown']}\n        {result['json']}"))

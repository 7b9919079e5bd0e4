"""CLI: serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import ProjectDir, app, open_project


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    student: Annotated[Optional[str], typer.Option(help="Student to serve (default: routing.student or the best that passes the gate).")] = None,
    project_dir: ProjectDir = Path("."),
):
    """OpenAI-compatible gateway: the student answers when confident, the teacher otherwise.

    Point any OpenAI client at http://HOST:PORT/v1. Every request and routing decision is logged."""
    from stillroom.serve.app import serve as run_server

    run_server(open_project(project_dir), host=host, port=port, student=student)

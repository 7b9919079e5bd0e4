"""What every CLI module shares: the typer app, option types and output helpers."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from stillroom.errors import StillroomError

app = typer.Typer(
    name="stillroom",
    help=(
        "Distil an expensive teacher LLM into a small student that is proven good enough.\n\n"
        "Typical flow: init -> import -> split -> lock -> train -> eval -> gate -> serve -> report, "
        "or `stillroom run` for all of it. Every command works on the project in the current "
        "folder (or -C DIR) and records what it did in the project's store."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ProjectDir = Annotated[Path, typer.Option("--project", "-C", help="Project folder (holds stillroom.yaml).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables (for scripts).")]


class UserError(StillroomError):
    """A problem the user can fix; printed as a sentence, exit code 2."""


def console(stderr: bool = False):
    from rich.console import Console

    # Piped output is not squeezed to 80 columns: tables stay readable in logs and CI.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 150)


def emit(as_json: bool, payload: dict, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str, ensure_ascii=False) + "\n")
    else:
        human()


def open_project(project_dir: Path):
    from stillroom.project import Project

    return Project.open(project_dir)


@contextmanager
def bar(description: str, enabled: bool = True):
    """A rich progress bar; yields update(done, total). Hidden under --json."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    console().print(table)


def pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"

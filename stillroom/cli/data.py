"""CLI: init, import, split, lock -- getting inputs in and the eval set frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, UserError, app, console, emit, open_project, table


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder for the new project (created if missing).")] = Path("."),
    name: Annotated[Optional[str], typer.Option(help="Task name (default: the folder's name).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing stillroom.yaml.")] = False,
    as_json: JsonFlag = False,
):
    """Create stillroom.yaml (edit its labels and teacher) and the .stillroom/ workspace."""
    from stillroom.project import init_project

    path = init_project(directory, name, force)
    emit(as_json, {"config": str(path)}, lambda: console().print(
        f"Created {path}. Next: edit the labels and teacher in it, then `stillroom import FILE -C {directory}`."))


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSONL (OpenAI chat format or input/output) or CSV file.")],
    role: Annotated[str, typer.Option("--as", help="Whose answers the file's outputs are: teacher or human.")] = "teacher",
    strict: Annotated[bool, typer.Option(help="Abort with nothing written if any line is bad.")] = False,
    input_column: Annotated[str, typer.Option(help="CSV column holding the input.")] = "input",
    output_column: Annotated[str, typer.Option(help="CSV column holding the output.")] = "output",
    split: Annotated[Optional[str], typer.Option(help="Pin the new examples to a split, e.g. your existing test set as 'eval'.")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Import inputs and the teacher's logged answers (or human labels with --as human).

    Re-importing the same file adds nothing. Bad lines are reported by line number and skipped
    (or abort the whole import with --strict)."""
    if role not in ("teacher", "human"):
        raise UserError(f"--as must be 'teacher' or 'human', got {role!r}")
    from stillroom.capture.importers import import_file

    report = import_file(open_project(project_dir), file, role=role, strict=strict,
                         input_column=input_column, output_column=output_column, split=split)

    def show():
        c = console()
        c.print(f"{file}: {report.lines} line(s); {report.examples_added} new example(s), "
                f"{report.examples_existing} already known; {report.labels_added} {role} label(s) added"
                + (f"; {report.unlabelled} without a usable label" if report.unlabelled else ""))
        for line, msg in report.problems[:30]:
            c.print(f"  [yellow]line {line}[/yellow]: {msg}")
        if len(report.problems) > 30:
            c.print(f"  ... and {len(report.problems) - 30} more (use --json for all)")

    emit(as_json, report.as_dict(), show)


@app.command()
def split(
    exclude_leaks: Annotated[bool, typer.Option(help="Take training examples that copy an eval input out of training.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Assign new labelled examples to train/validation/calibration/eval (stratified by label).

    Existing assignments never move; once the eval split is locked, new data never enters it."""
    from stillroom.curate.lock import find_leaks
    from stillroom.curate.split import exclude_examples, split_project

    project = open_project(project_dir)
    report = split_project(project)
    payload = report.as_dict()
    if exclude_leaks:
        payload["excluded_leaks"] = exclude_examples(project, [l["example_id"] for l in find_leaks(project)])

    def show():
        table("Splits", ["split", "added now", "total"],
               [[s, report.assigned.get(s, 0), n] for s, n in report.total.items()])
        if report.unlabelled_skipped:
            self_train = (", or a student with `pseudo_labels` trains on them (self-training, no teacher calls)"
                          if project.task.type == "classification" else "")
            console().print(f"{report.unlabelled_skipped} unlabelled example(s) were not placed: "
                            f"`stillroom label` asks the teacher for them{self_train}.")
        if exclude_leaks:
            console().print(f"{payload['excluded_leaks']} leaking example(s) taken out of training.")

    emit(as_json, payload, show)


@app.command()
def lock(
    relock: Annotated[bool, typer.Option(help="Replace the current lock (invalidates earlier evaluations).")] = False,
    reason: Annotated[str, typer.Option(help="Why (required with --relock; recorded).")] = "initial lock",
    verify: Annotated[bool, typer.Option(help="Only check the current lock; exit 2 if broken.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Freeze the eval split: a manifest of example ids and SHA-256 hashes (.stillroom/eval.lock.json)."""
    from stillroom.curate.lock import lock_eval, verify_lock

    project = open_project(project_dir)
    result = verify_lock(project) if verify else lock_eval(project, reason=reason, relock=relock)
    emit(as_json, result.as_dict(), lambda: console().print(
        f"Eval lock {result.id}: {len(result.manifest)} examples, sha256 {result.manifest_sha256} "
        f"({'verified' if verify else result.reason})."))

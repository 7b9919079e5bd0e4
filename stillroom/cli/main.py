"""The `stillroom` command: a thin layer over the Python API, one command per pipeline stage.

Imports of stillroom's stages (and through them torch) happen inside each command, so `--help`
is instant and works without the training extras.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

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


def _console(stderr: bool = False):
    from rich.console import Console

    # Piped output is not squeezed to 80 columns: tables stay readable in logs and CI.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 150)


def _emit(as_json: bool, payload: dict, human) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=1, default=str, ensure_ascii=False) + "\n")
    else:
        human()


def _open(project_dir: Path):
    from stillroom.project import Project

    return Project.open(project_dir)


@contextmanager
def _bar(description: str, enabled: bool = True):
    """A rich progress bar; yields update(done, total). Hidden under --json."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=_console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else str(v) for v in r])
    _console().print(table)


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


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
    _emit(as_json, {"config": str(path)}, lambda: _console().print(
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

    report = import_file(_open(project_dir), file, role=role, strict=strict,
                         input_column=input_column, output_column=output_column, split=split)

    def show():
        c = _console()
        c.print(f"{file}: {report.lines} line(s); {report.examples_added} new example(s), "
                f"{report.examples_existing} already known; {report.labels_added} {role} label(s) added"
                + (f"; {report.unlabelled} without a usable label" if report.unlabelled else ""))
        for line, msg in report.problems[:30]:
            c.print(f"  [yellow]line {line}[/yellow]: {msg}")
        if len(report.problems) > 30:
            c.print(f"  ... and {len(report.problems) - 30} more (use --json for all)")

    _emit(as_json, report.as_dict(), show)


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

    project = _open(project_dir)
    report = split_project(project)
    payload = report.as_dict()
    if exclude_leaks:
        payload["excluded_leaks"] = exclude_examples(project, [l["example_id"] for l in find_leaks(project)])

    def show():
        _table("Splits", ["split", "added now", "total"],
               [[s, report.assigned.get(s, 0), n] for s, n in report.total.items()])
        if report.unlabelled_skipped:
            _console().print(f"{report.unlabelled_skipped} unlabelled example(s) were not placed.")
        if exclude_leaks:
            _console().print(f"{payload['excluded_leaks']} leaking example(s) taken out of training.")

    _emit(as_json, payload, show)


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

    project = _open(project_dir)
    result = verify_lock(project) if verify else lock_eval(project, reason=reason, relock=relock)
    _emit(as_json, result.as_dict(), lambda: _console().print(
        f"Eval lock {result.id}: {len(result.manifest)} examples, sha256 {result.manifest_sha256} "
        f"({'verified' if verify else result.reason})."))


@app.command()
def train(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names from stillroom.yaml (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if data and config are unchanged.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Train students on the train split. Refuses while the eval set is unlocked, changed, or leaks into training."""
    from stillroom.train.runner import train_student

    project = _open(project_dir)
    names = students or [s.name for s in project.config.students]
    runs = {}
    for name in names:
        with _bar(f"train {name}", enabled=not as_json) as update:
            run = train_student(project, name, force=force, progress=update)
        runs[name] = {"run_id": run["id"], "skipped": run["skipped"], "metrics": run["metrics"],
                      "artifact": run["artifact_path"]}
    _emit(as_json, runs, lambda: _table(
        "Training", ["student", "run", "status", "val agreement", "seconds"],
        [[n, r["run_id"], "unchanged (skipped)" if r["skipped"] else "trained",
          _pct(r["metrics"].get("val_agreement")), r["metrics"].get("train_seconds")] for n, r in runs.items()]))


@app.command("eval")
def eval_(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all trained).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Score students on the locked eval split vs the teacher (and human labels where present),
    and pick each one's routing threshold on the calibration split."""
    from stillroom.evaluate.evaluator import evaluate_student

    project = _open(project_dir)
    names = students or [s.name for s in project.config.students]
    results = {}
    for name in names:
        with _bar(f"eval {name}", enabled=not as_json) as update:
            update(0, 1)
            results[name] = evaluate_student(project, name)
            update(1, 1)

    def show():
        _table("Locked eval split (agree = agreement with the teacher)", [
            "student", "n", "agree", "macro-F1", "human n", "student acc", "teacher acc", "threshold",
            "coverage", "served agree"],
            [[n, r["vs_teacher"]["n"], _pct(r["agreement"]), _pct(r["vs_teacher"]["macro_f1"]),
              r["vs_human"]["n"], _pct(r["vs_human"]["student_accuracy"]),
              _pct(r["vs_human"]["teacher_accuracy"]), f"{r['calibration']['threshold']:.3f}",
              _pct(r["at_threshold"]["coverage"]), _pct(r["at_threshold"]["student_agreement_on_covered"])]
             for n, r in results.items()])
        for n, r in results.items():
            labels = r["vs_teacher"]["labels"]
            _table(f"{n}: per class (vs teacher)", ["label", "precision", "recall", "F1", "support"],
                   [[l, _pct(r["vs_teacher"]["per_class"][l]["precision"]), _pct(r["vs_teacher"]["per_class"][l]["recall"]),
                     _pct(r["vs_teacher"]["per_class"][l]["f1"]), r["vs_teacher"]["per_class"][l]["support"]] for l in labels])

    _emit(as_json, {n: {k: v for k, v in r.items() if k != "coverage_curve"} for n, r in results.items()}, show)


@app.command()
def calibrate(
    student: Annotated[Optional[str], typer.Argument(help="Student name (default: all evaluated).")] = None,
    target: Annotated[Optional[float], typer.Option(help="Target agreement (default: routing.target_agreement).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Show the confidence threshold that meets the target agreement, its coverage, and the agreement
    reached on the eval split. With --target, recompute for another target from the recorded predictions."""
    from stillroom.evaluate.calibration import calibrate_student

    project = _open(project_dir)
    names = [student] if student else [s.name for s in project.config.students]
    results = {n: calibrate_student(project, n, target) for n in names}
    _emit(as_json, results, lambda: _table(
        "Routing threshold (eval = locked eval split)", ["student", "target", "threshold", "cal coverage",
                                                         "eval coverage", "served agree", "system agree"],
        [[n, f"{r['target']:.1%}", f"{r['threshold']:.3f}", _pct(r["calibration_coverage"]),
          _pct(r["eval"]["coverage"]), _pct(r["eval"]["student_agreement_on_covered"]),
          _pct(r["eval"]["system_agreement"])] for n, r in results.items()]))


@app.command()
def gate(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Exit 0 if every named student is within the allowed gap to the teacher, 1 if any is not
    (and by how much), 2 if a student has not been evaluated against the current lock."""
    from stillroom.evaluate.evaluator import latest_evaluation
    from stillroom.evaluate.gate import decide

    project = _open(project_dir)
    names = students or [s.name for s in project.config.students]
    verdicts = {}
    for name in names:
        project.config.student(name)
        evaluation = latest_evaluation(project, name)
        if evaluation is None:
            raise UserError(f"student '{name}' has no evaluation; run `stillroom eval {name}`")
        verdicts[name] = decide(evaluation, project.config.gate).as_dict()
    _emit(as_json, verdicts, lambda: [_console().print(
        ("[green]" if v["passed"] else "[red]") + v["message"] + "[/]") for v in verdicts.values()])
    if not all(v["passed"] for v in verdicts.values()):
        raise typer.Exit(1)


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

    run_server(_open(project_dir), host=host, port=port, student=student)


@app.command()
def report(
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: .stillroom/report).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Write report.md and report.html: data, eval table, gate, routing coverage, cost and payback."""
    from stillroom.report.render import write_report

    result = write_report(_open(project_dir), out)
    _emit(as_json, {k: str(v) if k != "summary" else v for k, v in result.items()},
          lambda: _console().print(f"Report: {result['html']}\n        {result['markdown']}"))


@app.command()
def run(
    force: Annotated[bool, typer.Option(help="Re-run every stage even if its inputs are unchanged.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Run the whole pipeline: import -> split -> lock -> train -> eval -> report.

    Stages whose inputs did not change are skipped. Exit 1 if no student passes the gate."""
    from stillroom.pipeline import run_pipeline

    project = _open(project_dir)
    if as_json:
        result = run_pipeline(project, force=force)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=_console(stderr=True)) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = run_pipeline(project, force=force, progress=progress)

    def show():
        _table("stillroom run", ["stage", "status", "seconds", "detail"],
               [[r["stage"], r["status"], r["seconds"], r["detail"]] for r in result["stages"]])
        for v in result["gate"].values():
            _console().print(("[green]" if v["passed"] else "[red]") + v["message"] + "[/]")
        _console().print(f"\nReport: {result['report']['html']}")

    _emit(as_json, result, show)
    if result["gate"] and not any(v["passed"] for v in result["gate"].values()):
        raise typer.Exit(1)


def quiet_libraries() -> None:
    """No downloads at run time and no library progress bars over ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    """Entry point: known problems become one clear message and exit code 2, never a traceback."""
    from stillroom.errors import USER_ERRORS

    quiet_libraries()
    try:
        app()
    except USER_ERRORS as exc:
        from rich.text import Text

        _console(stderr=True).print(Text("error: ", style="red") + Text(str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted; everything finished so far is kept in the store.")
        sys.exit(130)
    except Exception as exc:  # an unexpected bug: still a sentence, with the way to get details
        if os.environ.get("STILLROOM_DEBUG"):
            raise
        from rich.text import Text

        _console(stderr=True).print(Text("unexpected error: ", style="red") + Text(
            f"{type(exc).__name__}: {exc}\nSet STILLROOM_DEBUG=1 for the full traceback."))
        sys.exit(3)


if __name__ == "__main__":
    main()

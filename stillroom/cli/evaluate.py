"""CLI: eval, calibrate, gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, UserError, app, bar, console, emit, open_project, pct, table


@app.command("eval")
def eval_(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all trained).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Score students on the locked eval split vs the teacher (and human labels where present),
    and pick each one's routing threshold on the calibration split."""
    from stillroom.evaluate.evaluator import evaluate_student

    project = open_project(project_dir)
    names = students or [s.name for s in project.config.students]
    results = {}
    for name in names:
        with bar(f"eval {name}", enabled=not as_json) as update:
            update(0, 1)
            results[name] = evaluate_student(project, name)
            update(1, 1)

    def show():
        table("Locked eval split (agree = agreement with the teacher)", [
            "student", "n", "agree", "macro-F1", "human n", "student acc", "teacher acc", "threshold",
            "coverage", "served agree"],
            [[n, r["vs_teacher"]["n"], pct(r["agreement"]), pct(r["vs_teacher"]["macro_f1"]),
              r["vs_human"]["n"], pct(r["vs_human"]["student_accuracy"]),
              pct(r["vs_human"]["teacher_accuracy"]), f"{r['calibration']['threshold']:.3f}",
              pct(r["at_threshold"]["coverage"]), pct(r["at_threshold"]["student_agreement_on_covered"])]
             for n, r in results.items()])
        for n, r in results.items():
            labels = r["vs_teacher"]["labels"]
            table(f"{n}: per class (vs teacher)", ["label", "precision", "recall", "F1", "support"],
                   [[l, pct(r["vs_teacher"]["per_class"][l]["precision"]), pct(r["vs_teacher"]["per_class"][l]["recall"]),
                     pct(r["vs_teacher"]["per_class"][l]["f1"]), r["vs_teacher"]["per_class"][l]["support"]] for l in labels])

    emit(as_json, {n: {k: v for k, v in r.items() if k != "coverage_curve"} for n, r in results.items()}, show)


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

    project = open_project(project_dir)
    names = [student] if student else [s.name for s in project.config.students]
    results = {n: calibrate_student(project, n, target) for n in names}
    emit(as_json, results, lambda: table(
        "Routing threshold (eval = locked eval split)", ["student", "target", "threshold", "cal coverage",
                                                         "eval coverage", "served agree", "system agree"],
        [[n, f"{r['target']:.1%}", f"{r['threshold']:.3f}", pct(r["calibration_coverage"]),
          pct(r["eval"]["coverage"]), pct(r["eval"]["student_agreement_on_covered"]),
          pct(r["eval"]["system_agreement"])] for n, r in results.items()]))


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

    project = open_project(project_dir)
    names = students or [s.name for s in project.config.students]
    verdicts = {}
    for name in names:
        project.config.student(name)
        evaluation = latest_evaluation(project, name)
        if evaluation is None:
            raise UserError(f"student '{name}' has no evaluation; run `stillroom eval {name}`")
        verdicts[name] = decide(evaluation, project.config.gate).as_dict()
    emit(as_json, verdicts, lambda: [console().print(
        ("[green]" if v["passed"] else "[red]") + v["message"] + "[/]") for v in verdicts.values()])
    if not all(v["passed"] for v in verdicts.values()):
        raise typer.Exit(1)

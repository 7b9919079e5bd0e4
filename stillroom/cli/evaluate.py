"""CLI: eval (plus --compare, --shadow, --show, --export-promptfoo), calibrate, gate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, UserError, app, bar, console, emit, open_project, pct, table


def _ci(g: dict | None) -> str:
    if not g or g.get("estimate") is None:
        return "-"
    return f"{g['estimate']:.2f} ({g['low']:.2f} to {g['high']:.2f})"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _show_evaluations(results: dict, title: str) -> None:
    table(title, ["student", "lock", "n", "agree", "macro-F1", "micro-F1", "gap pts (95% CI)", "ECE", "human n",
                  "student acc", "teacher acc", "threshold", "coverage", "served agree"],
          [[n, f"STALE ({r['lock_id']})" if r.get("stale") else r.get("lock_id", "-"), r["vs_teacher"]["n"],
            pct(r["agreement"]),
            pct(r["vs_teacher"]["macro_f1"]), pct(r["vs_teacher"].get("micro_f1")),
            _ci((r.get("gap") or {}).get("teacher")), _num((r.get("confidence_calibration") or {}).get("ece")),
            r["vs_human"]["n"], pct(r["vs_human"]["student_accuracy"]), pct(r["vs_human"]["teacher_accuracy"]),
            f"{r['calibration']['threshold']:.3f}" if "calibration" in r else "-",
            pct(r["at_threshold"]["coverage"]) if "at_threshold" in r else "-",
            pct(r["at_threshold"]["student_agreement_on_covered"]) if "at_threshold" in r else "-"]
           for n, r in results.items()])
    from rich.markup import escape

    out = console()
    for n, r in results.items():
        if r.get("stale"):
            out.print(f"[red]STALE[/] {escape(n)}: the evaluation {escape(r['lock_status']['message'])}", soft_wrap=True)
        if "three_way" not in r:
            out.print(f"{n}: recorded before intervals and slices existed; re-run `stillroom eval {n}`")
            continue
        tw = r["three_way"]
        table(f"{n}: three-way comparison", ["comparison", "n", "accuracy", "macro-F1", "micro-F1"],
              [[label, tw[k]["n"], pct(tw[k]["accuracy"]), pct(tw[k]["macro_f1"]), pct(tw[k]["micro_f1"])]
               for label, k in (("student vs teacher", "student_vs_teacher"), ("student vs human", "student_vs_human"),
                                ("teacher vs human", "teacher_vs_human"))])
        if tw.get("message"):
            out.print(f"{n}: {tw['message']}")
        if r["gap"].get("human"):
            out.print(f"{n}: gap vs human labels {_ci(r['gap']['human'])} points")
        for ref in ("teacher", "human"):
            sl = r["slices"].get(ref)
            if not sl:
                continue
            worst = sorted(sl["slices"], key=lambda s: (not s["gated"], -s["gap_points"]))[:5]
            table(f"{n}: worst slices vs {ref} (gated from {sl['min_examples']} examples)",
                  ["slice", "n", "student", "gap pts", "gated", "an example the student loses"],
                  [[f"{s['kind']}: {s['name']}", s["n"], pct(s["student_score"]), f"{s['gap_points']:.2f}",
                    "yes" if s["gated"] else "no", (s["examples"][0]["input"][:60] if s["examples"] else "")]
                   for s in worst])
            for e in sl["empty"]:
                out.print(f"{n}: empty slice {e['kind']} {e['name']}: {e['message']}")


def _no_coverage_curve(results: dict) -> dict:
    return {n: {k: v for k, v in r.items() if k != "coverage_curve"} for n, r in results.items()}


@app.command("eval")
def eval_(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all trained).")] = None,
    compare: Annotated[Optional[tuple[str, str]], typer.Option(
        "--compare", metavar="A B",
        help="Compare two sources on the locked eval set with McNemar's test: student names "
             "(newest run) or NAME@runID.")] = None,
    shadow: Annotated[bool, typer.Option(
        "--shadow", help="Score the student(s) on logged production traffic where the teacher answered "
                         "(the gateway's log, plus any --log files).")] = False,
    log: Annotated[Optional[list[Path]], typer.Option(
        "--log", help="With --shadow: a request log (OpenAI chat JSONL or input,output CSV) to score too.")] = None,
    show: Annotated[bool, typer.Option(
        "--show", help="Show the stored evaluations without re-running them (stale ones are marked).")] = False,
    export_promptfoo: Annotated[Optional[Path], typer.Option(
        "--export-promptfoo", metavar="DIR",
        help="Write the locked eval set as a promptfoo suite (promptfooconfig.yaml + tests.yaml) to DIR.")] = None,
    gateway_url: Annotated[str, typer.Option(
        help="With --export-promptfoo: the stillroom gateway's OpenAI-compatible base URL.")] = "http://127.0.0.1:8000/v1",
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Score students on the locked eval split vs the teacher (and human labels where present): metrics,
    the gap with a 95% confidence interval, slices, calibration; pick each one's routing threshold on
    the calibration split. --compare, --shadow, --show and --export-promptfoo do one thing each instead."""
    project = open_project(project_dir)
    if sum(bool(x) for x in (compare, shadow, show, export_promptfoo)) > 1:
        raise UserError("use one of --compare, --shadow, --show, --export-promptfoo at a time")
    if log and not shadow:
        raise UserError("--log goes with --shadow")
    if compare:
        return _compare(project, compare, as_json)
    if export_promptfoo:
        from stillroom.evaluate.promptfoo import export_promptfoo as export

        out = export(project, export_promptfoo, gateway_url)
        emit(as_json, out, lambda: console().print(
            f"Wrote {out['n_tests']} tests (eval lock {out['lock_id']}) to {out['config']} and {out['tests']}.\n"
            f"Run: {out['run']}"))
        return
    names = students or [s.name for s in project.config.students]
    for name in names:
        project.config.student(name)
    if show:
        from stillroom.evaluate.evaluator import latest_evaluation

        results = {n: e for n in names if (e := latest_evaluation(project, n)) is not None}
        if not results:
            raise UserError("no stored evaluation of " + ", ".join(names) + "; run `stillroom eval`")
        emit(as_json, _no_coverage_curve(results), lambda: _show_evaluations(results, "Stored evaluations (locked eval split)"))
        return
    results = {}
    for name in names:
        with bar(f"{'shadow ' if shadow else ''}eval {name}", enabled=not as_json) as update:
            update(0, 1)
            if shadow:
                from stillroom.evaluate.shadow import shadow_evaluate

                results[name] = shadow_evaluate(project, name, log or [])
            else:
                from stillroom.evaluate.evaluator import evaluate_student

                results[name] = evaluate_student(project, name)
            update(1, 1)

    def human():
        if shadow:
            _show_evaluations(results, "Shadow evaluation on logged traffic (agree = agreement with the teacher)")
            for n, r in results.items():
                t = r["traffic"]
                console().print(f"{n}: scored {t['scored']} logged teacher answers; not scored: "
                                f"{t['gateway_student_served']} student-served, {t['unparseable_teacher_answers']} "
                                f"unparseable, {t['gateway_errors']} errors; {t['seen_in_training']} scored inputs were "
                                "training inputs")
            return
        _show_evaluations(results, "Locked eval split (agree = agreement with the teacher)")
        for n, r in results.items():
            labels = r["vs_teacher"]["labels"]
            pc = r["vs_teacher"]["per_class"]
            table(f"{n}: per class (vs teacher)", ["label", "precision", "recall", "F1", "support"],
                  [[l, pct(pc[l]["precision"]), pct(pc[l]["recall"]), pct(pc[l]["f1"]), pc[l]["support"]] for l in labels])

    emit(as_json, _no_coverage_curve(results), human)


def _compare(project, specs: tuple[str, str], as_json: bool) -> None:
    from stillroom.evaluate.compare import compare_sources

    a, b = specs
    with bar(f"compare {a} vs {b}", enabled=not as_json) as update:
        update(0, 1)
        result = compare_sources(project, a, b)
        update(1, 1)

    def human():
        rows = []
        for ref in ("teacher", "human"):
            c = result[f"vs_{ref}"]
            if c is None:
                continue
            t = c["test"]
            d = c["difference"]
            rows.append([ref, c["n"], pct(c["a_score"]), pct(c["b_score"]),
                         _ci(d),
                         f"{c['table']['a_only']} / {c['table']['b_only']}" if "table" in c else "-",
                         t["method"], f"{t['p_value']:.4g}"])
        table(f"{a} vs {b} on eval lock {result['lock_id']} (difference = {a} minus {b}, points)",
              ["reference", "n", a, b, "difference (95% CI)", f"only {a} right / only {b} right", "test", "p"], rows)
        if result["vs_human_message"]:
            console().print(result["vs_human_message"])

    emit(as_json, result, human)


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
    mode: Annotated[Optional[str], typer.Option(
        help="point: the estimated gap must be within the allowed gap; strict: the upper end of its 95% "
             "interval must be (default: gate.mode).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Exit 0 if every named student is within the allowed gap to the teacher (and no large slice is
    far behind), 1 if any is not (and by how much, or which slice), 2 if a student has not been
    evaluated. An evaluation against an older eval lock is stale and fails."""
    from stillroom.evaluate.evaluator import deployed_evaluation
    from stillroom.evaluate.gate import decide

    project = open_project(project_dir)
    if mode is not None and mode not in ("point", "strict"):
        raise UserError(f"--mode must be 'point' or 'strict', got {mode!r}")
    names = students or [s.name for s in project.config.students]
    verdicts = {}
    for name in names:
        project.config.student(name)
        # The gate judges what will be deployed (students[].deploy), not the fp32 training copy.
        evaluation = deployed_evaluation(project, name)
        deploy = project.config.student(name).deploy
        if evaluation is None:
            fix = f"stillroom eval {name}" if deploy == "fp32" else f"stillroom export {name} --format {deploy}"
            raise UserError(f"student '{name}' (deploy: {deploy}) has no evaluation; run `{fix}`")
        verdicts[name] = {**decide(evaluation, project.config.gate, mode).as_dict(), "deploy": deploy}
    from rich.markup import escape

    emit(as_json, verdicts, lambda: [console().print(
        ("[green]" if v["passed"] else "[red]") + escape(v["message"]) + "[/]", soft_wrap=True)
        for v in verdicts.values()])
    if not all(v["passed"] for v in verdicts.values()):
        raise typer.Exit(1)

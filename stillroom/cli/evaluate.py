"""CLI: eval (plus --compare, --shadow, --show, --export-promptfoo), judge, calibrate, gate."""

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


def _row_columns(r: dict) -> tuple[list[str], list[str]]:
    """The type's aggregate columns (header, keys) for a student-vs-teacher row."""
    kind = r.get("task_type", "classification")
    if kind == "extraction":
        return ["field P", "field R", "field F1", "exact", "valid"], [
            "field_precision", "field_recall", "field_f1", "exact_match", "validity"]
    if kind == "generation":
        return ["ROUGE-L", "BLEU", "chrF", "valid"], ["rouge_l", "bleu", "chrf", "validity"]
    return ["macro-F1", "micro-F1"], ["macro_f1", "micro_f1"]


def _human(r: dict, who: str):
    h = r["vs_human"]
    return h.get(f"{who}_score", h.get(f"{who}_accuracy"))


def _show_evaluations(results: dict, title: str) -> None:
    first = next(iter(results.values()))
    headers, keys = _row_columns(first)
    metric = first.get("metric") or "accuracy"
    table(title, ["student", "lock", "n", "agree" if metric == "accuracy" else f"agree ({metric})", *headers,
                  "gap pts (95% CI)", "ECE", "human n", "student vs human", "teacher vs human", "threshold",
                  "coverage", "served agree"],
          [[n, f"STALE ({r['lock_id']})" if r.get("stale") else r.get("lock_id", "-"), r["vs_teacher"]["n"],
            pct(r["agreement"]), *[pct(r["vs_teacher"].get(k)) for k in keys],
            _ci((r.get("gap") or {}).get("teacher")), _num((r.get("confidence_calibration") or {}).get("ece")),
            r["vs_human"]["n"], pct(_human(r, "student")), pct(_human(r, "teacher")),
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
        headers, keys = _row_columns(r)
        first_key = "accuracy" if r.get("task_type", "classification") == "classification" else "score"
        table(f"{n}: three-way comparison", ["comparison", "n", tw.get("metric") or "accuracy", *headers],
              [[label, tw[k]["n"], pct(tw[k].get(first_key)), *[pct(tw[k].get(m)) for m in keys]]
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


def _show_type_details(n: str, r: dict) -> None:
    """Per class (classification), per field (extraction) or length statistics (generation)."""
    vt = r["vs_teacher"]
    kind = r.get("task_type", "classification")
    if kind == "classification":
        pc = vt["per_class"]
        table(f"{n}: per class (vs teacher)", ["label", "precision", "recall", "F1", "support"],
              [[l, pct(pc[l]["precision"]), pct(pc[l]["recall"]), pct(pc[l]["f1"]), pc[l]["support"]]
               for l in vt["labels"]])
    elif kind == "extraction":
        table(f"{n}: per field (vs teacher; {vt['n_invalid']} answer(s) fail the schema)",
              ["field", "precision", "recall", "F1", "support"],
              [[f, pct(m["precision"]), pct(m["recall"]), pct(m["f1"]), m["support"]]
               for f, m in vt["per_field"].items()])
    else:
        ln = vt["length"]
        table(f"{n}: length in words (vs teacher)", ["", "mean", "p50", "p95"],
              [[who, _num(ln[who]["mean"], 1), _num(ln[who]["p50"], 1), _num(ln[who]["p95"], 1)]
               for who in ("prediction", "reference")])
        console().print(f"{n}: student/teacher length ratio {_num(ln['ratio'], 2)}; "
                        f"{vt['n_invalid']} answer(s) the task rejects (empty or too long)")


def _no_coverage_curve(results: dict) -> dict:
    return {n: {k: v for k, v in r.items() if k != "coverage_curve"} for n, r in results.items()}


def _add_member_comparison(project, results: dict) -> None:
    """Each ensemble's result gains `vs_members`: its members' deployed agreement on the same lock."""
    from stillroom.evaluate.evaluator import ensemble_vs_members

    for n, r in results.items():
        if (vs := ensemble_vs_members(project, n, r)) is not None:
            r["vs_members"] = vs


def _show_member_comparison(results: dict) -> None:
    for n, r in results.items():
        vs = r.get("vs_members")
        if not vs:
            continue
        best = vs["best_member"]
        if vs["below_best_member"]:
            console().print(f"[yellow]{n}[/]: {pct(r['agreement'])} on the locked eval, below its member {best} "
                            f"alone ({pct(vs['members'][best])}, same lock). The member is cheaper to serve; "
                            f"consider deploying it instead.", soft_wrap=True)
        else:
            console().print(f"{n}: {pct(r['agreement'])} on the locked eval; its best member, {best}, "
                            f"scores {pct(vs['members'][best])} alone.", soft_wrap=True)


@app.command("eval")
def eval_(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all trained).")] = None,
    compare: Annotated[Optional[tuple[str, str]], typer.Option(
        "--compare", metavar="A B",
        help="Compare two sources on the locked eval set (McNemar's test for classification, a paired "
             "bootstrap otherwise): student names (newest run) or NAME@runID.")] = None,
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
        _add_member_comparison(project, results)
        emit(as_json, _no_coverage_curve(results), lambda: (
            _show_evaluations(results, "Stored evaluations (locked eval split)"), _show_member_comparison(results)))
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
            _show_type_details(n, r)
        _show_member_comparison(results)

    if not shadow:
        _add_member_comparison(project, results)
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
def judge(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names (default: all trained).")] = None,
    rubric: Annotated[bool, typer.Option(
        "--rubric/--no-rubric", help="Also score each answer 1-5 on the rubric (two more judge calls per example).")] = True,
    import_preferences: Annotated[Optional[Path], typer.Option(
        "--import-preferences", metavar="FILE",
        help="Record human preferences (CSV or JSONL: input, preferred = student|teacher|tie, optional student) "
             "and exit; later judge runs report judge-human agreement on them.")] = None,
    show: Annotated[bool, typer.Option("--show", help="Show the stored judge results without calling the judge.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Have the configured LLM judge (`judge:` in stillroom.yaml) compare each student's answers with the
    teacher's on the locked eval split: pairwise in both orders (position bias cancels) and a 1-5 rubric.
    Reports the win rate (student at or above the teacher) with a 95% interval; unreadable verdicts are
    retried, then counted as missing, never as wins. Every call is recorded, so a re-run pays for nothing twice."""
    project = open_project(project_dir)
    if import_preferences is not None:
        if students or show:
            raise UserError("--import-preferences takes no student names and no --show")
        from stillroom.evaluate.judge_eval import import_preferences as do_import

        out = do_import(project, import_preferences)
        emit(as_json, out, lambda: console().print(
            f"Imported {out['imported']} preference(s) from {out['file']}"
            + (f"; skipped {len(out['problems'])}: " + "; ".join(out["problems"][:5]) if out["problems"] else "")))
        return
    names = students or [s.name for s in project.config.students]
    for name in names:
        project.config.student(name)
    results = {}
    if show:
        from stillroom.evaluate.evaluator import latest_evaluation

        results = {n: e for n in names if (e := latest_evaluation(project, n, kind="judge")) is not None}
        if not results:
            raise UserError("no stored judge result for " + ", ".join(names) + "; run `stillroom judge`")
    else:
        from stillroom.evaluate.judge_eval import judge_student

        for name in names:
            with bar(f"judge {name}", enabled=not as_json) as update:
                results[name] = judge_student(project, name, rubric=rubric, progress=update)

    def human():
        table("LLM judge on the locked eval split (win = student at or above the teacher)",
              ["student", "lock", "items", "win rate (95% CI)", "student / tie / teacher / missing", "strict wins",
               "position consistency", "rubric student", "rubric teacher", "judge-human agreement", "calls sent / cached"],
              [[n, f"STALE ({r['lock_id']})" if r.get("stale") else r["lock_id"], r["n_items"],
                _win(r["win_rate"]), " / ".join(str(r["outcomes"][k]) for k in ("student", "tie", "teacher", "missing")),
                pct(r["strict_win_rate"]), pct(r["position_consistency"]),
                _num(r["rubric"]["student"]["estimate"], 2), _num(r["rubric"]["teacher"]["estimate"], 2),
                (f"{pct(r['human_agreement']['agreement'])} (n={r['human_agreement']['n']}, kappa "
                 f"{_num(r['human_agreement']['cohen_kappa'], 2)})") if r["human_agreement"]["n"] else "-",
                f"{r['calls']['sent']} / {r['calls']['cached']}"]
               for n, r in results.items()])
        for n, r in results.items():
            prompts = ", ".join(f"{p['name']} v{p['version']}" for p in r["prompts"])
            console().print(f"{n}: judge {r['judge']['model']} ({r['judge']['backend']}), prompts {prompts}")

    emit(as_json, {n: {k: v for k, v in r.items() if k != "outcome_by_item"} for n, r in results.items()}, human)


def _win(ci: dict) -> str:
    if not ci or ci.get("estimate") is None:
        return "-"
    return f"{ci['estimate']:.1%} ({ci['low']:.1%} to {ci['high']:.1%})"


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

"""The report: one Markdown and one self-contained HTML file saying what was measured, whether a
student may be deployed, how much traffic it can take and what that saves.

Everything shown is read back from the store (counts, the eval lock, each student's newest
evaluation) and recomputed where it is cheap (gate verdicts, economics), so the report never
disagrees with `stillroom gate`. `summary` in the return value is the same content for scripts,
also written as report.json. An evaluation against an older eval lock is marked stale wherever it
appears, with the re-lock's reason.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

from stillroom.curate.lock import active_lock
from stillroom.economics.costs import economics
from stillroom.evaluate.evaluator import deployed_evaluation, latest_evaluation
from stillroom.evaluate.gate import decide
from stillroom.project import Project
from stillroom.store.records import counts, latest_run

TEMPLATES = Path(__file__).parent / "templates"
MAX_ERRORS_SHOWN = 10
MAX_INPUT_SHOWN = 300
PLOTS = ("confusion", "fields", "lengths", "coverage", "reliability", "slices", "cost")
WORST_SLICES_SHOWN = 8
WORST_EXAMPLES_SHOWN = 10


# ---- formatting, shared by the Markdown writer and the template --------------------------------

def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x * 100:.{digits}f}%"


def money(x: float | None) -> str:
    """$1,234.56 for amounts, three significant digits below a dollar ($0.00179)."""
    if x is None:
        return "—"
    sign = "-" if x < 0 else ""
    x = abs(x)
    if x == 0 or x >= 1 or (x >= 0.01 and round(x, 2) == x):
        return f"{sign}${x:,.2f}"
    return f"{sign}${x:.3g}" if x >= 1e-4 else f"{sign}${x:.2e}"


def num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def payback(months: float | None) -> str:
    if months is None:
        return "never (the routed setup costs at least as much as the teacher alone)"
    if months == 0:
        return "immediately (no project cost)"
    return f"{months:.1f} months"


def clip(text: str, limit: int = MAX_INPUT_SHOWN) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_spans(text):
    """HTML for one of our own messages: escaped, with `command` spans set as <code>."""
    from markupsafe import Markup, escape

    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: leave it as text
        return escape(text)
    return Markup("".join(str(escape(p)) if i % 2 == 0 else f"<code>{escape(p)}</code>"
                          for i, p in enumerate(parts)))


def human_score(ev: dict, who: str):
    """Student or teacher quality on the human-labelled examples (older records: accuracy only)."""
    h = ev["vs_human"]
    return h.get(f"{who}_score", h.get(f"{who}_accuracy"))


def type_columns(ev: dict) -> list[tuple[str, str]]:
    """(header, vs_teacher key) of the aggregate metrics a task type shows beside the agreement."""
    kind = ev.get("task_type", "classification")
    if kind == "extraction":
        return [("field F1 (vs teacher)", "field_f1"), ("exact match", "exact_match"), ("schema-valid", "validity")]
    if kind == "generation":
        return [("ROUGE-L", "rouge_l"), ("BLEU", "bleu"), ("chrF", "chrf")]
    return [("macro-F1 (vs teacher)", "macro_f1"), ("micro-F1 (vs teacher)", "micro_f1")]


def _md_cell(text) -> str:
    """User text inside a Markdown table cell: one line, no raw HTML, pipes escaped."""
    text = clip(str(text))
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("`", "\\`")):
        text = text.replace(a, b)
    return text


# ---- gathering --------------------------------------------------------------------------------

def _missing_stages(data: dict, lock, students: list[dict]) -> list[str]:
    missing = []
    if not data["examples"]:
        missing.append("import: no data yet; run `stillroom import FILE`")
    elif not data["teacher_labelled"]:
        missing.append("label: no example has a teacher label; import the teacher's recorded answers")
    if data["teacher_labelled"] and not any(data["splits"].values()):
        missing.append("split: nothing is split into train/validation/calibration/eval; run `stillroom split`")
    if lock is None:
        missing.append("lock: the eval set is not locked; run `stillroom lock`")
    for s in students:
        if s["status"] == "not trained":
            missing.append(f"train: student '{s['name']}' is not trained; run `stillroom train {s['name']}`")
        elif s["status"] == "not evaluated":
            missing.append(f"eval: student '{s['name']}' is trained but not evaluated; "
                           f"run `stillroom eval {s['name']}`")
        elif s["status"].endswith("not exported"):
            missing.append(f"export: student '{s['name']}' deploys {s['deploy']}, which is not exported and "
                           f"re-evaluated; run `stillroom export {s['name']} --format {s['deploy']}`")
    return missing


def _student_row(project: Project, student, run: dict | None) -> dict:
    row = {"name": student.name, "kind": student.kind, "status": "not trained", "evaluation": None,
           "gate": None, "gate_error": None, "stale": False, "stale_reason": None}
    if run is None:
        return row
    evaluation = deployed_evaluation(project, student.name)  # what will be deployed is what is judged
    row["deploy"] = student.deploy
    if evaluation is None:
        row["status"] = "not evaluated" if student.deploy == "fp32" else f"{student.deploy} not exported"
        return row
    row.update(status="evaluated", evaluation=evaluation, stale=bool(evaluation.get("stale")),
               stale_reason=(evaluation.get("lock_status") or {}).get("message"))
    try:
        row["gate"] = decide(evaluation, project.config.gate).as_dict()
    except ValueError as exc:  # e.g. gate.reference 'human' without human labels
        row["gate_error"] = str(exc)
    return row


def _choose(project: Project, rows: list[dict]) -> tuple[dict | None, str]:
    configured = project.config.routing.student
    if configured:
        return next(r for r in rows if r["name"] == configured), "set as routing.student in stillroom.yaml"
    evaluated = [r for r in rows if r["evaluation"]]
    if not evaluated:
        return None, "no student has been evaluated"
    by_agreement = lambda r: r["evaluation"]["agreement"] or 0.0  # noqa: E731
    passing = [r for r in evaluated if r["gate"] and r["gate"]["passed"]]
    if passing:
        return max(passing, key=by_agreement), "best agreement with the teacher among students that pass the gate"
    return max(evaluated, key=by_agreement), "best agreement with the teacher; no student passes the gate"


def _verdict(chosen: dict | None, econ, missing: list[str]) -> dict:
    if chosen is None:
        stages = sorted({m.split(":")[0] for m in missing})
        return {"student": None, "passed": None, "coverage": None, "monthly_savings": None,
                "message": "No student has been evaluated yet; missing stages: " + (", ".join(stages) or "none")}
    name = chosen["name"]
    ev = chosen["evaluation"]
    if ev is None:
        return {"student": name, "passed": None, "coverage": None, "monthly_savings": None,
                "message": f"Student '{name}' (routing.student) is {chosen['status']}; nothing to deploy yet."}
    gate = chosen["gate"]
    passed = bool(gate and gate["passed"])
    coverage = ev["at_threshold"]["coverage"]
    savings = econ.monthly_savings if econ else None
    money_part = ""
    if econ:
        money_part = (f", saving {money(savings)}/month" if savings > 0
                      else f", costing {money(-savings)}/month more than the teacher alone")
    if passed:
        message = (f"Deploy '{name}' ({chosen['kind']}): PASS the gate; it answers {pct(coverage)} of "
                   f"requests at threshold {ev['at_threshold']['threshold']:.2f}{money_part}.")
    else:
        why = gate["message"].removeprefix("FAIL: ") if gate else chosen["gate_error"]
        message = (f"Do not deploy yet: '{name}' ({chosen['kind']}) FAILS the gate ({why}). "
                   f"If deployed: {pct(coverage)} coverage{money_part}.")
    return {"student": name, "passed": passed, "coverage": coverage, "monthly_savings": savings,
            "message": message}


def _slice_view(sl: dict) -> dict:
    return dict(sl, examples=[dict(e, input=clip(e["input"], 160)) for e in sl.get("examples", [])])


def _details(project: Project, chosen: dict | None) -> dict | None:
    """The chosen student's three-way table, gap intervals, calibration, slices and shadow traffic;
    None for an evaluation recorded before these existed (the report then says to re-run eval)."""
    ev = chosen["evaluation"] if chosen else None
    if ev is None:
        return None
    if "gap" not in ev:
        return {"outdated": True}
    gate = chosen["gate"] or {}
    reference = gate.get("reference") or "teacher"
    slices = (ev.get("slices") or {}).get(reference) or {"slices": [], "empty": [], "min_examples": 0}
    cfg = project.config.gate
    worst = sorted(slices["slices"], key=lambda s: (not s["gated"], -s["gap_points"], -s["n"]))
    shadow = latest_evaluation(project, chosen["name"], kind="shadow")
    kind = ev.get("task_type", "classification")
    row_keys = {"classification": [("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("micro-F1", "micro_f1")],
                "extraction": [(f"score ({ev.get('metric')})", "score"), ("field P", "field_precision"),
                               ("field R", "field_recall"), ("field F1", "field_f1"), ("exact match", "exact_match"),
                               ("schema-valid", "validity")],
                "generation": [(f"score ({ev.get('metric')})", "score"), ("ROUGE-L", "rouge_l"), ("BLEU", "bleu"),
                               ("chrF", "chrf"), ("valid", "validity")]}[kind]
    return {
        "outdated": False,
        "reference": reference,
        "row_keys": row_keys,
        "three_way": ev["three_way"],
        "gaps": [g for g in (ev["gap"].get("teacher"), ev["gap"].get("human")) if g],
        "calibration": ev.get("confidence_calibration"),
        "slices": [_slice_view(x) for x in worst[:WORST_SLICES_SHOWN]],
        "slices_all": slices["slices"],
        "empty_slices": slices["empty"],
        "slice_min_examples": cfg.slice_min_examples,
        "slice_limit": cfg.slice_gap_multiple * cfg.allowed_gap_points,
        "failing_slices": gate.get("failing_slices") or [],
        "shadow": None if shadow is None else {
            "n": shadow["vs_teacher"]["n"], "agreement": shadow["agreement"], "gap": shadow["gap"]["teacher"],
            "traffic": shadow["traffic"], "ece": shadow["confidence_calibration"]["ece"],
            "worst_slices": [_slice_view(x) for x in sorted(shadow["slices"]["teacher"]["slices"],
                                                            key=lambda s: (not s["gated"], -s["gap_points"]))[:5]],
        },
    }


def _judge_view(judge: dict | None) -> dict | None:
    if judge is None:
        return None
    keep = ("student", "run_id", "lock_id", "stale", "lock_status", "judge", "calls", "n_items", "n_scored",
            "outcomes", "win_rate", "strict_win_rate", "position_consistency", "position_a_share", "rubric",
            "human_agreement", "prompts", "judge_models", "evaluation_id")
    return {k: judge.get(k) for k in keep}


def gather(project: Project) -> dict:
    """Everything the report shows, as plain data (also the machine-readable summary's source)."""
    cfg = project.config
    with project.store.engine.connect() as conn:
        data = counts(conn)
        lock = active_lock(conn)
        runs = {s.name: latest_run(conn, s.name) for s in cfg.students}
    rows = [_student_row(project, s, runs[s.name]) for s in cfg.students]
    chosen, chosen_reason = _choose(project, rows)
    missing = _missing_stages(data, lock, rows)

    ev = chosen["evaluation"] if chosen else None
    econ, econ_note = None, None
    if ev is None:
        econ_note = "needs an evaluated student (its throughput and coverage)"
    else:
        ips = (ev.get("throughput") or {}).get("inputs_per_s")
        try:
            econ = economics(cfg.teacher, cfg.costs, cfg.volume, ips, ev["at_threshold"]["coverage"])
        except ValueError as exc:
            econ_note = f"cannot be computed: {exc}"

    errors = []
    n_errors = 0
    if ev:
        errors = [dict(e, input=clip(e["input"]), teacher=clip(e["teacher"]), student=clip(e["student"]))
                  for e in ev.get("errors", [])[:MAX_ERRORS_SHOWN]]
        n_errors = ev.get("n_disagreements")
        if n_errors is None:  # recorded before the count was kept: classification, from the confusion matrix
            confusion = ev["vs_teacher"]["confusion"]
            n_errors = ev["vs_teacher"]["n"] - sum(confusion[i][i] for i in range(len(confusion)))
    judge = latest_evaluation(project, chosen["name"], kind="judge") if chosen else None
    return {
        "task": cfg.task.name,
        "generated_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "teacher_model": cfg.teacher.model,
        "data": data,
        "lock": lock.as_dict() if lock else None,
        "students": rows,
        "chosen": chosen,
        "chosen_reason": chosen_reason,
        "evaluation": ev,
        "economics": econ,
        "economics_note": econ_note,
        "errors": errors,
        "n_errors": n_errors,
        "task_type": cfg.task.type,
        "metric": (ev.get("metric") if ev else None) or cfg.task.gate_metric,
        "columns": type_columns(ev or {"task_type": cfg.task.type}),
        "judge": _judge_view(judge),
        "missing": missing,
        "verdict": _verdict(chosen, econ, missing),
        "details": _details(project, chosen),
        "gate_config": {"preset": cfg.gate.preset, "allowed_gap_points": cfg.gate.allowed_gap_points,
                        "reference": cfg.gate.reference, "min_human_examples": cfg.gate.min_human_examples,
                        "mode": cfg.gate.mode, "slice_min_examples": cfg.gate.slice_min_examples,
                        "slice_gap_multiple": cfg.gate.slice_gap_multiple,
                        "bootstrap_resamples": cfg.gate.bootstrap_resamples},
        "target_agreement": cfg.routing.target_agreement,
    }


def _type_metrics(e: dict) -> dict:
    """The task type's aggregate metrics vs the teacher, without the per-class/confusion bulk."""
    vt = e["vs_teacher"]
    kind = e.get("task_type", "classification")
    if kind == "extraction":
        keys = ("field_precision", "field_recall", "field_f1", "per_field", "exact_match", "validity", "n_invalid")
    elif kind == "generation":
        keys = ("rouge_l", "bleu", "chrf", "length", "validity", "n_invalid")
    else:
        keys = ("accuracy", "macro_f1", "micro_f1")
    return {"task_type": kind, "metric": e.get("metric") or "accuracy", **{k: vt.get(k) for k in keys}}


def _summary(ctx: dict) -> dict:
    ev = ctx["evaluation"]
    d = ctx["details"] if ctx["details"] and not ctx["details"]["outdated"] else None
    students = []
    for r in ctx["students"]:
        e = r["evaluation"]
        students.append({
            "name": r["name"], "kind": r["kind"], "status": r["status"], "stale": r["stale"],
            "stale_reason": r["stale_reason"], "lock_id": e["lock_id"] if e else None,
            "agreement": e["agreement"] if e else None,
            "metric": (e.get("metric") or "accuracy") if e else None,
            "macro_f1": e["vs_teacher"].get("macro_f1") if e else None,
            "micro_f1": e["vs_teacher"].get("micro_f1") if e else None,
            "metrics": _type_metrics(e) if e else None,
            "three_way": e.get("three_way") if e else None,
            "gap": e.get("gap") if e else None,
            "ece": (e.get("confidence_calibration") or {}).get("ece") if e else None,
            "vs_human": ({"n": e["vs_human"]["n"], "student_accuracy": e["vs_human"].get("student_accuracy"),
                          "teacher_accuracy": e["vs_human"].get("teacher_accuracy"),
                          "student_score": human_score(e, "student"), "teacher_score": human_score(e, "teacher")}
                         if e else None),
            "gate": r["gate"], "gate_error": r["gate_error"],
        })
    return {
        "task": ctx["task"],
        "generated_at": ctx["generated_at"],
        "verdict": ctx["verdict"],
        "chosen_student": ctx["chosen"]["name"] if ctx["chosen"] else None,
        "chosen_reason": ctx["chosen_reason"],
        "data": ctx["data"],
        "lock": ctx["lock"],
        "students": students,
        "routing": ({"calibration": ev["calibration"], "eval_at_threshold": ev["at_threshold"]} if ev else None),
        "economics": ctx["economics"].as_dict() if ctx["economics"] else None,
        "gate_config": ctx["gate_config"],
        "slices": ({k: d[k] for k in ("reference", "slices_all", "empty_slices", "failing_slices")}
                   if d else None),
        "calibration": d["calibration"] if d else None,
        "shadow": d["shadow"] if d else None,
        "judge": ctx["judge"],
        "task_type": ctx["task_type"],
        "missing_stages": ctx["missing"],
    }


# ---- plots ------------------------------------------------------------------------------------

def _plots(ctx: dict) -> tuple[dict[str, bytes], str | None]:
    """PNG bytes per plot name; a note instead when matplotlib is not installed."""
    ev, econ = ctx["evaluation"], ctx["economics"]
    if ev is None and econ is None:
        return {}, None
    try:
        from stillroom.report import plots
    except ImportError:  # pragma: no cover - matplotlib is the optional `report` extra
        return {}, "plots need matplotlib: pip install 'stillroom[report]'"
    try:
        out = {}
        if ev:
            kind = ev.get("task_type", "classification")
            vt = ev["vs_teacher"]
            if kind == "classification":
                out["confusion"] = plots.confusion_png(vt["confusion"], vt["labels"],
                                                       f"'{ev['student']}' vs teacher (eval split)")
            elif kind == "extraction" and vt.get("per_field"):
                out["fields"] = plots.field_scores_png(vt["per_field"])
            elif kind == "generation" and vt.get("length"):
                out["lengths"] = plots.lengths_png(vt["length"])
            out["coverage"] = plots.coverage_png(ev["coverage_curve"], ev["calibration"]["threshold"],
                                                 ev["calibration"]["target"])
            d = ctx["details"]
            if d and not d["outdated"]:
                out["reliability"] = plots.reliability_png(d["calibration"]["reliability"], d["calibration"]["ece"])
                if d["slices"]:
                    out["slices"] = plots.slice_gaps_png(
                        d["slices"], ctx["gate_config"]["allowed_gap_points"], d["slice_limit"],
                        d["slice_min_examples"], f"Gap to the teacher by slice (worst {len(d['slices'])}, vs {d['reference']})")
        if econ:
            out["cost"] = plots.cost_png(econ.teacher_only_monthly, econ.student_hosting_monthly,
                                         econ.teacher_fallback_monthly)
    except ImportError:
        return {}, "plots need matplotlib: pip install 'stillroom[report]'"
    return out, None


# ---- Markdown ---------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _gate_text(row: dict) -> str:
    gate = row["gate"]
    if gate is None:
        return f"ERROR: {row['gate_error']}" if row["gate_error"] else "—"
    word = "PASS" if gate["passed"] else "FAIL"
    stale = ", stale eval" if gate["stale"] else ""
    ci = (f", {gate['confidence']:.0%} CI {gate['ci_low']:.2f} to {gate['ci_high']:.2f}"
          if gate.get("ci_high") is not None else "")
    slices = f", {len(gate['failing_slices'])} slice(s) over the limit" if gate.get("failing_slices") else ""
    return (f"{word} (gap {gate['gap_points']:.2f} / allowed {gate['allowed_points']:g} pts, "
            f"vs {gate['reference']}; {gate.get('mode', 'point')} mode{ci}{slices}{stale})")


def _markdown(ctx: dict, plot_files: dict[str, str], plot_note: str | None) -> str:
    ev, econ, data, lock = ctx["evaluation"], ctx["economics"], ctx["data"], ctx["lock"]
    L = [f"# stillroom report: {_md_cell(ctx['task'])}", "", f"Generated {ctx['generated_at']}.", "",
         f"**Verdict:** {ctx['verdict']['message']}", ""]
    if ctx["missing"]:
        L += ["**Missing stages:**", ""] + [f"- {m}" for m in ctx["missing"]] + [""]

    L += ["## Data", ""]
    L += _table(["", "count"], [
        ["examples", data["examples"]], ["teacher-labelled", data["teacher_labelled"]],
        ["human-labelled", data["human_labelled"]], ["unlabelled", data["unlabelled"]],
        *[[f"split: {s}", n] for s, n in data["splits"].items()],
    ])
    if lock:
        L += [f"Eval lock {lock['id']}: {lock['n_examples']} examples, manifest SHA-256 `{lock['manifest_sha256']}` "
              f"({_md_cell(lock['reason'])}, {lock['created_at']}).", ""]
    else:
        L += ["The eval set is not locked.", ""]

    L += ["## Students on the locked eval set", ""]
    rows = []
    columns = ctx["columns"]
    for r in ctx["students"]:
        e = r["evaluation"]
        if e is None:
            rows.append([r["name"], r["kind"], r["status"], *[""] * (len(columns) + 4)])
            continue
        rows.append([r["name"] + (" (stale)" if r["stale"] else ""), r["kind"], pct(e["agreement"]),
                     *[pct(e["vs_teacher"].get(key)) for _, key in columns],
                     pct(human_score(e, "student")), pct(human_score(e, "teacher")), e["vs_human"]["n"],
                     _md_cell(_gate_text(r))])
    L += _table(["student", "kind", f"agreement with teacher ({ctx['metric']})", *[h for h, _ in columns],
                 "student vs human", "teacher vs human", "n human", "gate"], rows)
    for r in ctx["students"]:
        if r["stale"]:
            L += [f"**Stale:** the evaluation of '{_md_cell(r['name'])}' {_md_cell(r['stale_reason'] or 'ran against an older eval lock')}.", ""]
    g = ctx["gate_config"]
    L += [f"Gate: preset {g['preset']}, allowed gap {g['allowed_gap_points']:g} points, reference {g['reference']} "
          f"(human labels are used from {g['min_human_examples']} on). A stale evaluation ran against an older "
          "eval lock and fails the gate until re-run.", ""]

    if ctx["chosen"]:
        L += [f"Chosen student: **{_md_cell(ctx['chosen']['name'])}** ({ctx['chosen_reason']}).", ""]
    if ctx["details"]:
        L += _md_details(ctx, plot_files)
    if ev and ev.get("task_type", "classification") != "classification":
        L += _md_type_results(ev, plot_files)
    if ev and ev.get("task_type", "classification") == "classification":
        vt = ev["vs_teacher"]
        L += [f"## Per-class results: {_md_cell(ev['student'])} vs teacher", ""]
        L += _table(["label", "precision", "recall", "F1", "support"], [
            [_md_cell(label), pct(m["precision"]), pct(m["recall"]), pct(m["f1"]), m["support"]]
            for label, m in vt["per_class"].items()])
        L += ["Confusion matrix (rows: teacher, columns: student):", ""]
        L += _table(["teacher \\ student", *[_md_cell(x) for x in vt["labels"]]],
                    [[_md_cell(label), *row] for label, row in zip(vt["labels"], vt["confusion"])])
        if "confusion" in plot_files:
            L += [f"![confusion matrix]({plot_files['confusion']})", ""]
    if ctx["judge"]:
        L += _md_judge(ctx["judge"])
    if ev:
        cal, at = ev["calibration"], ev["at_threshold"]
        L += ["## Routing", ""]
        serves_nothing = " (no threshold meets the target: the student serves nothing)" if cal["threshold"] > 1 else ""
        L += _table(["", "value"], [
            ["confidence threshold", f"{cal['threshold']:.4f}{serves_nothing}"],
            ["target agreement", pct(cal["target"])],
            ["coverage on calibration", f"{pct(cal['coverage'])} of {cal['n']}"],
            ["agreement on calibration (covered)", pct(cal["agreement"])],
            ["coverage on eval", f"{pct(at['coverage'])} of {at['n']}"],
            ["student agreement on eval (covered)", pct(at["student_agreement_on_covered"])],
            ["routed system agreement on eval", pct(at["system_agreement"])],
        ])
        if cal["target"] != ctx["target_agreement"]:
            L += [f"Note: stillroom.yaml now targets {pct(ctx['target_agreement'])}; re-run `stillroom eval` "
                  "or `stillroom calibrate` to re-pick the threshold.", ""]
        if "coverage" in plot_files:
            L += [f"![coverage vs agreement]({plot_files['coverage']})", ""]

    L += ["## Money", ""]
    if econ:
        L += _table(["", "value"], [
            ["teacher $ per million tokens", money(econ.teacher_per_million_tokens)],
            ["student $ per million tokens", money(econ.student_per_million_tokens)],
            ["teacher / student cost ratio", f"{num(econ.cost_ratio, 1)}x" if econ.cost_ratio else "—"],
            ["monthly cost, teacher only", money(econ.teacher_only_monthly)],
            ["monthly cost, routed", f"{money(econ.routed_monthly)} (student {money(econ.student_hosting_monthly)} "
                                     f"+ teacher fallback {money(econ.teacher_fallback_monthly)})"],
            ["monthly savings", money(econ.monthly_savings)],
            ["annual savings", money(econ.annual_savings)],
            ["payback", f"{payback(econ.payback_months)} on a project cost of {money(econ.project_cost)}"],
        ])
        L += ["Assumptions: " + _assumptions(econ), ""]
        if "cost" in plot_files:
            L += [f"![monthly cost]({plot_files['cost']})", ""]
    else:
        L += [f"Economics {ctx['economics_note']}.", ""]

    if ev:
        graded = ev.get("task_type", "classification") != "classification"
        title = "Worst eval examples" if graded else "Sample of eval errors"
        L += [f"## {title} ({len(ctx['errors'])} of {ctx['n_errors']} disagreements)"
              if graded else f"## {title} ({len(ctx['errors'])} of {ctx['n_errors']})", ""]
        if ctx["errors"]:
            L += _table(["input", "teacher", "student", *(["score"] if graded else []), "confidence", "human"], [
                [_md_cell(e["input"]), _md_cell(e["teacher"]), _md_cell(e["student"]),
                 *([num(e.get("score"), 3)] if graded else []), f"{e['confidence']:.3f}",
                 _md_cell(e["human"]) if e.get("human") else ""] for e in ctx["errors"]])
        else:
            L += ["The student agrees with the teacher on every eval example.", ""]
    if plot_note:
        L += [f"_{plot_note}_", ""]
    return "\n".join(L)


def _md_type_results(ev: dict, plot_files: dict[str, str]) -> list[str]:
    vt = ev["vs_teacher"]
    if ev["task_type"] == "extraction":
        L = [f"## Per-field results: {_md_cell(ev['student'])} vs teacher", "",
             f"Field-level (micro over (field, value) pairs): precision {pct(vt['field_precision'])}, recall "
             f"{pct(vt['field_recall'])}, F1 {pct(vt['field_f1'])}; exact match per record {pct(vt['exact_match'])}; "
             f"schema-valid answers {pct(vt['validity'])} ({vt['n_invalid']} of {vt['n']} fail the schema and score 0).", ""]
        L += _table(["field", "precision", "recall", "F1", "support"], [
            [_md_cell(name), pct(m["precision"]), pct(m["recall"]), pct(m["f1"]), m["support"]]
            for name, m in vt["per_field"].items()])
        if "fields" in plot_files:
            L += [f"![per-field scores]({plot_files['fields']})", ""]
        return L
    ln = vt["length"]
    L = [f"## Text metrics: {_md_cell(ev['student'])} vs teacher", ""]
    L += _table(["metric", "value"], [
        ["ROUGE-L F1 (mean)", num(vt["rouge_l"], 3)], ["BLEU (corpus, 0-1)", num(vt["bleu"], 3)],
        ["chrF (corpus, 0-1)", num(vt["chrf"], 3)],
        ["valid answers", f"{pct(vt['validity'])} ({vt['n_invalid']} rejected: empty or too long)"]])
    L += _table(["length (words)", "mean", "p50", "p95"], [
        [who, num(ln[key]["mean"], 1), num(ln[key]["p50"], 1), num(ln[key]["p95"], 1)]
        for who, key in (("student", "prediction"), ("teacher", "reference"))])
    L += [f"Student/teacher mean length ratio: {num(ln['ratio'], 2)}.", ""]
    if "lengths" in plot_files:
        L += [f"![answer lengths]({plot_files['lengths']})", ""]
    return L


def _win(ci: dict | None) -> str:
    if not ci or ci.get("estimate") is None:
        return "—"
    return f"{pct(ci['estimate'])} ({ci['confidence']:.0%} CI {pct(ci['low'])} to {pct(ci['high'])})"


def _md_judge(j: dict) -> list[str]:
    o = j["outcomes"]
    ha = j["human_agreement"]
    L = [f"## LLM judge: {_md_cell(j['student'])} vs teacher" + (" (stale)" if j.get("stale") else ""), "",
         f"Judge {_md_cell(j['judge']['model'])} on {j['n_items']} locked eval examples, each judged in both "
         f"orders: win rate (student at or above the teacher) **{_win(j['win_rate'])}**; strict wins "
         f"{pct(j['strict_win_rate'])}; position consistency {pct(j['position_consistency'])}.", ""]
    L += _table(["student wins", "ties", "teacher wins", "missing (unreadable verdicts)"],
                [[o["student"], o["tie"], o["teacher"], o["missing"]]])
    rb = j["rubric"]
    L += _table(["rubric (1-5)", "mean", "95% CI", "missing"], [
        [who, num(rb[who]["estimate"]), f"{num(rb[who]['low'])} to {num(rb[who]['high'])}", rb[who]["missing"]]
        for who in ("student", "teacher") if who in rb])
    L += [("Judge-human agreement: " + f"{pct(ha['agreement'])} on {ha['n']} examples, Cohen's kappa "
           f"{num(ha['cohen_kappa'])}.") if ha["n"] else f"Judge-human agreement: {ha['message']}.",
          "Prompts: " + ", ".join(f"{p['name']} v{p['version']} (`{p['sha256'][:12]}`)" for p in j["prompts"])
          + f"; calls sent {j['calls']['sent']}, answered from the record {j['calls']['cached']}.", ""]
    return L


def _ci(g: dict | None) -> str:
    if not g or g.get("estimate") is None:
        return "—"
    return f"{g['estimate']:.2f} pts ({g['confidence']:.0%} CI {g['low']:.2f} to {g['high']:.2f})"


def _md_details(ctx: dict, plot_files: dict[str, str]) -> list[str]:
    d, ev = ctx["details"], ctx["evaluation"]
    if d["outdated"]:
        return [f"_The evaluation of '{_md_cell(ev['student'])}' predates confidence intervals and slices; "
                f"re-run `stillroom eval {ev['student']}` to see them._", ""]
    L = [f"## Three-way comparison: {_md_cell(ev['student'])}", ""]
    tw = d["three_way"]
    row_keys = d["row_keys"]
    L += _table(["comparison", "n", *[h for h, _ in row_keys]], [
        [name, tw[key]["n"], *[pct(tw[key].get(k)) for _, k in row_keys]]
        for name, key in (("student vs teacher (agreement)", "student_vs_teacher"),
                          ("student vs human", "student_vs_human"), ("teacher vs human", "teacher_vs_human"))])
    if tw.get("message"):
        L += [f"Note: {tw['message']}.", ""]
    L += ["Gap (teacher minus student quality, paired bootstrap over eval examples, "
          f"{ctx['gate_config']['bootstrap_resamples']} resamples):", ""]
    L += _table(["reference", "n", "teacher", "student", "gap"],
                [[g["reference"], g["n"], pct(g["teacher"]), pct(g["student"]), _ci(g)] for g in d["gaps"]])
    cal = d["calibration"]
    L += ["## Calibration", "",
          f"Expected calibration error (10 equal-width confidence bins, agreement with the teacher): "
          f"**{num(cal['ece'], 3)}** on {cal['n']} eval examples.", ""]
    if "reliability" in plot_files:
        L += [f"![reliability diagram]({plot_files['reliability']})", ""]
    L += [f"## Slices (vs {d['reference']}; gated from {d['slice_min_examples']} examples, limit "
          f"{d['slice_limit']:g} points)", ""]
    for f in d["failing_slices"]:
        L += [f"- **FAILS the slice rule:** {f['kind']} = {_md_cell(f['name'])} ({f['n']} examples): "
              f"{f['gap_points']:.2f} points behind", ""]
    if d["slices"]:
        L += _table(["slice", "n", "teacher", "student", "gap (pts)", "gated", "examples the student loses"], [
            [f"{s['kind']}: {_md_cell(s['name'])}", s["n"], pct(s["teacher_score"]), pct(s["student_score"]),
             f"{s['gap_points']:.2f}", "yes" if s["gated"] else "no (too few)",
             "; ".join(f"{_md_cell(e['input'])} → {_md_cell(e.get('student'))} (ref {_md_cell(e.get('human') if d['reference'] == 'human' else e.get('teacher'))})"
                       for e in s["examples"]) or "—"]
            for s in d["slices"]])
    for e in d["empty_slices"]:
        L += [f"- {e['kind']} {_md_cell(e['name'])}: {_md_cell(e['message'])}"]
    if d["empty_slices"]:
        L += [""]
    if "slices" in plot_files:
        L += [f"![gap by slice]({plot_files['slices']})", ""]
    sh = d["shadow"]
    if sh:
        t = sh["traffic"]
        L += ["## Shadow evaluation on logged traffic", "",
              f"{sh['n']} logged requests with a teacher answer: agreement {pct(sh['agreement'])}, gap {_ci(sh['gap'])}, "
              f"ECE {num(sh['ece'], 3)}. Not scored: {t['gateway_student_served']} served by the student (no "
              f"teacher answer), {t['unparseable_teacher_answers']} unparseable teacher answers; "
              f"{t['seen_in_training']} of the scored inputs were also training inputs.", ""]
    return L


def _assumptions(econ) -> str:
    return (f"{econ.requests_per_month:,} requests/month of {econ.input_tokens_per_request:,} input + "
            f"{econ.output_tokens_per_request:,} output tokens; teacher {money(econ.teacher_price_in)} / "
            f"{money(econ.teacher_price_out)} per million input / output tokens; student hosting "
            f"{money(econ.student_hosting_per_hour)}/hour, at least one replica always on (730 h/month); "
            f"measured student throughput {num(econ.student_inputs_per_s, 1)} inputs/s; the student scores every "
            f"request and answers {pct(econ.coverage)} of them (eval coverage at the threshold); the rest go to "
            "the teacher at full price.")


# ---- HTML -------------------------------------------------------------------------------------

def _html(ctx: dict, plots: dict[str, bytes], plot_note: str | None) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=pct, money=money, num=num, payback=payback, clip=clip, code=code_spans)
    images = {name: base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    return env.get_template("report.html.j2").render(
        **ctx, images=images, plot_note=plot_note, human_score=human_score,
        assumptions=_assumptions(ctx["economics"]) if ctx["economics"] else "",
    )


def write_report(project: Project, out_dir: Path | None = None) -> dict:
    """Write report.md (+ PNG plots beside it), a self-contained report.html and report.json;
    returns {"markdown": path, "html": path, "json": path, "summary": {...}}."""
    out_dir = Path(out_dir) if out_dir is not None else project.workspace / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = gather(project)
    plots, plot_note = _plots(ctx)
    plot_files = {}
    for name in PLOTS:
        path = out_dir / f"{name}.png"
        if name in plots:
            path.write_bytes(plots[name])
            plot_files[name] = path.name
        elif path.exists():
            path.unlink()  # a plot from an earlier report would no longer match the data
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    summary = _summary(ctx)
    md_path.write_text(_markdown(ctx, plot_files, plot_note), encoding="utf-8")
    html_path.write_text(_html(ctx, plots, plot_note), encoding="utf-8")
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(summary, indent=1, default=str, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"markdown": md_path, "html": html_path, "json": json_path, "summary": summary}

"""Evaluation on Banking77: the encoder student's gap to the teacher with a paired bootstrap 95%
interval, both gate modes, the slice report, calibration and the report itself.

Banking77 has no second opinion on its labels, so the dataset's labels play the teacher (train rows
as its recorded answers, the 3,080 test rows as the locked eval set) and the human rows of the
three-way table are unmeasured: the benchmark reports what can be measured, and says so.
Measured: agreement and F1, the gap and its interval, ECE, the worst slices (77 classes, length
buckets), which slices the slice rule flags, the verdict in point and strict mode, and the time the
evaluation machinery itself takes (scorecard with 2,000 resamples; the HTML/Markdown/JSON report).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import banking77_project, dataset_dir, write_result


def main(quick: bool = False) -> None:
    data = dataset_dir("banking77")
    if data is None:
        return
    from sqlalchemy import select

    from stillroom.evaluate.evaluator import evaluate_student, latest_evaluation
    from stillroom.evaluate.gate import decide
    from stillroom.evaluate.scorecard import Scored, scorecard
    from stillroom.report.render import write_report
    from stillroom.store import tables as T
    from stillroom.store.records import split_rows
    from stillroom.train.runner import train_student

    work = Path(tempfile.mkdtemp(prefix="bench-eval-banking77-"))
    started = time.perf_counter()
    try:
        project, seconds, info = banking77_project(work, data, quick)
        t = time.perf_counter()
        train_student(project, "encoder")
        seconds["train"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        evaluation = evaluate_student(project, "encoder")
        seconds["eval_and_calibrate"] = round(time.perf_counter() - t, 2)

        # The evaluation machinery alone, on the answers just recorded: metrics, 2,000 bootstrap
        # resamples (no human labels here), slices, calibration.
        with project.store.engine.connect() as conn:
            eval_rows = split_rows(conn, "eval")
            recorded = {ex: (label, conf) for ex, label, conf in conn.execute(
                select(T.predictions.c.example_id, T.predictions.c.label, T.predictions.c.confidence)
                .where(T.predictions.c.run_id == evaluation["run_id"]).order_by(T.predictions.c.id))}
        rows = [Scored(ex.id, ex.input, label, *recorded[ex.id], None, ex.source, ex.tags) for ex, label in eval_rows]
        t = time.perf_counter()
        card = scorecard(project.task, rows, project.config.gate)
        seconds["scorecard_only"] = round(time.perf_counter() - t, 3)
        assert card["agreement"] == evaluation["agreement"]

        stored = latest_evaluation(project, "encoder")
        point = decide(stored, project.config.gate, "point")
        strict = decide(stored, project.config.gate, "strict")
        t = time.perf_counter()
        report = write_report(project)
        seconds["report"] = round(time.perf_counter() - t, 2)
        html_plots = report["html"].read_text(encoding="utf-8").count("data:image/png;base64,")
        project.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gap = evaluation["gap"]["teacher"]
    slices = evaluation["slices"]["teacher"]
    gated = [s for s in slices["slices"] if s["gated"]]
    worst = sorted(gated, key=lambda s: -s["gap_points"])[:10]
    lengths = [s for s in slices["slices"] if s["kind"] == "length"]
    metrics = {
        "eval_examples": evaluation["vs_teacher"]["n"],
        "accuracy_vs_teacher": round(evaluation["agreement"], 4),
        "macro_f1_vs_teacher": round(evaluation["vs_teacher"]["macro_f1"], 4),
        "micro_f1_vs_teacher": round(evaluation["vs_teacher"]["micro_f1"], 4),
        "gap_points": round(gap["estimate"], 2),
        "gap_ci95": [round(gap["low"], 2), round(gap["high"], 2)],
        "bootstrap_resamples": gap["n_resamples"],
        "ece": round(evaluation["confidence_calibration"]["ece"], 4),
        "three_way_human_rows": evaluation["three_way"]["message"],
        "gate_point": {"passed": point.passed, "compared_points": point.compared_points,
                       "failing_slices": len(point.failing_slices)},
        "gate_strict": {"passed": strict.passed, "compared_points": strict.compared_points},
        "slice_rule": point.slice_rule,
        "slices_gated": len(gated),
        "slices_over_limit": len(point.failing_slices),
        "worst_slices": [{"slice": f"{s['kind']}: {s['name']}", "n": s["n"], "gap_points": s["gap_points"],
                          "example": s["examples"][0]["input"] if s["examples"] else None,
                          "student_said": s["examples"][0]["student"] if s["examples"] else None}
                         for s in worst],
        "length_slices": [{"bucket": s["name"], "n": s["n"], "gap_points": s["gap_points"]} for s in
                          sorted(lengths, key=lambda s: int(s["name"].split("-")[0].split("+")[0]))],
        "empty_slices": [e["message"] for e in slices["empty"]],
        "report_plots_in_html": html_plots,
        "stage_seconds": seconds,
    }
    write_result(
        "eval_banking77", "banking77", quick, metrics,
        goals={"gap_ci95": "reported for the encoder student (paired bootstrap, 2,000 resamples)",
               "stage_seconds.scorecard_only": "well under the time to predict (numpy bootstrap)"},
        config={"student": "encoder (all-MiniLM-L6-v2 frozen + logistic regression)", **info,
                "gate": project.config.gate.model_dump()},
        seconds=time.perf_counter() - started,
        summary=(f"encoder gap to teacher {metrics['gap_points']:.2f} pts (95% CI {metrics['gap_ci95'][0]:.2f} to "
                 f"{metrics['gap_ci95'][1]:.2f}) on {metrics['eval_examples']}; ECE {metrics['ece']:.3f}; "
                 f"{metrics['slices_over_limit']} of {metrics['slices_gated']} gated slices over "
                 f"{point.slice_rule['threshold_points']:g} pts; worst {worst[0]['kind']}: {worst[0]['name']} "
                 f"{worst[0]['gap_points']:.1f} pts; scorecard {seconds['scorecard_only']} s"),
    )
    print(json.dumps(metrics, indent=1))

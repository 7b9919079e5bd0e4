"""Banking77 through the whole pipeline with the encoder student.

The 10,003 train rows are imported as the teacher's recorded answers, the 3,080 test rows are
pinned to the eval split and locked first (so training can never see them). Train rows are split
into train / validation / calibration; training inputs that copy a test input (exact or case/space
folded) are excluded, and counted. Measured: agreement with the teacher on the locked eval, the
coverage the router gets at 99% target agreement on the calibration split, the agreement actually
reached on eval at that threshold, and wall time per stage.
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
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.evaluate.gate import decide
    from stillroom.train.runner import train_student

    target = 0.99
    work = Path(tempfile.mkdtemp(prefix="bench-banking77-"))
    started = time.perf_counter()
    try:
        project, seconds, info = banking77_project(work, data, quick, target)
        t = time.perf_counter()
        run = train_student(project, "encoder")
        seconds["train"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        evaluation = evaluate_student(project, "encoder")
        seconds["eval_and_calibrate"] = round(time.perf_counter() - t, 2)
        verdict = decide(evaluation, project.config.gate)
        project.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    excluded = info["leaks_excluded"]

    metrics = {
        "accuracy_vs_teacher": round(evaluation["agreement"], 4),
        "macro_f1_vs_teacher": round(evaluation["vs_teacher"]["macro_f1"], 4),
        "target_agreement": target,
        "threshold": round(evaluation["calibration"]["threshold"], 4),
        "coverage_at_target": round(evaluation["calibration"]["coverage"], 4),
        "coverage_on_eval": round(evaluation["at_threshold"]["coverage"], 4),
        "agreement_at_threshold": evaluation["at_threshold"]["student_agreement_on_covered"],
        "system_agreement_at_threshold": evaluation["at_threshold"]["system_agreement"],
        "val_agreement": run["metrics"]["val_agreement"],
        "gate_gap_points": verdict.gap_points,
        "eval_examples": evaluation["vs_teacher"]["n"],
        "train_examples": run["metrics"]["train_examples"],
        "calibration_examples": evaluation["calibration"]["n"],
        "train_inputs_excluded_as_eval_copies": excluded,
        "eval_inputs_per_s": round(evaluation["throughput"]["inputs_per_s"], 1),
        "stage_seconds": seconds,
        "import_problems": info["import_problems"],
    }
    if metrics["agreement_at_threshold"] is not None:
        metrics["agreement_at_threshold"] = round(metrics["agreement_at_threshold"], 4)
    write_result(
        "banking77", "banking77", quick, metrics,
        goals={"accuracy_vs_teacher": ">= 0.93 (frozen MiniLM + logistic regression, all rows)",
               "agreement_at_threshold": f">= {target} (on the locked eval, at the calibrated threshold)"},
        config={"student": "encoder (all-MiniLM-L6-v2 frozen + logistic regression, C by validation)",
                "split": info["split"], "target_agreement": target, "leaks_excluded": excluded},
        seconds=time.perf_counter() - started,
        summary=(f"encoder accuracy vs teacher {metrics['accuracy_vs_teacher']:.2%}; coverage at {target:.0%} "
                 f"target {metrics['coverage_at_target']:.1%} (calibration), {metrics['coverage_on_eval']:.1%} on eval "
                 f"with agreement {metrics['agreement_at_threshold'] or 0:.2%}; "
                 f"{excluded} train inputs excluded as eval copies"),
    )
    print(json.dumps(metrics, indent=1))

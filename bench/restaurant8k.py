"""Restaurant8k through the pipeline with an extraction student (LoRA on SmolLM2-135M).

Each utterance's labelled slot spans become the teacher's recorded JSON record (people, time,
date, first_name, last_name; a slot the text does not state is left out). When the dialogue had
asked for particular slots, that context is part of the input ("[asked for: people] 5"), as a
production system would send it. The test file is pinned to the eval split and locked first.
Measured on the locked eval: slot-level precision/recall/F1 and exact match against the labels,
schema-validity of the student's output (constrained decoding: expected 100%), latency, and the
coverage the router gets at the target agreement.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import (HOSTING_PER_HOUR, LATENCY_SAMPLES, dataset_dir, deployed_forms, lora_size_bytes, recorded_outputs, serving,
                          write_result)

SLOTS = ("people", "time", "date", "first_name", "last_name")
SCHEMA = {"type": "object", "properties": {s: {"type": "string"} for s in SLOTS}, "additionalProperties": False}


def records(path: Path, limit: int | None) -> list[dict]:
    """Restaurant8k items as {input, output} with the output a canonical JSON record."""
    from stillroom.tasks.extraction import canonical_json

    out, seen = [], set()
    for item in json.loads(path.read_text(encoding="utf-8")):
        text = item["userInput"]["text"]
        asked = (item.get("context") or {}).get("requestedSlots") or []
        value = {}
        for label in item.get("labels") or []:
            span = label["valueSpan"]
            value[label["slot"]] = text[span.get("startIndex", 0) : span["endIndex"]]
        source = f"[asked for: {', '.join(asked)}] {text}" if asked else text
        if source in seen:  # the store keeps one example per distinct input
            continue
        seen.add(source)
        out.append({"input": source, "output": canonical_json(value)})
    return out[:limit] if limit else out


def main(quick: bool = False) -> None:
    data = dataset_dir("restaurant8k")
    if data is None:
        return
    import yaml

    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import find_leaks, lock_eval
    from stillroom.curate.split import exclude_examples, split_project
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.project import Project, init_project
    from stillroom.train.runner import train_student

    n_train, n_test = (400, 300) if quick else (2000, 1200)
    target = 0.95
    work = Path(tempfile.mkdtemp(prefix="bench-restaurant8k-"))
    started, seconds = time.perf_counter(), {}
    try:
        init_project(work)
        config = {
            "task": {"name": "restaurant8k", "type": "extraction", "schema": SCHEMA, "max_output_tokens": 64,
                     "student_input_format": "Extract the booking slots as JSON.\n{input}"},
            "students": [{"name": "lora", "kind": "lora", "rank": 16, "learning_rate": 3e-4, "epochs": 2,
                          "batch_size": 8}],
            # eval is locked before the train rows arrive, so they fill train/validation/calibration only
            "split": {"train": 0.8, "validation": 0.05, "calibration": 0.1, "eval": 0.05, "seed": 0},
            "routing": {"target_agreement": target},
        }
        (work / "stillroom.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        project = Project.open(work)
        for name, rows in (("test.jsonl", records(data / "test.json", n_test)),
                           ("train.jsonl", records(data / "train.json", n_train))):
            (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        t = time.perf_counter()
        import_file(project, work / "test.jsonl", split="eval")
        lock_eval(project, reason="Restaurant8k test set")
        import_file(project, work / "train.jsonl")
        split = split_project(project)
        excluded = exclude_examples(project, [l["example_id"] for l in find_leaks(project)])
        seconds["prepare"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        run = train_student(project, "lora")
        seconds["train"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        evaluation = evaluate_student(project, "lora", latency_samples=LATENCY_SAMPLES)
        seconds["eval_and_calibrate"] = round(time.perf_counter() - t, 2)
        outputs = recorded_outputs(project, run["id"])
        inputs = list(outputs)
        fp32 = serving(evaluation, lora_size_bytes(run), inputs, [outputs[i] for i in inputs])
        t = time.perf_counter()
        deployed = deployed_forms(project, "lora", inputs, [outputs[i] for i in inputs],
                                  quality=("field_f1", "exact_match", "validity"))
        seconds["export_and_reevaluate"] = round(time.perf_counter() - t, 2)
        project.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    vs = evaluation["vs_teacher"]
    metrics = {
        "slot_f1": vs.get("field_f1"), "slot_precision": vs.get("field_precision"),
        "slot_recall": vs.get("field_recall"), "exact_match": vs.get("exact_match"),
        "schema_valid_rate": vs.get("validity"), "invalid_answers": vs.get("n_invalid"), "per_slot": vs.get("per_field"),
        "agreement": evaluation["agreement"],
        "coverage_at_target": evaluation["calibration"]["coverage"],
        "coverage_on_eval": evaluation["at_threshold"]["coverage"],
        "agreement_at_threshold": evaluation["at_threshold"]["student_agreement_on_covered"],
        "eval_inputs_per_s": evaluation["throughput"]["inputs_per_s"],
        "ms_per_input": 1000.0 / evaluation["throughput"]["inputs_per_s"],
        "serving": fp32, "deployed_forms": deployed,
        "train_tokens_per_s": run["metrics"].get("train_tokens_per_s"),
        "train_seconds": run["metrics"].get("train_seconds"),
        "val_score": run["metrics"].get("val_agreement"),
        "train_examples": run["metrics"].get("train_examples"), "eval_examples": vs.get("n"),
        "train_inputs_excluded_as_eval_copies": excluded, "stage_seconds": seconds,
    }
    write_result(
        "restaurant8k", "restaurant8k", quick, metrics,
        goals={"schema_valid_rate": "1.0 (schema-constrained decoding)",
               "slot_f1": "reported (the issue sets no number; Span-ConveRT reports ~0.9 span F1 on full data)"},
        config={"student": config["students"][0], "train_rows": n_train, "test_rows": n_test,
                "split": split.total, "target_agreement": target, "hosting_per_hour_usd": HOSTING_PER_HOUR,
                "latency": f"batch 1, {LATENCY_SAMPLES} eval inputs (20 for exports), after one warm-up",
                "size": "fp32: the run folder plus the SmolLM2 base folder it loads; exports: the exported folder"},
        seconds=time.perf_counter() - started,
        summary=(f"LoRA extraction student on {metrics['train_examples']} utterances: slot F1 "
                 f"{(metrics['slot_f1'] or 0):.3f}, exact match {(metrics['exact_match'] or 0):.3f}, schema-valid "
                 f"{(metrics['schema_valid_rate'] or 0):.1%}, p50 {fp32['latency_ms_p50']} ms; "
                 + "; ".join(f"{fmt} " + (f"F1 {d['field_f1']:.3f}, {d['agreement_delta_points']:+.2f} pts, "
                                          f"p50 {d['latency_ms_p50']} ms" if "agreement" in d else "not evaluated")
                             for fmt, d in deployed.items())),
    )
    print(json.dumps(metrics, indent=1, default=str))

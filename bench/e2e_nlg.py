"""E2E NLG through the pipeline with a generation student (LoRA on SmolLM2-135M).

Each distinct meaning representation (MR) in `dev.csv` is one training input, its first reference
the teacher's recorded answer; the distinct MRs of `test_with_refs.csv` are pinned to the eval split
and locked first. The pipeline gates on ROUGE-L against the one recorded teacher answer; this script
also scores the same student outputs against all references of each MR, the way the E2E challenge
reports (multi-reference ROUGE-L, BLEU and chrF), so the numbers compare with published ones.
Where a judge backend is configured (STILLROOM_BENCH_JUDGE_URL, an OpenAI-compatible endpoint),
the judge's win rate is added; none is reachable from the CI machine, so it is reported as skipped.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.common import (HOSTING_PER_HOUR, LATENCY_SAMPLES, dataset_dir, deployed_forms, lora_size_bytes,
                          recorded_outputs, serving, write_result)


def references(path: Path) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            refs[row["mr"].strip()].append(row["ref"].strip())
    return dict(refs)


def multi_reference_scores(outputs: dict[str, str], refs: dict[str, list[str]]) -> dict:
    """Corpus BLEU and chrF with every reference (sacrebleu), and ROUGE-L as the best match over
    the references per MR, averaged (as the E2E challenge's scripts do)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    mrs = [mr for mr in outputs if mr in refs]
    hyps = [outputs[mr] for mr in mrs]
    width = max(len(refs[mr]) for mr in mrs)
    # sacrebleu wants reference streams of equal length; a shorter list repeats its last reference
    streams = [[refs[mr][min(i, len(refs[mr]) - 1)] for mr in mrs] for i in range(width)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [max(scorer.score(r, outputs[mr])["rougeL"].fmeasure for r in refs[mr]) for mr in mrs]
    return {"n": len(mrs), "bleu": round(sacrebleu.corpus_bleu(hyps, streams).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hyps, streams).score, 2),
            "rouge_l": round(sum(rouge) / len(rouge), 4)}


def main(quick: bool = False) -> None:
    data = dataset_dir("e2e_nlg")
    if data is None:
        return
    import yaml

    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.project import Project, init_project
    from stillroom.train.runner import train_student

    train_refs, test_refs = references(data / "dev.csv"), references(data / "test_with_refs.csv")
    n_train, n_test = (200, 100) if quick else (len(train_refs), len(test_refs))
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    started, seconds = time.perf_counter(), {}
    try:
        init_project(work)
        config = {
            "task": {"name": "e2e_nlg", "type": "generation", "max_output_tokens": 64, "metric": "rouge_l",
                     "student_input_format": "Describe the restaurant in one sentence.\n{input}"},
            "students": [{"name": "lora", "kind": "lora", "rank": 16, "learning_rate": 3e-4, "epochs": 3,
                          "batch_size": 8}],
            "split": {"train": 0.8, "validation": 0.05, "calibration": 0.1, "eval": 0.05, "seed": 0},
        }
        (work / "stillroom.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        project = Project.open(work)
        for name, refs, n in (("test.jsonl", test_refs, n_test), ("train.jsonl", train_refs, n_train)):
            rows = [{"input": mr, "output": rs[0]} for mr, rs in list(refs.items())[:n]]
            (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        t = time.perf_counter()
        import_file(project, work / "test.jsonl", split="eval")
        lock_eval(project, reason="E2E NLG test set")
        import_file(project, work / "train.jsonl")
        split = split_project(project)
        seconds["prepare"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        run = train_student(project, "lora")
        seconds["train"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        evaluation = evaluate_student(project, "lora", latency_samples=LATENCY_SAMPLES)
        seconds["eval_and_calibrate"] = round(time.perf_counter() - t, 2)
        outputs = recorded_outputs(project, run["id"])  # the student's answers, as recorded by eval
        inputs = list(outputs)
        fp32 = serving(evaluation, lora_size_bytes(run), inputs, [outputs[i] for i in inputs])
        t = time.perf_counter()
        deployed = deployed_forms(project, "lora", inputs, [outputs[i] for i in inputs],
                                  quality=("rouge_l", "bleu", "chrf"))
        seconds["export_and_reevaluate"] = round(time.perf_counter() - t, 2)
        project.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    multi = multi_reference_scores(outputs, test_refs)
    vs = evaluation["vs_teacher"]
    metrics = {
        "multi_reference": multi,
        "vs_first_reference": {k: vs.get(k) for k in ("rouge_l", "bleu", "chrf", "length") if k in vs},
        "agreement": evaluation["agreement"],
        "judge_win_rate": None,
        "judge": "skipped: no judge backend reachable from this machine" if not os.environ.get(
            "STILLROOM_BENCH_JUDGE_URL") else "see the judge section of the report",
        "ms_per_input": 1000.0 / evaluation["throughput"]["inputs_per_s"],
        "serving": fp32, "deployed_forms": deployed,
        "train_tokens_per_s": run["metrics"].get("train_tokens_per_s"),
        "train_seconds": run["metrics"].get("train_seconds"),
        "val_score": run["metrics"].get("val_agreement"),
        "train_examples": run["metrics"].get("train_examples"),
        "stage_seconds": seconds,
    }
    write_result(
        "e2e_nlg", "e2e_nlg", quick, metrics,
        goals={"rouge_l": "reported; for scale, the challenge baseline TGen scored multi-reference ROUGE-L "
                          "68.50 and BLEU 65.93 on this test set, trained on the 42k-row train set, not the "
                          "547 dev MRs used here (Dusek, Novikova and Rieser 2018, Findings of the E2E NLG "
                          "Challenge)"},
        config={"student": config["students"][0], "train_mrs": n_train, "test_mrs": n_test, "split": split.total,
                "hosting_per_hour_usd": HOSTING_PER_HOUR,
                "latency": f"batch 1, {LATENCY_SAMPLES} eval inputs (20 for exports), after one warm-up",
                "size": "fp32: the run folder plus the SmolLM2 base folder it loads; exports: the exported folder",
                "deployed_forms": "their rouge_l/bleu/chrf are against the one recorded teacher answer"},
        seconds=time.perf_counter() - started,
        summary=(f"LoRA generation student on {metrics['train_examples']} MRs: multi-reference ROUGE-L "
                 f"{multi['rouge_l']:.3f}, BLEU {multi['bleu']:.1f}, chrF {multi['chrf']:.1f}; "
                 f"p50 {fp32['latency_ms_p50']} ms; "
                 + "; ".join(f"{fmt} " + (f"ROUGE-L vs teacher {d['rouge_l']:.3f}, {d['agreement_delta_points']:+.2f} pts, "
                                          f"p50 {d['latency_ms_p50']} ms" if "agreement" in d else "not evaluated")
                             for fmt, d in deployed.items())),
    )
    print(json.dumps(metrics, indent=1, default=str))

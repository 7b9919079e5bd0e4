"""Single-input latency of a label-head LoRA student on this CPU, in each form it can be served in.

The issue's goal for LoRA classification is at most 20 ms per input. That figure depends on the CPU
more than on the student: a SmolLM2-135M forward over a ~20-token Banking77 input is ~4 GFLOP and
reads every weight once, so it is bound by the CPU's matrix-product speed and memory bandwidth (an
AMX CPU multiplies bf16 ~5x faster than fp32; an AVX2-only one emulates bf16 and is fastest in fp32
or int8). `students_banking77` measures latency on the students it trains, which takes an hour;
this benchmark answers the latency question alone, in about 25 minutes, on whatever CPU runs it.

What runs: a `scoring: head` student (rank 16, all seven projections) trained for one epoch on 350
Banking77 train rows at the precision `auto` picks here (fp32 on a CPU; bf16 as well where the CPU
multiplies bf16 natively), then, on the first 60 locked test inputs: the eager student; its int8
export (torch dynamic quantization, re-loaded as served); and the compiled forward
(`compile_predictions`, Inductor max-autotune with frozen weights; compile time reported). Per form:
p50/p95 of one input at a time, ms per input at batch 16, and the share of answers equal to the
eager student's. The student's accuracy is not the point (one short epoch) and is not reported.

The same again for a student on the base's first 8 of 30 layers (`layers: 8`), in fp32, side by side:
what depth buys where the whole base misses the goal. What depth costs in accuracy is measured on all
Banking77 labels by `students_banking77` (lora_head_l8, lora_head_l12).
"""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import dataset_dir, hardware, write_result

TRAIN_ROWS, VAL_ROWS, INPUTS, GOAL_MS = 350, 50, 60, 20.0
SHALLOW = 8  # decoder layers kept by the shallow student (of SmolLM2-135M's 30)


def _latency(student, texts: list[str], reference=None) -> dict:
    """p50/p95 of single-input predictions, ms per input at batch 16, and agreement with `reference`."""
    student.predict(texts[:1])  # warm-up
    ms = []
    for text in texts:
        started = time.perf_counter()
        student.predict([text])
        ms.append(1000 * (time.perf_counter() - started))
    ms.sort()
    started = time.perf_counter()
    answers = student.predict(texts, batch_size=16)
    out = {"latency_ms_p50": round(ms[len(ms) // 2], 1), "latency_ms_p95": round(ms[int(0.95 * (len(ms) - 1))], 1),
           "batch16_ms_per_input": round(1000 * (time.perf_counter() - started) / len(texts), 1)}
    if reference is not None:
        out["same_answer_as_eager"] = round(sum(a.label == b.label for a, b in zip(answers, reference)) / len(texts), 3)
    return out, answers


def _forms(precision: str, rows, labels, texts, work: Path, layers: int | None = None) -> dict:
    from stillroom.models import smollm2_hf_dir
    from stillroom.train import export, lora
    from stillroom.train.artifacts import load_artifact

    key = precision if layers is None else f"{precision}-l{layers}"
    run = work / f"run-{key}"
    config = lora.LoraConfig(base_model=str(smollm2_hf_dir()), rank=16, learning_rate=1e-3, epochs=1,
                             batch_size=16, seed=0, precision=precision, scoring="head", layers=layers)
    started = time.perf_counter()
    lora.train_lora(rows[:TRAIN_ROWS], rows[TRAIN_ROWS:], labels, run, config)
    out = {"train_seconds": round(time.perf_counter() - started, 1)}
    student = load_artifact(run)
    out["eager"], reference = _latency(student, texts)
    print(key, "eager", out["eager"], flush=True)
    merged, int8 = work / f"merged-{key}", work / f"int8-{key}"
    export.export_merged(run, merged)
    export.export_int8(merged, int8)
    out["int8"], _ = _latency(load_artifact(int8), texts, reference)
    print(key, "int8", out["int8"], flush=True)
    started = time.perf_counter()
    failed = student.compile_predictions(warm_up=True)
    compile_seconds = round(time.perf_counter() - started, 1)
    if failed:
        out["compiled"] = {"failed": failed}
    else:
        out["compiled"], _ = _latency(student, texts, reference)
        out["compiled"]["compile_seconds"] = compile_seconds
    print(key, "compiled", out["compiled"], flush=True)
    return out


def main(quick: bool = False) -> None:
    folder = dataset_dir("banking77")
    if folder is None:
        return
    from transformers import AutoTokenizer

    from stillroom.cpus import native_bf16
    from stillroom.models import smollm2_hf_dir

    started = time.perf_counter()
    with open(folder / "train.csv", encoding="utf-8") as f:
        train = [(r["text"], r["category"]) for r in csv.DictReader(f)][: TRAIN_ROWS + VAL_ROWS]
    with open(folder / "test.csv", encoding="utf-8") as f:
        texts = [r["text"] for r in csv.DictReader(f)][: 20 if quick else INPUTS]
    labels = sorted({y for _, y in train})
    precisions = ["fp32", "bf16"] if native_bf16() else ["fp32"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-head-latency-") as work:
        for precision in precisions:
            results[precision] = _forms(precision, train, labels, texts, Path(work))
        results[f"fp32-l{SHALLOW}"] = _forms("fp32", train, labels, texts, Path(work), layers=SHALLOW)
    forms = {f"{p}-{form}": r[form]["latency_ms_p50"] for p, r in results.items()
             for form in ("eager", "int8", "compiled") if "latency_ms_p50" in r[form]}
    whole = {k: v for k, v in forms.items() if "-l" not in k}  # the whole 30-layer base
    best, best_any = min(whole, key=whole.get), min(forms, key=forms.get)
    metrics = {"by_precision": results, "p50_ms": forms, "best_form": best, "best_p50_ms": forms[best],
               "meets_goal": forms[best] <= GOAL_MS,
               "best_form_any_depth": best_any, "best_p50_ms_any_depth": forms[best_any],
               "meets_goal_any_depth": forms[best_any] <= GOAL_MS,
               "shallow_speedup_p50": {form: round(forms[f"fp32-{form}"] / forms[f"fp32-l{SHALLOW}-{form}"], 2)
                                       for form in ("eager", "int8", "compiled")
                                       if f"fp32-{form}" in forms and f"fp32-l{SHALLOW}-{form}" in forms},
               "bf16_skipped": None if "bf16" in precisions else
               "this CPU has no native bf16 (AVX-512 BF16 or AMX): torch emulates its products",
               "input_text_tokens_mean": round(statistics.mean(len(tokenizer(t)["input_ids"]) for t in texts), 1)}  # before the chat frame
    cpu = hardware().get("cpu_model")
    write_result(
        "head_latency", f"banking77 (train rows 0-{TRAIN_ROWS + VAL_ROWS - 1}, first {len(texts)} test inputs)",
        quick, metrics, goals={"latency_ms_p50": f"<= {GOAL_MS} (LoRA classification)"},
        config={"base": "SmolLM2-135M-Instruct", "rank": 16, "scoring": "head", "epochs": 1, "shallow_layers": SHALLOW,
                "train_rows": TRAIN_ROWS, "val_rows": VAL_ROWS, "inputs": len(texts), "threads": "auto"},
        seconds=time.perf_counter() - started,
        summary=(f"label-head LoRA student on {cpu}: p50 ms {forms}; best of the whole base {best} "
                 f"{forms[best]} ms ({'meets' if metrics['meets_goal'] else 'misses'} the {GOAL_MS:.0f} ms goal); "
                 f"best at any depth {best_any} {forms[best_any]} ms "
                 f"({'meets' if metrics['meets_goal_any_depth'] else 'misses'} it)"),
    )
    print(json.dumps(metrics, indent=1))

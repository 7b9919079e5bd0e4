"""Single-input latency of a label-head LoRA student on this CPU, in each form it can be served in.

The issue's goal for LoRA classification is at most 20 ms per input. That figure depends on the CPU
more than on the student: a SmolLM2-135M forward over a ~20-token Banking77 input is ~4 GFLOP and
reads every weight once, so it is bound by the CPU's matrix-product speed and memory bandwidth (an
AMX CPU multiplies bf16 ~5x faster than fp32; an AVX2-only one emulates bf16 and is fastest in fp32
or int8). `students_banking77` measures latency on the students it trains, which takes an hour;
this benchmark answers the latency question alone, in about 25 minutes, on whatever CPU runs it.

What runs: a `scoring: head` student (rank 16, all seven projections) trained for one epoch on 350
Banking77 train rows at the precision `auto` picks here (fp32 on a CPU; bf16 as well where the CPU
multiplies bf16 natively), then, on the first 100 locked test inputs: the eager student; its int8
export (torch dynamic quantization, re-loaded as served); and the compiled forward
(`compile_predictions`, Inductor max-autotune with frozen weights; compile time reported). Per form:
p50/p95 of one input at a time (the forms take turns on each input, so a slow spell of a shared
host hits them alike), ms per input at batch 16, and the share of answers equal to the eager
student's. The student's accuracy is not the point (one short epoch) and is not reported.

The same again for a student on the base's first 8 of 30 layers (`layers: 8`), in fp32, side by side:
what depth buys where the whole base misses the goal. What depth costs in accuracy is measured on all
Banking77 labels by `students_banking77` (lora_head_l8, lora_head_l12).

A head student runs its last decoder layer at the position the head reads only (`lora._final_states`).
The `*_whole_last` forms run that layer over every position instead, as before 2026-11-25 (eager at
both depths, compiled at 8 layers: compiling the whole base again would add ~7 minutes), so the
saving is measured in the same turns.
"""

from __future__ import annotations

import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import dataset_dir, hardware, write_result

TRAIN_ROWS, VAL_ROWS, INPUTS, GOAL_MS = 350, 50, 100, 20.0
SHALLOW = 8  # decoder layers kept by the shallow student (of SmolLM2-135M's 30)


def _interleaved(students: dict, texts: list[str]) -> dict:
    """Per form: p50/p95 of single-input predictions, ms per input at batch 16, and the share of
    answers equal to the eager student's of the same depth.

    The forms take turns on every input (the order rotated from one input to the next), so a slow
    spell of a shared host lands on all of them alike and the ratios between forms hold even when
    the absolute figures move between runs."""
    names = list(students)
    for student in students.values():
        student.predict(texts[:1])  # warm-up (a compiled form compiled already)
    ms = {name: [] for name in names}
    for i, text in enumerate(texts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            started = time.perf_counter()
            students[name].predict([text])
            ms[name].append(1000 * (time.perf_counter() - started))
    out, answers = {}, {}
    for name in names:
        started = time.perf_counter()
        answers[name] = students[name].predict(texts, batch_size=16)
        ordered = sorted(ms[name])
        out[name] = {"latency_ms_p50": round(ordered[len(ordered) // 2], 1),
                     "latency_ms_p95": round(ordered[int(0.95 * (len(ordered) - 1))], 1),
                     "batch16_ms_per_input": round(1000 * (time.perf_counter() - started) / len(texts), 1)}
    for name in names:
        eager = name.rsplit("-", 1)[0] + "-eager"
        if name != eager:
            out[name]["same_answer_as_eager"] = round(
                sum(a.label == b.label for a, b in zip(answers[name], answers[eager])) / len(texts), 3)
    return out


class _WholeLastLayer:
    """A head student predicting with its last layer over every position: the comparison form."""

    def __init__(self, student, compiled: bool):
        from stillroom.train import lora

        self.student, self.lora = student, lora
        self.forward = (lora.compiled_head_forward(student.model, student.label_head, student._pad_id, one_position=False)
                        if compiled else
                        lambda rows: lora._head_logits(student.model, student.label_head, rows, student._pad_id,
                                                       one_position=False))
        if compiled:  # compile both batch shape classes now, as `compile_predictions(warm_up=True)` does
            self.predict(["warm-up"])
            self.predict(["warm-up", "a second warm-up input"])

    def predict(self, texts: list[str], batch_size: int = 16) -> list:
        from stillroom.train.base import Prediction

        s = self.student
        prompts = self.lora._encode_prompts(s.tokenizer, s._frame, texts, s.student_format, s.config.max_input_tokens)
        probs = self.lora._head_probs(s.model, s.label_head, prompts, s._pad_id, batch_size, forward=self.forward)
        return [Prediction(label=s.labels[int(row.argmax())], confidence=float(row.max()), probs={})
                for row in probs]


def _forms(precision: str, rows, labels, work: Path, layers: int | None = None) -> tuple[dict, dict]:
    """({form name: student} for the eager student, its int8 export and its compiled forward; facts
    about building them: training and compile seconds)."""
    from stillroom.models import smollm2_hf_dir
    from stillroom.train import export, lora
    from stillroom.train.artifacts import load_artifact

    key = precision if layers is None else f"{precision}-l{layers}"
    run = work / f"run-{key}"
    config = lora.LoraConfig(base_model=str(smollm2_hf_dir()), rank=16, learning_rate=1e-3, epochs=1,
                             batch_size=16, seed=0, precision=precision, scoring="head", layers=layers)
    started = time.perf_counter()
    lora.train_lora(rows[:TRAIN_ROWS], rows[TRAIN_ROWS:], labels, run, config)
    facts = {"train_seconds": round(time.perf_counter() - started, 1)}
    merged, int8 = work / f"merged-{key}", work / f"int8-{key}"
    export.export_merged(run, merged)
    export.export_int8(merged, int8)
    students = {f"{key}-eager": load_artifact(run), f"{key}-int8": load_artifact(int8)}
    students[f"{key}-eager_whole_last"] = _WholeLastLayer(students[f"{key}-eager"], compiled=False)
    compiled = load_artifact(run)
    started = time.perf_counter()
    failed = compiled.compile_predictions(warm_up=True)
    facts["compile_seconds"] = round(time.perf_counter() - started, 1)
    if failed:
        facts["compile_failed"] = failed
    else:
        students[f"{key}-compiled"] = compiled
        if layers is not None:
            started = time.perf_counter()
            students[f"{key}-compiled_whole_last"] = _WholeLastLayer(compiled, compiled=True)
            facts["compile_whole_last_seconds"] = round(time.perf_counter() - started, 1)
    print(key, facts, flush=True)
    return students, facts


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
    students, built = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-head-latency-") as work:
        for precision, layers in [(p, None) for p in precisions] + [("fp32", SHALLOW)]:
            made, facts = _forms(precision, train, labels, Path(work), layers=layers)
            students.update(made)
            built[precision if layers is None else f"{precision}-l{layers}"] = facts
        results = _interleaved(students, texts)
    for name, figures in results.items():
        print(name, figures, flush=True)
    forms = {name: r["latency_ms_p50"] for name, r in results.items()}
    served = {k: v for k, v in forms.items() if not k.endswith("_whole_last")}  # what a student serves as
    whole = {k: v for k, v in served.items() if "-l" not in k}  # the whole 30-layer base
    best, best_any = min(whole, key=whole.get), min(served, key=served.get)
    metrics = {"by_form": results, "built": built, "p50_ms": forms, "best_form": best, "best_p50_ms": forms[best],
               "meets_goal": forms[best] <= GOAL_MS,
               "best_form_any_depth": best_any, "best_p50_ms_any_depth": forms[best_any],
               "meets_goal_any_depth": forms[best_any] <= GOAL_MS,
               "shallow_speedup_p50": {form: round(forms[f"fp32-{form}"] / forms[f"fp32-l{SHALLOW}-{form}"], 2)
                                       for form in ("eager", "int8", "compiled")
                                       if f"fp32-{form}" in forms and f"fp32-l{SHALLOW}-{form}" in forms},
               # whole last layer / last layer at the read position only, per form (> 1: the saving)
               "one_position_speedup_p50": {name.removesuffix("_whole_last"): round(
                   forms[name] / forms[name.removesuffix("_whole_last")], 3)
                   for name in forms if name.endswith("_whole_last")},
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
        summary=(f"label-head LoRA student on {cpu}: p50 ms {forms}; last layer at one position "
                 f"{metrics['one_position_speedup_p50']}x faster than whole; best of the whole base {best} "
                 f"{forms[best]} ms ({'meets' if metrics['meets_goal'] else 'misses'} the {GOAL_MS:.0f} ms goal); "
                 f"best at any depth {best_any} {forms[best_any]} ms "
                 f"({'meets' if metrics['meets_goal_any_depth'] else 'misses'} it)"),
    )
    print(json.dumps(metrics, indent=1))

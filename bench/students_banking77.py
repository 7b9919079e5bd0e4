"""Every student kind on Banking77 at 1,000 labels and at all 10,003: quality, speed, size, cost.

The test rows are the locked eval (3,080); the train file supplies the teacher's labels (a seeded
random 1,000 rows, or all of them; at 1,000 the other train inputs are imported without answers, for
the self-trained students). Per student: agreement with the teacher on the locked eval,
training tokens/s (LoRA), single-input latency p50/p95 and batched throughput on this machine,
size on disk, and cost per million input tokens at the configured hosting price
(`costs.student_hosting_per_hour`, $0.10/h by default: a small CPU instance) at full utilisation.
The full-data LoRA run takes about an hour on 2 CPU cores; `--quick` runs 1,000 labels only, and
`--part 1000` or `--part all` re-runs one size and keeps the other's results (`--students a,b` re-runs
only those students in that part). `--keep DIR` keeps each size's project in DIR/1000 and DIR/all: a
later run with the same settings reuses the students trained there (their training figures are
those of the first run, marked `trained_at`) and only measures again.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import (HOSTING_PER_HOUR, LATENCY_SAMPLES, RESULTS, banking77_project, dataset_dir, folder_bytes,
                          serving, write_result)

STUDENTS = [
    {"name": "encoder", "kind": "encoder"},
    {"name": "encoder_ft", "kind": "encoder", "finetune": True},
    # bf16 (stored weights, this CPU has AMX) and a higher learning rate over 5 epochs: a first run at
    # 3e-4 for 3 epochs (fp32) reached only 41.5/56.9/69.2% val agreement and was still climbing.
    {"name": "lora", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 5, "batch_size": 8,
     "precision": "bf16"},
    # Self-training, at 1,000 labels only: the other 9,003 train inputs are imported without answers
    # (traffic the teacher never labelled); encoder_ft labels them and its surest answers, at most 60 per
    # label, join the 840 teacher rows. No teacher calls.
    {"name": "encoder_st", "kind": "encoder", "finetune": True, "pseudo_labels": {"student": "encoder_ft"}},
    # LoRA on the same 840 teacher rows + 4,473 pseudo-labelled ones: 2 epochs, as with all 10,003
    # labels (a training set of that size), instead of the 5 that 840 rows alone need.
    {"name": "lora_st", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 2, "batch_size": 8,
     "precision": "bf16", "pseudo_labels": {"student": "encoder_ft"}},
    # The same with seed 1: LoRA's run-to-run spread at this size (65 validation rows pick the epoch).
    {"name": "lora_st_s1", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 2, "batch_size": 8,
     "precision": "bf16", "seed": 1, "pseudo_labels": {"student": "encoder_ft"}},
    # The ensemble with both the fine-tuned encoder and LoRA replaced by their self-trained versions.
    {"name": "ensemble_st", "kind": "ensemble", "members": ["encoder", "encoder_st", "lora_st"]},
    # A second round: the self-trained ensemble, the best labeller here, labels the same pool for a
    # fresh fine-tuned encoder, which then replaces encoder_st in the ensemble.
    {"name": "encoder_st2", "kind": "encoder", "finetune": True, "pseudo_labels": {"student": "ensemble_st"}},
    {"name": "ensemble_st2", "kind": "ensemble", "members": ["encoder", "encoder_st2", "lora_st"]},
    # Pools the three students' label probabilities (weights fitted on validation; a member can get 0);
    # reuses their runs, so it costs one validation pass of each to build.
    {"name": "ensemble", "kind": "ensemble", "members": ["encoder", "encoder_ft", "lora"]},
    # LoRA's recipe with a label head on the prompt's last hidden state instead of scoring the labels'
    # tokens (`scoring: head`): one decoder pass per input, no second pass over candidate labels.
    {"name": "lora_head", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 5, "batch_size": 8,
     "precision": "bf16", "scoring": "head"},
    # All labels only: the fine-tuned encoder again with two other seeds (10 minutes each on 2 cores),
    # pooled with the three above. Seed ensembles of one architecture average out its run-to-run noise.
    {"name": "encoder_ft_s1", "kind": "encoder", "finetune": True, "seed": 1},
    {"name": "encoder_ft_s2", "kind": "encoder", "finetune": True, "seed": 2},
    {"name": "ensemble_seeds", "kind": "ensemble",
     "members": ["encoder", "encoder_ft", "encoder_ft_s1", "encoder_ft_s2", "lora"]},
    # All labels only, when the optional Gemma-3-270M packages are installed (`STILLROOM_GEMMA=1
    # scripts/setup.sh`): LoRA's recipe on a second base, a member that differs in pretraining and
    # tokenizer where the seed ensemble's members differed only in their seed. Eager (the compiled
    # forward covers Llama layers only): about 290 tokens/s in bf16, ~45 minutes on 2 cores.
    {"name": "gemma", "kind": "lora", "base_model": "gemma-3-270m", "rank": 16, "learning_rate": 1e-3,
     "epochs": 2, "batch_size": 8, "precision": "bf16"},
    {"name": "ensemble_gemma", "kind": "ensemble", "members": ["encoder", "encoder_ft", "lora", "gemma"]},
    # The classifier fine-tune: head fitted on the frozen body, then body and head trained together
    # with cross-entropy (4 epochs, 5e-5, best validation epoch kept). A /tmp trial at all labels: 93.64%
    # alone against encoder_ft's 93.08%.
    {"name": "encoder_ce", "kind": "encoder", "finetune": "classifier"},
    {"name": "ensemble_ce", "kind": "ensemble", "members": ["encoder", "encoder_ft", "encoder_ce", "lora"]},
    # The classifier-tuned encoder pooled with the label-head LoRA instead of the label-scoring one.
    {"name": "ensemble_head", "kind": "ensemble", "members": ["encoder", "encoder_ce", "lora_head"]},
    # All labels only: the classifier fine-tune again with another seed, pooled with the first and LoRA.
    {"name": "encoder_ce_s1", "kind": "encoder", "finetune": "classifier", "seed": 1},
    {"name": "ensemble_ce_seeds", "kind": "ensemble", "members": ["encoder_ce", "encoder_ce_s1", "lora"]},
    # 1,000 labels only: the classifier fine-tune on the 840 teacher rows + encoder_ft's pseudo-labelled
    # ones (~5,300 rows, the size where it beat the contrastive recipe), against encoder_st.
    {"name": "encoder_ce_st", "kind": "encoder", "finetune": "classifier", "pseudo_labels": {"student": "encoder_ft"}},
    # The self-training rounds of encoder_st / encoder_st2 above, with the classifier fine-tune.
    {"name": "ensemble_ce_st", "kind": "ensemble", "members": ["encoder", "encoder_ce_st", "lora_st"]},
    {"name": "encoder_ce_st2", "kind": "encoder", "finetune": "classifier",
     "pseudo_labels": {"student": "ensemble_ce_st"}},
    {"name": "ensemble_ce_st2", "kind": "ensemble", "members": ["encoder", "encoder_ce_st2", "lora_st"]},
    # The same second round with the encoder's seed 1 and 2 (LoRA and the pseudo-labels unchanged): how
    # steady the 1,000-label result is.
    *({"name": f"encoder_ce_st2_s{k}", "kind": "encoder", "finetune": "classifier", "seed": k,
       "pseudo_labels": {"student": "ensemble_ce_st"}} for k in (1, 2)),
    *({"name": f"ensemble_ce_st2_s{k}", "kind": "ensemble", "members": ["encoder", f"encoder_ce_st2_s{k}", "lora_st"]}
      for k in (1, 2)),
    # A third round: encoder_ce_st2, the best 1,000-label student (a single encoder), labels the pool for
    # a fresh classifier fine-tune. Does a better single-model labeller help where encoder_ft's second
    # round (labelled by the self-trained encoder) did not?
    {"name": "encoder_ce_st3", "kind": "encoder", "finetune": "classifier",
     "pseudo_labels": {"student": "encoder_ce_st2"}},
    # The label-head LoRA on the base's first 8 and 12 of 30 layers (`layers`): 27% and 40% of the
    # decoder's cost per token, for CPUs where the whole base misses a latency budget (AVX2-only: 118 ms
    # eager per input for all 30). fp32: the CPUs this is for have no native bf16.
    *({"name": f"lora_head_l{k}", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 5, "batch_size": 8,
       "precision": "fp32", "scoring": "head", "layers": k} for k in (8, 12)),
    # 8 layers over 3 epochs instead of 2: its validation agreement was still climbing at epoch 2 (83.3 -> 90.7%).
    {"name": "lora_head_l8_e3", "kind": "lora", "rank": 16, "learning_rate": 1e-3, "epochs": 5, "batch_size": 8,
     "precision": "fp32", "scoring": "head", "layers": 8},
]
NEEDS_GEMMA = {"gemma", "ensemble_gemma"}
# All 10,003 labels: 8,420 training rows, so each LoRA epoch (about 17 minutes on 2 cores) gives as many
# optimizer steps as 10 epochs at 1,000 labels. 2 epochs, chosen on validation: a 3-epoch run (its
# linear decay stretched over 3) ended lower, 91.8% against 92.4% (by epoch: 80.4, 91.1, 91.8%).
ALL_LABELS = {"lora": {"epochs": 2}, "lora_head": {"epochs": 2}, "lora_head_l8": {"epochs": 2},
              "lora_head_l12": {"epochs": 2}, "lora_head_l8_e3": {"epochs": 3}}
# With every train row labelled there is no unlabelled input to self-train on.
ONLY_WITH_UNLABELLED = {"encoder_st", "lora_st", "lora_st_s1", "ensemble_st", "encoder_st2", "ensemble_st2", "encoder_ce_st",
                        "ensemble_ce_st", "encoder_ce_st2", "ensemble_ce_st2", "encoder_ce_st2_s1",
                        "encoder_ce_st2_s2", "ensemble_ce_st2_s1", "ensemble_ce_st2_s2", "encoder_ce_st3"}
ONLY_ALL_LABELS = {"encoder_ft_s1", "encoder_ft_s2", "ensemble_seeds", "encoder_ce_s1",
                   "ensemble_ce_seeds"} | NEEDS_GEMMA
PARTS = ("1000", "all")  # `bench/run students_banking77 --part all` re-runs one size, keeping the other
PRUNE_SAMPLE = 160  # eval inputs scored both ways (pruned and every label) for the LoRA students


def gemma_installed() -> bool:
    """Whether the Gemma-3-270M packages are installed; says so, once, when they are not."""
    from stillroom.models import ModelNotInstalled, gemma3_chunks

    try:
        gemma3_chunks()
        return True
    except ModelNotInstalled as exc:
        if not getattr(gemma_installed, "told", False):
            print(f"skipping {sorted(NEEDS_GEMMA)}: {exc} (or STILLROOM_GEMMA=1 scripts/setup.sh)", flush=True)
            gemma_installed.told = True
        return False


def measure(project, name: str, run: dict, evaluation: dict, eval_inputs: list[str]) -> dict:
    from stillroom.evaluate.evaluator import load_run_student

    student = load_run_student(project, name, run)
    student.predict(eval_inputs[:1])  # warm-up
    latencies = []
    for text in eval_inputs[:LATENCY_SAMPLES]:
        t = time.perf_counter()
        student.predict([text])
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    latency = {"p50": latencies[len(latencies) // 2], "p95": latencies[int(0.95 * (len(latencies) - 1))]}
    out = {
        "agreement": round(evaluation["agreement"], 4),
        "macro_f1": round(evaluation["vs_teacher"]["macro_f1"], 4),
        "val_agreement": run["metrics"].get("val_agreement"),
        "train_seconds": run["metrics"].get("train_seconds"),
        "train_tokens_per_s": run["metrics"].get("train_tokens_per_s"),
        **serving(evaluation, folder_bytes(run["artifact_path"]), eval_inputs, latency=latency),
        "coverage_at_99": round(evaluation["calibration"]["coverage"], 4),
    }
    if hasattr(student, "_answers") and getattr(student, "label_head", None) is None:  # label scoring
        out["label_pruning"] = pruning(student, eval_inputs[:PRUNE_SAMPLE])
    if getattr(student, "label_head", None) is not None:
        out["compiled"] = compiled_latency(student, eval_inputs[:LATENCY_SAMPLES])
    return out


def compiled_latency(student, texts: list[str]) -> dict:
    """A `scoring: head` student's predictions through torch.compile (`compile: true` in its config):
    single-input latency on the same inputs as the eager figures, compile time, and whether the
    compiled forward picks the same labels as the eager one."""
    eager = student.predict(texts, batch_size=16)
    started = time.perf_counter()
    failed = student.compile_predictions(warm_up=True)
    compile_seconds = time.perf_counter() - started
    if failed:
        return {"failed": failed}
    latencies = []
    for text in texts:
        t = time.perf_counter()
        student.predict([text])
        latencies.append((time.perf_counter() - t) * 1000)
    latencies.sort()
    t = time.perf_counter()
    compiled = student.predict(texts, batch_size=16)
    batch_ms = (time.perf_counter() - t) * 1000 / len(texts)
    return {"latency_ms_p50": round(latencies[len(latencies) // 2], 1),
            "latency_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
            "batch16_ms_per_input": round(batch_ms, 1), "compile_seconds": round(compile_seconds, 1),
            "same_answer": round(sum(a.label == b.label for a, b in zip(eager, compiled)) / len(texts), 4),
            "max_prob_change": round(max(abs(a.confidence - b.probs[a.label]) for a, b in zip(eager, compiled)), 4)}


def pruning(student, texts: list[str]) -> dict:
    """First-token label pruning against scoring all 77 labels, on the same inputs: time and answers."""
    from stillroom.train import lora

    prompts = lora._encode_prompts(student.tokenizer, student._frame, texts, student.student_format,
                                   student.config.max_input_tokens)
    timing, probs = {}, {}
    for prune in (True, False):
        t = time.perf_counter()
        probs[prune] = lora._label_probs(student.model, prompts, student._answers, student._pad_id, 16, prune=prune)
        timing[prune] = (time.perf_counter() - t) * 1000 / len(texts)
    return {"inputs": len(texts), "batch": 16, "pruned_ms_per_input": round(timing[True], 1),
            "all_labels_ms_per_input": round(timing[False], 1), "speedup": round(timing[False] / timing[True], 2),
            "same_answer": round((probs[True].argmax(1) == probs[False].argmax(1)).float().mean().item(), 4)}


def run_size(data: Path, quick: bool, train_rows: int | None, only: list[str] | None = None,
             keep: Path | None = None) -> dict:
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.store.records import split_rows
    from stillroom.train.runner import train_student

    if keep is not None:  # trained students stay there, and an unchanged student is not trained again
        work = Path(keep) / str(train_rows or "all")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-students-"))
    try:
        students = [{**spec, **(ALL_LABELS.get(spec["name"], {}) if train_rows is None else {})}
                    for spec in STUDENTS
                    if spec["name"] not in (ONLY_ALL_LABELS if train_rows else ONLY_WITH_UNLABELLED)
                    and (spec["name"] not in NEEDS_GEMMA or gemma_installed())]
        extra = {"students": students, "costs": {"student_hosting_per_hour": HOSTING_PER_HOUR}}
        project, _, info = banking77_project(work, data, quick, extra=extra, train_rows=train_rows,
                                             unlabelled_rest=train_rows is not None)
        with project.store.engine.connect() as conn:
            eval_inputs = [ex.input for ex, _ in split_rows(conn, "eval")]
        out = {"train_labels": train_rows or "all", "split": info["split"], "config": students, "students": {}}
        for spec in students:
            if only and spec["name"] not in only:
                continue
            print(f"{spec['name']}: training on {train_rows or 'all'} labels", flush=True)
            run = train_student(project, spec["name"])
            evaluation = evaluate_student(project, spec["name"])
            result = out["students"][spec["name"]] = measure(project, spec["name"], run, evaluation, eval_inputs)
            result["measured_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            if run["skipped"]:  # an identical run in the kept project: its training figures are from then
                result["trained_at"] = str(run.get("finished_at") or run.get("started_at"))
            if "pseudo_labels" in run["metrics"]:
                result["pseudo_labels"] = run["metrics"]["pseudo_labels"]
            if spec["kind"] == "ensemble":
                result["weights"] = run["metrics"]["weights"]
                result["member_val_agreement"] = run["metrics"]["member_val_agreement"]
            print(json.dumps(out["students"][spec["name"]]), flush=True)
        project.close()
        out["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return out
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def main(quick: bool = False, part: str | None = None, students: list[str] | None = None,
         keep: str | None = None) -> None:
    data = dataset_dir("banking77")
    if data is None:
        return
    started = time.perf_counter()
    sizes = [1000] if quick else [1000, None]
    if part is not None:
        sizes = [None if part == "all" else int(part)]
    results = {}
    previous = RESULTS / "students_banking77.json"
    if part is not None and previous.exists():  # the part not re-run keeps its measured results
        results = json.loads(previous.read_text(encoding="utf-8"))["metrics"]["by_train_labels"]
    unknown = sorted(set(students or []) - {s["name"] for s in STUDENTS})
    if unknown:
        raise SystemExit(f"--students: no student named {unknown}; this benchmark has "
                         f"{[s['name'] for s in STUDENTS]}")
    for n in sizes:
        fresh = run_size(data, False, n, students, Path(keep) if keep else None)
        kept = results.get(str(n or "all"), {}).get("students", {}) if students else {}
        fresh["students"] = {**kept, **fresh["students"]}
        results[str(n or "all")] = fresh
    results = {k: results[k] for k in PARTS if k in results}
    best = {k: max(v["students"].items(), key=lambda kv: kv[1]["agreement"]) for k, v in results.items()}
    metrics = {"by_train_labels": results,
               "best": {k: {"student": name, "agreement": m["agreement"]} for k, (name, m) in best.items()}}
    summary = "; ".join(f"{k} labels: best {name} {m['agreement']:.2%} (" + ", ".join(
        f"{n} {s['agreement']:.2%}" for n, s in results[k]["students"].items()) + ")"
        for k, (name, m) in best.items())
    write_result(
        "students_banking77", "banking77", quick, metrics,
        goals={"best_agreement_all_labels": ">= 0.940 (published BERT-base full-data accuracy 93.66%, "
                                            "Casanueva et al. 2020)",
               "best_agreement_1000_labels": ">= 0.88", "lora_latency_ms_p50": "<= 20"},
        config={"students": STUDENTS, "all_labels_overrides": ALL_LABELS, "hosting_per_hour_usd": HOSTING_PER_HOUR,
                "latency": f"batch 1, {LATENCY_SAMPLES} eval inputs, after one warm-up"},
        seconds=time.perf_counter() - started, summary=summary,
    )
    print(json.dumps(metrics["best"], indent=1))

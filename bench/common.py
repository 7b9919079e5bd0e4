"""What every benchmark shares: where the datasets are, and writing results in the agreed shape."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = Path(os.environ.get("STILLROOM_DATASETS", ROOT.parent / "shared" / "datasets"))
HOSTING_PER_HOUR = 0.10  # $/hour for a student replica: a small 2-core CPU instance (`costs.student_hosting_per_hour`)
LATENCY_SAMPLES = 50  # single-input calls timed per student, after one warm-up


def dataset_dir(name: str) -> Path | None:
    """The dataset's folder, or None after saying why (the benchmark then exits 0 writing nothing)."""
    path = DATASETS / name
    if not path.is_dir():
        print(f"skipping: dataset '{name}' not found at {path} (it lives in ../shared/datasets; "
              "set STILLROOM_DATASETS to point elsewhere)")
        return None
    return path


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("stillroom", "torch", "transformers", "peft", "sentence-transformers", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpus": os.cpu_count(), "gpu": gpu, "machine": platform.machine(), **_cpu()}


def _cpu() -> dict:
    """The CPU's model and the vector/matrix extensions that decide CPU speed (AVX-512, bf16, AMX):
    the machines these benchmarks run on are not always the same kind, and bf16 is only fast on some."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_model": model, "cpu_flags": [f for f in wanted if f in flags]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def mean_tokens(texts: list[str]) -> float:
    """Mean length in SmolLM2 tokens: one unit for every student's cost per token, whatever its own
    tokenizer (the encoder students' WordPiece counts differently)."""
    import statistics

    from transformers import AutoTokenizer

    from stillroom.models import smollm2_hf_dir

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    return statistics.mean(len(tok(t)["input_ids"]) for t in texts) if texts else 0.0


def serving(evaluation: dict, size_bytes: int, inputs: list[str], outputs: list[str] | None = None,
            latency: dict | None = None) -> dict:
    """What a student costs to serve, from an evaluation: single-input latency p50/p95 (the
    evaluation's `latency_ms`, or `latency` measured by the caller), batched throughput on the eval
    split, size on disk, and cost per million tokens at HOSTING_PER_HOUR when fully used. `outputs`
    (the student's answers, for extraction and generation) adds their tokens to the per-token cost,
    as `stillroom.economics` blends input and output tokens."""
    per_s = evaluation["throughput"]["inputs_per_s"]
    latency = latency or evaluation.get("latency_ms") or {}
    per_input_usd = HOSTING_PER_HOUR / (per_s * 3600)
    tokens_in = mean_tokens(inputs[:500])
    out = {
        "latency_ms_p50": round(latency["p50"], 1) if latency.get("p50") is not None else None,
        "latency_ms_p95": round(latency["p95"], 1) if latency.get("p95") is not None else None,
        "throughput_inputs_per_s": round(per_s, 2),
        "size_on_disk_mb": round(size_bytes / 1e6, 1),
        "input_tokens_mean": round(tokens_in, 1),
        "cost_per_million_input_tokens_usd": round(per_input_usd / tokens_in * 1e6, 4),
    }
    if outputs is not None:
        tokens_out = mean_tokens(outputs[:500])
        out["output_tokens_mean"] = round(tokens_out, 1)
        out["cost_per_million_tokens_usd"] = round(per_input_usd / (tokens_in + tokens_out) * 1e6, 4)
    return out


def recorded_outputs(project, run_id: int) -> dict[str, str]:
    """The answers an evaluation recorded for a run, by input text."""
    from sqlalchemy import select

    from stillroom.store import tables as T

    with project.store.engine.connect() as conn:
        rows = conn.execute(
            select(T.examples.c.input, T.predictions.c.label)
            .join(T.predictions, T.predictions.c.example_id == T.examples.c.id)
            .where(T.predictions.c.run_id == run_id)
        ).all()
    return {text: label for text, label in rows}


def lora_size_bytes(run: dict) -> int:
    """What a LoRA student needs on disk to answer: its run folder (adapter, frame, head) plus the base
    model's folder it loads (SmolLM2 from the stillroom-models package)."""
    from stillroom.models import smollm2_hf_dir

    return folder_bytes(run["artifact_path"]) + folder_bytes(smollm2_hf_dir())


def deployed_forms(project, name: str, inputs: list[str], outputs: list[str] | None = None,
                   quality: tuple[str, ...] = ()) -> dict:
    """Export a LoRA student's newest run as int8 and GGUF Q8_0 and re-evaluate each on the locked eval
    split, as `stillroom export` does: the artifact's agreement with the teacher, its change against
    the fp32 student (points, paired bootstrap interval, answers that changed), the gate's verdict,
    the `quality` keys of its scorecard, and what it costs to serve (`serving`; output tokens are
    the fp32 student's, which the artifact's answers match but for the flips). GGUF needs
    llama-cpp-python; without it the entry says so instead."""
    from stillroom.train.export import export_student

    out = {}
    for record in export_student(project, name, ("int8", "gguf-q8_0")):
        evaluation = record.get("evaluation")
        if evaluation is None:
            out[record["format"]] = {"size_on_disk_mb": round(record["size_bytes"] / 1e6, 1),
                                     "evaluation_skipped": record.get("evaluation_skipped")}
            continue
        vs = evaluation["vs_fp32"]
        out[record["format"]] = {
            "agreement": round(evaluation["agreement"], 4),
            "agreement_delta_points": vs["agreement_delta_points"],
            "agreement_loss_ci_points": vs["agreement_loss_ci"],
            "changed_answers": vs["label_flips"], "changed_rate": vs["flip_rate"],
            **{k: evaluation["vs_teacher"].get(k) for k in quality},
            "gate_passed": evaluation["gate"]["passed"],
            **serving(evaluation, record["size_bytes"], inputs, outputs),
        }
    return out


def write_result(name: str, dataset: str, quick: bool, metrics: dict, goals: dict, config: dict,
                 seconds: float, summary: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "dataset": dataset, "quick": quick, "metrics": metrics, "goals": goals,
               "config": config, "hardware": hardware(), "versions": versions(), "seconds": round(seconds, 1),
               "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    with open(RESULTS / "SUMMARY.md", "a", encoding="utf-8") as f:
        f.write(f"- {payload['finished_at']} **{name}**{' (quick)' if quick else ''}: {summary}\n")
    print(f"wrote {path}")
    return path


def banking77_project(work: Path, data: Path, quick: bool, target: float = 0.99, extra: dict | None = None,
                      train_rows: int | None = None, unlabelled_rest: bool = False):
    """A Banking77 project set up as bench/banking77.py does: the test rows pinned to eval and locked,
    the train rows imported as the teacher's answers and split, eval copies excluded from training.
    `extra` adds stillroom.yaml sections; `train_rows` keeps a seeded random sample of the train file
    (a team that labelled only that many); with `unlabelled_rest` the other train inputs are imported
    too, without answers (traffic the teacher never saw, for self-training). A folder that already
    holds such a project is reopened with the config rewritten (data, split and lock kept), so
    students already trained on it are reused (`train_student` skips an identical run).
    Returns (project, timings, info)."""
    import time

    import yaml

    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import find_leaks, lock_eval
    from stillroom.curate.split import exclude_examples, split_project
    from stillroom.project import Project, init_project

    labels = json.loads((data / "categories.json").read_text())
    seconds: dict[str, float] = {}

    def timed(stage, fn, *a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        seconds[stage] = round(time.perf_counter() - t, 2)
        return out

    reopen = (work / "stillroom.yaml").is_file()
    if not reopen:
        init_project(work)
    config = {"task": {"name": "banking77", "labels": [{"name": l} for l in labels]},
              "students": [{"name": "encoder", "kind": "encoder"}],
              "split": {"train": 0.8, "validation": 0.05, "calibration": 0.1, "eval": 0.05, "seed": 0},
              "routing": {"target_agreement": target}, **(extra or {})}
    (work / "stillroom.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    project = Project.open(work)

    def import_rest():  # idempotent: inputs already in the project are not added twice
        rest = work / "train-unlabelled.csv"
        if unlabelled_rest and train_rows and (work / "train-sample.csv").is_file():
            source = work / "train.csv" if (work / "train.csv").is_file() else data / "train.csv"  # quick: its fifth
            lines = source.read_text(encoding="utf-8").splitlines()
            sample = set((work / "train-sample.csv").read_text(encoding="utf-8").splitlines()[1:])
            rest.write_text("\n".join([lines[0]] + [l for l in lines[1:] if l not in sample]) + "\n", encoding="utf-8")
            # the input column only: these rows reach the project with no answer
            timed("import_unlabelled", import_file, project, rest, input_column="text", output_column="(none)")

    if reopen:  # a kept project (bench --keep): its data and lock are in place; the config is refreshed
        from stillroom.store.records import split_rows

        with project.store.engine.connect() as conn:
            split = {s: len(split_rows(conn, s)) for s in ("train", "validation", "calibration", "eval")}
        import_rest()
        return project, seconds, {"split": split, "reopened": str(work)}
    train_csv, test_csv = data / "train.csv", data / "test.csv"
    if quick:  # every 5th row: the same pipeline in about a fifth of the time
        for src in (train_csv, test_csv):
            lines = src.read_text(encoding="utf-8").splitlines()
            (work / src.name).write_text("\n".join(lines[:1] + lines[1::5]) + "\n", encoding="utf-8")
        train_csv, test_csv = work / "train.csv", work / "test.csv"
    if train_rows:
        import random

        lines = train_csv.read_text(encoding="utf-8").splitlines()
        body = lines[1:]
        random.Random(0).shuffle(body)
        (work / "train-sample.csv").write_text("\n".join(lines[:1] + body[:train_rows]) + "\n", encoding="utf-8")
        train_csv = work / "train-sample.csv"
    kw = {"input_column": "text", "output_column": "category"}
    t_eval = timed("import_test_as_eval", import_file, project, test_csv, split="eval", **kw)
    timed("lock", lock_eval, project, reason="Banking77 test set")
    t_train = timed("import_train", import_file, project, train_csv, **kw)
    split = timed("split", split_project, project)
    excluded = exclude_examples(project, [l["example_id"] for l in find_leaks(project)])
    import_rest()  # after the split: unlabelled inputs get no split
    info = {"split": split.total, "leaks_excluded": excluded,
            "import_problems": len(t_eval.problems) + len(t_train.problems)}
    return project, seconds, info

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

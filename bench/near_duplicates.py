"""Near-duplicate leakage on Banking77: how many test inputs have a near-duplicate in train.

The 3,080 test rows are pinned to the eval split and locked; the 10,003 train rows are imported and
split into train / validation / calibration. `curate dedupe`'s search (MiniLM embeddings, cosine
similarity, blockwise) then compares every eval input with every train-side input, once at the
lowest threshold; the counts at higher thresholds are read off the same pairs. Measured: test
inputs with a near-duplicate in train per threshold (vs the exact / case-folded copies the lock's
check finds), how often such pairs share a category, near-duplicate clusters inside train, wall
time for the first run (embedding) and a re-run (embedding cache), with example pairs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import dataset_dir, write_result

THRESHOLDS = (0.85, 0.90, 0.95, 0.98)


def main(quick: bool = False) -> None:
    data = dataset_dir("banking77")
    if data is None:
        return
    import yaml

    from stillroom.capture.importers import import_file
    from stillroom.curate.dedupe import find_near_duplicates
    from stillroom.curate.lock import find_leaks, lock_eval
    from stillroom.curate.split import split_project
    from stillroom.project import Project, init_project

    labels = json.loads((data / "categories.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench-near-dup-"))
    started = time.perf_counter()
    try:
        init_project(work)
        config = {"task": {"name": "banking77", "labels": [{"name": l} for l in labels]},
                  "split": {"train": 0.8, "validation": 0.05, "calibration": 0.1, "eval": 0.05, "seed": 0}}
        (work / "stillroom.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        project = Project.open(work)
        train_csv, test_csv = data / "train.csv", data / "test.csv"
        if quick:
            for src in (train_csv, test_csv):
                lines = src.read_text(encoding="utf-8").splitlines()
                (work / src.name).write_text("\n".join(lines[:1] + lines[1::5]) + "\n", encoding="utf-8")
            train_csv, test_csv = work / "train.csv", work / "test.csv"
        kw = {"input_column": "text", "output_column": "category"}
        import_file(project, test_csv, split="eval", **kw)
        lock_eval(project, reason="Banking77 test set")
        import_file(project, train_csv, **kw)
        split_project(project)
        folded_copies = find_leaks(project, splits=("train", "validation", "calibration"))
        chosen = project.config.curation.dedupe.threshold
        sides = ("train", "validation", "calibration")  # every row that came from train.csv

        t = time.perf_counter()
        report = find_near_duplicates(project, threshold=min(THRESHOLDS), training_splits=sides)
        first_seconds = time.perf_counter() - t
        t = time.perf_counter()
        rerun = find_near_duplicates(project, threshold=chosen, training_splits=sides)
        rerun_seconds = time.perf_counter() - t
        project.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_test = report.n_eval
    by_threshold = {}
    for thr in THRESHOLDS:
        pairs = [p for p in report.leaks if p.score >= thr - 1e-6]
        tests = {p.b for p in pairs}
        by_threshold[f"{thr:.2f}"] = {
            "test_with_near_dup": len(tests),
            "fraction_of_test": round(len(tests) / n_test, 4),
            "train_rows_matching": len({p.a for p in pairs}),
            "pairs": len(pairs),
            "pairs_same_category": round(sum(p.a_label == p.b_label for p in pairs) / len(pairs), 4) if pairs else None,
        }
    at = by_threshold[f"{chosen:.2f}"]
    assert at["test_with_near_dup"] == len(rerun.eval_with_near_duplicate())  # one search, two thresholds agree

    def show(p):
        return {"score": round(p.score, 4), "test": p.b_input, "train": p.a_input,
                "test_category": p.b_label, "train_category": p.a_label}

    chosen_pairs = sorted((p for p in report.leaks if p.score >= chosen - 1e-6), key=lambda p: p.score)
    examples = {
        "just_above_threshold": [show(p) for p in chosen_pairs[:5]],
        "most_similar_not_folded_copies": [show(p) for p in sorted(chosen_pairs, key=lambda p: -p.score)
                                           if not p.exact][:5],
        "different_category": [show(p) for p in chosen_pairs if p.a_label != p.b_label][:5],
    }
    metrics = {
        "threshold": chosen,
        "test_with_near_dup": at["test_with_near_dup"],
        "fraction_of_test": at["fraction_of_test"],
        "test_examples": n_test,
        "train_side_examples": report.n_training,
        "test_with_folded_copy": len({l["eval_example_id"] for l in folded_copies}),
        "by_threshold": by_threshold,
        "train_clusters_at_threshold": len(rerun.clusters),
        "train_duplicates_beyond_one_per_cluster": len(rerun.duplicate_ids()),
        "train_clusters_with_conflicting_labels": len(rerun.conflicting),
        "first_run_seconds": round(first_seconds, 1),
        "rerun_seconds_cached": round(rerun_seconds, 1),
        "embedded_first_run": report.embedded_now,
        "embedded_rerun": rerun.embedded_now,
    }
    write_result(
        "near_duplicates", "banking77", quick, {**metrics, "examples": examples},
        goals={"rerun_embeds_nothing": "embedded_rerun == 0 (embedding cache)"},
        config={"encoder": "all-MiniLM-L6-v2, L2-normalised, cosine", "thresholds": list(THRESHOLDS),
                "train_side_splits": list(sides), "chosen_threshold": chosen},
        seconds=time.perf_counter() - started,
        summary=(f"{at['test_with_near_dup']} of {n_test} test inputs ({at['fraction_of_test']:.1%}) have a near-duplicate "
                 f"in train at cosine >= {chosen} ("
                 + ", ".join(f"{k}: {v['test_with_near_dup']}" for k, v in by_threshold.items())
                 + f"; {metrics['test_with_folded_copy']} exact/folded copies); first run {metrics['first_run_seconds']} s, "
                 f"cached re-run {metrics['rerun_seconds_cached']} s"),
    )
    print(json.dumps(metrics, indent=1))

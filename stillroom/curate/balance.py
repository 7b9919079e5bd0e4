"""Balance: report the skew, and plan oversampling of rare groups and flagged edge cases.

The groups are the task's strata (`curate/split.py: stratum_of`): labels for classification, the
combination of fields a record states for extraction (so records that state a rare field, say
`amount+currency+date`, can be brought up to the floor). Generation has no classes: the report
says so, `min_per_label` does not apply, and only `flagged_copies` oversamples.

Oversampling touches the train split only (validation, calibration and eval keep their real
distribution, or their numbers would lie), and is applied where the training set is built
(`curate/datasets.py`). Copies are spread evenly: a group with n examples below the floor F gets
F // n copies of each, and F % n examples (seeded choice) one more.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from stillroom.config import BalanceConfig

__all__ = ["plan_copies", "balance_report"]


def plan_copies(train: dict[int, str], flagged: set[int], config: BalanceConfig, seed: int = 0,
                task=None) -> dict[int, int]:
    """Copies of each train example (1 = as is) after flagged-item and rare-group oversampling;
    `train` maps example -> label (answer), grouped by the task's stratum."""
    from stillroom.curate.split import stratum_of

    copies = {ex: (config.flagged_copies if ex in flagged else 1) for ex in train}
    if config.min_per_label <= 0 or (task is not None and task.type == "generation"):
        return copies
    by_label: dict[str, list[int]] = defaultdict(list)
    for ex, label in train.items():
        by_label[stratum_of(task, label)].append(ex)
    for label, ids in sorted(by_label.items()):
        ids.sort()
        have = sum(copies[ex] for ex in ids)
        if have >= config.min_per_label:
            continue
        extra = config.min_per_label - have
        each, rest = divmod(extra, len(ids))
        for ex in ids:
            copies[ex] += each
        for ex in random.Random(f"{seed}:{label}").sample(ids, rest):
            copies[ex] += 1
    return copies


def _skew(counts: dict[str, int], labels: list[str]) -> dict:
    present = {lab: n for lab, n in counts.items() if n > 0}
    ratio = (max(present.values()) / min(present.values())) if present else None
    return {"counts": {lab: counts.get(lab, 0) for lab in labels},
            "imbalance_ratio": round(ratio, 2) if ratio is not None else None,
            "missing_labels": [lab for lab in labels if counts.get(lab, 0) == 0]}


def balance_report(project) -> dict:
    """Counts per group (label / stated-field combination) per split, the train skew (largest /
    smallest group) before and after oversampling. Teacher paraphrases (`curate augment`) count
    only after: "before" is the data as labelled."""
    from stillroom.curate.augment import augmented_ids
    from stillroom.curate.datasets import curated_rows
    from stillroom.curate.review import training_labels
    from stillroom.curate.split import stratum_of
    from stillroom.store.records import split_assignments

    task = project.task
    with project.store.engine.connect() as conn:
        train_labels, _ = training_labels(conn, task=task)
        splits = split_assignments(conn)
        augmented = augmented_ids(conn)
    per_split: dict[str, Counter] = defaultdict(Counter)
    for ex, label in train_labels.items():
        if ex in splits and ex not in augmented:
            per_split[splits[ex]][stratum_of(task, label)] += 1
    rows = curated_rows(project)
    after = Counter()
    for r in rows:
        if r.split == "train":
            after[stratum_of(task, r.label)] += r.copies
    cfg = project.config.curation.balance
    if task.type == "classification":
        labels = task.labels
    else:
        labels = sorted(set(after) | {g for c in per_split.values() for g in c})
    grouping = {"classification": "label", "extraction": "fields stated",
                "generation": "none (free text has no classes; only flagged_copies applies)"}[task.type]
    return {
        "grouped_by": grouping,
        "splits": {s: dict(sorted(c.items())) for s, c in sorted(per_split.items())},
        "train_before": _skew(per_split.get("train", Counter()), labels),
        "train_after_oversampling": _skew(after, labels),
        "config": cfg.model_dump(),
        "oversampled_rows": sum(r.copies - 1 for r in rows),
        "augmented_rows": sum(r.copies for r in rows if r.augmented_from is not None),
    }

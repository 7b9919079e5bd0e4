"""Stratified split into train / validation / calibration / eval.

Assignments are sticky: an example keeps its split forever, so re-running after importing more data
only places the new examples, and once the eval split is locked new examples never enter it.
Human-labelled examples fill the eval split first (`split.human_labelled_to_eval`): they are the
gold set that can tell a teacher mistake from a student mistake. Teacher paraphrases
(`curate augment`) are train-only: they never enter another split, nor count towards the sizes.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import insert, update

from stillroom.project import Project
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import all_examples, human_labels, split_assignments, teacher_labels

SPLITS = ("train", "validation", "calibration", "eval")


def stratum_of(task, answer: str) -> str:
    """The group an answer is stratified (and sampled, and balanced) by: the label
    (classification), the sorted set of top-level fields the record states (extraction), or one
    group for all (generation: free text has no classes)."""
    if task is None or task.type == "classification":
        return answer
    if task.type == "extraction":
        import json

        try:
            record = json.loads(answer)
        except ValueError:
            return "(not a record)"
        stated = sorted(k for k, v in record.items() if v not in (None, "", [], {})) if isinstance(record, dict) else []
        return "+".join(stated) or "(nothing stated)"
    return "(all)"


@dataclass
class SplitReport:
    assigned: dict[str, int]
    total: dict[str, int]
    unlabelled_skipped: int
    eval_locked: bool

    def as_dict(self) -> dict:
        return {"assigned_now": self.assigned, "total": self.total,
                "unlabelled_skipped": self.unlabelled_skipped, "eval_locked": self.eval_locked}


def _allocate(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder allocation of n items over fractions that sum to 1."""
    total = sum(fractions.values())
    exact = {k: n * v / total for k, v in fractions.items()} if total > 0 else {k: 0.0 for k in fractions}
    counts = {k: int(v) for k, v in exact.items()}
    order = sorted(fractions, key=lambda k: (exact[k] - counts[k], fractions[k]), reverse=True)
    for k in order[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _stratified(ids: list[int], labels: dict[int, str], fractions: dict[str, float],
                rng: random.Random, task=None) -> dict[int, str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in ids:
        groups[stratum_of(task, labels[i])].append(i)
    out: dict[int, str] = {}
    for label in sorted(groups):
        members = sorted(groups[label])
        rng.shuffle(members)
        counts = _allocate(len(members), fractions)
        pos = 0
        for split in fractions:
            for i in members[pos: pos + counts[split]]:
                out[i] = split
            pos += counts[split]
    return out


def split_project(project: Project, eval_locked: bool | None = None) -> SplitReport:
    """Assign every teacher-labelled, not yet assigned example to a split."""
    from stillroom.curate.augment import augmented_ids
    from stillroom.curate.lock import active_lock

    cfg = project.config.split
    fractions = {"train": cfg.train, "validation": cfg.validation, "calibration": cfg.calibration, "eval": cfg.eval}
    rng = random.Random(cfg.seed)
    with project.store.engine.begin() as conn:
        if eval_locked is None:
            eval_locked = active_lock(conn) is not None
        labels = teacher_labels(conn)
        humans = human_labels(conn)
        existing = split_assignments(conn)
        examples = all_examples(conn)
        augmented = augmented_ids(conn)
        todo = sorted(i for i in labels if i not in existing and i not in augmented)
        unlabelled = sum(1 for i in examples if i not in labels and i not in existing and i not in augmented)
        # A paraphrase in validation, calibration or eval would score the student on a rewrite of its
        # own training data; they are created in train, and one that somehow lacks a split goes there.
        forced = {i: "train" for i in sorted(augmented) if i not in existing}

        assignment: dict[int, str] = {}
        if eval_locked:
            rest = {k: v for k, v in fractions.items() if k != "eval"}
            assignment = _stratified(todo, labels, rest, rng, project.task)
        else:
            n_total = sum(1 for i in existing if i not in augmented) + len(todo)
            eval_target = round(cfg.eval * n_total) - sum(1 for s in existing.values() if s == "eval")
            pool = todo
            if cfg.human_labelled_to_eval and eval_target > 0:
                gold = sorted(i for i in todo if i in humans)
                rng.shuffle(gold)
                for i in gold[:eval_target]:
                    assignment[i] = "eval"
                eval_target -= len(assignment)
                pool = [i for i in todo if i not in assignment]
            if pool:
                e = min(max(eval_target, 0) / len(pool), 1.0)
                scale = (1 - e) / (1 - cfg.eval)
                adjusted = {k: (v * scale if k != "eval" else e) for k, v in fractions.items()}
                assignment.update(_stratified(pool, labels, adjusted, rng, project.task))

        assignment.update(forced)
        if assignment:
            conn.execute(
                insert(T.splits),
                [{"example_id": i, "split": s, "seed": cfg.seed, "created_at": now()} for i, s in sorted(assignment.items())],
            )
        final = {**existing, **assignment}
    assigned = {s: sum(1 for v in assignment.values() if v == s) for s in SPLITS}
    total = {s: sum(1 for v in final.values() if v == s) for s in SPLITS}
    if any(v == "excluded" for v in final.values()):
        total["excluded"] = sum(1 for v in final.values() if v == "excluded")
    return SplitReport(assigned, total, unlabelled, bool(eval_locked))


def exclude_examples(project: Project, example_ids: list[int]) -> int:
    """Take examples out of training (split 'excluded'), e.g. near-copies of locked eval inputs."""
    with project.store.engine.begin() as conn:
        res = conn.execute(
            update(T.splits)
            .where(T.splits.c.example_id.in_(example_ids), T.splits.c.split != "eval")
            .values(split="excluded")
        )
    return res.rowcount

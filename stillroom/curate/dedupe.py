"""Exact and near-duplicate detection with MiniLM embeddings: within the training data, and between
training and the eval set (leakage beyond the exact / case-folded check of `lock.find_leaks`).

Embeddings are L2-normalised, so cosine similarity is a dot product; pairs above the threshold are
found with blockwise matrix products (memory stays bounded, ~50k examples is fine on a CPU).
Embeddings are cached per content hash in the store, so a re-run embeds only new inputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import insert, select

from stillroom.errors import StillroomError
from stillroom.store import tables as T
from stillroom.store.db import now

__all__ = ["cached_embeddings", "pairs_above", "find_near_duplicates", "apply_dedupe", "DedupeReport", "DedupeError"]

MODEL = "all-MiniLM-L6-v2"
DIM = 384
BLOCK_FLOATS = 1 << 24  # one similarity block: 16M floats, 64 MiB
TOLERANCE = 1e-6  # an input equal to another scores 0.99999994, not 1.0


class DedupeError(StillroomError):
    """A dedupe request that cannot run as asked; the message says why."""


def cached_embeddings(engine, texts: dict[str, str], progress: Callable[[int, int], None] | None = None):
    """{content hash: text} -> ({hash: row}, matrix, embedded now); only texts not in the cache are
    embedded, outside any transaction (minutes for a large set), then written to the cache."""
    import numpy as np

    cache = T.TABLES["embedding_cache"]
    vectors: dict[str, object] = {}
    wanted = set(texts)
    with engine.connect() as conn:
        for h, blob in conn.execute(select(cache.c.content_hash, cache.c.vector).where(cache.c.model == MODEL)):
            if h in wanted:
                vectors[h] = np.frombuffer(blob, dtype=np.float32)
    missing = sorted(wanted - vectors.keys())
    if missing:
        from stillroom.train.encoder import embed

        fresh = embed([texts[h] for h in missing], progress=progress).astype(np.float32)
        for h, v in zip(missing, fresh):
            vectors[h] = v
        with engine.begin() as conn:
            # Another run may have cached some meanwhile: write only what is still missing.
            have = {h for (h,) in conn.execute(select(cache.c.content_hash).where(cache.c.model == MODEL))}
            todo = [h for h in missing if h not in have]
            for start in range(0, len(todo), 1000):
                conn.execute(insert(cache), [{"content_hash": h, "model": MODEL, "vector": vectors[h].tobytes()}
                                             for h in todo[start:start + 1000]])
    order = sorted(texts)
    matrix = np.stack([vectors[h] for h in order]) if order else np.zeros((0, DIM), dtype=np.float32)
    return {h: i for i, h in enumerate(order)}, matrix, len(missing)


def pairs_above(A, B, threshold: float, same: bool = False, block_floats: int = BLOCK_FLOATS):
    """(i, j, score) arrays for rows with A[i] . B[j] >= threshold; with `same` (A is B) only i < j."""
    import numpy as np

    n, m = len(A), len(B)
    out_i, out_j, out_s = [], [], []
    rows = max(1, min(n, block_floats // max(m, 1)))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        col0 = start if same else 0  # the lower triangle repeats the upper one
        S = A[start:stop] @ B[col0:].T
        if same:
            S[np.arange(stop - start)[:, None] >= np.arange(m - col0)[None, :]] = -1.0
        ii, jj = np.nonzero(S >= threshold - TOLERANCE)
        out_i.append(ii + start)
        out_j.append(jj + col0)
        out_s.append(S[ii, jj])
    if not out_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


@dataclass
class Pair:
    a: int  # example id (training side)
    b: int  # example id (eval side, or the other training example)
    score: float
    exact: bool  # equal after case/space folding
    a_label: str | None
    b_label: str | None
    a_input: str
    b_input: str


@dataclass
class DedupeReport:
    threshold: float
    training_splits: tuple[str, ...]
    n_training: int
    n_eval: int
    leaks: list[Pair]  # a = training example, b = eval example
    within: list[Pair]  # a < b, both training
    clusters: list[list[int]]  # connected near-duplicate groups inside training, each sorted
    keep: dict[int, int] = field(default_factory=dict)  # cluster index -> the example kept
    conflicting: list[list[int]] = field(default_factory=list)  # clusters with a label that disagrees (task.agrees)
    embedded_now: int = 0
    from_cache: int = 0
    seconds: float = 0.0

    def leaking_training_ids(self) -> list[int]:
        return sorted({p.a for p in self.leaks})

    def eval_with_near_duplicate(self) -> list[int]:
        return sorted({p.b for p in self.leaks})

    def duplicate_ids(self) -> list[int]:
        """Training examples that duplicate a kept one (the rest of each cluster)."""
        return sorted(ex for k, c in enumerate(self.clusters) for ex in c if ex != self.keep[k])

    def as_dict(self, max_examples: int = 20) -> dict:
        def show(pairs):
            return [{"example_id": p.a, "other_id": p.b, "score": round(p.score, 4), "exact": p.exact,
                     "input": p.a_input, "other_input": p.b_input, "label": p.a_label, "other_label": p.b_label}
                    for p in sorted(pairs, key=lambda p: -p.score)[:max_examples]]
        return {
            "threshold": self.threshold, "training_splits": list(self.training_splits),
            "training_examples": self.n_training, "eval_examples": self.n_eval,
            "leakage": {"training_examples": len(self.leaking_training_ids()),
                        "eval_examples_with_near_duplicate": len(self.eval_with_near_duplicate()),
                        "pairs": len(self.leaks), "exact_pairs": sum(p.exact for p in self.leaks),
                        "examples": show(self.leaks)},
            "within_training": {"pairs": len(self.within), "exact_pairs": sum(p.exact for p in self.within),
                                "clusters": len(self.clusters), "duplicates_to_exclude": len(self.duplicate_ids()),
                                "clusters_with_conflicting_labels": len(self.conflicting),
                                "examples": show(self.within)},
            "embedded_now": self.embedded_now, "from_cache": self.from_cache, "seconds": round(self.seconds, 2),
        }


def _clusters(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for a, b in pairs:
        for x in (a, b):
            groups.setdefault(find(x), []).append(x)
    return [sorted(set(g)) for g in groups.values()]


def find_near_duplicates(project, threshold: float | None = None,
                         training_splits: tuple[str, ...] = ("train", "validation"),
                         progress: Callable[[int, int], None] | None = None) -> DedupeReport:
    """Near-duplicate pairs inside the training splits and between them and the eval split."""
    from stillroom.curate.augment import augmented_ids
    from stillroom.curate.review import training_labels

    started = time.perf_counter()
    threshold = project.config.curation.dedupe.threshold if threshold is None else threshold
    if not 0 < threshold <= 1:
        raise DedupeError(f"--threshold must be in (0, 1], got {threshold}")
    with project.store.engine.connect() as conn:
        rows = conn.execute(
            select(T.examples.c.id, T.examples.c.input, T.examples.c.content_hash, T.examples.c.norm_hash,
                   T.splits.c.split).join(T.splits, T.splits.c.example_id == T.examples.c.id)
            .order_by(T.examples.c.id)).all()
        teacher, source = training_labels(conn)
        # Teacher paraphrases are near-copies of their parent by design, and were checked against the
        # eval and calibration inputs when they were made (curate/augment.py).
        augmented = augmented_ids(conn)
        # Discarded examples (review) no longer train: they are nobody's duplicate.
        train = [r for r in rows if r.split in training_splits and r.id in teacher and r.id not in augmented]
        evals = [r for r in rows if r.split == "eval"]
    texts = {r.content_hash: r.input for r in train + evals}
    index, matrix, embedded = cached_embeddings(project.store.engine, texts, progress)
    Et = matrix[[index[r.content_hash] for r in train]] if train else matrix[:0]
    Ee = matrix[[index[r.content_hash] for r in evals]] if evals else matrix[:0]

    def pair(a, b, score) -> Pair:
        return Pair(a.id, b.id, float(score), a.norm_hash == b.norm_hash, teacher.get(a.id), teacher.get(b.id),
                    a.input, b.input)

    ii, jj, ss = pairs_above(Et, Ee, threshold)
    leaks = [pair(train[i], evals[j], s) for i, j, s in zip(ii.tolist(), jj.tolist(), ss.tolist())]
    ii, jj, ss = pairs_above(Et, Et, threshold, same=True)
    within = [pair(train[i], train[j], s) for i, j, s in zip(ii.tolist(), jj.tolist(), ss.tolist())]
    clusters = [[train[i].id for i in c] for c in _clusters(len(train), list(zip(ii.tolist(), jj.tolist())))]
    clusters.sort()

    # Which example of a cluster stays: not an eval near-copy (it leaves anyway), then one a reviewer
    # labelled, then one in train (a validation copy of a training row only inflates validation
    # agreement), then the oldest.
    split_of = {r.id: r.split for r in train}
    leaking = {p.a for p in leaks}
    keep = {k: min(c, key=lambda ex: (ex in leaking, source.get(ex) != "review", split_of[ex] != "train", ex))
            for k, c in enumerate(clusters)}
    # A conflict is a member whose label does not agree with the kept one's by the task's own test
    # (classification exact, extraction field by field, generation a score at the threshold): two
    # wordings of one good summary are not a conflict.
    task = project.task
    conflicting = [c for k, c in enumerate(clusters)
                   if any(not task.agrees(teacher[ex], teacher[keep[k]]) for ex in c if ex != keep[k])]
    return DedupeReport(threshold, tuple(training_splits), len(train), len(evals), leaks, within, clusters, keep,
                        conflicting, embedded, len(texts) - embedded, time.perf_counter() - started)


def apply_dedupe(project, report: DedupeReport, exclude_train_duplicates: bool | None = None) -> dict:
    """Take near-copies of eval inputs out of training, and (by default) all but one example of each
    near-duplicate cluster; the reasons are recorded in `exclusions`, conflicting clusters flagged."""
    from stillroom.curate.review import flag_for_review
    from stillroom.curate.split import exclude_examples

    if exclude_train_duplicates is None:
        exclude_train_duplicates = project.config.curation.dedupe.exclude_train_duplicates
    best_leak: dict[int, Pair] = {}
    for p in report.leaks:
        if p.a not in best_leak or p.score > best_leak[p.a].score:
            best_leak[p.a] = p
    reasons: dict[int, tuple[str, dict]] = {
        ex: ("eval_near_duplicate", {"eval_example_id": p.b, "score": round(p.score, 4), "threshold": report.threshold})
        for ex, p in best_leak.items()}
    if exclude_train_duplicates:
        for k, cluster in enumerate(report.clusters):
            for ex in cluster:
                if ex != report.keep[k] and ex not in reasons:
                    reasons[ex] = ("train_near_duplicate", {"kept_example_id": report.keep[k],
                                                            "cluster_size": len(cluster), "threshold": report.threshold})
    excluded = exclude_examples(project, sorted(reasons)) if reasons else 0
    flagged = 0
    table = T.TABLES["exclusions"]
    with project.store.engine.begin() as conn:
        if reasons:
            conn.execute(insert(table), [{"example_id": ex, "reason": r, "detail": json.dumps(d), "created_at": now()}
                                         for ex, (r, d) in sorted(reasons.items())])
        for cluster in report.conflicting:
            for ex in cluster:
                flagged += flag_for_review(conn, ex, f"near-duplicates {cluster} carry different labels", "dedupe")
    by_reason = {"eval_near_duplicate": 0, "train_near_duplicate": 0}
    for r, _ in reasons.values():
        by_reason[r] += 1
    return {"excluded": excluded, "by_reason": by_reason, "flagged_for_review": flagged}

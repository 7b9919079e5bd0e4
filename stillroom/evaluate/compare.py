"""Compare two evaluation sources on the locked eval set with a paired significance test.

A *source* is anything that answers the eval inputs: a student's newest run (`encoder`), a given
run (`encoder@run12`), or, once exports exist, one artifact of a student (`encoder@q8_0`). Sources
are resolved through `SOURCE_KINDS` ("kind" -> "module:function"), looked up lazily, so the export
stage plugs in artifacts by adding one entry; the function has the signature

    fn(project, student: str, qualifier: str, rows: list[tuple[Example, str]]) -> dict[int, str]

and returns a label per eval example id.

Classification uses McNemar's test on the discordant pairs (exact binomial below
`EXACT_BELOW` discordant examples, chi-square with continuity correction otherwise); extraction and
generation (graded scores; an answer the task cannot parse scores 0) use a paired bootstrap.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass

from sqlalchemy import insert, select

from stillroom.errors import StillroomError
from stillroom.evaluate.bootstrap import DEFAULT_RESAMPLES, paired_gap_ci

__all__ = ["CompareError", "mcnemar", "compare_predictions", "resolve_source", "compare_sources", "SOURCE_KINDS"]

EXACT_BELOW = 25  # discordant pairs: the chi-square approximation is poor below this
SOURCE_KINDS: dict[str, str] = {
    "run": "stillroom.evaluate.compare:run_predictions",
    "artifact": "stillroom.train.artifacts:artifact_predictions",
}
_RUN = re.compile(r"^run:?(\d+)$")


class CompareError(StillroomError):
    """Two sources cannot be compared (unknown source, nothing in common); the message says why."""


def mcnemar(b: int, c: int) -> dict:
    """McNemar's test of equal error rates from the discordant counts: `b` examples only the first
    source gets right, `c` only the second. Two-sided p-value."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts cannot be negative")
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "n_discordant": 0, "method": "none", "statistic": None, "p_value": 1.0}
    if n < EXACT_BELOW:
        # Under H0 each discordant pair is a fair coin: P = 2 * P(X <= min(b, c)), X ~ Binomial(n, 1/2).
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
        return {"b": b, "c": c, "n_discordant": n, "method": "exact binomial", "statistic": None,
                "p_value": min(1.0, 2 * tail)}
    statistic = (abs(b - c) - 1) ** 2 / n
    p = math.erfc(math.sqrt(statistic / 2))  # chi-square survival function with 1 degree of freedom
    return {"b": b, "c": c, "n_discordant": n, "method": "chi-square, continuity corrected",
            "statistic": statistic, "p_value": p}


def _binary(scores: list[float]) -> bool:
    return all(s in (0.0, 1.0) for s in scores)


def compare_predictions(a: dict, b: dict, reference: dict, score=None, n_resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0, names: tuple[str, str] = ("A", "B"), test: str | None = None) -> dict:
    """Compare two sources' answers (example id -> answer) against a reference (example id -> answer)
    on the examples all three have. `score(prediction, reference)` defaults to exact match. `test`:
    "mcnemar" (needs 0/1 scores), "bootstrap", or None to pick McNemar when every score is 0 or 1."""
    if test not in (None, "mcnemar", "bootstrap"):
        raise ValueError(f"test must be 'mcnemar', 'bootstrap' or None, got {test!r}")
    score = score or (lambda p, r: 1.0 if p == r else 0.0)
    common = [i for i in reference if i in a and i in b]
    if not common:
        raise CompareError(f"{names[0]} and {names[1]} answered none of the same reference examples")
    sa = [float(score(a[i], reference[i])) for i in common]
    sb = [float(score(b[i], reference[i])) for i in common]
    result = {
        "names": list(names), "n": len(common),
        "missing": {names[0]: sum(i not in a for i in reference), names[1]: sum(i not in b for i in reference)},
        "a_score": sum(sa) / len(common), "b_score": sum(sb) / len(common),
        # a minus b in points, with a paired bootstrap interval (paired_gap_ci computes first - second)
        "difference": paired_gap_ci(sa, sb, n_resamples, seed),
    }
    binary = _binary(sa) and _binary(sb)
    if test == "mcnemar" and not binary:
        raise CompareError("McNemar's test needs right/wrong (0/1) scores; these are graded: use the paired bootstrap")
    if test != "bootstrap" and binary:
        table = {"both_right": 0, "a_only": 0, "b_only": 0, "both_wrong": 0}
        for x, y in zip(sa, sb):
            key = "both_right" if x and y else "a_only" if x else "b_only" if y else "both_wrong"
            table[key] += 1
        result["table"] = table
        result["test"] = mcnemar(table["a_only"], table["b_only"])
    else:
        diff = result["difference"]
        # Two-sided bootstrap p-value: how often the resampled difference falls on the other side of 0.
        result["test"] = {"method": "paired bootstrap", "p_value": _bootstrap_p(sa, sb, n_resamples, seed),
                          "statistic": diff["estimate"]}
    return result


def _bootstrap_p(sa: list[float], sb: list[float], n_resamples: int, seed: int) -> float:
    import numpy as np

    d = np.asarray(sa) - np.asarray(sb)
    if not d.any():
        return 1.0
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


# ---- sources ---------------------------------------------------------------------------------


@dataclass
class Source:
    spec: str
    student: str
    qualifier: str | None
    predictions: dict[int, str]


def run_predictions(project, student: str, qualifier: str | None, rows) -> dict[int, str]:
    """A training run's answers on the eval rows: recorded predictions where there are some, the
    rest predicted now (and recorded). `qualifier` None: the newest finished run."""
    from stillroom.evaluate.evaluator import load_run_student
    from stillroom.store import tables as T
    from stillroom.store.db import now
    from stillroom.store.records import latest_run

    with project.store.engine.connect() as conn:
        if qualifier is None:
            run = latest_run(conn, student)
            if run is None:
                raise CompareError(f"student '{student}' has not been trained; run `stillroom train {student}`")
        else:
            found = conn.execute(select(T.training_runs).where(
                T.training_runs.c.id == int(_RUN.match(qualifier).group(1)),
                T.training_runs.c.student == student, T.training_runs.c.status == "finished")).first()
            if found is None:
                raise CompareError(f"'{student}@{qualifier}': no finished training run {qualifier} of '{student}'")
            run = dict(found._mapping)
        recorded = conn.execute(
            select(T.predictions.c.example_id, T.predictions.c.label)
            .where(T.predictions.c.run_id == run["id"]).order_by(T.predictions.c.id)
        ).all()
    answers = {ex: label for ex, label in recorded}  # the newest per example wins
    todo = [(ex, label) for ex, label in rows if ex.id not in answers]
    if todo:
        model = load_run_student(project, student, run)
        preds = model.predict([ex.input for ex, _ in todo])
        created = now()
        with project.store.engine.begin() as conn:
            conn.execute(insert(T.predictions), [
                {"run_id": run["id"], "example_id": ex.id, "label": p.label, "confidence": p.confidence,
                 "created_at": created} for (ex, _), p in zip(todo, preds)])
        answers.update({ex.id: p.label for (ex, _), p in zip(todo, preds)})
    return {ex.id: answers[ex.id] for ex, _ in rows}


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def resolve_source(project, spec: str, rows) -> Source:
    """`student`, `student@runID`, or `student@QUALIFIER` for a registered source kind."""
    student, _, qualifier = spec.partition("@")
    project.config.student(student)  # UnknownStudent names the students that exist
    qualifier = qualifier or None
    if qualifier is None or _RUN.match(qualifier):
        kind = "run"
    elif "artifact" in SOURCE_KINDS:
        kind = "artifact"
    else:
        raise CompareError(f"unknown evaluation source '{spec}': use '{student}' (its newest run) or "
                           f"'{student}@runID' (a given training run); artifact sources arrive with exports")
    return Source(spec, student, qualifier, _resolve(SOURCE_KINDS[kind])(project, student, qualifier, rows))


def compare_sources(project, spec_a: str, spec_b: str) -> dict:
    """Both sources on the locked eval set, against the teacher and, where present, human labels."""
    from stillroom.curate.lock import verify_lock
    from stillroom.evaluate.metrics import example_score
    from stillroom.store.records import human_labels, split_rows

    lock = verify_lock(project)
    with project.store.engine.connect() as conn:
        rows = split_rows(conn, "eval")
        humans = human_labels(conn)
    if not rows:
        raise CompareError("the eval split has no teacher-labelled examples")
    a = resolve_source(project, spec_a, rows)
    b = resolve_source(project, spec_b, rows)
    gate = project.config.gate
    task = project.task
    # The rule: McNemar for classification; graded task types use the paired bootstrap.
    kw = {"score": lambda p, r: example_score(task, p, r), "n_resamples": gate.bootstrap_resamples,
          "seed": gate.bootstrap_seed, "names": (spec_a, spec_b),
          "test": "mcnemar" if task.type == "classification" else "bootstrap"}
    teacher = {ex.id: label for ex, label in rows}
    human = {ex.id: humans[ex.id] for ex, _ in rows if ex.id in humans}
    return {
        "a": spec_a, "b": spec_b, "lock_id": lock.id, "lock_sha256": lock.manifest_sha256,
        "vs_teacher": compare_predictions(a.predictions, b.predictions, teacher, **kw),
        "vs_human": compare_predictions(a.predictions, b.predictions, human, **kw) if human else None,
        "vs_human_message": None if human else "no human labels on the eval split: compared against the teacher only",
    }

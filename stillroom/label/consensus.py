"""From n teacher answers to one label: parse each with the task, vote, score the agreement.

The task decides what a valid answer is (`task.parse` raises `ParseError` otherwise); an invalid
answer is kept with its reason and does not vote, but counts as dissent in the agreement. How the
valid answers combine depends on the task type:

- classification: the majority label; a tie for first place gives no label.
- extraction: a field-wise vote. Each top-level field of the schema takes the value most answers
  gave it (a missing or null field is a vote for "not stated"; strings vote case- and
  space-folded, the first spelling seen is kept); the record of the winners is the consensus if it
  is valid for the schema, else the most common whole record. Agreement is the mean, over the
  fields any answer states, of the share of answers that gave the winning value.
- generation: the medoid, the answer with the highest mean `task.score` against the other
  answers. Agreement is the mean pairwise score (an invalid answer scores 0 against any other).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from stillroom.tasks.base import ParseError, normalize

__all__ = ["Consensus", "Vote", "decide", "parse_votes"]


@dataclass
class Vote:
    """One teacher answer: its parsed value, or why it is not a valid answer. `ref` says which
    answer it is (the labeling engine uses the call's request hash)."""

    ref: object
    output: str
    value: str | None
    error: str | None = None


@dataclass
class Consensus:
    label: str | None  # None: no valid answer, or a tie for first place
    agreement: float | None  # share of the answers that gave `label` (invalid answers count as dissent)
    answers: int
    valid: int
    counts: dict[str, int] = field(default_factory=dict)
    flag: str | None = None  # tie | low_agreement | no_valid_answer
    ref: object = None  # the first answer that gave the label (None: a combination no answer gave whole)
    detail: str | None = None  # how an extraction / generation vote went, for the review queue

    def describe(self) -> str:
        if self.detail is not None:
            invalid = self.answers - self.valid
            return self.detail + (f", {invalid} invalid" if invalid else "") + f" of {self.answers} answers"
        votes = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        invalid = self.answers - self.valid
        return f"votes {{{votes}}}" + (f", {invalid} invalid" if invalid else "") + f" of {self.answers} answers"


def _canonical(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def parse_votes(task, answers: list[tuple[object, str]]) -> list[Vote]:
    """Parse (ref, output) pairs with the task; a ParseError makes an invalid vote."""
    votes = []
    for ref, output in answers:
        try:
            votes.append(Vote(ref, output, _canonical(task.parse(output))))
        except ParseError as exc:
            votes.append(Vote(ref, output, None, str(exc)))
    return votes


def decide(votes: list[Vote], min_agreement: float, task=None) -> Consensus:
    """The vote for the task's type (classification when `task` is None). Agreement below
    `min_agreement` gives the answer but flags it `low_agreement` for review."""
    kind = getattr(task, "type", "classification")
    if kind == "extraction":
        return _field_vote(votes, min_agreement, task)
    if kind == "generation":
        return _medoid(votes, min_agreement, task)
    return _majority(votes, min_agreement)


def _majority(votes: list[Vote], min_agreement: float) -> Consensus:
    """Majority vote; a tie for first place gives no label."""
    valid = [v for v in votes if v.value is not None]
    counts = Counter(v.value for v in valid)
    if not counts:
        return Consensus(None, None, len(votes), 0, {}, "no_valid_answer")
    ranked = counts.most_common()
    top, top_n = ranked[0]
    agreement = top_n / len(votes)
    if len(ranked) > 1 and ranked[1][1] == top_n:
        return Consensus(None, agreement, len(votes), len(valid), dict(counts), "tie")
    first = next(v.ref for v in valid if v.value == top)
    flag = "low_agreement" if agreement < min_agreement else None
    return Consensus(top, agreement, len(votes), len(valid), dict(counts), flag, first)


NOT_STATED = "\x00not stated"


def _stated(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _vote_key(value) -> str:
    """Equal votes for a field: strings case- and space-folded, everything else by canonical JSON."""
    def fold(v):
        if isinstance(v, str):
            return normalize(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)  # 12 and 12.0 are one vote
        if isinstance(v, dict):
            return {k: fold(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fold(x) for x in v]
        return v

    return json.dumps(fold(value), sort_keys=True, ensure_ascii=False) if _stated(value) else NOT_STATED


def _field_vote(votes: list[Vote], min_agreement: float, task) -> Consensus:
    valid = [v for v in votes if v.value is not None]
    counts = Counter(v.value for v in valid)
    if not valid:
        return Consensus(None, None, len(votes), 0, {}, "no_valid_answer")
    records = [json.loads(v.value) for v in valid]
    fields = list(dict.fromkeys([*task.fields, *(k for r in records for k in r)]))
    winners: dict[str, object] = {}
    for name in fields:
        tally: Counter = Counter()
        first: dict[str, object] = {}
        for r in records:
            key = _vote_key(r.get(name))
            tally[key] += 1
            first.setdefault(key, r.get(name))
        top = max(tally.values())
        tied = [k for k in tally if tally[k] == top]  # in order of first appearance
        # A tie never guesses: "not stated" wins it if it is among the tied, else the first answer's value.
        key = NOT_STATED if NOT_STATED in tied else tied[0]
        if key != NOT_STATED:
            winners[name] = first[key]
    how = "field-wise vote"
    try:
        label = task.parse(_canonical(winners))
    except ParseError:
        # The per-field winners do not make a valid record together: the most common whole record.
        label = counts.most_common(1)[0][0]
        how = "most common record (the field-wise winners do not fit the schema)"
    chosen = json.loads(label)
    shares = {}
    for name in fields:
        if not any(_stated(r.get(name)) for r in records):
            continue  # no answer states it: agreeing on silence says nothing
        key = _vote_key(chosen.get(name))
        shares[name] = sum(_vote_key(r.get(name)) == key for r in records) / len(votes)
    agreement = sum(shares.values()) / len(shares) if shares else len(valid) / len(votes)
    ref = next((v.ref for v in valid if v.value == label), None)
    flag = "low_agreement" if agreement < min_agreement else None
    detail = how + " {" + ", ".join(f"{k}: {s:.2f}" for k, s in shares.items()) + "}"
    return Consensus(label, agreement, len(votes), len(valid), dict(counts), flag, ref, detail)


def _medoid(votes: list[Vote], min_agreement: float, task) -> Consensus:
    valid = [v for v in votes if v.value is not None]
    counts = Counter(v.value for v in valid)
    if not valid:
        return Consensus(None, None, len(votes), 0, {}, "no_valid_answer")
    n = len(votes)
    if n == 1:
        return Consensus(valid[0].value, 1.0, 1, 1, dict(counts), None, valid[0].ref, "one answer")
    score: dict[tuple[int, int], float] = {}
    for i, j in combinations(range(n), 2):
        a, b = votes[i].value, votes[j].value
        score[i, j] = score[j, i] = 0.0 if a is None or b is None else (1.0 if a == b else task.score(a, b))
    means = {i: sum(score[i, j] for j in range(n) if j != i) / (n - 1) for i in range(n) if votes[i].value is not None}
    best = max(means, key=lambda i: (means[i], -i))  # ties: the earliest answer
    agreement = sum(score[i, j] for i, j in combinations(range(n), 2)) / (n * (n - 1) / 2)
    flag = "low_agreement" if agreement < min_agreement else None
    detail = f"medoid (mean {task.metric} to the others {means[best]:.2f}, pairwise {agreement:.2f})"
    return Consensus(votes[best].value, agreement, n, len(valid), dict(counts), flag, votes[best].ref, detail)

"""From n teacher answers to one label: parse each with the task, vote, score the agreement.

The task decides what a valid answer is (`task.parse` raises `ParseError` otherwise); an invalid
answer is kept with its reason and does not vote. Answers vote by value, so a task whose parse
returns structured values (extraction) votes the same way once it returns something comparable.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from stillroom.tasks.base import ParseError

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
    ref: object = None  # the first answer that gave the label

    def describe(self) -> str:
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


def decide(votes: list[Vote], min_agreement: float) -> Consensus:
    """Majority vote. A tie for first place gives no label; agreement below `min_agreement` gives
    the label but flags it for review."""
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

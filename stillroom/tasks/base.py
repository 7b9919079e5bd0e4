"""What a task knows: render the teacher and student prompts, parse an output, score it.

A task's answer is always a string: a label (classification), the canonical JSON of one record
(extraction: sorted keys, no spaces), or the text itself (generation). So the store, the labeling
ledger, consensus, splits and the gateway handle every task type the same way; only `parse` and
`score` know what the string means.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

from stillroom.errors import StillroomError


def content_hash(text: str) -> str:
    """SHA-256 of the exact input text: an example's identity."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Case- and whitespace-folded form, used to catch near-identical eval/train leaks."""
    return _SPACE.sub(" ", text).strip().casefold()


def norm_hash(text: str) -> str:
    return content_hash(normalize(text))


class ParseError(StillroomError, ValueError):
    """A model output that is not a valid answer for the task; the message says why."""


def shorten(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


class Task(Protocol):
    """The contract every task type fulfils; `type` says which one it is."""

    name: str
    type: str  # classification | extraction | generation
    labels: list[str]  # the label set (classification); empty for the other types
    metric: str  # the per-example score `score` returns (accuracy, field_f1, exact_match, rouge_l, chrf)
    max_output_tokens: int  # an answer's token budget, for the teacher and the student

    def teacher_prompt(self, text: str) -> str: ...
    def student_input(self, text: str) -> str: ...
    def parse(self, output: str) -> str: ...  # canonical answer, or ParseError saying why not
    def score(self, prediction: str, reference: str) -> float: ...  # in [0, 1], the gated metric
    def agrees(self, prediction: str, reference: str) -> bool: ...  # yes/no, for routing and ECE
    def response_format(self) -> dict | None: ...  # OpenAI `response_format` for the teacher, if any

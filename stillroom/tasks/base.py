"""What a task knows: render the teacher and student prompts, parse an output, score it."""

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


class Task(Protocol):
    name: str

    def teacher_prompt(self, text: str) -> str: ...
    def student_input(self, text: str) -> str: ...
    def parse(self, output: str) -> str: ...
    def score(self, prediction: str, reference: str) -> float: ...

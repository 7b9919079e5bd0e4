"""The student contract: what every trained student can do once it is on disk."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Prediction:
    """One student answer: always a label from the task's label set, with its probability."""

    label: str
    confidence: float  # probability of `label`, in [0, 1]
    probs: dict[str, float] = field(default_factory=dict)  # every label -> probability (sums to 1)


@dataclass
class TrainResult:
    """What a training run leaves behind; `metrics` is recorded in the store."""

    path: Path  # folder holding the saved student (loadable with the student's `load`)
    metrics: dict  # e.g. {"val_agreement": 0.93, "train_seconds": 41.2, "train_tokens_per_s": 812.0}


class Student(Protocol):
    """A trained classifier student. Built-ins and plugins implement the same three members."""

    kind: str
    labels: list[str]

    def predict(self, texts: list[str]) -> list[Prediction]: ...

    @classmethod
    def load(cls, path: Path) -> "Student": ...

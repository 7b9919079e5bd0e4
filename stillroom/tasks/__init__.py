"""Task types: the single definition of a valid answer and of "agrees with the teacher"."""

from __future__ import annotations

from stillroom.config import TaskConfig
from stillroom.tasks.base import ParseError, Task

__all__ = ["make_task", "Task", "ParseError"]


def make_task(config: TaskConfig) -> Task:
    if config.type == "extraction":
        from stillroom.tasks.extraction import ExtractionTask

        return ExtractionTask(config)
    if config.type == "generation":
        from stillroom.tasks.generation import GenerationTask

        return GenerationTask(config)
    from stillroom.tasks.classification import ClassificationTask

    return ClassificationTask(config)

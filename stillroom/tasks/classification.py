"""Classification: one label from a fixed set. The single definition of "agrees with the teacher"."""

from __future__ import annotations

import re

from stillroom.config import TaskConfig
from stillroom.tasks.base import ParseError


class ClassificationTask:
    type = "classification"
    metric = "accuracy"

    def __init__(self, config: TaskConfig):
        self.config = config
        self.name = config.name
        self.labels = config.label_names
        self.max_output_tokens = config.output_tokens
        self._by_fold = {label.casefold(): label for label in self.labels}
        self._descriptions = "\n".join(
            f"- {l.name}: {l.description}" if l.description else f"- {l.name}" for l in config.labels
        )

    def teacher_prompt(self, text: str) -> str:
        return self.config.prompt_template.format(
            input=text, labels=", ".join(self.labels), label_descriptions=self._descriptions, schema=""
        )

    def student_input(self, text: str) -> str:
        return self.config.student_input_format.format(
            input=text, labels=", ".join(self.labels), label_descriptions=self._descriptions, schema=""
        )

    def response_format(self) -> dict | None:
        return None  # a label is short text; parse() maps the answer onto the label set

    def parse(self, output: str) -> str:
        """Map a model's answer to a label: exact (case-insensitive) after trimming quotes and
        punctuation, else the single label named as a whole word in the answer."""
        cleaned = output.strip().strip("`'\".:;,!*- \n\t").casefold()
        if cleaned in self._by_fold:
            return self._by_fold[cleaned]
        found = [
            label for fold, label in self._by_fold.items()
            if re.search(rf"(?<![\w-]){re.escape(fold)}(?![\w-])", output.casefold())
        ]
        if len(found) == 1:
            return found[0]
        shown = output if len(output) <= 80 else output[:77] + "..."
        if found:
            raise ParseError(f"answer {shown!r} names several labels ({', '.join(found)})")
        raise ParseError(f"answer {shown!r} is not one of the labels ({', '.join(self.labels)})")

    def score(self, prediction: str, reference: str) -> float:
        return 1.0 if prediction == reference else 0.0

    def agrees(self, prediction: str, reference: str) -> bool:
        return prediction == reference

"""Extraction: one JSON object per input, valid for the task's JSON schema.

The answer string is the record's canonical JSON (sorted keys, no spaces), so equal records are equal
strings everywhere (ledger, consensus, splits). Scoring compares records field by field: each record
flattens to a multiset of (field path, normalised value) pairs, where strings are case- and
space-folded, and null, "" and a missing field all mean "not stated".
"""

from __future__ import annotations

import json
import re
from collections import Counter

from stillroom.config import TaskConfig
from stillroom.tasks.base import ParseError, normalize, shorten

__all__ = ["ExtractionTask", "canonical_json", "record_fields", "field_overlap"]

_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
# A PII placeholder (curate/pii.py): a teacher that saw "[EMAIL]" in the input rightly answers it.
_PLACEHOLDER = re.compile(r"^\[[A-Z][A-Z0-9_]*\]$")
_STRING_CHECKS = {"pattern", "format", "minLength", "maxLength"}


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _scalar(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = normalize(str(value))
    return text or None


def record_fields(record: dict | str) -> Counter:
    """The (path, value) pairs a record states; nested objects give dotted paths, lists `path[]`."""
    if isinstance(record, str):
        record = json.loads(record)
    out: Counter = Counter()

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for item in value:
                walk(item, f"{path}[]")
        else:
            scalar = _scalar(value)
            if scalar is not None:
                out[(path, scalar)] += 1

    walk(record, "")
    return out


def field_overlap(prediction: str, reference: str) -> tuple[int, int, int]:
    """(matching pairs, pairs predicted, pairs in the reference) for one record."""
    pred, ref = record_fields(prediction), record_fields(reference)
    return sum((pred & ref).values()), sum(pred.values()), sum(ref.values())


def _placeholder_ok(error) -> bool:
    """A string-shape check (an email `pattern`, say) failed only because the value is a placeholder."""
    return (error.validator in _STRING_CHECKS and isinstance(error.instance, str)
            and bool(_PLACEHOLDER.match(error.instance)))


class ExtractionTask:
    type = "extraction"

    def __init__(self, config: TaskConfig):
        import jsonschema

        self.config = config
        self.name = config.name
        self.labels: list[str] = []
        self.schema = config.schema
        self.metric = config.gate_metric
        self.max_output_tokens = config.output_tokens
        self.fields = list(self.schema["properties"])
        self._validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        self._schema_text = json.dumps(self.schema, indent=2, ensure_ascii=False)

    def _render(self, template: str, text: str) -> str:
        return template.format(input=text, schema=self._schema_text, labels=", ".join(self.fields),
                               label_descriptions="")

    def teacher_prompt(self, text: str) -> str:
        return self._render(self.config.prompt_template, text)

    def student_input(self, text: str) -> str:
        return self._render(self.config.student_input_format, text)

    def response_format(self) -> dict:
        """OpenAI structured output: the endpoint constrains the teacher to the schema where it can."""
        name = re.sub(r"[^A-Za-z0-9_-]", "_", self.name)[:64] or "record"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": self.schema, "strict": False}}

    def parse(self, output: str) -> str:
        """The canonical JSON of the one object in `output` (code fences and text around it are
        tolerated), after validating it against the schema."""
        text = _FENCE.sub("", output.strip())
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            start, end = text.find("{"), text.rfind("}")
            try:
                value = json.loads(text[start : end + 1]) if 0 <= start < end else None
            except json.JSONDecodeError:
                value = None
            if value is None:
                raise ParseError(f"answer {shorten(output)!r} is not a JSON object") from None
        if not isinstance(value, dict):
            raise ParseError(f"answer {shorten(output)!r} is JSON but not an object")
        errors = [e for e in self._validator.iter_errors(value) if not _placeholder_ok(e)]
        error = next(iter(sorted(errors, key=lambda e: list(e.path))), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the record"
            raise ParseError(f"answer {shorten(output)!r} does not fit the schema at {where}: {error.message}")
        return canonical_json(value)

    def score(self, prediction: str, reference: str) -> float:
        """Per-record field F1 (the default metric) or exact match of the stated fields."""
        matched, predicted, expected = field_overlap(prediction, reference)
        if self.metric == "exact_match":
            return 1.0 if matched == predicted == expected else 0.0
        if predicted == expected == 0:
            return 1.0  # both say the text states nothing
        return 2 * matched / (predicted + expected)

    def agrees(self, prediction: str, reference: str) -> bool:
        """Every stated field right and nothing extra: the record could be used as is."""
        matched, predicted, expected = field_overlap(prediction, reference)
        return matched == predicted == expected

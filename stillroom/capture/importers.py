"""Import real inputs, with the teacher's (or a human's) answers where the file has them.

Formats:
- JSONL in OpenAI chat format: ``{"messages": [..., {"role": "user", ...}, {"role": "assistant", ...}]}``
  as in fine-tuning files and request logs; optional ``tags`` (list) and ``model`` fields.
  Plain ``{"input": ..., "output": ...}`` lines are accepted too.
- CSV with an input and an (optional) output column.

The output is the task's answer: a label, an extraction record (a JSON object, or its JSON text in
a chat message or a CSV cell) or a generation text. Each is parsed and canonicalised by
`task.parse` (records: sorted keys, validated against the schema; texts: within
`task.max_output_chars`); an output that fails is reported with its line and the reason.

The whole file is parsed before anything is written: with ``strict`` one bad line aborts with
nothing written; otherwise bad lines are skipped and reported by line number. Re-importing the
same file adds nothing (examples, responses and labels are keyed by content hashes).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stillroom.errors import StillroomError
from stillroom.project import Project
from sqlalchemy import insert

from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import add_label, add_response, get_or_add_example, response_hash, split_assignments
from stillroom.tasks.base import ParseError, content_hash

Role = Literal["teacher", "human"]
MAX_INPUT_CHARS = 100_000


class ImportFileError(StillroomError):
    """The file cannot be imported at all (missing, unreadable, wrong format, strict failure)."""


@dataclass
class Record:
    line: int
    input: str
    output: str | None
    tags: list[str] = field(default_factory=list)
    model: str | None = None


@dataclass
class ImportReport:
    path: str
    role: str
    lines: int = 0
    examples_added: int = 0
    examples_existing: int = 0
    responses_added: int = 0
    labels_added: int = 0
    unlabelled: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, message), line 0 = file

    def as_dict(self) -> dict:
        return {
            "path": self.path, "role": self.role, "lines": self.lines,
            "examples_added": self.examples_added, "examples_existing": self.examples_existing,
            "responses_added": self.responses_added, "labels_added": self.labels_added,
            "unlabelled": self.unlabelled,
            "problems": [{"line": line, "message": msg} for line, msg in self.problems],
        }


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if texts:
            return "\n".join(texts)
    raise ValueError(f"{where} has no text content")


def _output(value, objects: bool) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if objects and isinstance(value, dict):  # an extraction record written as JSON, not as a string
        return json.dumps(value, ensure_ascii=False)
    raise ValueError("'output' must be a string" + (" or a JSON object (the record)" if objects else ""))


def _from_json_obj(obj, line: int, objects: bool = False) -> Record:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    tags = obj.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("'tags' must be a list of strings")
    model = obj.get("model") if isinstance(obj.get("model"), str) else None
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"messages[{i}] must be an object with a 'role'")
        output = None
        if messages[-1]["role"] == "assistant":
            content = messages[-1].get("content")
            if objects and isinstance(content, dict):
                output = _output(content, objects)
            else:
                output = _text(content, f"messages[{len(messages) - 1}]")
            messages = messages[:-1]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("no user message to use as the input")
        text = _text(messages[users[-1]].get("content"), f"messages[{users[-1]}]")
        return Record(line, text, output, tags, model)
    if "input" in obj:
        if not isinstance(obj["input"], str):
            raise ValueError("'input' must be a string")
        return Record(line, obj["input"], _output(obj.get("output"), objects), tags, model)
    raise ValueError("expected a 'messages' list (OpenAI chat format) or an 'input' field")


def read_jsonl(data: str, objects: bool = False) -> tuple[list[Record], list[tuple[int, str]]]:
    """`objects`: an output may be a JSON object (extraction records)."""
    records, problems = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            records.append(_from_json_obj(json.loads(raw), number, objects))
        except json.JSONDecodeError as exc:
            problems.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
        except ValueError as exc:
            problems.append((number, str(exc)))
    return records, problems


def read_csv(data: str, input_column: str, output_column: str) -> tuple[list[Record], list[tuple[int, str]]]:
    reader = csv.DictReader(io.StringIO(data))
    header = reader.fieldnames or []
    if input_column not in header:
        raise ImportFileError(
            f"CSV has no '{input_column}' column (columns: {', '.join(header) or 'none'}); "
            "name it with --input-column"
        )
    has_output = output_column in header
    records, problems = [], []
    for row in reader:
        number = reader.line_num
        if None in row:
            problems.append((number, f"more fields than the header's {len(header)}"))
            continue
        text = row.get(input_column)
        output = row.get(output_column) if has_output else None
        records.append(Record(number, text if text is not None else "", output or None))
    return records, problems


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows "\ud800"; no database can store it
        return False
    return True


def read_text(path: Path, error: type[Exception]) -> str:
    """A UTF-8 file's text (a BOM is dropped); a missing or non-UTF-8 file raises `error` saying so."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def read_records(path: Path, input_column: str = "input", output_column: str = "output",
                 objects: bool = False) -> tuple[list[Record], list[tuple[int, str]]]:
    """Parse a JSONL or CSV file into records and (line, problem) pairs; writes nothing.
    `objects`: JSONL outputs may be JSON objects (extraction records)."""
    path = Path(path)
    data = read_text(path, ImportFileError)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(data, objects)
    if suffix in (".csv", ".tsv"):
        return read_csv(data, input_column, output_column)
    raise ImportFileError(f"{path}: unknown format '{suffix}'; use .jsonl (OpenAI chat format) or .csv")


def _check(records: list[Record], problems: list[tuple[int, str]]) -> list[Record]:
    good = []
    for r in records:
        bad_text = next((t for t in (r.input, r.output or "") if not _encodable(t)), None)
        if bad_text is not None:
            problems.append((r.line, "invalid Unicode (a lone surrogate escape such as \\ud800); fix the line"))
        elif not r.input.strip():
            problems.append((r.line, "empty input"))
        elif len(r.input) > MAX_INPUT_CHARS:
            problems.append((r.line, f"input is {len(r.input):,} characters; the limit is {MAX_INPUT_CHARS:,}"))
        else:
            good.append(r)
    return good


def import_file(
    project: Project,
    path: Path,
    role: Role = "teacher",
    strict: bool = False,
    input_column: str = "input",
    output_column: str = "output",
    split: str | None = None,
) -> ImportReport:
    """Import a JSONL or CSV file; outputs become teacher responses (or human labels with role='human').

    `split` pins the file's new examples to a split (e.g. a team's existing test set as `eval`);
    pinning into a locked eval split is refused."""
    path = Path(path)
    if split is not None:
        from stillroom.curate.split import SPLITS

        if split not in SPLITS:
            raise ImportFileError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    report = ImportReport(str(path), role)
    records, problems = read_records(path, input_column, output_column,
                                     objects=project.task.type == "extraction")
    report.lines = len(records) + len(problems)
    records = _check(records, problems)

    # Outputs must be valid answers: a human label that is not a label is an error; a teacher
    # answer that is not a label is kept as a response (for review) but gives no label.
    task = project.task
    parsed: list[tuple[Record, str | None]] = []
    for r in records:
        label = None
        if r.output is not None:
            try:
                label = task.parse(r.output)
            except ParseError as exc:
                problems.append((r.line, str(exc) + ("" if role == "teacher" else "; row skipped")))
                if role == "human":
                    continue
        elif role == "human":
            problems.append((r.line, "no output column value: a human label is required; row skipped"))
            continue
        parsed.append((r, label))
    problems.sort()
    report.problems = problems
    if strict and problems:
        raise ImportFileError(
            f"{path}: {len(problems)} problem(s), nothing imported (--strict):\n"
            + "\n".join(f"  line {line}: {msg}" for line, msg in problems[:20])
            + ("\n  ..." if len(problems) > 20 else "")
        )

    source = path.name
    model = project.config.teacher.model if role == "teacher" else "human"
    with project.store.engine.begin() as conn:  # one transaction: all of the file or nothing
        if split == "eval":
            from stillroom.curate.lock import active_lock

            if active_lock(conn) is not None:
                raise ImportFileError("the eval split is locked; new examples cannot be pinned to it "
                                      "(re-lock explicitly if the eval set must change)")
        pinned = set(split_assignments(conn)) if split else set()
        for r, label in parsed:
            example_id, created = get_or_add_example(conn, r.input, source, r.tags)
            report.examples_added += created
            report.examples_existing += not created
            if split and example_id not in pinned:
                conn.execute(insert(T.splits).values(example_id=example_id, split=split, seed=-1, created_at=now()))
                pinned.add(example_id)
            if r.output is None:
                report.unlabelled += 1
                continue
            if role == "human":
                report.labels_added += add_label(conn, example_id, label, "human", f"import:{source}")
                continue
            response_id, new = add_response(
                conn, example_id,
                response_hash(content_hash(r.input), "teacher", r.model or model, "recorded", r.output),
                role="teacher", model=r.model or model, origin="recorded", output=r.output,
            )
            report.responses_added += new
            if label is not None:
                report.labels_added += add_label(
                    conn, example_id, label, "recorded", f"import:{source}", response_id
                )
            else:
                report.unlabelled += 1
    return report

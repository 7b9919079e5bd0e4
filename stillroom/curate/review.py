"""The review queue: a stratified sample plus every flagged or rejected item, exported for a human
or a stronger judge model, and the decisions read back.

A decision is `accept` (the teacher's label stands), `fix` (the reviewer's label replaces it: a
label with provenance 'human', decided by the reviewer) or `discard` (the example never trains).
The label is the task's answer: a label name, an extraction record (in JSONL a JSON object, in CSV
its JSON text; validated against the schema) or a generation text (within the length limit).
Decisions are append-only; the latest per example is in force, and `training_labels` applies them.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from stillroom.capture.importers import read_text
from stillroom.errors import StillroomError
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import add_label, split_assignments, teacher_labels
from stillroom.tasks.base import ParseError

__all__ = ["flag_for_review", "training_labels", "review_queue", "export_review", "import_review",
           "ReviewFileError", "DECISIONS"]

DECISIONS = ("accept", "fix", "discard")
COLUMNS = ["example_id", "split", "why", "input", "teacher_label", "teacher_output", "decision", "label",
           "reviewer", "note"]


class ReviewFileError(StillroomError):
    """A review file cannot be read, or (with strict) has bad rows; the message names them."""


def _flags_table():
    return T.TABLES["review_flags"]


def _decisions_table():
    return T.TABLES["review_decisions"]


def flag_for_review(conn: Connection, example_id: int, reason: str, source: str = "labeling") -> bool:
    """Put an example in the review queue (e.g. low teacher consensus); False if already flagged so."""
    table = _flags_table()
    exists = conn.execute(select(table.c.id).where(
        table.c.example_id == example_id, table.c.reason == reason, table.c.source == source)).first()
    if exists:
        return False
    conn.execute(insert(table).values(example_id=example_id, reason=reason, source=source, created_at=now()))
    return True


def review_flags(conn: Connection) -> dict[int, list[str]]:
    """Why each flagged example needs review: `review_flags` plus the labeling engine's `label_flags`
    (low agreement, ties, invalid answers)."""
    table = _flags_table()
    out: dict[int, list[str]] = defaultdict(list)
    for ex, source, reason in conn.execute(select(table.c.example_id, table.c.source, table.c.reason).order_by(table.c.id)):
        out[ex].append(f"{source}: {reason}")
    labeling = T.TABLES.get("label_flags")
    if labeling is not None:
        for ex, kind, detail in conn.execute(select(labeling.c.example_id, labeling.c.kind, labeling.c.detail)
                                             .order_by(labeling.c.id)):
            out[ex].append(f"labeling {kind}: {detail}")
    return dict(out)


@dataclass
class Decision:
    example_id: int
    decision: str
    label: str | None
    reviewer: str
    source: str


def latest_decisions(conn: Connection) -> dict[int, Decision]:
    table = _decisions_table()
    rows = conn.execute(select(table.c.example_id, table.c.decision, table.c.label, table.c.reviewer, table.c.source)
                        .order_by(table.c.id))
    return {r.example_id: Decision(r.example_id, r.decision, r.label, r.reviewer, r.source) for r in rows}


def training_labels(conn: Connection, label_set: list[str] | None = None,
                    task=None) -> tuple[dict[int, str], dict[int, str]]:
    """(label per example that may train, where it came from: 'teacher' | 'review').

    The teacher's label, replaced by a reviewer's fix; discarded examples are left out, and so are
    labels outside `label_set`, or (with `task`) labels no longer valid for the task: outside the
    label set, off the schema, over the length limit (`curate qc` lists them)."""
    labels = teacher_labels(conn)
    source = {i: "teacher" for i in labels}
    for ex, d in latest_decisions(conn).items():
        if d.decision == "discard":
            labels.pop(ex, None)
            source.pop(ex, None)
        elif d.decision == "fix" and d.label is not None:
            labels[ex] = d.label
            source[ex] = "review"
    if label_set is not None:
        allowed = set(label_set)
        labels = {i: lab for i, lab in labels.items() if lab in allowed}
    if task is not None:
        from stillroom.curate.qc import label_problem

        usable = {lab: label_problem(task, lab) is None for lab in set(labels.values())}
        labels = {i: lab for i, lab in labels.items() if usable[lab]}
    return labels, {i: source[i] for i in labels}


# --- the queue ---------------------------------------------------------------------------------


@dataclass
class ReviewItem:
    example_id: int
    split: str
    why: list[str]
    input: str
    teacher_label: str | None
    teacher_output: str | None


def _stratified_sample(ids_by_label: dict[str, list[int]], fraction: float, min_per_label: int,
                       seed: int) -> set[int]:
    chosen: set[int] = set()
    for label, ids in sorted(ids_by_label.items()):
        want = min(len(ids), max(min_per_label, int(fraction * len(ids) + 0.5)))
        # One generator per label: new data for one label never reshuffles another label's sample.
        chosen.update(random.Random(f"{seed}:{label}").sample(sorted(ids), want))
    return chosen


def review_queue(project, include_decided: bool = False, redact: bool = True) -> list[ReviewItem]:
    """Sampled + flagged + rejected items, by example id. Decided items are left out unless asked."""
    from stillroom.curate.pii import redacted_copy
    from stillroom.curate.qc import rejections
    from stillroom.curate.split import stratum_of

    cfg = project.config.curation.review
    with project.store.engine.begin() as conn:
        labels = teacher_labels(conn)
        splits = split_assignments(conn)
        by_label: dict[str, list[int]] = defaultdict(list)  # by stratum: label, stated fields, or one group
        for ex, label in labels.items():
            if splits.get(ex) in cfg.splits:
                by_label[stratum_of(project.task, label)].append(ex)
        why: dict[int, list[str]] = defaultdict(list)
        for ex in _stratified_sample(by_label, cfg.fraction, cfg.min_per_label, cfg.seed):
            why[ex].append("sample")
        for ex, flags in review_flags(conn).items():
            why[ex] += [f"flag ({f})" for f in flags]
        rejected = rejections(conn, project.task)
        outputs: dict[int, str] = {}
        for r in rejected:
            why[r.example_id].append(f"rejected ({r.reason})")
            outputs[r.example_id] = r.output
        decided = set() if include_decided else set(latest_decisions(conn))
        ids = sorted(ex for ex in why if ex not in decided)
        wanted = set(ids)  # no IN (...) over thousands of ids: SQLite caps bound parameters
        texts = {ex: text for ex, text in conn.execute(select(T.examples.c.id, T.examples.c.input)) if ex in wanted}
        last_output = {ex: out for ex, out in conn.execute(
            select(T.responses.c.example_id, T.responses.c.output).where(T.responses.c.role == "teacher")
            .order_by(T.responses.c.id)) if ex in wanted}
        pii = project.config.curation.pii
        items = []
        for ex in ids:
            text, output = texts[ex], outputs.get(ex, last_output.get(ex))
            if redact:
                text = redacted_copy(conn, text, "input", pii)
                output = redacted_copy(conn, output, "output", pii) if output is not None else None
            items.append(ReviewItem(ex, splits.get(ex, ""), list(dict.fromkeys(why[ex])), text, labels.get(ex), output))
    return items


def export_review(project, path: Path, include_decided: bool = False, redact: bool = True) -> dict:
    """Write the queue to CSV or JSONL (by suffix) with empty decision columns to fill in."""
    path = Path(path)
    fmt = _format(path)
    items = review_queue(project, include_decided=include_decided, redact=redact)
    task = project.task

    def shown(label: str | None):
        # JSONL carries an extraction record as an object (edit it in place for a fix); CSV as JSON text.
        if label and fmt == "jsonl" and task.type == "extraction":
            try:
                return json.loads(label)
            except ValueError:
                return label
        return label or ""

    rows = [{"example_id": i.example_id, "split": i.split, "why": "; ".join(i.why), "input": i.input,
             "teacher_label": shown(i.teacher_label), "teacher_output": i.teacher_output or "",
             "decision": "", "label": "", "reviewer": "", "note": ""} for i in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = defaultdict(int)
    for i in items:
        for w in {w.split(" ")[0] for w in i.why}:
            counts[w] += 1
    return {"path": str(path), "items": len(items), "by_reason": dict(counts), "task_type": task.type,
            "labels": task.labels, "redacted": redact}


# --- reading decisions back --------------------------------------------------------------------


@dataclass
class ReviewImportReport:
    path: str
    rows: int = 0
    applied: dict[str, int] = field(default_factory=lambda: {d: 0 for d in DECISIONS})
    unchanged: int = 0
    pending: int = 0  # rows without a decision yet
    problems: list[tuple[int, str]] = field(default_factory=list)
    notes: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["problems"] = [{"line": line, "message": m} for line, m in self.problems]
        d["notes"] = [{"line": line, "message": m} for line, m in self.notes]
        return d


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise ReviewFileError(f"{path}: unknown format '{suffix}'; use .csv or .jsonl")


def _read_rows(path: Path) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    data = read_text(path, ReviewFileError)
    rows, problems = [], []
    if _format(path) == "csv":
        reader = csv.DictReader(io.StringIO(data))
        header = reader.fieldnames or []
        missing = [c for c in ("example_id", "decision") if c not in header]
        if missing:
            raise ReviewFileError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(header) or 'none'})")
        start = 2
        for row in reader:
            line = start
            start = reader.line_num + 1  # a quoted field may span lines: report where the row begins
            if None in row:
                problems.append((line, f"more fields than the header's {len(header)}"))
                continue
            rows.append((line, row))
    else:
        for line, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append((line, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(obj, dict):
                problems.append((line, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            rows.append((line, obj))
    return rows, problems


def _fixed_label(task, value) -> tuple[str | None, str | None]:
    """(the canonical answer a `fix` gives, or why it is not a valid one)."""
    what = {"classification": "the correct label", "extraction": "the corrected record (a JSON object)",
            "generation": "the corrected text"}[task.type]
    if isinstance(value, (dict, list)):
        if task.type != "extraction":
            return None, f"column 'label' holds JSON; a {task.type} fix is {what}"
        given = json.dumps(value, ensure_ascii=False)
    else:
        given = "" if value is None else str(value).strip()
    if not given:
        return None, f"decision 'fix' needs {what} in column 'label'"
    try:
        label = task.parse(given)
    except ParseError as exc:
        if task.type == "classification":
            return None, f"label {given!r} is not one of the labels ({', '.join(task.labels)})"
        return None, f"the fix is not valid for the task: {exc}"
    if task.type == "classification" and label.casefold() != given.casefold():
        # parse also finds a label inside a sentence; a reviewer's fix must be the label itself
        return None, f"label {given!r} is not one of the labels ({', '.join(task.labels)})"
    return label, None


def _text_field(row: dict, name: str) -> str:
    value = row.get(name)
    return "" if value is None else str(value).strip()


def import_review(project, path: Path, reviewer: str | None = None, strict: bool = False) -> ReviewImportReport:
    """Record the decisions in a filled-in review file; bad rows are reported by line and skipped
    (with `strict`, any bad row aborts with nothing written). Re-importing a file changes nothing."""
    from stillroom.curate.qc import rejections

    path = Path(path)
    report = ReviewImportReport(str(path))
    raw_rows, problems = _read_rows(path)
    report.rows = len(raw_rows) + len(problems)
    task = project.task
    table = _decisions_table()
    with project.store.engine.begin() as conn:
        known = set(conn.execute(select(T.examples.c.id)).scalars())
        teacher = teacher_labels(conn)
        rejected = {r.example_id for r in rejections(conn, task)}
        splits = split_assignments(conn)
        parsed: list[tuple[int, Decision, str]] = []
        for line, row in raw_rows:
            decision = _text_field(row, "decision").lower()
            if not decision:
                report.pending += 1
                continue
            ex_text = _text_field(row, "example_id")
            try:
                ex = int(ex_text)
            except ValueError:
                problems.append((line, f"example_id {ex_text!r} is not an integer"))
                continue
            if ex not in known:
                problems.append((line, f"example_id {ex} is not in this project"))
                continue
            if decision not in DECISIONS:
                problems.append((line, f"decision {decision!r} is not one of {', '.join(DECISIONS)}"))
                continue
            who = _text_field(row, "reviewer") or (reviewer or "")
            if not who:
                problems.append((line, "reviewer is empty: name who decided (column 'reviewer' or --reviewer)"))
                continue
            label = None
            if decision == "fix":
                label, problem = _fixed_label(task, row.get("label"))
                if problem:
                    problems.append((line, problem))
                    continue
            elif decision == "accept" and ex not in teacher:
                why = "its teacher output was rejected" if ex in rejected else "it has no teacher label"
                problems.append((line, f"example {ex}: nothing to accept, {why}; use fix or discard"))
                continue
            note = _text_field(row, "note") or None
            parsed.append((line, Decision(ex, decision, label, who, f"{path.name}:{line}"), note))
        problems.sort()
        report.problems = problems
        if strict and problems:
            raise ReviewFileError(
                f"{path}: {len(problems)} bad row(s), nothing recorded (--strict):\n"
                + "\n".join(f"  line {line}: {m}" for line, m in problems[:20])
                + ("\n  ..." if len(problems) > 20 else ""))
        current = latest_decisions(conn)
        for line, d, note in parsed:
            before = current.get(d.example_id)
            if before and (before.decision, before.label, before.reviewer) == (d.decision, d.label, d.reviewer):
                report.unchanged += 1
                continue
            conn.execute(insert(table).values(example_id=d.example_id, decision=d.decision, label=d.label,
                                              reviewer=d.reviewer, source=d.source, note=note, created_at=now()))
            current[d.example_id] = d
            report.applied[d.decision] += 1
            if d.decision == "fix":
                add_label(conn, d.example_id, d.label, "human", d.reviewer)
                if d.example_id not in splits:  # a rejected item, now labelled: it trains
                    conn.execute(insert(T.splits).values(example_id=d.example_id, split="train", seed=-1,
                                                         created_at=now()))
                    splits[d.example_id] = "train"
                    report.notes.append((line, f"example {d.example_id} had no split; it joins train"))
            if splits.get(d.example_id) == "eval" and d.decision != "accept":
                report.notes.append((line, f"example {d.example_id} is in the eval split: the decision is recorded "
                                           "(a fix is a human label the gate can use), the locked set is unchanged"))
    return report

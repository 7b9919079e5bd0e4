"""Slices: the same teacher-minus-student gap, measured per segment of the eval set.

Averages hide where a student loses; a slice shows it. The kinds:

- `class` (classification): by the reference label (the teacher's, or the human's when the gate uses
  humans);
- `field` (extraction): by each top-level field the reference record states (a record stating three
  fields counts in three field slices), scored on the whole record;
- `length`: by input length in whitespace-separated words, in fixed buckets (`LENGTH_BUCKETS`), so
  the same bucket means the same thing in every evaluation and every project;
- `source`: by the file (or log) an example was imported from;
- `tag`: by each tag on the example (an example with two tags counts in both).

A class (or a schema field) with no examples is listed under `empty` with a sentence, never scored
as zero (length buckets, sources and tags exist only where examples do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SliceItem", "LENGTH_BUCKETS", "length_bucket", "compute_slices", "worst_slices"]

# (low, high) word counts, inclusive; None: no upper bound.
LENGTH_BUCKETS: list[tuple[int, int | None]] = [(0, 5), (6, 10), (11, 20), (21, 50), (51, None)]
EXAMPLES_PER_SLICE = 3


def length_bucket(text: str) -> str:
    words = len(text.split())
    for low, high in LENGTH_BUCKETS:
        if high is None or words <= high:
            return f"{low}+ words" if high is None else f"{low}-{high} words"
    raise AssertionError("unreachable: the last bucket is open-ended")


@dataclass
class SliceItem:
    """One scored example, as slices see it."""

    example_id: int | str
    input: str
    reference: str  # the label the class slice is keyed on
    teacher_score: float  # the teacher's answer scored against the reference
    student_score: float
    source: str = ""
    tags: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)  # shown with the slice's examples (labels, confidence)
    keys: list[tuple[str, str]] = field(default_factory=list)  # more slices it belongs to, e.g. ("field", "date")


def _summary(kind: str, name: str, items: list[SliceItem], min_examples: int) -> dict:
    n = len(items)
    teacher = sum(i.teacher_score for i in items) / n
    student = sum(i.student_score for i in items) / n
    losses = sorted((i for i in items if i.student_score < i.teacher_score),
                    key=lambda i: i.student_score - i.teacher_score)
    return {
        "kind": kind, "name": name, "n": n,
        "teacher_score": teacher, "student_score": student,
        "gap_points": round((teacher - student) * 100, 2),
        "gated": n >= min_examples,
        "examples": [{"example_id": i.example_id, "input": i.input, **i.detail} for i in losses[:EXAMPLES_PER_SLICE]],
    }


def compute_slices(items: list[SliceItem], labels: list[str] | None = None, min_examples: int = 20,
                   by_class: bool = True, fields: list[str] | None = None) -> dict:
    """Every slice's gap; `labels` (the task's label set, for classification) lets a class absent
    from the eval set show up as an empty slice rather than silently disappear, as `fields` (an
    extraction schema's top-level fields) does for a field no reference states. `by_class`: slice
    by the reference itself (a label; meaningless for records and free text)."""
    groups: dict[tuple[str, str], list[SliceItem]] = {}
    for item in items:
        keys = [("class", item.reference)] if by_class else []
        keys += list(item.keys) + [("length", length_bucket(item.input))]
        keys.append(("source", item.source or "(unknown source)"))
        keys += [("tag", t) for t in item.tags]
        for key in keys:
            groups.setdefault(key, []).append(item)
    slices = [_summary(kind, name, members, min_examples) for (kind, name), members in groups.items()]
    slices.sort(key=lambda s: (-s["gap_points"], -s["n"], s["kind"], s["name"]))
    empty = []
    for label in labels or []:
        if ("class", label) not in groups:
            empty.append({"kind": "class", "name": label,
                          "message": f"class '{label}' has no examples in this set: its quality is unmeasured"})
    for name in fields or []:
        if ("field", name) not in groups:
            empty.append({"kind": "field", "name": name,
                          "message": f"no reference in this set states field '{name}': its quality is unmeasured"})
    if not items:
        empty.append({"kind": "all", "name": "all", "message": "no scored examples: every slice is empty"})
    return {"min_examples": min_examples, "slices": slices, "empty": empty,
            "tags_present": any(i.tags for i in items)}


def worst_slices(slices: dict, k: int = 5, gated_only: bool = False) -> list[dict]:
    """The k slices with the largest gap (slices big enough to be gated first)."""
    rows = [s for s in slices["slices"] if s["gated"] or not gated_only]
    rows.sort(key=lambda s: (not s["gated"], -s["gap_points"], -s["n"]))
    return rows[:k]

"""The bundled example projects: each config is valid, each data file imports cleanly, and the
extraction example's records fit its schema. Fast: no training, no teacher calls."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stillroom.capture.importers import import_file, read_records
from stillroom.project import Project
from stillroom.tasks.base import ParseError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROJECTS = sorted(p.parent.name for p in EXAMPLES.glob("*/stillroom.yaml"))


def test_the_examples_are_there():
    assert {"support-intents", "invoice-fields", "venue-blurbs"} <= set(PROJECTS)


@pytest.fixture
def example(tmp_path):
    """example(name) -> Project opened on a temp copy of examples/<name> (the repo copy stays clean)."""
    opened = []

    def open_copy(name: str) -> Project:
        root = tmp_path / name
        shutil.copytree(EXAMPLES / name, root, ignore=shutil.ignore_patterns(".stillroom"))
        project = Project.open(root)
        opened.append(project)
        return project

    yield open_copy
    for project in opened:
        project.close()


@pytest.mark.parametrize("name", PROJECTS)
def test_example_config_loads_and_its_data_imports_cleanly(example, name):
    project = example(name)
    assert project.config.task.name == name
    assert project.config.data, "an example names its data files"
    for source in project.config.data:
        path = project.root / source.path
        assert path.is_file(), f"{name}: {source.path} is missing"
        # The same call `stillroom run` makes in its import stage (pipeline.run_pipeline).
        report = import_file(project, path, role=source.role,
                             input_column=source.input_column, output_column=source.output_column)
        assert report.problems == [], f"{name}/{source.path}: {report.problems[:5]}"
        assert report.lines > 0
        assert report.labels_added == report.lines, f"{name}/{source.path}: every line gives a label"
        assert report.unlabelled == 0
        if source.role == "human":  # reviewed rows are inputs the teacher file already holds
            assert report.examples_added == 0, f"{name}/{source.path}: a human row not in the teacher file"


def _teacher_and_human(project: Project) -> tuple[list, list]:
    objects = project.task.type == "extraction"
    files = {s.role: s for s in project.config.data}
    out = []
    for role in ("teacher", "human"):
        source = files[role]
        records, problems = read_records(project.root / source.path, source.input_column,
                                         source.output_column, objects=objects)
        assert problems == []
        out.append(records)
    return out[0], out[1]


def test_invoice_records_all_fit_the_schema(example):
    """No teacher record was made invalid on purpose: the deliberate teacher mistakes (wrong amount,
    swapped dates, a missed field...) are all schema-valid records that a reviewer corrected."""
    project = example("invoice-fields")
    task = project.task
    assert task.type == "extraction"
    assert project.config.task.schema["additionalProperties"] is False
    assert "required" not in project.config.task.schema
    teacher, human = _teacher_and_human(project)
    invalid = []
    for r in teacher + human:
        try:
            task.parse(r.output)
        except ParseError as exc:
            invalid.append((r.line, str(exc)))
    assert invalid == []

    by_input = {r.input: task.parse(r.output) for r in teacher}
    assert len(by_input) == len(teacher) >= 200
    # Some messages state nothing extractable: the teacher answers {}.
    assert sum(rec == "{}" for rec in by_input.values()) >= 10
    corrected = [r for r in human if task.parse(r.output) != by_input[r.input]]
    assert len(corrected) >= 10, "the human labels include the corrections of the teacher's mistakes"
    assert all(task.score(by_input[r.input], task.parse(r.output)) < 1.0 for r in corrected)


def test_invoice_messages_with_planted_pii_are_redacted_and_the_rest_untouched(example):
    """Messages tagged `pii` hold fake emails, phones, test card numbers or example IBANs; amounts,
    dates and invoice numbers elsewhere must not be mistaken for any of them."""
    from stillroom.curate.pii import redact

    project = example("invoice-fields")
    teacher, _ = _teacher_and_human(project)
    pii_config = project.config.curation.pii
    seen = set()
    for r in teacher:
        redacted, findings = redact(r.input, pii_config)
        if "pii" in r.tags:
            assert findings, f"line {r.line}: planted PII not found in {r.input!r}"
            seen |= {f.type for f in findings}
        else:
            assert not findings, f"line {r.line}: false positive {[r.input[f.start:f.end] for f in findings]}"
    assert seen == {"email", "phone", "card", "iban"}


def test_venue_blurbs_fit_the_length_limit(example):
    project = example("venue-blurbs")
    task = project.task
    assert task.type == "generation" and task.max_output_chars == 300
    teacher, human = _teacher_and_human(project)
    assert len(teacher) >= 150 and len(human) >= 20
    for r in teacher + human:
        assert task.parse(r.output) == r.output.strip()
    assert all(". " not in r.output for r in human), "a reference is one sentence"
    # The one two-sentence teacher answer is a deliberate slip, and a human row fixes it.
    rambling = {r.input for r in teacher if ". " in r.output}
    assert len(rambling) == 1 and rambling <= {r.input for r in human}

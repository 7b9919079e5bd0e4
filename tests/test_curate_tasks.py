"""Curation for extraction and generation tasks: importing records and texts, QC reasons, the
review round trip with JSON records, task-specific strata for splits, and balance."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from stillroom.capture.importers import ImportFileError, import_file
from stillroom.curate.balance import balance_report
from stillroom.curate.datasets import curated_rows
from stillroom.curate.qc import qc_report
from stillroom.curate.review import export_review, import_review, training_labels
from stillroom.curate.split import split_project, stratum_of
from stillroom.store.records import split_assignments, teacher_labels

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"vendor": {"type": "string"}, "amount": {"type": "number"}, "currency": {"type": "string"}}}
SPLIT = "split: {train: 0.6, validation: 0.1, calibration: 0.1, eval: 0.2, seed: 0}\n"


@pytest.fixture
def open_project(yaml_project):
    return lambda task, extra="": yaml_project(task + SPLIT + extra)


def extraction(open_project, extra: str = ""):
    return open_project(f"task:\n  name: invoices\n  type: extraction\n  schema: {json.dumps(SCHEMA)}\n", extra)


def generation(open_project, extra: str = ""):
    return open_project("task:\n  name: summaries\n  type: generation\n  max_output_chars: 30\n", extra)


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def records(n_vendor_only: int, n_with_amount: int) -> list[dict]:
    rows = [{"input": f"receipt {i} from shop {i}", "output": {"vendor": f"Shop {i}"}} for i in range(n_vendor_only)]
    rows += [{"input": f"bill {i} for {i} EUR", "output": {"vendor": f"Firm {i}", "amount": i, "currency": "EUR"}}
             for i in range(n_with_amount)]
    return rows


def test_import_of_extraction_jsonl_canonicalises_records_and_names_bad_lines(open_project, tmp_path):
    project = extraction(open_project)
    path = tmp_path / "records.jsonl"
    write_jsonl(path, [
        {"input": "invoice 1 from Acme", "output": {"vendor": "Acme", "amount": 12.0}},  # an object
        {"input": "invoice 2 from Bolt", "output": '{"vendor":"Bolt", "currency":"USD"}'},  # its JSON text
        {"messages": [{"role": "user", "content": "invoice 3 from Cobalt"},
                      {"role": "assistant", "content": '```json\n{"vendor": "Cobalt"}\n```'}]},
        {"input": "invoice 4", "output": "{'vendor': 'Dyn'"},  # line 4: not JSON
        {"input": "invoice 5", "output": {"vendor": "Eon", "amount": "ten"}},  # line 5: off the schema
        {"input": "   ", "output": {"vendor": "nobody"}},  # line 6: empty input
        {"input": "invoice 7", "output": ["Acme"]},  # line 7: not an object
        {"input": "invoice 8"},  # no answer yet: to label
    ])

    with pytest.raises(ImportFileError) as strict:
        import_file(project, path, strict=True)
    assert "nothing imported" in str(strict.value) and "line 4:" in str(strict.value)

    report = import_file(project, path)

    assert report.labels_added == 3 and report.responses_added == 5 and report.unlabelled == 3
    problems = dict(report.problems)
    assert sorted(problems) == [4, 5, 6, 7]
    assert "is not a JSON object" in problems[4]
    assert "does not fit the schema at amount" in problems[5]
    assert problems[6] == "empty input"
    assert "'output' must be a string or a JSON object" in problems[7]
    with project.store.engine.connect() as conn:
        labels = set(teacher_labels(conn).values())
    assert labels == {'{"amount":12.0,"vendor":"Acme"}', '{"currency":"USD","vendor":"Bolt"}', '{"vendor":"Cobalt"}'}

    again = import_file(project, path)  # re-importing adds nothing
    assert (again.examples_added, again.labels_added, again.responses_added) == (0, 0, 0)


def test_qc_keeps_rejected_records_and_texts_out_of_training_with_their_reason(open_project, tmp_path):
    project = extraction(open_project)
    write_jsonl(tmp_path / "a.jsonl", records(6, 6) + [{"input": "bad 1", "output": "no record here"},
                                                       {"input": "bad 2", "output": {"amount": "x"}}])
    import_file(project, tmp_path / "a.jsonl")
    split_project(project)
    report = qc_report(project)
    assert report["rejected"] == 2 and report["by_reason"] == {"not_json": 1, "schema": 1}
    assert any("does not fit the schema at amount" in e["message"] for e in report["examples"])
    trained = {r.input for r in curated_rows(project)}
    assert trained and not trained & {"bad 1", "bad 2"}


def test_qc_rejects_over_long_generation_answers(open_project, tmp_path):
    project = generation(open_project)
    write_jsonl(tmp_path / "g.jsonl", [{"input": f"text {i}", "output": f"summary {i}"} for i in range(8)]
                + [{"input": "long text", "output": "a summary far longer than thirty characters"}])
    report = import_file(project, tmp_path / "g.jsonl")
    assert report.labels_added == 8 and "over task.max_output_chars (30)" in dict(report.problems)[9]
    split_project(project)
    qc = qc_report(project)
    assert qc["by_reason"] == {"too_long": 1} and qc["examples_without_usable_label"] == 1
    assert "long text" not in {r.input for r in curated_rows(project)}
    # Generation has no classes: one stratum, and balance says so.
    assert balance_report(project)["grouped_by"].startswith("none")


def test_review_round_trips_json_records_with_line_numbered_problems(open_project, tmp_path):
    project = extraction(open_project, "curation: {review: {fraction: 0.5}}\n")
    write_jsonl(tmp_path / "a.jsonl", records(4, 4) + [{"input": "bad one", "output": "{oops"}])
    import_file(project, tmp_path / "a.jsonl")
    split_project(project)

    out = tmp_path / "review.jsonl"
    export_review(project, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    labelled = [r for r in rows if r["teacher_label"]]
    rejected = next(r for r in rows if r["input"] == "bad one")
    assert labelled and all(isinstance(r["teacher_label"], dict) for r in labelled)  # records as objects
    assert rejected["teacher_output"] == "{oops" and "rejected (not_json)" in rejected["why"]

    fixed = dict(labelled[0], decision="fix", reviewer="ana")
    fixed["label"] = {**labelled[0]["teacher_label"], "currency": "GBP"}
    rescued = dict(rejected, decision="fix", reviewer="ana", label={"vendor": "Bad One Ltd"})
    off_schema = dict(labelled[1], decision="fix", reviewer="ana", label={"vendor": 7})
    not_json = dict(labelled[1], decision="fix", reviewer="ana", label="{vendor:")
    out.write_text("".join(json.dumps(r) + "\n" for r in [fixed, rescued, off_schema, not_json]), encoding="utf-8")

    report = import_review(project, out)

    assert report.applied["fix"] == 2
    assert [line for line, _ in report.problems] == [3, 4]
    assert "the fix is not valid for the task" in report.problems[0][1] and "at vendor" in report.problems[0][1]
    assert "is not a JSON object" in report.problems[1][1]
    with project.store.engine.connect() as conn:
        labels, source = training_labels(conn, task=project.task)
    assert json.loads(labels[fixed["example_id"]])["currency"] == "GBP"
    assert labels[rescued["example_id"]] == '{"vendor":"Bad One Ltd"}' and source[rescued["example_id"]] == "review"

    # CSV carries the record as JSON text, and reads it back the same way.
    csv_path = tmp_path / "review.csv"
    export_review(project, csv_path, include_decided=True)
    with open(csv_path, encoding="utf-8", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    row = next(r for r in csv_rows if int(r["example_id"]) == fixed["example_id"])
    assert json.loads(row["teacher_label"])  # JSON text in the cell
    row.update(decision="fix", reviewer="bo", label='{"vendor": "Renamed"}')
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    assert import_review(project, csv_path).applied["fix"] == 1
    with project.store.engine.connect() as conn:
        assert training_labels(conn, task=project.task)[0][fixed["example_id"]] == '{"vendor":"Renamed"}'


def test_extraction_splits_and_balances_by_the_fields_stated(open_project, tmp_path):
    project = extraction(open_project, "curation: {balance: {min_per_label: 20}}\n")
    write_jsonl(tmp_path / "a.jsonl", records(20, 40))
    import_file(project, tmp_path / "a.jsonl")
    split_project(project)

    with project.store.engine.connect() as conn:
        splits, labels = split_assignments(conn), teacher_labels(conn)
    by_stratum: dict[str, dict[str, int]] = {}
    for ex, split in splits.items():
        counts = by_stratum.setdefault(stratum_of(project.task, labels[ex]), {})
        counts[split] = counts.get(split, 0) + 1
    assert by_stratum == {"vendor": {"train": 12, "validation": 2, "calibration": 2, "eval": 4},
                          "amount+currency+vendor": {"train": 24, "validation": 4, "calibration": 4, "eval": 8}}

    report = balance_report(project)
    assert report["grouped_by"] == "fields stated"
    assert report["train_before"]["counts"] == {"amount+currency+vendor": 24, "vendor": 12}
    assert report["train_after_oversampling"]["counts"] == {"amount+currency+vendor": 24, "vendor": 20}
    assert report["oversampled_rows"] == 8

    # The dataset version carries the records as the assistant's JSON answer.
    from stillroom.curate.datasets import snapshot
    from stillroom.curate.lock import lock_eval

    lock_eval(project)
    version = snapshot(project, formats=["chat"])
    assert version["counts"]["train_rows_by_label"] == {"amount+currency+vendor": 24, "vendor": 20}
    lines = (Path(version["path"]) / "chat" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(json.loads(line)["messages"][-1]["content"]) for line in lines]
    assert len(answers) == 44 and all("vendor" in a for a in answers)

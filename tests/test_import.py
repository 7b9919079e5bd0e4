import json

import pytest
from sqlalchemy import func, select

from stillroom.capture.importers import ImportFileError, import_file
from stillroom.store import tables as T
from stillroom.store.records import human_labels, teacher_labels


def _count(project, table):
    with project.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_chat_jsonl_outputs_become_teacher_labels_and_reimport_adds_nothing(make_project, tmp_path):
    from conftest import synthetic_rows

    project = make_project(synthetic_rows(5))
    first = import_file(project, project.root / "data.jsonl")
    assert (first.examples_added, first.responses_added, first.labels_added) == (15, 15, 15)
    again = import_file(project, project.root / "data.jsonl")
    assert (again.examples_added, again.responses_added, again.labels_added) == (0, 0, 0)
    assert again.examples_existing == 15
    assert _count(project, T.examples) == 15 and _count(project, T.responses) == 15 and _count(project, T.labels) == 15
    with project.store.engine.connect() as conn:
        provenance = conn.execute(select(T.labels.c.provenance).distinct()).scalars().all()
    assert provenance == ["recorded"]


def test_empty_file(make_project, tmp_path):
    project = make_project()
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    report = import_file(project, tmp_path / "empty.jsonl")
    assert report.lines == 0 and report.examples_added == 0 and report.problems == []


def test_bad_lines_are_reported_by_number_and_strict_writes_nothing(make_project, tmp_path):
    project = make_project()
    lines = [
        json.dumps({"messages": [{"role": "user", "content": "where is my parcel"}, {"role": "assistant", "content": "shipping"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "assistant", "content": "billing"}]}),
        json.dumps({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "other"}]}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": "my card was charged twice"}, {"role": "assistant", "content": "Billing."}]}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ImportFileError, match="4 problem") as err:
        import_file(project, path, strict=True)
    assert "line 2: not valid JSON" in str(err.value)
    assert _count(project, T.examples) == 0  # nothing half-written

    report = import_file(project, path)
    lines_reported = [line for line, _ in report.problems]
    assert lines_reported == [2, 3, 4, 5]
    assert "no user message" in dict(report.problems)[3]
    assert "empty input" in dict(report.problems)[4]
    assert report.examples_added == 2 and report.labels_added == 2  # "Billing." parses to billing


def test_duplicate_lines_make_one_example(make_project, tmp_path):
    project = make_project()
    line = json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "other"}]})
    path = tmp_path / "dupes.jsonl"
    path.write_text("\n".join([line] * 4), encoding="utf-8")
    report = import_file(project, path)
    assert report.examples_added == 1 and report.examples_existing == 3 and report.labels_added == 1


def test_non_ascii_round_trips(make_project, tmp_path):
    project = make_project()
    text = "Mein Paket ist nicht angekommen 📦 — où est ma commande? 注文"
    path = tmp_path / "intl.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": text},
                                              {"role": "assistant", "content": "shipping"}]}, ensure_ascii=False),
                    encoding="utf-8")
    import_file(project, path)
    with project.store.engine.connect() as conn:
        assert conn.execute(select(T.examples.c.input)).scalar_one() == text


def test_not_utf8_is_a_clear_error(make_project, tmp_path):
    project = make_project()
    path = tmp_path / "latin1.csv"
    path.write_bytes("input,output\ncaf\xe9 bill,billing\n".encode("latin-1"))
    with pytest.raises(ImportFileError, match="not UTF-8"):
        import_file(project, path)


def test_teacher_output_outside_label_set_is_kept_as_a_response_without_label(make_project, tmp_path):
    project = make_project()
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "greeting"}]}))
    report = import_file(project, path)
    assert report.unlabelled == 1 and "not one of the labels" in report.problems[0][1]
    assert _count(project, T.responses) == 1 and _count(project, T.labels) == 0


def test_csv_with_human_labels_and_custom_columns(make_project, tmp_path):
    project = make_project()
    teacher = tmp_path / "t.csv"
    teacher.write_text('text,category\n"my card, charged twice",billing\nparcel late,billing\n', encoding="utf-8")
    report = import_file(project, teacher, input_column="text", output_column="category")
    assert report.labels_added == 2
    human = tmp_path / "h.csv"
    human.write_text("input,output\nparcel late,shipping\nnew input,nonsense\n", encoding="utf-8")
    report = import_file(project, human, role="human")
    assert report.labels_added == 1 and report.problems and "row skipped" in report.problems[0][1]
    with project.store.engine.connect() as conn:
        assert sorted(teacher_labels(conn).values()) == ["billing", "billing"]
        assert list(human_labels(conn).values()) == ["shipping"]
    with pytest.raises(ImportFileError, match="no 'input' column"):
        import_file(project, teacher)


def test_unknown_format_and_missing_file(make_project, tmp_path):
    project = make_project()
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImportFileError, match="unknown format"):
        import_file(project, tmp_path / "x.txt")
    with pytest.raises(ImportFileError, match="no such file"):
        import_file(project, tmp_path / "absent.jsonl")


def test_content_parts_and_input_only_lines(make_project, tmp_path):
    project = make_project()
    path = tmp_path / "parts.jsonl"
    path.write_text("\n".join([
        json.dumps({"messages": [{"role": "system", "content": "classify"},
                                 {"role": "user", "content": [{"type": "text", "text": "refund my card"}]},
                                 {"role": "assistant", "content": "billing"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer logged"}]}),
        json.dumps({"input": "plain", "output": "other", "tags": ["vip"]}),
    ]), encoding="utf-8")
    report = import_file(project, path)
    assert report.examples_added == 3 and report.labels_added == 2 and report.unlabelled == 1
    with project.store.engine.connect() as conn:
        rows = dict(conn.execute(select(T.examples.c.input, T.examples.c.tags)).all())
    assert "refund my card" in rows and json.loads(rows["plain"]) == ["vip"]


def test_lone_surrogate_is_a_line_problem_not_a_lost_file(make_project, tmp_path):
    project = make_project()
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"input": "fine line", "output": "other"}\n{"input": "bad \\ud800 text", "output": "other"}\n',
                    encoding="utf-8")
    report = import_file(project, path)
    assert report.examples_added == 1
    assert report.problems == [(2, "invalid Unicode (a lone surrogate escape such as \\ud800); fix the line")]

"""The review queue round trip: what is exported, decisions read back (CSV and JSONL), bad rows by
line number, and training that follows the decisions; on SQLite and PostgreSQL."""

import csv
import json

import pytest
from sqlalchemy import select

from conftest import synthetic_rows, write_chat_jsonl
from stillroom.capture.importers import import_file
from stillroom.curate.lock import lock_eval
from stillroom.curate.review import (ReviewFileError, export_review, flag_for_review, import_review, review_queue,
                                     training_labels)
from stillroom.curate.split import split_project
from stillroom.store import tables as T
from stillroom.store.records import split_assignments
from stillroom.train.runner import training_data

BAD_TEACHER = [("where is my parcel, call me on +44 20 7946 0958", "it's shipping or billing"),
               ("asdf qwerty", "I cannot tell")]


@pytest.fixture
def project(make_project, db_url, tmp_path):
    project = make_project(synthetic_rows(20), extra=(
        f"database: {{url: '{db_url}'}}\ncuration: {{review: {{fraction: 0.2, seed: 3}}}}\n"))
    write_chat_jsonl(tmp_path / "bad.jsonl", BAD_TEACHER)
    import_file(project, project.root / "data.jsonl")
    import_file(project, tmp_path / "bad.jsonl")  # two answers outside the label set: rejected
    split_project(project)
    lock_eval(project)
    return project


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_queue_is_a_stratified_seeded_sample_plus_flagged_and_rejected(project, tmp_path):
    with project.store.engine.begin() as conn:
        splits = split_assignments(conn)
        eval_id = next(i for i, s in splits.items() if s == "eval")
        assert flag_for_review(conn, eval_id, "teacher samples disagree (2/3)")
        assert not flag_for_review(conn, eval_id, "teacher samples disagree (2/3)")  # once
    items = review_queue(project)
    sampled = [i for i in items if "sample" in i.why]
    train_ids = [i for i, s in splits.items() if s in ("train", "validation")]
    assert len(train_ids) == 42  # 14 per label in train + validation
    per_label = {lab: sum(1 for i in sampled if i.teacher_label == lab) for lab in ("billing", "shipping", "other")}
    assert per_label == {"billing": 3, "shipping": 3, "other": 3}  # 20% of 14, rounded
    assert all(i.split in ("train", "validation") for i in sampled)
    assert [i.example_id for i in review_queue(project)] == [i.example_id for i in items]  # seeded
    flagged = next(i for i in items if i.example_id == eval_id)
    assert flagged.why == ["flag (labeling: teacher samples disagree (2/3))"]
    rejected = [i for i in items if any(w.startswith("rejected") for w in i.why)]
    assert sorted(i.teacher_output for i in rejected) == ["I cannot tell", "it's shipping or billing"]
    assert all(i.teacher_label is None and i.split == "" for i in rejected)
    assert any(i.input == "where is my parcel, call me on [PHONE]" for i in rejected)  # redacted for export


def test_round_trip_csv_and_training_follows_decisions(project, tmp_path):
    path = tmp_path / "queue.csv"
    result = export_review(project, path)
    rows = read_csv(path)
    assert result["items"] == len(rows) and set(rows[0]) >= {"example_id", "input", "teacher_label", "decision",
                                                             "label", "reviewer"}
    sample = [r for r in rows if r["why"] == "sample"]
    fix, discard, accept = sample[0], sample[1], sample[2]
    new_label = next(l for l in ("billing", "shipping", "other") if l != fix["teacher_label"])
    fix.update(decision="fix", label=new_label.upper(), reviewer="ana")  # label matching ignores case
    discard.update(decision="discard", reviewer="ana")
    accept.update(decision="accept")  # reviewer from --reviewer
    parcel = next(r for r in rows if r["teacher_output"] == "it's shipping or billing")
    parcel.update(decision="fix", label="shipping", reviewer="bob", note="customer asks about a parcel")
    write_csv(path, rows)

    report = import_review(project, path, reviewer="lead")
    assert report.applied == {"accept": 1, "fix": 2, "discard": 1} and not report.problems
    assert report.pending == len(rows) - 4
    assert any(f"example {parcel['example_id']} had no split; it joins train" in m for _, m in report.notes)

    with project.store.engine.connect() as conn:
        human = conn.execute(select(T.labels.c.example_id, T.labels.c.label, T.labels.c.decided_by)
                             .where(T.labels.c.provenance == "human")).all()
        decisions = conn.execute(select(T.TABLES["review_decisions"])).all()
        labels, source = training_labels(conn)
    assert sorted((r.example_id, r.label, r.decided_by) for r in human) == sorted(
        [(int(fix["example_id"]), new_label, "ana"), (int(parcel["example_id"]), "shipping", "bob")])
    assert {d.reviewer for d in decisions} == {"ana", "bob", "lead"}
    assert all(d.source.startswith("queue.csv:") for d in decisions)
    assert labels[int(fix["example_id"])] == new_label and source[int(fix["example_id"])] == "review"
    assert int(discard["example_id"]) not in labels

    train, val = training_data(project)  # what `stillroom train` reads
    pairs = dict(train + val)
    assert pairs[fix["input"]] == new_label
    assert discard["input"] not in pairs
    assert pairs["where is my parcel, call me on +44 20 7946 0958"] == "shipping"  # local training: the original
    assert "asdf qwerty" not in pairs  # still rejected, never trained on

    again = import_review(project, path, reviewer="lead")  # idempotent
    assert again.unchanged == 4 and sum(again.applied.values()) == 0
    assert not {r["example_id"] for r in sample[:3]} & {str(i.example_id) for i in review_queue(project)}


def test_bad_rows_are_reported_by_line_and_strict_writes_nothing(project, tmp_path):
    with project.store.engine.connect() as conn:
        some = sorted(i for i, s in split_assignments(conn).items() if s == "train")[:4]
        rejected = conn.execute(select(T.examples.c.id).where(T.examples.c.input == "asdf qwerty")).scalar_one()
    path = tmp_path / "decisions.jsonl"
    lines = [
        {"example_id": some[0], "decision": "fix", "label": "billing", "reviewer": "ana"},  # 1: fine
        {"example_id": "abc", "decision": "accept", "reviewer": "ana"},  # 2
        {"example_id": 99999, "decision": "accept", "reviewer": "ana"},  # 3
        {"example_id": some[1], "decision": "approve", "reviewer": "ana"},  # 4
        {"example_id": some[2], "decision": "fix", "label": "refunds", "reviewer": "ana"},  # 5
        {"example_id": some[3], "decision": "discard"},  # 6: no reviewer
        {"example_id": rejected, "decision": "accept", "reviewer": "ana"},  # 7
        {"example_id": some[1], "decision": "", "reviewer": ""},  # 8: not reviewed yet
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ReviewFileError) as err:
        import_review(project, path, strict=True)
    assert "nothing recorded" in str(err.value) and "line 2: example_id 'abc' is not an integer" in str(err.value)
    with project.store.engine.connect() as conn:
        assert conn.execute(select(T.TABLES["review_decisions"])).all() == []

    report = import_review(project, path)
    problems = dict(report.problems)
    assert sorted(problems) == [2, 3, 4, 5, 6, 7, 9]
    assert problems[3] == "example_id 99999 is not in this project"
    assert problems[4] == "decision 'approve' is not one of accept, fix, discard"
    assert problems[5].startswith("label 'refunds' is not one of the labels")
    assert "reviewer is empty" in problems[6]
    assert problems[7] == f"example {rejected}: nothing to accept, its teacher output was rejected; use fix or discard"
    assert problems[9].startswith("not valid JSON")
    assert report.applied["fix"] == 1 and report.pending == 1


def test_unreadable_review_files(project, tmp_path):
    with pytest.raises(ReviewFileError, match="no such file"):
        import_review(project, tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(ReviewFileError, match="unknown format '.txt'"):
        import_review(project, tmp_path / "x.txt")
    (tmp_path / "nohead.csv").write_text("id,verdict\n1,accept\n")
    with pytest.raises(ReviewFileError, match="missing column"):
        import_review(project, tmp_path / "nohead.csv")
    (tmp_path / "latin.csv").write_bytes("example_id,decision\n1,d\xe9cid\xe9\n".encode("latin-1"))
    with pytest.raises(ReviewFileError, match="not UTF-8"):
        import_review(project, tmp_path / "latin.csv")

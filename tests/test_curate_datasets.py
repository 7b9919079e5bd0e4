"""QC, balance and dataset versions: each export read back by the library that consumes it."""

import hashlib
import json

import pytest
from sqlalchemy import update

from conftest import synthetic_rows, write_chat_jsonl
from stillroom.capture.importers import import_file
from stillroom.curate.balance import balance_report
from stillroom.curate.datasets import DatasetError, curated_rows, list_versions, snapshot, training_pairs
from stillroom.curate.lock import LockError, lock_eval
from stillroom.curate.qc import qc_report
from stillroom.curate.review import flag_for_review
from stillroom.curate.split import split_project
from stillroom.store import tables as T
from stillroom.store.db import Store
from stillroom.store.records import split_assignments


def skewed_rows():
    """billing 30, shipping 30, other 6: a rare class."""
    rows = synthetic_rows(30)
    other = [r for r in rows if r[1] == "other"][:6]
    return [r for r in rows if r[1] != "other"] + other


@pytest.fixture
def project(make_project, tmp_path):
    project = make_project(skewed_rows(), extra="curation: {balance: {min_per_label: 18, flagged_copies: 3}}\n")
    write_chat_jsonl(tmp_path / "extra.jsonl", [
        ("my card 4111 1111 1111 1111 was charged twice, mail me at jo@example.com", "billing"),
        ("what is this", "no idea at all"),  # rejected
    ])
    import_file(project, project.root / "data.jsonl")
    import_file(project, tmp_path / "extra.jsonl", split="train")
    split_project(project)
    lock_eval(project)
    return project


def test_curation_tables_migrate_on_each_database(db_url):
    store = Store(db_url)
    assert {"review_flags", "review_decisions", "redactions", "embedding_cache", "exclusions",
            "dataset_versions"} <= set(store.table_names())
    assert "0003" in store.versions()
    store.close()


def test_qc_report_counts_rejections_with_reasons(project):
    report = qc_report(project)
    assert report["rejected"] == 1 and report["accepted"] == report["teacher_responses"] - 1
    assert report["by_reason"] == {"not_a_label": 1}
    assert report["examples"][0]["output"] == "no idea at all"
    assert "not one of the labels" in report["examples"][0]["message"]
    assert report["examples_without_usable_label"] == 1


def test_qc_catches_labels_outside_an_edited_label_set(project):
    yaml = (project.root / "stillroom.yaml").read_text()
    (project.root / "stillroom.yaml").write_text(yaml.replace("    - {name: other}\n", "    - {name: general}\n"))
    from stillroom.project import Project

    edited = Project.open(project.root)
    try:
        report = qc_report(edited)
        assert report["labels_outside_label_set"] == 6 and report["by_reason"]["label_not_in_label_set"] == 6
        assert all(r.label != "other" for r in curated_rows(edited))  # never trains on a label that is gone
    finally:
        edited.close()


def test_balance_oversamples_rare_labels_and_flagged_items_in_train_only(project):
    with project.store.engine.begin() as conn:
        splits = split_assignments(conn)
        flagged = next(i for i, s in sorted(splits.items()) if s == "train")
        flag_for_review(conn, flagged, "low agreement (2/3)")
    report = balance_report(project)
    before, after = report["train_before"], report["train_after_oversampling"]
    counts = before["counts"]
    assert counts["other"] < 6 < counts["billing"]
    assert before["imbalance_ratio"] == pytest.approx(max(counts.values()) / counts["other"], abs=0.01)
    assert after["counts"]["other"] == 18 and after["imbalance_ratio"] < before["imbalance_ratio"]
    rows = curated_rows(project)
    assert next(r for r in rows if r.example_id == flagged).copies >= 3
    assert all(r.copies == 1 for r in rows if r.split == "validation")
    train, val = training_pairs(project)
    assert sum(1 for _, lab in train if lab == "other") == 18
    assert len(val) == sum(1 for r in rows if r.split == "validation")


def test_snapshot_exports_read_back_by_their_consumers(project):
    result = snapshot(project)
    out = project.workspace / "datasets" / str(result["id"])
    assert result["created"] and result["path"] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = curated_rows(project)
    n_train_rows = sum(r.copies for r in rows if r.split == "train")
    assert manifest["counts"]["rows_by_split"] == {"train": n_train_rows, "validation": sum(r.split == "validation" for r in rows)}
    for name, meta in manifest["files"].items():  # the manifest's hashes are the files' hashes
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"]
    by_id = {e["example_id"]: e for e in manifest["examples"]}
    with project.store.engine.connect() as conn:
        hashes = dict(conn.execute(T.examples.select().with_only_columns(T.examples.c.id, T.examples.c.content_hash)).all())
    assert all(hashes[i] == e["content_hash"] for i, e in by_id.items())
    assert manifest["eval_lock"]["id"] == 1 and manifest["counts"]["redacted_examples"] == 1

    # OpenAI fine-tuning JSONL: exactly {"messages": [user, assistant]} per line.
    openai_rows = [json.loads(l) for l in (out / "openai" / "train.jsonl").read_text().splitlines()]
    assert len(openai_rows) == n_train_rows
    assert all(list(r) == ["messages"] and [m["role"] for m in r["messages"]] == ["user", "assistant"]
               and set(m) == {"role", "content"} for r in openai_rows for m in r["messages"])
    texts = [r["messages"][0]["content"] for r in openai_rows]
    assert "my card [CARD] was charged twice, mail me at [EMAIL]" in texts
    assert not any("4111" in t or "jo@example.com" in t for t in texts)  # exports are redacted

    # Parquet, through pyarrow and pandas.
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(out / "dataset.parquet")
    assert table.num_rows == n_train_rows + manifest["counts"]["rows_by_split"]["validation"]
    frame = table.to_pandas()
    assert set(frame["split"]) == {"train", "validation"} and (frame["label"] == "other").sum() >= 18
    assert frame["messages"].iloc[0][1]["role"] == "assistant"

    # The chat-messages JSONL that TRL / Axolotl read, through Hugging Face datasets.
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files={"train": str(out / "chat" / "train.jsonl"),
                                                   "validation": str(out / "chat" / "validation.jsonl")},
                               cache_dir=str(out.parent / ".hf-cache"))
    assert ds["train"].num_rows == n_train_rows
    first = ds["train"][0]
    assert first["messages"][-1] == {"role": "assistant", "content": first["label"]}

    again = snapshot(project)
    assert not again["created"] and again["id"] == result["id"]  # unchanged data: same version
    assert [v["id"] for v in list_versions(project)] == [result["id"]]


def test_snapshot_is_a_new_version_when_data_changes_and_refuses_a_broken_lock(project):
    first = snapshot(project, formats=["openai"])
    assert set(first["files"]) == {"openai/train.jsonl", "openai/validation.jsonl"}
    with project.store.engine.begin() as conn:
        train_id = next(i for i, s in sorted(split_assignments(conn).items()) if s == "train")
        flag_for_review(conn, train_id, "edge case")  # now oversampled: the training set changed
    second = snapshot(project, formats=["openai"])
    assert second["created"] and second["id"] != first["id"]
    with pytest.raises(DatasetError, match="unknown export format"):
        snapshot(project, formats=["csv"])
    with project.store.engine.begin() as conn:
        eval_id = next(i for i, s in split_assignments(conn).items() if s == "eval")
        conn.execute(update(T.examples).where(T.examples.c.id == eval_id).values(input="tampered"))
    with pytest.raises(LockError, match="edited"):
        snapshot(project)

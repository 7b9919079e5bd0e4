import json

import pytest
from sqlalchemy import update

from conftest import synthetic_rows, write_chat_jsonl
from stillroom.capture.importers import import_file
from stillroom.curate.lock import LeakageError, LockError, check_no_leakage, find_leaks, lock_eval, verify_lock
from stillroom.curate.split import exclude_examples, split_project
from stillroom.store import tables as T
from stillroom.store.records import split_assignments, split_rows


@pytest.fixture
def locked(make_project):
    project = make_project(synthetic_rows(30))
    import_file(project, project.root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    return project


def test_split_is_stratified_and_sticky(make_project, tmp_path):
    project = make_project(synthetic_rows(30))
    import_file(project, project.root / "data.jsonl")
    report = split_project(project)
    assert report.total == {"train": 54, "validation": 9, "calibration": 9, "eval": 18}
    with project.store.engine.connect() as conn:
        eval_labels = [label for _, label in split_rows(conn, "eval")]
        before = split_assignments(conn)
    assert {label: eval_labels.count(label) for label in set(eval_labels)} == {"billing": 6, "shipping": 6, "other": 6}
    again = split_project(project)
    assert sum(again.assigned.values()) == 0
    with project.store.engine.connect() as conn:
        assert split_assignments(conn) == before


def test_new_data_never_enters_a_locked_eval(locked, tmp_path):
    before = verify_lock(locked)
    write_chat_jsonl(tmp_path / "more.jsonl", synthetic_rows(20, seed=7))
    import_file(locked, tmp_path / "more.jsonl")
    report = split_project(locked)
    assert report.eval_locked and report.assigned["eval"] == 0 and sum(report.assigned.values()) > 0
    assert verify_lock(locked).manifest_sha256 == before.manifest_sha256


def test_lock_file_and_idempotent_lock(locked):
    data = json.loads((locked.workspace / "eval.lock.json").read_text())
    assert len(data["examples"]) == 18 and len(data["manifest_sha256"]) == 64
    assert lock_eval(locked).id == data["lock_id"]  # same split: same lock, no new row


def test_edited_eval_example_is_detected(locked):
    eval_id = json.loads((locked.workspace / "eval.lock.json").read_text())["examples"][0][0]
    with locked.store.engine.begin() as conn:
        conn.execute(update(T.examples).where(T.examples.c.id == eval_id).values(input="tampered text"))
    with pytest.raises(LockError, match=rf"1 example\(s\) edited \(ids {eval_id}\)"):
        verify_lock(locked)


def test_moved_example_and_tampered_file_are_detected(locked):
    path = locked.workspace / "eval.lock.json"
    data = json.loads(path.read_text())
    data["examples"] = data["examples"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(LockError, match="does not match eval lock"):
        verify_lock(locked)
    lock_eval(locked)  # rewrites the file from the store
    verify_lock(locked)
    train_id = next(i for i, s in split_assignments(locked.store.engine.connect()).items() if s == "train")
    with locked.store.engine.begin() as conn:
        conn.execute(update(T.splits).where(T.splits.c.example_id == train_id).values(split="eval"))
    with pytest.raises(LockError, match="added to eval"):
        verify_lock(locked)
    with pytest.raises(LockError, match="--relock"):
        lock_eval(locked)
    with pytest.raises(LockError, match="reason"):
        lock_eval(locked, relock=True)
    new = lock_eval(locked, reason="moved one example on purpose", relock=True)
    assert verify_lock(locked).id == new.id and new.reason == "moved one example on purpose"


def test_training_refuses_eval_inputs_even_case_and_space_folded(locked, tmp_path):
    from stillroom.train.runner import train_student

    with locked.store.engine.connect() as conn:
        ex, label = split_rows(conn, "eval")[0]
    copy = "  " + ex.input.upper().replace(" ", "   ") + " "
    write_chat_jsonl(tmp_path / "leak.jsonl", [(copy, label)])
    import_file(locked, tmp_path / "leak.jsonl")
    split_project(locked)
    leaks = find_leaks(locked)
    assert [l["eval_example_id"] for l in leaks] == [ex.id]
    with pytest.raises(LeakageError, match="1 training input"):
        train_student(locked, "encoder")
    assert exclude_examples(locked, [l["example_id"] for l in leaks]) == 1
    check_no_leakage(locked)


def test_training_refuses_without_a_lock(make_project):
    from stillroom.train.runner import train_student

    project = make_project(synthetic_rows(10))
    import_file(project, project.root / "data.jsonl")
    split_project(project)
    with pytest.raises(LockError, match="not locked"):
        train_student(project, "encoder")


def test_human_labelled_examples_fill_eval_first(make_project, tmp_path):
    rows = synthetic_rows(30)
    project = make_project(rows)
    import_file(project, project.root / "data.jsonl")
    gold = rows[:10]
    (tmp_path / "h.csv").write_text("input,output\n" + "".join(f"{t},{l}\n" for t, l in gold))
    import_file(project, tmp_path / "h.csv", role="human")
    split_project(project)
    with project.store.engine.connect() as conn:
        eval_inputs = {ex.input for ex, _ in split_rows(conn, "eval")}
    assert {t for t, _ in gold} <= eval_inputs and len(eval_inputs) == 18


def test_pinned_eval_file_then_lock_keeps_training_rows_out_of_eval(make_project, tmp_path):
    """An existing test set imported with split='eval' is the locked eval; later data never joins it."""
    project = make_project()
    write_chat_jsonl(tmp_path / "test.jsonl", synthetic_rows(5, seed=1))
    write_chat_jsonl(tmp_path / "train.jsonl", synthetic_rows(20, seed=2))
    import_file(project, tmp_path / "test.jsonl", split="eval")
    lock = lock_eval(project)
    assert len(lock.manifest) == 15
    with pytest.raises(Exception, match="eval split is locked"):
        import_file(project, tmp_path / "train.jsonl", split="eval")
    import_file(project, tmp_path / "train.jsonl")
    report = split_project(project)
    assert report.total["eval"] == 15 and report.assigned["eval"] == 0
    verify_lock(project)

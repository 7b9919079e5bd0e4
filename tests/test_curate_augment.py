"""`stillroom curate augment` against the fake OpenAI-compatible teacher on loopback: paraphrases
become tagged, train-only examples; eval inputs are never sent; re-runs and kill -9 pay nothing
twice; the budget stops the run; --verify drops label-changing paraphrases; bad answers are
recorded with their reason. Every test drives the real engine, store and MiniLM check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_chat_jsonl  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer, message_of  # noqa: E402
from test_label_engine import teacher_extra  # noqa: E402

from stillroom.capture.importers import import_file  # noqa: E402
from stillroom.cli.main import app  # noqa: E402
from stillroom.curate.augment import AugmentError, augment, parse_paraphrases  # noqa: E402
from stillroom.curate.datasets import curated_rows, snapshot, training_pairs  # noqa: E402
from stillroom.curate.lock import find_leaks, lock_eval, verify_lock  # noqa: E402
from stillroom.curate.split import split_project  # noqa: E402
from stillroom.label import label_examples  # noqa: E402
from stillroom.store import tables as T  # noqa: E402
from stillroom.store.records import split_assignments  # noqa: E402
from stillroom.tasks.base import ParseError  # noqa: E402

AUG = T.TABLES["augmentations"]
REQ = T.TABLES["augment_requests"]

TRAIN = [("my invoice is wrong", "billing"), ("i was charged twice on my card", "billing"),
         ("where is my parcel", "shipping"), ("the courier lost my package", "shipping"),
         ("hello, lovely weather today", "other"), ("thanks for the compliment", "other")]
EVAL = [("Where is my parcel? It was due yesterday", "shipping"), ("Can I get an invoice for last month", "billing"),
        ("hello there, how are you", "other")]
VALIDATION = [("my tracking number does not work", "shipping")]
CALIBRATION = [("please refund my payment", "billing")]
HELD_OUT = [t for t, _ in EVAL + VALIDATION + CALIBRATION]


@pytest.fixture
def server():
    with FakeServer(FakeOpenAI()) as s:
        yield s


def build(make_project, url: str, train=TRAIN, labeling: str = ""):
    """A project whose eval, validation and calibration inputs are pinned and the eval set locked."""
    project = make_project(extra=teacher_extra(url, labeling=labeling))
    for name, rows in (("eval", EVAL), ("train", train), ("validation", VALIDATION), ("calibration", CALIBRATION)):
        import_file(project, write_chat_jsonl(project.root / f"{name}.jsonl", rows), split=name)
        if name == "eval":
            lock_eval(project)
    return project


def ids_of(project, texts) -> list[int]:
    with project.store.engine.connect() as conn:
        by_text = dict(conn.execute(select(T.examples.c.input, T.examples.c.id)).all())
    return [by_text[t] for t in texts]


def rows_of(project, table, *where):
    with project.store.engine.connect() as conn:
        return conn.execute(select(table).where(*where).order_by(table.c.id)).all()


def test_paraphrases_become_tagged_train_only_examples_and_a_rerun_pays_nothing(make_project, server):
    project = build(make_project, server.url)

    report = augment(project)

    assert (report.parents_asked, report.calls_paid, report.created) == (6, 6, 12)
    assert server.fake.charged == 6 and server.fake.keyless == 0
    sent = [message_of(p) for p in server.fake.prompts]
    assert sorted(sent) == sorted(t for t, _ in TRAIN)  # eval, validation, calibration: never sent
    assert not any(held in p for p in server.fake.prompts for held in HELD_OUT)

    parent_of = {t: i for t, i in zip([t for t, _ in TRAIN], ids_of(project, [t for t, _ in TRAIN]))}
    label_of = dict(TRAIN)
    kept = rows_of(project, AUG, AUG.c.status == "kept")
    assert len(kept) == 12
    with project.store.engine.connect() as conn:
        splits = split_assignments(conn)
        examples = {r.id: r for r in conn.execute(select(T.examples))}
        labels = {r.example_id: r for r in conn.execute(select(T.labels).where(T.labels.c.provenance == "augmented"))}
    for row in kept:
        child, parent_text = examples[row.example_id], examples[row.parent_id].input
        assert parent_of[parent_text] == row.parent_id and child.input == row.text
        assert json.loads(child.tags) == ["augmented"] and child.source == "augment"
        assert splits[child.id] == "train"
        assert labels[child.id].label == label_of[parent_text] == row.label
    assert "Quick question: my invoice is wrong" in {examples[r.example_id].input for r in kept}

    # The lock and the leakage check hold; training sees the paraphrases in train only.
    verify_lock(project)
    assert find_leaks(project) == []
    train, val = training_pairs(project)
    assert ("Quick question: my invoice is wrong", "billing") in train and len(train) == 18
    assert {t for t, _ in val} == {t for t, _ in VALIDATION}
    augmented = [r for r in curated_rows(project) if r.augmented_from is not None]
    assert len(augmented) == 12 and {r.label_source for r in augmented} == {"augmented"}
    counts = snapshot(project, formats=["openai"])["counts"]
    assert counts["augmented_examples"] == 12 and counts["rows_by_split"] == {"train": 18, "validation": 1}

    # Splitting again moves nothing; plain labeling leaves the paraphrases alone (no paid call).
    before = dict(splits)
    assert sum(split_project(project).assigned.values()) == 0
    with project.store.engine.connect() as conn:
        assert split_assignments(conn) == before
    assert label_examples(project).examples == 0

    again = augment(project)
    assert (again.calls_paid, again.parents_asked, again.created, again.answers_processed) == (0, 0, 0, 0)
    assert server.fake.charged == 6 and len(rows_of(project, AUG)) == 12


def test_budget_stops_the_run_and_the_next_run_finishes_without_paying_twice(make_project, server):
    project = build(make_project, server.url)

    # Worst case per call: about 150 prompt tokens at $2/M plus 320 output tokens at $8/M (~$0.0029).
    first = augment(project, max_cost=0.006)

    assert first.stopped.startswith("budget") and first.calls_paid == 2 and first.calls_not_sent == 4
    assert first.created == 4 and first.spent_usd <= 0.006
    second = augment(project)
    assert second.calls_paid == 4 and second.created == 8 and not second.stopped
    assert server.fake.charged == 6 and max(server.fake.charged_by_key.values()) == 1
    assert len(rows_of(project, REQ)) == 6


def test_verify_drops_a_paraphrase_whose_teacher_label_differs(make_project, server):
    parent = "my invoice is wrong [[para:where is my parcel now|my invoice looks wrong to me]]"
    project = build(make_project, server.url, train=TRAIN + [(parent, "billing")])
    [parent_id] = ids_of(project, [parent])

    report = augment(project, ids=[parent_id], verify=True)

    assert report.created == 2
    assert {k: report.verify[k] for k in ("checked", "kept", "dropped", "awaiting")} == {
        "checked": 2, "kept": 1, "dropped": 1, "awaiting": 0}
    assert server.fake.charged == 3  # one paraphrase call, two label calls
    [dropped] = rows_of(project, AUG, AUG.c.status == "dropped")
    assert dropped.text == "where is my parcel now" and dropped.verified_label == "shipping"
    assert dropped.reason.startswith("label_changed") and "'billing'" in dropped.reason
    [kept] = rows_of(project, AUG, AUG.c.status == "kept")
    assert kept.verified_label == "billing"
    train, _ = training_pairs(project)
    assert ("my invoice looks wrong to me", "billing") in train
    assert not any(t == "where is my parcel now" for t, _ in train)
    assert augment(project, ids=[parent_id], verify=True).verify["checked"] == 0  # nothing left to check
    assert server.fake.charged == 3


def test_bad_answers_and_bad_paraphrases_are_recorded_with_a_reason(make_project, server):
    garbage = "[[garbage]] my card was charged"
    mixed = ("i need a refund for my bill [[para:   |WHERE IS MY PARCEL|where is my parcel?? it was due yesterday."
             "|refund me *400|a fine rewrite about my bill refund|A fine rewrite about  my bill refund|one too many]]")
    project = build(make_project, server.url, train=TRAIN + [(garbage, "billing"), (mixed, "billing")])
    garbage_id, mixed_id = ids_of(project, [garbage, mixed])

    report = augment(project, ids=[garbage_id, mixed_id], k=6)

    assert report.calls_paid == 2 and report.created == 1 and not report.failures
    reasons = {(r.parent_id, r.position): r.reason for r in rows_of(project, AUG, AUG.c.status == "rejected")}
    assert reasons[(garbage_id, -1)].startswith("unparseable: the answer 'Sure!")
    code = {pos: reason.split(":")[0] for (pid, pos), reason in reasons.items() if pid == mixed_id}
    assert code == {0: "empty", 1: "duplicate", 2: "near_held_out", 3: "over_long", 5: "duplicate", 6: "beyond_k"}
    [train_parcel] = ids_of(project, ["where is my parcel"])
    assert f"train example {train_parcel}" in reasons[(mixed_id, 1)]
    [eval_parcel] = ids_of(project, [EVAL[0][0]])
    assert f"eval example {eval_parcel} (cosine" in reasons[(mixed_id, 2)]
    assert report.rejected == {"unparseable": 1, "empty": 1, "duplicate": 2, "near_held_out": 1, "over_long": 1,
                               "beyond_k": 1}
    [kept] = rows_of(project, AUG, AUG.c.status == "kept")
    assert kept.text == "a fine rewrite about my bill refund"
    assert augment(project, ids=[garbage_id, mixed_id], k=6).calls_paid == 0  # recorded: not asked again
    assert server.fake.charged == 2


def test_parse_paraphrases_accepts_a_fenced_array_and_names_what_is_wrong():
    assert parse_paraphrases('Here you go:\n```json\n["a", "b"]\n```') == ["a", "b"]
    assert parse_paraphrases('["a, b", "c"]') == ["a, b", "c"]
    with pytest.raises(ParseError, match="holds no JSON array"):
        parse_paraphrases("a\nb")
    with pytest.raises(ParseError, match="is cut off"):
        parse_paraphrases('["a", "b"')
    with pytest.raises(ParseError, match="does not parse"):
        parse_paraphrases('["a", b]')


def test_caps_filters_and_refusals(make_project, server):
    project = build(make_project, server.url, train=TRAIN + [("my bill is too high", "billing")])
    eval_id = ids_of(project, [EVAL[0][0]])[0]
    with pytest.raises(AugmentError, match=f"example {eval_id} is in the eval split; only train"):
        augment(project, ids=[eval_id])
    with pytest.raises(AugmentError, match="unknown label"):
        augment(project, labels=["nope"])

    dry = augment(project, per_label_max=3, dry_run=True)
    assert server.fake.charged == 0 and not rows_of(project, REQ)
    assert dry.calls_total == 2 and dry.projected_usd > 0  # billing (3 train) is at the cap already
    assert dry.would_send[0]["messages"][0]["content"].startswith("Rewrite the message below in 2 different ways")

    report = augment(project, per_label_max=3)
    assert report.calls_paid == 2 and report.created == 2 and report.rejected == {"over_cap": 2}
    assert {lab: x["train"] + x["paraphrases_kept"] for lab, x in report.by_label.items()} == {
        "billing": 3, "shipping": 3, "other": 3}
    from stillroom.curate.balance import balance_report

    balance = balance_report(project)  # "before" is the data as labelled; paraphrases count after
    assert balance["train_before"]["counts"] == {"billing": 3, "shipping": 2, "other": 2}
    assert balance["train_after_oversampling"]["counts"] == {"billing": 3, "shipping": 3, "other": 3}
    assert balance["augmented_rows"] == 2


def test_a_paraphrase_of_an_eval_input_counts_as_leakage(make_project, server):
    project = build(make_project, server.url)
    [parent] = ids_of(project, ["my invoice is wrong"])
    augment(project, ids=[parent], k=1)
    with project.store.engine.begin() as conn:  # tampering: the parent moved into eval
        conn.execute(update(T.splits).where(T.splits.c.example_id == parent).values(split="eval"))
    [leak] = find_leaks(project)
    assert leak["eval_example_id"] == parent and leak["input"] == "Quick question: my invoice is wrong"


def test_cli_json_and_dry_run(make_project, server):
    project = build(make_project, server.url)
    runner = CliRunner()
    dry = runner.invoke(app, ["curate", "augment", "--dry-run", "--limit", "2", "-C", str(project.root)])
    assert dry.exit_code == 0, dry.output
    assert "Dry run, nothing sent: 2 paraphrase call(s)" in dry.stdout and server.fake.charged == 0
    out = runner.invoke(app, ["curate", "augment", "--json", "--k", "1", "-C", str(project.root)])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.stdout)
    assert payload["created"] == 6 and payload["calls_paid"] == 6
    bad = runner.invoke(app, ["curate", "augment", "--k", "0", "-C", str(project.root)])
    assert isinstance(bad.exception, AugmentError) and "--k must be between 1 and 20" in str(bad.exception)


def test_kill_9_mid_run_resumes_without_paying_twice(make_project):
    rows = [(f"my invoice number {i} is wrong", "billing") for i in range(12)]
    fake = FakeOpenAI(latency_s=0.3)  # bills on arrival, answers later: calls are in flight when killed
    with FakeServer(fake) as server:
        project = build(make_project, server.url, train=rows, labeling=", concurrency: 4")
        project.close()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "stillroom.cli.main", "curate", "augment", "--json", "-C", str(project.root)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        deadline = time.monotonic() + 60
        while fake.charged < 5:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = subprocess.run(cmd, capture_output=True, env=env, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert fake.charged == 12 and max(fake.charged_by_key.values()) == 1 and fake.keyless == 0
    assert report["resumed_in_flight"] >= 1 and report["parents_resumed"] >= 1
    with project.store.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(AUG).where(AUG.c.status == "kept")).scalar_one()
        requests = conn.execute(select(func.count()).select_from(REQ)).scalar_one()
    assert (n, requests) == (24, 12)

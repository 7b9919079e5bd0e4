"""Live labeling against a fake OpenAI-compatible teacher on loopback: faults, retries, exact
billing, consensus, budget, bad inputs. Every test drives the real engine and the real backend."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_rows  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402

from stillroom.capture.importers import import_file  # noqa: E402
from stillroom.label import LabelingError, label_examples  # noqa: E402
from stillroom.store import tables as T  # noqa: E402
from stillroom.store.records import get_or_add_example, teacher_labels  # noqa: E402

FLAGS = T.TABLES["label_flags"]
INTENTS = T.TABLES["label_intents"]


def teacher_extra(url: str, labeling: str = "", teacher: str = "", db: str = "") -> str:
    return (f"teacher: {{backend: openai, base_url: '{url}', model: fake-teacher, timeout_s: 0.5, "
            f"price_per_million_input_tokens: 2.0, price_per_million_output_tokens: 8.0{teacher}}}\n"
            f"labeling: {{concurrency: 8, backoff_initial_s: 0.01, backoff_max_s: 0.05{labeling}}}\n" + db)


def add_inputs(project, texts: list[str]) -> list[int]:
    """Unlabelled examples, imported the way a user would (input-only JSONL)."""
    path = project.root / "inputs.jsonl"
    path.write_text("".join(json.dumps({"input": t}) + "\n" for t in texts), encoding="utf-8")
    import_file(project, path)
    with project.store.engine.connect() as conn:
        return [conn.execute(select(T.examples.c.id).where(T.examples.c.input == t)).scalar_one() for t in texts]


def labels_of(project) -> dict[str, str]:
    with project.store.engine.connect() as conn:
        labels = teacher_labels(conn)
        return {text: labels[i] for i, text in conn.execute(select(T.examples.c.id, T.examples.c.input))
                if i in labels}


def count(project, table, *where) -> int:
    with project.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


@pytest.fixture
def server():
    with FakeServer(FakeOpenAI()) as s:
        yield s


def test_labels_every_unlabelled_input_once_and_records_each_call(make_project, server, db_url):
    rows = synthetic_rows(8)
    project = make_project(extra=teacher_extra(server.url, db=f"database: {{url: '{db_url}'}}\n"))
    add_inputs(project, [t for t, _ in rows])

    report = label_examples(project)

    assert report.calls_paid == len(rows) and report.labelled == len(rows) and not report.failures
    assert labels_of(project) == dict(rows)  # the fake teacher answers by keyword, like the truth
    assert server.fake.charged == len(rows) and server.fake.keyless == 0
    with project.store.engine.connect() as conn:
        resp = conn.execute(select(T.responses).where(T.responses.c.origin == "live")).all()
        label_rows = conn.execute(select(T.labels)).all()
    assert len(resp) == len(rows)
    for r in resp:  # tokens, cost from the configured prices, latency: all recorded per call
        assert r.input_tokens > 0 and r.output_tokens == 1 and r.latency_ms > 0
        assert r.cost_usd == pytest.approx((r.input_tokens * 2.0 + r.output_tokens * 8.0) / 1e6)
    assert report.spent_usd == pytest.approx(sum(r.cost_usd for r in resp))
    assert {(r.provenance, r.decided_by) for r in label_rows} == {("teacher", "teacher:fake-teacher n=1 agreement=1.00")}
    assert all(r.response_id is not None for r in label_rows)

    again = label_examples(project)  # nothing left: nothing sent, nothing paid
    assert (again.examples, again.calls_paid) == (0, 0)
    assert server.fake.charged == len(rows)


def test_faults_are_retried_honouring_retry_after_and_never_billed_twice(make_project, server):
    rows = synthetic_rows(6)
    project = make_project(extra=teacher_extra(server.url))
    add_inputs(project, [t for t, _ in rows])
    server.fake.hang_s = 2.0  # a "timeout" answer arrives after the client's 0.5 s timeout
    server.fake.faults.extend(["429", "500", "503", "timeout", "malformed", "500"])

    report = label_examples(project)

    assert report.labelled == len(rows) and not report.failures
    assert report.retries == 6
    assert server.fake.faults_served == {"429": 1, "500": 2, "503": 1, "timeout": 1, "malformed": 1}
    # The timed-out and the garbled answers were billed once; their retries were replays.
    assert server.fake.charged == len(rows)
    assert max(server.fake.charged_by_key.values()) == 1
    assert server.fake.replayed == 2
    assert labels_of(project) == dict(rows)
    # Retry-After: 1 was honoured: the rate-limited call came back no sooner than a second later.
    key = server.fake.fault_keys["429"][0]
    first, second = server.fake.seen_at[key][:2]
    assert second - first >= 0.99


def test_a_call_that_keeps_failing_is_recorded_and_the_run_goes_on(make_project, server):
    project = make_project(extra=teacher_extra(server.url, labeling=", max_retries: 2"))
    ids = add_inputs(project, ["my invoice is wrong", "[[fail]] where is my parcel", "hello there"])

    report = label_examples(project)

    assert report.labelled == 2 and report.calls_failed == 1
    assert report.failures[0]["example_id"] == ids[1]
    assert "HTTP 500" in report.failures[0]["reason"] and "after 3 attempts" in report.failures[0]["reason"]
    with project.store.engine.connect() as conn:
        intent = conn.execute(select(INTENTS).where(INTENTS.c.example_id == ids[1])).one()
    assert (intent.status, intent.attempts) == ("failed", 3) and "HTTP 500" in intent.error
    # The next run retries only the failed call.
    before = server.fake.requests
    again = label_examples(project)
    assert again.calls_failed == 1 and server.fake.requests - before == 3


def test_consensus_of_three_samples(make_project, server):
    project = make_project(extra=teacher_extra(server.url, labeling=", samples: 3, temperature: 0.8, min_agreement: 0.7"))
    texts = {
        "clear": "[[answers:billing]] one",
        "two_of_three": "[[answers:billing,billing,shipping]] two",
        "tie": "[[answers:billing,shipping,other]] three",
        "one_invalid": "[[answers:shipping,no idea,shipping]] four",
        "all_invalid": "[[garbage]] five",
    }
    ids = dict(zip(texts, add_inputs(project, list(texts.values()))))

    report = label_examples(project)

    assert server.fake.charged == 15 and set(server.fake.temperatures) == {0.8}
    labels = labels_of(project)
    assert labels == {texts["clear"]: "billing", texts["two_of_three"]: "billing",
                      texts["one_invalid"]: "shipping"}  # a tie and no valid answer give no label
    with project.store.engine.connect() as conn:
        decided = dict(conn.execute(select(T.labels.c.example_id, T.labels.c.decided_by)).all())
        flags = [(r.example_id, r.kind, r.agreement) for r in conn.execute(select(FLAGS))]
    assert decided[ids["clear"]] == "teacher:fake-teacher n=3 agreement=1.00"
    assert decided[ids["two_of_three"]] == "teacher:fake-teacher n=3 agreement=0.67"
    assert decided[ids["one_invalid"]] == "teacher:fake-teacher n=3 agreement=0.67"
    kinds = sorted((e, k) for e, k, _ in flags)
    assert kinds == sorted([
        (ids["two_of_three"], "low_agreement"),  # 0.67 < min_agreement 0.7
        (ids["tie"], "tie"),
        (ids["one_invalid"], "invalid_output"), (ids["one_invalid"], "low_agreement"),
        (ids["all_invalid"], "invalid_output"), (ids["all_invalid"], "invalid_output"),
        (ids["all_invalid"], "invalid_output"), (ids["all_invalid"], "no_valid_answer"),
    ])
    assert report.labelled == 3 and report.no_label == 2
    assert report.flagged == {"low_agreement": 2, "tie": 1, "invalid_output": 4, "no_valid_answer": 1}

    # Re-running pays nothing and flags nothing twice; the undecided ones stay for review.
    again = label_examples(project)
    assert again.calls_paid == 0 and again.calls_cached == 6 and again.flagged == {}
    assert server.fake.charged == 15 and count(project, FLAGS) == len(flags)


def test_budget_stops_before_crossing_and_keeps_the_work(make_project, server):
    rows = synthetic_rows(10)  # 30 inputs
    # Expensive teacher: each call costs about $0.03-0.04, and max_tokens 16 is reserved per call.
    project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 4",
                                               teacher=", price_per_million_input_tokens: 1000, "
                                                       "price_per_million_output_tokens: 1000"))
    add_inputs(project, [t for t, _ in rows])

    report = label_examples(project, max_cost=0.5)

    assert report.stopped and report.stopped.startswith("budget")
    assert 0 < report.calls_paid < len(rows) and report.calls_not_sent == len(rows) - report.calls_paid
    assert report.spent_usd <= 0.5
    assert report.labelled == report.calls_paid == len(labels_of(project)) == server.fake.charged
    assert report.projected_usd > report.spent_usd  # what all 30 would cost at this rate

    rest = label_examples(project)  # no budget: finishes the rest, paying only for the rest
    assert rest.calls_cached == 0 and rest.examples == len(rows) - report.labelled
    assert server.fake.charged == len(rows) and len(labels_of(project)) == len(rows)


def test_bad_inputs_are_reported_and_the_run_continues(make_project, server):
    project = make_project(extra=teacher_extra(server.url, labeling=", max_input_chars: 200"))
    long_text = "my invoice " + "x" * 300
    with project.store.engine.begin() as conn:
        ids = {name: get_or_add_example(conn, text, "api", [])[0] for name, text in {
            "ok": "a refund please",
            "empty": "   ",
            "nul": "payment\x00\x01 binary",
            "mojibake": "my parcel \ufffd\ufffd arrived broken",
            "long": long_text,
        }.items()}

    report = label_examples(project)

    assert {r["example_id"]: r["reason"] for r in report.rejected} == {
        ids["empty"]: "empty input (nothing to label)",
        ids["nul"]: "contains NUL characters: binary data, not text",
        ids["long"]: "input is 311 characters, over labeling.max_input_chars (200); "
                     "set labeling.over_long_inputs: truncate to label its start",
    }
    assert report.labelled == 2 and server.fake.charged == 2
    assert report.flagged == {"bad_input": 3, "encoding": 1}
    with project.store.engine.connect() as conn:
        kinds = dict(conn.execute(select(FLAGS.c.example_id, FLAGS.c.kind)).all())
    assert kinds[ids["mojibake"]] == "encoding"

    project.config.labeling.over_long_inputs = "truncate"
    truncated = label_examples(project)
    assert truncated.labelled == 1 and truncated.flagged == {"truncated": 1}
    assert labels_of(project)[long_text] == "billing"


def test_connection_refused_is_retried_until_the_teacher_comes_up(make_project):
    import socket
    import threading

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on `port` until the server starts below
    project = make_project(extra=teacher_extra(f"http://127.0.0.1:{port}/v1",
                                               labeling=", max_retries: 60, backoff_max_s: 0.1"))
    add_inputs(project, ["my invoice", "my parcel"])
    fake = FakeOpenAI()
    result = {}
    run = threading.Thread(target=lambda: result.update(report=label_examples(project)))
    run.start()
    time.sleep(0.5)
    with FakeServer(fake, port=port):
        run.join(30)
    report = result["report"]
    assert report.labelled == 2 and not report.failures and report.retries >= 2
    assert fake.charged == 2


def test_a_wrong_key_stops_the_run_at_once(make_project, server):
    server.fake.refuse_with = 401
    project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 1"))
    add_inputs(project, [t for t, _ in synthetic_rows(5)])
    report = label_examples(project)
    assert report.stopped and "Incorrect API key" in report.stopped
    assert server.fake.requests == 1 and report.calls_not_sent == 14


def test_recorded_teacher_cannot_label(make_project):
    project = make_project()
    with pytest.raises(LabelingError, match="teacher.backend is 'recorded'"):
        label_examples(project)

"""`stillroom label --batch` against the fake server's files + batches endpoints: submit, restart,
resume polling (never resubmit), record at the batch price; and a `kill -9` while the batch is
being created is adopted, not created twice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_rows  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, labels_of, teacher_extra  # noqa: E402
from test_label_resume import kill_when, start_label  # noqa: E402

from stillroom.label import label_examples  # noqa: E402
from stillroom.project import Project  # noqa: E402
from stillroom.store import tables as T  # noqa: E402

BATCHES = T.TABLES["label_batches"]
POLL = ", batch_poll_interval_s: 0.05"


def test_batch_round_trip_with_a_restart_in_between(make_project):
    rows = synthetic_rows(6)
    fake = FakeOpenAI(batch_polls=3)
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=POLL))
        ids = add_inputs(project, [t for t, _ in rows] + ["[[fail]] my parcel"])

        submitted = label_examples(project, batch=True, wait=False)
        assert submitted.batch["jobs_submitted"] == 1 and submitted.waiting_on_batch == 19
        assert fake.batches_created == 1 and fake.charged == 0 and labels_of(project) == {}

        # A live run meanwhile must not pay for what the batch owes.
        live = label_examples(project)
        assert live.waiting_on_batch == 19 and live.calls_paid == 0 and fake.requests == 0

        project.close()  # "restart": a fresh process opens the project and resumes polling
        resumed = label_examples(Project.open(project.root), batch=True)

    assert resumed.batch["jobs_resumed"] == 1 and resumed.batch["jobs_submitted"] == 0
    assert fake.batches_created == 1 and fake.charged == 18
    assert resumed.calls_paid == 18 and resumed.labelled == 18
    assert resumed.failures == [{"example_id": ids[-1], "sample": 0,
                                 "reason": "batch request failed: this input always fails"}]
    assert labels_of(project) == dict(rows)
    with project.store.engine.connect() as conn:
        costs = conn.execute(select(T.responses.c.input_tokens, T.responses.c.output_tokens,
                                    T.responses.c.cost_usd)).all()
        job = conn.execute(select(BATCHES)).one()
    for tin, tout, cost in costs:  # half the live price (labeling.batch_price_factor 0.5)
        assert cost == pytest.approx(0.5 * (tin * 2.0 + tout * 8.0) / 1e6)
    assert (job.status, job.provider_status, job.n_requests) == ("done", "completed", 19)


def test_kill_9_while_creating_the_batch_adopts_it_instead_of_submitting_twice(make_project):
    rows = synthetic_rows(4)
    fake = FakeOpenAI(batch_polls=2, create_batch_delay_s=30)  # created at once, answered late
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=POLL))
        add_inputs(project, [t for t, _ in rows])
        project.close()
        proc = start_label(project, "--batch", "--no-wait")
        kill_when(proc, fake.received_create_batch.is_set)
        assert fake.batches_created == 1
        with Project.open(project.root).store.engine.connect() as conn:
            assert conn.execute(select(BATCHES.c.status, BATCHES.c.provider_batch_id)).one() == ("submitting", None)

        fake.create_batch_delay_s = 0
        proc = start_label(project, "--batch")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["batch"]["jobs_resumed"] == 1 and report["batch"]["jobs_submitted"] == 0
    assert fake.batches_created == 1 and fake.charged == len(rows)
    assert labels_of(project) == dict(rows)


def test_calls_left_in_flight_by_a_killed_live_run_go_out_live_before_the_batch(make_project):
    rows = synthetic_rows(10)
    fake = FakeOpenAI(latency_s=0.3, batch_polls=2)  # bills on arrival: killed calls are billed, unrecorded
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 4" + POLL))
        add_inputs(project, [t for t, _ in rows])
        project.close()
        proc = start_label(project)
        kill_when(proc, lambda: fake.charged >= 6)

        report = label_examples(Project.open(project.root), batch=True)

    assert report.resumed_in_flight >= 1 and 1 <= fake.replayed <= report.resumed_in_flight
    assert fake.charged == len(rows)  # the in-flight calls were replayed live, not batched again
    with project.store.engine.connect() as conn:
        batched = conn.execute(select(func.count()).select_from(T.responses)
                               .where(T.responses.c.latency_ms.is_(None))).scalar_one()
        answers = conn.execute(select(func.count()).select_from(T.responses)).scalar_one()
    assert batched == sum(r["requests"] for r in report.batch["jobs"]) and answers == len(rows)
    assert labels_of(project) == dict(rows)

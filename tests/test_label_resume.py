"""`kill -9` in the middle of `stillroom label`, again and again: the resumed runs lose no paid call
and pay for none twice. The CLI runs in a subprocess; the fake teacher (in this process) counts
billed calls and honours Idempotency-Key like a real provider that supports it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_rows  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, labels_of, teacher_extra  # noqa: E402

from stillroom.store import tables as T  # noqa: E402

INTENTS = T.TABLES["label_intents"]


def start_label(project, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "STILLROOM_DEBUG": "1"}
    return subprocess.Popen([sys.executable, "-m", "stillroom.cli.main", "label", "-C", str(project.root), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        assert time.monotonic() < deadline, "condition never reached"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_at_any_point_resumes_without_lost_or_duplicated_paid_calls(make_project, db_url):
    rows = synthetic_rows(20)  # 60 inputs x 2 samples = 120 paid calls
    fake = FakeOpenAI(latency_s=0.25)  # bills on arrival, answers 250 ms later: calls are in flight when killed
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 8, samples: 2, temperature: 0.7",
                                                   db=f"database: {{url: '{db_url}'}}\n"))
        add_inputs(project, [t for t, _ in rows])
        project.close()  # the CLI owns the store while it runs

        # 1: killed as its first calls go out; 2: killed mid-run; 3: killed near the end.
        for threshold in (1, 50, 100):
            proc = start_label(project)
            kill_when(proc, lambda: fake.charged >= threshold)
        proc = start_label(project)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        report = json.loads(out)

    # Exactly one billed answer per call; the calls in flight at each kill came back as replays.
    assert fake.charged == 120
    assert len(fake.charged_by_key) == 120 and max(fake.charged_by_key.values()) == 1
    assert fake.replayed >= 1 and fake.keyless == 0
    assert report["resumed_in_flight"] >= 1  # the last kill left calls in flight; the resume said so
    with project.store.engine.connect() as conn:
        live = conn.execute(select(func.count()).select_from(T.responses).where(T.responses.c.origin == "live")).scalar_one()
        n_labels = conn.execute(select(func.count()).select_from(T.labels)).scalar_one()
        statuses = dict(conn.execute(select(INTENTS.c.status, func.count()).group_by(INTENTS.c.status)).all())
    assert live == 120 and n_labels == 60 and statuses == {"done": 120}
    assert labels_of(project) == dict(rows)

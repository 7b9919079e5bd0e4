"""`teacher.backend: litellm` through litellm's OpenAI-compatible route ("openai/<name>" with
api_base on loopback): labels, retries on litellm's exceptions with the server's Retry-After, and
the Idempotency-Key reaches the server.

litellm pins openai<3 and huggingface-hub<2, which conflict with the training extras' versions, so
it is not in the dev environment; this test runs where litellm is installed (e.g. a separate venv:
see docs/labeling.md) and skips elsewhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
pytest.importorskip("litellm")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_rows  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, labels_of  # noqa: E402

from stillroom.label import label_examples  # noqa: E402


def test_litellm_teacher_labels_with_retries_and_idempotency_keys(make_project, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test")
    rows = synthetic_rows(3)
    fake = FakeOpenAI(hang_s=2.0)
    with FakeServer(fake) as server:
        project = make_project(extra=(
            f"teacher: {{backend: litellm, model: 'openai/fake-teacher', base_url: '{server.url}', "
            "api_key_env: FAKE_KEY, timeout_s: 0.5}\n"
            "labeling: {concurrency: 4, backoff_initial_s: 0.01, backoff_max_s: 0.05}\n"))
        add_inputs(project, [t for t, _ in rows])
        fake.faults.extend(["429", "500", "timeout"])

        report = label_examples(project)

    assert report.labelled == len(rows) and not report.failures and report.retries == 3
    assert labels_of(project) == dict(rows)
    assert fake.keyless == 0 and fake.charged == len(rows) and fake.replayed == 1
    key = fake.fault_keys["429"][0]
    first, second = fake.seen_at[key][:2]
    assert second - first >= 0.99  # Retry-After: 1, read from litellm's exception

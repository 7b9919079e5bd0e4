"""`stillroom label --ray` on a local Ray instance: the calls fan out over Ray workers, the driver
records them, and the store ends up exactly as a live run leaves it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

ray = pytest.importorskip("ray")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import synthetic_rows  # noqa: E402
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, labels_of, teacher_extra  # noqa: E402

from stillroom.label import label_examples  # noqa: E402
from stillroom.store import tables as T  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_fans_out_and_the_driver_records_everything_once(make_project, local_ray):
    rows = synthetic_rows(10)
    fake = FakeOpenAI(latency_s=0.02)
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 8, ray_workers: 2, "
                                                                        "samples: 2, temperature: 0.5"))
        add_inputs(project, [t for t, _ in rows] + ["[[answers:billing,shipping]] split"])
        fake.faults.extend(["429", "500"])  # retried inside the workers
        fake.retry_after = "0"

        report = label_examples(project, use_ray=True)

        assert report.mode == "ray" and report.calls_paid == 62 and not report.failures
        assert report.retries == 2 and report.labelled == 30 and report.flagged == {"tie": 1}
        assert fake.charged == 62 and max(fake.charged_by_key.values()) == 1
        labels = labels_of(project)
        assert labels == dict(rows)
        with project.store.engine.connect() as conn:
            n = conn.execute(select(func.count()).select_from(T.responses)).scalar_one()
        assert n == 62

        again = label_examples(project, use_ray=True)  # only the tie is left; nothing is paid again
        assert again.examples == 1 and again.calls_paid == 0 and fake.charged == 62


def test_ray_workers_fall_back_when_the_endpoint_refuses_response_format(tmp_path, local_ray):
    import json

    from stillroom.project import Project, init_project

    fake = FakeOpenAI()
    fake.refuse_response_format = True
    fake.scripted = {f"invoice {i}": [json.dumps({"vendor": f"V{i}"})] for i in range(6)}
    schema = {"type": "object", "properties": {"vendor": {"type": "string"}}}
    with FakeServer(fake) as server:
        init_project(tmp_path / "p")
        (tmp_path / "p" / "stillroom.yaml").write_text(
            f"task: {{name: inv, type: extraction, schema: {json.dumps(schema)}}}\n" + teacher_extra(
                server.url, labeling=", concurrency: 2, ray_workers: 1"), encoding="utf-8")
        project = Project.open(tmp_path / "p")
        add_inputs(project, [f"invoice {i}" for i in range(6)])

        report = label_examples(project, use_ray=True)
        assert report.labelled == 6 and not report.failures and report.structured_output.startswith("refused")
        assert fake.charged == 6 and max(fake.charged_by_key.values()) == 1
        assert label_examples(project, use_ray=True).calls_paid == 0 and fake.charged == 6
        project.close()

"""The gateway end to end: a real project (trained encoder student, real evaluation), a real
OpenAI-compatible fake teacher on loopback for fault injection, and the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from stillroom.config import UnknownStudent
from stillroom.store import tables as T

openai = pytest.importorskip("openai")

LABELS = ("billing", "shipping", "other")
TEMPLATES = {
    "billing": [
        "I was charged twice for my {x} subscription",
        "Why is there an extra fee on my invoice for {x}?",
        "Please update the credit card used to pay for {x}",
        "My bill for {x} shows the wrong amount",
        "I need a receipt for the {x} payment",
    ],
    "shipping": [
        "Where is my package with the {x}?",
        "The delivery of my {x} is three days late",
        "Can you ship the {x} to a different address?",
        "The tracking number for my {x} order has not updated",
        "The courier left my {x} parcel at the wrong house",
    ],
    "other": [
        "Do you have a shop near {x}?",
        "Thanks a lot, the advice about {x} was lovely",
        "Are you hiring people in {x}?",
        "Tell me a joke about {x}",
        "Who founded your company, was it someone from {x}?",
    ],
}
FILLERS = ["lamp", "sofa", "kettle", "jacket", "printer", "blender", "bicycle", "tent", "guitar", "camera"]
TEACHER_MODEL = "gpt-test-teacher"
TASK_NAME = "support"


class ThreadedServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class FakeTeacher:
    """A real OpenAI-compatible server whose answers and failures the test controls."""

    def __init__(self):
        self.mode = "ok"  # ok | fail | hang
        self.answer = "other"
        self.received: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.received.append(body)
            if self.mode == "fail":
                return JSONResponse({"error": {"message": "teacher overloaded", "type": "server_error"}}, 500)
            waited = 0.0
            while self.mode == "hang" and waited < 5:
                await asyncio.sleep(0.05)
                waited += 0.05
            return {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42},
            }


def _config(teacher_port: int) -> str:
    return f"""\
task:
  name: {TASK_NAME}
  labels:
    - name: billing
      description: charges, invoices, payment methods
    - name: shipping
      description: delivery status, addresses, tracking
    - name: other
      description: anything else
teacher:
  backend: openai
  model: {TEACHER_MODEL}
  base_url: http://127.0.0.1:{teacher_port}/v1
  api_key_env: STILLROOM_TEST_UNSET_KEY
  timeout_s: 1.0
  max_tokens: 7
  price_per_million_input_tokens: 1.0
  price_per_million_output_tokens: 4.0
students:
  - name: encoder
    kind: encoder
  - name: spare
    kind: encoder
    seed: 1
routing:
  target_agreement: 0.9
"""


@pytest.fixture(scope="module")
def teacher():
    fake = FakeTeacher()
    with ThreadedServer(fake.app) as server:
        fake.port = server.port
        yield fake


@pytest.fixture(scope="module")
def project(tmp_path_factory, teacher):
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.project import Project, init_project
    from stillroom.train.runner import train_student

    root = tmp_path_factory.mktemp("gateway")
    os.environ.pop("STILLROOM_TEST_UNSET_KEY", None)
    init_project(root, name=TASK_NAME)
    (root / "stillroom.yaml").write_text(_config(teacher.port), encoding="utf-8")
    lines = [
        json.dumps({"messages": [{"role": "user", "content": t.format(x=x)},
                                 {"role": "assistant", "content": label}]})
        for label in LABELS for t in TEMPLATES[label] for x in FILLERS
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    proj = Project.open(root)
    assert import_file(proj, root / "data.jsonl").labels_added == 150
    split_project(proj)
    lock_eval(proj)
    train_student(proj, "encoder")
    evaluate_student(proj, "encoder")
    train_student(proj, "spare")  # trained, never evaluated
    yield proj
    proj.close()


@pytest.fixture(scope="module")
def gateway(project):
    from stillroom.serve.app import create_app

    app = create_app(project)
    with ThreadedServer(app) as server:
        server.app = app
        yield server


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="x", max_retries=0, timeout=20)


def logged(project, request_id: str) -> dict:
    with project.store.engine.connect() as conn:
        row = conn.execute(select(T.routed_requests).where(T.routed_requests.c.request_id == request_id)).one()
    return dict(row._mapping)


def threshold(gateway) -> float:
    return gateway.app.state.routing.threshold


def test_confident_input_is_answered_by_the_student(client, gateway, project, teacher):
    before = len(teacher.received)
    raw = client.chat.completions.with_raw_response.create(
        model=TASK_NAME, messages=[{"role": "user", "content": "I was charged twice for my tent subscription"}],
    )
    completion = raw.parse()
    assert raw.headers["x-stillroom-route"] == "student"
    assert float(raw.headers["x-stillroom-confidence"]) >= threshold(gateway)
    assert completion.choices[0].message.content == "billing"
    assert completion.model == TASK_NAME and completion.id.startswith("chatcmpl-")
    assert completion.choices[0].finish_reason == "stop"
    assert len(teacher.received) == before  # the teacher was not asked

    row = logged(project, completion.id)
    assert (row["route"], row["status_code"], row["student"]) == ("student", 200, "encoder")
    assert row["output"] == "billing" and row["student_label"] == "billing"
    assert row["cost_usd"] == 0 and row["input_tokens"] is None
    assert row["threshold"] == threshold(gateway)


def test_unsure_input_goes_to_the_teacher_with_the_task_prompt(client, gateway, project, teacher):
    student = gateway.app.state.routing.student
    candidates = ["ok", "hmm", "the", "refund shipping invoice delivery", "zzzz qqq", "what now", "package bill"]
    confidences = {c: p.confidence for c, p in zip(candidates, student.predict(candidates))}
    unsure = min(confidences, key=confidences.get)
    assert confidences[unsure] < threshold(gateway), (confidences, threshold(gateway))

    teacher.answer = "shipping"
    raw = client.chat.completions.with_raw_response.create(
        model=TASK_NAME, messages=[{"role": "user", "content": unsure}],
    )
    completion = raw.parse()
    assert raw.headers["x-stillroom-route"] == "teacher"
    assert float(raw.headers["x-stillroom-confidence"]) < threshold(gateway)
    assert completion.choices[0].message.content == "shipping"
    assert completion.model == TEACHER_MODEL
    assert completion.usage.prompt_tokens == 40 and completion.usage.completion_tokens == 2
    sent = teacher.received[-1]
    assert sent["model"] == TEACHER_MODEL and sent["max_tokens"] == 7  # config.teacher.max_tokens
    assert len(sent["messages"]) == 1 and sent["messages"][0]["role"] == "user"
    assert sent["messages"][0]["content"] == project.task.teacher_prompt(unsure)

    row = logged(project, completion.id)
    assert (row["route"], row["status_code"], row["output"]) == ("teacher", 200, "shipping")
    assert row["student_confidence"] < row["threshold"]
    assert (row["input_tokens"], row["output_tokens"]) == (40, 2)
    assert row["cost_usd"] == pytest.approx((40 * 1.0 + 2 * 4.0) / 1e6)


def test_asking_for_the_teacher_skips_the_student(client, project, teacher):
    teacher.answer = "other"
    messages = [{"role": "system", "content": "You sort mail."},
                {"role": "user", "content": [{"type": "text", "text": "I was charged twice for my lamp"}]}]
    raw = client.chat.completions.with_raw_response.create(model=TEACHER_MODEL, messages=messages, max_tokens=3)
    completion = raw.parse()
    assert raw.headers["x-stillroom-route"] == "teacher"
    assert "x-stillroom-confidence" not in raw.headers
    assert completion.choices[0].message.content == "other"
    sent = teacher.received[-1]
    assert sent["messages"] == messages and sent["max_tokens"] == 3  # the client's own prompt, unchanged

    row = logged(project, completion.id)
    assert (row["route"], row["status_code"], row["student"]) == ("teacher", 200, None)
    assert row["input"] == "I was charged twice for my lamp"


@pytest.mark.parametrize("mode, message", [("fail", "teacher overloaded"), ("hang", "did not answer within")])
def test_teacher_down_is_a_502_and_the_gateway_keeps_serving(client, project, teacher, mode, message):
    teacher.mode = mode
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=TEACHER_MODEL, messages=[{"role": "user", "content": "hello"}])
    finally:
        teacher.mode = "ok"
    err = caught.value
    assert err.status_code == 502
    body = err.response.json()["error"]
    assert body["type"] == "upstream_error" and message in body["message"]
    assert set(body) == {"message", "type", "param", "code"}

    row = logged(project, err.response.headers["x-stillroom-request-id"])
    assert (row["route"], row["status_code"]) == ("error", 502) and message in row["error"]

    after = client.chat.completions.create(
        model=TASK_NAME, messages=[{"role": "user", "content": "Where is my package with the kettle?"}])
    assert after.choices[0].message.content == "shipping"


@pytest.mark.parametrize("body, problem", [
    ({"model": TASK_NAME}, "'messages' is required"),
    ({"model": TASK_NAME, "messages": "hi"}, "'messages' must be a non-empty list"),
    ({"model": TASK_NAME, "messages": [{"role": "system", "content": "x"}]}, "no message with role 'user'"),
    ({"model": TASK_NAME, "messages": [{"role": "user", "content": 5}]}, "must be a string or a list"),
    ({"model": TASK_NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}, "'max_tokens'"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
])
def test_bad_requests_are_400_in_openai_shape(gateway, project, body, problem):
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and problem in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    row = logged(project, r.headers["x-stillroom-request-id"])
    assert (row["route"], row["status_code"]) == ("error", 400)


def test_unknown_model_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.json()["error"]["code"] == "model_not_found"


def test_streaming_reassembles_to_the_label(client, project):
    stream = client.chat.completions.create(
        model=TASK_NAME, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "The delivery of my guitar is three days late"}],
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "shipping"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 1
    row = logged(project, chunks[0].id)
    assert (row["route"], row["status_code"], row["output"]) == ("student", 200, "shipping")


def test_models_and_health(client, gateway):
    assert [m.id for m in client.models.list()] == [TASK_NAME, TEACHER_MODEL]
    health = httpx.get(f"http://127.0.0.1:{gateway.port}/health").json()
    assert health["status"] == "ok" and health["student"] == "encoder" and health["teacher"] == TEACHER_MODEL
    assert health["threshold"] == threshold(gateway)


def test_gateway_key_is_required_when_set(project, monkeypatch):
    from stillroom.serve.app import create_app

    monkeypatch.setenv("STILLROOM_GATEWAY_KEY", "s3cret")
    with ThreadedServer(create_app(project)) as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert caught.value.response.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        answer = good.chat.completions.create(
            model=TASK_NAME, messages=[{"role": "user", "content": "My bill for sofa shows the wrong amount"}])
        assert answer.choices[0].message.content == "billing"


class BrokenBackend:
    """A teacher backend with a bug: it raises something that is not a BackendError."""

    name = "broken"

    async def chat(self, messages, max_tokens=None, temperature=None):
        raise RuntimeError("bug in a backend plugin")


def test_an_unexpected_error_is_a_500_and_the_server_stays_up(project):
    from stillroom.serve.app import create_app

    with ThreadedServer(create_app(project, teacher=BrokenBackend())) as server:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=TEACHER_MODEL, messages=[{"role": "user", "content": "hi"}])
        error = caught.value.response.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        row = logged(project, caught.value.response.headers["x-stillroom-request-id"])
        assert (row["route"], row["status_code"]) == ("error", 500)
        ok = client.chat.completions.create(
            model=TASK_NAME, messages=[{"role": "user", "content": "Tell me a joke about camera"}])
        assert ok.choices[0].message.content == "other"


def test_startup_names_the_command_to_run(project):
    from stillroom.project import ProjectError
    from stillroom.serve.app import create_app

    with pytest.raises(ProjectError, match="stillroom eval spare"):
        create_app(project, student="spare")
    with pytest.raises(UnknownStudent, match="no student named 'nobody'"):
        create_app(project, student="nobody")


def test_teacher_backend_configuration_errors():
    from stillroom.backends.base import BackendError
    from stillroom.backends.openai_compat import OpenAICompatBackend
    from stillroom.backends.registry import teacher_backend
    from stillroom.config import TeacherConfig

    os.environ.pop("STILLROOM_TEST_UNSET_KEY", None)
    with pytest.raises(BackendError, match="STILLROOM_TEST_UNSET_KEY"):
        OpenAICompatBackend("https://api.example.com/v1", "m", "STILLROOM_TEST_UNSET_KEY", 5)
    with pytest.raises(ValueError, match="needs a live teacher"):
        teacher_backend(TeacherConfig(backend="recorded"))


@pytest.mark.slow
def test_local_backend_generates_with_the_embedded_model():
    from stillroom.backends.hf_local import LocalChatBackend

    backend = LocalChatBackend(max_new_tokens=4)
    completion = asyncio.run(backend.chat([{"role": "user", "content": "Say hello."}]))
    assert completion.text.strip()
    assert completion.input_tokens > 0 and 0 < completion.output_tokens <= 4


def test_live_traffic_reaches_the_teacher_as_sent_unless_redact_live_is_on(client, gateway, project, teacher):
    from stillroom.project import Project
    from stillroom.serve.app import create_app

    text = "I was charged twice, my card is 4111 1111 1111 1111, mail jane.doe@example.com"
    teacher.answer = "billing"
    raw = client.chat.completions.with_raw_response.create(
        model=TEACHER_MODEL, messages=[{"role": "user", "content": text}])
    assert "x-stillroom-pii-redacted" not in raw.headers
    assert text in teacher.received[-1]["messages"][0]["content"]  # default: the client's text, deliberately

    config = project.config.model_copy(deep=True)
    config.curation.pii.redact_live = True
    redacting = Project(project.root, config)
    app = create_app(redacting, routing=gateway.app.state.routing)
    try:
        with ThreadedServer(app) as server:
            other = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0, timeout=20)
            raw = other.chat.completions.with_raw_response.create(
                model=TEACHER_MODEL, messages=[{"role": "user", "content": text}])
            assert raw.parse().choices[0].message.content == "billing"
            assert raw.headers["x-stillroom-pii-redacted"] == "2"
            prompt = teacher.received[-1]["messages"][0]["content"]
            assert "[CARD]" in prompt and "[EMAIL]" in prompt
            assert "4111" not in prompt and "jane.doe" not in prompt
            own = [{"role": "system", "content": "You sort mail."}, {"role": "user", "content": text}]
            other.chat.completions.create(model=TEACHER_MODEL, messages=own)
            assert teacher.received[-1]["messages"] == [
                own[0], {"role": "user", "content": "I was charged twice, my card is [CARD], mail [EMAIL]"}]
            row = logged(redacting, raw.parse().id)
            assert row["input"] == text  # the log stays on this machine, with what the client sent
    finally:
        redacting.close()

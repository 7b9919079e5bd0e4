"""The gateway for extraction and generation tasks: the student's answer is the reply when it is
confident and valid for the task; otherwise the real OpenAI-compatible backend asks the fake teacher
on loopback, with the task's JSON schema as response_format (extraction), falling back to plain
prompting when the endpoint refuses it. A request's own response_format is honoured.

The student is a fixed-answer one built without training (answers and confidences given per input):
what is under test is the routing, not a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402

from stillroom.backends.openai_compat import OpenAICompatBackend  # noqa: E402
from stillroom.serve.app import Routing, create_app  # noqa: E402
from stillroom.store import tables as T  # noqa: E402
from stillroom.train.base import Prediction  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"vendor": {"type": "string"}, "amount": {"type": "number"}, "currency": {"type": "string"}}}


class FixedStudent:
    """Answers each input with a given (answer, confidence)."""

    kind = "fixed"
    labels: list[str] = []

    def __init__(self, answers: dict[str, tuple[str, float]]):
        self.answers = answers

    def predict(self, texts: list[str]) -> list[Prediction]:
        return [Prediction(*self.answers.get(t, ("", 0.0))) for t in texts]


@pytest.fixture
def open_project(yaml_project):
    teacher = "teacher: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: fake-teacher}\n"
    return lambda task, name="proj": yaml_project(task + teacher, name)


@pytest.fixture
def fake():
    with FakeServer(FakeOpenAI()) as server:
        yield server


def gateway(project, server, answers):
    teacher = OpenAICompatBackend(server.url, "fake-teacher")
    routing = Routing("fixed", FixedStudent(answers), threshold=0.8, gate_passed=True, stale=False)
    return TestClient(create_app(project, teacher=teacher, routing=routing))


def ask(client, text: str, **extra):
    response = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": text}], **extra})
    assert response.status_code == 200, response.text
    return response.headers["x-stillroom-route"], response.json()["choices"][0]["message"]["content"]


def test_extraction_routes_on_confidence_and_validity(open_project, fake):
    project = open_project(f"task:\n  name: invoices\n  type: extraction\n  schema: {json.dumps(SCHEMA)}\n")
    fake.fake.scripted = {"invoice B": ['{"vendor": "Bolt", "amount": 9}'], "invoice C": ['{"vendor": "Cobalt"}'],
                          "invoice D": ['{"vendor": "Dyn", "currency": "EUR"}']}
    answers = {"invoice A": ('{"vendor":"Acme","amount":5}', 0.95),
               "invoice B": ('{"vendor": 7}', 0.99),  # confident, but off the schema
               "invoice C": ('{"vendor":"Cobalt"}', 0.5),  # valid, not confident
               "invoice D": ('{"vendor":"Dyn"}', 0.95)}
    with gateway(project, fake, answers) as client:
        assert ask(client, "invoice A") == ("student", '{"amount":5,"vendor":"Acme"}')
        assert ask(client, "invoice B") == ("teacher", '{"amount":9,"vendor":"Bolt"}')
        assert ask(client, "invoice C") == ("teacher", '{"vendor":"Cobalt"}')
        # The client's own schema (currency required): the student's record lacks it, the teacher
        # is asked with the client's response_format.
        theirs = {"type": "json_schema",
                  "json_schema": {"name": "with_currency", "schema": {**SCHEMA, "required": ["currency"]}}}
        route, content = ask(client, "invoice D", response_format=theirs)
        assert route == "teacher" and json.loads(content) == {"vendor": "Dyn", "currency": "EUR"}
        # json_object is met by any record the student gives.
        assert ask(client, "invoice A", response_format={"type": "json_object"})[0] == "student"
        assert client.get("/health").json()["structured_output"] == "sent"

    task_format = project.task.response_format()
    assert fake.fake.response_formats == [task_format, task_format, theirs]
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(T.routed_requests.c.route, T.routed_requests.c.output)
                            .order_by(T.routed_requests.c.id)).all()
    assert [r.route for r in rows] == ["student", "teacher", "teacher", "teacher", "student"]


def test_a_teacher_that_refuses_response_format_is_asked_plainly_from_then_on(open_project, fake):
    project = open_project(f"task:\n  name: invoices\n  type: extraction\n  schema: {json.dumps(SCHEMA)}\n")
    fake.fake.refuse_response_format = True
    fake.fake.scripted = {"invoice": ['Here you go: {"vendor": "Acme"}']}
    with gateway(project, fake, {}) as client:
        assert ask(client, "invoice 1") == ("teacher", '{"vendor":"Acme"}')  # prose around it stripped
        assert ask(client, "invoice 2") == ("teacher", '{"vendor":"Acme"}')
        assert client.get("/health").json()["structured_output"].startswith("refused: ")
    assert fake.fake.response_formats == [project.task.response_format(), None, None]
    assert fake.fake.charged == 2  # the refusal was not billed, and nothing was asked twice


def test_generation_answers_within_the_length_limit_and_json_requests_go_to_the_teacher(open_project, fake):
    project = open_project("task:\n  name: summaries\n  type: generation\n  max_output_chars: 30\n")
    fake.fake.scripted = {"long": ["A teacher summary."], "json": ['{"summary": "short"}']}
    answers = {"short text": ("A short summary.", 0.9),
               "long text": ("A student summary that runs far past the limit.", 0.99),
               "json text": ("plain words", 0.99)}
    with gateway(project, fake, answers) as client:
        assert ask(client, "short text") == ("student", "A short summary.")
        assert ask(client, "long text") == ("teacher", "A teacher summary.")
        route, content = ask(client, "json text", response_format={"type": "json_object"})
        assert route == "teacher" and json.loads(content) == {"summary": "short"}
        assert client.get("/health").json()["structured_output"] is None
    assert fake.fake.response_formats == [None, {"type": "json_object"}]


def test_a_trained_generative_lora_student_answers_through_the_gateway(open_project, fake, tiny_llama_dir, tmp_path):
    pytest.importorskip("peft")
    from stillroom.train.lora import LoraConfig, LoraStudent, train_lora

    project = open_project("task:\n  name: summaries\n  type: generation\n  max_output_tokens: 8\n"
                           "  max_output_chars: 30\n")
    config = LoraConfig(base_model=str(tiny_llama_dir), full=True, learning_rate=1e-2, epochs=3, batch_size=8,
                        dropout=0.0, checkpoint_every=0)
    result = train_lora([(f"text number {i}", "all fine") for i in range(32)],
                        [(f"val text {i}", "all fine") for i in range(4)], [], tmp_path / "student", config,
                        task=project.task)
    student = LoraStudent.load(result.path)
    (said,) = student.predict(["hello there"])
    assert said.label and 0 < said.confidence < 1  # a greedy text with its mean token probability
    fake.fake.scripted = {"hello there": ["The teacher's summary."]}

    for threshold, expected in ((said.confidence / 2, ("student", project.task.parse(said.label))),
                                (1.01, ("teacher", "The teacher's summary."))):
        routing = Routing("tiny", student, threshold=threshold, gate_passed=True, stale=False)
        app = create_app(project, teacher=OpenAICompatBackend(fake.url, "fake-teacher"), routing=routing)
        with TestClient(app) as client:
            assert ask(client, "hello there") == expected

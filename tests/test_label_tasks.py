"""Labeling extraction and generation tasks against the fake OpenAI-compatible teacher: structured
output sent and part of the call's identity, a refusal of it handled without paying twice, malformed
records and over-long texts recorded with their reason, and the per-type consensus votes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, count, labels_of  # noqa: E402

from stillroom.config import TaskConfig  # noqa: E402
from stillroom.label import label_examples  # noqa: E402
from stillroom.label.consensus import Vote, decide, parse_votes  # noqa: E402
from stillroom.label.engine import REFUSED  # noqa: E402
from stillroom.store import tables as T  # noqa: E402
from stillroom.tasks import make_task  # noqa: E402

FLAGS = T.TABLES["label_flags"]
INTENTS = T.TABLES["label_intents"]
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"vendor": {"type": "string"}, "amount": {"type": "number"}, "currency": {"type": "string"}}}


def task_yaml(kind: str, extra_task: str = "") -> str:
    if kind == "extraction":
        return f"task:\n  name: invoices\n  type: extraction\n  schema: {json.dumps(SCHEMA)}\n{extra_task}"
    return f"task:\n  name: summaries\n  type: generation\n{extra_task}"


def teacher(url: str, labeling: str = "") -> str:
    return (f"teacher: {{backend: openai, base_url: '{url}', model: fake-teacher, timeout_s: 2}}\n"
            f"labeling: {{concurrency: 4, backoff_initial_s: 0.01, backoff_max_s: 0.05{labeling}}}\n")


@pytest.fixture
def open_project(yaml_project):
    return yaml_project


@pytest.fixture
def server():
    with FakeServer(FakeOpenAI()) as s:
        yield s


def flags(project, kind: str) -> list[str]:
    with project.store.engine.connect() as conn:
        return [d for (d,) in conn.execute(select(FLAGS.c.detail).where(FLAGS.c.kind == kind))]


def test_extraction_sends_the_schema_records_bad_json_and_never_pays_twice(open_project, server):
    project = open_project(task_yaml("extraction") + teacher(server.url))
    fake = server.fake
    fake.scripted = {
        "invoice A": ['{"vendor": "Acme", "amount": 120, "currency": "EUR"}'],
        "invoice B": ['```json\n{"amount": 5, "vendor": "Bolt"}\n```'],  # fenced: still a record
        "invoice C": ['{"vendor": "Cobalt", "amount": '],  # cut off: not JSON
        "invoice D": ['{"vendor": "Dyn", "amount": "lots"}'],  # JSON, off the schema
    }
    add_inputs(project, ["invoice A from Acme", "invoice B from Bolt", "invoice C from Cobalt", "invoice D"])

    report = label_examples(project)

    assert fake.charged == 4 and report.calls_paid == 4 and not report.failures
    assert report.structured_output == "sent"
    expected_format = project.task.response_format()
    assert expected_format["type"] == "json_schema" and expected_format["json_schema"]["schema"] == SCHEMA
    assert fake.response_formats == [expected_format] * 4
    assert labels_of(project) == {"invoice A from Acme": '{"amount":120,"currency":"EUR","vendor":"Acme"}',
                                  "invoice B from Bolt": '{"amount":5,"vendor":"Bolt"}'}
    invalid = sorted(flags(project, "invalid_output"))
    assert len(invalid) == 2 and report.flagged == {"invalid_output": 2, "no_valid_answer": 2}
    assert "is not a JSON object" in invalid[0]
    assert "does not fit the schema at amount" in invalid[1]

    again = label_examples(project)  # the two without a label are planned again, but already answered
    assert (again.calls_paid, again.calls_cached, fake.charged) == (0, 2, 4)
    assert fake.requests == 4 and count(project, FLAGS) == 4  # no new calls, no duplicate flags


def test_a_refused_response_format_falls_back_to_plain_prompting_once(open_project, server):
    project = open_project(task_yaml("extraction") + teacher(server.url, ", concurrency: 1"))
    fake = server.fake
    fake.refuse_response_format = True
    fake.scripted = {"invoice A": ['{"vendor": "Acme"}'], "invoice B": ['{"vendor": "Bolt"}'],
                     "invoice E": ['Sure! {"vendor": "Eon", "amount": 3}']}
    add_inputs(project, ["invoice A", "invoice B"])

    report = label_examples(project)

    assert report.labelled == 2 and not report.failures and report.calls_paid == 2
    assert report.structured_output.startswith("refused: ") and "response_format" in report.structured_output
    # One refused request (unbilled), then the same question and the rest without the schema.
    assert fake.requests == 3 and fake.charged == 2 and fake.response_formats[1:] == [None, None]
    assert max(fake.charged_by_key.values()) == 1
    assert count(project, INTENTS, INTENTS.c.error.like(REFUSED + "%")) == 1

    add_inputs(project, ["invoice E"])
    later = label_examples(project)  # remembers the refusal: no response_format, nothing re-bought
    assert later.calls_paid == 1 and fake.charged == 3 and fake.response_formats[-1] is None
    assert later.structured_output.startswith("refused: ")
    assert labels_of(project)["invoice E"] == '{"amount":3,"vendor":"Eon"}'


def test_three_samples_vote_field_by_field(open_project, server):
    project = open_project(task_yaml("extraction") + teacher(server.url, ", samples: 3, temperature: 0.7"))
    server.fake.scripted = {"invoice F": [
        '{"vendor": "Acme", "amount": 120}',
        '{"vendor": " ACME", "amount": 120, "currency": "EUR"}',
        '{"vendor": "Acme", "amount": 12}',
    ]}
    add_inputs(project, ["invoice F"])

    report = label_examples(project)

    assert server.fake.charged == 3 and report.labelled == 1
    # vendor 3/3 (case and space folded), amount 120 2/3, currency: not stated 2/3.
    assert labels_of(project) == {"invoice F": '{"amount":120,"vendor":"Acme"}'}
    with project.store.engine.connect() as conn:
        decided_by = conn.execute(select(T.labels.c.decided_by)).scalar_one()
    assert decided_by.endswith("n=3 agreement=0.78")


def test_generation_rejects_an_over_long_answer_with_its_reason(open_project, server):
    project = open_project(task_yaml("generation", "  max_output_chars: 40\n  max_output_tokens: 20\n")
                           + teacher(server.url))
    server.fake.scripted = {"short one": ["A fine short summary."],
                            "long one": ["This summary goes on and on well past the forty character limit."]}
    add_inputs(project, ["summarise the short one", "summarise the long one"])

    report = label_examples(project)

    assert report.calls_paid == 2 and report.labelled == 1 and report.no_label == 1
    assert labels_of(project) == {"summarise the short one": "A fine short summary."}
    (reason,) = flags(project, "invalid_output")
    assert "64 characters, over task.max_output_chars (40)" in reason
    assert server.fake.response_formats == [None, None]  # free text: no structured output
    assert project.config.teacher.max_tokens == 20  # the teacher's budget is the task's output budget


def test_batch_requests_carry_the_schema_too(open_project, server):
    project = open_project(task_yaml("extraction") + teacher(server.url, ", batch_poll_interval_s: 0.05"))
    server.fake.scripted = {"invoice A": ['{"vendor": "Acme"}']}
    add_inputs(project, ["invoice A"])

    report = label_examples(project, batch=True)

    assert report.labelled == 1 and report.structured_output == "sent"
    assert [b["response_format"] for b in server.fake.batch_bodies] == [project.task.response_format()]
    assert label_examples(project).calls_paid == 0 and server.fake.charged == 1


# ---- consensus with hand-made votes --------------------------------------------------------------


def extraction_task(schema: dict | None = None):
    return make_task(TaskConfig(name="t", type="extraction", schema=schema or SCHEMA))


def votes(task, outputs: list[str]) -> list[Vote]:
    return parse_votes(task, list(enumerate(outputs)))


def test_field_wise_vote_combines_fields_and_treats_missing_as_not_stated():
    task = extraction_task()
    result = decide(votes(task, ['{"vendor": "Acme", "amount": 7}', '{"vendor": "acme", "currency": "USD"}',
                                 '{"vendor": "Zed", "amount": 7, "currency": "USD"}', "not json"]), 0.6, task)
    # vendor: acme 2/4; amount: 7 2/4 (vs not stated 1, invalid 1); currency: USD 2/4.
    assert json.loads(result.label) == {"vendor": "Acme", "amount": 7, "currency": "USD"}
    assert result.agreement == pytest.approx(0.5) and result.flag == "low_agreement"
    assert result.ref is None  # no single answer gave this record whole
    assert result.valid == 3 and "field-wise vote" in result.describe() and "1 invalid" in result.describe()

    same = decide(votes(task, ['{"amount": 12}', '{"amount": 12.0}', '{"amount": 13}']), 0.6, task)
    assert json.loads(same.label) == {"amount": 12} and same.agreement == pytest.approx(2 / 3)  # 12 == 12.0

    tie = decide(votes(task, ['{"vendor": "A", "amount": 1}', '{"vendor": "A"}']), 0.6, task)
    assert json.loads(tie.label) == {"vendor": "A"}  # a tie between a value and silence never guesses
    assert tie.ref == 1


def test_field_wise_winners_that_break_the_schema_fall_back_to_the_most_common_record():
    schema = {**SCHEMA, "dependentRequired": {"amount": ["currency"]}}
    task = extraction_task(schema)
    outputs = ['{"amount": 1, "currency": "EUR"}', '{"amount": 1, "currency": "USD"}', '{}']
    result = decide(votes(task, outputs), 0.5, task)
    # Field-wise: amount 1 (2/3), currency tied -> not stated: {"amount": 1} lacks its currency.
    assert result.label == '{"amount":1,"currency":"EUR"}' and result.ref == 0
    assert "most common record" in result.describe()
    assert result.agreement == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_generation_consensus_is_the_medoid():
    pytest.importorskip("rouge_score")
    task = make_task(TaskConfig(name="g", type="generation"))
    outputs = ["the cat sat on the mat", "the cat sat on a mat", "a cat sat on a mat", ""]
    result = decide(votes(task, outputs), 0.6, task)
    assert result.label == "the cat sat on a mat" and result.ref == 1  # closest to both others
    assert result.valid == 3 and 0 < result.agreement < 1
    pairs = [task.score(a, b) for a, b in [(outputs[0], outputs[1]), (outputs[0], outputs[2]),
                                          (outputs[1], outputs[2])]]
    assert result.agreement == pytest.approx(sum(pairs) / 6)  # 6 pairs; the empty answer scores 0
    single = decide(votes(task, ["only answer"]), 0.6, task)
    assert (single.label, single.agreement) == ("only answer", 1.0)

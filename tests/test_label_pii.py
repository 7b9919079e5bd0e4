"""PII never reaches a paid teacher: `stillroom label` (live, batch, resumed after kill -9),
`curate augment` and extraction answers that echo a placeholder, all against the fake
OpenAI-compatible teacher on loopback, which records every prompt it receives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, count, labels_of, teacher_extra  # noqa: E402
from test_label_resume import kill_when, start_label  # noqa: E402

from stillroom.cli.main import app  # noqa: E402
from stillroom.label import label_examples  # noqa: E402
from stillroom.label import ledger  # noqa: E402
from stillroom.store import tables as T  # noqa: E402

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"  # Luhn-valid
ORDER = "5583021"  # an order number: not a card, not a phone
INPUTS = {
    f"please refund my payment and write to {EMAIL}": "billing",
    f"my card {CARD} was charged twice": "billing",
    f"where is my parcel for order {ORDER}": "shipping",
    "hello, lovely weather today": "other",
}
REDACTIONS = T.TABLES["redactions"]
FLAGS = T.TABLES["label_flags"]


@pytest.fixture
def server():
    with FakeServer(FakeOpenAI()) as s:
        yield s


def sent(fake: FakeOpenAI) -> str:
    """Everything the teacher received: live prompts and batch bodies."""
    return "\n".join(fake.prompts + [json.dumps(b) for b in fake.batch_bodies])


def assert_no_pii(text: str) -> None:
    assert EMAIL not in text and CARD not in text and CARD.replace(" ", "") not in text
    assert ORDER in text  # not everything that is a number is PII
    assert "[EMAIL]" in text and "[CARD]" in text


def test_the_teacher_never_sees_pii_and_a_rerun_pays_nothing(make_project, server):
    project = make_project(extra=teacher_extra(server.url))
    add_inputs(project, list(INPUTS))

    report = label_examples(project)

    assert_no_pii(sent(server.fake))
    assert report.calls_paid == server.fake.charged == len(INPUTS)
    assert report.pii == {"redacted": True, "off_reason": None, "inputs_with_pii": 2,
                          "by_type": {"card": 1, "email": 1}}
    assert labels_of(project) == INPUTS  # the examples keep their text; their labels are the teacher's
    # What went out is on record against the original's hash; the original is unchanged.
    assert count(project, REDACTIONS) == 2

    again = label_examples(project)
    assert (again.calls_paid, again.examples) == (0, 0) and server.fake.charged == len(INPUTS)


def test_an_input_without_pii_keeps_its_request_hash(make_project, server):
    """A ledger written before redaction existed still matches: a clean text is sent as it was."""
    project = make_project(extra=teacher_extra(server.url))
    clean = "hello, lovely weather today"
    add_inputs(project, [clean])
    label_examples(project)
    params = {"max_tokens": project.config.teacher.max_tokens, "temperature": project.config.labeling.temperature}
    before = ledger.request_hash("fake-teacher", [{"role": "user", "content": project.task.teacher_prompt(clean)}],
                                 params, 0)
    with project.store.engine.connect() as conn:
        hashes = {h for (h,) in conn.execute(select(T.responses.c.request_hash))}
    assert hashes == {before}


def test_no_redact_sends_the_raw_text_and_says_so(make_project, server):
    project = make_project(extra=teacher_extra(server.url))
    add_inputs(project, list(INPUTS))

    result = CliRunner().invoke(app, ["label", "--no-redact", "--json", "-C", str(project.root)])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["pii"] == {"redacted": False, "off_reason": "--no-redact", "inputs_with_pii": 2,
                             "by_type": {"card": 1, "email": 1}}
    assert EMAIL in sent(server.fake) and CARD in sent(server.fake) and "[EMAIL]" not in sent(server.fake)
    assert count(project, REDACTIONS) == 0


def test_switching_to_no_redact_does_not_buy_an_answered_sample_again(make_project, server):
    project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 1, max_retries: 0, samples: 2"))
    add_inputs(project, [f"please refund my payment and write to {EMAIL}"])
    server.fake.faults.extend(["", "500"])  # sample 0 answered (redacted), sample 1 fails

    first = label_examples(project)
    assert (first.calls_paid, first.calls_failed, first.labelled) == (1, 1, 0)

    second = label_examples(project, redact=False)

    assert (second.calls_cached, second.calls_paid, second.labelled) == (1, 1, 1)
    assert server.fake.charged == 2
    assert "[EMAIL]" in server.fake.prompts[0] and EMAIL in server.fake.prompts[-1]


def test_batch_files_carry_the_redacted_text(make_project):
    fake = FakeOpenAI(batch_polls=1)
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", batch_poll_interval_s: 0.05"))
        add_inputs(project, list(INPUTS))
        report = label_examples(project, batch=True)
    assert fake.batch_bodies and not fake.prompts
    assert_no_pii(sent(fake))
    assert report.labelled == len(INPUTS) and report.pii["inputs_with_pii"] == 2


def test_kill_9_with_pii_resumes_without_paying_twice_or_leaking(make_project):
    texts = [f"my card {CARD} was charged twice, ticket {i}" for i in range(6)]
    texts += [f"refund my payment, write to {EMAIL} about case {i}" for i in range(6)]
    fake = FakeOpenAI(latency_s=0.25)
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", concurrency: 4"))
        add_inputs(project, texts)
        project.close()  # the CLI owns the store while it runs
        kill_when(start_label(project), lambda: fake.charged >= 3)
        proc = start_label(project)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    report = json.loads(out)
    assert fake.charged == len(texts) and max(fake.charged_by_key.values()) == 1
    assert report["resumed_in_flight"] >= 1 and report["pii"]["inputs_with_pii"] == report["examples"]
    everything = "\n".join(fake.prompts)
    assert EMAIL not in everything and CARD not in everything


def test_an_extraction_answer_may_echo_a_placeholder(tmp_path, server):
    from stillroom.project import Project, init_project

    schema = {"type": "object", "additionalProperties": False, "properties": {
        "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}, "order": {"type": "string"}}}
    root = tmp_path / "extract"
    init_project(root)
    (root / "stillroom.yaml").write_text(
        f"task:\n  name: contacts\n  type: extraction\n  schema: {json.dumps(schema)}\n"
        f"teacher: {{backend: openai, base_url: '{server.url}', model: fake-teacher, timeout_s: 2}}\n",
        encoding="utf-8")
    project = Project.open(root)
    try:
        text = f"order {ORDER}: please reply to {EMAIL}"
        server.fake.scripted = {f"order {ORDER}: please reply to [EMAIL]": ['{"email": "[EMAIL]", "order": "5583021"}']}
        add_inputs(project, [text])

        report = label_examples(project)

        assert report.labelled == 1 and not report.flagged  # the placeholder is a valid answer
        assert labels_of(project) == {text: '{"email":"[EMAIL]","order":"5583021"}'}
        # The schema's pattern still rejects a value that is not an email nor a placeholder.
        with pytest.raises(Exception, match="pattern|does not match"):
            project.task.parse('{"email": "nobody"}')
    finally:
        project.close()


def test_augment_sends_the_redacted_parent(make_project, server):
    from test_curate_augment import TRAIN, build

    from stillroom.curate.augment import augment

    parent = f"i was charged twice on my card, mail me at {EMAIL}"
    project = build(make_project, server.url, train=TRAIN + [(parent, "billing")])

    report = augment(project, k=2)

    asked = [p for p in server.fake.prompts if p.startswith("Rewrite the message below")]
    assert len(asked) == report.calls_paid == len(TRAIN) + 1
    assert not any(EMAIL in p for p in asked) and any("[EMAIL]" in p for p in asked)
    assert report.pii["inputs_with_pii"] == 1
    with project.store.engine.connect() as conn:
        inputs = [t for (t,) in conn.execute(select(T.examples.c.input))]
    assert sum("[EMAIL]" in t for t in inputs) == 2  # the paraphrases keep the placeholder

"""The task layer: what a valid answer is and how agreement is scored, for each task type."""

from __future__ import annotations

import json

import pytest

from stillroom.config import ConfigError, parse_config
from stillroom.tasks import ParseError, make_task
from stillroom.tasks.extraction import field_overlap, record_fields

SLOTS = {
    "type": "object",
    "properties": {
        "people": {"type": "string"},
        "time": {"type": "string"},
        "date": {"type": "string"},
        "size": {"enum": ["small", "large"]},
        "guests": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def task(**task_fields):
    return make_task(parse_config({"task": {"name": "t", **task_fields}}).task)


def test_extraction_parse_canonicalises_and_tolerates_fences_and_chatter():
    t = task(type="extraction", schema=SLOTS)
    canonical = '{"people":"2","time":"7pm"}'
    assert t.parse('{"time": "7pm", "people": "2"}') == canonical
    assert t.parse('```json\n{"people": "2", "time": "7pm"}\n```') == canonical
    assert t.parse('Sure! Here it is: {"people": "2", "time": "7pm"} Hope that helps.') == canonical
    assert t.parse('{"guests": ["Ana", "Bo"]}') == '{"guests":["Ana","Bo"]}'


@pytest.mark.parametrize("output, reason", [
    ("table for two", "is not a JSON object"),
    ("[1, 2]", "is JSON but not an object"),
    ('{"people": 2}', "at people: 2 is not of type 'string'"),
    ('{"size": "medium"}', "at size: 'medium' is not one of"),
    ('{"colour": "red"}', "Additional properties are not allowed"),
])
def test_extraction_parse_rejects_with_the_reason(output, reason):
    t = task(type="extraction", schema=SLOTS)
    with pytest.raises(ParseError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        t.parse(output)


def test_field_scores_by_hand():
    t = task(type="extraction", schema=SLOTS)
    ref = '{"people":"2","time":"7pm"}'
    # one of two reference fields right, one wrong extra: P = 1/2, R = 1/2, F1 = 1/2
    assert field_overlap('{"people":"2","time":"8pm"}', ref) == (1, 2, 2)
    assert t.score('{"people":"2","time":"8pm"}', ref) == pytest.approx(0.5)
    # case, spacing and null-vs-missing do not matter
    assert t.score('{"people":"2","time":" 7PM ","date":null}', ref) == 1.0
    assert t.agrees('{"people":"2","time":" 7PM "}', ref)
    # one of two fields, nothing wrong: P = 1, R = 1/2, F1 = 2/3; not an exact record
    assert t.score('{"people":"2"}', ref) == pytest.approx(2 / 3)
    assert not t.agrees('{"people":"2"}', ref)
    assert t.score("{}", "{}") == 1.0 and t.score("{}", ref) == 0.0
    # lists are multisets of values under one path
    assert record_fields('{"guests":["Ana","ana"]}') == {("guests[]", "ana"): 2}


def test_extraction_exact_match_metric():
    t = task(type="extraction", schema=SLOTS, metric="exact_match")
    assert t.score('{"people":"2"}', '{"people":"2","time":"7pm"}') == 0.0
    assert t.score('{"people":"2 "}', '{"people":"2"}') == 1.0


def test_extraction_prompt_shows_the_schema_and_response_format_carries_it():
    t = task(type="extraction", schema=SLOTS)
    prompt = t.teacher_prompt("a table for 2 at 7pm")
    assert '"people"' in prompt and "a table for 2 at 7pm" in prompt
    fmt = t.response_format()
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == SLOTS


def test_generation_parse_limits_and_scores():
    t = task(type="generation", max_output_chars=40)
    assert t.parse("  The Eagle is a pub.  ") == "The Eagle is a pub."
    with pytest.raises(ParseError, match="empty"):
        t.parse("   ")
    with pytest.raises(ParseError, match="over task.max_output_chars"):
        t.parse("x" * 41)
    # ROUGE-L F1 by hand: LCS of "the eagle is a pub" (5 words) with an 8-word reference -> 2*5/(5+8)
    assert t.score("The Eagle is a pub", "The Eagle is a pub near Burger King") == pytest.approx(10 / 13)
    assert t.agrees("The Eagle is a pub", "The Eagle is a pub near Burger King")
    assert not t.agrees("Cheap food", "The Eagle is a pub near Burger King")
    chrf = task(type="generation", metric="chrf")
    assert chrf.score("same text", "same text") == pytest.approx(1.0)


@pytest.mark.parametrize("task_fields, problem", [
    ({"type": "extraction"}, "needs task.schema"),
    ({"type": "extraction", "schema": {"type": "array"}}, "must describe one object"),
    ({"type": "extraction", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}},
     "not a valid JSON schema at properties/a/type"),
    ({"type": "generation", "labels": [{"name": "a"}, {"name": "b"}]}, "labels are for classification"),
    ({"type": "generation", "metric": "field_f1"}, "does not apply to generation"),
    ({"labels": [{"name": "a"}, {"name": "b"}], "schema": SLOTS}, "schema is for extraction"),
    ({"type": "generation", "teacher_prompt": "Describe {input} as {shape}"}, "unknown placeholder"),
])
def test_task_config_errors_name_the_field(task_fields, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_config({"task": {"name": "t", **task_fields}})


def test_defaults_follow_the_task_type():
    cfg = parse_config({"task": {"name": "t", "type": "generation", "max_output_tokens": 60}})
    assert [s.kind for s in cfg.students] == ["lora"] and cfg.teacher.max_tokens == 60
    cfg = parse_config({"task": {"name": "t", "labels": [{"name": "a"}, {"name": "b"}]}})
    assert [s.kind for s in cfg.students] == ["encoder"] and cfg.teacher.max_tokens == 16
    with pytest.raises(ConfigError, match="an encoder student only classifies"):
        parse_config({"task": {"name": "t", "type": "extraction", "schema": SLOTS},
                      "students": [{"name": "e", "kind": "encoder"}]})


def test_classification_is_unchanged():
    t = task(labels=[{"name": "billing"}, {"name": "other"}])
    assert t.type == "classification" and t.metric == "accuracy" and t.response_format() is None
    assert t.parse("Billing.") == "billing" and t.score("billing", "billing") == 1.0
    assert json.dumps(t.labels) == '["billing", "other"]'

"""PII redaction: what is found (and, as important, what is not), per-field settings, user
patterns, and that redacting never rewrites an example or breaks the eval lock."""

import json

import pytest

from conftest import synthetic_rows, write_chat_jsonl
from stillroom.capture.importers import import_file
from stillroom.config import ConfigError, PiiConfig, PiiPattern, parse_config
from stillroom.curate.lock import lock_eval, verify_lock
from stillroom.curate.pii import iban_ok, luhn_ok, pii_report, redact, redact_for_teacher
from stillroom.curate.split import split_project
from stillroom.store import tables as T


@pytest.mark.parametrize("text, redacted", [
    ("mail jane.doe+billing@example.co.uk now", "mail [EMAIL] now"),
    ("call +44 20 7946 0958 today", "call [PHONE] today"),
    ("or +1 (555) 123-4567", "or [PHONE]"),
    ("mobile +33 6 12 34 56 78.", "mobile [PHONE]."),
    ("US (555) 123-4567 / 555-123-4567 / 555.123.4567", "US [PHONE] / [PHONE] / [PHONE]"),
    ("toll free 1-800-555-1234", "toll free [PHONE]"),
    ("UK 020 7946 0958 or 07700 900123", "UK [PHONE] or [PHONE]"),
    ("FR 06 12 34 56 78, DE 030 1234567", "FR [PHONE], DE [PHONE]"),
    ("from abroad 0049 30 1234567", "from abroad [PHONE]"),
    ("(call 555-123-4567)", "(call [PHONE])"),
    ("card 4111 1111 1111 1111 expired", "card [CARD] expired"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("card 5500000000000004!", "card [CARD]!"),
    ("amex 3782 822463 10005", "amex [CARD]"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN [IBAN] please"),
    ("iban GB82WEST12345698765432", "iban [IBAN]"),
    ("to fr14 2004 1010 0505 0001 3m02 606", "to [IBAN]"),
])
def test_finds_and_types_pii(text, redacted):
    assert redact(text)[0] == redacted


@pytest.mark.parametrize("text", [
    "where is order 5583021?",
    "order #5583021 and invoice 2024-0042",
    "4111 1111 1111 1112",  # 16 digits, Luhn fails
    "ref 4111111111111112",
    "1234567812345670",  # passes Luhn, but no card network starts with 1
    "delivered on 2024-01-15, 15/01/2024 or 05.11.2023 14:30",
    "it cost $1,234.56 or 1 299,00 EUR, was 12.99",
    "app version v2.10.4, build 1.2.3, windows 10.0.19041",
    "UPS 1Z999AA10123456784, USPS 9400 1000 0000 0000 0000 00, FedEx 7749 8765 4321",
    "ISBN 978-3-16-148410-0, IP 192.168.0.1, room 101, 3 items",
    "DE89 3704 0044 0532 0130 01",  # IBAN-shaped, checksum wrong
    "code XX12345678901234567890",  # no such IBAN country
    "call me at noon",
])
def test_leaves_lookalikes_alone(text):
    assert redact(text) == (text, [])


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert not iban_ok("GB82WEST1234569876543")  # the wrong length for GB


def test_findings_point_into_the_original():
    text = "Hi, I'm jane@example.com, card 4111 1111 1111 1111."
    redacted, findings = redact(text)
    assert redacted == "Hi, I'm [EMAIL], card [CARD]."
    assert [(f.type, text[f.start:f.end]) for f in findings] == [
        ("email", "jane@example.com"), ("card", "4111 1111 1111 1111")]


def test_per_field_types_and_user_patterns():
    config = PiiConfig(input=["email", "customer_id"], output=["custom"],
                       patterns=[PiiPattern(name="customer_id", pattern=r"CUST-\d{6}")])
    text = "CUST-123456 wrote from a@b.io, +44 20 7946 0958"
    assert redact(text, config, "input")[0] == "[CUSTOMER_ID] wrote from [EMAIL], +44 20 7946 0958"
    assert redact(text, config, "output")[0] == "[CUSTOMER_ID] wrote from a@b.io, +44 20 7946 0958"
    assert redact(text, PiiConfig(enabled=False)) == (text, [])


def test_bad_pii_config_names_the_field():
    base = {"task": {"name": "t", "labels": [{"name": "a"}, {"name": "b"}]}}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "curation": {"pii": {"patterns": [{"name": "x", "pattern": "(unclosed"}]}}})
    assert "curation.pii.patterns.0.pattern: not a valid regular expression" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "curation": {"pii": {"input": ["email", "passport"]}}})
    assert "curation.pii" in str(err.value) and "'passport'" in str(err.value)
    with pytest.raises(ConfigError, match="curation.dedupe.threshold"):
        parse_config({**base, "curation": {"dedupe": {"threshold": 1.5}}})


def test_project_report_apply_keeps_originals_and_the_lock(make_project, tmp_path):
    pii_rows = [("my card 4111 1111 1111 1111 got charged twice", "billing"),
                ("reach me on jane@example.com about the parcel", "shipping"),
                ("please call +44 20 7946 0958 about my bill", "billing")]
    project = make_project(synthetic_rows(10),
                           extra="curation: {pii: {patterns: [{name: ticket, pattern: 'TKT-\\d+'}]}}\n")
    write_chat_jsonl(tmp_path / "eval.jsonl", pii_rows + [("ticket TKT-991 about shipping", "shipping")])
    import_file(project, tmp_path / "eval.jsonl", split="eval")  # PII inside the locked eval set
    import_file(project, project.root / "data.jsonl")
    split_project(project)
    lock = lock_eval(project)
    with project.store.engine.connect() as conn:
        before = conn.execute(T.examples.select().order_by(T.examples.c.id)).all()

    report = pii_report(project)
    assert report["texts_with_pii"]["input"] == 4 and report["eval_inputs_with_pii"] == 4
    assert report["findings"]["input"] == {"email": 1, "phone": 1, "card": 1, "iban": 0, "ticket": 1}
    assert report["recorded_now"] == 0
    shown = json.dumps(report["examples"])
    assert "[CARD]" in shown and "4111" not in shown and "jane@" not in shown and "[TICKET]" in shown

    applied = pii_report(project, apply=True)
    assert applied["recorded_now"] == 4 and pii_report(project, apply=True)["recorded_now"] == 0
    with project.store.engine.connect() as conn:
        after = conn.execute(T.examples.select().order_by(T.examples.c.id)).all()
        stored = conn.execute(T.TABLES["redactions"].select()).all()
    assert after == before  # no example rewritten: content hashes intact
    assert verify_lock(project).manifest_sha256 == lock.manifest_sha256
    assert {r.redacted_text for r in stored} >= {"my card [CARD] got charged twice", "ticket [TICKET] about shipping"}
    assert all("4111" not in r.findings and "jane" not in r.findings for r in stored)  # positions, never values
    assert redact_for_teacher(project, "write to bob@example.org") == "write to [EMAIL]"

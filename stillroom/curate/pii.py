"""PII redaction: emails, phone numbers, payment cards (Luhn), IBANs (mod 97) and user regexes,
replaced by typed placeholders (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`, `[NAME]` for a pattern).

Detection is validated, not merely pattern-shaped: a card number must pass Luhn and start like a
card, an IBAN must have its country's length and a valid mod-97 checksum, a phone number must be
international (`+`/`00`), North-American shaped, or a trunk-prefixed national number. Order numbers,
dates, prices, version strings and tracking numbers are left alone.

Redaction never rewrites an example: the original text (and so its content hash and the eval lock)
stays as it is; a redacted copy, keyed by the original's hash and the PII settings, is what goes to
a teacher or into an export (`redacted_copy`), and is recorded in the `redactions` table.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection

from stillroom.config import PII_TYPES, PiiConfig
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.tasks.base import content_hash

__all__ = ["Finding", "redact", "redacted_copy", "redact_for_teacher", "Redactor", "pii_report", "config_hash"]

PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "iban": "[IBAN]"}


@dataclass(frozen=True)
class Finding:
    type: str
    start: int
    end: int

    def as_list(self) -> list:
        return [self.type, self.start, self.end]


# --- detectors ---------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")

# A "number run": digits with the separators people type inside phone and card numbers. Runs are
# classified whole, so a part of a longer number (a tracking number, an IBAN) is never a match.
# Not preceded by a word character or '.'/'-' (version strings, codes like A-1234).
_RUN = re.compile(r"(?<![\w.,/+-])(?:\+|\(\+?)?\d(?:[\d \t().-]*\d)?\)?(?![\w/]|[.,-]\d)")
_DATE = re.compile(r"\b\d{1,2}[./-]\d{1,2}[./-]\d{2,4}\b|\b\d{4}[./-]\d{1,2}[./-]\d{1,2}\b")
_NANP = re.compile(r"^(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}$")
_CARD_GROUPS = re.compile(  # 4-4-4-4 (13-16 digits), 4-4-4-4-3 (17-19), 4-6-5 / 4-6-4 (Amex, Diners)
    r"^\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}$|^\d{4}([ -])\d{4}\2\d{4}\2\d{4}\2\d{1,3}$|^\d{4}([ -])\d{6}\3\d{4,5}$")

# Country -> IBAN length (ISO 13616 registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2})\d{2}")
_IBAN_SHAPED_BEFORE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2} $")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """Country length and the ISO 7064 mod-97 checksum."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _is_card(run: str) -> bool:
    if any(c in run for c in "().+\t"):
        return False
    digits = re.sub(r"\D", "", run)
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":  # issuer ranges of real card networks
        return False
    if digits != run and not _CARD_GROUPS.match(run):  # typed with separators: card-like grouping only
        return False
    return luhn_ok(digits)


def _is_phone(run: str) -> bool:
    digits = re.sub(r"\D", "", run)
    if _DATE.search(run):
        return False
    groups = [g for g in re.split(r"[^\d]+", run) if g]
    if run.startswith(("+", "(+")):  # E.164: at most 15 digits with the country code
        return 8 <= len(digits) <= 15
    if run.startswith("00") and len(groups) > 1:  # 00 44 20 7946 0958
        return 10 <= len(digits) <= 17 and all(len(g) >= 2 for g in groups[1:])
    if _NANP.match(run):
        return True
    if run.startswith(("0", "(0")) and not run.startswith("00"):  # trunk prefix: 020 7946 0958, 06 12 34 56 78
        if len(groups) == 1:
            return 10 <= len(digits) <= 11
        return 9 <= len(digits) <= 12 and all(len(g) >= 2 for g in groups)
    return False


def _ibans(text: str) -> list[Finding]:
    found = []
    for m in _IBAN_START.finditer(text):
        country = m.group(1)
        want = IBAN_LENGTHS.get(country.upper())
        if want is None or not (country.isupper() or country.islower()):
            continue
        # Collect `want` characters, allowing single spaces between groups ("DE89 3704 0044 ...").
        chars, pos = [], m.start()
        while pos < len(text) and len(chars) < want:
            ch = text[pos]
            if ch.isascii() and ch.isalnum():
                chars.append(ch.upper())
            elif ch != " " or text[pos - 1] == " ":
                break
            pos += 1
        if len(chars) == want and (pos == len(text) or not text[pos].isalnum()) and iban_ok("".join(chars)):
            found.append(Finding("iban", m.start(), pos))
    return found


def _custom(text: str, config: PiiConfig, wanted: set[str]) -> list[Finding]:
    found = []
    for p in config.patterns:
        if p.name.lower() in wanted or "custom" in wanted:
            found += [Finding(p.name.lower(), m.start(), m.end()) for m in re.finditer(p.pattern, text) if m.end() > m.start()]
    return found


def detect(text: str, config: PiiConfig | None = None, field: str = "input") -> list[Finding]:
    """Non-overlapping findings in `text` for the types `config` enables on `field`, by position."""
    config = config or PiiConfig()
    if not config.enabled:
        return []
    wanted = {t.lower() for t in getattr(config, field)}
    found: list[Finding] = []
    found += _custom(text, config, wanted)
    if "email" in wanted:
        found += [Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if "iban" in wanted:
        found += _ibans(text)
    if "card" in wanted or "phone" in wanted:
        for m in _RUN.finditer(text):
            run, start, end = m.group(0), m.start(), m.end()
            if run.endswith(")") and run.count(")") > run.count("("):  # "(call 555-123-4567)"
                run, end = run[:-1], end - 1
            if _IBAN_SHAPED_BEFORE.search(text, max(0, start - 6), start):
                continue  # the tail of an IBAN-shaped token whose checksum failed: not a card or phone
            if "card" in wanted and _is_card(run):
                found.append(Finding("card", start, end))
            elif "phone" in wanted and _is_phone(run):
                found.append(Finding("phone", start, end))
    # Overlaps: user patterns first (they are the most specific), then the longest match.
    priority = {"email": 1, "iban": 2, "card": 3, "phone": 4}
    found.sort(key=lambda f: (f.start, priority.get(f.type, 0), -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if kept and f.start < kept[-1].end:
            continue
        kept.append(f)
    return kept


def placeholder(kind: str) -> str:
    return PLACEHOLDERS.get(kind, f"[{kind.upper()}]")


def redact(text: str, config: PiiConfig | None = None, field: str = "input") -> tuple[str, list[Finding]]:
    """(text with each finding replaced by its typed placeholder, findings in the original's positions)."""
    findings = detect(text, config, field)
    out, pos = [], 0
    for f in findings:
        out += [text[pos:f.start], placeholder(f.type)]
        pos = f.end
    out.append(text[pos:])
    return "".join(out), findings


def config_hash(config: PiiConfig) -> str:
    """The settings that decide what a redacted copy looks like (`redact_live` only says where)."""
    settings = config.model_dump(mode="json", exclude={"redact_live"})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def redacted_copy(conn: Connection, text: str, field: str, config: PiiConfig, record: bool = True) -> str:
    """The text as it may leave the machine; a redaction is recorded against the original's hash."""
    redacted, findings = redact(text, config, field)
    if record and findings:  # a clean text needs no record: its copy is itself
        h, ch = content_hash(text), config_hash(config)
        table = T.TABLES["redactions"]
        seen = conn.execute(select(table.c.id).where(
            table.c.source_hash == h, table.c.field == field, table.c.config_hash == ch)).first()
        if not seen:
            conn.execute(insert(table).values(
                source_hash=h, field=field, config_hash=ch, redacted_text=redacted,
                findings=json.dumps([f.as_list() for f in findings]), n_findings=len(findings), created_at=now()))
    return redacted


def redact_for_teacher(project, text: str) -> str:
    """One input as it may leave the machine, its copy recorded (a `Redactor` does this for a run)."""
    with project.store.engine.begin() as conn:
        return redacted_copy(conn, text, "input", project.config.curation.pii)


class Redactor:
    """What a run sends of example texts to a teacher or a judge: each text with its PII replaced by
    typed placeholders (the field's types in `curation.pii`), unless `redact` is off. Counts the
    texts that held PII and the findings per type either way, and records the copies it made in
    `redactions` (`record`). Every paid request built from an example's text goes through one."""

    def __init__(self, config: PiiConfig, redact: bool = True, off_reason: str = "--no-redact"):
        self.config = config
        self.on = config.enabled and redact
        self.off_reason = None if self.on else (
            "curation.pii.enabled is false" if not config.enabled else off_reason)
        self.texts: Counter = Counter()  # field -> distinct texts with findings
        self.findings: Counter = Counter()  # type -> findings in those texts
        self._seen: dict[tuple[str, str], str] = {}  # (text, field) -> what is sent
        self._copies: dict[tuple[str, str], tuple[str, list[Finding]]] = {}  # (source hash, field) -> copy

    @classmethod
    def for_project(cls, project, redact: bool = True, off_reason: str = "--no-redact") -> "Redactor":
        return cls(project.config.curation.pii, redact, off_reason)

    def __call__(self, text: str, field: str = "input") -> str:
        key = (text, field)
        if key not in self._seen:
            # Detection runs with redaction off too, so a --no-redact run reports what it sent raw.
            redacted, findings = redact(text, self.config, field)
            if findings:
                self.texts[field] += 1
                self.findings.update(f.type for f in findings)
                if self.on:
                    self._copies[(content_hash(text), field)] = (redacted, findings)
            self._seen[key] = redacted if self.on else text
        return self._seen[key]

    def alternative(self, text: str, field: str = "input") -> str:
        """What the other choice would send: the raw text when redacting, the redacted one under
        --no-redact (with `curation.pii.enabled: false` there is no other choice)."""
        if self.on or not self.config.enabled:
            return text
        return redact(text, self.config, field)[0]

    def messages(self, messages: list[dict], field: str = "input") -> list[dict]:
        """A chat with every text content redacted (string contents and text parts)."""
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                content = self(content, field)
            elif isinstance(content, list):
                content = [{**p, "text": self(p["text"], field)}
                           if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           else p for p in content]
            out.append({**m, "content": content} if "content" in m else dict(m))
        return out

    def summary(self, fields: tuple[str, ...] = ("input",)) -> dict:
        """{"redacted": sent redacted?, "off_reason", "<field>s_with_pii": distinct texts, "by_type"}."""
        out: dict = {"redacted": self.on, "off_reason": self.off_reason}
        out.update({f"{field}s_with_pii": self.texts[field] for field in fields})
        out["by_type"] = dict(sorted(self.findings.items()))
        return out

    def record(self, engine) -> int:
        """Store the redacted copies made so far (those not stored yet); returns how many were new."""
        if not self._copies:
            return 0
        from sqlalchemy.exc import IntegrityError

        table, ch = T.TABLES["redactions"], config_hash(self.config)
        copies, self._copies = self._copies, {}
        for attempt in range(2):  # a run beside this one may store the same copy first
            try:
                with engine.begin() as conn:
                    stored = set()
                    hashes = sorted({h for h, _ in copies})
                    for start in range(0, len(hashes), 500):
                        stored |= {(h, f) for h, f in conn.execute(select(table.c.source_hash, table.c.field).where(
                            table.c.config_hash == ch, table.c.source_hash.in_(hashes[start:start + 500])))}
                    stamp = now()
                    rows = [{"source_hash": h, "field": f, "config_hash": ch, "redacted_text": redacted,
                             "findings": json.dumps([x.as_list() for x in findings]), "n_findings": len(findings),
                             "created_at": stamp}
                            for (h, f), (redacted, findings) in copies.items() if (h, f) not in stored]
                    if rows:
                        conn.execute(insert(table), rows)
                    return len(rows)
            except IntegrityError:
                if attempt:
                    raise
        return 0


def pii_report(project, apply: bool = False, max_examples: int = 10) -> dict:
    """Counts per type and field over every example input and teacher output, with masked examples.

    `apply` records a redacted copy of every text that has findings (used for exports and teacher
    calls); the examples themselves are never changed, so content hashes and the eval lock hold."""
    from stillroom.store.records import split_assignments

    config = project.config.curation.pii
    table = T.TABLES["redactions"]
    ch = config_hash(config)
    per_type = {field: {t: 0 for t in [*PII_TYPES, *(p.name.lower() for p in config.patterns)]}
                for field in ("input", "output")}
    texts_with = {"input": 0, "output": 0}
    eval_with = 0
    examples_shown: list[dict] = []
    recorded = 0
    with project.store.engine.begin() as conn:
        splits = split_assignments(conn)
        stored = {(r.source_hash, r.field) for r in conn.execute(
            select(table.c.source_hash, table.c.field).where(table.c.config_hash == ch))}
        rows = [("input", r.id, r.input) for r in conn.execute(select(T.examples.c.id, T.examples.c.input).order_by(T.examples.c.id))]
        rows += [("output", r.example_id, r.output) for r in conn.execute(
            select(T.responses.c.example_id, T.responses.c.output).where(T.responses.c.role == "teacher")
            .order_by(T.responses.c.id))]
        pending = []
        for field, example_id, text in rows:
            redacted, findings = redact(text, config, field)
            if not findings:
                continue
            texts_with[field] += 1
            eval_with += field == "input" and splits.get(example_id) == "eval"
            for f in findings:
                per_type[field][f.type] = per_type[field].get(f.type, 0) + 1
            if len(examples_shown) < max_examples:
                examples_shown.append({"example_id": example_id, "field": field, "redacted": redacted,
                                       "types": sorted({f.type for f in findings})})
            key = (content_hash(text), field)
            if apply and key not in stored:
                stored.add(key)
                pending.append({"source_hash": key[0], "field": field, "config_hash": ch, "redacted_text": redacted,
                                "findings": json.dumps([f.as_list() for f in findings]),
                                "n_findings": len(findings), "created_at": now()})
        if pending:
            conn.execute(insert(table), pending)
            recorded = len(pending)
    return {"enabled": config.enabled, "config_hash": ch, "texts_scanned": len(rows),
            "texts_with_pii": texts_with, "findings": per_type, "eval_inputs_with_pii": eval_with,
            "recorded_now": recorded, "examples": examples_shown}

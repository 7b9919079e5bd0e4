"""LLM-as-judge with deterministic judges: position swap, retries, missing scores, versioned prompts."""

import asyncio
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sqlalchemy import select

from conftest import synthetic_rows
from stillroom.backends.base import BackendError, Completion
from stillroom.config import JudgeConfig
from stillroom.evaluate.judge import (
    PAIRWISE, RUBRIC, JudgeItem, judge_backend, judge_items, parse_pairwise, parse_rubric, record_judgements,
    summarize,
)
from stillroom.store import tables as T

_PAIR = re.compile(r"Answer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\nEnd your reply", re.S)
_ONE = re.compile(r"Answer:\n(.*?)\n\nEnd your reply", re.S)


class ScriptedJudge:
    """A ChatBackend whose answers are a function of the prompt (and of how often it was asked)."""

    def __init__(self, decide, name="scripted-judge"):
        self.decide, self.name, self.calls = decide, name, []

    async def chat(self, messages, max_tokens=None, temperature=None):
        self.calls.append(messages)
        prompt = messages[0]["content"]
        pair = _PAIR.search(prompt)
        args = ("pairwise", pair.group(1), pair.group(2)) if pair else ("rubric", _ONE.search(prompt).group(1), None)
        return Completion(self.decide(*args, retry=len(messages) > 1), 10, 3, 1.0, self.name)


def quality(kind, a, b, retry=False):
    """Prefers answers containing GOOD; a fair judge."""
    if kind == "rubric":
        return "Reasoning... Score: 5" if "GOOD" in a else "Score: 2"
    ga, gb = "GOOD" in a, "GOOD" in b
    return "Verdict: tie" if ga == gb else ("Verdict: A" if ga else "Verdict: B")


def items(n_student_better=3, n_teacher_better=2, n_same=1):
    out = []
    for k in range(n_student_better):
        out.append(JudgeItem(f"s{k}", f"q{k}", student="GOOD answer", teacher="weak answer"))
    for k in range(n_teacher_better):
        out.append(JudgeItem(f"t{k}", f"q{k}", student="weak answer", teacher="GOOD answer"))
    for k in range(n_same):
        out.append(JudgeItem(f"e{k}", f"q{k}", student="GOOD one", teacher="GOOD two"))
    return out


def run(backend, its, **kw):
    return asyncio.run(judge_items(backend, its, **kw))


def test_parsers():
    assert parse_pairwise("I think the first is better.\nVerdict: A") == "A"
    assert parse_pairwise("**Verdict:** b") == "B" and parse_pairwise(" tie. ") == "tie"
    assert parse_pairwise("Verdict: A ... no wait. Verdict: B") == "B"  # the last verdict line counts
    assert parse_pairwise("both are fine") is None and parse_pairwise("Verdict: C") is None
    assert parse_rubric("Score: 4") == 4 and parse_rubric("5") == 5 and parse_rubric("score = 3.0") == 3
    assert parse_rubric("Score: 7") is None and parse_rubric("Score: 3.5") is None and parse_rubric("great") is None


def test_both_orders_are_judged_and_combined():
    judge = ScriptedJudge(quality)
    js = run(judge, items(), rubric=False)
    assert len(js) == 12 and len(judge.calls) == 12  # 6 items x 2 orders
    first = {(j.item_key, j.position): j for j in js}
    # the student's answer is A in one order and B in the other; a fair judge picks it both times
    assert first[("s0", "student_first")].verdict == "A" and first[("s0", "teacher_first")].verdict == "B"
    assert first[("s0", "student_first")].score == first[("s0", "teacher_first")].score == 1.0
    s = summarize(js, items(), n_resamples=500)
    assert s["outcomes"] == {"student": 3, "tie": 1, "teacher": 2, "missing": 0}
    assert s["win_rate"]["estimate"] == pytest.approx(4 / 6)  # student at or above the teacher
    assert s["win_rate"]["low"] <= 4 / 6 <= s["win_rate"]["high"]
    assert s["strict_win_rate"] == pytest.approx(3 / 6) and s["position_consistency"] == 1.0


def test_position_bias_cancels_out():
    always_a = ScriptedJudge(lambda kind, a, b, retry=False: "Verdict: A" if kind == "pairwise" else "Score: 3")
    s = summarize(run(always_a, items()), items(), n_resamples=200)
    # a judge that always picks position A gives each item one win and one loss: a tie, never a win
    assert s["outcomes"] == {"student": 0, "tie": 6, "teacher": 0, "missing": 0}
    assert s["position_consistency"] == 0.0 and s["position_a_share"] == 1.0
    assert s["strict_win_rate"] == 0.0


def test_unparseable_answers_are_retried_then_recorded_missing():
    def flaky(kind, a, b, retry=False):
        if "NONSENSE" in a + (b or ""):
            return "I refuse to pick."  # never parseable
        return quality(kind, a, b) if retry else "hmm, hard to say"  # parseable only when reminded

    judge = ScriptedJudge(flaky)
    its = items(1, 0, 0) + [JudgeItem("bad", "q", student="NONSENSE", teacher="GOOD answer")]
    js = run(judge, its, max_retries=2)
    ok = [j for j in js if j.item_key == "s0"]
    assert all(j.verdict is not None and j.attempts == 2 for j in ok)
    assert ok[0].raw[0] == "hmm, hard to say"
    # the reminder is a follow-up turn in the same conversation
    assert any(len(m) == 3 and "could not read" in m[2]["content"] for m in judge.calls)
    bad = [j for j in js if j.item_key == "bad"]
    assert all(j.verdict is None and j.score is None and j.attempts == 3 and len(j.raw) == 3
               for j in bad if j.kind == "pairwise" or j.candidate == "student")
    s = summarize(js, its, n_resamples=200)
    assert s["outcomes"]["missing"] == 1 and s["n_scored"] == 1  # missing is never a win
    assert s["win_rate"]["n"] == 1 and s["win_rate"]["estimate"] == 1.0
    assert s["rubric"]["student"]["missing"] == 1 and s["rubric"]["student"]["estimate"] == 5.0


def test_every_judgement_is_recorded_with_its_prompt_version(make_project, db_url):
    def flaky(kind, a, b, retry=False):
        return "I refuse to pick." if "NONSENSE" in a + (b or "") else quality(kind, a, b)

    its = items(1, 0, 0) + [JudgeItem("bad", "q", student="NONSENSE", teacher="GOOD answer")]
    js = run(ScriptedJudge(flaky), its, max_retries=2)
    s = summarize(js, its, n_resamples=100)
    project = make_project(synthetic_rows(2), extra=f"database: {{url: '{db_url}'}}\n")
    assert record_judgements(project, js, student="gen", run_id=None) == len(js)
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(T.TABLES["judge_scores"]).order_by(T.TABLES["judge_scores"].c.id)).all()
    assert len(rows) == len(js)
    assert {(r.prompt_name, r.prompt_version, r.prompt_sha256) for r in rows} == {
        ("pairwise", PAIRWISE.version, PAIRWISE.sha256), ("rubric", RUBRIC.version, RUBRIC.sha256)}
    missing = [r for r in rows if r.item_key == "bad" and r.kind == "pairwise"]
    assert len(missing) == 2 and all(r.verdict is None and r.score is None for r in missing)
    assert json.loads(missing[0].raw) == ["I refuse to pick."] * 3
    assert s["prompts"] == [{"name": "pairwise", "version": "1", "sha256": PAIRWISE.sha256},
                            {"name": "rubric", "version": "1", "sha256": RUBRIC.sha256}]


def test_a_failing_judge_backend_is_an_error_or_a_retry():
    class Down:
        name = "down"

        async def chat(self, messages, max_tokens=None, temperature=None):
            raise BackendError("401 bad key", status_code=401, retryable=False)

    with pytest.raises(BackendError, match="bad key"):
        run(Down(), items(1, 0, 0))

    class Overloaded:
        name = "busy"

        async def chat(self, messages, max_tokens=None, temperature=None):
            raise BackendError("429", status_code=429, retryable=True)

    js = run(Overloaded(), items(1, 0, 0), rubric=False, max_retries=1)
    assert all(j.verdict is None and j.raw == ["[backend error] 429"] * 2 for j in js)


def test_judge_human_agreement():
    its = items(3, 2, 1)
    prefs = ["student", "student", "teacher", "teacher", "teacher", "tie"]  # humans disagree on item s2
    for item, pref in zip(its, prefs):
        item.human_preference = pref
    s = summarize(run(ScriptedJudge(quality), its, rubric=False), its, n_resamples=200)
    ha = s["human_agreement"]
    assert ha["n"] == 6 and ha["agreement"] == pytest.approx(5 / 6)
    # kappa by hand: judge (3 student, 2 teacher, 1 tie), human (2, 3, 1); p_e = (6 + 6 + 1) / 36
    assert ha["cohen_kappa"] == pytest.approx((5 / 6 - 13 / 36) / (1 - 13 / 36))
    assert summarize([], [], n_resamples=10)["human_agreement"]["message"].startswith("no human preferences")


def test_a_configured_judge_over_a_loopback_openai_server():
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            text = "Verdict: tie" if "Answer A:" in prompt else "Score: 4"
            reply = json.dumps({"model": body["model"], "choices": [{"message": {"content": text}}],
                                "usage": {"prompt_tokens": 5, "completion_tokens": 2}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = JudgeConfig(backend="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1", model="big-judge")
        backend = judge_backend(cfg)

        async def go():
            try:
                return await judge_items(backend, items(1, 1, 0))
            finally:
                await backend.aclose()

        js = asyncio.run(go())
    finally:
        server.shutdown()
    assert {j.judge_model for j in js} == {"big-judge"}
    s = summarize(js, items(1, 1, 0), n_resamples=100)
    assert s["outcomes"]["tie"] == 2 and s["rubric"]["teacher"]["estimate"] == 4.0
    with pytest.raises(Exception, match="no judge is configured"):
        judge_backend(JudgeConfig())

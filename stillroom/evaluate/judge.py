"""LLM-as-judge for generation tasks: pairwise student vs teacher in both orders, and a 1-5 rubric.

- Pairwise: every item is judged twice, once with the student's answer in position A and once with
  the teacher's there. Each order gives the student 1 (win), 0.5 (tie) or 0 (loss); the item's
  outcome is the mean of the two: above 0.5 the student wins, below it loses, exactly 0.5 is a tie.
  A judge that always prefers position A therefore yields ties, not wins: position bias cancels.
- Rubric: each answer gets a 1-5 score on its own.
- An answer that cannot be parsed is asked again (`max_retries` more times, reminding the judge of
  the format); if it still cannot be read the judgement is recorded as missing (verdict NULL) and
  the item is left out of the win rate and counted under `missing`: never a win, never a zero.
- Prompts are versioned in code (`JudgePrompt`: name, version, text); each recorded judgement
  carries the prompt's name, version and SHA-256, so an edited prompt cannot pass as the old one.
- Win rate (student at or above the teacher) has a bootstrap 95% interval; where humans stated a
  preference, judge-human agreement and Cohen's kappa are reported.

The judge is any `ChatBackend` (`judge:` in stillroom.yaml); tests drive it with a scripted one.
`LedgeredJudge` wraps it so every call is recorded in `responses` (role `judge`) under the labeling
ledger's request hash: a call asked before is answered from the store, so a re-run never pays twice.
`evaluate/judge_eval.py` runs it on a student's answers on the locked eval split (`stillroom judge`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Callable

from stillroom.backends.base import BackendError, ChatBackend, Completion
from stillroom.evaluate.bootstrap import DEFAULT_RESAMPLES, mean_ci

__all__ = ["JudgePrompt", "PAIRWISE", "RUBRIC", "JudgeItem", "Judgement", "judge_items", "summarize",
           "record_judgements", "parse_pairwise", "parse_rubric", "judge_backend", "LedgeredJudge"]


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    version: str
    text: str  # str.format template

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


PAIRWISE = JudgePrompt("pairwise", "1", (
    "You are comparing two answers to the same request. Judge which answer serves the request better: "
    "correct, complete, faithful to the request, no invented facts. Ignore length and style unless "
    "they matter to the request. Do not prefer an answer for its position.\n\n"
    "Request:\n{input}\n\n{reference_block}Answer A:\n{a}\n\nAnswer B:\n{b}\n\n"
    "End your reply with exactly one line: `Verdict: A`, `Verdict: B` or `Verdict: tie`."
))
RUBRIC = JudgePrompt("rubric", "1", (
    "Rate the answer to the request on a 1-5 scale: 5 fully correct and complete; 4 correct with "
    "minor omissions; 3 partly correct; 2 mostly wrong or off-task; 1 wrong, harmful or empty.\n\n"
    "Request:\n{input}\n\n{reference_block}Answer:\n{output}\n\n"
    "End your reply with exactly one line: `Score: N` where N is 1, 2, 3, 4 or 5."
))
REMINDER = {
    "pairwise": "I could not read a verdict in that reply. Reply with exactly one line: Verdict: A, Verdict: B or Verdict: tie.",
    "rubric": "I could not read a score in that reply. Reply with exactly one line: Score: N, with N from 1 to 5.",
}
_VERDICT = re.compile(r"verdict\s*[:=]\s*\W{0,3}\s*(a|b|tie)\b", re.I)
_SCORE = re.compile(r"score\s*[:=]\s*\W{0,3}\s*(\d+(?:\.\d+)?)", re.I)


def parse_pairwise(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge's reply (the last `Verdict:` line, or a bare answer); else None."""
    found = _VERDICT.findall(text)
    answer = found[-1] if found else text.strip().strip("`*.'\" ")
    answer = answer.lower()
    return {"a": "A", "b": "B", "tie": "tie"}.get(answer)


def parse_rubric(text: str) -> int | None:
    """1-5 from a judge's reply (the last `Score:` line, or a bare digit); out of range is None."""
    found = _SCORE.findall(text)
    answer = found[-1] if found else text.strip().strip("`*.'\" ")
    try:
        value = float(answer)
    except ValueError:
        return None
    return int(value) if value.is_integer() and 1 <= value <= 5 else None


@dataclass
class JudgeItem:
    key: str  # what is judged: an example id, a request id
    input: str
    student: str
    teacher: str
    reference: str | None = None  # a human reference answer, shown to the judge when present
    human_preference: str | None = None  # student | teacher | tie, where a human compared the two


@dataclass
class Judgement:
    """One judgement after retries; `verdict` None means missing."""

    item_key: str
    kind: str  # pairwise | rubric
    position: str | None  # pairwise: student_first | teacher_first
    candidate: str | None  # rubric: student | teacher
    verdict: str | None  # pairwise: A | B | tie; rubric: "1".."5"
    score: float | None  # pairwise: the student's points (1, 0.5, 0); rubric: 1-5
    attempts: int
    raw: list[str]
    judge_model: str
    prompt_name: str
    prompt_version: str
    prompt_sha256: str


async def _ask(backend: ChatBackend, prompt: JudgePrompt, parse, max_retries: int, **fields) -> tuple:
    messages = [{"role": "user", "content": prompt.text.format(**fields)}]
    raw: list[str] = []
    for attempt in range(1, max_retries + 2):
        try:
            reply = (await backend.chat(messages, temperature=0.0)).text
        except BackendError as exc:
            if not exc.retryable:
                raise
            raw.append(f"[backend error] {exc.message}")
            continue
        raw.append(reply)
        value = parse(reply)
        if value is not None:
            return value, attempt, raw
        messages = messages + [{"role": "assistant", "content": reply},
                               {"role": "user", "content": REMINDER[prompt.name]}]
    return None, max_retries + 1, raw


def _reference_block(item: JudgeItem) -> str:
    return f"Reference answer (written by a person):\n{item.reference}\n\n" if item.reference else ""


async def _judge_item(backend, item: JudgeItem, max_retries: int, rubric: bool) -> list[Judgement]:
    model = getattr(backend, "name", "judge")
    out = []
    common = {"input": item.input, "reference_block": _reference_block(item)}
    for position, a, b in (("student_first", item.student, item.teacher), ("teacher_first", item.teacher, item.student)):
        verdict, attempts, raw = await _ask(backend, PAIRWISE, parse_pairwise, max_retries, a=a, b=b, **common)
        student_pos = "A" if position == "student_first" else "B"
        score = None if verdict is None else 0.5 if verdict == "tie" else float(verdict == student_pos)
        out.append(Judgement(item.key, "pairwise", position, None, verdict, score, attempts, raw, model,
                             PAIRWISE.name, PAIRWISE.version, PAIRWISE.sha256))
    if rubric:
        for candidate, text in (("student", item.student), ("teacher", item.teacher)):
            value, attempts, raw = await _ask(backend, RUBRIC, parse_rubric, max_retries, output=text, **common)
            out.append(Judgement(item.key, "rubric", None, candidate, None if value is None else str(value),
                                 None if value is None else float(value), attempts, raw, model,
                                 RUBRIC.name, RUBRIC.version, RUBRIC.sha256))
    return out


async def judge_items(backend: ChatBackend, items: list[JudgeItem], max_retries: int = 2, rubric: bool = True,
                      concurrency: int = 4, backend_for: Callable[[JudgeItem], ChatBackend] | None = None,
                      on_item: Callable[[int, int], None] | None = None) -> list[Judgement]:
    """Judge every item (pairwise in both orders, plus the rubric); results in item order.
    `backend_for(item)` gives the backend for one item (e.g. a `LedgeredJudge` bound to its example);
    `on_item(done, total)` is called as items finish (a progress bar)."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(item):
        nonlocal done
        async with gate:
            result = await _judge_item(backend_for(item) if backend_for else backend, item, max_retries, rubric)
        done += 1
        if on_item:
            on_item(done, len(items))
        return result

    results = await asyncio.gather(*(one(i) for i in items))
    return [j for per_item in results for j in per_item]


def _outcome(scores: list[float | None]) -> str:
    if len(scores) != 2 or any(s is None for s in scores):
        return "missing"
    mean = sum(scores) / 2
    return "student" if mean > 0.5 else "teacher" if mean < 0.5 else "tie"


def _kappa(pairs: list[tuple[str, str]]) -> float | None:
    n = len(pairs)
    if not n:
        return None
    observed = sum(a == b for a, b in pairs) / n
    cats = {c for p in pairs for c in p}
    expected = sum((sum(a == c for a, _ in pairs) / n) * (sum(b == c for _, b in pairs) / n) for c in cats)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def summarize(judgements: list[Judgement], items: list[JudgeItem], n_resamples: int = DEFAULT_RESAMPLES,
              seed: int = 0) -> dict:
    """Win rate (student at or above the teacher) with its interval, outcomes, position consistency,
    rubric means, judge-human agreement, and the prompt versions used."""
    by_item: dict[str, dict] = {i.key: {"pairwise": {}, "rubric": {}} for i in items}
    for j in judgements:
        slot = by_item.setdefault(j.item_key, {"pairwise": {}, "rubric": {}})
        slot[j.kind][j.position or j.candidate] = j
    outcomes = {}
    consistent = chosen_a = decided = 0
    for key, slot in by_item.items():
        pw = slot["pairwise"]
        outcomes[key] = _outcome([pw[p].score if p in pw else None for p in ("student_first", "teacher_first")])
        if outcomes[key] != "missing":
            consistent += pw["student_first"].score == pw["teacher_first"].score
            for j in pw.values():
                decided += j.verdict != "tie"
                chosen_a += j.verdict == "A"
    scored = [k for k, o in outcomes.items() if o != "missing"]
    counts = {o: sum(v == o for v in outcomes.values()) for o in ("student", "tie", "teacher", "missing")}
    rubric = {}
    for candidate in ("student", "teacher"):
        values = [slot["rubric"][candidate].score for slot in by_item.values()
                  if candidate in slot["rubric"] and slot["rubric"][candidate].score is not None]
        missing = sum(1 for slot in by_item.values()
                      if candidate in slot["rubric"] and slot["rubric"][candidate].score is None)
        rubric[candidate] = dict(mean_ci(values, n_resamples, seed), missing=missing)
    humans = [(outcomes[i.key], i.human_preference) for i in items
              if i.human_preference and outcomes.get(i.key) not in (None, "missing")]
    prompts = sorted({(j.prompt_name, j.prompt_version, j.prompt_sha256) for j in judgements})
    return {
        "n_items": len(by_item),
        "n_scored": len(scored),
        "outcomes": counts,
        "win_rate": mean_ci([outcomes[k] in ("student", "tie") for k in scored], n_resamples, seed),
        "strict_win_rate": len([k for k in scored if outcomes[k] == "student"]) / len(scored) if scored else None,
        "position_consistency": consistent / len(scored) if scored else None,
        "position_a_share": chosen_a / decided if decided else None,
        "rubric": rubric,
        "human_agreement": {
            "n": len(humans),
            "agreement": sum(a == b for a, b in humans) / len(humans) if humans else None,
            "cohen_kappa": _kappa(humans),
            "message": None if humans else "no human preferences on these items: judge-human agreement is unmeasured",
        },
        "prompts": [{"name": n, "version": v, "sha256": s} for n, v, s in prompts],
        "judge_models": sorted({j.judge_model for j in judgements}),
        "outcome_by_item": outcomes,
    }


def record_judgements(project, judgements: list[Judgement], student: str, run_id: int | None = None,
                      evaluation_id: int | None = None) -> int:
    """Append every judgement to `judge_scores` (missing ones with a NULL verdict); returns the count."""
    from sqlalchemy import insert

    from stillroom.store import tables as T
    from stillroom.store.db import now

    if not judgements:
        return 0
    created = now()
    rows = []
    for j in judgements:
        row = asdict(j)
        row["raw"] = json.dumps(row["raw"], ensure_ascii=False)
        rows.append({**row, "student": student, "run_id": run_id, "evaluation_id": evaluation_id,
                     "created_at": created})
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.TABLES["judge_scores"]), rows)
    return len(rows)


def judge_backend(config) -> ChatBackend:
    """A live backend for the configured judge (`judge:` in stillroom.yaml)."""
    from stillroom.backends.registry import BACKENDS, _resolve
    from stillroom.errors import StillroomError

    if config.backend is None:
        raise StillroomError("no judge is configured: set judge.backend ('openai' with judge.base_url, or "
                             "'local') in stillroom.yaml")
    cls = _resolve(BACKENDS[config.backend])
    if config.backend == "openai":
        return cls(config.base_url, config.model, config.api_key_env, config.timeout_s)
    return cls()


class LedgeredJudge:
    """A judge backend that records every call in `responses` (role `judge`, bound to one example)
    under the labeling ledger's request hash (model, messages, params): a call already answered is
    served from the store and not sent, so re-running a judgement never pays twice. The hash is also
    sent as the Idempotency-Key where the backend takes one. `counts` tallies `sent` and `cached`."""

    def __init__(self, backend: ChatBackend, engine, example_id: int, counts: dict | None = None):
        self.backend, self.engine, self.example_id = backend, engine, example_id
        self.name = getattr(backend, "name", "judge")
        self.counts = counts if counts is not None else {}

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None) -> Completion:
        from sqlalchemy import select

        from stillroom.label.ledger import request_hash
        from stillroom.store import tables as T
        from stillroom.store.records import add_response

        R = T.responses
        rhash = request_hash(self.name, messages, {"max_tokens": max_tokens, "temperature": temperature,
                                                   "role": "judge"}, 0)
        with self.engine.connect() as conn:
            row = conn.execute(select(R.c.output, R.c.input_tokens, R.c.output_tokens, R.c.model)
                               .where(R.c.request_hash == rhash)).first()
        if row is not None:
            self.counts["cached"] = self.counts.get("cached", 0) + 1
            return Completion(row.output, row.input_tokens or 0, row.output_tokens or 0, 0.0, row.model)
        extra = {"idempotency_key": rhash} if getattr(self.backend, "accepts_idempotency_key", False) else {}
        reply = await self.backend.chat(messages, max_tokens=max_tokens, temperature=temperature, **extra)
        self.counts["sent"] = self.counts.get("sent", 0) + 1
        with self.engine.begin() as conn:
            add_response(conn, self.example_id, rhash, role="judge", model=reply.model or self.name, origin="live",
                         output=reply.text, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                         cost_usd=None, latency_ms=reply.latency_ms)
        return reply

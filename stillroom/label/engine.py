"""`stillroom label`: ask the teacher about every example that has no teacher label yet.

The run, top to bottom:
1. plan: the examples to label, their inputs checked (empty, encoding, length), and for each the
   n calls it needs, each identified by a request hash. Calls already answered in the store are
   never sent again; calls whose intent is still 'pending' were in flight when an earlier run died.
2. send: bounded concurrency, requests/tokens-per-minute buckets, retries with full-jitter
   backoff on 429 / 5xx / timeouts (a server's Retry-After wins), a budget that counts what is in
   flight. Each call's intent is committed before it is sent, with its request hash as the
   Idempotency-Key; its answer is committed the moment it returns.
3. decide: when an example's n answers are in, vote (consensus.py), write the label with
   provenance 'teacher', and flag ties, low agreement and invalid answers for review.

Batch endpoints (batch.py) and Ray (ray_runner.py) replace step 2; steps 1 and 3 are shared.

PII: the plan builds every call's messages from the input as `curate/pii.py` redacts it (emails,
phones, cards, IBANs, user patterns -> `[EMAIL]`, `[CARD]`, ...; `curation.pii.input`), so live,
batch and Ray calls send the same redacted text, and the request hash is over what is sent: an
input without PII hashes as it always did. `redact=False` (`--no-redact`) sends the raw text for
teachers inside the team's own trust boundary; the report says which, and counts the inputs that
held PII by type. An answer given under the other identity (raw / redacted) is not bought again.

Structured output: a task with a `response_format` (extraction's JSON schema) sends it with every
call to a backend that takes one, and it is part of each call's request hash. An endpoint that
refuses it (HTTP 400 naming it; not billed) gets the same call again without it, and the rest of
the run, and later runs, prompt plainly: the refusal is recorded once, on the refused call's
intent, and every answer is still validated by `task.parse`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable

from sqlalchemy import select

from stillroom.backends.base import BackendError, ChatBackend, Completion, refuses_response_format
from stillroom.errors import StillroomError
from stillroom.label import ledger
from stillroom.label.ratelimit import Backoff, RateLimiter
from stillroom.store import tables as T
from stillroom.store.records import labels_by_example, teacher_labels

__all__ = ["LabelProgress", "LabelReport", "LabelingError", "label_examples"]

# A wrong key, a forbidden model or a wrong URL fails every call alike: stop instead of failing
# each input in turn.
FATAL_STATUS = {401, 403, 404}
# The error recorded on the intent of a call whose endpoint refused `response_format`; planning
# looks for it, so later runs of the same teacher model prompt plainly from the start.
REFUSED = "structured output refused: "


class LabelingError(StillroomError):
    """Labeling cannot start or had to stop; the message says why and what was kept."""


# ---- plan ----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One paid teacher call: sample `sample` of an example's n."""

    example_id: int
    sample: int
    messages: list[dict]
    request_hash: str
    chars: int  # prompt size, for token and cost estimates before the call
    plain_hash: str | None = None  # the call's identity without response_format (None: none is sent)


@dataclass
class Item:
    """One example to label: the request hashes of all its samples, and those still to send."""

    example_id: int
    hashes: list[str]
    to_send: list[Call]


@dataclass
class Plan:
    model: str
    params: dict  # sent with every call: max_tokens, temperature, and response_format where used
    items: list[Item]
    notes: list[tuple[int, str, str]]  # (example id, flag kind, detail): rejected/truncated/encoding
    rejected: list[dict]
    answered: set[str] = field(default_factory=set)  # request hashes already answered in the store
    has_intent: set[str] = field(default_factory=set)  # calls with an intent row (any status)
    live_pending: set[str] = field(default_factory=set)  # sent by a live run that died before the answer
    in_batch: set[str] = field(default_factory=set)  # hashes an unfinished batch job will answer
    only: set[str] | None = None  # restrict `calls` to these hashes
    pii: dict | None = None  # the Redactor's summary over the plan's inputs
    # Other paid teacher work (augmentation) runs through the same send path: its answers are
    # recorded under `role` and `decide=False` skips the vote; the caller reads the answers.
    role: str = "teacher"
    decide: bool = True
    plain_params: dict | None = None  # `params` without response_format
    refused: str | None = None  # why the endpoint refused response_format (this run or an earlier one)
    _index: dict = field(default_factory=dict, repr=False)  # example id -> Item, for go_plain

    @property
    def response_format(self) -> dict | None:
        return self.params.get("response_format")

    def go_plain(self, call: Call, missing: dict[int, set[str]] | None = None) -> None:
        """Re-identify a call as its plain (no response_format) twin, in its item and `missing`."""
        old, new = call.request_hash, call.plain_hash
        if len(self._index) != len(self.items):
            self._index = {i.example_id: i for i in self.items}
        self._index[call.example_id].hashes[call.sample] = new
        if missing is not None and old in missing.get(call.example_id, ()):
            missing[call.example_id].discard(old)
            missing[call.example_id].add(new)
        call.request_hash, call.plain_hash = new, None

    def call_params(self, call: Call) -> dict:
        return self.params if call.plain_hash else (self.plain_params or self.params)

    @property
    def calls(self) -> list[Call]:
        return [c for item in self.items for c in item.to_send if c.request_hash not in self.in_batch
                and (self.only is None or c.request_hash in self.only)]

    @property
    def cached_calls(self) -> int:
        return sum(h in self.answered for item in self.items for h in item.hashes)


def check_input(text: str, max_chars: int, over_long: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(text to send or None if rejected, [(flag kind, reason)])."""
    if not text.strip():
        return None, [("bad_input", "empty input (nothing to label)")]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return None, [("bad_input", f"not valid Unicode (a lone surrogate at character {exc.start}); "
                                    "re-import the source decoded as UTF-8")]
    if "\x00" in text:
        return None, [("bad_input", "contains NUL characters: binary data, not text")]
    notes = []
    replaced = text.count("\ufffd")
    if replaced:
        notes.append(("encoding", f"contains {replaced} U+FFFD replacement character(s): the source was "
                                  "probably decoded with the wrong encoding; labelled as it is"))
    if len(text) > max_chars:
        if over_long == "reject":
            return None, notes + [("bad_input", f"input is {len(text):,} characters, over labeling.max_input_chars "
                                                f"({max_chars:,}); set labeling.over_long_inputs: truncate to label its start")]
        notes.append(("truncated", f"input of {len(text):,} characters cut to its first {max_chars:,} "
                                   "(labeling.over_long_inputs: truncate)"))
        text = text[:max_chars]
    return text, notes


def teacher_messages(task, text: str) -> list[dict]:
    """The chat a task sends its teacher; a task may define `teacher_messages` (system prompts,
    few-shot turns), else its `teacher_prompt` is one user turn."""
    custom = getattr(task, "teacher_messages", None)
    if custom is not None:
        return custom(text)
    return [{"role": "user", "content": task.teacher_prompt(text)}]


def make_plan(project, example_ids: list[int] | None = None, limit: int | None = None,
              structured: bool = True, redactor=None) -> Plan:
    """What this run has to do (reads only). `structured`: the backend can send the task's
    response_format (the engine sends it unless the endpoint has refused it before). `redactor`
    (default: `curation.pii` on) turns each input into what may be sent."""
    from stillroom.curate.pii import Redactor

    redactor = redactor if redactor is not None else Redactor.for_project(project)
    teacher, cfg = project.config.teacher, project.config.labeling
    params = {"max_tokens": teacher.max_tokens, "temperature": cfg.temperature}
    plain_params = dict(params)
    response_format = project.task.response_format() if structured else None
    E, R, I, B = T.examples, T.responses, ledger.INTENTS, ledger.BATCHES
    with project.store.engine.connect() as conn:
        labelled = set(teacher_labels(conn))
        if example_ids is None:  # augmented examples carry their parent's label; only --ids re-labels them
            labelled |= set(labels_by_example(conn, ("augmented",)))
        query = select(E.c.id, E.c.input).order_by(E.c.id)
        if example_ids is not None:
            query = query.where(E.c.id.in_(sorted(set(example_ids))))
        rows = [(i, text) for i, text in conn.execute(query) if i not in labelled]
        answered = {h for (h,) in conn.execute(select(R.c.request_hash).where(R.c.role == "teacher"))}
        open_batches = {b for (b,) in conn.execute(select(B.c.id).where(B.c.status.in_(("submitting", "submitted"))))}
        intents = {h: (status, batch) for h, status, batch in conn.execute(
            select(I.c.request_hash, I.c.status, I.c.batch_id))}
        refused = None
        if response_format is not None:
            refused = conn.execute(select(I.c.error).where(
                I.c.model == teacher.model, I.c.error.like(REFUSED + "%")).order_by(I.c.id).limit(1)).scalar()
    if response_format is not None and refused is None:
        params = {**params, "response_format": response_format}
    if limit is not None:
        rows = rows[:limit]
    plan = Plan(teacher.model, params, [], [], [], answered, plain_params=plain_params,
                refused=refused[len(REFUSED):] if refused else None)
    for example_id, raw in rows:
        # Redacted before the length check, so a cut never leaves half an email behind.
        sent = redactor(raw)
        text, notes = check_input(sent, cfg.max_input_chars, cfg.over_long_inputs)
        plan.notes += [(example_id, kind, detail) for kind, detail in notes]
        if text is None:
            plan.rejected.append({"example_id": example_id, "reason": notes[-1][1]})
            continue
        messages = teacher_messages(project.task, text)
        chars = sum(len(str(m.get("content", ""))) for m in messages)
        # The other way of sending this input (raw / redacted): an answer recorded before a switch of
        # --no-redact is not bought again.
        other_messages = None
        alternative = redactor.alternative(raw)
        if answered and alternative != sent:
            other_text = check_input(alternative, cfg.max_input_chars, cfg.over_long_inputs)[0]
            other_messages = teacher_messages(project.task, other_text) if other_text is not None else None
        item = Item(example_id, [], [])
        for sample in range(cfg.samples):
            h = ledger.request_hash(teacher.model, messages, params, sample)
            # The same input asked with / without response_format is the same question: an answer
            # under the other identity (before a refusal, or before structured output) is not re-bought.
            twin, other = None, None
            if response_format is not None:
                other = plain_params if "response_format" in params else {**params, "response_format": response_format}
                twin = ledger.request_hash(teacher.model, messages, other, sample)
            if h not in answered and twin in answered:
                h = twin
            if h not in answered and other_messages is not None:
                seen = [ledger.request_hash(teacher.model, other_messages, p, sample) for p in (params, other) if p]
                h = next((x for x in seen if x in answered), h)
            item.hashes.append(h)
            if h in answered:
                continue
            plain = twin if "response_format" in params else None
            item.to_send.append(Call(example_id, sample, messages, h, chars, plain))
            if plain in intents:
                plan.has_intent.add(plain)
            if h in intents:
                plan.has_intent.add(h)
                status, batch = intents[h]
                if status == "pending":
                    (plan.in_batch if batch in open_batches else plan.live_pending).add(h)
        plan.items.append(item)
    plan.pii = redactor.summary()
    return plan


# ---- money ---------------------------------------------------------------------------------------


def call_cost(teacher, input_tokens: int, output_tokens: int, factor: float = 1.0) -> float:
    return factor * (input_tokens * teacher.price_per_million_input_tokens
                     + output_tokens * teacher.price_per_million_output_tokens) / 1e6


class TokenEstimate:
    """Input tokens of a prompt before sending it: 3 characters a token (generous for English)
    until real counts come back, then the observed ratio with 10% to spare."""

    def __init__(self):
        self.chars = 0
        self.tokens = 0

    def observe(self, chars: int, input_tokens: int) -> None:
        if input_tokens > 0:
            self.chars += chars
            self.tokens += input_tokens

    def input_tokens(self, chars: int) -> int:
        per_token = self.chars / self.tokens / 1.1 if self.tokens >= 200 else 3.0
        return max(1, math.ceil(chars / per_token))


class Budget:
    """Spend so far plus what calls in flight may still cost; refuses a call that could cross it."""

    def __init__(self, limit: float | None):
        self.limit = limit
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False

    def reserve(self, amount: float) -> bool:
        if self.limit is not None and self.spent + self.reserved + amount > self.limit:
            self.exhausted = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        self.reserved -= reserved
        self.spent += actual


# ---- one call, with retries ----------------------------------------------------------------------


@dataclass
class Outcome:
    completion: Completion | None
    reason: str | None  # why it failed, after the retries
    attempts: int
    fatal: bool = False
    refused_format: bool = False  # the endpoint refused the call's response_format (not billed)


async def call_with_retries(backend: ChatBackend, call: Call, limiter: RateLimiter, backoff: Backoff,
                            max_retries: int, params: dict, est_tokens: int) -> Outcome:
    """Send one call until it is answered, fails for good, or runs out of retries. Every attempt
    carries the same Idempotency-Key, so a retry of a call the server did answer is not billed."""
    extra = {"idempotency_key": call.request_hash} if getattr(backend, "accepts_idempotency_key", False) else {}
    if params.get("response_format") is not None:
        extra["response_format"] = params["response_format"]
    for attempt in range(max_retries + 1):
        await limiter.acquire(est_tokens)
        try:
            completion = await backend.chat(call.messages, max_tokens=params["max_tokens"],
                                            temperature=params["temperature"], **extra)
        except BackendError as exc:
            limiter.settle(est_tokens, 0)
            if "response_format" in extra and refuses_response_format(exc):
                return Outcome(None, exc.message, attempt + 1, refused_format=True)
            if exc.status_code in FATAL_STATUS:
                return Outcome(None, exc.message, attempt + 1, fatal=True)
            if not exc.retryable:
                return Outcome(None, exc.message, attempt + 1)
            if attempt == max_retries:
                return Outcome(None, f"{exc.message} (gave up after {attempt + 1} attempts)", attempt + 1)
            if exc.status_code == 429 and exc.retry_after:
                limiter.pause(exc.retry_after)  # the limit is the client's, not this call's
            await asyncio.sleep(backoff.delay(attempt, exc.retry_after))
            continue
        except Exception as exc:  # a backend bug must cost one input, not the run
            limiter.settle(est_tokens, 0)
            return Outcome(None, f"{type(exc).__name__}: {exc}", attempt + 1)
        limiter.settle(est_tokens, completion.input_tokens + completion.output_tokens)
        return Outcome(completion, None, attempt + 1)
    raise AssertionError("unreachable")


# ---- report --------------------------------------------------------------------------------------


@dataclass
class LabelProgress:
    done: int  # calls finished this run (answered or failed)
    total: int  # calls this run has to make
    spent_usd: float
    projected_usd: float  # spend if every remaining call costs what the finished ones did


@dataclass
class LabelReport:
    mode: str
    model: str
    examples: int = 0  # examples without a teacher label that this run took on
    calls_total: int = 0  # calls those examples need (samples x examples, minus rejected inputs)
    calls_cached: int = 0  # already answered in the store: not sent again
    calls_paid: int = 0  # answered this run
    calls_failed: int = 0
    calls_not_sent: int = 0  # left for a later run (budget, a fatal error)
    retries: int = 0
    resumed_in_flight: int = 0  # calls an earlier run had sent without recording an answer
    waiting_on_batch: int = 0  # calls an unfinished batch job will answer
    labelled: int = 0
    no_label: int = 0  # answered, but a tie or no valid answer
    flagged: dict[str, int] = field(default_factory=dict)
    spent_usd: float = 0.0
    projected_usd: float = 0.0
    max_cost_usd: float | None = None
    stopped: str | None = None  # why the run stopped early, if it did
    failures: list[dict] = field(default_factory=list)  # {example_id, sample, reason}
    rejected: list[dict] = field(default_factory=list)  # {example_id, reason}
    batch: dict | None = None
    # Structured output: None (the task has no response_format, or the backend takes none),
    # "sent", or "refused: <why>; ..." (answers were asked for by plain prompting and parsed).
    structured_output: str | None = None
    # PII in the inputs this run took on: {"redacted": sent redacted?, "off_reason", "inputs_with_pii",
    # "by_type": {type: findings}} (see curate/pii.py's Redactor).
    pii: dict | None = None
    seconds: float = 0.0
    _decided: set = field(default_factory=set, repr=False)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        out["spent_usd"] = round(self.spent_usd, 6)
        out["projected_usd"] = round(self.projected_usd, 6)
        out["seconds"] = round(self.seconds, 2)
        return out

    def note_refusal(self, plan: Plan, reason: str) -> None:
        """The endpoint refused response_format: say so once; every later call goes plain."""
        if plan.refused is None:
            plan.refused = reason
        self.structured_output = f"refused: {plan.refused}; answers asked for by plain prompting and parsed"

    def flag(self, kinds: list[str]) -> None:
        for kind in kinds:
            self.flagged[kind] = self.flagged.get(kind, 0) + 1

    def decided(self, example_id: int, consensus, kinds: list[str]) -> None:
        self.flag(kinds)
        if example_id in self._decided:
            return
        self._decided.add(example_id)
        if consensus.label is not None:
            self.labelled += 1
        else:
            self.no_label += 1


def progress_of(report: LabelReport, done: int, total: int, est_cost: float) -> LabelProgress:
    if report.calls_paid:
        projected = report.spent_usd / report.calls_paid * (total - report.calls_failed)
    else:
        projected = est_cost * total
    return LabelProgress(done, total, report.spent_usd, max(projected, report.spent_usd))


# ---- the live run --------------------------------------------------------------------------------


async def run_live(project, plan: Plan, backend: ChatBackend, report: LabelReport, budget: Budget,
                   progress: Callable[[LabelProgress], None] | None = None) -> None:
    """Send the plan's calls and decide each example as its answers complete."""
    teacher, cfg, task = project.config.teacher, project.config.labeling, project.task
    limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
    backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
    estimate = TokenEstimate()
    writer = ledger.Writer(project.store.engine)
    calls = plan.calls
    # An example is decided once all n of its answers are on record; one with a failed call, or
    # with answers owed by a batch job, waits for a later run.
    missing = {item.example_id: {h for h in item.hashes if h not in plan.answered} for item in plan.items}
    items = {item.example_id: item for item in plan.items}
    state = {"done": 0, "started": 0}
    max_tokens = plan.params["max_tokens"]
    first_est = call_cost(teacher, estimate.input_tokens(calls[0].chars), max_tokens) if calls else 0.0
    outputs: dict[str, str] = {}  # this run's answers, by request hash, until their example is decided
    # Answers and decisions are committed in the background: a worker waits only for the intent of
    # its next call, and the writer commits in order, so that wait covers its earlier writes too.
    writes: list = []  # (example id or None, consensus or None, future)

    def check_writes(wait: bool = False) -> None:
        """Apply finished decisions to the report; a write that failed even alone stops the run."""
        keep = []
        for example_id, consensus, future in writes:
            if not future.done() and not wait:
                keep.append((example_id, consensus, future))
                continue
            result = future.result()  # raises what the store raised
            if example_id is not None:
                report.decided(example_id, consensus, result)
        writes[:] = keep

    async def decide(example_id: int) -> None:
        hashes = items[example_id].hashes
        if all(h in outputs for h in hashes):  # all answered in this run: vote in memory
            consensus, votes = ledger.vote(task, [(h, outputs.pop(h)) for h in hashes], cfg.min_agreement)
            writes.append((example_id, consensus, writer.submit(ledger.decision_op(example_id, plan.model,
                                                                                   consensus, votes))))
        else:
            consensus, kinds = await writer.run(ledger.checked(partial(
                ledger.finish_example, task=task, example_id=example_id, hashes=hashes, model=plan.model,
                min_agreement=cfg.min_agreement)))
            report.decided(example_id, consensus, kinds)

    queue = iter(calls)

    async def worker() -> None:
        for call in queue:
            if report.stopped:
                return
            est_in = estimate.input_tokens(call.chars)
            est_cost = call_cost(teacher, est_in, max_tokens)
            if not budget.reserve(est_cost):
                report.stopped = (f"budget: the next call could cross --max-cost ${budget.limit:.4f} "
                                  f"(spent ${budget.spent:.4f}, ${budget.reserved:.4f} in flight)")
                return
            state["started"] += 1
            if plan.refused and call.plain_hash:
                plan.go_plain(call, missing)
            while True:
                await writer.run(ledger.pending_op(call.example_id, call.sample, plan.model, call.request_hash,
                                                   new=call.request_hash not in plan.has_intent))
                outcome = await call_with_retries(backend, call, limiter, backoff, cfg.max_retries,
                                                  plan.call_params(call), est_in + max_tokens)
                if not (outcome.refused_format and call.plain_hash):
                    break
                # Refused before anything was billed: the same question again, without the schema.
                await writer.run(ledger.checked(partial(
                    ledger.mark_failed, rhash=call.request_hash, attempts=outcome.attempts,
                    reason=f"{REFUSED}{outcome.reason}; re-sent without response_format")))
                report.note_refusal(plan, outcome.reason)
                plan.go_plain(call, missing)
            report.retries += outcome.attempts - 1
            if outcome.completion is not None:
                c = outcome.completion
                cost = call_cost(teacher, c.input_tokens, c.output_tokens)
                estimate.observe(call.chars, c.input_tokens)
                writes.append((None, None, writer.submit(ledger.answer_op(
                    call.example_id, call.request_hash, model=c.model or plan.model, output=c.text,
                    input_tokens=c.input_tokens, output_tokens=c.output_tokens, cost_usd=cost,
                    latency_ms=c.latency_ms, attempts=outcome.attempts, role=plan.role))))
                budget.settle(est_cost, cost)
                report.calls_paid += 1
                report.spent_usd += cost
                missing[call.example_id].discard(call.request_hash)
                if plan.decide:
                    outputs[call.request_hash] = c.text
                    if not missing[call.example_id]:
                        await decide(call.example_id)
            else:
                budget.settle(est_cost, 0.0)
                await writer.run(ledger.checked(partial(ledger.mark_failed, rhash=call.request_hash,
                                                        reason=outcome.reason, attempts=outcome.attempts)))
                report.calls_failed += 1
                report.failures.append({"example_id": call.example_id, "sample": call.sample,
                                        "reason": outcome.reason})
                if outcome.fatal and not report.stopped:
                    report.stopped = f"the teacher refused the call: {outcome.reason}"
            state["done"] += 1
            if len(writes) > 4 * cfg.concurrency:
                check_writes()
            if progress is not None:
                progress(progress_of(report, state["done"], len(calls), first_est))

    try:
        # Examples whose answers are all on record (an earlier run, or a batch) need no call.
        for item in plan.items:
            if not missing[item.example_id] and plan.only is None and plan.decide:
                await decide(item.example_id)
        if progress is not None:
            progress(progress_of(report, 0, len(calls), first_est))
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(calls)))))
    finally:
        report.calls_not_sent = len(calls) - state["started"]
        writer.close()  # commits everything still queued
        close = getattr(backend, "aclose", None)
        if close is not None:
            await close()
    check_writes(wait=True)
    report.projected_usd = progress_of(report, state["done"], len(calls), first_est).projected_usd


# ---- entry point ---------------------------------------------------------------------------------


def _record_notes(project, plan: Plan, report: LabelReport) -> None:
    with project.store.engine.begin() as conn:
        for example_id, kind, detail in plan.notes:
            if ledger.add_flag(conn, example_id, kind, detail):
                report.flag([kind])


def label_examples(project, example_ids: list[int] | None = None, limit: int | None = None,
                   max_cost: float | None = None, batch: bool = False, wait: bool = True,
                   use_ray: bool = False, backend: ChatBackend | None = None,
                   progress: Callable[[LabelProgress], None] | None = None, redact: bool = True) -> LabelReport:
    """Label every example without a teacher label (or those in `example_ids`, at most `limit`)
    with the configured teacher. `max_cost` (USD, default `labeling.max_cost_usd`) stops the run
    before this run's spend could cross it. `batch` uses the endpoint's batch API (`wait=False`:
    submit and return; run again to collect); `use_ray` fans the calls out over Ray workers.
    `redact=False` sends inputs without PII redaction (a teacher inside your own trust boundary)."""
    from stillroom.curate.pii import Redactor

    started = time.perf_counter()
    cfg = project.config
    if backend is None and cfg.teacher.backend == "recorded":
        raise LabelingError(
            "teacher.backend is 'recorded' (answers imported from logs), so there is no teacher to ask: set "
            "teacher.backend to 'openai' (with teacher.base_url), 'litellm', 'local' or 'gguf' in stillroom.yaml")
    if batch and use_ray:
        raise LabelingError("choose one of --batch (the provider's batch API) and --ray (fan-out over Ray)")
    limit_usd = max_cost if max_cost is not None else cfg.labeling.max_cost_usd
    if backend is not None:
        structured = bool(getattr(backend, "supports_response_format", False))
    else:  # batch files and Ray workers go to the configured backend
        structured = cfg.teacher.backend in ("openai", "litellm", "gguf")
    redactor = Redactor.for_project(project, redact)
    plan = make_plan(project, example_ids, limit, structured=structured, redactor=redactor)
    redactor.record(project.store.engine)  # the copies that go out, before anything is sent
    mode = "batch" if batch else "ray" if use_ray else "live"
    report = LabelReport(mode, plan.model, examples=len(plan.items) + len(plan.rejected),
                         calls_total=sum(len(i.hashes) for i in plan.items), calls_cached=plan.cached_calls,
                         resumed_in_flight=len(plan.live_pending), rejected=plan.rejected, max_cost_usd=limit_usd,
                         pii=plan.pii)
    if not batch:
        report.waiting_on_batch = len(plan.in_batch)
    if plan.refused:
        report.note_refusal(plan, plan.refused)
    elif plan.response_format is not None:
        report.structured_output = "sent"
    _record_notes(project, plan, report)
    budget = Budget(limit_usd)
    if batch:
        from stillroom.label.batch import run_batch

        run_batch(project, plan, report, budget, wait=wait, progress=progress)
    else:
        if backend is None:
            from stillroom.backends.registry import teacher_backend

            backend = teacher_backend(cfg.teacher, project.root)
        if use_ray:
            from stillroom.label.ray_runner import run_ray

            run_ray(project, plan, report, budget, progress=progress)
        else:
            asyncio.run(run_live(project, plan, backend, report, budget, progress))
    report.seconds = time.perf_counter() - started
    return report

"""The store side of labeling: call intents, recorded answers, review flags, final labels.

Every write goes through one `Writer` thread as an `Op`. Each op is committed before its caller
goes on (an intent is durable before its call is sent, an answer is durable the moment it
returns). Ops that queue up while a commit runs share the next commit, and their rows go in as
one executemany per statement: recording keeps pace with hundreds of calls per second without
holding the event loop's GIL. If a shared commit fails (a row that already exists, say), every op
in it is redone alone through its `careful` path, which checks before it writes.

The writer's own connection commits without waiting for the disk (SQLite `synchronous=NORMAL` in
WAL mode, PostgreSQL `synchronous_commit=off`): a commit survives the process being killed, only
a power cut or an OS crash can lose the last moments, and a call whose answer was lost that way is
re-sent with the same Idempotency-Key, which a provider that honours keys does not bill again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import queue
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine

from stillroom.label.consensus import Consensus, Vote, decide, parse_votes
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import add_label, add_response

__all__ = ["Op", "Writer", "request_hash"]

INTENTS = T.TABLES["label_intents"]
BATCHES = T.TABLES["label_batches"]
FLAGS = T.TABLES["label_flags"]
R = T.responses

_GROUP_MAX = 1024

# The statements of the fast path, in the order a shared commit runs them.
INSERT_INTENT = insert(INTENTS)
INSERT_RESPONSE = insert(R)
MARK_DONE = update(INTENTS).where(INTENTS.c.request_hash == bindparam("rh")).values(
    status="done", attempts=INTENTS.c.attempts + bindparam("n"), error=None, updated_at=bindparam("at"))
INSERT_LABEL = insert(T.labels).values(
    response_id=select(R.c.id).where(R.c.request_hash == bindparam("rh")).scalar_subquery())
_ORDER = (INSERT_INTENT, INSERT_RESPONSE, MARK_DONE, INSERT_LABEL)


def request_hash(model: str, messages: list[dict], params: dict, sample: int) -> str:
    """The identity of one paid call: what is asked, of whom, how, and which of the n samples."""
    body = json.dumps({"model": model, "messages": messages, "params": params, "sample": sample},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@dataclass
class Op:
    """A write: `rows` for the batched fast path, then `after` (its result is the op's result);
    `careful` does the same alone, checking first, when a shared commit fails."""

    careful: Callable[[Connection], object]
    rows: list[tuple[object, dict]] = field(default_factory=list)
    after: Callable[[Connection], object] | None = None


def checked(fn: Callable[[Connection], object]) -> Op:
    """An op that always takes the careful path (rare writes: failures, flags, resumed intents)."""
    return Op(careful=fn, after=fn)


def _resolve(outcomes: list) -> None:
    for future, result, error in outcomes:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


class Writer:
    """Runs store writes on one thread; `await writer.run(op)` returns once the op is committed,
    `writer.submit(op)` returns a concurrent future (fire and forget, or wait from a thread)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="stillroom-label-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((op, future))
        return future

    async def run(self, op: Op):
        future = asyncio.get_running_loop().create_future()
        self._queue.put((op, future))
        return await future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        with self.engine.connect() as conn:
            self._conn = conn
            self._relax(True)
            try:
                self._serve()
            finally:
                self._relax(False)

    def _relax(self, on: bool) -> None:
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            self._conn.exec_driver_sql(f"PRAGMA synchronous={'NORMAL' if on else 'FULL'}")
        elif dialect == "postgresql":
            self._conn.exec_driver_sql("SET synchronous_commit = off" if on else "RESET synchronous_commit")
        self._conn.commit()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, closing = [first], False
            while len(group) < _GROUP_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                group.append(item)
            self._commit(group)
            if closing:
                return

    def _commit(self, group: list) -> None:
        conn = self._conn
        try:
            with conn.begin():
                for statement in _ORDER:
                    params = [p for op, _ in group for s, p in op.rows if s is statement]
                    if params:
                        conn.execute(statement, params)
                outcomes = [(future, op.after(conn) if op.after is not None else None, None) for op, future in group]
        except Exception:
            outcomes = []
            for op, future in group:
                try:
                    with conn.begin():
                        outcomes.append((future, op.careful(conn), None))
                except Exception as exc:  # noqa: BLE001 -- handed to the caller
                    outcomes.append((future, None, exc))
        # One wake-up per event loop for the whole group, not one per op.
        by_loop: dict = {}
        for outcome in outcomes:
            if isinstance(outcome[0], asyncio.Future):
                by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
            else:
                _resolve([outcome])
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, batch)
            except RuntimeError:  # the loop is gone (the run was interrupted): nobody waits
                pass


# ---- intents and answers -------------------------------------------------------------------------


def mark_pending(conn: Connection, example_id: int, sample: int, model: str, rhash: str,
                 batch_id: int | None = None) -> None:
    """The intent to send a call, recorded before it is sent."""
    row = conn.execute(select(INTENTS.c.id).where(INTENTS.c.request_hash == rhash)).first()
    stamp = now()
    if row is None:
        conn.execute(insert(INTENTS).values(
            request_hash=rhash, example_id=example_id, sample=sample, model=model, status="pending",
            attempts=0, batch_id=batch_id, created_at=stamp, updated_at=stamp))
    else:
        conn.execute(update(INTENTS).where(INTENTS.c.id == row[0]).values(
            status="pending", error=None, batch_id=batch_id, updated_at=stamp))


def pending_op(example_id: int, sample: int, model: str, rhash: str, new: bool) -> Op:
    """The intent of a call; `new`: no intent row exists for it yet (the fast path can insert)."""
    careful = partial(mark_pending, example_id=example_id, sample=sample, model=model, rhash=rhash)
    if not new:
        return checked(careful)
    stamp = now()
    return Op(careful, [(INSERT_INTENT, {
        "request_hash": rhash, "example_id": example_id, "sample": sample, "model": model, "status": "pending",
        "attempts": 0, "error": None, "batch_id": None, "created_at": stamp, "updated_at": stamp})])


def record_answer(conn: Connection, example_id: int, rhash: str, *, model: str, output: str,
                  input_tokens: int, output_tokens: int, cost_usd: float, latency_ms: float | None,
                  attempts: int, role: str = "teacher") -> int:
    """A returned call: the response (once per request hash) and its intent marked done."""
    response_id, _ = add_response(
        conn, example_id, rhash, role=role, model=model, origin="live", output=output,
        input_tokens=input_tokens, output_tokens=output_tokens, cost_usd=cost_usd, latency_ms=latency_ms)
    conn.execute(MARK_DONE, {"rh": rhash, "n": attempts, "at": now()})
    return response_id


def answer_op(example_id: int, rhash: str, *, model: str, output: str, input_tokens: int, output_tokens: int,
              cost_usd: float, latency_ms: float | None, attempts: int, role: str = "teacher") -> Op:
    stamp = now()
    fields = dict(model=model, output=output, input_tokens=input_tokens, output_tokens=output_tokens,
                  cost_usd=cost_usd, latency_ms=latency_ms)
    return Op(partial(record_answer, example_id=example_id, rhash=rhash, attempts=attempts, role=role, **fields), [
        (INSERT_RESPONSE, {"example_id": example_id, "request_hash": rhash, "role": role, "origin": "live",
                           "created_at": stamp, **fields}),
        (MARK_DONE, {"rh": rhash, "n": attempts, "at": stamp}),
    ])


def mark_failed(conn: Connection, rhash: str, reason: str, attempts: int) -> None:
    conn.execute(update(INTENTS).where(INTENTS.c.request_hash == rhash).values(
        status="failed", attempts=INTENTS.c.attempts + attempts, error=reason[:2000], updated_at=now()))


# ---- flags and decisions -------------------------------------------------------------------------


def add_flag(conn: Connection, example_id: int, kind: str, detail: str, model: str | None = None,
             agreement: float | None = None, response_id: int | None = None) -> bool:
    """Flag an example for review once (the same flag again adds nothing)."""
    key = hashlib.sha256(f"{example_id}\x1f{kind}\x1f{model}\x1f{response_id}\x1f{detail}".encode()).hexdigest()
    if conn.execute(select(FLAGS.c.id).where(FLAGS.c.key == key)).first():
        return False
    conn.execute(insert(FLAGS).values(
        key=key, example_id=example_id, kind=kind, detail=detail, model=model, agreement=agreement,
        response_id=response_id, created_at=now()))
    return True


def decided_by(model: str, consensus: Consensus) -> str:
    tail = f" n={consensus.answers} agreement={consensus.agreement:.2f}"
    name = model if len(model) + len(tail) <= 247 else model[:200] + "..."  # labels.decided_by is 255 wide
    return f"teacher:{name}{tail}"


def _write_flags(conn: Connection, example_id: int, model: str, consensus: Consensus, votes: list[Vote]) -> list[str]:
    added = []
    for v in votes:
        if v.error is not None:
            rid = conn.execute(select(R.c.id).where(R.c.request_hash == v.ref)).scalar()
            if add_flag(conn, example_id, "invalid_output", v.error, model, response_id=rid):
                added.append("invalid_output")
    if consensus.flag and add_flag(conn, example_id, consensus.flag, consensus.describe(), model, consensus.agreement):
        added.append(consensus.flag)
    return added


def write_decision(conn: Connection, example_id: int, model: str, consensus: Consensus, votes: list[Vote]) -> list[str]:
    """The label (provenance 'teacher') and the review flags of a vote; returns new flag kinds."""
    added = _write_flags(conn, example_id, model, consensus, votes)
    if consensus.label is not None:
        rid = conn.execute(select(R.c.id).where(R.c.request_hash == consensus.ref)).scalar()
        add_label(conn, example_id, consensus.label, "teacher", decided_by(model, consensus), rid)
    return added


def decision_op(example_id: int, model: str, consensus: Consensus, votes: list[Vote]) -> Op:
    """A vote taken in memory on answers of this run; the example had no teacher label when planned."""
    rows = []
    if consensus.label is not None:
        rows.append((INSERT_LABEL, {"example_id": example_id, "label": consensus.label, "provenance": "teacher",
                                    "decided_by": decided_by(model, consensus), "created_at": now(),
                                    "rh": consensus.ref}))
    needs_flags = consensus.flag is not None or any(v.error is not None for v in votes)
    after = partial(_write_flags, example_id=example_id, model=model, consensus=consensus, votes=votes)
    return Op(partial(write_decision, example_id=example_id, model=model, consensus=consensus, votes=votes),
              rows, after if needs_flags else (lambda conn: []))


def vote(task, answers: list[tuple[str, str]], min_agreement: float) -> tuple[Consensus, list[Vote]]:
    """Parse (request hash, output) answers with the task and take the majority."""
    votes = parse_votes(task, answers)
    return decide(votes, min_agreement, task), votes


def finish_example(conn: Connection, task, example_id: int, hashes: list[str], model: str,
                   min_agreement: float) -> tuple[Consensus, list[str]]:
    """Vote over the example's answers as recorded in the store (answers of earlier runs)."""
    rows = dict(conn.execute(select(R.c.request_hash, R.c.output).where(R.c.request_hash.in_(hashes))).all())
    consensus, votes = vote(task, [(h, rows[h]) for h in hashes if h in rows], min_agreement)
    return consensus, write_decision(conn, example_id, model, consensus, votes)

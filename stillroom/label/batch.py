"""`stillroom label --batch`: the same calls through an OpenAI-compatible batch API.

Write the calls as JSONL (custom_id = request hash), upload it (`POST /files`, purpose batch),
create a batch (`POST /batches`), poll (`GET /batches/{id}`), download the output and error files,
record every answer, then vote as a live run does. Batch APIs bill about half the live price
(`labeling.batch_price_factor`).

A job is in the store before the provider knows it: the row is written ('submitting', with its
calls' intents) before the batch is created, and creation carries an Idempotency-Key. A run that
dies anywhere resumes the job: it finds the provider's batch by its input file (or re-creates it
with the same key), or picks up polling with the persisted batch id. Nothing is submitted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import httpx
from sqlalchemy import insert, select, update

from stillroom.label import ledger
from stillroom.label.engine import (
    REFUSED,
    Budget,
    LabelingError,
    LabelProgress,
    LabelReport,
    Plan,
    TokenEstimate,
    call_cost,
)
from stillroom.store import tables as T
from stillroom.store.db import now

__all__ = ["run_batch"]

TERMINAL = {"completed", "failed", "expired", "cancelled"}
B, I = ledger.BATCHES, ledger.INTENTS


class BatchClient:
    """The four endpoints a batch needs, with a few retries on transient errors."""

    def __init__(self, base_url: str, api_key_env: str, timeout_s: float):
        from stillroom.backends.openai_compat import _is_loopback

        self.base_url = base_url.rstrip("/")
        key = os.environ.get(api_key_env) or None
        if key is None and not _is_loopback(self.base_url):
            raise LabelingError(f"no API key for {self.base_url}: set the environment variable {api_key_env}")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(max(timeout_s, 60.0)), headers=headers)

    def _call(self, method: str, path: str, missing_ok: bool = False, **kw) -> httpx.Response | None:
        url = f"{self.base_url}{path}"
        for attempt in range(5):
            try:
                response = self.http.request(method, url, **kw)
            except httpx.HTTPError as exc:
                problem = f"cannot reach {url}: {type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    return response
                problem = f"{method} {url} answered HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code == 404 and path in ("/files", "/batches"):
                    raise LabelingError(f"{self.base_url} has no batch API ({problem}); label without --batch")
                if response.status_code == 404 and missing_ok:
                    return None
                if response.status_code not in (408, 409, 429) and response.status_code < 500:
                    raise LabelingError(problem)
            time.sleep(min(30.0, 2.0 ** attempt))
        raise LabelingError(f"{problem} (after 5 attempts; the batch, if submitted, keeps running: "
                            "run `stillroom label --batch` again to resume)")

    def upload(self, content: bytes) -> str:
        files = {"file": ("stillroom-batch.jsonl", content, "application/jsonl")}
        return self._call("POST", "/files", data={"purpose": "batch"}, files=files).json()["id"]

    def create(self, input_file_id: str, window: str, key: str, job_id: int) -> dict:
        body = {"input_file_id": input_file_id, "endpoint": "/v1/chat/completions", "completion_window": window,
                "metadata": {"stillroom_job": str(job_id)}}
        return self._call("POST", "/batches", json=body, headers={"Idempotency-Key": key}).json()

    def find(self, input_file_id: str) -> dict | None:
        listing = self._call("GET", "/batches", params={"limit": 100}).json()
        return next((b for b in listing.get("data", []) if b.get("input_file_id") == input_file_id), None)

    def get(self, batch_id: str) -> dict:
        response = self._call("GET", f"/batches/{batch_id}", missing_ok=True)
        if response is None:  # deleted or forgotten by the provider: its calls go to the next run
            return {"id": batch_id, "status": "failed", "errors": {"message": "the provider has no such batch"}}
        return response.json()

    def content(self, file_id: str) -> str:
        return self._call("GET", f"/files/{file_id}/content").text

    def close(self) -> None:
        self.http.close()


def _submit_key(base_url: str, input_file_id: str) -> str:
    """The Idempotency-Key of a job's creation: the same for every attempt, from what is stored."""
    return "stillroom-batch-" + hashlib.sha256(f"{base_url}\x1f{input_file_id}".encode()).hexdigest()[:48]


def _new_jobs(project, plan: Plan, client: BatchClient, budget: Budget, report: LabelReport) -> list[int]:
    """Submit the plan's calls that no job owes yet, in chunks the budget allows."""
    teacher, cfg = project.config.teacher, project.config.labeling
    estimate = TokenEstimate()
    calls, affordable = plan.calls, []
    for call in calls:
        if not budget.reserve(call_cost(teacher, estimate.input_tokens(call.chars), teacher.max_tokens,
                                        cfg.batch_price_factor)):
            report.stopped = (f"budget: submitting more could cross --max-cost ${budget.limit:.4f}; "
                              f"{len(calls) - len(affordable)} call(s) left for a later run")
            break
        affordable.append(call)
    report.calls_not_sent = len(calls) - len(affordable)
    body_params = {k: v for k, v in plan.params.items() if v is not None}
    jobs = []
    for start in range(0, len(affordable), cfg.batch_max_requests):
        chunk = affordable[start:start + cfg.batch_max_requests]
        content = "".join(json.dumps({
            "custom_id": c.request_hash, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": plan.model, "messages": c.messages, **body_params}}, ensure_ascii=False) + "\n"
            for c in chunk).encode("utf-8")
        file_id = client.upload(content)
        stamp = now()
        with project.store.engine.begin() as conn:  # the job and its calls' intents, before creating it
            job_id = conn.execute(insert(B).values(
                model=plan.model, base_url=client.base_url, status="submitting", input_file_id=file_id,
                n_requests=len(chunk), created_at=stamp, updated_at=stamp)).inserted_primary_key[0]
            fresh = [{"request_hash": c.request_hash, "example_id": c.example_id, "sample": c.sample,
                      "model": plan.model, "status": "pending", "attempts": 0, "error": None, "batch_id": job_id,
                      "created_at": stamp, "updated_at": stamp} for c in chunk if c.request_hash not in plan.has_intent]
            if fresh:
                conn.execute(ledger.INSERT_INTENT, fresh)
            for c in chunk:
                if c.request_hash in plan.has_intent:  # failed earlier: the same row, owed by this job now
                    ledger.mark_pending(conn, c.example_id, c.sample, plan.model, c.request_hash, batch_id=job_id)
        jobs.append(job_id)
        _create(project, client, job_id)
    return jobs


def _create(project, client: BatchClient, job_id: int) -> None:
    """Create the provider's batch for a 'submitting' job, or adopt the one an earlier run created."""
    cfg = project.config.labeling
    with project.store.engine.connect() as conn:
        job = conn.execute(select(B).where(B.c.id == job_id)).one()
    found = client.find(job.input_file_id)
    if found is None:
        found = client.create(job.input_file_id, cfg.batch_completion_window,
                              _submit_key(client.base_url, job.input_file_id), job_id)
    with project.store.engine.begin() as conn:
        conn.execute(update(B).where(B.c.id == job_id).values(
            status="submitted", provider_batch_id=found["id"], provider_status=found.get("status"),
            updated_at=now()))


def _refused(status, body) -> bool:
    """A batch line that the endpoint turned down for its response_format."""
    from stillroom.backends.base import BackendError, refuses_response_format

    error = (body or {}).get("error") if isinstance(body, dict) else None
    message = str(error.get("message") if isinstance(error, dict) else error or "")
    return status == 400 and refuses_response_format(BackendError(message, status_code=400))


def _collect(project, client: BatchClient, job, batch: dict, report: LabelReport) -> None:
    """Record a finished batch's answers and failures (one transaction per file)."""
    teacher, cfg = project.config.teacher, project.config.labeling
    with project.store.engine.connect() as conn:
        owed = {h: (e, s) for h, e, s in conn.execute(
            select(I.c.request_hash, I.c.example_id, I.c.sample).where(I.c.batch_id == job.id))}
    if batch.get("output_file_id"):
        lines = client.content(batch["output_file_id"]).splitlines()
        with project.store.engine.begin() as conn:
            for line in filter(str.strip, lines):
                row = json.loads(line)
                h = row.get("custom_id")
                response = row.get("response") or {}
                if h not in owed:
                    continue
                body = response.get("body") or {}
                try:
                    text = body["choices"][0]["message"]["content"]
                    if not isinstance(text, str):
                        raise TypeError
                except (KeyError, IndexError, TypeError):
                    reason = (f"batch answer without choices[0].message.content "
                              f"(HTTP {response.get('status_code')}): {str(body)[:300]}")
                    if _refused(response.get("status_code"), body):
                        # Recorded once on the intent: the next run (live or batch) prompts plainly.
                        reason = f"{REFUSED}{str(body)[:300]}; the next run asks without response_format"
                        report.structured_output = f"refused in batch: {str(body)[:300]}"
                    ledger.mark_failed(conn, h, reason, 1)
                    report.calls_failed += 1
                    report.failures.append({"example_id": owed[h][0], "sample": owed[h][1],
                                            "reason": f"batch answer HTTP {response.get('status_code')}"})
                    continue
                usage = body.get("usage") or {}
                tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
                cost = call_cost(teacher, tin, tout, cfg.batch_price_factor)
                ledger.record_answer(conn, owed[h][0], h, model=str(body.get("model") or job.model), output=text,
                                     input_tokens=tin, output_tokens=tout, cost_usd=cost, latency_ms=None, attempts=1)
                report.calls_paid += 1
                report.spent_usd += cost
    if batch.get("error_file_id"):
        lines = client.content(batch["error_file_id"]).splitlines()
        with project.store.engine.begin() as conn:
            for line in filter(str.strip, lines):
                row = json.loads(line)
                h = row.get("custom_id")
                if h not in owed:
                    continue
                error = row.get("error") or (row.get("response") or {}).get("body", {}).get("error") or {}
                reason = f"batch request failed: {error.get('message') or error}"
                if _refused((row.get("response") or {}).get("status_code") or 400, {"error": error}):
                    reason = f"{REFUSED}{error.get('message') or error}; the next run asks without response_format"
                    report.structured_output = f"refused in batch: {error.get('message') or error}"
                ledger.mark_failed(conn, h, reason, 1)
                report.calls_failed += 1
                report.failures.append({"example_id": owed[h][0], "sample": owed[h][1], "reason": reason})
    with project.store.engine.begin() as conn:
        # Anything the provider did not answer (an expired or failed batch) goes to the next run.
        leftover = conn.execute(update(I).where(I.c.batch_id == job.id, I.c.status == "pending").values(
            status="failed", error=f"batch {batch['id']} ended '{batch.get('status')}' without answering it",
            updated_at=now())).rowcount
        report.calls_failed += leftover
        conn.execute(update(B).where(B.c.id == job.id).values(
            status="done" if batch.get("status") == "completed" else "failed", provider_status=batch.get("status"),
            output_file_id=batch.get("output_file_id"), error_file_id=batch.get("error_file_id"),
            error=json.dumps(batch.get("errors")) if batch.get("errors") else None, updated_at=now()))


def run_batch(project, plan: Plan, report: LabelReport, budget: Budget, wait: bool = True,
              progress=None) -> None:
    teacher, cfg = project.config.teacher, project.config.labeling
    if teacher.backend != "openai" or not teacher.base_url:
        raise LabelingError("--batch needs teacher.backend: openai with a base_url whose endpoint has the "
                            "OpenAI batch API (/files, /batches)")
    if plan.live_pending:
        # Calls a live run sent before it died go out live again with their Idempotency-Keys; in a
        # batch file nothing would stop the provider from billing them a second time.
        import asyncio

        from stillroom.backends.registry import teacher_backend
        from stillroom.label.engine import run_live

        plan.only = set(plan.live_pending)
        asyncio.run(run_live(project, plan, teacher_backend(teacher, project.root), report, budget))
        plan.only = None
        plan.in_batch |= plan.live_pending
    client = BatchClient(teacher.base_url, teacher.api_key_env, teacher.timeout_s)
    try:
        with project.store.engine.connect() as conn:
            open_jobs = [r.id for r in conn.execute(select(B.c.id, B.c.status).where(
                B.c.status.in_(("submitting", "submitted")), B.c.model == plan.model,
                B.c.base_url == client.base_url)).all()]
            unfinished = [r.id for r in conn.execute(select(B.c.id).where(B.c.id.in_(open_jobs),
                                                                          B.c.provider_batch_id.is_(None)))]
        for job_id in unfinished:  # died between upload and creation: adopt or create, never twice
            _create(project, client, job_id)
        new = _new_jobs(project, plan, client, budget, report)
        jobs = open_jobs + new
        report.batch = {"jobs_resumed": len(open_jobs), "jobs_submitted": len(new), "jobs": []}
        if not wait:
            report.batch["jobs"] = _describe(project, jobs)
            report.waiting_on_batch = sum(j["requests"] for j in report.batch["jobs"])
            _decide_answered(project, plan, report)
            return
        pending = list(jobs)
        while pending:
            for job_id in list(pending):
                with project.store.engine.connect() as conn:
                    job = conn.execute(select(B).where(B.c.id == job_id)).one()
                batch = client.get(job.provider_batch_id)
                with project.store.engine.begin() as conn:
                    conn.execute(update(B).where(B.c.id == job_id).values(
                        provider_status=batch.get("status"), updated_at=now()))
                if batch.get("status") in TERMINAL:
                    _collect(project, client, job, batch, report)
                    pending.remove(job_id)
            if progress is not None:
                total = len(plan.calls) + len(plan.in_batch)
                progress(LabelProgress(report.calls_paid + report.calls_failed, total, report.spent_usd,
                                       report.spent_usd + budget.reserved))
            if pending:
                time.sleep(cfg.batch_poll_interval_s)
        report.batch["jobs"] = _describe(project, jobs)
    finally:
        client.close()
    _decide_answered(project, plan, report)


def _describe(project, jobs: list[int]) -> list[dict]:
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(B).where(B.c.id.in_(jobs)).order_by(B.c.id)).all()
    return [{"job": r.id, "provider_batch_id": r.provider_batch_id, "status": r.status,
             "provider_status": r.provider_status, "requests": r.n_requests} for r in rows]


def _decide_answered(project, plan: Plan, report: LabelReport) -> None:
    """Vote for every example of the plan whose answers are now all on record."""
    cfg, task = project.config.labeling, project.task
    hashes = [h for item in plan.items for h in item.hashes]
    with project.store.engine.begin() as conn:
        answered = set()
        for start in range(0, len(hashes), 500):
            answered |= {h for (h,) in conn.execute(select(T.responses.c.request_hash).where(
                T.responses.c.request_hash.in_(hashes[start:start + 500])))}
        for item in plan.items:
            if all(h in answered for h in item.hashes):
                consensus, kinds = ledger.finish_example(conn, task, item.example_id, item.hashes, plan.model,
                                                         cfg.min_agreement)
                report.decided(item.example_id, consensus, kinds)

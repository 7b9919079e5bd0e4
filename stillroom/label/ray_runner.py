"""`stillroom label --ray`: the same calls fanned out over Ray workers; the driver records.

The driver plans, writes each call's intent before handing it out, and records every answer the
workers return, so crash safety is the live run's: a call handed out but not recorded is resent
with the same Idempotency-Key by the next run. Each Ray task takes a chunk of calls and runs them
with the live engine's retry loop, at `concurrency / ray_workers` calls at once and its share of
the rate limits. Workers must be able to import stillroom (on a cluster: install it on the nodes
or ship it with a runtime_env); they get the teacher's API key through the task's runtime_env.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial

from stillroom.label import ledger
from stillroom.label.engine import (
    Budget,
    Call,
    REFUSED,
    LabelingError,
    LabelReport,
    Plan,
    TokenEstimate,
    call_cost,
    call_with_retries,
    progress_of,
)
from stillroom.label.ratelimit import Backoff, RateLimiter

__all__ = ["run_ray"]


def label_chunk(teacher: dict, labeling: dict, params: dict, calls: list[dict],
                plain_params: dict | None = None) -> list[dict]:
    """Runs inside a Ray worker: answer a chunk of calls; returns one plain dict per call. A call
    whose endpoint refuses its response_format is sent again at once without it (`plain_hash`)."""
    from stillroom.backends.registry import teacher_backend
    from stillroom.config import LabelingConfig, TeacherConfig

    teacher_cfg, cfg = TeacherConfig(**teacher), LabelingConfig(**labeling)

    async def run() -> list[dict]:
        backend = teacher_backend(teacher_cfg)
        limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        backoff = Backoff(cfg.backoff_initial_s, cfg.backoff_max_s)
        gate = asyncio.Semaphore(cfg.concurrency)

        async def one(c: dict) -> dict:
            call = Call(c["example_id"], c["sample"], c["messages"], c["request_hash"], c["chars"])
            refused = None
            async with gate:
                out = await call_with_retries(backend, call, limiter, backoff, cfg.max_retries,
                                              params if c.get("plain_hash") else (plain_params or params),
                                              c["est_tokens"])
                if out.refused_format and c.get("plain_hash"):
                    refused = out.reason
                    call = Call(c["example_id"], c["sample"], c["messages"], c["plain_hash"], c["chars"])
                    out = await call_with_retries(backend, call, limiter, backoff, cfg.max_retries,
                                                  plain_params or params, c["est_tokens"])
            done = out.completion
            return {"request_hash": c["request_hash"], "answered_as": call.request_hash, "refused": refused,
                    "attempts": out.attempts, "reason": out.reason,
                    "fatal": out.fatal, "text": done and done.text, "model": done and done.model,
                    "input_tokens": done and done.input_tokens, "output_tokens": done and done.output_tokens,
                    "latency_ms": done and done.latency_ms}

        try:
            return await asyncio.gather(*(one(c) for c in calls))
        finally:
            close = getattr(backend, "aclose", None)
            if close is not None:
                await close()

    return asyncio.run(run())


def run_ray(project, plan: Plan, report: LabelReport, budget: Budget, progress=None) -> None:
    try:
        import ray
    except ImportError:
        raise LabelingError("--ray needs Ray: pip install 'stillroom[ray]'") from None
    teacher, cfg, task = project.config.teacher, project.config.labeling, project.task
    started_ray = not ray.is_initialized()
    if started_ray:  # RAY_ADDRESS joins a cluster; without it Ray starts a local instance
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    workers = cfg.ray_workers
    share = cfg.model_dump()
    share["concurrency"] = max(1, cfg.concurrency // workers)
    for limit in ("requests_per_minute", "tokens_per_minute"):
        if share[limit]:
            share[limit] = share[limit] / workers
    env = {teacher.api_key_env: os.environ[teacher.api_key_env]} if os.environ.get(teacher.api_key_env) else {}
    remote = ray.remote(label_chunk).options(num_cpus=0.5, max_retries=0,
                                             runtime_env={"env_vars": env} if env else None)
    teacher_dict = teacher.model_dump()
    if teacher_dict.get("model_path"):  # workers do not run in the project folder
        teacher_dict["model_path"] = str((project.root / teacher_dict["model_path"]).resolve())

    calls = plan.calls
    chunk_size = max(8, share["concurrency"] * 2)
    missing = {item.example_id: {h for h in item.hashes if h not in plan.answered} for item in plan.items}
    items = {item.example_id: item for item in plan.items}
    estimate = TokenEstimate()
    first_est = call_cost(teacher, estimate.input_tokens(calls[0].chars), teacher.max_tokens) if calls else 0.0
    writer = ledger.Writer(project.store.engine)
    in_flight: dict = {}  # ray ref -> (calls, {hash: reserved cost})
    sent = done = 0
    position = 0

    outputs: dict[str, str] = {}
    by_hash: dict = {}  # request hash -> Call, to re-identify a call whose response_format was refused
    writes: list = []  # (example id or None, consensus or None, future): a chunk's writes, waited together

    def decide(example_id: int) -> None:
        hashes = items[example_id].hashes
        if all(h in outputs for h in hashes):
            consensus, votes = ledger.vote(task, [(h, outputs.pop(h)) for h in hashes], cfg.min_agreement)
            writes.append((example_id, consensus, writer.submit(ledger.decision_op(example_id, plan.model,
                                                                                   consensus, votes))))
        else:
            consensus, kinds = writer.submit(ledger.checked(partial(
                ledger.finish_example, task=task, example_id=example_id, hashes=hashes, model=plan.model,
                min_agreement=cfg.min_agreement))).result()
            report.decided(example_id, consensus, kinds)

    def settle_writes() -> None:
        for example_id, consensus, future in writes:
            result = future.result()  # raises what the store raised
            if example_id is not None:
                report.decided(example_id, consensus, result)
        writes.clear()

    def hand_out() -> None:
        nonlocal position, sent
        # `workers` tasks of concurrency/workers calls each: `concurrency` calls in flight in all
        while len(in_flight) < workers and position < len(calls) and not report.stopped:
            chunk, reserved = [], {}
            for call in calls[position:position + chunk_size]:
                if plan.refused and call.plain_hash:
                    plan.go_plain(call, missing)
                est_in = estimate.input_tokens(call.chars)
                cost = call_cost(teacher, est_in, teacher.max_tokens)
                if not budget.reserve(cost):
                    report.stopped = (f"budget: the next call could cross --max-cost ${budget.limit:.4f} "
                                      f"(spent ${budget.spent:.4f}, ${budget.reserved:.4f} in flight)")
                    break
                by_hash[call.request_hash] = call
                chunk.append({"example_id": call.example_id, "sample": call.sample, "messages": call.messages,
                              "request_hash": call.request_hash, "plain_hash": call.plain_hash, "chars": call.chars,
                              "est_tokens": est_in + teacher.max_tokens})
                reserved[call.request_hash] = cost
            if not chunk:
                return
            position += len(chunk)
            sent += len(chunk)
            futures = [writer.submit(ledger.pending_op(c["example_id"], c["sample"], plan.model, c["request_hash"],
                                                       new=c["request_hash"] not in plan.has_intent)) for c in chunk]
            for f in futures:  # intents are durable before any worker sees the calls
                f.result()
            ref = remote.remote(teacher_dict, share, plan.params, chunk, plan.plain_params)
            in_flight[ref] = (chunk, reserved)

    try:
        hand_out()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            chunk, reserved = in_flight.pop(ready[0])
            try:
                results = ray.get(ready[0])
            except Exception as exc:  # the worker died: its calls go back to the next run
                reason = f"Ray task failed: {type(exc).__name__}: {exc}"
                results = [{"request_hash": c["request_hash"], "reason": reason, "attempts": 0, "fatal": False,
                            "text": None} for c in chunk]
            chunk_by_hash = {c["request_hash"]: c for c in chunk}
            for r in results:
                c, h = chunk_by_hash[r["request_hash"]], r["request_hash"]
                if r.get("refused"):  # answered without response_format, under its plain identity
                    writes.append((None, None, writer.submit(ledger.checked(partial(
                        ledger.mark_failed, rhash=h, attempts=1,
                        reason=f"{REFUSED}{r['refused']}; re-sent without response_format")))))
                    report.note_refusal(plan, r["refused"])
                    plan.go_plain(by_hash[h], missing)
                    reserved[r["answered_as"]] = reserved[h]
                    h = r["answered_as"]
                report.retries += max(0, r["attempts"] - 1)
                done += 1
                if r["text"] is not None:
                    cost = call_cost(teacher, r["input_tokens"], r["output_tokens"])
                    estimate.observe(c["chars"], r["input_tokens"])
                    writes.append((None, None, writer.submit(ledger.answer_op(
                        c["example_id"], h, model=r["model"] or plan.model, output=r["text"],
                        input_tokens=r["input_tokens"], output_tokens=r["output_tokens"], cost_usd=cost,
                        latency_ms=r["latency_ms"], attempts=r["attempts"]))))
                    outputs[h] = r["text"]
                    budget.settle(reserved[h], cost)
                    report.calls_paid += 1
                    report.spent_usd += cost
                    missing[c["example_id"]].discard(h)
                    if not missing[c["example_id"]]:
                        decide(c["example_id"])
                else:
                    budget.settle(reserved[h], 0.0)
                    writes.append((None, None, writer.submit(ledger.checked(partial(
                        ledger.mark_failed, rhash=h, reason=r["reason"], attempts=r["attempts"])))))
                    report.calls_failed += 1
                    report.failures.append({"example_id": c["example_id"], "sample": c["sample"],
                                            "reason": r["reason"]})
                    if r["fatal"] and not report.stopped:
                        report.stopped = f"the teacher refused the call: {r['reason']}"
            settle_writes()
            if progress is not None:
                progress(progress_of(report, done, len(calls), first_est))
            hand_out()
        for item in plan.items:  # answered earlier, never decided (a run that died at the end)
            if not missing[item.example_id] and item.example_id not in report._decided:
                decide(item.example_id)
    finally:
        report.calls_not_sent = len(calls) - sent
        writer.close()
        if started_ray:
            ray.shutdown()
    report.projected_usd = progress_of(report, done, len(calls), first_est).projected_usd


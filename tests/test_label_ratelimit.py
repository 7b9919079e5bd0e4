"""Client-side pacing: requests and tokens per minute hold, Retry-After is read in every form a
server sends it, and the backoff schedule is full-jitter exponential."""

from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from pathlib import Path

import pytest

from stillroom.backends.openai_compat import retry_after_seconds
from stillroom.label.ratelimit import Backoff, RateLimiter


def paced(limiter: RateLimiter, n: int, tokens: float = 1) -> list[float]:
    async def run() -> list[float]:
        stamps = []
        for _ in range(n):
            await limiter.acquire(tokens)
            stamps.append(time.monotonic())
        return stamps

    return asyncio.run(run())


def test_requests_per_minute_allow_one_second_of_burst_then_the_rate():
    stamps = paced(RateLimiter(requests_per_minute=1200), 30)  # 20/s, burst 20
    assert stamps[19] - stamps[0] < 0.2  # the burst goes at once
    assert stamps[29] - stamps[0] >= 0.45  # the next 10 at 20 per second


def test_tokens_per_minute_and_a_request_bigger_than_the_bucket():
    stamps = paced(RateLimiter(tokens_per_minute=60_000), 5, tokens=400)  # 1000 tokens/s, bucket 1000
    assert stamps[1] - stamps[0] < 0.1 and stamps[4] - stamps[0] >= 0.95  # 2000 tokens: 1 s past the bucket
    big = paced(RateLimiter(tokens_per_minute=600), 2, tokens=15)  # 10/s: 15 > the 10-token bucket
    assert 1.4 <= big[1] - big[0] < 2.5  # goes when the bucket is full, into debt: slowed, never stuck


def test_a_pause_holds_every_call():
    limiter = RateLimiter()
    limiter.pause(0.3)
    stamps = paced(limiter, 2)
    assert stamps[1] - stamps[0] < 0.05 and time.monotonic() - stamps[0] < 1
    started = time.monotonic()
    limiter.pause(0.3)
    paced(limiter, 1)
    assert time.monotonic() - started >= 0.29


def test_retry_after_in_every_form():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # OpenAI's, more precise
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 17 <= retry_after_seconds({"retry-after": date}) <= 20
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_backoff_is_full_jitter_and_retry_after_wins():
    backoff = Backoff(initial_s=1.0, max_s=8.0)
    delays = [backoff.delay(3) for _ in range(300)]
    assert 0 <= min(delays) < 1 and 7 < max(delays) <= 8.0  # uniform over [0, min(8, 1 * 2**3)]
    assert all(backoff.delay(10) <= 8.0 for _ in range(50))  # capped
    assert backoff.delay(0, retry_after=5.0) == 5.0
    assert Backoff(max_retry_after_s=60).delay(0, retry_after=3600) == 60


def test_labeling_keeps_to_requests_per_minute_against_a_server(make_project):
    pytest.importorskip("uvicorn")
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_openai_server import FakeOpenAI, FakeServer
    from test_label_engine import add_inputs, teacher_extra

    from stillroom.label import label_examples

    fake = FakeOpenAI()
    with FakeServer(fake) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", requests_per_minute: 600"))
        add_inputs(project, [f"my invoice number {i}" for i in range(15)])  # 10/s, burst 10
        report = label_examples(project)
    arrivals = sorted(t for times in fake.seen_at.values() for t in times)
    assert report.labelled == 15 and len(arrivals) == 15
    assert arrivals[14] - arrivals[0] >= 0.35  # 5 past the burst at 10/s; unpaced it takes ~0.05 s

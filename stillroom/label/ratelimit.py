"""Client-side pacing: token buckets for requests and tokens per minute, a shared pause when the
server says "slow down", and the backoff schedule for retries."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

__all__ = ["Backoff", "RateLimiter", "TokenBucket"]


class TokenBucket:
    """`per_minute` units refill continuously; up to one second's worth may be spent at once.

    A single request bigger than the bucket waits for a full bucket and then goes into debt, so a
    long prompt under a small tokens-per-minute limit is slowed down, never stuck."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0: now)."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Correct an estimate once the real count is known (negative: the call used more)."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute limits shared by every call of a run."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None):
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self._paused_until = 0.0
        self._lock: asyncio.Lock | None = None  # created in the running loop

    def pause(self, seconds: float) -> None:
        """Hold every call back for `seconds` (a 429 with Retry-After applies to the whole client)."""
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def acquire(self, tokens: float) -> None:
        """Wait until one request of about `tokens` tokens may be sent."""
        if self.requests is None and self.tokens is None and time.monotonic() >= self._paused_until:
            return  # no limits set and no pause: nothing to wait for
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # first come, first served
            while True:
                wait = self._paused_until - time.monotonic()
                if self.requests is not None:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens is not None:
                    wait = max(wait, self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)

    def settle(self, estimated_tokens: float, actual_tokens: float) -> None:
        if self.tokens is not None:
            self.tokens.give_back(estimated_tokens - actual_tokens)


@dataclass
class Backoff:
    """Exponential backoff with full jitter; a server's Retry-After wins over the schedule."""

    initial_s: float = 1.0
    max_s: float = 60.0
    # A Retry-After longer than this is capped: a provider outage should not park a run for hours.
    max_retry_after_s: float = 600.0

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (0 = the first retry)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        return random.uniform(0, min(self.max_s, self.initial_s * 2 ** retry))

"""The backend contract: anything that answers chat messages. Teacher and student are both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from stillroom.errors import StillroomError

__all__ = ["BackendError", "ChatBackend", "Completion", "refuses_response_format"]


@dataclass
class Completion:
    """One answer, with what it cost: tokens as the backend counted them and wall-clock latency."""

    text: str
    input_tokens: int
    output_tokens: int
    latency_ms: float
    model: str  # the model that actually answered, as the backend names it


class BackendError(StillroomError):
    """A backend could not answer. `status_code` is the upstream HTTP status where there was one;
    `retryable` says whether the same call may succeed later (timeouts, 429, 5xx); `retry_after`
    is how many seconds the server asked the client to wait (Retry-After), where it said."""

    def __init__(self, message: str, status_code: int | None = None, retryable: bool = False,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after


def refuses_response_format(exc: BackendError) -> bool:
    """True when an endpoint turned a call down because of its `response_format` (structured output):
    an HTTP 400 whose message names it. The same call without it may well succeed."""
    text = exc.message.lower()
    return exc.status_code == 400 and any(k in text for k in ("response_format", "json_schema", "structured output"))


@runtime_checkable
class ChatBackend(Protocol):
    """Answers a list of OpenAI-style chat messages. `name` says what answers (a model name).

    A backend whose class sets `supports_response_format = True` also takes a `response_format`
    keyword (OpenAI's structured output: `{"type": "json_schema", ...}`) and passes it on."""

    name: str

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None) -> Completion: ...

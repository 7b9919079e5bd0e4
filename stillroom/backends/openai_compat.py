"""Any OpenAI-compatible chat endpoint: OpenAI, vLLM, llama.cpp server, Ollama, a LiteLLM proxy."""

from __future__ import annotations

import ipaddress
import os
import time
from urllib.parse import urlsplit

import httpx

from stillroom.backends.base import BackendError, Completion

__all__ = ["OpenAICompatBackend"]

_RETRYABLE_STATUS = {408, 409, 425, 429}
# httpcore's pool scans every connection it holds on each request and each response; with 64
# connections in one client that costs several ms of CPU per call. Calls are spread over small
# clients instead, a new one opened only when all are this busy.
_CALLS_PER_CLIENT = 8


def _is_loopback(base_url: str) -> bool:
    host = (urlsplit(base_url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream_message(response: httpx.Response) -> str:
    """The error text an OpenAI-style server put in its body, else the start of the body."""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    except ValueError:
        pass
    text = response.text.strip()
    return text[:300] + ("..." if len(text) > 300 else "") if text else "(empty body)"


def retry_after_seconds(headers) -> float | None:
    """How long the server asked us to wait: `retry-after-ms` (OpenAI), else `Retry-After` in
    seconds or as an HTTP date; None when it did not say (or said something unreadable)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class OpenAICompatBackend:
    """POSTs to `{base_url}/chat/completions`. One HTTP client is reused; no retries here."""

    can_stream = False
    accepts_idempotency_key = True  # sent as the Idempotency-Key header
    supports_response_format = True  # sent as `response_format`; an endpoint may still refuse it (HTTP 400)

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.timeout_s = timeout_s
        key = os.environ.get(api_key_env) or None
        if key is None and not _is_loopback(self.base_url):
            # A local server (llama.cpp, vLLM on loopback) usually wants no key; a remote one does.
            raise BackendError(
                f"no API key for {self.base_url}: set the environment variable {api_key_env} "
                "(or change teacher.api_key_env to the variable that holds the key)"
            )
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._clients: list[httpx.AsyncClient] = []
        self._busy: list[int] = []
        self._ssl = None  # one TLS context for all clients: loading the CA bundle costs ~30 ms each

    def _pick(self) -> int:
        """The least busy client, or a new one when every client has _CALLS_PER_CLIENT calls out."""
        if self._clients:
            i = min(range(len(self._clients)), key=self._busy.__getitem__)
            if self._busy[i] < _CALLS_PER_CLIENT:
                return i
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=_CALLS_PER_CLIENT)
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        self._clients.append(httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), headers=self._headers,
                                               limits=limits, verify=self._ssl))
        self._busy.append(0)
        return len(self._clients) - 1

    async def aclose(self) -> None:
        clients, self._clients, self._busy = self._clients, [], []
        for client in clients:
            await client.aclose()

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None, idempotency_key: str | None = None,
                   response_format: dict | None = None) -> Completion:
        payload: dict = {"model": self.model, "messages": messages}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        if response_format is not None:
            payload["response_format"] = response_format
        url = f"{self.base_url}/chat/completions"
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        i = self._pick()
        client = self._clients[i]
        self._busy[i] += 1
        started = time.perf_counter()
        try:
            response = await client.post(url, json=payload, headers=headers)
        except httpx.TimeoutException:
            raise BackendError(f"{self.model} at {url} did not answer within {self.timeout_s:g} s",
                               retryable=True) from None
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach {url}: {type(exc).__name__}: {exc}", retryable=True) from None
        finally:
            if i < len(self._busy) and self._clients[i] is client:  # not closed meanwhile
                self._busy[i] -= 1
        latency_ms = (time.perf_counter() - started) * 1000

        status = response.status_code
        if not 200 <= status < 300:
            raise BackendError(
                f"{self.model} at {url} answered HTTP {status}: {_upstream_message(response)}",
                status_code=status, retryable=status in _RETRYABLE_STATUS or status >= 500,
                retry_after=retry_after_seconds(response.headers),
            )
        try:
            body = response.json()
        except ValueError:
            # A success status with a garbled body is a transport fault: the same call may succeed.
            raise BackendError(f"{self.model} at {url} answered HTTP {status} with a body that is not "
                               f"JSON: {response.text[:200]!r}", status_code=status, retryable=True) from None
        try:
            content = body["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise BackendError(f"{self.model} at {url} answered HTTP {status} without "
                               "choices[0].message.content (text)", status_code=status) from None
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        return Completion(
            text=content,
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=latency_ms,
            model=str(body.get("model") or self.model),
        )

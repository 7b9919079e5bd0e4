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


class OpenAICompatBackend:
    """POSTs to `{base_url}/chat/completions`. One HTTP client is reused; no retries here."""

    can_stream = False

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
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), headers=self._headers)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None) -> Completion:
        payload: dict = {"model": self.model, "messages": messages}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        if temperature is not None:
            payload["temperature"] = temperature
        url = f"{self.base_url}/chat/completions"
        started = time.perf_counter()
        try:
            response = await self._http().post(url, json=payload)
        except httpx.TimeoutException:
            raise BackendError(f"{self.model} at {url} did not answer within {self.timeout_s:g} s",
                               retryable=True) from None
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach {url}: {type(exc).__name__}: {exc}", retryable=True) from None
        latency_ms = (time.perf_counter() - started) * 1000

        status = response.status_code
        if not 200 <= status < 300:
            raise BackendError(
                f"{self.model} at {url} answered HTTP {status}: {_upstream_message(response)}",
                status_code=status, retryable=status in _RETRYABLE_STATUS or status >= 500,
            )
        try:
            body = response.json()
        except ValueError:
            raise BackendError(f"{self.model} at {url} answered HTTP {status} with a body that is not "
                               f"JSON: {response.text[:200]!r}", status_code=status) from None
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

"""Any provider litellm knows (Anthropic, Gemini, Bedrock, Mistral, ...): `teacher.backend: litellm`
with a litellm model name such as `anthropic/claude-sonnet-4-5` or `openai/gpt-4o-mini`.

litellm is an optional extra (`pip install 'stillroom[litellm]'`), imported on the first call.
Retries are the labeling engine's: litellm's own are switched off, and its exceptions become
`BackendError`s carrying the status and the server's Retry-After.
"""

from __future__ import annotations

import importlib.util
import os
import time

from stillroom.backends.base import BackendError, Completion

__all__ = ["LiteLLMBackend"]

_RETRYABLE_STATUS = {408, 409, 425, 429}


def _litellm():
    # litellm fetches a model price list from GitHub at import unless told not to: no network
    # access that the user did not ask for.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    return litellm


class LiteLLMBackend:
    can_stream = False
    accepts_idempotency_key = True  # passed on as an extra header; providers that know it honour it
    supports_response_format = True  # litellm's `response_format`, translated per provider

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str | None = None,
                 timeout_s: float = 30.0):
        if importlib.util.find_spec("litellm") is None:
            raise BackendError("teacher.backend 'litellm' needs the litellm package: pip install 'stillroom[litellm]'")
        self.model = model
        self.name = model
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.api_key = None
        if api_key_env is not None:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise BackendError(f"no API key: set the environment variable {api_key_env} (teacher.api_key_env)")

    def _error(self, exc: Exception) -> BackendError:
        from stillroom.backends.openai_compat import retry_after_seconds

        litellm = _litellm()
        status = getattr(exc, "status_code", None)
        status = status if isinstance(status, int) else None
        # The provider's response headers (Retry-After) sit in different places across litellm's classes.
        headers = (getattr(exc, "headers", None) or getattr(exc, "litellm_response_headers", None)
                   or getattr(getattr(exc, "response", None), "headers", None) or {})
        transient = (litellm.Timeout, litellm.APIConnectionError, litellm.RateLimitError,
                     litellm.ServiceUnavailableError, litellm.InternalServerError)
        retryable = isinstance(exc, transient) or status in _RETRYABLE_STATUS or (status or 0) >= 500
        message = str(getattr(exc, "message", None) or exc)
        return BackendError(f"{self.model} (litellm): {message}", status_code=status, retryable=retryable,
                            retry_after=retry_after_seconds({k.lower(): v for k, v in dict(headers).items()}))

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None, idempotency_key: str | None = None,
                   response_format: dict | None = None) -> Completion:
        litellm = _litellm()
        kwargs: dict = {"model": self.model, "messages": messages, "timeout": self.timeout_s,
                        "num_retries": 0, "max_retries": 0}
        if self.base_url:
            kwargs["api_base"] = self.base_url
        if self.api_key:
            kwargs["api_key"] = self.api_key
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        if response_format is not None:
            kwargs["response_format"] = response_format
        if idempotency_key:
            kwargs["extra_headers"] = {"Idempotency-Key": idempotency_key}
        started = time.perf_counter()
        try:
            response = await litellm.acompletion(**kwargs)
        except Exception as exc:  # litellm maps every provider's errors onto its own classes
            raise self._error(exc) from None
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            content = response.choices[0].message.content
            if not isinstance(content, str):
                raise TypeError
        except (AttributeError, IndexError, TypeError):
            raise BackendError(f"{self.model} (litellm) answered without text content", retryable=True) from None
        usage = getattr(response, "usage", None)
        return Completion(
            text=content,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            latency_ms=latency_ms,
            model=str(getattr(response, "model", None) or self.model),
        )

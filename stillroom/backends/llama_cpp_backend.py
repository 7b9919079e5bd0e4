"""An in-process GGUF chat model through llama-cpp-python (the `gguf-serve` extra).

For teachers that run on the labeling machine itself: a quantized open model answering without a
server. Structured output is native: llama.cpp turns a JSON schema into a grammar and samples only
tokens the grammar allows, so an extraction teacher's answers always parse. Generation is CPU-bound,
so calls run one at a time in a worker thread and the event loop stays free.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from stillroom.backends.base import BackendError, Completion
from stillroom.cpus import usable_cpus

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend:
    """Chat completions from a GGUF file; the model loads on the first call."""

    can_stream = False
    supports_response_format = True

    def __init__(self, model_path: Path | str, max_new_tokens: int = 16, n_ctx: int = 4096,
                 n_threads: int | None = None):
        self.model_path = Path(model_path)
        self.max_new_tokens = max_new_tokens
        self.n_ctx = n_ctx
        self.n_threads = n_threads or usable_cpus()
        self.name = self.model_path.stem
        self._llm = None
        self._load_lock = threading.Lock()
        self._queue = asyncio.Lock()

    def _load(self):
        with self._load_lock:
            if self._llm is None:
                try:
                    from llama_cpp import Llama
                except ImportError:
                    raise BackendError("teacher.backend 'gguf' needs llama-cpp-python: "
                                       "pip install 'stillroom[gguf-serve]'") from None
                if not self.model_path.is_file():
                    raise BackendError(f"teacher.model_path {self.model_path} is not a file; point it at a .gguf model")
                self._llm = Llama(model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                                  verbose=False)
        return self._llm

    def _complete(self, messages: list[dict], max_tokens: int, temperature: float | None,
                  response_format: dict | None) -> Completion:
        started = time.perf_counter()
        llm = self._load()
        kwargs: dict = {"max_tokens": max_tokens, "temperature": temperature if temperature is not None else 0.0}
        if response_format is not None:
            # llama-cpp-python takes OpenAI's json_object shape with the schema inline
            schema = (response_format.get("json_schema") or {}).get("schema")
            kwargs["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
        out = llm.create_chat_completion(messages=messages, **kwargs)
        usage = out.get("usage") or {}
        return Completion(
            text=out["choices"][0]["message"]["content"] or "",
            input_tokens=int(usage.get("prompt_tokens") or 0),
            output_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=(time.perf_counter() - started) * 1000,
            model=self.name,
        )

    async def chat(self, messages: list[dict], max_tokens: int | None = None, temperature: float | None = None,
                   response_format: dict | None = None) -> Completion:
        if not messages:
            raise BackendError("no messages to answer")
        async with self._queue:
            try:
                return await asyncio.to_thread(self._complete, messages, max_tokens or self.max_new_tokens,
                                               temperature, response_format)
            except BackendError:
                raise
            except Exception as exc:  # a corrupt file or an over-long prompt is not retryable
                raise BackendError(f"GGUF model {self.name} failed: {type(exc).__name__}: {exc}") from exc

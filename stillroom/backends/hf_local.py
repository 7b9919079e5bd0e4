"""An in-process transformers chat model (default: the embedded SmolLM2-135M-Instruct).

Generation is CPU-bound and the machine this targets has 2 cores, so generations run one at a
time in a worker thread: the event loop stays free to answer other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from stillroom.backends.base import BackendError, Completion

__all__ = ["LocalChatBackend"]


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


class LocalChatBackend:
    """Greedy generation with the tokenizer's chat template; the model loads on the first call."""

    can_stream = False

    def __init__(self, model_dir: Path | str | None = None, max_new_tokens: int = 16):
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_new_tokens = max_new_tokens
        self.name = self.model_dir.name if self.model_dir is not None else "smollm2-135m-instruct"
        self._model = None
        self._tokenizer = None
        self._load_lock = threading.Lock()
        self._queue = asyncio.Lock()  # one generation at a time; waiters do not hold a thread

    def _load(self):
        with self._load_lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                from transformers import AutoModelForCausalLM, AutoTokenizer

                if self.model_dir is None:
                    from stillroom.models import smollm2_hf_dir

                    self.model_dir = smollm2_hf_dir()
                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                model = AutoModelForCausalLM.from_pretrained(str(self.model_dir))
                model.eval()
                self._model = model
        return self._model, self._tokenizer

    def _generate(self, messages: list[dict], max_new_tokens: int, temperature: float | None) -> Completion:
        import torch

        started = time.perf_counter()
        model, tokenizer = self._load()
        chat = [{"role": m.get("role", "user"), "content": _text(m.get("content"))} for m in messages]
        enc = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        prompt_len = enc["input_ids"].shape[1]
        sampling = {"do_sample": True, "temperature": temperature} if temperature else {"do_sample": False}
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        generated = out[0, prompt_len:]
        return Completion(
            text=tokenizer.decode(generated, skip_special_tokens=True).strip(),
            input_tokens=int(prompt_len),
            output_tokens=int(generated.shape[0]),
            latency_ms=(time.perf_counter() - started) * 1000,
            model=self.name,
        )

    async def chat(self, messages: list[dict], max_tokens: int | None = None,
                   temperature: float | None = None) -> Completion:
        if not messages:
            raise BackendError("no messages to answer")
        async with self._queue:
            try:
                return await asyncio.to_thread(self._generate, messages, max_tokens or self.max_new_tokens,
                                               temperature)
            except BackendError:
                raise
            except Exception as exc:  # a broken model folder or an out-of-memory is not retryable
                raise BackendError(f"local model {self.name} failed: {type(exc).__name__}: {exc}") from exc

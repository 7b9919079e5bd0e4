"""Backends by name -> "module:Class", imported only when used (nothing heavy at startup)."""

from __future__ import annotations

import importlib
from pathlib import Path

from stillroom.backends.base import ChatBackend
from stillroom.config import TeacherConfig
from stillroom.errors import StillroomError

__all__ = ["BACKENDS", "teacher_backend"]

BACKENDS = {
    "openai": "stillroom.backends.openai_compat:OpenAICompatBackend",
    "local": "stillroom.backends.hf_local:LocalChatBackend",
    "litellm": "stillroom.backends.litellm_backend:LiteLLMBackend",
    "gguf": "stillroom.backends.llama_cpp_backend:LlamaCppBackend",
}


class TeacherNotServable(StillroomError, ValueError):
    """The configured teacher cannot answer live requests."""


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def teacher_backend(config: TeacherConfig, root: Path | None = None) -> ChatBackend:
    """A live backend for the configured teacher (`teacher.backend` in stillroom.yaml); `root` is the
    project folder that a relative `teacher.model_path` is read from."""
    if config.backend == "recorded":
        raise TeacherNotServable(
            "teacher.backend is 'recorded' (answers imported from logs), but the gateway needs a live "
            "teacher to answer what the student is unsure about: set teacher.backend to 'openai' "
            "(with teacher.base_url) or 'local' in stillroom.yaml"
        )
    if config.backend not in BACKENDS:
        raise TeacherNotServable(f"unknown teacher.backend '{config.backend}' (known: {', '.join(BACKENDS)}, recorded)")
    cls = _resolve(BACKENDS[config.backend])
    if config.backend == "openai":
        return cls(config.base_url, config.model, config.api_key_env, config.timeout_s)
    if config.backend == "litellm":  # litellm finds provider keys itself unless api_key_env is set
        key_env = config.api_key_env if "api_key_env" in config.model_fields_set else None
        return cls(config.model, config.base_url, key_env, config.timeout_s)
    path = Path(root or ".") / config.model_path if config.model_path else None
    if config.backend == "gguf":
        if path is None:
            from stillroom.models import smollm2_gguf_path

            path = smollm2_gguf_path()
        return cls(path, max_new_tokens=config.max_tokens)
    if path is not None and not path.is_dir():
        raise TeacherNotServable(f"teacher.model_path {path} is not a folder; backend 'local' loads a "
                                 "Hugging Face model folder (use backend 'gguf' for a .gguf file)")
    return cls(path, max_new_tokens=config.max_tokens)

"""Backends by name -> "module:Class", imported only when used (nothing heavy at startup)."""

from __future__ import annotations

import importlib

from stillroom.backends.base import ChatBackend
from stillroom.config import TeacherConfig
from stillroom.errors import StillroomError

__all__ = ["BACKENDS", "teacher_backend"]

BACKENDS = {
    "openai": "stillroom.backends.openai_compat:OpenAICompatBackend",
    "local": "stillroom.backends.hf_local:LocalChatBackend",
    "litellm": "stillroom.backends.litellm_backend:LiteLLMBackend",
}


class TeacherNotServable(StillroomError, ValueError):
    """The configured teacher cannot answer live requests."""


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def teacher_backend(config: TeacherConfig) -> ChatBackend:
    """A live backend for the configured teacher (`teacher.backend` in stillroom.yaml)."""
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
    return cls(max_new_tokens=config.max_tokens)

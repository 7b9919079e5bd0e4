"""Student kinds by name -> "module:attribute", imported only when used (nothing heavy at startup)."""

from __future__ import annotations

import importlib

STUDENTS = {
    "encoder": ("stillroom.train.encoder:train_encoder", "stillroom.train.encoder:EncoderStudent"),
    "lora": ("stillroom.train.lora:train_lora", "stillroom.train.lora:LoraStudent"),
    "full": ("stillroom.train.lora:train_full", "stillroom.train.lora:LoraStudent"),
    # built by the runner from its members' runs (train/runner.py), not by a trainer of its own
    "ensemble": ("stillroom.train.ensemble:build_ensemble", "stillroom.train.ensemble:EnsembleStudent"),
}


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def trainer(kind: str):
    if kind not in STUDENTS:
        raise KeyError(f"unknown student kind '{kind}' (known: {', '.join(STUDENTS)})")
    return _resolve(STUDENTS[kind][0])


def student_class(kind: str):
    if kind not in STUDENTS:
        raise KeyError(f"unknown student kind '{kind}' (known: {', '.join(STUDENTS)})")
    return _resolve(STUDENTS[kind][1])


def load_student(path):
    """Load any saved student from its folder (its `student.json` names the kind)."""
    import json
    from pathlib import Path

    manifest = json.loads((Path(path) / "student.json").read_text(encoding="utf-8"))
    if manifest.get("format"):  # an exported artifact (merged, int8, GGUF, ...): see train/export.py
        from stillroom.train.artifacts import load_artifact

        return load_artifact(Path(path))
    return student_class(manifest["kind"]).load(Path(path))

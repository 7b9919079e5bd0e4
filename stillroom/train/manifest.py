"""The run manifest: what a trained student was made from, written beside it as `run.json`.

Enough to reproduce or audit a run: the base model's weights by hash, the data by fingerprint,
the full student config, the seed, the metrics and the library versions that trained it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

__all__ = ["RUN_MANIFEST", "write_run_manifest", "weights_sha256"]

RUN_MANIFEST = "run.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def weights_sha256(folder: Path) -> dict:
    """SHA-256 of each weights file in a model folder, and one hash over all of them."""
    files = {p.name: _file_sha256(p) for p in sorted(Path(folder).iterdir())
             if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}
    combined = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()
    return {"sha256": combined, "files": files}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("stillroom", "torch", "transformers", "peft", "xgrammar", "scikit-learn",
                    "sentence-transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def write_run_manifest(out_dir: Path, *, student: dict, fingerprint: str, lock_sha: str,
                       train: list, val: list, metrics: dict, base_model: str | None,
                       encoder: bool = False) -> dict:
    """Write `run.json` into a trained student's folder; returns it. `encoder`: `base_model` names an
    encoder student's body (the embedded MiniLM or a local folder) rather than a causal LM."""
    base = None
    if base_model is not None:
        from stillroom.models import encoder_base_dir
        from stillroom.train.lora import resolve_base_model

        base_dir = encoder_base_dir(base_model) if encoder else resolve_base_model(base_model)
        base = {"name": base_model, "path": str(base_dir.resolve()), **weights_sha256(base_dir)}
    data = hashlib.sha256(json.dumps([train, val], ensure_ascii=False).encode()).hexdigest()
    manifest = {
        "config": student,
        "seed": student.get("seed"),
        "base_model": base,
        "dataset": {"fingerprint": fingerprint, "data_sha256": data, "eval_lock_sha256": lock_sha,
                    "train_examples": len(train), "val_examples": len(val)},
        "metrics": metrics,
        "versions": _versions(),
    }
    path = Path(out_dir) / RUN_MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return manifest

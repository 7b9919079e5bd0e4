"""The fine-tuned encoder student: same-label pairs with in-batch negatives tune the MiniLM body, then
the head is fitted (its C chosen by cross-validation when validation is small)."""

from __future__ import annotations

import json

import pytest

from conftest import LABELS, synthetic_rows
from stillroom.models import file_sha256
from stillroom.train.encoder import (ENCODER_DIR, EncoderConfig, EncoderStudent, anchor_positive_pairs,
                                     distinct_label_batches, embed, train_encoder)


def test_pairs_pair_each_anchor_with_another_text_of_its_label():
    texts = [f"t{i}" for i in range(11)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3]  # label 3 has one text: it cannot be an anchor
    rows = anchor_positive_pairs(texts, labels, per_pass=100, passes=3, seed=1)
    assert len(rows) == 3 * 10
    index = {t: labels[i] for i, t in enumerate(texts)}
    for anchor, positive, label in rows:
        assert anchor != positive and index[anchor] == index[positive] == label
    for k in range(3):  # every pass covers every usable text once
        assert sorted(a for a, _, _ in rows[10 * k:10 * (k + 1)]) == sorted(texts[:10])
    assert len(anchor_positive_pairs(texts, labels, per_pass=4, passes=2)) == 8  # a sample per pass
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        anchor_positive_pairs(["a", "b"], [0, 0], 4, 1)
    with pytest.raises(ValueError, match="at least 2 training examples"):
        anchor_positive_pairs(["a", "b"], [0, 1], 4, 1)


def test_batches_never_repeat_a_label_and_cover_every_row():
    import random

    rng = random.Random(7)
    labels = [rng.randrange(5) for _ in range(200)]
    batches = distinct_label_batches(labels, batch_size=32, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len({labels[i] for i in b}) == len(b) for b in batches)
    assert max(len(b) for b in batches) == 5  # five labels: at most five rows per batch
    assert batches != distinct_label_batches(labels, batch_size=32, seed=4)  # reshuffled per epoch
    assert distinct_label_batches(labels, 32, seed=3) == batches


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="EncoderConfig.finetune_pairs=1: expected an integer >= 2"):
        EncoderConfig(finetune=True, finetune_pairs=1)
    from pydantic import ValidationError

    from stillroom.config import StudentConfig

    assert StudentConfig(name="e", kind="encoder", finetune=True).finetune_epochs == 4
    with pytest.raises(ValidationError, match="finetune applies to kind 'encoder' only"):
        StudentConfig(name="l", kind="lora", finetune=True)


def test_finetuned_student_trains_saves_reloads_and_predicts(tmp_path, capsys):
    rows = synthetic_rows(n_per_label=16, seed=3)
    labels = list(LABELS)
    train, val = rows[:36], rows[36:]
    config = EncoderConfig(finetune=True, finetune_pairs=64, finetune_epochs=2, finetune_batch_size=32, seed=0)
    steps = []
    result = train_encoder(train, val, labels, tmp_path / "s", config, progress=lambda d, t: steps.append((d, t)))

    body = tmp_path / "s" / ENCODER_DIR
    manifest = json.loads((tmp_path / "s" / "student.json").read_text())
    assert manifest["encoder_dir"] == ENCODER_DIR
    assert manifest["encoder_sha256"] == file_sha256(body / "model.safetensors")
    assert manifest["config"]["finetune"] is True
    # 36 anchors per pass, 2 passes; at most one pair per label in a batch: 3 labels, 24 steps or more
    # (uneven label counts leave some batches short)
    assert result.metrics["finetune_pairs"] == 72 and 24 <= result.metrics["finetune_steps"] <= 36
    assert steps[-1] == (result.metrics["finetune_steps"],) * 2
    assert result.metrics["C_chosen_by"] == "cross-validation"  # 12 validation rows are too few
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


def test_label_names_join_the_head_only_when_they_score_better(tmp_path):
    """Label names are tried as extra head rows at every C and kept only when they score better:
    helpful names ("billing" for billing texts) and misleading ones (the names swapped) are
    judged by the same cross-validation, and the run records which setting won."""
    from stillroom.train.encoder import label_name_text

    assert label_name_text("card_arrival") == "card arrival"
    assert label_name_text("  top-up__failed ") == "top up failed"
    rows = synthetic_rows(n_per_label=16, seed=5)
    labels = list(LABELS)
    result = train_encoder(rows[:40], rows[40:], labels, tmp_path / "named", EncoderConfig())
    scores = result.metrics["C_scores"]
    assert {k for k in scores if not k.endswith("+names")} == {f"{C:g}" for C in (1, 4, 16, 64, 256, 1024)}
    assert {k for k in scores if k.endswith("+names")} == {f"{k}+names" for k in scores if "+" not in k}
    best = max(scores.values())
    chosen = f"{result.metrics['C']:g}" + ("+names" if result.metrics["label_name_rows"] else "")
    assert scores[chosen] == best

    swap = {"billing": "shipping", "shipping": "billing", "other": "other"}
    swapped = train_encoder([(t, swap[lab]) for t, lab in rows[:40]], [(t, swap[lab]) for t, lab in rows[40:]],
                            labels, tmp_path / "swapped", EncoderConfig())
    swapped_scores = swapped.metrics["C_scores"]
    assert swapped_scores["1+names"] < swapped_scores["1"]  # misleading names cost agreement...
    assert swapped.metrics["label_name_rows"] is False  # ...and are left out (ties go to leaving them out)

    plain = train_encoder(rows[:40], rows[40:], labels, tmp_path / "plain", EncoderConfig(label_names=False))
    assert not any(k.endswith("+names") for k in plain.metrics["C_scores"])
    assert plain.metrics["label_name_rows"] is False


def test_classifier_finetune_starts_from_the_probe_and_keeps_the_best_epoch(tmp_path):
    """`finetune: classifier`: the head is fitted on the frozen body, then body and head train
    together with cross-entropy; validation agreement is measured each epoch and the best is kept.
    The tuned linear head is saved in the logistic head's npz form, so loading is unchanged."""
    rows = synthetic_rows(n_per_label=16, seed=3)
    labels = list(LABELS)
    train, val = rows[:36], rows[36:]
    config = EncoderConfig(finetune="classifier", finetune_epochs=3, finetune_batch_size=8, seed=0)
    steps = []
    result = train_encoder(train, val, labels, tmp_path / "s", config, progress=lambda d, t: steps.append((d, t)))

    metrics = result.metrics
    assert metrics["finetune_steps"] == 3 * 5 and steps[-1] == (15, 15)  # 36 rows, 8 a step: 5 steps an epoch
    by_epoch = metrics["finetune_val_agreement_by_epoch"]
    assert len(by_epoch) == 3 and all(0 <= a <= 1 for a in by_epoch)
    assert metrics["val_agreement"] == max(by_epoch) and by_epoch[metrics["finetune_best_epoch"] - 1] == max(by_epoch)
    losses = metrics["finetune_val_log_loss_by_epoch"]  # equal agreement: the lower log-loss is kept
    assert len(losses) == 3 and losses[metrics["finetune_best_epoch"] - 1] == min(
        loss for a, loss in zip(by_epoch, losses) if a == max(by_epoch))
    assert 0 <= metrics["probe_val_agreement"] <= 1
    manifest = json.loads((tmp_path / "s" / "student.json").read_text())
    assert manifest["encoder"] == "all-MiniLM-L6-v2, classifier fine-tune"
    assert manifest["encoder_sha256"] == file_sha256(tmp_path / "s" / ENCODER_DIR / "model.safetensors")

    student = EncoderStudent.load(tmp_path / "s")
    predictions = student.predict([t for t, _ in val])
    for p in predictions:
        assert p.label in labels and abs(sum(p.probs.values()) - 1) < 1e-6
    # The saved student answers as the trained model did on validation: same agreement.
    agreement = sum(p.label == lab for p, (_, lab) in zip(predictions, val)) / len(val)
    assert agreement == pytest.approx(metrics["val_agreement"])
    # Both parts moved: the body embeds differently from the frozen MiniLM.
    import numpy as np

    texts = [t for t, _ in val[:3]]
    assert not np.allclose(embed(texts, model_path=str(tmp_path / "s" / ENCODER_DIR)), embed(texts), atol=1e-4)


def test_classifier_finetune_settings_are_checked():
    from pydantic import ValidationError

    from stillroom.config import StudentConfig

    assert StudentConfig(name="e", kind="encoder", finetune="classifier").finetune == "classifier"
    assert EncoderConfig(finetune="contrastive").objective == "contrastive"
    assert EncoderConfig(finetune=True).objective == "contrastive" and EncoderConfig().objective is None
    with pytest.raises(ValidationError, match="head must be 'logreg', not 'mlp'"):
        StudentConfig(name="e", kind="encoder", finetune="classifier", head="mlp")
    with pytest.raises(ValueError, match="EncoderConfig.finetune: expected true, false, 'contrastive' or 'classifier'"):
        EncoderConfig(finetune="sideways")


def test_classifier_finetune_with_two_labels_starts_from_the_binary_probe(tmp_path):
    """scikit-learn stores a two-label logistic head as one column; the fine-tune turns it into two
    softmax rows with the same probabilities, and the saved head has one row per label."""
    import numpy as np

    rows = [r for r in synthetic_rows(n_per_label=12, seed=6) if r[1] != "other"]
    config = EncoderConfig(finetune="classifier", finetune_epochs=1, finetune_batch_size=8, seed=0)
    train_encoder(rows[:10] + rows[12:22], rows[10:12] + rows[22:], ["billing", "shipping"], tmp_path / "s", config)
    with np.load(tmp_path / "s" / "head.npz") as head:
        assert head["coef"].shape == (2, 384) and head["intercept"].shape == (2,)
    predictions = EncoderStudent.load(tmp_path / "s").predict(["my invoice and refund", "parcel tracking please"])
    assert [p.label for p in predictions] == ["billing", "shipping"]

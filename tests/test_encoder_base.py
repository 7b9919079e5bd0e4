"""Encoder students on a base of the user's choosing: `base_model` names a local sentence-transformers
or plain Hugging Face encoder folder instead of the embedded MiniLM, for the frozen and both fine-tuned
recipes, and a base that is missing or unknown is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import LABELS, project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.models import MINILM_NAME, file_sha256, minilm_path
from stillroom.train.encoder import ENCODER_DIR, EncoderConfig, EncoderStudent, embed, train_encoder

WIDTH = 32  # tiny_bert_dir's embedding width (MiniLM's is 384)


def _split():
    rows = synthetic_rows(n_per_label=16, seed=3)
    return rows[:36], rows[36:]


def test_frozen_student_on_a_local_base_embeds_with_it_and_records_it(tiny_bert_dir, tmp_path):
    train, val = _split()
    config = EncoderConfig(base_model=str(tiny_bert_dir))
    train_encoder(train, val, list(LABELS), tmp_path / "s", config)

    manifest = json.loads((tmp_path / "s" / "student.json").read_text())
    assert manifest["encoder"] == tiny_bert_dir.name and "encoder_dir" not in manifest
    assert manifest["base_model"] == {"path": str(tiny_bert_dir.resolve()),
                                      "sha256": file_sha256(tiny_bert_dir / "model.safetensors")}
    student = EncoderStudent.load(tmp_path / "s")
    assert student.encoder_path == tiny_bert_dir.resolve()
    head = np.load(tmp_path / "s" / "head.npz")
    assert head["coef"].shape[1] == WIDTH  # fitted on the tiny base's embeddings, not MiniLM's
    assert embed(["hello"], model_path=str(tiny_bert_dir)).shape == (1, WIDTH)
    for p in student.predict(["my refund and invoice", "the parcel tracking"]):
        assert p.label in LABELS and abs(sum(p.probs.values()) - 1) < 1e-6

    manifest["base_model"]["path"] = str(tmp_path / "gone")
    (tmp_path / "s" / "student.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="which no longer exists; put it back there, or retrain"):
        EncoderStudent.load(tmp_path / "s")


@pytest.mark.parametrize("finetune", ["classifier", "contrastive"])
def test_finetuned_student_starts_from_the_local_base(tiny_bert_dir, tmp_path, finetune):
    from safetensors.torch import load_file

    train, val = _split()
    config = EncoderConfig(base_model=str(tiny_bert_dir), finetune=finetune, finetune_epochs=2,
                           finetune_pairs=36, finetune_learning_rate=1e-3)
    result = train_encoder(train, val, list(LABELS), tmp_path / "s", config)

    manifest = json.loads((tmp_path / "s" / "student.json").read_text())
    assert manifest["encoder"] == f"{tiny_bert_dir.name}, {finetune} fine-tune"
    assert manifest["base_model"]["path"] == str(tiny_bert_dir.resolve())
    body = tmp_path / "s" / ENCODER_DIR
    tuned, base = load_file(body / "model.safetensors"), load_file(tiny_bert_dir / "model.safetensors")
    assert set(base) <= set(tuned)  # the same architecture, every weight of the base carried over
    assert any(not np.allclose(base[k].numpy(), tuned[k].numpy()) for k in base), "the body never trained"
    student = EncoderStudent.load(tmp_path / "s")
    assert student.encoder_path == body
    assert embed(["hello"], model_path=str(body)).shape == (1, WIDTH)
    predictions = student.predict([t for t, _ in val])
    agreement = float(np.mean([p.label == y for p, (_, y) in zip(predictions, val)]))
    if finetune == "classifier":
        assert agreement == pytest.approx(max(result.metrics["finetune_val_agreement_by_epoch"]), abs=1e-5)
    assert all(abs(sum(p.probs.values()) - 1) < 1e-6 for p in predictions)


def test_base_model_defaults_per_kind_and_unknown_bases_are_config_errors(tiny_bert_dir, tmp_path):
    from pydantic import ValidationError

    from stillroom.config import StudentConfig

    assert StudentConfig(name="e", kind="encoder").base_model == MINILM_NAME
    assert StudentConfig(name="l", kind="lora").base_model == "smollm2-135m-instruct"
    assert StudentConfig(name="e", kind="encoder", base_model=str(tiny_bert_dir)).base_model == str(tiny_bert_dir)
    with pytest.raises(ValidationError, match="'smollm2-135m-instruct' is neither 'all-minilm-l6-v2'"):
        StudentConfig(name="e", kind="encoder", base_model="smollm2-135m-instruct")  # a causal LM, not an encoder
    with pytest.raises(ValidationError, match="is neither a known base model"):
        StudentConfig(name="l", kind="lora", base_model=MINILM_NAME)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"folder {empty} has no model.safetensors or pytorch_model.bin"):
        train_encoder(*_split(), list(LABELS), tmp_path / "s", EncoderConfig(base_model=str(empty)))
    assert not (tmp_path / "s").exists()  # checked before anything was written


def test_stillroom_train_records_the_encoder_base_in_the_run_manifest(tiny_bert_dir, tmp_path):
    from stillroom.cli.main import app

    runner = CliRunner()
    root = tmp_path / "p"

    def cli(*args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    cli("init", root)
    students = (f"  - {{name: small, kind: encoder, base_model: '{tiny_bert_dir}'}}\n"
                "  - {name: mini, kind: encoder}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(20))
    for stage in ("import", "split", "lock"):
        cli(stage, *([root / "data.jsonl"] if stage == "import" else []), "-C", root)
    out = json.loads(cli("train", "small", "mini", "-C", root, "--json").stdout)
    for name, base in (("small", tiny_bert_dir), ("mini", minilm_path())):
        run = json.loads((Path(out[name]["artifact"]) / "run.json").read_text())
        assert run["config"]["base_model"] == (str(tiny_bert_dir) if name == "small" else MINILM_NAME)
        assert run["base_model"]["path"] == str(base.resolve())
        assert run["base_model"]["files"]["model.safetensors"] == file_sha256(base / "model.safetensors")

"""The GPU paths: bf16 autocast, QLoRA, the encoder's classifier fine-tune, and data-parallel
training over NCCL.

Skipped without CUDA (the CPU machines this project is built on have none). On a GPU machine,
`pytest tests/test_gpu_paths.py` is the proof; the same logic is proven on CPUs by
test_lora_student.py and test_distributed_training.py (gloo).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tests.conftest import LABELS, synthetic_rows  # noqa: E402
from tests.test_distributed_training import assert_same_training, run_two_processes  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU: run `pytest tests/test_gpu_paths.py` on a GPU machine")

GPU_SCRIPT = '''
import json, sys
from pathlib import Path
from stillroom.train.lora import LoraConfig, train_lora
rows = [tuple(r) for r in json.loads(Path(sys.argv[1]).read_text())]
full = sys.argv[4] == "full"
config = LoraConfig(base_model=sys.argv[2], rank=4, dropout=0.0, epochs=2, batch_size=5, precision="fp32",
                    learning_rate=1e-3 if full else 5e-3, checkpoint_every=0, full=full)
result = train_lora(rows[:31], rows[31:], sorted(set(y for _, y in rows)), Path(sys.argv[3]), config)
print("METRICS", json.dumps(result.metrics))
'''


def test_lora_trains_in_bf16_autocast_on_the_gpu_and_predicts(tmp_path, tiny_llama_dir):
    from stillroom.train.lora import LoraConfig, LoraStudent, train_lora

    rows = synthetic_rows(14)
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, epochs=2, batch_size=8, learning_rate=5e-3)
    result = train_lora(rows[:36], rows[36:], sorted(LABELS), tmp_path, config)  # precision auto: bf16 here
    assert result.metrics["device"] == "cuda" and result.metrics["train_tokens_per_s"] > 0
    predictions = LoraStudent.load(tmp_path).predict([x for x, _ in rows[36:]])
    assert all(p.label in LABELS and abs(sum(p.probs.values()) - 1) < 1e-4 for p in predictions)


def test_encoder_classifier_finetune_trains_on_the_gpu_and_predicts(tmp_path):
    import json

    from stillroom.train.encoder import EncoderConfig, EncoderStudent, _load_encoder, train_encoder

    rows = synthetic_rows(14)
    config = EncoderConfig(finetune="classifier", finetune_epochs=2)
    result = train_encoder(rows[:36], rows[36:], sorted(LABELS), tmp_path, config)
    assert json.loads((tmp_path / "student.json").read_text())["encoder_dir"] == "encoder"
    assert len(result.metrics["finetune_val_agreement_by_epoch"]) == 2
    predictions = EncoderStudent.load(tmp_path).predict([x for x, _ in rows[36:]])
    assert all(p.label in LABELS and abs(sum(p.probs.values()) - 1) < 1e-4 for p in predictions)
    assert _load_encoder(str(tmp_path / "encoder"), 0).device.type == "cuda"  # serving embeds on the GPU too


def test_qlora_trains_a_4bit_base_and_predicts(tmp_path, tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from stillroom.train.lora import LoraConfig, LoraStudent, train_lora

    rows = synthetic_rows(14)
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, epochs=1, batch_size=8, learning_rate=5e-3,
                        quantization="4bit")
    result = train_lora(rows[:36], rows[36:], sorted(LABELS), tmp_path, config)
    assert result.metrics["device"] == "cuda"
    predictions = LoraStudent.load(tmp_path).predict([x for x, _ in rows[36:]])
    assert all(p.label in LABELS for p in predictions)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_gpus_over_nccl_train_the_same_weights_as_one(tmp_path, tiny_llama_dir, kind):
    from stillroom.train.lora import LoraConfig, train_lora

    rows, printed = run_two_processes(tmp_path, GPU_SCRIPT, tiny_llama_dir, kind)
    assert {(m["device"], m["parallelism"]) for m in printed} == {("cuda", "ddp" if kind == "lora" else "fsdp")}
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, dropout=0.0, epochs=2, batch_size=5, precision="fp32",
                        learning_rate=1e-3 if kind == "full" else 5e-3, checkpoint_every=0, full=kind == "full")
    train_lora(rows[:31], rows[31:], sorted(LABELS), tmp_path / "one", config)
    assert_same_training(tmp_path / "two", tmp_path / "one", tiny_llama_dir, kind)

"""GGUF exports of extraction and generation students, served by llama.cpp: greedy decoding,
schema-constrained records, the same answers as the torch student, and re-evaluation on the
locked eval split -- on the tiny real Llama (2 layers, 64 wide) with SmolLM2's tokenizer."""

import importlib.util
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")
pytest.importorskip("xgrammar")
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed (pip install 'stillroom[gguf-serve]'): a GGUF student "
                "cannot be loaded without it", allow_module_level=True)

from conftest import GENERATION_LR, generation_pairs  # noqa: E402
from stillroom.config import TaskConfig  # noqa: E402
from stillroom.tasks import make_task  # noqa: E402
from stillroom.train.artifacts import GGUFStudent, load_artifact  # noqa: E402
from stillroom.train.export import export_gguf, export_merged  # noqa: E402
from stillroom.train.lora import LoraConfig, task_info, train_lora  # noqa: E402

# Sorted keys differ from the schema's order; an enum, a nested object, an array, a boolean, a number.
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["vendor", "status", "meta"],
    "properties": {
        "vendor": {"type": "string"},
        "status": {"enum": ["paid", "open", "void"]},
        "amount": {"type": "number"},
        "items": {"type": "array", "items": {"type": "string"}},
        "urgent": {"type": "boolean"},
        "meta": {"type": "object", "additionalProperties": False, "required": ["page"],
                 "properties": {"page": {"type": "integer"}, "note": {"type": "string"}}},
    },
}
# The torch side of every comparison computes in fp32 (the training copy's precision), whatever
# the CPU would pick for `precision: auto`.
FP32 = {"precision": "fp32"} if "precision" in LoraConfig.__dataclass_fields__ else {}
VENDORS = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
STATUS = ["paid", "open", "void"]


def extraction_task(max_output_tokens=32):
    return make_task(TaskConfig(name="bills", type="extraction", schema=SCHEMA, max_output_tokens=max_output_tokens))


def extraction_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    task, rng = extraction_task(), random.Random(seed)
    pairs = []
    for _ in range(n):
        vendor, status, page = rng.choice(VENDORS), rng.choice(STATUS), rng.randint(1, 3)
        record = {"vendor": vendor, "status": status, "meta": {"page": page}}
        pairs.append((f"bill from {vendor} {status} page {page}", task.parse(json.dumps(record))))
    return pairs


def random_merged(tiny_llama_dir, out: Path, task, seed: int) -> Path:
    """An untrained student written as a merged export (random weights, a wide init so the logits
    are far from uniform): what `export_gguf` reads."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    student = {"kind": "lora", "labels": [], "task": task_info(task), "format": "merged",
               "base_model": {"name": str(tiny_llama_dir), "path": str(tiny_llama_dir)},
               "student_format": "{input}", "config": asdict(LoraConfig(base_model=str(tiny_llama_dir), threads=2, **FP32))}
    (out / "student.json").write_text(json.dumps(student), encoding="utf-8")
    return out


def trained_exports(tiny_llama_dir, root: Path, pairs, task, epochs: int, student_format: str,
                    learning_rate: float = 1e-2) -> tuple[Path, Path]:
    """A tiny student trained with the real recipe, then merged and written as GGUF f16."""
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=8, alpha=16, dropout=0.0, epochs=epochs,
                        batch_size=8, learning_rate=learning_rate, threads=2, **FP32)
    train, val = pairs
    result = train_lora(train, val, [], root / "run", config, student_format=student_format, task=task)
    merged = export_merged(result.path, root / "merged")
    return merged, export_gguf(merged, root / "gguf-f16", "f16")


# --- extraction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [4, 32])
def test_an_untrained_gguf_extraction_student_answers_only_valid_records(tiny_llama_dir, tmp_path, budget):
    """Random weights write garbage unconstrained; under the grammar every answer parses for the
    schema, also when the budget runs out mid-record (the closing phase finishes it)."""
    task = extraction_task(budget)
    merged = random_merged(tiny_llama_dir, tmp_path / "merged", task, seed=1)
    gguf_dir = export_gguf(merged, tmp_path / "gguf-f16", "f16")
    assert json.loads((gguf_dir / "student.json").read_text())["answer_ids"] == []
    student = load_artifact(gguf_dir)
    assert isinstance(student, GGUFStudent) and student.format == "gguf-f16"
    texts = [f"input {i} " + " ".join(random.Random(i).sample(VENDORS, 3)) * (i % 4) for i in range(20)]
    predictions = student.predict(texts)
    assert len(predictions) == len(texts)
    for p in predictions:
        assert task.parse(p.label) == p.label  # valid for the schema, and already canonical
        assert 0 < p.confidence <= 1 and p.probs == {}
    if budget == 4:  # the record cannot fit in 4 tokens: the closing phase did the rest
        assert all(len(student.tokenize(p.label)) > 4 for p in predictions)
    # batching (llama.cpp sequences) does not change an answer
    one_by_one = GGUFStudent.load(gguf_dir, batch_size=1).predict(texts[:6])
    assert [p.label for p in one_by_one] == [p.label for p in predictions[:6]]


@pytest.fixture(scope="module")
def extraction_exports(tiny_llama_dir, tmp_path_factory):
    task = extraction_task(32)
    return trained_exports(tiny_llama_dir, tmp_path_factory.mktemp("extraction"),
                           (extraction_pairs(48, 1), extraction_pairs(12, 2)), task, epochs=2,
                           student_format="Extract: {input}")


def test_gguf_extraction_records_equal_the_torch_students(extraction_exports):
    """Greedy, the same weights (f16 in the GGUF), the same grammar: the same records."""
    merged, gguf_dir = extraction_exports
    texts = [x for x, _ in extraction_pairs(12, 3)]
    want = load_artifact(merged).predict(texts)
    got = load_artifact(gguf_dir).predict(texts)
    task = extraction_task()
    assert all(task.parse(p.label) == p.label for p in got)
    assert [p.label for p in got] == [p.label for p in want]
    assert max(abs(a.confidence - b.confidence) for a, b in zip(want, got)) < 0.02


# --- generation ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generation_exports(tiny_llama_dir, tmp_path_factory):
    task = make_task(TaskConfig(name="echo", type="generation", max_output_tokens=8))
    return trained_exports(tiny_llama_dir, tmp_path_factory.mktemp("generation"),
                           (generation_pairs(240, 4), generation_pairs(30, 5)), task, epochs=3,
                           student_format="{input}", learning_rate=GENERATION_LR)


def test_gguf_generation_answers_equal_the_torch_students(generation_exports):
    merged, gguf_dir = generation_exports
    held_out = generation_pairs(12, 6) + [("a word it never saw", None)]
    texts = [x for x, _ in held_out]
    want = load_artifact(merged).predict(texts)
    got = load_artifact(gguf_dir).predict(texts)
    assert [p.label for p in got[:-1]] == [y for _, y in held_out[:-1]]  # stopped right after the answer
    assert [p.label for p in got] == [p.label for p in want]
    assert all(0 < p.confidence <= 1 and p.probs == {} for p in got)
    assert max(abs(a.confidence - b.confidence) for a, b in zip(want, got)) < 0.02


@pytest.mark.parametrize("budget", [1, 5])
def test_an_untrained_gguf_generation_student_is_cut_at_max_output_tokens(tiny_llama_dir, tmp_path, budget):
    task = make_task(TaskConfig(name="g", type="generation", max_output_tokens=budget))
    merged = random_merged(tiny_llama_dir, tmp_path / "merged", task, seed=0)
    student = load_artifact(export_gguf(merged, tmp_path / "gguf-f16", "f16"))
    texts = ["tell me a story", "hi", "what is the weather like in a place far away"]
    got = student.predict(texts)
    for p in got:
        assert len(student.tokenize(p.label)) <= budget + 1  # +1: re-tokenizing stripped text may split
        assert 0 < p.confidence <= 1
    # the first tokens of a random model's answer are the torch model's (f16 may move a near-tie later)
    want = load_artifact(merged).predict(texts)
    assert [p.label[:3] for p in got] == [p.label[:3] for p in want]


# --- through the project: export + re-evaluation on the locked eval split -----------------------


@pytest.fixture(scope="module")
def extraction_project(tiny_llama_dir, tmp_path_factory):
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.project import Project, init_project
    from stillroom.train.runner import train_student

    root = tmp_path_factory.mktemp("gguf-extraction") / "proj"
    init_project(root)
    (root / "stillroom.yaml").write_text(
        f"task:\n  name: bills\n  type: extraction\n  max_output_tokens: 32\n  schema: {json.dumps(SCHEMA)}\n"
        f"students:\n  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', rank: 4, alpha: 8, "
        f"epochs: 2, batch_size: 8, learning_rate: 0.01{', precision: fp32' if FP32 else ''}}}\n"
        "split: {train: 0.6, validation: 0.1, calibration: 0.1, eval: 0.2, seed: 0}\n", encoding="utf-8")
    rows = [{"input": x, "output": json.loads(y)} for x, y in extraction_pairs(60, 11)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    train_student(project, "lora")
    yield project
    project.close()


def test_export_re_evaluates_a_generative_students_gguf_against_fp32(extraction_project):
    from stillroom.evaluate.evaluator import latest_evaluation
    from stillroom.train.artifacts import latest_artifact_evaluation
    from stillroom.train.export import export_student

    records = export_student(extraction_project, "lora", ["gguf-f16", "gguf-q8_0"])
    fp32 = latest_evaluation(extraction_project, "lora")
    task = extraction_project.task
    for record in records:
        e = record["evaluation"]
        assert e["artifact"]["format"] == record["format"] and e["vs_fp32"]["fp32_agreement"] == fp32["agreement"]
        assert e["vs_fp32"]["compared"] == e["vs_teacher"]["n"] > 0
        assert all(task.parse(answer) == answer for _, answer, _ in e["predictions"])
        assert e["latency_ms"]["p50"] > 0 and e["gate"]["passed"] in (True, False)
        stored = latest_artifact_evaluation(extraction_project, "lora", record["format"])
        assert stored["evaluation_id"] == e["evaluation_id"] and stored["stale"] is False
    f16 = records[0]["evaluation"]["vs_fp32"]
    assert f16["label_flips"] <= 1 and abs(f16["agreement_delta_points"]) <= 10, f16

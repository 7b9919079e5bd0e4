"""The `lora` student on extraction and generation tasks, the run manifest, resuming a killed run
and full fine-tuning, on the tiny real Llama (2 layers, 64 wide) with SmolLM2's tokenizer."""

import json
import os
import random

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("xgrammar")

from typer.testing import CliRunner  # noqa: E402

from conftest import GENERATION_LR, generation_pairs  # noqa: E402
from stillroom.config import TaskConfig  # noqa: E402
from stillroom.tasks import make_task  # noqa: E402
from stillroom.train.lora import LoraConfig, LoraStudent, train_full, train_lora  # noqa: E402

# Sorted keys differ from the schema's order, an enum, required fields, a nested object with
# additionalProperties false and its own required field, an array, a boolean and an integer.
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
VENDORS = ["acme", "globex", "initech", "umbrella", "hooli", "vandelay"]
STATUS = ["paid", "open", "void"]


def extraction_task(schema=SCHEMA, max_output_tokens=48):
    return make_task(TaskConfig(name="bills", type="extraction", schema=schema, max_output_tokens=max_output_tokens))


def extraction_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts naming a vendor and a status; the record states both (canonical JSON, as imported)."""
    task, rng = extraction_task(), random.Random(seed)
    pairs = []
    for i in range(n):
        vendor, status, page = rng.choice(VENDORS), rng.choice(STATUS), rng.randint(1, 3)
        record = {"vendor": vendor, "status": status, "meta": {"page": page}}
        pairs.append((f"bill from {vendor} {status} page {page}", task.parse(json.dumps(record))))
    return pairs


def random_student(tiny_llama_dir, task, seed: int) -> LoraStudent:
    """An untrained student: random weights (a wide init, so the logits are far from uniform)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.initializer_range = 0.5
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    info = {"type": task.type, "name": task.name, "metric": task.metric,
            "max_output_tokens": task.max_output_tokens, "schema": getattr(task, "schema", None)}
    return LoraStudent(model, AutoTokenizer.from_pretrained(tiny_llama_dir), [], "{input}",
                       LoraConfig(base_model=str(tiny_llama_dir)), task=info)


@pytest.mark.parametrize("budget", [4, 32])
def test_constrained_decoding_always_gives_a_schema_valid_record_even_from_a_random_model(tiny_llama_dir, budget):
    """A random model left alone writes garbage; under the grammar every answer is a valid record,
    also when the token budget runs out in the middle of one (the record is then closed)."""
    task = extraction_task(max_output_tokens=budget)
    texts = [f"input {i} " + " ".join(random.Random(i).sample(VENDORS, 3)) * (i % 4) for i in range(16)]
    for seed, dtype in ((0, torch.float32), (1, torch.float32), (1, torch.bfloat16)):  # bf16: `precision: bf16`
        student = random_student(tiny_llama_dir, task, seed)
        student.model = student.model.to(dtype)
        predictions = student.predict(texts, batch_size=8)
        assert len(predictions) == len(texts)
        for p in predictions:
            assert task.parse(p.label) == p.label  # valid for the schema, and already canonical
            record = json.loads(p.label)
            assert {"vendor", "status", "meta"} <= set(record) <= set(SCHEMA["properties"])
            assert record["status"] in STATUS and set(record["meta"]) <= {"page", "note"}
            assert 0 < p.confidence <= 1 and p.probs == {}


def test_a_second_schema_with_nested_arrays_and_numbers(tiny_llama_dir):
    schema = {"type": "object", "additionalProperties": False, "required": ["lines"],
              "properties": {"lines": {"type": "array", "items": {
                  "type": "object", "additionalProperties": False, "required": ["qty", "sku"],
                  "properties": {"qty": {"type": "integer"}, "sku": {"enum": ["a-1", "b-2"]}}}},
                  "total": {"type": ["number", "null"]}}}
    task = extraction_task(schema, max_output_tokens=16)
    student = random_student(tiny_llama_dir, task, 3)
    for p in student.predict([f"order {i}" for i in range(16)], batch_size=16):
        assert task.parse(p.label) == p.label


def test_missing_xgrammar_is_one_clear_sentence(tiny_llama_dir, monkeypatch):
    import builtins

    from stillroom.errors import StillroomError

    real_import = builtins.__import__

    def no_xgrammar(name, *args, **kwargs):
        if name == "xgrammar":
            raise ImportError("no xgrammar")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xgrammar)
    student = random_student(tiny_llama_dir, extraction_task(), 0)
    with pytest.raises(StillroomError, match=r"pip install --no-deps xgrammar apache-tvm-ffi"):
        student.predict(["bill from acme"])


@pytest.fixture(scope="module")
def extraction_student(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("extraction-student")
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=8, alpha=16, dropout=0.0, epochs=2,
                        batch_size=8, learning_rate=1e-2, threads=2)
    result = train_lora(extraction_pairs(48, 1), extraction_pairs(12, 2), [], out, config,
                        student_format="Extract: {input}", task=extraction_task(max_output_tokens=32))
    return result


def test_extraction_student_trains_saves_and_loads(extraction_student):
    m = extraction_student.metrics
    assert m["epochs_run"] >= 1 and m["steps"] >= 6 and m["train_tokens_per_s"] > 0
    assert 0 <= m["val_score"] <= 1 and m["metric"] == "field_f1" and m["resumed_from_step"] is None
    manifest = json.loads((extraction_student.path / "student.json").read_text())
    assert manifest["task"] == {"type": "extraction", "name": "bills", "metric": "field_f1",
                                "max_output_tokens": 32, "schema": SCHEMA}
    assert manifest["labels"] == [] and not (extraction_student.path / "checkpoint").exists()

    student = LoraStudent.load(extraction_student.path)  # standalone: no task object needed
    task = extraction_task()
    texts = [x for x, _ in extraction_pairs(10, 3)]
    predictions = student.predict(texts, batch_size=4)
    for p in predictions:
        assert task.parse(p.label) == p.label and 0 < p.confidence <= 1
    assert student.predict([]) == []
    # batching does not change an answer
    assert [p.label for p in student.predict(texts, batch_size=1)] == [p.label for p in predictions]


def test_generation_student_stops_at_end_of_turn_and_respects_the_budget(tiny_llama_dir, tmp_path):
    task = make_task(TaskConfig(name="echo", type="generation", max_output_tokens=8))
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=8, alpha=16, dropout=0.0, epochs=3,
                        batch_size=8, learning_rate=GENERATION_LR, threads=2)
    result = train_lora(generation_pairs(240, 4), generation_pairs(30, 5), [], tmp_path, config, task=task)
    assert result.metrics["val_score"] >= 0.9, result.metrics  # ROUGE-L against the teacher's text
    student = LoraStudent.load(tmp_path)
    held_out = generation_pairs(12, 6)
    predictions = student.predict([x for x, _ in held_out])
    assert [p.label for p in predictions] == [y for _, y in held_out]  # stopped right after the answer
    assert all(0 < p.confidence <= 1 and p.probs == {} for p in predictions)

    # An untrained model never says end-of-turn on cue: it is cut at max_output_tokens.
    for budget in (1, 5):
        rambling = random_student(tiny_llama_dir, make_task(TaskConfig(name="g", type="generation",
                                                                       max_output_tokens=budget)), 0)
        for p in rambling.predict(["tell me a story", "hi"]):
            assert len(rambling.tokenizer(p.label, add_special_tokens=False)["input_ids"]) <= budget + 1
            assert 0 < p.confidence <= 1


def _trainable_state(path):
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (path / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(path / name)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_with_the_same_weights(tiny_llama_dir, tmp_path, full):
    """Same seed, same thread count, same CPU kernels: the resumed run replays the identical steps,
    so the weights are compared exactly (no tolerance)."""
    train, val = extraction_pairs(40, 7), extraction_pairs(8, 8)
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, alpha=8, epochs=2, batch_size=8,
                        learning_rate=5e-3 if not full else 1e-3, threads=2, checkpoint_every=3, full=full)
    task = extraction_task(max_output_tokens=24)
    straight = train_lora(train, val, [], tmp_path / "straight", config, task=task)

    class Killed(Exception):
        pass

    def die_at_step_7(step, total):
        if step == 7:  # mid-epoch 2 (5 steps an epoch); the last checkpoint is step 6
            raise Killed

    with pytest.raises(Killed):
        train_lora(train, val, [], tmp_path / "resumed", config, progress=die_at_step_7, task=task)
    assert (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    steps = []
    resumed = train_lora(train, val, [], tmp_path / "resumed", config, task=task,
                         progress=lambda s, t: steps.append(s))
    assert resumed.metrics["resumed_from_step"] == 6 and steps[0] == 7
    assert resumed.metrics["steps"] == straight.metrics["steps"]
    assert resumed.metrics["val_score_by_epoch"] == straight.metrics["val_score_by_epoch"]
    a, b = _trainable_state(straight.path), _trainable_state(resumed.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint of different inputs is ignored: the run starts over.
    with pytest.raises(Killed):
        train_lora(train, val, [], tmp_path / "other", config, progress=die_at_step_7, task=task)
    fresh = train_lora(train[:-8], val, [], tmp_path / "other", config, task=task)
    assert fresh.metrics["resumed_from_step"] is None


def test_full_fine_tuning_saves_a_plain_model_folder(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from stillroom.train.registry import load_student

    config = LoraConfig(base_model=str(tiny_llama_dir), epochs=1, batch_size=8, learning_rate=1e-3, threads=2)
    result = train_full(extraction_pairs(24, 9), extraction_pairs(6, 10), [], tmp_path, config,
                        task=extraction_task(max_output_tokens=24))
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()
    manifest = json.loads((tmp_path / "student.json").read_text())
    assert manifest["kind"] == "full" and manifest["config"]["full"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path)  # transformers alone loads it
    moved = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert any("embed_tokens" in n for n in moved) and any("layernorm" in n for n in moved)  # not only LoRA targets
    student = load_student(result.path)
    assert student.kind == "full"
    task = extraction_task()
    texts = ["bill from acme paid page 2", "bill from hooli void page 1"]
    predictions = student.predict(texts)
    assert all(task.parse(p.label) == p.label for p in predictions)

    # exported like a merged LoRA student: the same answers from the merged folder and from int8
    from stillroom.train.artifacts import load_artifact
    from stillroom.train.export import export_int8, export_merged

    merged = export_merged(result.path, tmp_path / "exports" / "merged")
    assert [p.label for p in load_artifact(merged).predict(texts)] == [p.label for p in predictions]
    int8 = export_int8(merged, tmp_path / "exports" / "int8")
    assert all(task.parse(p.label) == p.label for p in load_artifact(int8).predict(texts))


def test_qlora_without_cuda_is_one_clear_sentence(tiny_llama_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = LoraConfig(base_model=str(tiny_llama_dir), quantization="4bit")
    with pytest.raises(ValueError, match=r"quantization '4bit' \(QLoRA\) needs a CUDA GPU"):
        train_lora(extraction_pairs(8, 0), extraction_pairs(2, 1), [], tmp_path, config, task=extraction_task())


# --- through the project: `stillroom train` on an extraction project -----------------------------


def extraction_project(root, tiny_llama_dir, student_extra: str = ""):
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.project import Project, init_project

    init_project(root)
    (root / "stillroom.yaml").write_text(
        f"task:\n  name: bills\n  type: extraction\n  max_output_tokens: 32\n  schema: {json.dumps(SCHEMA)}\n"
        f"  student_input_format: 'Fields {{labels}}: {{input}}'\n"
        f"students:\n  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', rank: 4, alpha: 8, "
        f"epochs: 2, batch_size: 8, learning_rate: 0.005{student_extra}}}\n"
        "split: {train: 0.6, validation: 0.1, calibration: 0.1, eval: 0.2, seed: 0}\n", encoding="utf-8")
    rows = [{"input": x, "output": json.loads(y)} for x, y in extraction_pairs(60, 11)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    return project


def test_stillroom_train_on_an_extraction_project_records_a_run_manifest(tiny_llama_dir, tmp_path):
    from stillroom.cli.main import app
    from stillroom.train.manifest import weights_sha256

    project = extraction_project(tmp_path / "proj", tiny_llama_dir)
    try:
        result = CliRunner().invoke(app, ["train", "lora", "-C", str(project.root), "--json"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        run = json.loads(result.stdout)["lora"]
        path = tmp_path / "proj" / ".stillroom" / "artifacts" / "students" / f"lora-run{run['run_id']}"
        assert run["artifact"] == str(path) and 0 <= run["metrics"]["val_score"] <= 1

        student = json.loads((path / "student.json").read_text())
        assert student["task"]["type"] == "extraction" and student["task"]["max_output_tokens"] == 32
        # {labels} is filled in (an extraction task's field names), so the student formats inputs alone
        assert student["student_format"] == "Fields vendor, status, amount, items, urgent, meta: {input}"

        manifest = json.loads((path / "run.json").read_text())
        assert manifest["base_model"]["sha256"] == weights_sha256(tiny_llama_dir)["sha256"]
        assert list(manifest["base_model"]["files"]) == ["model.safetensors"]
        assert manifest["dataset"]["fingerprint"] == run_fingerprint(project)
        assert manifest["dataset"]["train_examples"] > 0 and len(manifest["dataset"]["eval_lock_sha256"]) == 64
        assert manifest["config"]["rank"] == 4 and manifest["config"]["kind"] == "lora" and manifest["seed"] == 0
        assert manifest["metrics"] == run["metrics"]
        assert {"python", "torch", "transformers", "peft", "stillroom"} <= set(manifest["versions"])

        from stillroom.train.registry import load_student

        task = project.task
        with project.store.engine.connect() as conn:
            from stillroom.store.records import split_rows

            texts = [ex.input for ex, _ in split_rows(conn, "eval")]
        assert all(task.parse(p.label) == p.label for p in load_student(path).predict(texts))
    finally:
        project.close()


def run_fingerprint(project) -> str:
    from stillroom.store.records import latest_run

    with project.store.engine.connect() as conn:
        return latest_run(conn, "lora")["data_fingerprint"]


def test_train_student_resumes_a_failed_run_of_the_same_inputs(tiny_llama_dir, tmp_path):
    from stillroom.store.records import latest_run
    from stillroom.store import tables as T
    from stillroom.train.runner import train_student

    project = extraction_project(tmp_path / "proj", tiny_llama_dir, ", checkpoint_every: 2")
    try:
        def die(step, total):
            if step == 5:
                raise KeyboardInterrupt  # as a user's Ctrl-C would

        with pytest.raises(KeyboardInterrupt):
            train_student(project, "lora", progress=die)
        with project.store.engine.connect() as conn:
            failed = conn.execute(T.training_runs.select()).fetchall()
        assert [r.status for r in failed] == ["failed"]

        run = train_student(project, "lora")
        assert run["id"] == failed[0].id and run["status"] == "finished" and not run["skipped"]
        assert run["metrics"]["resumed_from_step"] == 4
        with project.store.engine.connect() as conn:
            assert latest_run(conn, "lora")["id"] == run["id"]
        # --force starts over in a new run
        again = train_student(project, "lora", force=True)
        assert again["id"] != run["id"] and again["metrics"]["resumed_from_step"] is None
    finally:
        project.close()


def test_a_run_killed_with_sigkill_is_resumed_by_the_next_train(tiny_llama_dir, tmp_path):
    """kill -9 leaves the run `running` in the store and a checkpoint on disk; the next
    `stillroom train` continues it."""
    import signal
    import subprocess
    import sys

    from stillroom.train.runner import train_student

    project = extraction_project(tmp_path / "proj", tiny_llama_dir, ", checkpoint_every: 2")
    project.close()
    script = (
        "import os, signal\n"
        "from stillroom.project import Project\n"
        "from stillroom.train.runner import train_student\n"
        "def die(step, total):\n"
        "    if step == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train_student(Project.open({str(tmp_path / 'proj')!r}), 'lora', progress=die)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr

    from stillroom.project import Project

    project = Project.open(tmp_path / "proj")
    try:
        run = train_student(project, "lora")
        assert run["status"] == "finished" and run["metrics"]["resumed_from_step"] == 4
    finally:
        project.close()

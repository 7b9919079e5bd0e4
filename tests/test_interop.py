"""Axolotl / Unsloth interop: recipes written from a dataset version, and a PEFT adapter trained
outside stillroom (plain peft + torch here, as an external tool would) imported and evaluated."""

import json
import os
import shutil

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
yaml = pytest.importorskip("yaml")

from typer.testing import CliRunner  # noqa: E402

from conftest import project_yaml, synthetic_rows, write_chat_jsonl  # noqa: E402
from stillroom.cli.main import app  # noqa: E402

runner = CliRunner()
LABELS = ["billing", "shipping", "other"]


def cli(*args):
    result = runner.invoke(app, [*args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def tiny_llama(path, hidden=64, seed=0):
    """A 2-layer Llama with SmolLM2's tokenizer; a wide init so LoRA alone can move its logits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stillroom.models import smollm2_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def project(tmp_path_factory, base):
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.project import Project, init_project

    root = tmp_path_factory.mktemp("interop") / "proj"
    init_project(root)
    students = (f"  - {{name: lora, kind: lora, base_model: '{base}', rank: 8, alpha: 16, learning_rate: 0.0002, "
                "epochs: 2, batch_size: 4}\n  - {name: encoder, kind: encoder}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(30))
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    yield project
    project.close()


def chat_records(path):
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
        assert r["messages"][1]["content"] in LABELS
    return records


def test_axolotl_recipe_matches_the_student(project, base, tmp_path):
    out = tmp_path / "axo"
    result = json.loads(cli("export-recipe", "lora", "--format", "axolotl", "--out", str(out), "--json",
                            "-C", str(project.root)).stdout)
    config = yaml.safe_load((out / "config.yml").read_text(encoding="utf-8"))
    assert config["base_model"] == str(base.resolve())
    assert config["adapter"] == "lora"
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert config["lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    assert (config["num_epochs"], config["learning_rate"], config["micro_batch_size"]) == (2, 0.0002, 4)
    assert config["train_on_inputs"] is False and config["output_dir"] == "./outputs/lora-out"
    assert config["sequence_len"] % 64 == 0 and config["sequence_len"] >= 64
    train_ds = config["datasets"][0]
    assert train_ds == {"path": "data/train.jsonl", "ds_type": "json", "type": "chat_template",
                        "field_messages": "messages", "roles_to_train": ["assistant"], "train_on_eos": "turn"}
    assert config["test_datasets"][0]["path"] == "data/validation.jsonl"
    # The chat template is the student's frame: ChatML with no injected system prompt.
    from jinja2 import Template

    rendered = Template(config["chat_template_jinja"]).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "other"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nother<|im_end|>\n"

    train = chat_records(out / "data" / "train.jsonl")
    val = chat_records(out / "data" / "validation.jsonl")
    with project.store.engine.connect() as conn:
        from stillroom.store.records import split_assignments

        splits = split_assignments(conn)
    assert {r["example_id"] for r in train} <= {e for e, s in splits.items() if s == "train"}
    assert {r["example_id"] for r in val} <= {e for e, s in splits.items() if s == "validation"}
    assert "axolotl train config.yml" in (out / "README.md").read_text(encoding="utf-8")
    assert result["dataset_version"] >= 1 and result["import_command"].startswith("stillroom import-adapter lora")

    # The same version again by id; an unknown id or an encoder student is refused with a reason.
    again = json.loads(cli("export-recipe", "lora", "-f", "axolotl", "-o", str(tmp_path / "again"),
                           "--dataset", str(result["dataset_version"]), "--json", "-C", str(project.root)).stdout)
    assert again["dataset_version"] == result["dataset_version"]
    assert (tmp_path / "again" / "data" / "train.jsonl").read_bytes() == (out / "data" / "train.jsonl").read_bytes()
    from stillroom.train.interop import InteropError, export_recipe

    with pytest.raises(InteropError, match="dataset version 999 does not exist"):
        export_recipe(project, "lora", "axolotl", tmp_path / "x", dataset=999)
    with pytest.raises(InteropError, match="encoder student"):
        export_recipe(project, "encoder", "axolotl", tmp_path / "x")


def test_unsloth_script_compiles_with_the_students_settings(project, tmp_path):
    out = tmp_path / "uns"
    cli("export-recipe", "lora", "--format", "unsloth", "--out", str(out), "-C", str(project.root))
    source = (out / "train_unsloth.py").read_text(encoding="utf-8")
    compile(source, "train_unsloth.py", "exec")
    for needle in ("FastLanguageModel.from_pretrained(", "FastLanguageModel.get_peft_model(", "SFTTrainer(",
                   "RANK, ALPHA, DROPOUT = 8, 16, 0.05", "LEARNING_RATE, EPOCHS, BATCH_SIZE, SEED = 0.0002, 2, 4, 0",
                   "completion_only_loss=True", 'save_pretrained(HERE / "outputs" / "adapter")'):
        assert needle in source, needle
    chat_records(out / "data" / "train.jsonl")
    assert "python train_unsloth.py" in (out / "README.md").read_text(encoding="utf-8")


def train_adapter_externally(base, project, out, steps=60):
    """What an external tool does: PEFT LoRA on the base, trained on the exported chat records in
    the ChatML frame with loss on the answer only, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.train.interop import export_recipe

    data = tmp = out.parent / "recipe"
    export_recipe(project, "lora", "axolotl", tmp)
    records = chat_records(data / "data" / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        r = records[step % len(records)]
        prompt = tokenizer(f"<|im_start|>user\n{r['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)["input_ids"]
        answer = tokenizer(f"{r['messages'][1]['content']}<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def test_import_adapter_round_trip_and_eval(project, base, tmp_path):
    adapter = train_adapter_externally(base, project, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)

    imported = json.loads(cli("import-adapter", "lora", str(adapter), "--json", "-C", str(project.root)).stdout)
    assert imported["imported"]["r"] == 4 and imported["imported"]["target_modules"] == ["o_proj", "q_proj", "v_proj"]
    assert imported["metrics"]["val_agreement"] is not None
    from sqlalchemy import select

    from stillroom.store import tables as T

    with project.store.engine.connect() as conn:
        row = conn.execute(select(T.training_runs).where(T.training_runs.c.id == imported["run_id"])).first()
    assert (row.status, row.provenance) == ("finished", "imported")
    manifest = json.loads((project.artifacts / "students" / f"lora-run{row.id}" / "student.json").read_text())
    assert manifest["config"]["rank"] == 4 and manifest["labels"] == LABELS

    evaluation = json.loads(cli("eval", "lora", "--json", "-C", str(project.root)).stdout)["lora"]
    assert evaluation["run_id"] == imported["run_id"]
    assert 0.0 <= evaluation["agreement"] <= 1.0 and evaluation["vs_teacher"]["n"] > 0

    # The imported weights are what eval scored: the same predictions as loading the adapter directly.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stillroom.train.lora import LoraStudent

    student = LoraStudent.load(row.artifact_path)
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    for (name, a), b in zip(student.model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


def test_import_adapter_refuses_a_wrong_or_missing_adapter(project, base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stillroom.train.interop import InteropError, import_adapter

    with pytest.raises(InteropError, match="no adapter_config.json"):
        import_adapter(project, "lora", tmp_path)
    with pytest.raises(InteropError, match="not a folder"):
        import_adapter(project, "lora", tmp_path / "nope")

    # Trained on another (narrower) model: the recorded name differs, and so do the layer shapes.
    other = tiny_llama(tmp_path / "other-base", hidden=32)
    wrong = tmp_path / "wrong"
    get_peft_model(AutoModelForCausalLM.from_pretrained(other),
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(wrong)
    with pytest.raises(InteropError, match="trained on base model .*other-base"):
        import_adapter(project, "lora", wrong)
    with pytest.raises(InteropError, match=r"has shape \[4, 32\].*needs \[4, 64\]"):
        import_adapter(project, "lora", wrong, allow_base_name_mismatch=True)

    # A right-shaped adapter that names a different base is refused unless told it is the same model.
    right = tmp_path / "right"
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(right)
    cfg = json.loads((right / "adapter_config.json").read_text())
    (right / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    with pytest.raises(InteropError, match="'Qwen/Qwen2.5-0.5B'"):
        import_adapter(project, "lora", right)
    run = import_adapter(project, "lora", right, allow_base_name_mismatch=True)
    assert run["config"]["imported"]["recorded_base"] == "Qwen/Qwen2.5-0.5B"

    no_weights = tmp_path / "no-weights"
    shutil.copytree(right, no_weights)
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InteropError, match="no adapter_model.safetensors"):
        import_adapter(project, "lora", no_weights)
    with pytest.raises(InteropError, match="encoder student"):
        import_adapter(project, "encoder", right)

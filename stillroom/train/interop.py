"""Train a student with Axolotl or Unsloth, and bring the adapter back.

`export_recipe` writes a dataset version's chat files plus a ready-to-run Axolotl config or Unsloth
script with the student's LoRA settings, framed exactly as the `lora` student frames prompts at
prediction time (for ChatML tokenizers: no system prompt, loss on the answer and its end-of-turn
token only). `import_adapter` registers a PEFT LoRA adapter trained elsewhere as a finished run of
a `lora` student, after checking it fits the student's base model, so `stillroom eval`, `export`
and `serve` use it like a run trained here.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

from stillroom.errors import StillroomError

__all__ = ["InteropError", "RECIPE_FORMATS", "export_recipe", "import_adapter", "HUB_IDS"]

RECIPE_FORMATS = ("axolotl", "unsloth")
# Where a known base model lives on the Hugging Face Hub (stillroom's copy is converted from the
# GGUF shipped in a package; an external trainer downloads the original).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The frame train/lora.py builds by hand for ChatML tokenizers, as a chat template: no default
# system prompt is injected, so the external trainer sees the exact tokens the student is scored on.
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WARMUP_FRACTION = 0.06  # as train/lora.py: linear warmup over 6% of the steps, then linear decay


class InteropError(StillroomError):
    """A recipe that cannot be written or an adapter that cannot be imported; the message says why."""


def _lora_student(project, name: str):
    student = project.config.student(name)
    if student.kind != "lora":
        raise InteropError(f"students.{name} is a {student.kind} student; Axolotl/Unsloth recipes and adapter "
                           "imports are for lora students")
    if student.scoring == "head":
        raise InteropError(f"students.{name} reads a label head (scoring: head), which Axolotl and Unsloth "
                           "do not train; recipes and adapter imports are for label-scoring lora students")
    if student.layers is not None:
        raise InteropError(f"students.{name} keeps only {student.layers} of its base's layers (layers), which "
                           "Axolotl and Unsloth recipes do not cut; leave layers out for an external run")
    return student


# --- export ------------------------------------------------------------------------------------


def _dataset_version(project, version: int | None) -> dict:
    """The chat files of a dataset version (a fresh snapshot when `version` is None)."""
    from sqlalchemy import select

    from stillroom.curate.datasets import snapshot
    from stillroom.store import tables as T

    if version is None:
        summary = snapshot(project)
        path, files, version = Path(summary["path"]), summary["files"], summary["id"]
        digest = summary["manifest_sha256"]
    else:
        table = T.TABLES["dataset_versions"]
        with project.store.engine.connect() as conn:
            row = conn.execute(select(table).where(table.c.id == version)).first()
            have = [r[0] for r in conn.execute(select(table.c.id).order_by(table.c.id))]
        if row is None:
            raise InteropError(f"dataset version {version} does not exist (have: {', '.join(map(str, have)) or 'none'}); "
                               "`stillroom curate snapshot` makes one")
        path, files, digest = Path(row.path), json.loads(row.manifest).get("files", {}), row.manifest_sha256
    if "chat/train.jsonl" not in files:
        raise InteropError(f"dataset version {version} has no chat export (chat/train.jsonl); "
                           "snapshot again with the chat format")
    chat = {}
    for split in ("train", "validation"):
        name = f"chat/{split}.jsonl"
        if name not in files:
            continue
        file = path / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != files[name]["sha256"]:
            raise InteropError(f"{file} is missing or differs from dataset version {version}'s manifest; "
                               "take a new snapshot (`stillroom curate snapshot`)")
        chat[split] = file
    return {"id": version, "manifest_sha256": digest, "files": chat}


def _tokenizer_is_chatml(base: str) -> bool:
    if base in HUB_IDS:
        return True  # SmolLM2
    added = []
    file = Path(base) / "tokenizer.json"
    if file.is_file():
        added = [t.get("content") for t in json.loads(file.read_text(encoding="utf-8")).get("added_tokens", [])]
    return IM_START in added and IM_END in added


def _sequence_len(base_dir: Path, records: list[dict], chatml: bool) -> int:
    """Room for the longest example in the student's frame, rounded up to a multiple of 64."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if chatml:
        texts = [f"{IM_START}user\n{r['messages'][0]['content']}{IM_END}\n{IM_START}assistant\n"
                 f"{r['messages'][1]['content']}{IM_END}\n" for r in records]
    else:
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    longest = max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    return 64 * math.ceil((longest + 8) / 64)


def export_recipe(project, name: str, fmt: str, out: Path | str, dataset: int | None = None) -> dict:
    """Write `out/data/{train,validation}.jsonl` from a dataset version and an Axolotl config
    (`config.yml`) or Unsloth script (`train_unsloth.py`) with the student's settings, plus a README."""
    import yaml

    from stillroom.train.lora import resolve_base_model
    from stillroom.train.runner import _student_args

    if fmt not in RECIPE_FORMATS:
        raise InteropError(f"unknown recipe format {fmt!r}; choose from {', '.join(RECIPE_FORMATS)}")
    student = _lora_student(project, name)
    args = _student_args(student)
    data = _dataset_version(project, dataset)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    records = []
    for split, src in data["files"].items():
        shutil.copyfile(src, out / "data" / f"{split}.jsonl")
        if split == "train":
            records = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    base_dir = resolve_base_model(student.base_model)
    chatml = _tokenizer_is_chatml(student.base_model if student.base_model in HUB_IDS else str(base_dir))
    base_ref = HUB_IDS.get(student.base_model, str(Path(base_dir).resolve()))
    seq_len = _sequence_len(base_dir, records, chatml)
    steps = math.ceil(len(records) / args.batch_size) * args.epochs
    warmup = max(1, round(WARMUP_FRACTION * steps))
    has_val = "validation" in data["files"]
    settings = {"student": name, "base_model": base_ref, "rank": args.rank, "alpha": args.alpha,
                "dropout": args.dropout, "target_modules": list(args.target_modules),
                "learning_rate": args.learning_rate, "epochs": args.epochs, "batch_size": args.batch_size,
                "seed": args.seed, "max_input_tokens": args.max_input_tokens, "sequence_len": seq_len,
                "warmup_steps": warmup, "chat_frame": "chatml" if chatml else "tokenizer_default", "dataset_version": data["id"],
                "dataset_manifest_sha256": data["manifest_sha256"], "train_rows": len(records)}
    if fmt == "axolotl":
        written = "config.yml"
        (out / written).write_text(_axolotl_yaml(settings, has_val, chatml, yaml), encoding="utf-8")
        command = "axolotl train config.yml"
        adapter_dir = "outputs/lora-out"
    else:
        written = "train_unsloth.py"
        (out / written).write_text(_unsloth_script(settings, has_val, chatml), encoding="utf-8")
        command = "python train_unsloth.py"
        adapter_dir = "outputs/adapter"
    (out / "stillroom-recipe.json").write_text(json.dumps({"format": fmt, **settings}, indent=1) + "\n",
                                               encoding="utf-8")
    (out / "README.md").write_text(_readme(fmt, settings, command, adapter_dir, project, chatml), encoding="utf-8")
    return {"format": fmt, "out": str(out), "files": sorted(p.relative_to(out).as_posix()
                                                            for p in out.rglob("*") if p.is_file()),
            "command": f"cd {out} && {command}", "adapter_dir": str(out / adapter_dir),
            "import_command": f"stillroom import-adapter {name} {out / adapter_dir}", **settings}


def _dataset_entry(path: str, split: str | None = None) -> dict:
    entry = {"path": path, "ds_type": "json"}
    if split:
        entry["split"] = split  # a local JSON file loads as split "train"
    entry.update({"type": "chat_template", "field_messages": "messages", "roles_to_train": ["assistant"],
                  "train_on_eos": "turn"})
    return entry


def _axolotl_yaml(s: dict, has_val: bool, chatml: bool, yaml) -> str:
    config = {
        "base_model": s["base_model"],
        "model_type": "AutoModelForCausalLM",
        "tokenizer_type": "AutoTokenizer",
        **({"chat_template": "jinja", "chat_template_jinja": CHATML_JINJA} if chatml
           else {"chat_template": "tokenizer_default"}),
        "datasets": [_dataset_entry("data/train.jsonl")],
        **({"test_datasets": [_dataset_entry("data/validation.jsonl", split="train")]} if has_val
           else {"val_set_size": 0}),
        "dataset_prepared_path": "last_run_prepared",
        "output_dir": "./outputs/lora-out",
        "adapter": "lora",
        "lora_r": s["rank"],
        "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"],
        "lora_target_modules": s["target_modules"],
        "sequence_len": s["sequence_len"],
        "sample_packing": False,
        "train_on_inputs": False,
        "num_epochs": s["epochs"],
        "micro_batch_size": s["batch_size"],
        "gradient_accumulation_steps": 1,
        "optimizer": "adamw_torch",
        "weight_decay": 0.0,
        "lr_scheduler": "linear",
        "learning_rate": s["learning_rate"],
        "warmup_steps": s["warmup_steps"],
        "seed": s["seed"],
        "bf16": "auto",
        "logging_steps": 10,
        **({"eval_strategy": "epoch"} if has_val else {}),
        "save_strategy": "epoch",
    }
    header = (f"# Axolotl config for the stillroom student '{s['student']}' (dataset version {s['dataset_version']}),\n"
              "# written by `stillroom export-recipe`. Run from this folder: axolotl train config.yml\n")
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=10**6)


def _unsloth_script(s: dict, has_val: bool, chatml: bool) -> str:
    before, after = IM_START + "user\n", IM_END + "\n" + IM_START + "assistant\n"
    frame = (f"PROMPT_BEFORE = {before!r}\nPROMPT_AFTER = {after!r}\nANSWER_END = {IM_END!r}\n" if chatml else "")
    build = ('''        prompt = PROMPT_BEFORE + user + PROMPT_AFTER
        completion = answer + ANSWER_END''' if chatml else '''        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)
        completion = answer + tokenizer.eos_token''')
    return f'''"""Unsloth training for the stillroom student {s["student"]!r} (dataset version {s["dataset_version"]}).

Written by `stillroom export-recipe --format unsloth`. Run from this folder: python train_unsloth.py
It saves a PEFT LoRA adapter to outputs/adapter; bring it back with
    stillroom import-adapter {s["student"]} outputs/adapter
"""

from unsloth import FastLanguageModel  # import Unsloth first: it patches transformers and TRL

import json
import math
from pathlib import Path

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

HERE = Path(__file__).resolve().parent
BASE_MODEL = {s["base_model"]!r}
MAX_SEQ_LENGTH = {s["sequence_len"]}
RANK, ALPHA, DROPOUT = {s["rank"]}, {s["alpha"]}, {s["dropout"]}
TARGET_MODULES = {s["target_modules"]!r}
LEARNING_RATE, EPOCHS, BATCH_SIZE, SEED = {s["learning_rate"]!r}, {s["epochs"]}, {s["batch_size"]}, {s["seed"]}
WARMUP_FRACTION = {WARMUP_FRACTION}
# The frame stillroom's lora student is scored in: the user turn, then the answer and its end-of-turn
# token, with no system prompt. Loss is on the completion only.
{frame}

def load(split, tokenizer):
    rows = []
    for line in (HERE / "data" / f"{{split}}.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        user, answer = messages[0]["content"], messages[-1]["content"]
{build}
        rows.append({{"prompt": prompt, "completion": completion}})
    return Dataset.from_list(rows)


model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=BASE_MODEL, max_seq_length=MAX_SEQ_LENGTH, dtype=None, load_in_4bit=False)
model = FastLanguageModel.get_peft_model(
    model, r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGET_MODULES, bias="none",
    use_gradient_checkpointing="unsloth", random_state=SEED)
train = load("train", tokenizer)
{"validation = load('validation', tokenizer)" if has_val else "validation = None"}
steps = math.ceil(len(train) / BATCH_SIZE) * EPOCHS
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=train,
    eval_dataset=validation,
    args=SFTConfig(
        output_dir=str(HERE / "outputs" / "checkpoints"),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH_SIZE,
        gradient_accumulation_steps=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=max(1, round(WARMUP_FRACTION * steps)),
        weight_decay=0.0,
        optim="adamw_torch",
        max_length=MAX_SEQ_LENGTH,
        completion_only_loss=True,
        eval_strategy={"'epoch'" if has_val else "'no'"},
        save_strategy="no",
        logging_steps=10,
        seed=SEED,
        report_to="none",
    ),
)
trainer.train()
model.save_pretrained(HERE / "outputs" / "adapter")  # adapter_config.json + adapter_model.safetensors
tokenizer.save_pretrained(HERE / "outputs" / "adapter")
'''


def _readme(fmt: str, s: dict, command: str, adapter_dir: str, project, chatml: bool) -> str:
    tool = "Axolotl" if fmt == "axolotl" else "Unsloth"
    install = "pip install axolotl" if fmt == "axolotl" else "pip install unsloth"
    frame = ("The chat frame is the student's own (ChatML with no system prompt), so the adapter is trained on the "
             "exact tokens `stillroom eval` scores." if chatml else
             "This base model has no ChatML tokens: the tokenizer's own chat template is used, which may differ "
             "from the frame the stillroom student predicts in; evaluate the imported adapter before trusting it.")
    return f"""# Train `{s['student']}` with {tool}

Written by `stillroom export-recipe --format {fmt}` from dataset version {s['dataset_version']}
(manifest `{s['dataset_manifest_sha256'][:16]}...`, {s['train_rows']} train rows). The data holds only the
train and validation splits: nothing from the locked eval set.

Run from this folder:

```console
{install}
{command}
```

Then, in the stillroom project:

```console
stillroom import-adapter {s['student']} {adapter_dir}
stillroom eval {s['student']}
```

| setting | value |
| --- | --- |
| base model | `{s['base_model']}` |
| LoRA r / alpha / dropout | {s['rank']} / {s['alpha']} / {s['dropout']} |
| target modules | {', '.join(s['target_modules'])} |
| learning rate, schedule | {s['learning_rate']}, linear warmup over {s['warmup_steps']} step(s), then linear decay |
| epochs, batch size | {s['epochs']}, {s['batch_size']} |
| sequence length | {s['sequence_len']} (covers the longest train example) |

{frame}

The loss is on the answer and its end-of-turn token only. Unlike stillroom's own trainer, this
recipe does not stop early on validation agreement or truncate inputs to {s['max_input_tokens']} tokens: it
trains every epoch on the whole input. Files: `data/train.jsonl` and `data/validation.jsonl` (one
`{{"messages": [...]}}` chat record per line, plus provenance columns) and `stillroom-recipe.json`.
"""


# --- import ------------------------------------------------------------------------------------


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no weights read)."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _same_base(recorded: str | None, student_base: str, base_dir: Path) -> bool:
    if not recorded:
        return False
    names = {student_base.lower(), Path(base_dir).name.lower()}
    if student_base in HUB_IDS:
        names |= {HUB_IDS[student_base].lower(), HUB_IDS[student_base].split("/")[-1].lower()}
    rec = recorded.rstrip("/")
    if Path(rec).is_dir() and Path(rec).resolve() == Path(base_dir).resolve():
        return True
    return rec.lower() in names or rec.split("/")[-1].lower() in names


def _check_adapter(path: Path, student, base_dir: Path, allow_base_name_mismatch: bool) -> dict:
    """adapter_config.json read and checked against the base model; every LoRA tensor's shape
    checked against the base layer it adapts."""
    import re

    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise InteropError(f"{path} is not a folder; expected a PEFT adapter folder "
                           "(adapter_config.json + adapter_model.safetensors)")
    if not config_file.is_file():
        raise InteropError(f"{path} has no adapter_config.json; is it a PEFT adapter folder?")
    if not weights.is_file():
        other = " (adapter_model.bin is not loaded: it is a pickle; save with safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise InteropError(f"{path} has no adapter_model.safetensors{other}")
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InteropError(f"{config_file} is not valid JSON ({exc})") from None
    if cfg.get("peft_type") != "LORA":
        raise InteropError(f"{config_file}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be imported")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise InteropError(f"{config_file}: task_type is {cfg['task_type']!r}; the lora student is a causal LM "
                           "(CAUSAL_LM)")
    recorded = cfg.get("base_model_name_or_path")
    if not _same_base(recorded, student.base_model, base_dir) and not allow_base_name_mismatch:
        raise InteropError(
            f"{config_file}: the adapter was trained on base model {recorded!r}, but students.{student.name} uses "
            f"{student.base_model!r} ({base_dir}); train it on that base, or pass --allow-base-name-mismatch if "
            "it is the same model under another name (the layer shapes are still checked)")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the architecture only: no weights are allocated
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir))
    modules = dict(model.named_modules())
    shapes = _safetensors_shapes(weights)
    lora_keys = [k for k in shapes if ".lora_A." in k or ".lora_B." in k]
    if not lora_keys:
        raise InteropError(f"{weights} holds no LoRA weights (no lora_A / lora_B tensors)")
    adapted = set()
    for key in lora_keys:
        name = re.sub(r"^base_model\.model\.", "", key.split(".lora_")[0])
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "in_features"):
            raise InteropError(f"{weights}: '{name}' is not a linear layer of {base_dir.name}; the adapter was trained "
                               f"on a different architecture than students.{student.name}'s base model")
        shape = shapes[key]
        r = shape[0] if ".lora_A." in key else shape[1]
        expected = [r, layer.in_features] if ".lora_A." in key else [layer.out_features, r]
        if shape != expected:
            raise InteropError(f"{weights}: {key} has shape {shape}, but {base_dir.name}'s {name} needs {expected}; "
                               "the adapter was trained on a different base model")
        adapted.add(name.rsplit(".", 1)[-1])
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        missing = sorted(set(targets) - adapted)
        if missing:
            raise InteropError(f"{config_file}: target module(s) {', '.join(missing)} have no weights in {weights.name} "
                               f"(adapted: {', '.join(sorted(adapted))})")
    tokenizer_file = path / "tokenizer.json"
    if tokenizer_file.is_file() and (base_dir / "tokenizer.json").is_file():
        n_adapter = len(json.loads(tokenizer_file.read_text(encoding="utf-8"))["model"].get("vocab", {}))
        n_base = len(json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"].get("vocab", {}))
        if n_adapter != n_base:
            raise InteropError(f"{tokenizer_file} has {n_adapter} tokens, the base model's tokenizer {n_base}; the "
                               "lora student predicts with the base tokenizer, so added tokens are not supported")
    return {"config": cfg, "adapted_modules": sorted(adapted), "recorded_base": recorded}


def import_adapter(project, name: str, path: Path | str, allow_base_name_mismatch: bool = False) -> dict:
    """Register a PEFT LoRA adapter folder trained elsewhere as a finished run of `name`; the adapter
    is loaded and scored on the validation split before the run is recorded. Returns the run."""
    from transformers import AutoTokenizer

    from stillroom.curate.lock import verify_lock
    from stillroom.store import tables as T
    from stillroom.store.records import finish_run, latest_run, start_run
    from stillroom.train.lora import LoraStudent, resolve_base_model
    from stillroom.train.runner import _student_args, run_config, training_data

    student = _lora_student(project, name)
    path = Path(path)
    base_dir = resolve_base_model(student.base_model)
    checked = _check_adapter(path, student, base_dir, allow_base_name_mismatch)
    cfg = checked["config"]
    lock = verify_lock(project)
    digest = hashlib.sha256()
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(hashlib.sha256((path / file).read_bytes()).digest())
    adapter_sha = digest.hexdigest()

    args = _student_args(student)
    args.rank, args.alpha = int(cfg.get("r", args.rank)), int(cfg.get("lora_alpha", args.alpha))
    args.dropout = float(cfg.get("lora_dropout", args.dropout))
    args.target_modules = tuple(checked["adapted_modules"])
    provenance = {"source": str(path.resolve()), "adapter_sha256": adapter_sha, "recorded_base": checked["recorded_base"],
                  "peft_version": cfg.get("peft_version"), "r": args.rank, "lora_alpha": args.alpha,
                  "target_modules": list(args.target_modules)}
    run_cfg = {**run_config(student), "rank": args.rank, "alpha": args.alpha, "imported": provenance}
    with project.store.engine.begin() as conn:
        run_id = start_run(conn, name, "lora", run_cfg, adapter_sha, lock.id)
        conn.execute(T.training_runs.update().where(T.training_runs.c.id == run_id).values(provenance="imported"))
    out = project.artifacts / "students" / f"{name}-run{run_id}"
    try:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(path / file, out / file)
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)  # the student predicts with the base's
        task = project.task
        try:
            from stillroom.train.lora import task_info

            info = task_info(task)
        except (ImportError, AttributeError):
            info = {"type": "classification", "name": task.name, "metric": "accuracy", "max_output_tokens": None,
                    "schema": None}
        labels = list(task.labels) if info.get("type", "classification") == "classification" else []
        manifest = {"kind": "lora", "labels": labels, "task": info,
                    "base_model": {"name": student.base_model, "path": str(Path(base_dir).resolve())},
                    "student_format": project.config.task.student_input_format, "config": asdict(args),
                    "imported": provenance}
        (out / "student.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # Load it as `stillroom eval` will, and score it on validation: a broken adapter fails here.
        loaded = LoraStudent.load(out)
        _, val = training_data(project)
        metrics = {"provenance": "imported", "val_examples": len(val), "val_agreement": None}
        if val:
            predictions = loaded.predict([text for text, _ in val])
            agree = [project.task.score(p.label, gold) for p, (_, gold) in zip(predictions, val)]
            metrics["val_agreement"] = sum(agree) / len(agree)
        del loaded
        manifest["metrics"] = metrics
        (out / "student.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except BaseException as exc:
        shutil.rmtree(out, ignore_errors=True)
        with project.store.engine.begin() as conn:
            finish_run(conn, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, (StillroomError, KeyboardInterrupt)):
            raise
        raise InteropError(f"the adapter in {path} could not be loaded onto {base_dir.name}: {exc}") from exc
    with project.store.engine.begin() as conn:
        finish_run(conn, run_id, "finished", str(out), metrics)
        run = latest_run(conn, name)
    return run

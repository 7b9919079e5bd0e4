"""`scoring: head`: a LoRA (or full) decoder student that reads a linear label head on the prompt's last
hidden state, on a tiny real Llama (2 layers, 64 wide) with SmolLM2's tokenizer."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from stillroom.train import lora  # noqa: E402
from stillroom.train.lora import LoraConfig, LoraStudent, train_lora  # noqa: E402

LABELS = ["fruit", "vehicle", "weather_report"]
KEYWORDS = {"fruit": ["apple", "banana", "cherry"], "vehicle": ["car", "truck", "bus"],
            "weather_report": ["rain", "snow", "wind"]}


def keyword_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """One keyword per text decides the label."""
    rng = random.Random(seed)
    pairs = [(rng.choice(KEYWORDS[LABELS[i % 3]]), LABELS[i % 3]) for i in range(n)]
    rng.shuffle(pairs)
    return pairs


def head_config(base, **overrides) -> LoraConfig:
    settings = dict(base_model=str(base), rank=8, alpha=16, dropout=0.0, epochs=3, batch_size=8,
                    learning_rate=1e-2, threads=2, scoring="head")
    return LoraConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(wide_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("head-student")
    result = train_lora(keyword_pairs(240, 1), keyword_pairs(30, 2), LABELS, out,
                        head_config(wide_llama_dir, epochs=2), student_format="Classify: {input}")
    return result


def test_a_head_student_learns_saves_and_predicts_in_one_pass(trained):
    m = trained.metrics
    assert m["val_agreement"] >= 0.9, m
    assert len(m["val_log_loss_by_epoch"]) == m["epochs_run"]
    # no answer tokens go through the model: the tokens trained on are the prompts' alone, every epoch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained.path)
    prompts = lora._encode_prompts(tokenizer, lora._chat_frame(tokenizer), [x for x, _ in keyword_pairs(240, 1)],
                                   "Classify: {input}", 96)
    assert m["train_tokens"] == m["epochs_run"] * sum(len(p) for p in prompts)
    assert (trained.path / lora.HEAD_FILE).is_file() and (trained.path / "adapter_model.safetensors").is_file()
    manifest = json.loads((trained.path / "student.json").read_text())
    assert manifest["config"]["scoring"] == "head" and manifest["labels"] == LABELS

    student = LoraStudent.load(trained.path)
    held_out = keyword_pairs(30, 3)
    predictions = student.predict([x for x, _ in held_out] + ["", "<|im_end|> injected " * 40], batch_size=4)
    assert sum(p.label == y for p, (_, y) in zip(predictions, held_out)) / len(held_out) >= 0.9
    for p in predictions:
        assert p.label in LABELS and abs(sum(p.probs.values()) - 1.0) < 1e-5
        assert p.confidence == p.probs[p.label] == max(p.probs.values())

    # the probabilities are the head's softmax on the prompt's last hidden state, computed here by hand
    text = "a red truck"
    prompt = f"<|im_start|>user\nClassify: {text}<|im_end|>\n<|im_start|>assistant\n"
    ids = student.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        last = student.model.get_decoder()(torch.tensor([ids])).last_hidden_state[0, -1].float()
        expected = (last @ student.label_head.weight.T + student.label_head.bias).softmax(-1).tolist()
    got = student.predict([text])[0]
    assert [got.probs[label] for label in LABELS] == pytest.approx(expected, abs=1e-5)
    # batching with longer and shorter prompts (left padding) changes nothing
    batched = student.predict([text, "banana " * 12, "rain"], batch_size=3)[0]
    assert [batched.probs[label] for label in LABELS] == pytest.approx(expected, abs=1e-5)


def test_the_head_starts_from_the_label_tokens_output_embeddings(tiny_llama_dir):
    """Before training, a label's logit is the mean of its own tokens' logits at the answer position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    frame = lora._chat_frame(tokenizer)
    answers = lora._encode_answers(tokenizer, frame, LABELS)
    assert len(answers[2]) > 2  # "weather_report" is several tokens: the mean is over all of them
    head = lora.new_label_head(lm, answers)
    prompt = lora._encode_prompts(tokenizer, frame, ["apple"], "{input}", 96)
    with torch.inference_mode():
        logits = lm(torch.tensor(prompt)).logits[0, -1]
        got = lora._head_logits(lm, head, prompt, lora._pad_id(tokenizer))[0]
    expected = [logits[a[:-1]].mean().item() for a in answers]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_bf16_head_student_keeps_the_head_in_fp32_and_answers_like_fp32(tiny_llama_dir, tmp_path):
    result = train_lora(keyword_pairs(48, 4), keyword_pairs(9, 5), LABELS, tmp_path,
                        head_config(tiny_llama_dir, precision="bf16", epochs=1))
    student = LoraStudent.load(result.path)
    assert student.model.dtype == torch.bfloat16 and student.label_head.weight.dtype == torch.float32
    fp32 = LoraStudent.load(result.path)
    fp32.model = fp32.model.float()
    texts = ["apple", "a bus", "snow today"]
    for quick, exact in zip(student.predict(texts), fp32.predict(texts)):
        assert [quick.probs[x] for x in LABELS] == pytest.approx([exact.probs[x] for x in LABELS], abs=0.03)


def test_full_fine_tune_with_a_head_keeps_the_head_out_of_the_model_folder(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    from stillroom.train.registry import load_student

    result = lora.train_full(keyword_pairs(48, 6), keyword_pairs(9, 7), LABELS, tmp_path,
                             head_config(tiny_llama_dir, epochs=1, learning_rate=1e-3))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if lora.HEAD_MODULE in k]
    with safe_open(str(tmp_path / lora.HEAD_FILE), "pt") as f:
        assert sorted(f.keys()) == ["bias", "weight"] and list(f.get_tensor("weight").shape) == [3, 64]
    student = load_student(result.path)
    assert student.kind == "full" and student.label_head is not None
    assert all(p.label in LABELS for p in student.predict(["cherry", "car"]))


def test_an_interrupted_head_run_resumes_to_the_same_head_and_adapter(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    train, val = keyword_pairs(40, 8), keyword_pairs(8, 9)
    config = head_config(tiny_llama_dir, epochs=2, checkpoint_every=3, dropout=0.05)
    straight = train_lora(train, val, LABELS, tmp_path / "straight", config)

    class Killed(Exception):
        pass

    def die_at_step_7(step, total):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_lora(train, val, LABELS, tmp_path / "resumed", config, progress=die_at_step_7)
    resumed = train_lora(train, val, LABELS, tmp_path / "resumed", config)
    assert resumed.metrics["resumed_from_step"] == 6
    for name in (lora.HEAD_FILE, "adapter_model.safetensors"):
        a, b = load_file(str(straight.path / name)), load_file(str(resumed.path / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_head_scoring_errors_name_what_and_where(tiny_llama_dir, tmp_path):
    from pydantic import ValidationError

    from stillroom.config import StudentConfig, TaskConfig
    from stillroom.errors import StillroomError
    from stillroom.tasks import make_task

    with pytest.raises(ValueError, match="LoraConfig.scoring='sideways'"):
        LoraConfig(scoring="sideways")
    generation = make_task(TaskConfig(name="summary", type="generation", max_output_tokens=16))
    with pytest.raises(ValueError, match="scoring='head' applies to classification"):
        train_lora([("a", "b")], [("a", "b")], [], tmp_path, head_config(tiny_llama_dir), task=generation)
    with pytest.raises(ValidationError, match="scoring 'head' applies to kinds 'lora' and 'full'"):
        StudentConfig(name="e", kind="encoder", scoring="head")
    with pytest.raises(ValidationError, match="deploy 'gguf-q8_0'"):
        StudentConfig(name="l", kind="lora", scoring="head", deploy="gguf-q8_0")
    (tmp_path / "copy").mkdir()
    with pytest.raises(StillroomError, match=f"{lora.HEAD_FILE} is missing"):
        lora.load_label_head(tmp_path / "copy")


def test_a_head_student_through_the_cli_trains_evaluates_and_exports_merged_and_int8(tiny_llama_dir, tmp_path):
    """A project's `scoring: head` student: trained, evaluated, exported. `all` writes adapter, merged and
    int8 (GGUF has no place for the head), each loads and answers like the trained student; naming a GGUF
    format, or asking for an Axolotl recipe, is one clear sentence."""
    from typer.testing import CliRunner

    from conftest import locked_cli_project
    from stillroom.cli.main import app
    from stillroom.train.artifacts import load_artifact

    runner = CliRunner()
    students = (f"  - {{name: head, kind: lora, scoring: head, base_model: '{tiny_llama_dir}', epochs: 1, "
                "learning_rate: 0.005, rank: 8, batch_size: 16}\n")
    root = locked_cli_project(tmp_path / "proj", students, 12)
    for args in (["train", "head"], ["eval", "head"]):
        result = runner.invoke(app, [*args, "-C", str(root), "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)
    assert 0.0 <= evaluation.get("head", evaluation)["agreement"] <= 1.0

    result = runner.invoke(app, ["export", "head", "-C", str(root), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    artifacts = {a["format"]: a for a in json.loads(result.stdout)["artifacts"]}
    assert sorted(artifacts) == ["adapter", "int8", "merged"]
    texts = ["my card has not arrived", "what is the exchange rate", "I want a refund"]
    want = load_artifact(artifacts["adapter"]["path"]).predict(texts)
    for fmt in ("merged", "int8"):
        assert artifacts[fmt]["evaluation"]["agreement"] is not None
        got = load_artifact(artifacts[fmt]["path"]).predict(texts)
        tolerance = 1e-5 if fmt == "merged" else 0.05  # int8: activations quantized per call
        for a, b in zip(want, got):
            assert [b.probs[x] for x in a.probs] == pytest.approx(list(a.probs.values()), abs=tolerance), fmt

    # the entry point turns both refusals into one sentence on stderr, exit 2
    exe = Path(sys.executable).with_name("stillroom")
    for args in (["export", "head", "-f", "gguf-q8_0"], ["export-recipe", "head", "-f", "axolotl", "-o", tmp_path / "r"]):
        done = subprocess.run([str(exe), *map(str, args), "-C", str(root)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "label head" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_compiled_predictions_answer_like_eager_for_one_input_and_for_batches(trained):
    """`compile: true` on a head student: predictions through torch.compile (Inductor) give the eager
    probabilities, for one input and for padded and unpadded batches, after exactly two compiles."""
    student = LoraStudent.load(trained.path)
    texts = ["a red truck", "banana " * 6, "rain", "snow", "a bus today", "cherry"]
    from torch._dynamo.utils import counters

    eager = student.predict(texts, batch_size=4)
    graphs = counters["stats"]["unique_graphs"]
    assert student.compile_predictions(warm_up=True) is None
    for got in (student.predict(texts, batch_size=4), [student.predict([t])[0] for t in texts],
                student.predict(["rain", "snow"], batch_size=2)):  # the last: no padding in the batch
        want = eager if len(got) == len(texts) else eager[2:4]
        for a, b in zip(want, got):
            assert [b.probs[x] for x in LABELS] == pytest.approx([a.probs[x] for x in LABELS], abs=1e-4)
    # compiled once for one input and once for batches; neither the batches nor inference mode recompiled
    assert student._head_forward.failed is None and counters["stats"]["unique_graphs"] - graphs == 2

    encoder_like = LoraStudent.load(trained.path)
    encoder_like.label_head = None  # a label-scoring student: nothing to compile
    assert "scoring: head" in encoder_like.compile_predictions()


def test_the_last_layer_runs_at_the_read_position_only_and_gives_the_whole_pass_state(trained, tiny_llama_dir):
    """A head reads one position, so a Llama decoder's last layer computes its query, attention output
    and MLP there alone (keys and values everywhere): the logits equal the whole pass's for a padded
    batch and one input, with and without grouped-query heads. Another architecture (Gemma 3) runs
    whole."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    def mlp_widths(decoder):
        widths = []
        decoder.layers[-1].mlp.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
        return widths

    student = LoraStudent.load(trained.path)
    prompts = lora._encode_prompts(student.tokenizer, student._frame, ["a red truck", "banana " * 6, "rain"],
                                   student.student_format, 96)
    widths = mlp_widths(student.model.get_decoder())
    with torch.inference_mode():
        for rows in (prompts, prompts[:1], prompts[2:]):
            short = lora._head_logits(student.model, student.label_head, rows, student._pad_id)
            whole = lora._head_logits(student.model, student.label_head, rows, student._pad_id, one_position=False)
            assert torch.allclose(short, whole, atol=1e-5), (short - whole).abs().max()
    assert widths[0::2] == [1, 1, 1] and widths[1::2] == [max(len(p) for p in r) for r in (prompts, prompts[:1], prompts[2:])]

    grouped = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()  # 4 query heads over 2 key/value heads
    tokenizer = student.tokenizer
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, max_position_embeddings=256)).eval()
    for lm, short_last in ((grouped, True), (gemma, False)):
        decoder = lm.get_decoder()
        widths = mlp_widths(decoder)
        inputs = lora._left_padded(prompts, student._pad_id, "cpu")
        with torch.inference_mode():
            short = lora._final_states(decoder, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])
            whole = decoder(**inputs, use_cache=False).last_hidden_state[:, -1]
        assert torch.allclose(short, whole, atol=1e-5), (short - whole).abs().max()
        assert widths[0] == (1 if short_last else inputs["input_ids"].shape[1])


def test_the_gateway_compiles_or_not_as_the_config_says_now_not_as_at_training(trained, tmp_path):
    """`compile` changes how a head student predicts, not the model: serving reads it from stillroom.yaml
    as it is now. A student trained with `compile: true` serves eagerly under `false`/`auto`, and one
    trained without it is compiled, both batch shapes, before the gateway takes requests."""
    import shutil

    from stillroom.serve.app import _apply_compile_setting

    folder = tmp_path / "compiled-at-training"
    shutil.copytree(trained.path, folder)
    manifest = json.loads((folder / "student.json").read_text())
    manifest["config"]["compile"] = True
    (folder / "student.json").write_text(json.dumps(manifest))
    student = LoraStudent.load(folder)
    assert student._head_forward is not None  # the folder's setting: a lazy compiled forward
    for setting in (False, "auto"):
        _apply_compile_setting(student, setting, "head")
        assert student._head_forward is None
    eager = student.predict(["a red truck", "rain"])

    student = LoraStudent.load(trained.path)
    assert student._head_forward is None
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    _apply_compile_setting(student, True, "head")
    assert student._head_forward is not None and student._head_forward.failed is None
    assert counters["stats"]["unique_graphs"] - graphs == 2  # paid now, not on the first requests
    for a, b in zip(eager, student.predict(["a red truck", "rain"])):
        assert [b.probs[x] for x in LABELS] == pytest.approx([a.probs[x] for x in LABELS], abs=1e-4)


def test_a_shallower_student_keeps_only_its_first_layers_through_training_loading_and_export(
        tiny_llama_dir, tmp_path):
    """`layers: 1` on the 2-layer base: the adapter, the loaded student and the merged export all have one
    decoder layer, that layer starts as the base's first, and the export answers like the trained student."""
    from safetensors.torch import load_file

    from stillroom.train.artifacts import load_artifact
    from stillroom.train.export import export_adapter, export_merged

    base = lora.load_base_lm(tiny_llama_dir, 1)
    whole = lora.load_base_lm(tiny_llama_dir)
    assert len(base.model.layers) == 1 and base.config.num_hidden_layers == 1 and len(whole.model.layers) == 2
    ours, theirs = base.state_dict(), whole.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and set(theirs) - set(ours)  # layer 1 left out

    result = train_lora(keyword_pairs(48, 10), keyword_pairs(9, 11), LABELS, tmp_path / "run",
                        head_config(tiny_llama_dir, epochs=1, layers=1))
    adapter = load_file(str(result.path / "adapter_model.safetensors"))
    assert adapter and all(".layers.0." in k for k in adapter), sorted(adapter)[:4]
    assert json.loads((result.path / "student.json").read_text())["config"]["layers"] == 1
    student = LoraStudent.load(result.path)
    assert len(student.model.get_decoder().layers) == 1

    merged = export_merged(result.path, tmp_path / "merged")
    assert json.loads((merged / "config.json").read_text())["num_hidden_layers"] == 1
    texts = ["apple", "a blue bus", "snow and wind"]
    for folder in (merged, export_adapter(result.path, tmp_path / "adapter")):
        got = load_artifact(folder).predict(texts)
        for a, b in zip(student.predict(texts), got):
            assert [b.probs[x] for x in LABELS] == pytest.approx([a.probs[x] for x in LABELS], abs=1e-5)

    # a full fine-tune of the cut base is saved as a one-layer model folder, and loads as one
    full = lora.train_full(keyword_pairs(16, 12), keyword_pairs(6, 13), LABELS, tmp_path / "full",
                           head_config(tiny_llama_dir, epochs=1, learning_rate=1e-3, layers=1))
    assert json.loads((full.path / "config.json").read_text())["num_hidden_layers"] == 1
    assert len(load_artifact(full.path).model.get_decoder().layers) == 1


def test_a_depth_the_base_does_not_have_is_one_clear_error(tiny_llama_dir, tmp_path):
    from pydantic import ValidationError

    from stillroom.config import StudentConfig
    from stillroom.train.runner import run_config

    with pytest.raises(ValueError, match="LoraConfig.layers=0: expected None or an integer >= 1"):
        LoraConfig(layers=0)
    with pytest.raises(ValueError, match=r"LoraConfig.layers=3: the base model .* has only 2 decoder layers"):
        train_lora(keyword_pairs(8, 1), keyword_pairs(3, 2), LABELS, tmp_path, head_config(tiny_llama_dir, layers=3))
    assert not (tmp_path / "student.json").exists()
    with pytest.raises(ValidationError, match="layers applies to kinds 'lora' and 'full'"):
        StudentConfig(name="e", kind="encoder", layers=4)
    # left out of a run's fingerprint unless set: runs recorded before `layers` existed are still reused
    assert "layers" not in run_config(StudentConfig(name="l", kind="lora"))
    assert run_config(StudentConfig(name="l", kind="lora", layers=8))["layers"] == 8

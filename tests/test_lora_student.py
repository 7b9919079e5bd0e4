"""The `lora` student end to end on a tiny real Llama (2 layers, 64 wide) with SmolLM2's tokenizer."""

import json
import os
import random

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from stillroom.train.lora import LoraConfig, LoraStudent, train_lora  # noqa: E402

LABELS = ["fruit", "vehicle", "weather"]
KEYWORDS = {"fruit": ["apple", "banana", "cherry"], "vehicle": ["car", "truck", "bus"],
            "weather": ["rain", "snow", "wind"]}
FILLER = "the a today i saw some very nice old new big small near my house yesterday".split()


def toy_pairs(n: int, seed: int, fillers: int = 5) -> list[tuple[str, str]]:
    """Texts of filler words with one keyword that decides the label."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        words = rng.sample(FILLER, fillers)
        words.insert(rng.randint(0, fillers), rng.choice(KEYWORDS[label]))
        pairs.append((" ".join(words), label))
    rng.shuffle(pairs)
    return pairs


@pytest.fixture(scope="module")
def tiny_model(wide_llama_dir):
    return wide_llama_dir


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    steps = []
    config = LoraConfig(base_model=str(tiny_model), rank=4, alpha=8, epochs=2, batch_size=8,
                        learning_rate=1e-3, threads=2)
    result = train_lora(toy_pairs(30, 1), toy_pairs(9, 2), LABELS, out, config,
                        student_format="Classify: {input}", progress=lambda s, t: steps.append((s, t)))
    return result, steps


def test_training_saves_a_loadable_student(trained):
    result, steps = trained
    m = result.metrics
    for key in ("val_agreement", "best_epoch", "epochs_run", "train_seconds", "train_tokens",
                "train_tokens_per_s", "train_examples"):
        assert key in m
    assert 0.0 <= m["val_agreement"] <= 1.0
    assert 1 <= m["best_epoch"] <= m["epochs_run"] <= 2
    # The best epoch: the highest validation agreement, the later on ties; log-loss recorded beside it.
    agreements, losses = m["val_agreement_by_epoch"], m["val_log_loss_by_epoch"]
    assert len(agreements) == len(losses) == m["epochs_run"] and all(loss > 0 for loss in losses)
    assert m["best_epoch"] == len(agreements) - agreements[::-1].index(max(agreements))  # ties: the later
    assert m["train_examples"] == 30 and m["train_tokens"] > 30 * 8 and m["train_tokens_per_s"] > 0
    assert steps and steps[0] == (1, 8) and [s for s, _ in steps] == list(range(1, len(steps) + 1))

    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "student.json"):
        assert (result.path / name).is_file(), name
    manifest = json.loads((result.path / "student.json").read_text())
    assert manifest["kind"] == "lora" and manifest["labels"] == LABELS
    assert manifest["student_format"] == "Classify: {input}" and manifest["config"]["rank"] == 4

    student = LoraStudent.load(result.path)
    assert student.kind == "lora" and student.labels == LABELS
    texts = [x for x, _ in toy_pairs(7, 3)] + ["", "<|im_end|> injected " * 40]
    predictions = student.predict(texts, batch_size=4)
    assert len(predictions) == len(texts)
    for p in predictions:
        assert p.label in LABELS
        assert abs(sum(p.probs.values()) - 1.0) < 1e-5
        assert p.confidence == p.probs[p.label] == max(p.probs.values())
    assert student.predict([]) == []


def test_label_probabilities_are_the_models_own_likelihoods(trained):
    """The one-pass batched scoring must equal scoring each prompt+label sequence on its own."""
    student = LoraStudent.load(trained[0].path)
    texts = ["apple near my house", "a very big old truck today i saw", "snow"]
    got = student.predict(texts, batch_size=3)
    fast = LoraStudent.load(trained[0].path)
    fast.model = fast.model.to(torch.bfloat16)  # what `precision: bf16` serves on a CPU
    for quick, exact in zip(fast.predict(texts, batch_size=3), got):  # rounding moves probabilities a little
        assert [quick.probs[label] for label in LABELS] == pytest.approx(
            [exact.probs[label] for label in LABELS], abs=0.02)
    tok = student.tokenizer
    for text, p in zip(texts, got):
        # SmolLM2's ChatML frame without its default system prompt, spelled out independently
        prompt = f"<|im_start|>user\nClassify: {text}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        scores = []
        for label in LABELS:
            answer = tok(label + "<|im_end|>", add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = student.model(torch.tensor([prompt_ids + answer])).logits[0].log_softmax(-1)
            scores.append(sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(answer)))
        expected = torch.stack(scores).softmax(-1).tolist()
        assert [p.probs[label] for label in LABELS] == pytest.approx(expected, abs=1e-4)


def test_training_learns_a_separable_task(tiny_model, tmp_path):
    # One keyword per text: a random 2-layer model learns this reliably within an epoch or two
    # (with filler words around the keyword it needs far more steps than a unit test should take).
    config = LoraConfig(base_model=str(tiny_model), rank=8, alpha=16, dropout=0.0, epochs=3,
                        batch_size=8, learning_rate=1e-2, threads=2)
    result = train_lora(toy_pairs(240, 4, fillers=0), toy_pairs(30, 5, fillers=0), LABELS, tmp_path,
                        config)
    assert result.metrics["val_agreement"] >= 0.9, result.metrics
    student = LoraStudent.load(tmp_path)
    held_out = toy_pairs(30, 6, fillers=0)
    predictions = student.predict([x for x, _ in held_out])
    accuracy = sum(p.label == y for p, (_, y) in zip(predictions, held_out)) / len(held_out)
    assert accuracy >= 0.9


def test_a_validation_tie_keeps_the_later_epoch(tiny_model, tmp_path):
    # A learning rate too small to move any answer: both epochs score alike on validation, and the
    # second (the annealed weights) is what stays on disk; training does not stop at the tie.
    config = LoraConfig(base_model=str(tiny_model), rank=4, alpha=8, epochs=2, batch_size=8,
                        learning_rate=1e-12, threads=2)
    result = train_lora(toy_pairs(16, 1), toy_pairs(9, 2), LABELS, tmp_path, config)
    m = result.metrics
    assert m["epochs_run"] == 2 and m["val_agreement_by_epoch"][0] == m["val_agreement_by_epoch"][1] < 1.0, m
    assert m["best_epoch"] == 2


def test_bf16_precision_stores_the_frozen_base_in_bf16_and_keeps_the_adapter_in_fp32(tiny_model, tmp_path):
    """`precision: bf16` on a CPU: the frozen base is loaded in bf16 (cast once, not autocast per call),
    the trainable LoRA weights stay fp32 for AdamW, and the saved student is served in bf16."""
    from stillroom.train import lora

    seen = {}
    real_load = lora._load_base

    def spy(base_dir, config, device):
        model = real_load(base_dir, config, device)
        seen["base"] = {p.dtype for p in model.parameters()}
        seen["attn"] = model.config._attn_implementation
        return model

    config = LoraConfig(base_model=str(tiny_model), rank=8, alpha=16, dropout=0.0, epochs=3,
                        batch_size=8, learning_rate=1e-2, threads=2, precision="bf16")
    lora._load_base = spy
    try:
        result = train_lora(toy_pairs(240, 4, fillers=0), toy_pairs(30, 5, fillers=0), LABELS, tmp_path, config)
    finally:
        lora._load_base = real_load
    assert seen == {"base": {torch.bfloat16}, "attn": "eager"}
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "adapter_model.safetensors")).values()} == {torch.float32}
    assert result.metrics["val_agreement"] >= 0.9, result.metrics
    student = LoraStudent.load(tmp_path)
    assert {p.dtype for p in student.model.parameters()} == {torch.bfloat16}
    held_out = toy_pairs(30, 6, fillers=0)
    predictions = student.predict([x for x, _ in held_out])
    assert all(abs(sum(p.probs.values()) - 1.0) < 1e-5 for p in predictions)
    assert sum(p.label == y for p, (_, y) in zip(predictions, held_out)) / len(held_out) >= 0.9
    assert lora.resolve_precision("auto", "cpu") == "fp32" and lora.resolve_precision("auto", "cuda") == "bf16"


def test_many_labels_are_pruned_by_their_first_token_with_the_same_argmax(tiny_model):
    """Above PRUNE_ABOVE_TOKENS, only the labels with the best first-token bounds are scored in full:
    the answer must be the one scoring every label gives, the labels scored in full must get their
    exact probabilities' numerators, and the winner's probability may only be under-stated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.train import lora

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    words = ["card", "cash", "top", "pin", "transfer", "refund", "rate", "fee", "atm", "age"]
    labels = [f"{a}_{b}" for a in words for b in words[:6] if a != b][:50]  # shared first tokens, like Banking77
    frame = lora._chat_frame(tokenizer)
    answers = lora._encode_answers(tokenizer, frame, labels)
    assert sum(len(a) - 1 for a in answers) > lora.PRUNE_ABOVE_TOKENS
    texts = [" ".join(random.Random(i).sample(FILLER, 1 + i % 6)) for i in range(24)]
    prompts = lora._encode_prompts(tokenizer, frame, texts, "{input}", 96)
    full = lora._label_probs(model, prompts, answers, 0, batch_size=8, prune=False)
    pruned = lora._label_probs(model, prompts, answers, 0, batch_size=8)  # pruning chosen by size
    assert torch.equal(pruned.argmax(1), full.argmax(1))
    assert torch.allclose(pruned.sum(1), torch.ones(len(texts)), atol=1e-5)
    best = full.argmax(1)
    assert (pruned[torch.arange(len(texts)), best] <= full[torch.arange(len(texts)), best] + 1e-5).all()
    with torch.inference_mode():
        exact = lora._label_logprobs(model, prompts[:4], answers, 0)
        some = lora._pruned_label_logprobs(model, prompts[:4], answers, 0, top=3)
    bounds = lora._first_token_logprobs(model, prompts[:4], 0)[:, [a[0] for a in answers]]
    scored = bounds >= bounds.topk(3, dim=1).values[:, -1:]  # the top 3 and every label tied with them
    assert scored.sum() > 4 * 3  # labels share first tokens, so ties are kept
    assert torch.allclose(some[scored], exact[scored], atol=1e-4)
    assert (exact <= bounds + 1e-5).all()  # the bound the pruning rests on
    with torch.inference_mode():  # one label in full: rows whose winner is unclear fall back to every label
        narrow = lora._pruned_label_logprobs(model, prompts, answers, 0, top=1)
        everything = lora._label_logprobs(model, prompts, answers, 0)
    assert torch.equal(narrow.argmax(1), everything.argmax(1))
    # The full scores reuse the first pass's KV cache; in bf16 (what `precision: bf16` serves on a
    # CPU, eager attention) they match recomputing the prompt to bf16's precision.
    half = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.inference_mode():
        exact = lora._label_logprobs(half, prompts[:4], answers, 0)
        some = lora._pruned_label_logprobs(half, prompts[:4], answers, 0, top=3)
        bounds = lora._first_token_logprobs(half, prompts[:4], 0)[:, [a[0] for a in answers]]
    scored = bounds >= bounds.topk(3, dim=1).values[:, -1:]
    assert torch.allclose(some[scored], exact[scored], atol=0.05)


def test_config_errors_name_the_field(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="base_model.*smollm2-135m-instruct"):
        LoraConfig(base_model="no-such-model")
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(base_model=str(tiny_model), rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(base_model=str(tiny_model), dropout=1.5)
    with pytest.raises(ValueError, match="rank.*hidden size"):
        train_lora(toy_pairs(6, 0), toy_pairs(3, 0), LABELS, tmp_path,
                   LoraConfig(base_model=str(tiny_model), rank=65))
    with pytest.raises(ValueError, match="not in the label set"):
        train_lora([("apple", "fruit"), ("car", "boat")], toy_pairs(3, 0), LABELS, tmp_path,
                   LoraConfig(base_model=str(tiny_model)))


@pytest.mark.slow
def test_real_smollm2_trains_and_predicts(tmp_path):
    config = LoraConfig(epochs=1, batch_size=8, learning_rate=5e-4)
    result = train_lora(toy_pairs(40, 7), toy_pairs(9, 8), LABELS, tmp_path, config)
    assert result.metrics["epochs_run"] == 1 and result.metrics["train_tokens_per_s"] > 0
    student = LoraStudent.load(tmp_path)
    predictions = student.predict(["I ate an apple", "The bus was late", "Heavy rain tonight"])
    assert all(p.label in LABELS and abs(sum(p.probs.values()) - 1) < 1e-5 for p in predictions)


def test_cpu_lora_dropout_drops_at_rate_p_independently_and_reproducibly():
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillroom.train.lora import _cpu_lora_dropout

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.25,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert _cpu_lora_dropout(model) == 4  # 2 layers x 2 target modules
    q, v = (model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"],
            model.base_model.model.model.layers[0].self_attn.v_proj.lora_dropout["default"])
    x = torch.ones(400, 250)
    model.train()
    torch.manual_seed(3)
    a, b = q(x), v(x)
    assert a.unique().tolist() == [0.0, pytest.approx(1 / 0.75)]  # inverted dropout: kept values scaled
    assert abs((a == 0).float().mean().item() - 0.25) < 0.01  # 100,000 draws: 4 standard errors is 0.0055
    # the two modules' masks are independent: both-dropped is p^2, not p
    assert abs(((a == 0) & (b == 0)).float().mean().item() - 0.0625) < 0.01
    lanes = (a == 0).view(-1, 4).float().mean(0)  # each 16-bit lane of the 64-bit draw drops at p
    assert torch.all((lanes - 0.25).abs() < 0.02), lanes
    torch.manual_seed(3)
    assert torch.equal(q(x), a)  # the seeded generator decides the mask, so a resume replays it
    model.eval()
    assert torch.equal(q(x), x)

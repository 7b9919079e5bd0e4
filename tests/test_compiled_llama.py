"""The compiled CPU training forward (compiled_llama) computes what the eager Llama model computes:
the same hidden states, the same LoRA gradients with the same dropout masks, the same trained weights."""

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from stillroom.config import StudentConfig  # noqa: E402
from stillroom.train import compiled_llama, fused_lora  # noqa: E402
from stillroom.train.lora import LoraConfig, _cpu_lora_dropout, train_lora  # noqa: E402

TARGETS = ("q_proj", "v_proj", "down_proj")  # adapted and plain projections both in every layer
LABELS = ["fruit", "vehicle", "weather"]


def adapted(base_dir, dropout=0.25, **lora_kwargs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                      target_modules=list(TARGETS), task_type="CAUSAL_LM",
                                                      **lora_kwargs))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong gradient for A
            torch.nn.init.normal_(param, std=0.1)
    _cpu_lora_dropout(model)
    fused_lora.fuse(model)
    return model


def hidden_and_grads(model, forward, ids, real):
    model.train()
    torch.manual_seed(7)  # the same dropout masks on both sides
    hidden = forward(ids)
    (hidden[real].float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return hidden[real].detach(), grads


def test_compiled_forward_matches_the_eager_model_on_a_right_padded_batch(tiny_llama_dir):
    model = adapted(tiny_llama_dir)
    lm = model.get_base_model()
    assert compiled_llama.unsupported(lm, model) is None
    decoder = lm.get_decoder()
    compiled = compiled_llama.CompiledDecoder(lm, pad_id=2)
    # one compiled function per model shape: a sweep's runs in one process do not recompile
    assert compiled_llama.CompiledDecoder(lm, pad_id=2).layer is compiled.layer
    rng_before = torch.get_rng_state()
    compiled.warm_up()
    assert torch.equal(torch.get_rng_state(), rng_before)  # compiling draws no training mask
    assert all(p.grad is None for p in model.parameters())

    ids = torch.randint(3, 1000, (3, 9))
    ids[1, 5:] = 2  # right padding, as the training batches have
    real = torch.ones(3, 9, dtype=torch.bool)
    real[1, 5:] = False
    eager = hidden_and_grads(model, lambda x: decoder(input_ids=x, attention_mask=real.long()).last_hidden_state,
                             ids, real)
    import torch._dynamo as dynamo

    with dynamo.config.patch(error_on_recompile=True):  # other batch and length than warm_up's
        fast = hidden_and_grads(model, compiled.hidden, ids, real)
    torch.testing.assert_close(fast[0], eager[0], rtol=1e-4, atol=1e-4)
    assert sorted(fast[1]) == sorted(eager[1]) and len(eager[1]) == 2 * 2 * len(TARGETS)
    for name, grad in eager[1].items():
        assert ((fast[1][name] - grad).norm() / grad.norm()).item() < 1e-3, name  # fp32, fused reordering

    other_masks = hidden_and_grads(model, compiled.hidden, ids, real)  # same seed: the same masks again
    torch.testing.assert_close(other_masks[0], fast[0], rtol=0, atol=0)
    one = ids[:1]  # a single row is padded to two inside, not compiled again
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled.hidden(one, training=False),
                                   decoder(input_ids=one).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_models_the_compiled_layer_does_not_cover_are_named(tiny_llama_dir):
    model = adapted(tiny_llama_dir)
    lm = model.get_base_model()
    lm.config.mlp_bias = True
    assert "biases" in compiled_llama.unsupported(lm, model)
    lm.config.mlp_bias, lm.config.model_type = False, "qwen2"
    assert "qwen2" in compiled_llama.unsupported(lm, model)
    dora = adapted(tiny_llama_dir, use_dora=True)
    assert "q_proj" in compiled_llama.unsupported(dora.get_base_model(), dora)


def toy_rows(n, seed):
    import random

    words = {"fruit": "apple banana cherry", "vehicle": "car truck bus", "weather": "rain snow wind"}
    rng = random.Random(seed)
    return [(f"i saw {rng.choice(words[y].split())} today", y) for y in (LABELS[i % 3] for i in range(n))]


def test_a_compiled_run_trains_the_eager_runs_weights(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    def train(name, compile):
        config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, alpha=8, dropout=0.25, epochs=1,
                            batch_size=4, learning_rate=1e-3, threads=2, target_modules=TARGETS,
                            compile=compile)
        result = train_lora(toy_rows(10, 1), toy_rows(6, 2), LABELS, tmp_path / name, config)
        return result.metrics, load_file(tmp_path / name / "adapter_model.safetensors")

    compiled_metrics, compiled_weights = train("compiled", True)
    eager_metrics, eager_weights = train("eager", False)
    assert compiled_metrics["compiled"] is True and eager_metrics["compiled"] is False
    assert "compile_skipped" not in eager_metrics  # turned off, not skipped
    assert sorted(compiled_weights) == sorted(eager_weights)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5)

    auto_metrics, _ = train("auto", "auto")  # 3 steps: compiling would not pay for itself
    assert auto_metrics["compiled"] is False and "steps" in auto_metrics["compile_skipped"]


def test_compile_settings_that_cannot_apply_are_config_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="compile"):
        LoraConfig(base_model=str(tiny_llama_dir), compile="yes")
    with pytest.raises(ValueError, match="compile: true applies to kind 'lora'"):
        StudentConfig(name="enc", kind="encoder", compile=True)
    with pytest.raises(ValueError, match="compile: true applies to kind 'lora'"):
        StudentConfig(name="ft", kind="full", base_model=str(tiny_llama_dir), compile=True)
    config = LoraConfig(base_model=str(tiny_llama_dir), full=True, epochs=1, compile=True)
    with pytest.raises(ValueError, match="LoRA students on a CPU"):
        train_lora(toy_rows(4, 1), toy_rows(3, 2), LABELS, tmp_path, config)

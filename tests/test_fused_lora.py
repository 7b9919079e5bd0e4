"""The CPU training path's fused LoRA layer computes what peft's layers compute, gradients included."""

import copy

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from stillroom.train import fused_lora  # noqa: E402
from stillroom.train.lora import _cpu_lora_dropout  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_peft(dtype, dropout=0.25, **lora_kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).to(dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM", **lora_kwargs))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide a wrong gradient for A
            torch.nn.init.normal_(param, std=0.1)
    _cpu_lora_dropout(model)
    return model


def loss_and_grads(model, ids, seed=5):
    model.train()
    torch.manual_seed(seed)  # the same dropout masks on both sides
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_fused_layers_match_peft_in_loss_gradients_and_eval(dtype, tolerance):
    dtype = getattr(torch, dtype)
    reference = tiny_peft(dtype)
    fused = copy.deepcopy(reference)
    assert fused_lora.fuse(fused) == 6  # 2 layers x 3 target modules
    ids = torch.randint(0, 64, (3, 7))
    loss_ref, grads_ref = loss_and_grads(reference, ids)
    loss_fused, grads_fused = loss_and_grads(fused, ids)
    assert loss_fused == pytest.approx(loss_ref, rel=tolerance)
    assert sorted(grads_fused) == sorted(grads_ref) and len(grads_ref) == 12  # only the adapters get gradients
    for name, grad in grads_ref.items():
        # fp32: the same arithmetic; bf16: the adapter's products run in bf16 rather than peft's fp32
        assert ((grads_fused[name] - grad).norm() / grad.norm()).item() < tolerance, name
    reference.eval(), fused.eval()
    with torch.no_grad():  # eval: no dropout, and the same logits
        torch.testing.assert_close(fused(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=tolerance, atol=tolerance)


def test_dropout_masks_follow_the_seed_and_differ_between_steps():
    model = tiny_peft(torch.float32)
    fused_lora.fuse(model)
    ids = torch.randint(0, 64, (2, 9))
    first, again = loss_and_grads(model, ids, seed=1)[0], loss_and_grads(model, ids, seed=1)[0]
    other = loss_and_grads(model, ids, seed=2)[0]
    assert first == again != other  # a resumed run replays its masks from torch's generator state


def test_layers_peft_handles_differently_keep_peft_forward():
    dora = tiny_peft(torch.float32, use_dora=True)
    assert fused_lora.fuse(dora) == 0  # DoRA rescales by the weight norm: not this formula
    plain_dropout = tiny_peft(torch.float32, dropout=0.0)
    assert fused_lora.fuse(plain_dropout) == 6  # no dropout is nn.Identity, which fuses
    model = tiny_peft(torch.float32)
    fused_lora.fuse(model)
    model.eval()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        with model.disable_adapter():  # falls back to peft's forward: the base model alone
            disabled = model(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.zero_()
        base_only = model(input_ids=ids).logits
    torch.testing.assert_close(disabled, base_only)
    assert not torch.allclose(adapted, base_only)

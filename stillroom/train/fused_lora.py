"""A fused forward and backward for peft's LoRA linear layers, used when a LoRA trains on a CPU.

Why hand-written: peft runs a LoRA branch as separate modules (dropout, `lora_A`, `lora_B`, a
scaling multiply, an add, casts between the frozen weights' dtype and the adapter's fp32), and
autograd records each. On a CPU whose matrix products are fast (bf16 on Intel AMX: about 1.8
TFLOP/s on 2 cores for SmolLM2's projections, against ~0.35 in fp32), those elementwise passes
over [tokens x features] tensors cost more than the products. Profiled (SmolLM2-135M, rank 16 on
all seven projections, batch 8, bf16 weights): matrix products were 28% of a step, casts 17%,
multiplies 17%, adds 8%.

Here one autograd function per layer computes

    y = x W^T + b + s * ((x * keep) A^T) B^T

with the adapter cast once to the compute dtype, the scaling folded into `addmm`, and a backward
written out: dx = g W + s * ((g B) A) * keep, dA = s * (g B)^T (x * keep), dB = s * g^T ((x * keep) A^T).
The dropout mask is `lora._MaskDropout`'s draw (one 64-bit word per four elements, decided by
torch's seeded generator, so a resumed run replays it), kept as exact 0/1 in the compute dtype
with the inverted-dropout factor 1/(1-p) folded into s. Layers this does not cover (DoRA and
other variants, several adapters, a trainable base weight, merged or disabled adapters) keep peft's
own forward.
"""

from __future__ import annotations

import types


def _fn():
    import torch

    class FusedLora(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, keep):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            xd = x2 if keep is None else x2 * keep.reshape(x2.shape)
            h = xd @ a.t()  # [tokens, rank]
            y = torch.nn.functional.linear(x2, weight, bias)
            y.addmm_(h, b.t(), alpha=scale)
            ctx.save_for_backward(weight, a, b, xd, h, None if keep is None else keep.reshape(x2.shape))
            ctx.scale, ctx.shape, ctx.dtypes = scale, shape, (lora_a.dtype, lora_b.dtype)
            return y.view(*shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            weight, a, b, xd, h, keep = ctx.saved_tensors
            g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
            gb = g @ b  # [tokens, rank]
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[4]:
                grad_b = (g.t() @ h).to(ctx.dtypes[1]).mul_(ctx.scale)
            if ctx.needs_input_grad[3]:
                grad_a = (gb.t() @ xd).to(ctx.dtypes[0]).mul_(ctx.scale)
            if ctx.needs_input_grad[0]:
                lora = gb @ a
                if keep is not None:
                    lora.mul_(keep)
                grad_x = torch.addmm(lora, g, weight, beta=ctx.scale).view(ctx.shape)
            return grad_x, None, None, grad_a, grad_b, None, None

    return FusedLora


_FUSED = None


def mask_and_scale(module, adapter: str, x_shape, dtype, training: bool):
    """(dropout keep mask or None, branch scale) of a LoRA linear's adapter for an input of `x_shape`:
    the mask is 0/1 in `dtype` (`lora._MaskDropout`'s draw) and the inverted-dropout factor 1/(1-p)
    is folded into the scale. Shared by the fused layer and compiled_llama, so both draw alike."""
    dropout, scale = module.lora_dropout[adapter], float(module.scaling[adapter])
    if not training or getattr(dropout, "p", 0) == 0:
        return None, scale
    return dropout.mask(x_shape, dtype, module.lora_A[adapter].weight.device), scale / (1.0 - dropout.p)


def _fused_forward(self, x, *args, **kwargs):
    """peft `lora.Linear.forward` for one vanilla adapter, as a single autograd function."""
    global _FUSED
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or self.base_layer.weight.requires_grad
            or (self.base_layer.bias is not None and self.base_layer.bias.requires_grad)):
        return self._peft_forward(x, *args, **kwargs)
    if _FUSED is None:
        _FUSED = _fn()
    keep, scale = mask_and_scale(self, adapter, x.shape, x.dtype, self.training)
    return _FUSED.apply(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight,
                        self.lora_B[adapter].weight, scale, keep)


def fuse(model) -> int:
    """Give every vanilla single-adapter LoRA linear of `model` the fused forward; returns how many.

    A layer qualifies when its adapter has no variant (DoRA), no LoRA bias, and its dropout is
    either off (`nn.Identity`) or `lora._MaskDropout`; a standard `nn.Dropout` would draw its mask
    differently, so such layers are left to peft."""
    import torch
    from peft.tuners.lora.layer import Linear

    fused = 0
    for module in model.modules():
        if not isinstance(module, Linear) or not isinstance(module.base_layer, torch.nn.Linear):
            continue
        if len(module.lora_A) != 1 or getattr(module, "lora_variant", {}):
            continue
        name = next(iter(module.lora_A))
        dropout = module.lora_dropout[name]
        if module.lora_B[name].bias is not None or not (isinstance(dropout, torch.nn.Identity)
                                                         or hasattr(dropout, "mask")):
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused

"""A compiled training forward for LoRA students of Llama-architecture bases on a CPU.

Why: on 2 CPU cores a training step of SmolLM2-135M spends more time in the ~3,000 small
operators around the matrix products (norms, rotary embeddings, attention's softmax, SiLU, the
residual adds, the dropout masks' casts) than in the products of a bf16 step, and each of them
makes a pass over memory. `torch.compile` of the whole Hugging Face decoder was slower here (graph
breaks, a recompile per layer); this module compiles one plain function, a decoder layer with
its LoRA branches written out, that every layer calls with its own weights as arguments. Inductor
fuses the elementwise work of the forward and of the backward it derives into a few C++ loops
and leaves the products to the same kernels as eager. Two choices measured on the compiled bf16
forward+backward (side by side, 8 batch widths): the model's widths are compiled as constants and
only batch, length and LoRA rank as symbols (`_dynamic`), 9-12% faster than `dynamic=True`, whose
symbolic head sizes left Inductor's loops with unknown bounds; and q|k|v and gate|up each run as one
product with a concatenated copy of the frozen weights (~65% of the layers' frozen weights again:
140 MB for SmolLM2-135M in bf16), a further ~3-5% (the products alone: ~12% less time).

Measured side by side (`bench/run train_speed`, 2 cores, rank 16 on all seven projections, dropout
0.05): 1.20x the eager path's training tokens/s in fp32 and 1.45x with bf16 weights. Compiling
costs 16-22 s in a machine's first process and 3-10 s later (Inductor's on-disk cache), so
`compile: auto` turns it on only for runs long enough to repay it.

The computation is the Hugging Face Llama layer's (`LlamaDecoderLayer`: RMSNorm in fp32,
rotary embeddings from the model's own `rotary_emb`, causal attention with the softmax in fp32,
SwiGLU MLP), with each adapted projection computed as fused_lora's `x W^T + s ((x * keep) A^T) B^T`.
The dropout masks are drawn outside the compiled code by the same `_MaskDropout` draws, in the
modules' own order (q, k, v, o, gate, up, down), so with the same seed a step's masks, loss and
gradients equal the eager path's (fp32: to rounding; tests/test_compiled_llama.py). Training
batches are right-padded, so causal attention alone keeps every real token from seeing padding;
padded positions compute values nothing reads.
"""

from __future__ import annotations

import functools

from stillroom.train import fused_lora

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
# `compile: auto` below this: 0.15-0.22 s saved per batch-8 step does not repay a cold compile (16-22 s)
AUTO_MIN_STEPS = 200


def unsupported(lm, model) -> str | None:
    """Why the compiled forward cannot run this LoRA model, or None when it can."""
    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    cfg = lm.config
    if getattr(cfg, "model_type", None) != "llama":
        return f"the base is a {getattr(cfg, 'model_type', '?')!r} model; the compiled forward covers Llama's layer only"
    checks = [
        (getattr(cfg, "hidden_act", None) == "silu", "hidden_act is not silu"),
        (not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False), "the projections have biases"),
        (not getattr(cfg, "attention_dropout", 0.0), "attention dropout is on"),
        (getattr(cfg, "pretraining_tp", 1) == 1, "pretraining_tp is not 1"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    for layer in lm.get_decoder().layers:
        for part, name in PROJECTIONS:
            module = getattr(getattr(layer, part), name)
            if isinstance(module, LoraLinear):
                if len(module.lora_A) != 1 or getattr(module, "lora_variant", {}) or module.merged \
                        or module.disable_adapters or not isinstance(module.base_layer, torch.nn.Linear):
                    return f"{name} is not a single plain LoRA adapter"
                adapter = next(iter(module.lora_A))
                dropout = module.lora_dropout[adapter]
                if module.lora_B[adapter].bias is not None \
                        or not (isinstance(dropout, torch.nn.Identity) or hasattr(dropout, "mask")):
                    return f"{name}'s LoRA has a bias or a standard dropout"
                if module.base_layer.weight.requires_grad:
                    return f"{name}'s base weight trains"
            elif not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
                return f"{name} is neither a frozen linear nor a LoRA linear"
    return None


def _layer_function(heads: int, kv_heads: int, head_dim: int, eps: float, intermediate: int):
    """One decoder layer as a function of its input, rotary tables and weights (compiled once,
    shared by every layer). `weights`: (q|k|v concatenated, o, gate|up concatenated, down)."""
    import torch
    import torch.nn.functional as F

    splits = {3: [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 2: [intermediate, intermediate]}

    def rms_norm(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight

    def project(x, weight, lora):
        y = F.linear(x, weight)
        return y if lora is None else y + lora_delta(x, lora)

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def lora_delta(x, lora):
        a, b, scale, keep = lora
        xd = x if keep is None else x * keep
        return F.linear(F.linear(xd, a.to(x.dtype)), b.to(x.dtype)) * scale

    def projections(x, weight, loras):
        """The products of `x` with row blocks of one concatenated frozen weight (q|k|v, gate|up),
        each with its own LoRA branch: one larger product is faster than several (see module doc)."""
        ys = list(F.linear(x, weight).split(splits[len(loras)], dim=-1))
        return [y if lora is None else y + lora_delta(x, lora) for y, lora in zip(ys, loras)]

    def layer(h, cos, sin, norms, weights, loras):
        b, t, _ = h.shape
        x = rms_norm(h, norms[0])
        q, k, v = projections(x, weights[0], loras[:3])
        q = q.view(b, t, heads, head_dim).transpose(1, 2)
        k = k.view(b, t, kv_heads, head_dim).transpose(1, 2)
        v = v.view(b, t, kv_heads, head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ k.transpose(2, 3)) * head_dim ** -0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attended = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        h = h + project(attended.transpose(1, 2).reshape(b, t, heads * head_dim), weights[1], loras[3])
        x = rms_norm(h, norms[1])
        gate, up = projections(x, weights[2], loras[4:6])
        return h + project(F.silu(gate) * up, weights[3], loras[6])

    return layer


@functools.lru_cache(maxsize=None)
def _compiled_layer(heads: int, kv_heads: int, head_dim: int, eps: float, intermediate: int):
    """The compiled layer function, one per model shape and process: a sweep's runs in one process
    share it, where a fresh closure per run would count as a recompile (Dynamo gives up after 8)."""
    import torch

    return torch.compile(_layer_function(heads, kv_heads, head_dim, eps, intermediate), dynamic=False)


def _dynamic(tensor, *dims) -> None:
    """Compile `tensor`'s `dims` (batch, length, LoRA rank) for any size above 1. Every other size is
    compiled as the constant it is (the model's widths and head sizes), which lets Inductor index
    and vectorize its loops with known bounds: 9-12% less time for the compiled bf16 forward and
    backward than `dynamic=True`, measured side by side on SmolLM2-135M."""
    import torch._dynamo

    for dim in dims:
        if tensor.shape[dim] > 1:
            torch._dynamo.mark_dynamic(tensor, dim)


class CompiledDecoder:
    """`hidden(ids)`: the decoder's last hidden state (after the final norm) for right-padded `ids`,
    through the compiled layer function, with the LoRA dropout masks of a training step."""

    def __init__(self, lm, pad_id: int, compiled: bool = True):
        self.decoder, self.pad_id = lm.get_decoder(), pad_id
        cfg = lm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
                 cfg.intermediate_size)
        self.layer = _compiled_layer(*shape) if compiled else _layer_function(*shape)
        self.modules = [[getattr(getattr(layer, part), name) for part, name in PROJECTIONS]
                        for layer in self.decoder.layers]
        self.weights = [self._frozen_weights(modules) for modules in self.modules]
        for module in (m for modules in self.modules for m in modules if hasattr(m, "lora_A")):
            adapter = next(iter(module.lora_A))  # the rank: a sweep over ranks shares one compiled graph
            _dynamic(module.lora_A[adapter].weight, 0)
            _dynamic(module.lora_B[adapter].weight, 1)

    @staticmethod
    def _frozen_weights(modules):
        """A layer's frozen projection weights as the compiled layer takes them: q|k|v and gate|up
        concatenated into one weight each (copies: the frozen weights never change during training,
        and the model keeps its own for evaluation and export), o and down as they are."""
        import torch

        w = [getattr(m, "base_layer", m).weight for m in modules]
        with torch.no_grad():
            return (torch.cat(w[:3]), w[3], torch.cat(w[4:6]), w[6])

    @staticmethod
    def _lora(module, x_shape, dtype, training: bool):
        """(A, B, scale, keep) of a LoRA linear for an input of `x_shape`; None for a plain linear."""
        if not hasattr(module, "lora_A"):
            return None
        adapter = next(iter(module.lora_A))
        keep, scale = fused_lora.mask_and_scale(module, adapter, x_shape, dtype, training)
        return module.lora_A[adapter].weight, module.lora_B[adapter].weight, scale, keep

    def hidden(self, ids, training: bool = True):
        import torch

        if ids.shape[0] == 1 or ids.shape[1] == 1:  # a size-1 batch or length would compile apart: pad it
            padded = torch.full((max(2, ids.shape[0]), max(2, ids.shape[1])), self.pad_id, dtype=ids.dtype,
                                device=ids.device)
            padded[:ids.shape[0], :ids.shape[1]] = ids
            return self.hidden(padded, training)[:ids.shape[0], :ids.shape[1]]
        decoder = self.decoder
        h = decoder.embed_tokens(ids)
        positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        cos, sin = decoder.rotary_emb(h, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if training:
            h = h.detach().requires_grad_()  # every layer's input alike, so one compiled graph serves all
        b, t, _ = h.shape
        _dynamic(h, 0, 1)
        _dynamic(cos, 0, 2)
        _dynamic(sin, 0, 2)
        for layer, modules, weights in zip(decoder.layers, self.modules, self.weights):
            # masks drawn in the order the eager modules draw them: q, k, v, o, gate, up, down
            loras = [self._lora(m, (b, t, getattr(m, "base_layer", m).weight.shape[1]), h.dtype, training)
                     for m in modules]
            for lora in loras:
                if lora is not None and lora[3] is not None:
                    _dynamic(lora[3], 0, 1)  # a fresh mask each step (the weights are marked once, above)
            h = self.layer(h, cos, sin, (layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
                           weights, loras)
        return decoder.norm(h)

    def warm_up(self) -> None:
        """Compile the forward and its backward on a dummy batch now, so a missing C++ compiler or an
        Inductor failure shows before training starts; leaves the RNG and the gradients as they were."""
        import torch

        state = torch.get_rng_state()
        try:
            ids = torch.full((2, 8), self.pad_id, dtype=torch.long, device=self.decoder.embed_tokens.weight.device)
            self.hidden(ids).float().sum().backward()
        finally:
            torch.set_rng_state(state)
            for module in (m for modules in self.modules for m in modules):
                for p in module.parameters():
                    p.grad = None

"""LoRA training speed on the CPU: stillroom's recipe against TRL's SFTTrainer, side by side.

Both train SmolLM2-135M-Instruct with the same LoRA (r 16, alpha 32, dropout 0.05 on
q/k/v/o/gate/up/down), batch 8, learning rate 3e-4, 2 torch threads, on the same rows of the bundled
support-intents example, framed identically (`<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>
assistant\\n{label}<|im_end|>`, checked token for token) with the loss on the answer tokens only
(TRL: a prompt/completion dataset, `completion_only_loss=True`). SFTConfig defaults that differ from
our recipe are set to match it: no gradient checkpointing. What stays TRL's own: random
batches (padded to the longest row), its fused AdamW, its chunked LM head, which on the CPU
(no Triton) scores every position against the whole vocabulary and masks the prompt afterwards,
and peft's `nn.Dropout` on the LoRA branches (ours draws the same p = 0.05 dropout's masks 16 bits
at a time, `lora._cpu_lora_dropout`, and runs each LoRA layer as one autograd function,
`fused_lora`). Ours runs twice per precision: with the compiled training forward (`compiled_llama`,
what `compile: auto` picks for runs of 200+ steps; the headline) and without it (`-eager`).

Precision is measured both ways where the CPU has native bf16 (AVX-512 BF16 or AMX): each trainer
in fp32, and each in bf16 with the same model: frozen base weights stored in bf16, eager attention,
LoRA weights fp32 (ours: `precision="bf16"`; TRL: the model loaded with `dtype=torch.bfloat16` and
`bf16=True`). A CPU without it (AVX2 only) emulates bf16 products, ~7x slower than fp32, so there
only fp32 runs. Both defaults on a CPU are fp32, so `speedup_fp32_vs_fp32` is the headline.

A fourth segment per round, `products-floor-fp32`, times only the essential fp32 matrix products
of the same batches (every frozen projection's forward and input-gradient product over the real
tokens, the LM head's over the answer tokens) at this CPU's BLAS speed: `fp32_ceiling_vs_trl` is
how far any exact fp32 trainer could get ahead of TRL here, and `fp32_share_of_products_floor`
how close each trainer comes to that floor. The 3x goal means different things on different CPUs.

Tokens/s counts the same thing on both sides: non-padding tokens (prompt + answer) of the examples
in the timed steps, divided by the wall time of those steps. A segment is one fresh process that
loads the model and runs 3 warm-up + 20 timed optimizer steps (quick: 2 + 6), one epoch over a row
sample; the timed window runs from the end of the last warm-up step to the end of the last step
(ours: the `progress` callback of `train_lora`, called after each optimizer step; TRL: a callback's
`on_step_end`), so setup, model loading and validation are outside it and batch building is inside
it on both sides. Segments alternate ABBA (stillroom, TRL, TRL, stillroom, ...), each round giving
both trainers the same rows, so a neighbour's load on the shared cores hits both alike; each segment
records the Linux CPU pressure over its window, and a round where it passed 5% (a neighbour's burst,
not the trainer) is redone, at most three times, after waiting for the cores to go quiet.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.common import ROOT, hardware, write_result

DATA = ROOT / "examples" / "support-intents" / "data" / "messages.jsonl"
BATCH, LR, THREADS = 8, 3e-4, 2
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CONTENDED, MAX_TRIES = 0.05, 3  # a round is redone when a segment's window had > 5% CPU pressure
BEFORE, AFTER, EOT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"


def _pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows]


def _sample(pairs, n: int, seed: int):
    return random.Random(seed).sample(pairs, n)


def _expected_ids(tokenizer, rows, labels):
    """The token ids our recipe trains on, per row: (prompt ids, answer ids)."""
    from stillroom.train import lora

    frame = lora._chat_frame(tokenizer)
    prompts = lora._encode_prompts(tokenizer, frame, [x for x, _ in rows], "{input}", 96)
    answers = lora._encode_answers(tokenizer, frame, labels)
    index = {label: j for j, label in enumerate(labels)}
    return prompts, [answers[index[y]] for _, y in rows]


def _cpu_pressure_us() -> int | None:
    """Microseconds some runnable task waited for a CPU (Linux PSI): how contended the shared cores were."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1])


def _window(ends: list[float], tokens: list[int], stalls: list[int | None], warmup: int) -> dict:
    """Tokens/s over the steps after `warmup`, timed from the end of the last warm-up step."""
    seconds = ends[-1] - ends[warmup - 1]
    timed = sum(tokens[warmup:])
    step_s = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    stalled = None if stalls[-1] is None else round((stalls[-1] - stalls[warmup - 1]) / 1e6 / seconds, 3)
    return {"timed_steps": len(ends) - warmup, "seconds": round(seconds, 3), "tokens": timed,
            "tokens_per_s": round(timed / seconds, 1),
            # robust to a neighbour's burst: the median of the per-step rates
            "tokens_per_s_median_step": round(statistics.median(t / d for t, d in zip(tokens[warmup:], step_s)), 1),
            "step_ms_median": round(1000 * statistics.median(step_s), 1),
            "cpu_pressure": stalled}  # share of the window some task waited for a CPU (0 = quiet machine)


def _stillroom_segment(rows, labels, warmup: int, seed: int, precision: str = "fp32", compile: bool = True) -> dict:
    """One `train_lora` run over `rows` (one epoch, len(rows) / BATCH steps), timed per step. `compile`:
    the compiled training forward (what `compile: auto` picks for a run of 200+ steps; compiling
    happens before the first step, outside the timed window, and is reported as compile_seconds)."""
    import torch
    from transformers import AutoTokenizer

    from stillroom.models import smollm2_hf_dir
    from stillroom.train import lora

    base = smollm2_hf_dir()
    ends: list[float] = []
    stalls: list[int | None] = []

    def progress(step, total):
        ends.append(time.perf_counter())
        stalls.append(_cpu_pressure_us())

    config = lora.LoraConfig(base_model=str(base), rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                             target_modules=tuple(LORA["target_modules"]), learning_rate=LR, epochs=1,
                             batch_size=BATCH, seed=seed, threads=THREADS, precision=precision,
                             compile=compile)
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as out:
        result = lora.train_lora(rows, rows[:BATCH], labels, Path(out), config, progress=progress)
    assert torch.get_num_threads() == THREADS
    # The recipe's own batches, rebuilt with its seed, give each step's tokens (checked against its count).
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts, answers = _expected_ids(tokenizer, rows, labels)
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    batches = lora._length_bucketed_batches(lengths, BATCH, random.Random(seed))
    tokens = [sum(lengths[i] for i in b) for b in batches]
    if sum(tokens) != result.metrics["train_tokens"] or len(ends) != len(batches):
        raise RuntimeError("rebuilt batches do not match the recipe's own token count")
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches[warmup:])
    answer_tokens = sum(len(answers[i]) for b in batches[warmup:] for i in b)
    if result.metrics["compiled"] != compile:
        raise RuntimeError(f"compile={compile} but the run says compiled={result.metrics['compiled']}: "
                           f"{result.metrics.get('compile_skipped')}")
    return {"trainer": f"stillroom-{precision}" + ("" if compile else "-eager"), **_window(ends, tokens, stalls, warmup),
            "compile_seconds": result.metrics.get("compile_seconds"),
            "padding_efficiency": round(sum(tokens[warmup:]) / padded, 3),
            "answer_tokens": answer_tokens, "recipe_train_tokens_per_s": result.metrics["train_tokens_per_s"]}


def _trl_segment(rows, labels, warmup: int, seed: int, precision: str = "fp32") -> dict:
    """One SFTTrainer run over `rows` (one epoch, max_steps = len(rows) / BATCH), timed per step."""
    import datasets
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stillroom.models import smollm2_hf_dir

    datasets.disable_progress_bars()
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    base = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    # bf16: the same model as ours, weights stored in bf16 with eager attention (a TRL user's
    # `dtype=torch.bfloat16` model plus `bf16=True`); fp32: fp32 weights, default attention.
    model = (AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="eager")
             if precision == "bf16" else AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    # The folder is a de-quantized GGUF whose config.json still names the GGUF quantizer, so the HF
    # Trainer would refuse it as "quantized"; its weights are plain fp32 nn.Linear, as our recipe sees them.
    model.hf_quantizer, model.is_quantized = None, False
    dataset = Dataset.from_list([{"prompt": f"{BEFORE}{x}{AFTER}", "completion": f"{y}{EOT}"} for x, y in rows])
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append({"begin": time.perf_counter()})

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1]["end"] = time.perf_counter()
            steps[-1]["stall"] = _cpu_pressure_us()

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            steps[-1].update(tokens=int(inputs["attention_mask"].sum()), padded=inputs["input_ids"].numel(),
                             answer=int((inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory(prefix="bench-train-speed-trl-") as out:
        args = SFTConfig(
            output_dir=out, use_cpu=True, bf16=precision == "bf16", fp16=False, gradient_checkpointing=False,
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, max_steps=len(rows) // BATCH,
            learning_rate=LR, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, packing=False, completion_only_loss=True, seed=seed,
        )
        peft_config = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                     peft_config=peft_config, callbacks=[Timer()])
        # Same tokens as our recipe, and the loss on the same (answer) tokens: checked, not assumed.
        prompts, answers = _expected_ids(tokenizer, rows, labels)
        expected = {tuple(p + a): len(a) for p, a in zip(prompts, answers)}
        for ids, lab in zip(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]):
            if expected.get(tuple(ids)) != sum(t != -100 for t in lab):
                raise RuntimeError("TRL tokenized an example differently from the stillroom recipe")
        trainer.train()
        assert torch.get_num_threads() == THREADS
        optim = str(trainer.args.optim)
    ends = [s["end"] for s in steps]
    tokens = [s["tokens"] for s in steps]
    compute = sum(s["end"] - s["begin"] for s in steps[warmup:])
    return {"trainer": f"trl-{precision}", **_window(ends, tokens, [s["stall"] for s in steps], warmup),
            "padding_efficiency": round(sum(tokens[warmup:]) / sum(s["padded"] for s in steps[warmup:]), 3),
            "answer_tokens": sum(s["answer"] for s in steps[warmup:]),
            "tokens_per_s_step_begin_to_end": round(sum(tokens[warmup:]) / compute, 1), "optim": optim}


def _products_floor_segment(rows, labels, warmup: int, seed: int) -> dict:
    """The time the essential matrix products of our timed steps take alone, at this CPU's BLAS speed:
    every frozen projection's forward and input-gradient product over the real (unpadded) tokens
    of each batch, plus the LM head's on the answer tokens, with SmolLM2's weight shapes. Attention's
    own products, LoRA's rank-16 products and every elementwise operation are left out, so no exact
    fp32 trainer of this model and data gets far below this time on this CPU (one could skip the last
    layer's query/output/MLP products at prompt positions: ~2-3% of these products)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoTokenizer

    from stillroom.models import smollm2_hf_dir
    from stillroom.train import lora

    torch.set_num_threads(THREADS)
    base = smollm2_hf_dir()
    cfg = AutoConfig.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts, answers = _expected_ids(tokenizer, rows, labels)
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
    batches = lora._length_bucketed_batches(lengths, BATCH, random.Random(seed))
    d, ff, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    # (input width, output width) of each layer's products: q|k|v, o, gate|up, down
    shapes = [(d, d + 2 * kv), (d, d), (d, 2 * ff), (ff, d)]
    weights = {s: torch.randn(s[1], s[0]) * 0.02 for s in shapes}
    head = torch.randn(cfg.vocab_size, d) * 0.02

    # inputs made once at the largest batch and sliced (contiguous rows), so only the products are timed
    most = max(sum(lengths[i] for i in b) for b in batches)
    inputs = {width: torch.randn(most, width) for width in {w for shape in shapes for w in shape} | {cfg.vocab_size}}

    def step(batch) -> None:
        n = sum(lengths[i] for i in batch)
        for _ in range(cfg.num_hidden_layers):
            for (din, dout), w in weights.items():
                F.linear(inputs[din][:n], w)  # forward
                inputs[dout][:n] @ w  # input gradient
        a = sum(len(answers[i]) for i in batch)
        F.linear(inputs[d][:a], head)
        inputs[cfg.vocab_size][:a] @ head

    for batch in batches[:warmup]:
        step(batch)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    seconds = time.perf_counter() - started
    tokens = sum(lengths[i] for b in batches[warmup:] for i in b)
    return {"trainer": "products-floor-fp32", "timed_steps": len(batches) - warmup, "seconds": round(seconds, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "cpu_pressure": None}


def _in_fresh_process(fn, *args) -> dict:
    """Each segment in its own interpreter: no allocator, patch or thread state carried across trainers."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _wait_for_quiet(max_s: float = 300.0) -> float:
    """Wait (at most max_s) until the last 10 s had under 5% CPU pressure; returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < max_s:
        try:
            avg10 = float(Path("/proc/pressure/cpu").read_text().split("avg10=", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            break  # no PSI on this system: nothing to wait for
        if avg10 < 5.0:
            break
        time.sleep(5)
    return round(time.perf_counter() - started, 1)


def main(quick: bool = False) -> None:
    try:
        import trl
    except ImportError:
        print("skipping: trl is not installed (pip install -e '.[train,bench]')")
        return
    started = time.perf_counter()
    warmup, timed, rounds = (2, 6, 1) if quick else (3, 20, 4)
    pairs = _pairs()
    labels = sorted({y for _, y in pairs})
    segments, redone, waited = [], [], 0.0
    from stillroom.cpus import native_bf16

    # bf16 only where the CPU multiplies it natively: elsewhere torch emulates it (~7x slower than
    # fp32 on an AVX2-only EPYC) and no user would train that way (stillroom warns them off it).
    precisions = ("fp32", "bf16") if native_bf16() else ("fp32",)
    variants = [v for p in precisions for v in
                ((_stillroom_segment, p, True), (_stillroom_segment, p, False), (_trl_segment, p))]
    variants.append((_products_floor_segment,))
    for r in range(rounds):
        rows = _sample(pairs, (warmup + timed) * BATCH, seed=r)
        # ABBA order: a trend in the neighbour's load favours no trainer
        order = variants if r % 2 == 0 else variants[::-1]
        for attempt in range(1, MAX_TRIES + 1):
            waited += _wait_for_quiet()
            group = []
            for fn, *how in order:
                group.append({"round": r, "attempt": attempt,
                              **_in_fresh_process(fn, rows, labels, warmup, r, *how)})
                print(json.dumps(group[-1]))
            # A round where a neighbour's burst stalled any segment says nothing about the trainers: redo it
            # (kept after MAX_TRIES, flagged by its cpu_pressure).
            if attempt == MAX_TRIES or all((s["cpu_pressure"] or 0) <= CONTENDED for s in group):
                break
            redone += group
        segments += group

    def rate(name):  # all timed tokens over all timed seconds of that trainer
        own = [s for s in segments if s["trainer"] == name]
        return round(sum(s["tokens"] for s in own) / sum(s["seconds"] for s in own), 1)

    names = [n for p in precisions for n in (f"stillroom-{p}", f"stillroom-{p}-eager", f"trl-{p}")]
    rates = {name: rate(name) for name in names + ["products-floor-fp32"]}
    by_round = {(s["round"], s["trainer"]): s for s in segments}

    def per_round(a, b):
        return [round(by_round[r, a]["tokens_per_s"] / by_round[r, b]["tokens_per_s"], 2) for r in range(rounds)]

    medians = {name: statistics.median(s["tokens_per_s_median_step"] for s in segments if s["trainer"] == name)
               for name in names}
    metrics = {"tokens_per_s": rates, "precisions": list(precisions),
               "bf16_skipped": None if "bf16" in precisions else
               "this CPU has no native bf16 (AVX-512 BF16 or AMX): torch emulates its products",
               "compile_gain": {}, "compile_seconds": {}, "speedup_by_round": {}, "speedup_median_step": {}}
    for p in precisions:
        ours, eager, theirs = f"stillroom-{p}", f"stillroom-{p}-eager", f"trl-{p}"
        metrics[f"speedup_{p}_vs_{p}"] = round(rates[ours] / rates[theirs], 2)
        # without the compiled forward (compile: false, or auto on a run under 200 steps)
        metrics[f"speedup_eager_{p}_vs_{p}"] = round(rates[eager] / rates[theirs], 2)
        metrics["compile_gain"][p] = round(rates[ours] / rates[eager], 2)
        metrics["compile_seconds"][p] = [s["compile_seconds"] for s in segments if s["trainer"] == ours]
        metrics["speedup_by_round"][p] = per_round(ours, theirs)
        metrics["speedup_by_round"][f"compile_gain_{p}"] = per_round(ours, eager)
        metrics["speedup_median_step"][p] = round(medians[ours] / medians[theirs], 2)
    if "bf16" in precisions:
        metrics["bf16_gain_stillroom"] = round(rates["stillroom-bf16"] / rates["stillroom-fp32"], 2)
        metrics["bf16_gain_trl"] = round(rates["trl-bf16"] / rates["trl-fp32"], 2)
    floor = rates["products-floor-fp32"]
    # The most any exact fp32 trainer could beat TRL by here, spending time in nothing but the
    # products (see _products_floor_segment), and how much of that floor's speed ours reaches.
    metrics["fp32_ceiling_vs_trl"] = round(floor / rates["trl-fp32"], 2)
    metrics["fp32_share_of_products_floor"] = {n: round(rates[n] / floor, 2) for n in names if "fp32" in n}
    metrics.update({"cpu_pressure_max": max((s["cpu_pressure"] or 0) for s in segments),
                    "rounds_redone": len(redone) // len(variants), "seconds_waited_for_quiet": waited})
    import peft
    import transformers

    write_result(
        "train_speed", "support-intents (examples/, 507 rows)", quick, metrics,
        goals={"speedup_vs_trl": ">= 3.0 (same model, LoRA config and data on the same CPU)"},
        config={"model": "SmolLM2-135M-Instruct (fp32 weights; fp32 or bf16 autocast compute)", "lora": LORA, "batch_size": BATCH, "learning_rate": LR,
                "threads": THREADS, "warmup_steps": warmup, "timed_steps": timed, "rounds": rounds,
                "rows_per_segment": (warmup + timed) * BATCH, "row_sample_seed": "round index",
                "tokens": "non-padding prompt+answer tokens of the timed steps / their wall time",
                "redo_round_above_cpu_pressure": CONTENDED, "max_tries_per_round": MAX_TRIES,
                "trl": {"version": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "dataset": "plain-text prompt/completion", "completion_only_loss": True,
                        "gradient_checkpointing": False, "bf16": "both, one segment each, where run", "packing": False,
                        "sampler": "random (default)"},
                "segments": segments, "redone_segments": redone},
        seconds=time.perf_counter() - started,
        summary=(f"LoRA SmolLM2-135M on {THREADS} threads of {hardware().get('cpu_model')}, tokens/s {rates}: "
                 f"stillroom vs TRL SFTTrainer "
                 + ", ".join(f"{p} {metrics[f'speedup_{p}_vs_{p}']:.2f}x" for p in precisions)
                 + (" (bf16 not run: no native bf16 on this CPU)" if "bf16" not in precisions else "")
                 + f" (compiled forward, {metrics['compile_gain']} over eager; goal 3x; the products alone "
                 f"would allow at most {metrics['fp32_ceiling_vs_trl']:.2f}x in fp32; "
                 f"{len(redone) // len(variants)} contended rounds redone)"),
    )
    print(json.dumps(metrics, indent=1))

"""LoRA training speed on the CPU: stillroom's recipe against TRL's SFTTrainer, side by side.

Both train SmolLM2-135M-Instruct in fp32 with the same LoRA (r 16, alpha 32, dropout 0.05 on
q/k/v/o/gate/up/down), batch 8, learning rate 3e-4, 2 torch threads, on the same rows of the bundled
support-intents example, framed identically (`<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>
assistant\\n{label}<|im_end|>`, checked token for token) with the loss on the answer tokens only
(TRL: a prompt/completion dataset, `completion_only_loss=True`). TRL's SFTConfig defaults that
would differ from our recipe are set to match it: no gradient checkpointing, no bf16.

Tokens/s counts the same thing on both sides: non-padding tokens (prompt + answer) of the examples
in the timed steps, divided by the wall time of those steps. A segment is one fresh process that
loads the model and runs WARMUP + STEPS optimizer steps over one epoch of a row sample; only the
last STEPS count, measured from the end of the last warm-up step to the end of the last step (ours:
the `progress` callback of `train_lora`, called after each optimizer step; TRL: `on_step_end`), so
setup, model loading and validation are outside it and batch building is inside it on both sides.
Segments alternate (stillroom, TRL, then TRL, stillroom, ...) over ROUNDS rounds, each round giving
both trainers the same rows, so a noisy neighbour on the shared cores hits both alike.
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

from bench.common import ROOT, write_result

DATA = ROOT / "examples" / "support-intents" / "data" / "messages.jsonl"
BATCH, LR, THREADS = 8, 3e-4, 2
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
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


def _window(ends: list[float], tokens: list[int], warmup: int) -> dict:
    """Tokens/s over the steps after `warmup`, timed from the end of the last warm-up step."""
    seconds = ends[-1] - ends[warmup - 1]
    timed = sum(tokens[warmup:])
    return {"timed_steps": len(ends) - warmup, "seconds": round(seconds, 3), "tokens": timed,
            "tokens_per_s": round(timed / seconds, 1),
            "step_ms_median": round(1000 * statistics.median(b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])), 1)}


def _stillroom_segment(rows, labels, warmup: int, seed: int) -> dict:
    """One `train_lora` run over `rows` (one epoch, len(rows) / BATCH steps), timed per step."""
    import torch
    from transformers import AutoTokenizer

    from stillroom.models import smollm2_hf_dir
    from stillroom.train import lora

    base = smollm2_hf_dir()
    ends: list[float] = []
    config = lora.LoraConfig(base_model=str(base), rank=LORA["rank"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                             target_modules=tuple(LORA["target_modules"]), learning_rate=LR, epochs=1,
                             batch_size=BATCH, seed=seed, threads=THREADS)
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as out:
        result = lora.train_lora(rows, rows[:BATCH], labels, Path(out), config,
                                 progress=lambda step, total: ends.append(time.perf_counter()))
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
    return {"trainer": "stillroom", **_window(ends, tokens, warmup),
            "padding_efficiency": round(sum(tokens[warmup:]) / padded, 3),
            "answer_tokens": answer_tokens, "recipe_train_tokens_per_s": result.metrics["train_tokens_per_s"]}


def _trl_segment(rows, labels, warmup: int, seed: int) -> dict:
    """One SFTTrainer run over `rows` (one epoch, max_steps = len(rows) / BATCH), timed per step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stillroom.models import smollm2_hf_dir

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    base = smollm2_hf_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
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

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            steps[-1].update(tokens=int(inputs["attention_mask"].sum()), padded=inputs["input_ids"].numel(),
                             answer=int((inputs["labels"] != -100).sum()))
            return super().training_step(model, inputs, num_items_in_batch)

    with tempfile.TemporaryDirectory(prefix="bench-train-speed-trl-") as out:
        args = SFTConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
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
    return {"trainer": "trl", **_window(ends, tokens, warmup),
            "padding_efficiency": round(sum(tokens[warmup:]) / sum(s["padded"] for s in steps[warmup:]), 3),
            "answer_tokens": sum(s["answer"] for s in steps[warmup:]),
            "tokens_per_s_step_begin_to_end": round(sum(tokens[warmup:]) / compute, 1), "optim": optim}


def _in_fresh_process(fn, *args) -> dict:
    """Each segment in its own interpreter: no allocator, patch or thread state carried across trainers."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main(quick: bool = False) -> None:
    try:
        import trl
    except ImportError:
        print("skipping: trl is not installed (pip install -e '.[train,bench]')")
        return
    started = time.perf_counter()
    warmup, timed, rounds = (2, 6, 1) if quick else (3, 20, 3)
    pairs = _pairs()
    labels = sorted({y for _, y in pairs})
    segments = []
    for r in range(rounds):
        rows = _sample(pairs, (warmup + timed) * BATCH, seed=r)
        order = (_stillroom_segment, _trl_segment) if r % 2 == 0 else (_trl_segment, _stillroom_segment)
        for fn in order:
            seg = {"round": r, **_in_fresh_process(fn, rows, labels, warmup, r)}
            print(json.dumps(seg))
            segments.append(seg)

    def rate(name):  # all timed tokens over all timed seconds of that trainer
        own = [s for s in segments if s["trainer"] == name]
        return round(sum(s["tokens"] for s in own) / sum(s["seconds"] for s in own), 1)

    ours, theirs = rate("stillroom"), rate("trl")
    per_round = [round(a["tokens_per_s"] / b["tokens_per_s"], 2)
                 for r in range(rounds)
                 for a in segments if a["round"] == r and a["trainer"] == "stillroom"
                 for b in segments if b["round"] == r and b["trainer"] == "trl"]
    metrics = {"stillroom_tokens_per_s": ours, "trl_tokens_per_s": theirs,
               "speedup_vs_trl": round(ours / theirs, 2), "speedup_by_round": per_round}
    import peft
    import transformers

    write_result(
        "train_speed", "support-intents (examples/, 507 rows)", quick, metrics,
        goals={"speedup_vs_trl": ">= 3.0"},
        config={"model": "SmolLM2-135M-Instruct fp32", "lora": LORA, "batch_size": BATCH, "learning_rate": LR,
                "threads": THREADS, "warmup_steps": warmup, "timed_steps": timed, "rounds": rounds,
                "rows_per_segment": (warmup + timed) * BATCH, "row_sample_seed": "round index",
                "tokens": "non-padding prompt+answer tokens of the timed steps / their wall time",
                "trl": {"version": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                        "dataset": "plain-text prompt/completion", "completion_only_loss": True,
                        "gradient_checkpointing": False, "bf16": False, "packing": False,
                        "sampler": "random (default)"},
                "segments": segments},
        seconds=time.perf_counter() - started,
        summary=(f"LoRA SmolLM2-135M on {THREADS} threads: stillroom {ours:.0f} tok/s vs TRL SFTTrainer "
                 f"{theirs:.0f} tok/s = {ours / theirs:.2f}x (goal 3x; per round {per_round})"),
    )
    print(json.dumps(metrics, indent=1))

"""The `lora` student: a LoRA fine-tune of a small causal LM that answers with one label.

The recipe is written out top to bottom in `train_lora` (setup, loop, checkpoint, cleanup).
Prediction never generates free text: every label is scored as a continuation of the prompt and
the label probabilities are a softmax over those scores, so the answer is always a valid label.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from stillroom.train.base import Prediction, TrainResult

__all__ = ["LoraConfig", "LoraStudent", "train_lora"]

KNOWN_BASE_MODELS = ("smollm2-135m-instruct",)


@dataclass
class LoraConfig:
    """Training arguments for the `lora` student."""

    base_model: str = "smollm2-135m-instruct"  # a known name or a path to an HF model folder
    rank: int = 16  # LoRA rank r
    alpha: int = 32  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the LoRA branch
    learning_rate: float = 3e-4  # peak AdamW learning rate (linear warmup, then linear decay)
    epochs: int = 3  # at most this many epochs; stops earlier when val agreement stops improving
    batch_size: int = 8  # examples per optimizer step
    max_input_tokens: int = 96  # the formatted input is truncated to this many tokens
    seed: int = 0  # seeds torch, random and numpy (LoRA init, shuffling, dropout)
    threads: int | None = None  # torch threads; None -> os.cpu_count()
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)  # JSON round-trips give a list
        if self.base_model not in KNOWN_BASE_MODELS and not Path(self.base_model).is_dir():
            raise ValueError(
                f"LoraConfig.base_model={self.base_model!r}: expected one of "
                f"{', '.join(KNOWN_BASE_MODELS)} or an existing Hugging Face model folder"
            )
        checks = [
            ("rank", self.rank > 0, "a positive integer"),
            ("alpha", self.alpha > 0, "a positive number"),
            ("dropout", 0 <= self.dropout < 1, "a number in [0, 1)"),
            ("learning_rate", self.learning_rate > 0, "a positive number"),
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("max_input_tokens", self.max_input_tokens >= 1, "an integer >= 1"),
            ("threads", self.threads is None or self.threads >= 1, "None or an integer >= 1"),
            ("target_modules", len(self.target_modules) > 0, "at least one module name"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"LoraConfig.{name}={getattr(self, name)!r}: expected {expected}")


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers a deprecated question (a FutureWarning per model); not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def resolve_base_model(name_or_path: str) -> Path:
    """The local folder holding the base model's weights and tokenizer."""
    if name_or_path == "smollm2-135m-instruct":
        from stillroom.models import smollm2_hf_dir

        return smollm2_hf_dir()
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    raise ValueError(
        f"base_model={name_or_path!r}: expected one of {', '.join(KNOWN_BASE_MODELS)} "
        "or an existing Hugging Face model folder"
    )


# --- prompts -----------------------------------------------------------------------------------


def _chat_frame(tokenizer) -> tuple[list[int], list[int], int]:
    """(token ids before the user text, ids after it up to the answer, end-of-turn id)."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        # ChatML (SmolLM2, Qwen): built by hand because SmolLM2's template injects a ~20-token
        # default system prompt when none is given. The student is fine-tuned on this exact frame,
        # so it needs no system prompt, and every token saved is saved on every step and prediction.
        before, after, eot = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"
    else:
        # Any other template: render it around a placeholder and keep what surrounds it.
        marker = "\u0000STILLROOM\u0000"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(marker)
        eot = tokenizer.eos_token
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(before), encode(after), tokenizer.convert_tokens_to_ids(eot)


def _encode_prompts(tokenizer, frame, texts, student_format, max_input_tokens) -> list[list[int]]:
    before, after, _ = frame
    # split_special_tokens: an input containing "<|im_end|>" must not be able to close the turn.
    bodies = tokenizer(
        [student_format.format(input=t) for t in texts],
        add_special_tokens=False,
        split_special_tokens=True,
    )["input_ids"]
    return [before + body[:max_input_tokens] + after for body in bodies]


def _encode_answers(tokenizer, frame, labels) -> list[list[int]]:
    eot = frame[2]
    return [tokenizer(label, add_special_tokens=False)["input_ids"] + [eot] for label in labels]


# --- scoring -----------------------------------------------------------------------------------


def _label_logprobs(lm, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """[len(prompts), len(answers)] summed log-probability of each answer given each prompt.

    One forward pass per batch scores every label: each row is a left-padded prompt followed by
    every answer's tokens (all but the last, which is only predicted), and a custom attention mask
    lets each answer see the prompt and its own earlier tokens but not the other answers, with
    positions restarting after the prompt for each answer. Measured on SmolLM2-135M (9 labels,
    ~35-token prompts, 2 CPU cores, batch 16) this takes 52 ms/input, against 77 ms for running
    the prompt once and expanding its KV cache across the labels (two passes, a cache copy, and
    every answer padded to the longest) and 370 ms for packing one prompt+label row per label
    (the prompt recomputed once per label). The LM head only runs where an answer token is predicted.
    """
    import torch

    decoder, head = lm.get_decoder(), lm.get_output_embeddings()
    n = len(prompts)
    # One slot per continuation token: which answer it belongs to, and its index within that answer.
    owner = torch.tensor([j for j, a in enumerate(answers) for _ in a[:-1]], dtype=torch.long)
    step = torch.tensor([k for a in answers for k in range(len(a) - 1)], dtype=torch.long)
    width = max(len(p) for p in prompts)
    total = width + len(owner)
    ids = torch.full((n, total), pad_id, dtype=torch.long)
    ids[:, width:] = torch.tensor([t for a in answers for t in a[:-1]], dtype=torch.long)
    real = torch.zeros((n, width), dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) : width] = torch.tensor(p)
        real[row, width - len(p) :] = True
    positions = torch.cat([(real.cumsum(1) - 1).clamp(min=0), real.sum(1, keepdim=True) + step], 1)

    allowed = torch.zeros((n, total, total), dtype=torch.bool)
    allowed[:, :width, :width] = torch.ones((width, width), dtype=torch.bool).tril() & real[:, None, :]
    allowed[:, width:, :width] = real[:, None, :]
    allowed[:, width:, width:] = (owner[:, None] == owner[None, :]) & (step[None, :] <= step[:, None])
    allowed[:, torch.arange(total), torch.arange(total)] = True  # padding rows see themselves: no NaN
    # Additive float mask: honoured as-is by both the sdpa and the eager attention implementations.
    dtype = head.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)

    hidden = decoder(
        input_ids=ids, attention_mask=mask[:, None], position_ids=positions, use_cache=False
    ).last_hidden_state
    first = head(hidden[:, width - 1]).float().log_softmax(-1)  # predicts every answer's first token
    scores = first[:, [a[0] for a in answers]]
    if len(owner) == 0:
        return scores
    targets = torch.tensor([t for a in answers for t in a[1:]])
    rest = head(hidden[:, width:]).float().log_softmax(-1)
    rest = rest.gather(-1, targets.expand(n, -1).unsqueeze(-1)).squeeze(-1)
    return scores.index_add(1, owner, rest)


def _label_probs(lm, prompts, answers, pad_id, batch_size: int):
    """[len(prompts), len(answers)] label probabilities, batched over length-sorted prompts."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    probs = torch.empty((len(prompts), len(answers)))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            scores = _label_logprobs(lm, [prompts[i] for i in rows], answers, pad_id)
            probs[rows] = scores.softmax(-1)
    return probs


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- training ----------------------------------------------------------------------------------


def _length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so little compute is spent on padding."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 16  # sort within chunks: similar lengths, but still a different mix each epoch
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def train_lora(
    train: list[tuple[str, str]],
    val: list[tuple[str, str]],
    labels: list[str],
    out_dir: Path,
    config: LoraConfig,
    student_format: str = "{input}",
    progress: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA classifier on (input, label) pairs; keep the epoch with the best val agreement."""
    import numpy as np
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # --- setup -------------------------------------------------------------------------------
    started = time.perf_counter()
    labels = list(labels)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels={labels!r}: expected a non-empty list of distinct labels")
    if not train or not val:
        raise ValueError("train and val must both be non-empty (val picks the best epoch)")
    for split, rows in (("train", train), ("val", val)):
        unknown = sorted({y for _, y in rows} - set(labels))
        if unknown:
            raise ValueError(f"{split} has labels not in the label set: {unknown}")
    try:
        student_format.format(input="")
    except (KeyError, IndexError) as e:
        raise ValueError(f"student_format={student_format!r}: may only use the field {{input}}") from e

    base_dir = resolve_base_model(config.base_model)
    hidden_size = AutoConfig.from_pretrained(base_dir).hidden_size
    if config.rank > hidden_size:
        raise ValueError(
            f"LoraConfig.rank={config.rank}: must not exceed the base model's hidden size ({hidden_size})"
        )
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    frame = _chat_frame(tokenizer)
    pad_id = _pad_id(tokenizer)
    answers = _encode_answers(tokenizer, frame, labels)
    label_index = {label: j for j, label in enumerate(labels)}
    fmt = lambda rows: _encode_prompts(  # noqa: E731
        tokenizer, frame, [x for x, _ in rows], student_format, config.max_input_tokens
    )
    train_prompts, val_prompts = fmt(train), fmt(val)
    train_answers = [answers[label_index[y]] for _, y in train]
    val_gold = torch.tensor([label_index[y] for _, y in val])

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with _quiet_peft():
        model = get_peft_model(
            base,
            PeftLoraConfig(
                r=config.rank,
                lora_alpha=config.alpha,
                lora_dropout=config.dropout,
                target_modules=list(config.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    lm = model.get_base_model()  # the LM with LoRA layers injected; we call its parts directly
    decoder, head = lm.get_decoder(), lm.get_output_embeddings()

    lengths = [len(p) + len(a) for p, a in zip(train_prompts, train_answers)]
    steps_per_epoch = -(-len(train) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, round(0.06 * total_steps))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / (total_steps - warmup)),
    )
    rng = random.Random(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- loop --------------------------------------------------------------------------------
    step, train_tokens, loop_seconds = 0, 0, 0.0
    best_agreement, best_epoch, history = -1.0, 0, []
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        for batch in _length_bucketed_batches(lengths, config.batch_size, rng):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, i in enumerate(batch):
                prompt, answer = train_prompts[i], train_answers[i]
                ids[r, : lengths[i]] = torch.tensor(prompt + answer)
                mask[r, : lengths[i]] = 1
                # the position before each answer token is the one that predicts it
                for k, token in enumerate(answer):
                    rows.append(r)
                    cols.append(len(prompt) - 1 + k)
                    targets.append(token)
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            # Vocabulary logits only where an answer token is predicted: on every position the LM
            # head would be ~20% of SmolLM2's forward FLOPs, plus a [tokens x 49k] logits tensor.
            logits = head(hidden[rows, cols])
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_tokens += int(mask.sum())
            if progress is not None:
                progress(step, total_steps)
        loop_seconds += time.perf_counter() - epoch_start

        model.eval()
        probs = _label_probs(lm, val_prompts, answers, pad_id, batch_size=16)
        agreement = (probs.argmax(-1) == val_gold).sum().item() / len(val)
        history.append(round(agreement, 4))

        # --- checkpoint: the best epoch's adapter is what stays on disk ----------------------
        if agreement > best_agreement:
            best_agreement, best_epoch = agreement, epoch
            model.save_pretrained(out_dir)
        elif epoch - best_epoch >= 1:
            break  # early stopping: no improvement for one epoch
        if best_agreement >= 1.0:
            break  # nothing left to improve on val

    # --- cleanup -----------------------------------------------------------------------------
    tokenizer.save_pretrained(out_dir)
    metrics = {
        "val_agreement": best_agreement,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_agreement_by_epoch": history,
        "steps": step,
        "train_seconds": round(time.perf_counter() - started, 3),  # everything: load, train, val, save
        "train_tokens": train_tokens,  # non-padding tokens through the forward/backward passes
        "train_tokens_per_s": round(train_tokens / max(loop_seconds, 1e-9), 1),  # optimizer loop only
        "train_examples": len(train),
        "val_examples": len(val),
    }
    manifest = {
        "kind": LoraStudent.kind,
        "labels": labels,
        "base_model": {"name": config.base_model, "path": str(base_dir.resolve())},
        "student_format": student_format,
        "config": asdict(config),
        "metrics": metrics,
    }
    (out_dir / "student.json").write_text(json.dumps(manifest, indent=2) + "\n")
    del model, base, optimizer
    return TrainResult(path=out_dir, metrics=metrics)


# --- the student -------------------------------------------------------------------------------


class LoraStudent:
    """A trained `lora` student: the adapter merged into its base model, scoring every label."""

    kind = "lora"

    def __init__(self, model, tokenizer, labels: list[str], student_format: str, config: LoraConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.labels = labels
        self.student_format = student_format
        self.config = config
        self._frame = _chat_frame(tokenizer)
        self._answers = _encode_answers(tokenizer, self._frame, labels)
        self._pad_id = _pad_id(tokenizer)

    @classmethod
    def load(cls, path: Path) -> "LoraStudent":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        manifest = json.loads((path / "student.json").read_text())
        base = manifest["base_model"]
        # A known name is re-resolved so a moved cache still works; otherwise the recorded folder.
        base_dir = resolve_base_model(base["name"] if base["name"] in KNOWN_BASE_MODELS else base["path"])
        config = LoraConfig(**{**manifest["config"], "base_model": str(base_dir)})
        if config.threads:
            torch.set_num_threads(config.threads)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        # Merging folds B @ A into the base weights: inference then costs exactly the base model.
        with _quiet_peft():
            model = PeftModel.from_pretrained(model, path).merge_and_unload().eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, manifest["labels"], manifest["student_format"], config)

    def predict(self, texts: list[str], batch_size: int = 16) -> list[Prediction]:
        """One prediction per text: the most probable label and every label's probability."""
        if not texts:
            return []
        prompts = _encode_prompts(
            self.tokenizer, self._frame, texts, self.student_format, self.config.max_input_tokens
        )
        probs = _label_probs(self.model, prompts, self._answers, self._pad_id, batch_size).tolist()
        predictions = []
        for row in probs:
            best = max(range(len(self.labels)), key=row.__getitem__)
            predictions.append(
                Prediction(
                    label=self.labels[best],
                    confidence=row[best],
                    probs={label: p for label, p in zip(self.labels, row)},
                )
            )
        return predictions

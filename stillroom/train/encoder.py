"""The `encoder` student: all-MiniLM-L6-v2 sentence embeddings + a logistic-regression (or MLP) head.

Recipe: [optionally fine-tune the MiniLM body on contrastive pairs built from the training labels,
SetFit-style] -> embed -> pick the regularisation strength on validation agreement -> fit -> save
the head as plain arrays (npz, no pickle) next to a `student.json` manifest. A fine-tuned body is
saved in the student folder (`encoder/`) and used by `EncoderStudent.load`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from stillroom.train.base import Prediction, TrainResult

C_GRID = (1.0, 4.0, 16.0, 64.0)


ENCODER_DIR = "encoder"  # the fine-tuned body, inside the student folder


@dataclass
class EncoderConfig:
    """Training arguments for the `encoder` student."""

    head: str = "logreg"  # logreg | mlp
    seed: int = 0
    batch_size: int = 64  # texts per embedding batch
    finetune: bool = False  # contrastive fine-tune of the MiniLM body before the head is fitted
    finetune_pairs: int = 4000  # sentence pairs built from the training labels (half same-label)
    finetune_epochs: int = 1  # passes over those pairs
    finetune_batch_size: int = 32  # pairs per optimizer step
    finetune_learning_rate: float = 2e-5

    def __post_init__(self) -> None:
        if self.head not in ("logreg", "mlp"):
            raise ValueError(f"EncoderConfig.head: expected 'logreg' or 'mlp', got {self.head!r}")
        checks = [
            ("finetune_pairs", self.finetune_pairs >= 2, "an integer >= 2"),
            ("finetune_epochs", self.finetune_epochs >= 1, "an integer >= 1"),
            ("finetune_batch_size", self.finetune_batch_size >= 1, "an integer >= 1"),
            ("finetune_learning_rate", 0 < self.finetune_learning_rate < 1, "a number in (0, 1)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"EncoderConfig.{name}={getattr(self, name)!r}: expected {expected}")


@lru_cache(maxsize=2)
def _load_encoder(path: str, stamp: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _encoder(path: str):
    # Keyed on the weights' mtime too: a student retrained into the same folder is not served stale.
    weights = Path(path) / "model.safetensors"
    return _load_encoder(path, weights.stat().st_mtime_ns if weights.exists() else 0)


def embed(texts: list[str], batch_size: int = 64, model_path: str | None = None,
          progress: Callable[[int, int], None] | None = None):
    """L2-normalised MiniLM embeddings, shape (len(texts), 384)."""
    import numpy as np

    from stillroom.models import minilm_path

    model = _encoder(model_path or str(minilm_path()))
    chunks = []
    for start in range(0, len(texts), batch_size):
        chunks.append(model.encode(texts[start:start + batch_size], batch_size=batch_size,
                                   normalize_embeddings=True, convert_to_numpy=True))
        if progress:
            progress(min(start + batch_size, len(texts)), len(texts))
    return np.concatenate(chunks) if chunks else np.zeros((0, 384), dtype="float32")


def contrastive_pairs(texts: list[str], labels: list[int], n_pairs: int, seed: int = 0):
    """SetFit-style pairs: (a, b, 1.0) for two texts with the same label, (a, b, 0.0) otherwise.

    Anchors cycle through every training text in a shuffled order, each giving one positive pair
    (when its label has another example) and one negative pair, until ``n_pairs`` are made.
    """
    import random

    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    if len(by_label) < 2:
        raise ValueError("contrastive fine-tuning needs at least 2 distinct labels in the training split")
    pairs: list[tuple[str, str, float]] = []
    order = list(range(len(texts)))
    while len(pairs) < n_pairs:
        rng.shuffle(order)
        for i in order:
            same = by_label[labels[i]]
            if len(same) > 1:
                j = rng.choice(same)
                while j == i:
                    j = rng.choice(same)
                pairs.append((texts[i], texts[j], 1.0))
            j = rng.randrange(len(texts))
            while labels[j] == labels[i]:
                j = rng.randrange(len(texts))
            pairs.append((texts[i], texts[j], 0.0))
            if len(pairs) >= n_pairs:
                break
    return pairs[:n_pairs]


def finetune_body(texts: list[str], labels: list[int], out: Path, config: EncoderConfig,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Fine-tune a fresh MiniLM on contrastive pairs (CosineSimilarityLoss) and save it to ``out``."""
    import tempfile

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.losses import CosineSimilarityLoss
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from stillroom.models import minilm_path

    start = time.perf_counter()
    pairs = contrastive_pairs(texts, labels, config.finetune_pairs, config.seed)
    data = Dataset.from_dict({"sentence1": [a for a, _, _ in pairs], "sentence2": [b for _, b, _ in pairs],
                              "score": [s for _, _, s in pairs]})
    model = SentenceTransformer(str(minilm_path()))  # a fresh copy: the cached encoder stays frozen

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if progress is not None:
                progress(state.global_step, state.max_steps)

    with tempfile.TemporaryDirectory(prefix="stillroom-st-") as scratch:
        args = SentenceTransformerTrainingArguments(
            output_dir=scratch, num_train_epochs=config.finetune_epochs,
            per_device_train_batch_size=config.finetune_batch_size,
            learning_rate=config.finetune_learning_rate, warmup_steps=0.1, seed=config.seed,  # 10% warmup
            data_seed=config.seed, report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                             loss=CosineSimilarityLoss(model), callbacks=[_Progress()])
        # With tqdm off the Trainer prints its log dicts to stdout; `--json` output must stay clean.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    out = Path(out)
    model.save(str(out), create_model_card=False)
    return {"finetune_pairs": len(pairs), "finetune_positive_pairs": sum(1 for p in pairs if p[2] == 1.0),
            "finetune_steps": trainer.state.global_step,
            "finetune_seconds": round(time.perf_counter() - start, 3)}


def _fit(head: str, X, y, C: float, seed: int):
    if head == "mlp":
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier(hidden_layer_sizes=(256,), alpha=1.0 / C, max_iter=500, random_state=seed).fit(X, y)
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=2000).fit(X, y)


def train_encoder(train: list[tuple[str, str]], val: list[tuple[str, str]], labels: list[str], out_dir: Path,
                  config: EncoderConfig, student_format: str = "{input}",
                  progress: Callable[[int, int], None] | None = None) -> TrainResult:
    import numpy as np

    from stillroom.models import file_sha256

    start = time.perf_counter()
    fmt = lambda rows: [student_format.format(input=t) for t, _ in rows]  # noqa: E731
    for split, rows in (("train", train), ("val", val)):
        unknown = sorted({lab for _, lab in rows} - set(labels))
        if unknown:
            raise ValueError(f"the {split} split has labels outside the task's label set: {unknown}")
    y = np.array([labels.index(lab) for _, lab in train])
    yv = np.array([labels.index(lab) for _, lab in val]) if val else None
    if len(set(y.tolist())) < 2:
        raise ValueError("the training split has fewer than 2 distinct labels; import more data")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body, tuning = None, {}
    if config.finetune:
        body = out_dir / ENCODER_DIR
        tuning = finetune_body(fmt(train), y.tolist(), body, config, progress=progress)
    X = embed(fmt(train), config.batch_size, model_path=str(body) if body else None,
              progress=None if body else progress)
    Xv = embed(fmt(val), config.batch_size, model_path=str(body) if body else None) if val else None

    scores = {}
    if Xv is not None and len(val) >= 10:  # too few validation rows make the choice noise
        for C in C_GRID:
            scores[C] = float((_fit(config.head, X, y, C, config.seed).predict(Xv) == yv).mean())
        best_C = max(scores, key=lambda c: (scores[c], -c))
    else:
        best_C = 16.0
    model = _fit(config.head, X, y, best_C, config.seed)
    val_agreement = float((model.predict(Xv) == yv).mean()) if Xv is not None and len(val) else None

    # The head is saved as arrays: loading a student never unpickles code.
    if config.head == "logreg":
        np.savez(out_dir / "head.npz", kind="logreg", classes=model.classes_, coef=model.coef_,
                 intercept=model.intercept_)
    else:
        np.savez(out_dir / "head.npz", kind="mlp", classes=model.classes_,
                 **{f"W{i}": w for i, w in enumerate(model.coefs_)},
                 **{f"b{i}": b for i, b in enumerate(model.intercepts_)})
    seconds = time.perf_counter() - start
    metrics = {"val_agreement": val_agreement, "C": best_C, "C_scores": {str(k): v for k, v in scores.items()},
               "train_examples": len(train), "train_seconds": round(seconds, 3), **tuning}
    manifest = {"kind": "encoder", "labels": labels, "student_format": student_format,
                "config": asdict(config), "metrics": metrics, "encoder": "all-MiniLM-L6-v2"}
    if body is not None:
        # The tuned body travels with the student; its hash lets a reader check it is the one trained.
        manifest["encoder"] = "all-MiniLM-L6-v2, contrastive fine-tune"
        manifest["encoder_dir"] = ENCODER_DIR
        manifest["encoder_sha256"] = file_sha256(body / "model.safetensors")
    elif (out_dir / ENCODER_DIR).exists():
        import shutil

        shutil.rmtree(out_dir / ENCODER_DIR)  # a frozen student retrained into a tuned one's folder
    (out_dir / "student.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return TrainResult(out_dir, metrics)


class EncoderStudent:
    kind = "encoder"

    def __init__(self, path: Path, labels: list[str], student_format: str, head: dict,
                 encoder_path: Path | None = None):
        self.path = Path(path)
        self.labels = labels
        self.student_format = student_format
        self._head = head
        self.encoder_path = encoder_path  # None: the packaged, frozen MiniLM

    @classmethod
    def load(cls, path: Path) -> "EncoderStudent":
        import numpy as np

        path = Path(path)
        manifest = json.loads((path / "student.json").read_text(encoding="utf-8"))
        with np.load(path / "head.npz", allow_pickle=False) as z:
            head = {k: z[k] for k in z.files}
        encoder_path = None
        if manifest.get("encoder_dir"):
            encoder_path = path / manifest["encoder_dir"]
            if not (encoder_path / "model.safetensors").is_file():
                raise FileNotFoundError(
                    f"{path / 'student.json'} names a fine-tuned encoder in {encoder_path}, "
                    "which has no model.safetensors; retrain the student"
                )
        return cls(path, manifest["labels"], manifest["student_format"], head, encoder_path)

    def _probs(self, X):
        import numpy as np

        h = self._head
        if str(h["kind"]) == "logreg":
            logits = X @ h["coef"].T + h["intercept"]
            if logits.shape[1] == 1:  # binary logistic regression stores one column
                logits = np.concatenate([-logits / 2, logits / 2], axis=1)
        else:
            layers = sorted(k for k in h if k.startswith("W"))
            a = X
            for i, _ in enumerate(layers):
                a = a @ h[f"W{i}"] + h[f"b{i}"]
                if i < len(layers) - 1:
                    a = np.maximum(a, 0)
            logits = a
            if logits.shape[1] == 1:
                logits = np.concatenate([np.zeros_like(logits), logits], axis=1)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, texts: list[str]) -> list[Prediction]:
        X = embed([self.student_format.format(input=t) for t in texts],
                  model_path=str(self.encoder_path) if self.encoder_path else None)
        P = self._probs(X)
        classes = [int(c) for c in self._head["classes"]]
        out = []
        for row in P:
            probs = {label: 0.0 for label in self.labels}
            for c, p in zip(classes, row):
                probs[self.labels[c]] = float(p)
            best = max(probs, key=probs.get)
            out.append(Prediction(best, probs[best], probs))
        return out

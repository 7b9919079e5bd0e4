"""The `encoder` student: frozen all-MiniLM-L6-v2 sentence embeddings + a logistic-regression head.

Recipe: embed -> pick the regularisation strength on validation agreement -> fit -> save the head
as plain arrays (npz, no pickle) next to a `student.json` manifest.
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


@dataclass
class EncoderConfig:
    head: str = "logreg"  # logreg | mlp
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.head not in ("logreg", "mlp"):
            raise ValueError(f"head: expected 'logreg' or 'mlp', got {self.head!r}")


@lru_cache(maxsize=2)
def _encoder(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


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

    start = time.perf_counter()
    fmt = lambda rows: [student_format.format(input=t) for t, _ in rows]  # noqa: E731
    X = embed(fmt(train), config.batch_size, progress=progress)
    y = np.array([labels.index(lab) for _, lab in train])
    Xv = embed(fmt(val), config.batch_size) if val else None
    yv = np.array([labels.index(lab) for _, lab in val]) if val else None
    if len(set(y.tolist())) < 2:
        raise ValueError("the training split has fewer than 2 distinct labels; import more data")

    scores = {}
    if Xv is not None and len(val) >= 10:  # too few validation rows make the choice noise
        for C in C_GRID:
            scores[C] = float((_fit(config.head, X, y, C, config.seed).predict(Xv) == yv).mean())
        best_C = max(scores, key=lambda c: (scores[c], -c))
    else:
        best_C = 16.0
    model = _fit(config.head, X, y, best_C, config.seed)
    val_agreement = float((model.predict(Xv) == yv).mean()) if Xv is not None and len(val) else None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
               "train_examples": len(train), "train_seconds": round(seconds, 3)}
    manifest = {"kind": "encoder", "labels": labels, "student_format": student_format,
                "config": asdict(config), "metrics": metrics, "encoder": "all-MiniLM-L6-v2"}
    (out_dir / "student.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return TrainResult(out_dir, metrics)


class EncoderStudent:
    kind = "encoder"

    def __init__(self, path: Path, labels: list[str], student_format: str, head: dict):
        self.path = Path(path)
        self.labels = labels
        self.student_format = student_format
        self._head = head

    @classmethod
    def load(cls, path: Path) -> "EncoderStudent":
        import numpy as np

        path = Path(path)
        manifest = json.loads((path / "student.json").read_text(encoding="utf-8"))
        with np.load(path / "head.npz", allow_pickle=False) as z:
            head = {k: z[k] for k in z.files}
        return cls(path, manifest["labels"], manifest["student_format"], head)

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
        X = embed([self.student_format.format(input=t) for t in texts])
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

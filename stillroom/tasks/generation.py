"""Generation: free text within a length limit, scored against a reference text.

The per-example score is ROUGE-L F1 (`rouge-score`, with stemming) or chrF (`sacrebleu`, on a 0-1
scale); corpus BLEU, chrF and length statistics are aggregate metrics in evaluate/metrics.py.
"""

from __future__ import annotations

from functools import lru_cache

from stillroom.config import TaskConfig
from stillroom.errors import StillroomError
from stillroom.tasks.base import ParseError, shorten

__all__ = ["GenerationTask", "rouge_l", "chrf"]


def _missing(package: str) -> StillroomError:
    return StillroomError(f"scoring generated text needs the '{package}' package; "
                          f"install it with: pip install 'stillroom[text]'")


@lru_cache(maxsize=1)
def _rouge():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise _missing("rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (longest common subsequence of stemmed, lower-cased words)."""
    return _rouge().score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF on a 0-1 scale (character n-gram F-score, beta 2)."""
    try:
        from sacrebleu.metrics import CHRF
    except ImportError:
        raise _missing("sacrebleu") from None
    return CHRF().sentence_score(prediction, [reference]).score / 100.0


class GenerationTask:
    type = "generation"

    def __init__(self, config: TaskConfig):
        self.config = config
        self.name = config.name
        self.labels: list[str] = []
        self.metric = config.gate_metric
        self.max_output_tokens = config.output_tokens
        self.max_output_chars = config.max_output_chars

    def teacher_prompt(self, text: str) -> str:
        return self.config.prompt_template.format(input=text, labels="", label_descriptions="", schema="")

    def student_input(self, text: str) -> str:
        return self.config.student_input_format.format(input=text, labels="", label_descriptions="", schema="")

    def response_format(self) -> dict | None:
        return None

    def parse(self, output: str) -> str:
        text = output.strip()
        if not text:
            raise ParseError("the answer is empty")
        if len(text) > self.max_output_chars:
            raise ParseError(f"answer {shorten(text)!r} is {len(text)} characters, over "
                             f"task.max_output_chars ({self.max_output_chars})")
        return text

    def score(self, prediction: str, reference: str) -> float:
        return chrf(prediction, reference) if self.metric == "chrf" else rouge_l(prediction, reference)

    def agrees(self, prediction: str, reference: str) -> bool:
        return self.score(prediction, reference) >= self.config.agreement_threshold

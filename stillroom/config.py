"""Project configuration (`stillroom.yaml`): typed models, loading, and errors that name the field.

A bad file yields one line per problem -- the field path, the value found, and what was expected --
and nothing runs.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from stillroom.errors import StillroomError
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

CONFIG_FILE = "stillroom.yaml"
WORKSPACE_DIR = ".stillroom"
HIGH_STAKES_GAP_POINTS = 1.0
DEFAULT_GAP_POINTS = 3.0


class ConfigError(StillroomError):
    """The project file is unusable; `problems` holds one human sentence per problem."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path} has {len(problems)} problem(s):\n{lines}")


class UnknownStudent(StillroomError, KeyError):
    """A student name that stillroom.yaml does not define."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _require_unique(what: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelSpec(_Strict):
    # Any single-line text without surrounding spaces: real label sets use '?', spaces, etc.
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\s](?:[^\n\r]*[^\s])?$")]
    description: str = ""


TASK_TYPES = ("classification", "extraction", "generation")
TEMPLATE_FIELDS = {"input", "labels", "label_descriptions", "schema"}
DEFAULT_TEACHER_PROMPTS = {
    "classification": (
        "Classify the message into exactly one of these labels:\n{label_descriptions}\n\n"
        "Message: {input}\n\nAnswer with the label name only."
    ),
    "extraction": (
        "Extract the fields described by this JSON schema from the text. Leave out a field the text "
        "does not state; never guess.\n\nSchema:\n{schema}\n\nText: {input}\n\n"
        "Answer with one JSON object only."
    ),
    "generation": "{input}",
}
# The per-example score each task type is gated on (`task.metric`), and the ones allowed.
DEFAULT_METRICS = {"classification": "accuracy", "extraction": "field_f1", "generation": "rouge_l"}
ALLOWED_METRICS = {"classification": ("accuracy",), "extraction": ("field_f1", "exact_match"),
                   "generation": ("rouge_l", "chrf")}
DEFAULT_MAX_OUTPUT_TOKENS = {"classification": 16, "extraction": 256, "generation": 128}


class TaskConfig(_Strict):
    """What the workload is. `classification`: one label from `labels`. `extraction`: one JSON object
    valid for `schema`. `generation`: free text, at most `max_output_tokens` tokens."""

    name: Annotated[str, Field(min_length=1)]
    type: Literal["classification", "extraction", "generation"] = "classification"
    labels: list[LabelSpec] = Field(default_factory=list)
    schema_: Annotated[dict | None, Field(alias="schema")] = None  # JSON schema of one extracted record
    metric: str | None = None  # the per-example score the gate uses; None: the type's default
    max_output_tokens: Annotated[int | None, Field(gt=0, le=8192)] = None  # None: the type's default
    max_output_chars: Annotated[int, Field(gt=0)] = 4000  # longer answers are rejected (generation)
    # Generation: a student answer "agrees" with the teacher's when its score reaches this (routing
    # calibration, ECE and error lists need a yes/no). Classification and extraction agree only exactly.
    agreement_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5
    teacher_prompt: str | None = None  # None: the type's default prompt
    student_input_format: str = "{input}"

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("labels")
    @classmethod
    def _labels_fit_type(cls, labels: list[LabelSpec], info: ValidationInfo) -> list[LabelSpec]:
        kind = info.data.get("type", "classification")
        if kind == "classification" and len(labels) < 2:
            raise ValueError("at least 2 labels are needed for a classification task")
        if kind != "classification" and labels:
            raise ValueError(f"labels are for classification; a {kind} task has no label set")
        _require_unique("label", [label.name for label in labels])
        return labels

    @field_validator("teacher_prompt", "student_input_format")
    @classmethod
    def _has_input_slot(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as '{{{{' and '}}}}'")
        if "input" not in fields:
            raise ValueError("the template must contain the placeholder {input}")
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            allowed = ", ".join("{" + f + "}" for f in sorted(TEMPLATE_FIELDS))
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {allowed}")
        return template

    @model_validator(mode="after")
    def _fits_type(self) -> "TaskConfig":
        if self.type == "classification":
            if self.schema_ is not None:
                raise ValueError("task.schema is for extraction tasks; a classification task uses task.labels")
        else:
            if self.type == "extraction":
                if self.schema_ is None:
                    raise ValueError("an extraction task needs task.schema: the JSON schema of one record")
                _check_schema(self.schema_)
            elif self.schema_ is not None:
                raise ValueError("task.schema is for extraction tasks")
        allowed = ALLOWED_METRICS[self.type]
        if self.metric is not None and self.metric not in allowed:
            raise ValueError(f"task.metric {self.metric!r} does not apply to {self.type}; "
                             f"use one of: {', '.join(allowed)}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def schema(self) -> dict | None:
        return self.schema_

    @property
    def gate_metric(self) -> str:
        return self.metric or DEFAULT_METRICS[self.type]

    @property
    def output_tokens(self) -> int:
        return self.max_output_tokens or DEFAULT_MAX_OUTPUT_TOKENS[self.type]

    @property
    def prompt_template(self) -> str:
        return self.teacher_prompt or DEFAULT_TEACHER_PROMPTS[self.type]


def _check_schema(schema: dict) -> None:
    """An extraction schema must be a valid JSON schema describing one object with named properties."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"task.schema is not a valid JSON schema at {where}: {exc.message}") from None
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise ValueError("task.schema must describe one object: type 'object' with at least one property")


class TeacherConfig(_Strict):
    # openai: any OpenAI-compatible URL; litellm: any provider litellm knows; local: an in-process
    # transformers model; gguf: an in-process GGUF file through llama-cpp-python; recorded: imported answers
    backend: Literal["openai", "litellm", "local", "gguf", "recorded"] = "recorded"
    model: str = "teacher"
    # local: an HF model folder (default: the embedded SmolLM2-135M-Instruct); gguf: a .gguf file
    # (default: the embedded SmolLM2 GGUF). Relative paths are from the project folder.
    model_path: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    price_per_million_input_tokens: Annotated[float, Field(ge=0)] = 2.50
    price_per_million_output_tokens: Annotated[float, Field(ge=0)] = 10.00
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_tokens: Annotated[int | None, Field(gt=0)] = None  # None: task.max_output_tokens (or its type's default)

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "TeacherConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. https://api.openai.com/v1)")
        return self


class LabelingConfig(_Strict):
    """How `stillroom label` calls the teacher: pace, retries, samples, consensus, budget, batch."""

    concurrency: Annotated[int, Field(ge=1, le=4096)] = 16  # teacher calls in flight at once
    requests_per_minute: Annotated[float | None, Field(gt=0)] = None  # None: no client-side limit
    tokens_per_minute: Annotated[float | None, Field(gt=0)] = None  # input + output tokens
    max_retries: Annotated[int, Field(ge=0, le=100)] = 6  # per call, on 429 / 5xx / timeouts
    backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0  # full-jitter exponential backoff
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    samples: Annotated[int, Field(ge=1, le=50)] = 1  # teacher answers per input (consensus when > 1)
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None  # None: the endpoint's default
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.6  # below this share a label is flagged
    max_input_chars: Annotated[int, Field(gt=0)] = 20_000
    over_long_inputs: Literal["reject", "truncate"] = "reject"
    max_cost_usd: Annotated[float | None, Field(gt=0)] = None  # `--max-cost` overrides
    batch_price_factor: Annotated[float, Field(gt=0, le=1)] = 0.5  # batch APIs bill about half
    batch_max_requests: Annotated[int, Field(ge=1, le=50_000)] = 50_000
    batch_poll_interval_s: Annotated[float, Field(gt=0)] = 30.0
    batch_completion_window: str = "24h"
    ray_workers: Annotated[int, Field(ge=1)] = 2  # Ray tasks in flight at once with `--ray`

    @model_validator(mode="after")
    def _samples_need_sampling(self) -> "LabelingConfig":
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 with temperature 0 asks for the same answer several times; "
                             "set temperature above 0 (e.g. 0.7) or samples to 1")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self


class SweepConfig(_Strict):
    """The grid `stillroom sweep` trains for one student (every combination of the lists)."""

    rank: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16, 64])
    learning_rate: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [1e-4, 3e-4])
    epochs: list[Annotated[int, Field(gt=0, le=50)]] = Field(default_factory=lambda: [3])
    base_model: list[str] = Field(default_factory=list)  # empty: the student's own base model
    head: list[Literal["logreg", "mlp"]] = Field(default_factory=lambda: ["logreg", "mlp"])  # encoder only

    @field_validator("rank", "learning_rate", "epochs", "head")
    @classmethod
    def _not_empty(cls, values: list) -> list:
        if not values:
            raise ValueError("at least one value is needed (leave the field out for the default)")
        return values


class PseudoLabelConfig(_Strict):
    """Self-training: another student of the project labels the project's unlabelled inputs (captured
    traffic the teacher never saw) and its most confident answers join this student's training rows.
    Costs no teacher calls. Banking77 with 1,000 teacher labels and the other 9,003 inputs unlabelled:
    a fine-tuned encoder went from 84.5% to 86.7% (docs/training.md, "Self-training")."""

    student: Annotated[str, Field(min_length=1)]  # the labeller: another student here (an ensemble is fine)
    # At most this many rows per label, the most confident first: balanced classes, and a cap that keeps
    # the labeller's mistakes from outnumbering the teacher's rows.
    per_label: Annotated[int, Field(ge=1, le=100_000)] = 60
    # Rows whose label probability is below this are left out. Off by default: the per-label cap already
    # keeps the surest, and a floor starves the labels the labeller is least sure of (Banking77 at 1,000
    # labels: a 0.5 floor kept 3,704 rows over 75 labels and scored 85.65%, against 86.72% without it).
    min_confidence: Annotated[float, Field(ge=0, lt=1)] = 0.0


class StudentConfig(_Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")]
    # full: full fine-tuning, every weight trains; ensemble: pools the label probabilities of
    # `members` (other students here) with weights fitted on the validation split
    kind: Literal["encoder", "lora", "full", "ensemble"]
    members: list[str] | None = None  # ensemble: the students whose deployed artifacts it combines
    # encoder
    head: Literal["logreg", "mlp"] = "logreg"
    # encoder: fine-tune the MiniLM body; minutes instead of seconds to train, more accurate.
    # true / contrastive: on same-label pairs with in-batch negatives, then fit the head (Banking77:
    # +1.3 points at 1,000 labels, +0.8 at all 10,003). classifier: fit the head on the frozen body,
    # then train body and head with cross-entropy (+0.5 points at 1,000 labels, +1.5 at all 10,003).
    finetune: bool | Literal["contrastive", "classifier"] = False
    finetune_pairs: Annotated[int, Field(ge=2, le=1_000_000)] = 4000  # contrastive: anchors per pass (at most)
    finetune_epochs: Annotated[int, Field(gt=0, le=20)] = 4  # passes (contrastive) or epochs (classifier)
    # encoder: also try each label's name ("card_arrival" -> "card arrival") as training rows for the
    # head; kept only when validation (or cross-validation) agreement says they help.
    label_names: bool = True
    # lora and full: an embedded base (smollm2-135m-instruct, the default; gemma-3-270m) or a Hugging Face
    # model folder. encoder: all-minilm-l6-v2 (the default, embedded) or a local sentence-transformers
    # or Hugging Face encoder folder (a larger encoder, e.g. bge-base or e5-base, downloaded beforehand).
    base_model: str | None = None
    rank: Annotated[int, Field(gt=0)] = 16
    alpha: Annotated[int, Field(gt=0)] = 32
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 3e-4  # kind full: 2e-5 unless set
    epochs: Annotated[int, Field(gt=0, le=50)] = 3
    batch_size: Annotated[int, Field(gt=0)] = 8
    seed: int = 0
    # lora: "4bit" trains QLoRA (bitsandbytes NF4 base; needs a CUDA GPU)
    quantization: Literal["4bit"] | None = None
    checkpoint_every: Annotated[int, Field(ge=0)] = 50  # optimizer steps between resumable checkpoints; 0: none
    # bf16 autocast for training and prediction (weights stay fp32); auto: bf16 on a GPU, fp32 on a CPU
    # (measured on an AMX CPU: bf16 autocast was no faster to train and slower per single input)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # lora on a CPU, Llama-architecture base: the training forward through torch.compile (train_speed
    # bench: 1.20x the tokens/s in fp32, 1.45x with bf16 weights; 3-22 s to compile). auto: runs of 200+ steps.
    # true, with scoring 'head': predictions compiled too (~100 s per batch shape on an AMX CPU, minutes on
    # an AVX2 one; Banking77 single-input latency: docs/training.md). `stillroom serve` reads it from here
    # as it is now and compiles before taking requests; eval and export read the trained student's folder.
    # How the model is computed, not what it learns: runs are reused across this setting.
    compile: Literal["auto"] | bool = "auto"
    # lora and full, classification: "labels" scores every label's tokens as the model's continuation of
    # the prompt; "head" reads a linear layer over the labels on the prompt's last hidden state: one
    # pass per input whatever the number of labels (Banking77's 77: see docs/training.md).
    scoring: Literal["labels", "head"] = "labels"
    # lora and full: keep only the base's first N decoder layers (default: all). Cost per token, to train
    # and to serve, falls in proportion; what it costs in agreement is measured in docs/training.md
    # ("Depth": a head student on Banking77). For CPUs where the whole base is too slow per input.
    layers: Annotated[int, Field(gt=0)] | None = None
    # The artifact that goes to production; the gate and the gateway use its own evaluation.
    deploy: Literal["fp32", "merged", "int8", "gguf-f16", "gguf-q8_0"] = "fp32"
    # The grid `stillroom sweep NAME` trains; None: the built-in default grid.
    sweep: SweepConfig | None = None
    # Classification: add the confident answers of another student on the unlabelled inputs (self-training).
    pseudo_labels: PseudoLabelConfig | None = None

    @model_validator(mode="after")
    def _ensemble_settings(self) -> "StudentConfig":
        if self.kind != "ensemble":
            if self.members is not None:
                raise ValueError("members applies to kind 'ensemble' only")
            return self
        if not self.members or len(self.members) < 2:
            raise ValueError("an ensemble needs members: at least two other students' names")
        if len(set(self.members)) != len(self.members) or self.name in self.members:
            raise ValueError(f"members must be distinct students other than '{self.name}' (got {self.members})")
        own = {"name", "kind", "members", "seed", "deploy"}
        if self.model_fields_set - own:
            raise ValueError(f"{', '.join(sorted(self.model_fields_set - own))} does not apply to an ensemble; "
                             "set it on the member students")
        if self.deploy != "fp32":
            raise ValueError("an ensemble runs its members' deployed artifacts: deploy must be 'fp32' "
                             "(set each member's deploy instead)")
        return self

    @model_validator(mode="after")
    def _pseudo_labels_from_another(self) -> "StudentConfig":
        if self.pseudo_labels is not None and self.pseudo_labels.student == self.name:
            raise ValueError(f"pseudo_labels.student must be another student than '{self.name}': a student "
                             "cannot label its own training rows before it is trained")
        return self

    @model_validator(mode="after")
    def _encoder_deploys_as_trained(self) -> "StudentConfig":
        if self.kind == "encoder" and self.deploy != "fp32":
            raise ValueError("an encoder student deploys as trained: deploy must be 'fp32'")
        tuning = {"finetune", "finetune_pairs", "finetune_epochs", "label_names"} & self.model_fields_set
        if self.kind != "encoder" and tuning:
            raise ValueError(f"{', '.join(sorted(tuning))} applies to kind 'encoder' only")
        if self.finetune == "classifier" and self.head != "logreg":
            raise ValueError("finetune 'classifier' trains a linear head together with the body: "
                             f"head must be 'logreg', not '{self.head}'")
        return self

    @model_validator(mode="after")
    def _base_model_for_kind(self) -> "StudentConfig":
        if self.kind == "ensemble":
            return self  # (rejected above when set)
        from stillroom.models import BASE_MODELS, MINILM_NAME, SMOLLM2_NAME

        if self.kind == "encoder":
            if self.base_model is None:
                self.base_model = MINILM_NAME
            elif self.base_model != MINILM_NAME and not Path(self.base_model).is_dir():
                raise ValueError(f"base_model {self.base_model!r} is neither {MINILM_NAME!r} (the embedded "
                                 "encoder) nor an existing sentence-transformers or Hugging Face encoder folder")
            return self
        if self.base_model is None:
            self.base_model = SMOLLM2_NAME
        elif self.base_model not in BASE_MODELS and not Path(self.base_model).is_dir():
            raise ValueError(f"base_model {self.base_model!r} is neither a known base model "
                             f"({', '.join(BASE_MODELS)}) nor an existing Hugging Face model folder")
        return self

    @model_validator(mode="after")
    def _generative_settings(self) -> "StudentConfig":
        if self.kind == "full" and "learning_rate" not in self.model_fields_set:
            self.learning_rate = 2e-5  # every weight moves: LoRA's 3e-4 would wreck the base model
        if self.quantization and self.kind != "lora":
            raise ValueError("quantization '4bit' (QLoRA) applies to kind 'lora' only")
        if self.compile is True and (self.kind != "lora" or self.quantization):
            raise ValueError("compile: true applies to kind 'lora' trained on a CPU (not QLoRA)")
        if self.layers is not None and self.kind not in ("lora", "full"):
            raise ValueError(f"layers applies to kinds 'lora' and 'full' (an {self.kind} student uses its "
                             "base whole)")
        if self.scoring == "head" and self.kind not in ("lora", "full"):
            raise ValueError(f"scoring 'head' applies to kinds 'lora' and 'full' (an {self.kind} student "
                             "always classifies with a head)")
        if self.scoring == "head" and self.deploy.startswith("gguf-"):
            raise ValueError(f"deploy '{self.deploy}': a scoring 'head' student's label head has no place in "
                             "llama.cpp's GGUF runtime; deploy 'merged', 'int8' or 'fp32'")
        return self


class SplitConfig(_Strict):
    train: Annotated[float, Field(gt=0, lt=1)] = 0.6
    validation: Annotated[float, Field(ge=0, lt=1)] = 0.1
    calibration: Annotated[float, Field(gt=0, lt=1)] = 0.1
    eval: Annotated[float, Field(gt=0, lt=1)] = 0.2
    seed: int = 0
    human_labelled_to_eval: bool = True  # human-reviewed examples form the gold eval set first

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.calibration + self.eval
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + calibration + eval must sum to 1, got {total:g}")
        return self


class GateConfig(_Strict):
    preset: Literal["standard", "high_stakes"] = "standard"
    max_gap_points: Annotated[float | None, Field(ge=0, le=100)] = None
    reference: Literal["auto", "human", "teacher"] = "auto"
    min_human_examples: Annotated[int, Field(ge=1)] = 30
    # point: the estimated gap must be within the allowed gap; strict: its upper 95% bound must be.
    mode: Literal["point", "strict"] = "point"
    # A slice (class, length bucket, source, tag) with at least this many examples whose gap is above
    # slice_gap_multiple x the allowed gap fails the gate on its own.
    slice_min_examples: Annotated[int, Field(ge=1)] = 20
    slice_gap_multiple: Annotated[float, Field(gt=0)] = 2.0
    bootstrap_resamples: Annotated[int, Field(ge=100, le=100_000)] = 2000
    bootstrap_seed: int = 0

    @property
    def allowed_gap_points(self) -> float:
        if self.max_gap_points is not None:
            return self.max_gap_points
        return HIGH_STAKES_GAP_POINTS if self.preset == "high_stakes" else DEFAULT_GAP_POINTS


class JudgeConfig(_Strict):
    """The LLM judge for generation tasks (pairwise + rubric); usually stronger than the teacher."""

    backend: Literal["openai", "local"] | None = None  # None: no judge configured
    model: str = "judge"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: Annotated[float, Field(gt=0)] = 60.0
    max_retries: Annotated[int, Field(ge=0, le=10)] = 2  # extra attempts for an unparseable answer

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "JudgeConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. https://api.openai.com/v1)")
        return self


class RoutingConfig(_Strict):
    target_agreement: Annotated[float, Field(gt=0, le=1)] = 0.99
    student: str | None = None  # which student serves; default: the best one that passed the gate


class CostConfig(_Strict):
    student_hosting_per_hour: Annotated[float, Field(ge=0)] = 0.10
    project_cost: Annotated[float, Field(ge=0)] = 2000.0


class VolumeConfig(_Strict):
    requests_per_month: Annotated[int, Field(ge=0)] = 1_000_000
    input_tokens_per_request: Annotated[int, Field(ge=0)] = 150
    output_tokens_per_request: Annotated[int, Field(ge=0)] = 5


class DataSource(_Strict):
    """A file `stillroom run` imports (paths relative to the project folder)."""

    path: Annotated[str, Field(min_length=1)]
    role: Literal["teacher", "human"] = "teacher"  # whose answers the file's outputs are
    input_column: str = "input"
    output_column: str = "output"


PII_TYPES = ("email", "phone", "card", "iban")


class PiiPattern(_Strict):
    """A user regex redacted as `[NAME]` (the name upper-cased)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,39}$")]
    pattern: Annotated[str, Field(min_length=1)]

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        import re

        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if compiled.match(""):
            raise ValueError("the pattern matches the empty string; it would redact nothing useful")
        return pattern


class PiiConfig(_Strict):
    """What `curate/pii.py` redacts before a text goes to a teacher or into an export."""

    enabled: bool = True
    # Per field, the types to redact: email, phone, card, iban, a pattern's name, or 'custom' (all patterns).
    input: list[str] = Field(default_factory=lambda: [*PII_TYPES, "custom"])
    output: list[str] = Field(default_factory=lambda: [*PII_TYPES, "custom"])
    patterns: list[PiiPattern] = Field(default_factory=list)
    # The gateway's teacher fallback is live traffic a client sent to this service on purpose: it goes
    # to the teacher as sent unless this is on (then its `input` types are redacted there too).
    redact_live: bool = False

    @model_validator(mode="after")
    def _known_types(self) -> "PiiConfig":
        names = [p.name.lower() for p in self.patterns]
        _require_unique("pattern", names)
        clash = sorted(set(names) & {*PII_TYPES, "custom"})
        if clash:
            raise ValueError(f"pattern name(s) {clash} clash with a built-in type; pick another name")
        known = {*PII_TYPES, "custom", *names}
        for field in ("input", "output"):
            unknown = [t for t in getattr(self, field) if t.lower() not in known]
            if unknown:
                raise ValueError(f"{field}: unknown type(s) {unknown}; expected any of {sorted(known)}")
        return self


class DedupeConfig(_Strict):
    threshold: Annotated[float, Field(gt=0, le=1)] = 0.95  # cosine similarity of MiniLM embeddings
    exclude_train_duplicates: bool = True  # --apply keeps one example per near-duplicate cluster


class ReviewConfig(_Strict):
    fraction: Annotated[float, Field(ge=0, le=1)] = 0.10  # stratified sample per label (5-20% is typical)
    min_per_label: Annotated[int, Field(ge=0)] = 1
    seed: int = 0
    splits: list[Literal["train", "validation", "calibration", "eval"]] = Field(
        default_factory=lambda: ["train", "validation"]
    )


class BalanceConfig(_Strict):
    min_per_label: Annotated[int, Field(ge=0)] = 0  # oversample rarer train labels up to this; 0 = off
    flagged_copies: Annotated[int, Field(ge=1, le=20)] = 1  # copies of each flagged train example


class CurationConfig(_Strict):
    pii: PiiConfig = PiiConfig()
    dedupe: DedupeConfig = DedupeConfig()
    review: ReviewConfig = ReviewConfig()
    balance: BalanceConfig = BalanceConfig()


class DatabaseConfig(_Strict):
    url: str | None = None  # default: sqlite file in the workspace; STILLROOM_DB_URL overrides


class ProjectConfig(_Strict):
    task: TaskConfig
    data: list[DataSource] = Field(default_factory=list)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    labeling: LabelingConfig = LabelingConfig()
    students: list[StudentConfig] = Field(default_factory=list)  # empty: the task type's default
    split: SplitConfig = SplitConfig()
    gate: GateConfig = GateConfig()
    judge: JudgeConfig = JudgeConfig()
    routing: RoutingConfig = RoutingConfig()
    costs: CostConfig = CostConfig()
    volume: VolumeConfig = VolumeConfig()
    curation: CurationConfig = CurationConfig()
    database: DatabaseConfig = DatabaseConfig()

    @field_validator("students")
    @classmethod
    def _unique_students(cls, students: list[StudentConfig]) -> list[StudentConfig]:
        _require_unique("student", [s.name for s in students])
        return students

    @model_validator(mode="after")
    def _fits_task(self) -> "ProjectConfig":
        if not self.students:  # the cheapest student that can do the task
            kind = "encoder" if self.task.type == "classification" else "lora"
            self.students = [StudentConfig(name=kind, kind=kind)]
        if self.teacher.max_tokens is None:  # room for one answer of the task's kind
            self.teacher.max_tokens = self.task.output_tokens
        by_name = {s.name: s for s in self.students}
        for s in self.students:
            if s.kind != "ensemble":
                continue
            if self.task.type != "classification":
                raise ValueError(f"student {s.name}: an ensemble pools label probabilities, so it needs a "
                                 f"classification task (this one is {self.task.type})")
            unknown = [m for m in s.members if m not in by_name]
            if unknown:
                raise ValueError(f"student {s.name}: members {', '.join(unknown)} are not students here "
                                 f"(students: {', '.join(by_name)})")
            nested = [m for m in s.members if by_name[m].kind == "ensemble"]
            if nested:
                raise ValueError(f"student {s.name}: members {', '.join(nested)} are ensembles themselves; "
                                 "list their members instead")
        _check_pseudo_labellers(self.students, by_name, self.task.type)
        if self.task.type != "classification":
            heads = [s.name for s in self.students if s.scoring == "head"]
            if heads:
                raise ValueError(f"student(s) {', '.join(heads)}: scoring 'head' reads a label head, so it needs "
                                 f"a classification task (this one is {self.task.type}); leave scoring out")
            encoders = [s.name for s in self.students if s.kind == "encoder"]
            if encoders:
                raise ValueError(f"student(s) {', '.join(encoders)}: an encoder student only classifies; "
                                 f"a {self.task.type} task needs a generative student (kind: lora)")
        return self

    @model_validator(mode="after")
    def _routing_student_exists(self) -> "ProjectConfig":
        names = [s.name for s in self.students]
        if self.routing.student is not None and self.routing.student not in names:
            raise ValueError(
                f"routing.student '{self.routing.student}' is not one of the students: {', '.join(names)}"
            )
        return self

    def student(self, name: str) -> StudentConfig:
        for s in self.students:
            if s.name == name:
                return s
        raise UnknownStudent(f"no student named '{name}' in stillroom.yaml (have: {', '.join(s.name for s in self.students)})")

    def database_url(self, workspace: Path) -> str:
        return (
            os.environ.get("STILLROOM_DB_URL")
            or self.database.url
            or f"sqlite:///{(workspace / 'stillroom.db').resolve()}"
        )


def _check_pseudo_labellers(students: list[StudentConfig], by_name: dict[str, StudentConfig], task_type: str) -> None:
    """Each `pseudo_labels.student` names a student here, the task classifies, and no student depends on
    itself through labellers and ensemble members (each would wait for the other to be trained)."""
    def needs(s: StudentConfig) -> list[str]:
        return list(s.members or []) + ([s.pseudo_labels.student] if s.pseudo_labels else [])

    for s in students:
        if s.pseudo_labels is None:
            continue
        if task_type != "classification":
            raise ValueError(f"student {s.name}: pseudo_labels needs a classification task (this one is "
                             f"{task_type}); a generative student's answers are not confident labels")
        if s.pseudo_labels.student not in by_name:
            raise ValueError(f"student {s.name}: pseudo_labels.student '{s.pseudo_labels.student}' is not a "
                             f"student here (students: {', '.join(by_name)})")
    for s in students:
        todo = [(n, [s.name, n]) for n in needs(s)]
        while todo:
            name, path = todo.pop()
            if name == s.name:
                raise ValueError(f"students {' -> '.join(path)}: each needs the next trained first, "
                                 "so none can be; break the loop in pseudo_labels or members")
            if name in by_name and len(path) <= len(by_name) + 1:
                todo += [(n, path + [n]) for n in needs(by_name[name])]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _problem(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "missing":
        return f"{loc}: missing; this field is required"
    if kind == "extra_forbidden":
        return f"{loc}: unknown field (value {_describe(err['input'])}); check the spelling"
    msg = err["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else "invalid value"
    return f"{loc}: {msg} (got {_describe(err['input'])})"


def parse_config(data: Any, source: Path | str = CONFIG_FILE) -> ProjectConfig:
    """Validate an already-parsed mapping; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"the file must hold a mapping of sections, got {type(data).__name__}"])
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_problem(e) for e in exc.errors()]) from None


def load_config(path: Path) -> ProjectConfig:
    """Read and validate `stillroom.yaml`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, [f"no such file; run `stillroom init {path.parent}` to create one"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(path, [f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text ({exc})"]) from None
    return parse_config(data, path)

"""A project: a folder with `stillroom.yaml` and a `.stillroom/` workspace holding the store and artifacts."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from stillroom.errors import StillroomError
from stillroom.config import CONFIG_FILE, WORKSPACE_DIR, ProjectConfig, load_config
from stillroom.store.db import Store
from stillroom.tasks import make_task

TEMPLATE = """\
# stillroom project file. Every field is documented in docs/config.md.
task:
  name: {name}
  type: classification
  labels:
    - name: billing
      description: charges, invoices, payment methods
    - name: shipping
      description: delivery status, addresses, tracking
    - name: other
      description: anything else
  teacher_prompt: |
    Classify the customer message into exactly one of these labels:
    {{label_descriptions}}

    Message: {{input}}

    Answer with the label name only.
  student_input_format: "{{input}}"

# Files `stillroom run` imports (or use `stillroom import FILE`), for example:
#   data:
#     - path: data/logged.jsonl      # OpenAI chat format; the assistant turn is the teacher's answer
#     - path: data/reviewed.csv      # input,output columns
#       role: human
data: []

teacher:
  # recorded: answers imported from logs (enough to train and evaluate). `stillroom serve` needs a
  # live teacher for fallback: openai (any OpenAI-compatible URL) or local (in-process SmolLM2).
  backend: recorded
  model: gpt-4o-mini
  # base_url: https://api.openai.com/v1
  # api_key_env: OPENAI_API_KEY
  price_per_million_input_tokens: 0.15
  price_per_million_output_tokens: 0.60

students:
  - name: encoder
    kind: encoder          # all-MiniLM-L6-v2 embeddings + logistic regression
  - name: lora
    kind: lora             # LoRA on SmolLM2-135M-Instruct, predicts by scoring every label
    # scoring: head        # or: a linear head over the labels, one pass per input (many labels)
    # layers: 8            # keep the base's first 8 of 30 layers: ~3.5x cheaper per input, less accurate
    rank: 16
    learning_rate: 0.0003
    epochs: 3

split: {{train: 0.6, validation: 0.1, calibration: 0.1, eval: 0.2, seed: 0}}

gate:
  preset: standard         # standard: 3 points allowed gap; high_stakes: 1 point
  # max_gap_points: 2.0

routing:
  target_agreement: 0.99   # the student answers only where it agrees with the teacher this often

costs:
  student_hosting_per_hour: 0.10
  project_cost: 2000

volume:
  requests_per_month: 1000000
  input_tokens_per_request: 150
  output_tokens_per_request: 5
"""


class ProjectError(StillroomError):
    """A project-level problem a user can fix; the message says how."""


def init_project(directory: Path, name: str | None = None, force: bool = False) -> Path:
    """Scaffold `stillroom.yaml` and the `.stillroom/` workspace; returns the config path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / CONFIG_FILE
    if cfg.exists() and not force:
        raise ProjectError(f"{cfg} already exists; pass --force to overwrite it")
    cfg.write_text(TEMPLATE.format(name=name or directory.resolve().name), encoding="utf-8")
    (directory / WORKSPACE_DIR / "artifacts").mkdir(parents=True, exist_ok=True)
    return cfg


class Project:
    """An opened project. The store is opened (and migrated) on first use."""

    def __init__(self, root: Path, config: ProjectConfig):
        self.root = Path(root).resolve()
        self.config = config
        self.task = make_task(config.task)

    @classmethod
    def open(cls, root: Path | str = ".") -> "Project":
        root = Path(root)
        if root.is_file():
            root = root.parent
        return cls(root, load_config(root / CONFIG_FILE))

    @property
    def workspace(self) -> Path:
        return self.root / WORKSPACE_DIR

    @property
    def artifacts(self) -> Path:
        return self.workspace / "artifacts"

    @cached_property
    def store(self) -> Store:
        return Store(self.config.database_url(self.workspace))

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()

"""The current schema, as SQLAlchemy Core tables (the migrations build exactly this)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)


def define(metadata: MetaData, upto: int = 10**6) -> dict[str, Table]:
    """Declare the schema as of migration `upto` on `metadata`.

    Each block below is guarded by the migration that added it, so migration N can create exactly
    the tables new at N (`migrations.create_added_tables`). Adding a table: a new guarded block and
    a new migration module. Changing an existing column: an explicit ALTER in a new migration, and
    the declaration here updated to match."""
    t: dict[str, Table] = {}
    if upto < 1:
        return t
    # m0001: the initial schema
    t["examples"] = Table(
        "examples", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("input", Text, nullable=False),
        Column("content_hash", String(64), nullable=False, unique=True),  # sha256 of the exact input
        Column("norm_hash", String(64), nullable=False, index=True),  # sha256 of case/space-folded input
        Column("source", String(255), nullable=False),
        Column("tags", Text, nullable=False, default="[]"),  # JSON list
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["responses"] = Table(
        "responses", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
        Column("request_hash", String(64), nullable=False, unique=True),
        Column("role", String(16), nullable=False),  # teacher | student | judge
        Column("model", String(255), nullable=False),
        Column("origin", String(16), nullable=False),  # recorded (imported) | live (called by us)
        Column("output", Text, nullable=False),
        Column("input_tokens", Integer),
        Column("output_tokens", Integer),
        Column("cost_usd", Float),
        Column("latency_ms", Float),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["labels"] = Table(
        "labels", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
        Column("label", Text, nullable=False),
        Column("provenance", String(16), nullable=False),  # recorded | teacher | human
        Column("response_id", Integer, ForeignKey("responses.id")),
        Column("decided_by", String(255), nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["splits"] = Table(
        "splits", metadata,
        Column("example_id", Integer, ForeignKey("examples.id"), primary_key=True),
        Column("split", String(16), nullable=False, index=True),  # train|validation|calibration|eval
        Column("seed", Integer, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["eval_locks"] = Table(
        "eval_locks", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("manifest_sha256", String(64), nullable=False),
        Column("n_examples", Integer, nullable=False),
        Column("manifest", Text, nullable=False),  # JSON: [[example_id, content_hash], ...]
        Column("reason", Text, nullable=False),
        Column("active", Boolean, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["training_runs"] = Table(
        "training_runs", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("student", String(255), nullable=False, index=True),
        Column("kind", String(32), nullable=False),
        Column("status", String(16), nullable=False),  # running | finished | failed
        Column("config", Text, nullable=False),  # JSON
        Column("data_fingerprint", String(64), nullable=False),
        Column("lock_id", Integer, ForeignKey("eval_locks.id")),
        Column("artifact_path", Text),
        Column("metrics", Text),  # JSON
        Column("error", Text),
        Column("started_at", DateTime(timezone=True), nullable=False),
        Column("finished_at", DateTime(timezone=True)),
    )
    t["predictions"] = Table(
        "predictions", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", Integer, ForeignKey("training_runs.id"), nullable=False, index=True),
        Column("example_id", Integer, ForeignKey("examples.id"), nullable=False),
        Column("label", Text, nullable=False),
        Column("confidence", Float, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["evaluations"] = Table(
        "evaluations", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("run_id", Integer, ForeignKey("training_runs.id"), index=True),
        Column("lock_id", Integer, ForeignKey("eval_locks.id"), nullable=False),
        Column("kind", String(32), nullable=False),  # eval | calibration
        Column("metrics", Text, nullable=False),  # JSON
        Column("created_at", DateTime(timezone=True), nullable=False),
    )
    t["routed_requests"] = Table(
        "routed_requests", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("request_id", String(64), nullable=False, index=True),
        Column("model", String(255)),
        Column("input", Text),
        Column("route", String(16), nullable=False),  # student | teacher | error
        Column("student", String(255)),
        Column("student_label", Text),
        Column("student_confidence", Float),
        Column("threshold", Float),
        Column("output", Text),
        Column("status_code", Integer, nullable=False),
        Column("error", Text),
        Column("input_tokens", Integer),
        Column("output_tokens", Integer),
        Column("cost_usd", Float),
        Column("latency_ms", Float),
        Column("created_at", DateTime(timezone=True), nullable=False, index=True),  # monitoring windows
    )
    t["stage_runs"] = Table(
        "stage_runs", metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("stage", String(64), nullable=False, index=True),
        Column("fingerprint", String(64), nullable=False),
        Column("summary", Text),  # JSON
        Column("finished_at", DateTime(timezone=True), nullable=False),
    )
    if upto >= 2:  # m0002: labeling engine
        pass
    if upto >= 3:  # m0003: curation
        pass
    if upto >= 4:  # m0004: evaluation
        pass
    if upto >= 5:  # m0005: exports
        pass
    return t


metadata = MetaData()
TABLES = define(metadata)
examples = TABLES["examples"]
responses = TABLES["responses"]
labels = TABLES["labels"]
splits = TABLES["splits"]
eval_locks = TABLES["eval_locks"]
training_runs = TABLES["training_runs"]
predictions = TABLES["predictions"]
evaluations = TABLES["evaluations"]
routed_requests = TABLES["routed_requests"]
stage_runs = TABLES["stage_runs"]

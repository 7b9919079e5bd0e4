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
        Column("status", String(16), nullable=False),  # running | finished | failed | trial (m0007)
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
        # One row per paid teacher call, written before it is sent: a row still 'pending' after a
        # crash was in flight, and is re-sent with the same request hash as its Idempotency-Key.
        t["label_intents"] = Table(
            "label_intents", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("request_hash", String(64), nullable=False, unique=True),  # = responses.request_hash
            Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("sample", Integer, nullable=False),
            Column("model", String(255), nullable=False),
            Column("status", String(16), nullable=False, index=True),  # pending | done | failed
            Column("attempts", Integer, nullable=False, default=0),
            Column("error", Text),  # why it failed (last error after the retries)
            Column("batch_id", Integer, ForeignKey("label_batches.id")),  # sent in a batch job
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
        # Provider batch jobs: persisted before and after submission so a restart resumes polling.
        t["label_batches"] = Table(
            "label_batches", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("model", String(255), nullable=False),
            Column("base_url", Text, nullable=False),
            Column("status", String(24), nullable=False, index=True),  # submitting | submitted | done | failed
            Column("input_file_id", String(255)),
            Column("provider_batch_id", String(255)),
            Column("provider_status", String(32)),
            Column("output_file_id", String(255)),
            Column("error_file_id", String(255)),
            Column("n_requests", Integer, nullable=False),
            Column("error", Text),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
        )
        # What review should look at: low agreement, ties, invalid teacher answers, rejected or
        # truncated inputs. `key` makes re-running a labeling pass add no duplicates.
        t["label_flags"] = Table(
            "label_flags", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("key", String(64), nullable=False, unique=True),
            Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            # low_agreement | tie | no_valid_answer | invalid_output | bad_input | truncated | encoding
            Column("kind", String(32), nullable=False, index=True),
            Column("detail", Text, nullable=False),
            Column("model", String(255)),
            Column("agreement", Float),
            Column("response_id", Integer, ForeignKey("responses.id")),
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
    if upto >= 3:  # m0003: curation
        from sqlalchemy import LargeBinary, UniqueConstraint

        t["review_flags"] = Table(  # items a reviewer must see (low consensus, conflicting near-dups, ...)
            "review_flags", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("reason", Text, nullable=False),
            Column("source", String(64), nullable=False),  # who flagged: labeling | dedupe | ...
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
        t["review_decisions"] = Table(  # append-only; the latest per example is in force
            "review_decisions", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("decision", String(16), nullable=False),  # accept | fix | discard
            Column("label", Text),  # the reviewer's label, for fix
            Column("reviewer", String(255), nullable=False),
            Column("source", Text, nullable=False),  # file:line the decision came from
            Column("note", Text),
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
        t["redactions"] = Table(  # redacted copies; the original example (and its hash) is never rewritten
            "redactions", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("source_hash", String(64), nullable=False),  # sha256 of the original text
            Column("field", String(16), nullable=False),  # input | output
            Column("config_hash", String(64), nullable=False),  # the PII settings that produced it
            Column("redacted_text", Text, nullable=False),
            Column("findings", Text, nullable=False),  # JSON [[type, start, end], ...]; never the values
            Column("n_findings", Integer, nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
            UniqueConstraint("source_hash", "field", "config_hash", name="uq_redactions_source"),
        )
        t["embedding_cache"] = Table(
            "embedding_cache", metadata,
            Column("content_hash", String(64), primary_key=True),
            Column("model", String(64), primary_key=True),
            Column("vector", LargeBinary, nullable=False),  # float32, L2-normalised
        )
        t["exclusions"] = Table(  # why curation took an example out of training
            "exclusions", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("example_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("reason", String(32), nullable=False),  # eval_near_duplicate | train_near_duplicate
            Column("detail", Text, nullable=False),  # JSON
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
        t["dataset_versions"] = Table(
            "dataset_versions", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("manifest_sha256", String(64), nullable=False, index=True),
            Column("n_examples", Integer, nullable=False),
            Column("n_rows", Integer, nullable=False),  # with oversampled copies
            Column("lock_id", Integer, ForeignKey("eval_locks.id")),
            Column("path", Text, nullable=False),
            Column("manifest", Text, nullable=False),  # JSON, as in <path>/manifest.json
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
    if upto >= 4:  # m0004: evaluation
        # One row per LLM-judge call (after retries); verdict NULL = unparseable, recorded as missing.
        t["judge_scores"] = Table(
            "judge_scores", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("evaluation_id", Integer, ForeignKey("evaluations.id"), index=True),
            Column("student", String(255), nullable=False, index=True),
            Column("run_id", Integer, ForeignKey("training_runs.id")),
            Column("item_key", String(255), nullable=False),
            Column("kind", String(16), nullable=False),  # pairwise | rubric
            Column("position", String(16)),  # pairwise: student_first | teacher_first
            Column("candidate", String(16)),  # rubric: student | teacher
            Column("verdict", String(16)),  # A | B | tie | 1..5; NULL when missing
            Column("score", Float),  # pairwise: the student's points (1, 0.5, 0); rubric: 1-5
            Column("attempts", Integer, nullable=False),
            Column("raw", Text, nullable=False),  # JSON list: every reply, all attempts
            Column("judge_model", String(255), nullable=False),
            Column("prompt_name", String(64), nullable=False),
            Column("prompt_version", String(32), nullable=False),
            Column("prompt_sha256", String(64), nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
    if upto >= 5:  # m0005: exports
        from sqlalchemy import BigInteger  # a merged 7B model is 28 GB: past a 32-bit INTEGER

        t["artifacts"] = Table(
            "artifacts", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("run_id", Integer, ForeignKey("training_runs.id"), nullable=False, index=True),
            Column("format", String(16), nullable=False),  # adapter | merged | int8 | gguf-f16 | gguf-q8_0
            Column("path", Text, nullable=False),
            Column("sha256", String(64), nullable=False),  # of the folder's manifest (path, file hash) list
            Column("size_bytes", BigInteger, nullable=False),
            Column("metrics", Text),  # JSON: re-evaluation on the locked eval split vs the fp32 student
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
    if upto >= 7:  # m0007: run tags (declared on the m0001 table; the migration ALTERs it)
        runs = t["training_runs"]
        # status gains "trial": a sweep's run, kept out of `latest_run` until it is promoted.
        runs.append_column(Column("sweep_id", String(64)))  # the sweep that trained it
        runs.append_column(Column("provenance", String(16)))  # trained | imported; NULL: trained
    if upto >= 6:  # m0006: augmentation
        from sqlalchemy import UniqueConstraint

        # One teacher paraphrase call per parent example, recorded before the call is sent (its
        # intent is in label_intents under the same request hash, its answer in responses with role
        # 'augment'); the messages and params are kept so a resumed run sends the identical call.
        t["augment_requests"] = Table(
            "augment_requests", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("request_hash", String(64), nullable=False, unique=True),
            Column("parent_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("k", Integer, nullable=False),  # paraphrases asked for
            Column("prompt_version", String(32), nullable=False),
            Column("model", String(255), nullable=False),
            Column("messages", Text, nullable=False),  # JSON
            Column("params", Text, nullable=False),  # JSON: max_tokens, temperature
            Column("created_at", DateTime(timezone=True), nullable=False),
        )
        # Every paraphrase a request returned (position -1: an answer that did not parse at all).
        t["augmentations"] = Table(
            "augmentations", metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("request_id", Integer, ForeignKey("augment_requests.id"), nullable=False, index=True),
            Column("parent_id", Integer, ForeignKey("examples.id"), nullable=False, index=True),
            Column("position", Integer, nullable=False),
            Column("text", Text),  # the paraphrase as returned (NULL when the answer did not parse)
            Column("example_id", Integer, ForeignKey("examples.id"), unique=True),  # the augmented example
            Column("status", String(16), nullable=False, index=True),  # kept | unverified | dropped | rejected
            Column("reason", Text),  # why rejected or dropped: "<code>: <detail>"
            Column("label", Text),  # the parent's training label when the paraphrase was accepted
            Column("verified_label", Text),  # the teacher's own label for it (--verify)
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("updated_at", DateTime(timezone=True), nullable=False),
            UniqueConstraint("request_id", "position", name="uq_augmentations_position"),
        )
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

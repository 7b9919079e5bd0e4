"""The curated training set, and its versions.

`curated_rows` is the one definition of what trains: the train and validation splits (dedupe
exclusions are already out of them), with review decisions applied (a fix replaces the label, a
discard drops the example), labels outside the label set left out (QC), teacher paraphrases
(augment) in train only with their parent's label, and train-only oversampling (balance).
`stillroom train` reads it; `snapshot` freezes it as a dataset version:
an id, a manifest of content hashes (in the store and in `.stillroom/datasets/<id>/manifest.json`)
and exports for OpenAI fine-tuning (JSONL), Parquet, and the chat-messages JSONL that TRL and
Axolotl read. Exported text is PII-redacted (`curate/pii.py`); the manifest keeps the original's
content hash, so every exported row traces back to its example.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select, update

from stillroom.errors import StillroomError
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import all_examples, split_assignments

__all__ = ["CuratedRow", "curated_rows", "training_pairs", "snapshot", "list_versions", "DatasetError", "FORMATS"]

FORMATS = ("openai", "parquet", "chat")
TRAINING_SPLITS = ("train", "validation")


class DatasetError(StillroomError):
    """A dataset version cannot be built or exported; the message says why."""


@dataclass
class CuratedRow:
    example_id: int
    input: str
    content_hash: str
    split: str  # train | validation
    label: str
    label_source: str  # teacher | review | augmented
    copies: int  # > 1: oversampled (train only)
    augmented_from: int | None = None  # the parent example of a teacher paraphrase (train only)


def curated_rows(project) -> list[CuratedRow]:
    """Train and validation rows after QC, dedupe exclusions, review decisions, augmentation and
    balance, by id."""
    from stillroom.curate.augment import apply_to_training_labels
    from stillroom.curate.balance import plan_copies
    from stillroom.curate.review import review_flags, training_labels

    with project.store.engine.connect() as conn:
        labels, source = training_labels(conn, task=project.task)
        splits = split_assignments(conn)
        flagged = set(review_flags(conn))
        examples = all_examples(conn)
        parents = apply_to_training_labels(conn, labels, source, splits)
    train = {ex: lab for ex, lab in labels.items() if splits.get(ex) == "train"}
    copies = plan_copies(train, flagged & train.keys(), project.config.curation.balance, task=project.task)
    return [CuratedRow(ex, examples[ex].input, examples[ex].content_hash, splits[ex], labels[ex], source[ex],
                       copies.get(ex, 1), parents.get(ex))
            for ex in sorted(labels) if splits.get(ex) in TRAINING_SPLITS]


def training_pairs(project) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation) as (input, label) pairs; oversampled train rows repeated, paraphrases in train only."""
    rows = curated_rows(project)
    train = [(r.input, r.label) for r in rows if r.split == "train" for _ in range(r.copies)]
    val = [(r.input, r.label) for r in rows if r.split == "validation"]
    return train, val


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _formats(formats) -> list[str]:
    explicit = formats is not None
    chosen = list(dict.fromkeys(formats or FORMATS))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise DatasetError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    if "parquet" in chosen:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            if explicit:
                raise DatasetError("the Parquet export needs pyarrow: pip install 'stillroom[curate]'") from None
            chosen.remove("parquet")
    return chosen


def _files_intact(path: Path, manifest: dict) -> bool:
    return all((path / name).is_file() and _sha((path / name).read_bytes()) == meta["sha256"]
               for name, meta in manifest.get("files", {}).items()) and (path / "manifest.json").is_file()


def snapshot(project, formats: list[str] | None = None) -> dict:
    """Freeze the curated training set as a dataset version and export it; an unchanged set returns
    the existing version. Refuses while the eval lock is broken or training copies an eval input."""
    from stillroom.curate.lock import check_no_leakage, verify_lock
    from stillroom.curate.pii import config_hash, redacted_copy
    from stillroom.curate.split import stratum_of

    lock = verify_lock(project)
    check_no_leakage(project)
    chosen = _formats(formats)
    rows = curated_rows(project)
    if not any(r.split == "train" for r in rows):
        raise DatasetError("the curated train split is empty; import data and run `stillroom split` first")
    task, pii = project.task, project.config.curation.pii
    table = T.TABLES["dataset_versions"]
    with project.store.engine.begin() as conn:
        instances, entries = [], []
        for r in rows:
            text = redacted_copy(conn, r.input, "input", pii)
            answer = redacted_copy(conn, r.label, "output", pii)
            prompt = task.student_input(text)
            instances.append((r, text, prompt, answer))
            entry = {"example_id": r.example_id, "content_hash": r.content_hash, "split": r.split,
                     "label": r.label, "label_source": r.label_source, "copies": r.copies,
                     "redacted": text != r.input, "prompt_sha256": _sha(prompt)}
            if r.augmented_from is not None:  # only then, so versions taken before augmentation keep their hash
                entry["augmented_from"] = r.augmented_from
            entries.append(entry)
        identity = {"examples": entries, "labels": task.labels, "formats": chosen,
                    "student_input_format": project.config.task.student_input_format, "pii": config_hash(pii)}
        digest = _sha(json.dumps(identity, sort_keys=True, ensure_ascii=False))
        for row in conn.execute(select(table).where(table.c.manifest_sha256 == digest).order_by(table.c.id.desc())):
            manifest = json.loads(row.manifest)
            if _files_intact(Path(row.path), manifest):
                return {**_summary(manifest, row.path), "created": False}

        created = now()
        version_id = conn.execute(insert(table).values(
            manifest_sha256=digest, n_examples=len(rows), n_rows=sum(r.copies for r in rows), lock_id=lock.id,
            path="", manifest="{}", created_at=created)).inserted_primary_key[0]
        out = project.workspace / "datasets" / str(version_id)
        if out.exists():  # left by a failed attempt whose row was rolled back
            shutil.rmtree(out)
        try:
            files = _export(out, instances, chosen)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        by_split = Counter()
        for r in rows:
            by_split[r.split] += r.copies
        manifest = {
            "id": version_id, "created_at": created.isoformat(), "manifest_sha256": digest,
            "eval_lock": {"id": lock.id, "manifest_sha256": lock.manifest_sha256},
            "task": {"name": task.name, "labels": task.labels,
                     "student_input_format": project.config.task.student_input_format},
            "curation": project.config.curation.model_dump(mode="json"), "pii_config_hash": config_hash(pii),
            "counts": {"examples": len(rows), "rows": sum(r.copies for r in rows), "rows_by_split": dict(by_split),
                       "oversampled_rows": sum(r.copies - 1 for r in rows),
                       "augmented_examples": sum(r.augmented_from is not None for r in rows),
                       "augmented_rows": sum(r.copies for r in rows if r.augmented_from is not None),
                       "reviewed_labels": sum(r.label_source == "review" for r in rows),
                       "redacted_examples": sum(e["redacted"] for e in entries),
                       # by label; extraction: by the fields stated; generation: one group
                       "train_rows_by_label": dict(sorted(Counter(
                           stratum_of(task, r.label) for r in rows if r.split == "train" for _ in range(r.copies)).items()))},
            "files": files, "examples": entries,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        conn.execute(update(table).where(table.c.id == version_id).values(
            path=str(out), manifest=json.dumps(manifest, ensure_ascii=False)))
    return {**_summary(manifest, str(out)), "created": True}


def _export(out: Path, instances, formats: list[str]) -> dict:
    files: dict[str, dict] = {}

    def messages(prompt: str, answer: str) -> list[dict]:
        # No system message: the built-in LoRA student trains on the bare user turn (train/lora.py).
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    expanded = [(r, text, prompt, answer) for r, text, prompt, answer in instances
                for _ in range(r.copies if r.split == "train" else 1)]
    for split in TRAINING_SPLITS:
        part = [x for x in expanded if x[0].split == split]
        if not part:
            continue
        if "openai" in formats:  # exactly the fine-tuning file shape: one "messages" list per line
            _write_jsonl(out / "openai" / f"{split}.jsonl", [{"messages": messages(p, a)} for _, _, p, a in part])
        if "chat" in formats:  # TRL SFTTrainer / Axolotl `type: chat_template`, plus provenance columns
            _write_jsonl(out / "chat" / f"{split}.jsonl", [
                {"messages": messages(p, a), "example_id": r.example_id, "label": r.label, "split": split}
                for r, _, p, a in part])
    if "parquet" in formats:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {
            "example_id": [r.example_id for r, *_ in expanded],
            "split": [r.split for r, *_ in expanded],
            "input": [text for _, text, _, _ in expanded],
            "prompt": [p for _, _, p, _ in expanded],
            "label": [r.label for r, *_ in expanded],
            "label_source": [r.label_source for r, *_ in expanded],
            "content_hash": [r.content_hash for r, *_ in expanded],
            "messages": [messages(p, a) for _, _, p, a in expanded],
        }
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), out / "dataset.parquet")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        rows = len(expanded) if name.endswith(".parquet") else sum(1 for _ in open(path, encoding="utf-8"))
        files[name] = {"sha256": _sha(path.read_bytes()), "rows": rows}
    return files


def _summary(manifest: dict, path: str) -> dict:
    return {"id": manifest["id"], "path": path, "manifest_sha256": manifest["manifest_sha256"],
            "created_at": manifest["created_at"], "counts": manifest["counts"], "files": manifest["files"]}


def list_versions(project) -> list[dict]:
    table = T.TABLES["dataset_versions"]
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(table.c.id, table.c.manifest_sha256, table.c.n_examples, table.c.n_rows,
                                   table.c.lock_id, table.c.path, table.c.created_at).order_by(table.c.id)).all()
    return [{"id": r.id, "manifest_sha256": r.manifest_sha256, "examples": r.n_examples, "rows": r.n_rows,
             "lock_id": r.lock_id, "path": r.path, "created_at": r.created_at.isoformat()} for r in rows]

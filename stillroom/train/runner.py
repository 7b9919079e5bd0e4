"""The train stage for a project: guard the locked eval set, train one student, record the run."""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Callable

from stillroom.config import CONFIG_FILE, ConfigError, StudentConfig
from stillroom.curate.lock import check_no_leakage, verify_lock
from stillroom.project import Project, ProjectError
from stillroom.store.records import finish_run, latest_run, start_run
from stillroom.train.registry import trainer


def _student_args(student: StudentConfig):
    if student.kind == "encoder":
        from stillroom.train.encoder import EncoderConfig

        return EncoderConfig(head=student.head, seed=student.seed)
    from stillroom.train.lora import LoraConfig

    return LoraConfig(base_model=student.base_model, rank=student.rank, alpha=student.alpha,
                      learning_rate=student.learning_rate, epochs=student.epochs,
                      batch_size=student.batch_size, seed=student.seed)


def training_data(project: Project) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The curated train/validation pairs: review fixes and discards, dedupe exclusions, balance."""
    from stillroom.curate.datasets import training_pairs

    return training_pairs(project)


def fingerprint(project: Project, student: StudentConfig, lock_sha: str,
                train: list[tuple[str, str]], val: list[tuple[str, str]]) -> str:
    """Everything a trained student depends on: data, labels, eval lock, task format and config."""
    h = hashlib.sha256()
    payload = {"train": train, "val": val, "lock": lock_sha, "labels": project.task.labels,
               "format": project.config.task.student_input_format,
               "student": student.model_dump(mode="json")}
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def train_student(project: Project, name: str, force: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Train the named student unless an identical run already finished; returns the run record."""
    student = project.config.student(name)
    lock = verify_lock(project)
    check_no_leakage(project)
    train, val = training_data(project)
    if not train:
        raise ProjectError("the train split is empty; import data and run `stillroom split` first")
    fp = fingerprint(project, student, lock.manifest_sha256, train, val)
    with project.store.engine.connect() as conn:
        previous = latest_run(conn, name)
    if previous and previous["data_fingerprint"] == fp and not force:
        previous["skipped"] = True
        return previous

    try:
        args = _student_args(student)  # validates the config before a run is recorded
    except ValueError as exc:
        raise ConfigError(project.root / CONFIG_FILE, [f"students.{name}: {exc}"]) from None
    with project.store.engine.begin() as conn:
        run_id = start_run(conn, name, student.kind, student.model_dump(mode="json"), fp, lock.id)
    out_dir = project.artifacts / "students" / f"{name}-run{run_id}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    try:
        result = trainer(student.kind)(train, val, project.task.labels, out_dir, args,
                                       student_format=project.config.task.student_input_format,
                                       progress=progress)
    except BaseException as exc:
        with project.store.engine.begin() as conn:
            finish_run(conn, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    with project.store.engine.begin() as conn:
        finish_run(conn, run_id, "finished", str(result.path), result.metrics)
        run = latest_run(conn, name)
    run["skipped"] = False
    return run

"""The train stage for a project: guard the locked eval set, train one student, record the run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

from stillroom.config import CONFIG_FILE, ConfigError, StudentConfig
from stillroom.curate.lock import check_no_leakage, verify_lock
from stillroom.project import Project, ProjectError
from stillroom.store import tables as T
from stillroom.store.records import finish_run, latest_run, start_run
from stillroom.train import distributed
from stillroom.train.registry import trainer


def _student_args(student: StudentConfig):
    if student.kind == "ensemble":  # no settings of its own: its members carry them
        return None
    if student.kind == "encoder":
        from stillroom.train.encoder import EncoderConfig

        return EncoderConfig(head=student.head, seed=student.seed, finetune=student.finetune,
                             finetune_pairs=student.finetune_pairs, finetune_epochs=student.finetune_epochs,
                             label_names=student.label_names, base_model=student.base_model)
    from stillroom.train.lora import LoraConfig

    return LoraConfig(base_model=student.base_model, rank=student.rank, alpha=student.alpha,
                      learning_rate=student.learning_rate, epochs=student.epochs,
                      batch_size=student.batch_size, seed=student.seed,
                      full=student.kind == "full", quantization=student.quantization,
                      checkpoint_every=student.checkpoint_every, precision=student.precision,
                      compile=student.compile, scoring=student.scoring, layers=student.layers)


def student_format(project: Project) -> str:
    """The task's student input template with everything but `{input}` filled in (labels, the
    schema), so a saved student formats its inputs on its own."""
    marker = "\u0000STILLROOM-INPUT\u0000"
    rendered = project.task.student_input(marker)
    return rendered.replace("{", "{{").replace("}", "}}").replace(marker, "{input}")


def _resumable_run(conn, name: str, fp: str, folder) -> int | None:
    """A run of these same inputs that failed or was killed, with a checkpoint left to resume from."""
    from sqlalchemy import select

    from stillroom.train.lora import CHECKPOINT_DIR

    runs = T.training_runs
    row = conn.execute(select(runs.c.id, runs.c.status).where(
        runs.c.student == name, runs.c.data_fingerprint == fp).order_by(runs.c.id.desc()).limit(1)).first()
    if row is None or row.status not in ("failed", "running"):
        return None
    ckpt = folder(row.id) / CHECKPOINT_DIR / "state.pt"
    return row.id if ckpt.is_file() else None


def training_data(project: Project) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The curated train/validation pairs: review fixes and discards, dedupe exclusions, balance."""
    from stillroom.curate.datasets import training_pairs

    return training_pairs(project)


def run_config(student: StudentConfig) -> dict:
    """The config a run records and is fingerprinted by: the student without its sweep grid
    (editing the grid does not change what a plain `stillroom train` produces) or `compile`. `members`,
    `pseudo_labels`, `layers` and `scoring` (other than "labels") only when set, so runs recorded before those
    fields existed keep their fingerprint;
    `base_model` only when the kind has one (not an ensemble)."""
    unset = {f for f in ("members", "pseudo_labels", "base_model", "layers") if getattr(student, f) is None}
    if student.scoring == "labels":  # the default, left out like the fields above (runs before it existed)
        unset.add("scoring")
    # compile changes how the forward is computed, not the model (the same to rounding): left out
    return student.model_dump(mode="json", exclude={"sweep", "compile"} | unset)


def configured_student(project: Project, name: str, overrides: dict | None = None) -> StudentConfig:
    """The named student from stillroom.yaml, with `overrides` (field -> value) applied and validated."""
    student = project.config.student(name)
    if not overrides:
        return student
    from pydantic import ValidationError

    try:
        # Only the fields the file set, plus the overrides: validators that look at which fields
        # were given (kind-specific settings) see what a user would have written.
        return StudentConfig.model_validate({**student.model_dump(exclude_unset=True), **overrides})
    except ValidationError as exc:
        problems = [f"students.{name}.{'.'.join(str(p) for p in e['loc'])}: "
                    f"{e['msg'].removeprefix('Value error, ')} (got {e['input']!r})" for e in exc.errors()]
        raise ConfigError(project.root / CONFIG_FILE, problems) from None


def _same_run(conn, name: str, fp: str) -> dict | None:
    """The newest finished or trial run of `name` with this fingerprint whose folder still exists."""
    import json
    from pathlib import Path

    from sqlalchemy import select

    runs = T.TABLES["training_runs"]
    for row in conn.execute(select(runs).where(
            runs.c.student == name, runs.c.data_fingerprint == fp,
            runs.c.status.in_(("finished", "trial"))).order_by(runs.c.id.desc())):
        run = dict(row._mapping)
        if run["artifact_path"] and Path(run["artifact_path"]).is_dir():
            run["config"] = json.loads(run["config"])
            run["metrics"] = json.loads(run["metrics"] or "{}")
            return run
    return None


def fingerprint(project: Project, student: StudentConfig, lock_sha: str,
                train: list[tuple[str, str]], val: list[tuple[str, str]]) -> str:
    """Everything a trained student depends on: data, labels, eval lock, task format and config."""
    h = hashlib.sha256()
    payload = {"train": train, "val": val, "lock": lock_sha, "labels": project.task.labels,
               "format": project.config.task.student_input_format,
               "student": run_config(student)}
    h.update(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _ensemble_members(project: Project, student: StudentConfig, progress) -> list[dict]:
    """Train (or reuse) each member of an ensemble; return what the ensemble is built from: each
    member's run and the artifact it deploys (`students[].deploy`)."""
    from stillroom.evaluate.evaluator import deployed_model_path
    from stillroom.train.export import export_deployed

    out = []
    for member in student.members:
        run = train_student(project, member, progress=progress)
        deploy = project.config.student(member).deploy
        if deploy != "fp32":  # exported (and re-evaluated) for this run unless it already is
            export_deployed(project, member)
        out.append({"name": member, "run_id": run["id"], "deploy": deploy,
                    "path": deployed_model_path(project, member)})
    return out


def train_student(project: Project, name: str, force: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  overrides: dict | None = None, sweep_id: str | None = None) -> dict:
    """Train the named student unless an identical run already finished; returns the run record.

    Identical means the same fingerprint (data, eval lock, config). When the current run differs but
    an earlier finished run or sweep trial is identical and its folder still exists, that run becomes
    current again (`reused_run` names it) instead of training a second time.

    `overrides` replaces config fields for this run only (a sweep point). With `sweep_id` the run
    is recorded as a trial of that sweep: it does not become the student's current run (the one
    `eval`, `export` and `serve` use) until the sweep promotes it, and an identical earlier run
    (finished or trial) is reused instead of trained again.

    Under torchrun (WORLD_SIZE > 1) every process calls this; rank 0 does all of the above and the
    others train their share of each batch (`distributed.py`) and return a record without writing one."""
    student = configured_student(project, name, overrides)
    world = distributed.world()
    if world.parallel:
        if student.kind not in ("lora", "full") or sweep_id is not None:
            raise ProjectError(f"students.{name} is a{'n' if student.kind[0] in 'ae' else ''} {student.kind} student"
                               f"{' in a sweep' if sweep_id else ''}: only a plain `stillroom train` of lora and "
                               "full students runs across processes (torchrun); train this one as one process")
        if not world.main:  # rank 0 decides, records and writes; this process trains its share
            return _follow(project, student, name)
    told: list[bool] = []

    def tell(decision: dict | None) -> None:
        """Rank 0's decision (train, reuse, or stopped) to the other processes, once."""
        if world.parallel and not told:
            told.append(True)
            distributed.share(decision)

    try:
        return _train_student(project, name, student, force, progress, sweep_id, tell)
    except BaseException:
        tell(None)
        raise


def _follow(project: Project, student: StudentConfig, name: str) -> dict:
    """A process other than rank 0 under torchrun: train on rank 0's rows into rank 0's run folder."""
    from pathlib import Path

    decision = distributed.share()
    if decision is None:
        raise ProjectError(f"training {name} stopped in the first process (rank 0); its output says why")
    run = {"id": decision["run_id"], "skipped": decision["skip"], "reused_run": None, "metrics": {},
           "artifact_path": decision.get("out_dir")}
    if not decision["skip"]:
        result = trainer(student.kind)(decision["train"], decision["val"], project.task.labels,
                                       Path(decision["out_dir"]), _student_args(student),
                                       student_format=student_format(project), task=project.task)
        run["metrics"] = result.metrics
    return run


def _train_student(project: Project, name: str, student: StudentConfig, force: bool, progress, sweep_id, tell):
    lock = verify_lock(project)
    check_no_leakage(project)
    train, val = training_data(project)
    if not train:
        raise ProjectError("the train split is empty; import data and run `stillroom split` first")
    pseudo = None
    if student.pseudo_labels is not None:  # the labeller's confident answers on unlabelled inputs
        from stillroom.train.pseudo import pseudo_labelled_rows

        with distributed.alone():  # under torchrun the labeller runs in rank 0 alone
            rows, pseudo = pseudo_labelled_rows(project, student, progress=progress)
        train = train + rows
    fp = fingerprint(project, student, lock.manifest_sha256, train, val)
    members = None
    if student.kind == "ensemble":  # its members first (each reused when already trained on this data)
        from stillroom.train.ensemble import FIT_OBJECTIVE

        members = _ensemble_members(project, student, progress)
        # a retrained member, or a new way of fitting the weights: a new ensemble
        fp = hashlib.sha256(json.dumps([fp, members, FIT_OBJECTIVE]).encode()).hexdigest()
    with project.store.engine.connect() as conn:
        previous = latest_run(conn, name) if sweep_id is None else _same_run(conn, name, fp)
        earlier = None
        if not force and sweep_id is None and not (previous and previous["data_fingerprint"] == fp):
            earlier = _same_run(conn, name, fp)  # e.g. a config switched back, or a sweep trial
    if earlier is not None:  # that run becomes current again, rather than being trained twice
        from stillroom.train.sweep import promote_run

        promote_run(project, name, earlier["id"])
        with project.store.engine.connect() as conn:
            previous = latest_run(conn, name)
        previous["reused_run"] = earlier["id"]
    if previous and previous["artifact_path"] and not os.path.isdir(previous["artifact_path"]):
        previous = None  # the matching run's folder was deleted: it is trained again, as a new run
    if previous and previous["data_fingerprint"] == fp and not force:
        previous["skipped"] = True
        tell({"skip": True, "run_id": previous["id"]})
        return previous

    try:
        args = _student_args(student)  # validates the config before a run is recorded
    except ValueError as exc:
        raise ConfigError(project.root / CONFIG_FILE, [f"students.{name}: {exc}"]) from None
    folder = lambda run_id: project.artifacts / "students" / f"{name}-run{run_id}"  # noqa: E731
    with project.store.engine.begin() as conn:
        run_id = None if force or student.kind == "encoder" else _resumable_run(conn, name, fp, folder)
        if run_id is not None:  # the trainer finds the checkpoint in the run's folder and resumes
            conn.execute(T.training_runs.update().where(T.training_runs.c.id == run_id).values(
                status="running", error=None, sweep_id=sweep_id))
        else:
            run_id = start_run(conn, name, student.kind, run_config(student), fp, lock.id)
            conn.execute(T.training_runs.update().where(T.training_runs.c.id == run_id).values(
                sweep_id=sweep_id, provenance="trained"))
            if folder(run_id).exists():
                shutil.rmtree(folder(run_id))
    out_dir = folder(run_id)
    tell({"skip": False, "run_id": run_id, "out_dir": str(out_dir), "train": train, "val": val})
    extra = {} if student.kind == "encoder" else {"task": project.task}
    try:
        if members is not None:
            from stillroom.train.ensemble import build_ensemble

            result = build_ensemble([(m["name"], m["path"]) for m in members], val, project.task.labels, out_dir,
                                    progress=progress)
            result.metrics["members"] = members
        else:
            result = trainer(student.kind)(train, val, project.task.labels, out_dir, args,
                                           student_format=student_format(project), progress=progress, **extra)
            if pseudo is not None:
                from stillroom.train.pseudo import write_audit

                result.metrics["pseudo_labels"] = write_audit(out_dir, pseudo)
        from stillroom.train.manifest import write_run_manifest

        write_run_manifest(out_dir, student=run_config(student), fingerprint=fp, lock_sha=lock.manifest_sha256,
                           train=train, val=val, metrics=result.metrics, base_model=getattr(args, "base_model", None),
                           encoder=student.kind == "encoder")
    except BaseException as exc:
        with project.store.engine.begin() as conn:
            finish_run(conn, run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    with project.store.engine.begin() as conn:
        finish_run(conn, run_id, "trial" if sweep_id else "finished", str(result.path), result.metrics)
        run = _same_run(conn, name, fp) if sweep_id else latest_run(conn, name)
    run["skipped"] = False
    return run

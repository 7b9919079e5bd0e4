"""`stillroom sweep`: train a small grid of one student's settings and pick the best on validation.

Every grid point is an ordinary run of `train_student` with config overrides, recorded in
`training_runs` as a *trial* tagged with the sweep's id: it does not replace the student's current
run until the sweep promotes it. The winner is the point with the highest validation agreement with
the teacher; ties go to the cheaper config (smaller base model, then lower rank, then fewer epochs).
Promotion makes the winning run the student's current run and writes its values into
`stillroom.yaml` by replacing only the affected values in the file's text, so comments and layout
stay; when that cannot be done safely, the YAML to paste is returned instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import struct
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable

from stillroom.config import CONFIG_FILE, ConfigError, SweepConfig
from stillroom.errors import StillroomError

__all__ = ["SweepError", "SweepPoint", "sweep_grid", "run_sweep", "pick_winner", "promote_winner", "promote_run", "promote_to_yaml",
           "MAX_POINTS"]

MAX_POINTS = 64
LORA_FIELDS = ("base_model", "rank", "alpha", "learning_rate", "epochs")
ENCODER_FIELDS = ("head", "base_model")
KNOWN_BASE_PARAMS = {"smollm2-135m-instruct": 134_515_008}
HEAD_COST = {"logreg": 0, "mlp": 1}


class SweepError(StillroomError):
    """A sweep that cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: the config fields it overrides."""

    overrides: dict

    def describe(self) -> str:
        o = self.overrides
        if "head" in o:
            return f"head={o['head']}" + (f" {_short_base(o['base_model'])}" if "base_model" in o else "")
        rank = f"r{o['rank']} " if "rank" in o else ""
        return f"{rank}lr{o['learning_rate']:g} e{o['epochs']} {_short_base(o['base_model'])}"


def _short_base(base: str) -> str:
    return Path(base).name if os.sep in base else base


def _dedupe(values: list) -> list:
    return list(dict.fromkeys(values))


def sweep_grid(project, name: str, rank: list[int] | None = None, learning_rate: list[float] | None = None,
               epochs: list[int] | None = None, base_model: list[str] | None = None,
               head: list[str] | None = None) -> list[SweepPoint]:
    """The grid for a student: each list given here replaces the same list of the student's `sweep:`
    block in stillroom.yaml, which replaces the built-in default. Every point is validated."""
    from stillroom.train.runner import _student_args, configured_student

    student = project.config.student(name)
    grid = student.sweep or SweepConfig()
    lora_flags = {"--rank": rank, "--lr": learning_rate, "--epochs": epochs, "--base": base_model}
    if student.kind == "ensemble":
        raise SweepError(f"students.{name} is an ensemble: it has nothing to sweep (its pooling weights are fitted "
                         f"on validation); sweep its members ({', '.join(student.members)}) instead")
    if student.kind == "encoder":
        given = [flag for flag, v in lora_flags.items() if v and flag != "--base"]
        if given:
            raise SweepError(f"students.{name} is an encoder student: {', '.join(given)} only apply to lora "
                             "students; sweep an encoder over its head (--head logreg,mlp) and base (--base)")
        bases = _dedupe(base_model or grid.base_model)  # none: the student's own base, left out of the points
        points = [SweepPoint({"head": h, **({"base_model": b} if b else {})})
                  for b, h in product(bases or [None], _dedupe(head or grid.head))]
    else:
        if head:
            raise SweepError(f"students.{name} is a {student.kind} student: --head only applies to encoder students")
        if student.kind != "lora" and rank:
            raise SweepError(f"students.{name} is a {student.kind} student: --rank only applies to lora students")
        bases = _dedupe(base_model or grid.base_model or [student.base_model])
        ranks = _dedupe(rank or grid.rank) if student.kind == "lora" else [None]
        ratio = student.alpha / student.rank  # LoRA's scale alpha/r is kept as the rank changes
        lora = lambda r: {} if r is None else {"rank": r, "alpha": max(1, round(r * ratio))}  # noqa: E731
        points = [SweepPoint({"base_model": b, **lora(r), "learning_rate": lr, "epochs": e})
                  for b, r, lr, e in product(bases, ranks, _dedupe(learning_rate or grid.learning_rate),
                                             _dedupe(epochs or grid.epochs))]
    if len(points) > MAX_POINTS:
        raise SweepError(f"the grid for '{name}' has {len(points)} points (at most {MAX_POINTS}); give fewer values")
    for point in points:  # every point checked before the first one trains
        candidate = configured_student(project, name, point.overrides)
        try:
            _student_args(candidate)
        except ValueError as exc:
            raise ConfigError(project.root / CONFIG_FILE, [f"students.{name} sweep point {point.describe()}: {exc}"]) \
                from None
    return points


def _base_params(base: str) -> float:
    """Parameter count of a base model from its safetensors headers (no weights read); inf if unknown."""
    if base in KNOWN_BASE_PARAMS:
        return KNOWN_BASE_PARAMS[base]
    folder = Path(base)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return float("inf")
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, meta in header.items():
            if key != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def _cost(row: dict) -> tuple:
    if "head" in row:
        if "base_model" not in row:
            return (0, HEAD_COST.get(row["head"], 9))
        from stillroom.models import encoder_base_dir

        return (_base_params(str(encoder_base_dir(row["base_model"]))), HEAD_COST.get(row["head"], 9))
    return (_base_params(row["base_model"]), row.get("rank", 0), row["epochs"], row["learning_rate"])


def pick_winner(rows: list[dict]) -> dict | None:
    """The row with the best validation score (agreement for classification; the task's mean metric,
    e.g. field F1 or ROUGE-L, for extraction and generation); ties go to the cheaper config."""
    done = [r for r in rows if r["status"] != "failed" and r.get("val_score") is not None]
    if not done:
        return None
    return min(done, key=lambda r: (-round(r["val_score"], 9), _cost(r)))


def _row(point: SweepPoint, run: dict | None, error: str | None = None) -> dict:
    row = dict(point.overrides)
    if run is None:
        return {**row, "run_id": None, "status": "failed", "error": error, "val_agreement": None, "val_score": None,
                "train_seconds": None, "train_tokens_per_s": None}
    m = run["metrics"]
    return {**row, "run_id": run["id"], "status": "reused" if run.get("skipped") else "trained",
            "val_agreement": m.get("val_agreement"),
            "val_score": m["val_score"] if m.get("val_score") is not None else m.get("val_agreement"),
            "train_seconds": m.get("train_seconds"),
            "train_tokens_per_s": m.get("train_tokens_per_s"), "best_epoch": m.get("best_epoch"),
            "artifact": run["artifact_path"], "trained_in_sweep": run.get("sweep_id")}


def run_sweep(project, name: str, points: list[SweepPoint], force: bool = False, promote: bool = False,
              progress: Callable[[int, int, int, int], None] | None = None) -> dict:
    """Train every point (reusing identical earlier runs unless `force`), pick the winner, and
    optionally promote it. `progress(point, n_points, step, total_steps)`. Returns the summary,
    also written to `.stillroom/sweeps/<sweep id>.json`."""
    from stillroom.curate.lock import check_no_leakage, verify_lock
    from stillroom.train.runner import train_student, training_data

    if not points:
        raise SweepError("the sweep grid is empty")
    verify_lock(project)
    check_no_leakage(project)
    _, val = training_data(project)
    if not val:
        raise SweepError("the validation split is empty, and a sweep picks its winner on validation agreement; "
                         "set split.validation above 0 in stillroom.yaml and run `stillroom split` again")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    sweep_id = f"{name}-{stamp}-{secrets.token_hex(2)}"
    rows = []
    for i, point in enumerate(points):
        def step(done, total, i=i):
            if progress is not None:
                progress(i, len(points), done, total)

        step(0, 1)
        try:
            run = train_student(project, name, force=force, progress=step, overrides=point.overrides,
                                sweep_id=sweep_id)
        except (StillroomError, ValueError, RuntimeError, MemoryError, OSError) as exc:
            rows.append(_row(point, None, f"{type(exc).__name__}: {exc}"))
            continue
        rows.append(_row(point, run))
        step(1, 1)
    winner = pick_winner(rows)
    if winner is None:
        errors = "; ".join(sorted({r["error"] for r in rows if r.get("error")})) or "no run reported a val agreement"
        raise SweepError(f"no point of the sweep finished with a validation agreement: {errors}")
    summary = {"sweep_id": sweep_id, "student": name, "kind": project.config.student(name).kind,
               "points": len(points), "runs": rows, "winner": winner,
               "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    if promote:
        summary["promotion"] = promote_winner(project, name, winner)
    out = project.workspace / "sweeps"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{sweep_id}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    summary["path"] = str(out / f"{sweep_id}.json")
    return summary


def promote_winner(project, name: str, winner: dict) -> dict:
    """Make the winning run the student's current run and write its values into stillroom.yaml."""
    run_id = promote_run(project, name, winner["run_id"])
    fields = ENCODER_FIELDS if "head" in winner else LORA_FIELDS
    current = project.config.student(name)
    values = {f: winner[f] for f in fields if f in winner and winner[f] != getattr(current, f)}
    result = {"run_id": run_id, "values": values}
    if not values:
        return {**result, "config": "unchanged", "message": f"stillroom.yaml already holds the winning values of '{name}'"}
    return {**result, **promote_to_yaml(project.root / CONFIG_FILE, name, values)}


def promote_run(project, name: str, run_id: int) -> int:
    """Make a finished or trial run the student's current (newest finished) run; returns its id.

    A trial newer than the current run simply becomes finished. An older one (reused from an
    earlier sweep) is recorded again as a new finished row pointing at the same folder, because
    "current" means "newest finished"."""
    from sqlalchemy import func, insert, select, update

    from stillroom.store import tables as T

    runs = T.training_runs
    with project.store.engine.begin() as conn:
        row = conn.execute(select(runs).where(runs.c.id == run_id, runs.c.student == name)).first()
        if row is None or row.status not in ("finished", "trial"):
            raise SweepError(f"run {run_id} is not a finished or trial run of '{name}'")
        newest = conn.execute(select(func.max(runs.c.id)).where(
            runs.c.student == name, runs.c.status == "finished")).scalar()
        if newest == run_id:
            return run_id
        if newest is None or run_id > newest:
            conn.execute(update(runs).where(runs.c.id == run_id).values(status="finished"))
            return run_id
        metrics = {**json.loads(row.metrics or "{}"), "promoted_from_run": run_id}
        return conn.execute(insert(runs).values(
            student=name, kind=row.kind, status="finished", config=row.config, data_fingerprint=row.data_fingerprint,
            lock_id=row.lock_id, artifact_path=row.artifact_path, metrics=json.dumps(metrics, sort_keys=True),
            sweep_id=row.sweep_id, provenance=row.provenance,  # when it was trained, not when reused
            started_at=row.started_at, finished_at=row.finished_at,
        )).inserted_primary_key[0]


# --- writing the winner into stillroom.yaml ----------------------------------------------------


def _scalar(value) -> str:
    import yaml

    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _snippet(config_path: Path, name: str, values: dict) -> str:
    import yaml

    from stillroom.config import load_config

    student = load_config(config_path).student(name)
    entry = {"name": name, "kind": student.kind,
             **student.model_dump(mode="json", exclude_defaults=True, exclude={"name", "kind", "sweep"}), **values}
    return yaml.safe_dump({"students": [entry]}, sort_keys=False, default_flow_style=False)


def _line_end(text: str, index: int) -> int:
    end = text.find("\n", index)
    return len(text) if end < 0 else end


def promote_to_yaml(config_path: Path | str, name: str, values: dict) -> dict:
    """Write `values` into the student's entry of stillroom.yaml, keeping every other byte (comments
    included). Written only if the file read back gives exactly the intended config; otherwise
    nothing is written and the YAML to paste is returned."""
    import yaml

    from stillroom.config import load_config, parse_config

    path = Path(config_path)
    text = path.read_text(encoding="utf-8")
    before = load_config(path)
    expected = before.model_dump(mode="json")
    for entry in expected["students"]:
        if entry["name"] == name:
            entry.update(values)

    def not_written(reason: str) -> dict:
        return {"config": "snippet", "reason": reason, "snippet": _snippet(path, name, values),
                "message": f"{path.name} was not changed ({reason}); paste this entry for '{name}':"}

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        return not_written(f"it could not be parsed for editing: {exc}")
    students = next((v for k, v in (root.value if isinstance(root, yaml.MappingNode) else [])
                     if getattr(k, "value", None) == "students"), None)
    if not isinstance(students, yaml.SequenceNode):
        return not_written("it has no students list to edit")
    entry = next((item for item in students.value if isinstance(item, yaml.MappingNode)
                  and any(k.value == "name" and getattr(v, "value", None) == name for k, v in item.value)), None)
    if entry is None or not entry.value:
        return not_written(f"student '{name}' is not a mapping in the students list")
    edits = []  # (start, end, replacement)
    present = {k.value: v for k, v in entry.value}
    for field, value in values.items():
        node = present.get(field)
        if node is not None:
            if not isinstance(node, yaml.ScalarNode):
                return not_written(f"students.{name}.{field} is not a plain value")
            edits.append((node.start_mark.index, node.end_mark.index, _scalar(value)))
        elif entry.flow_style:
            close = entry.end_mark.index - 1  # the closing brace
            edits.append((close, close, f", {field}: {_scalar(value)}"))
        else:
            first_key, first_value = entry.value[0]
            at = _line_end(text, first_value.end_mark.index)
            indent = " " * first_key.start_mark.column
            edits.append((at, at, f"\n{indent}{field}: {_scalar(value)}"))
    new_text = text
    for start, end, replacement in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        new_text = new_text[:start] + replacement + new_text[end:]
    try:
        after = parse_config(yaml.safe_load(new_text), path).model_dump(mode="json")
    except (yaml.YAMLError, ConfigError) as exc:
        return not_written(f"the edited file would not load: {exc}")
    if after != expected:
        return not_written("the edit would change more than the winning values")
    tmp = path.with_name(f".{path.name}.sweep-tmp")
    tmp.write_text(new_text, encoding="utf-8")
    os.replace(tmp, path)
    return {"config": "written", "path": str(path),
            "message": f"wrote {', '.join(f'{k}={v}' for k, v in values.items())} to students.{name} in {path.name}"}

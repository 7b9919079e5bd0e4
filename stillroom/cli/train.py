"""CLI: train, sweep."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, UserError, app, bar, console, emit, open_project, pct, table


@app.command()
def train(
    students: Annotated[Optional[list[str]], typer.Argument(help="Student names from stillroom.yaml (default: all).")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if data and config are unchanged.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Train students on the train split. Refuses while the eval set is unlocked, changed, or leaks into training.

    lora and full students also train data-parallel across processes, one per GPU (or CPU socket):
    `torchrun --nproc_per_node 4 -m stillroom train NAME`."""
    from stillroom.train.distributed import world
    from stillroom.train.runner import train_student

    project = open_project(project_dir)
    names = students or [s.name for s in project.config.students]
    main = world().main  # under torchrun, only rank 0 reports
    runs = {}
    for name in names:
        with bar(f"train {name}", enabled=not as_json and main) as update:
            run = train_student(project, name, force=force, progress=update)
        runs[name] = {"run_id": run["id"], "skipped": run["skipped"], "reused_run": run.get("reused_run"),
                      "metrics": run["metrics"], "artifact": run["artifact_path"]}

    def show():
        table("Training", ["student", "run", "status", "val agreement", "seconds"],
              [[n, r["run_id"], f"identical to run {r['reused_run']} (reused)" if r["reused_run"]
                else "unchanged (skipped)" if r["skipped"] else "trained",
                pct(r["metrics"].get("val_agreement")), r["metrics"].get("train_seconds")] for n, r in runs.items()])
        for n, r in runs.items():
            weights = r["metrics"].get("weights")
            if weights:  # an ensemble: how it pools, and what each member scores alone
                alone = r["metrics"].get("member_val_agreement", {})
                console().print(f"{n} pools " + ", ".join(
                    f"{m} x{w:g} (alone {pct(alone.get(m))})" for m, w in weights.items()))
            pseudo = r["metrics"].get("pseudo_labels")
            if pseudo and not pseudo["pool"]:
                console().print(f"{n}: no unlabelled inputs to self-train on (import captured inputs without "
                                "answers); trained on the labelled rows only")
            elif pseudo:  # self-training: what the labeller added
                console().print(
                    f"{n} also trained on {pseudo['rows']:,} answers of {pseudo['labeller']} (run "
                    f"{pseudo['labeller_run']}) to unlabelled inputs: {pseudo['confident']:,} of {pseudo['pool']:,} "
                    f"at confidence >= {pseudo['min_confidence']:g}, at most {pseudo['per_label']:,} per label")

    if main:
        emit(as_json, runs, show)


def _list(flag: str, raw: str | None, cast, what: str) -> list | None:
    if raw is None:
        return None
    values = []
    for part in (p.strip() for p in raw.split(",")):
        try:
            values.append(cast(part))
        except ValueError:
            raise UserError(f"{flag}: {part!r} is not {what} (expected a comma-separated list, e.g. {flag} "
                            f"{'16,32' if cast is int else '1e-4,3e-4' if cast is float else 'a,b'})") from None
    return values


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


@contextmanager
def _sweep_bar(name: str, enabled: bool):
    """Two bars: grid points done, and the steps of the point training now."""
    if not enabled:
        yield lambda *a: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console(stderr=True)) as progress:
        grid = progress.add_task(f"sweep {name}", total=None)
        point = progress.add_task("", total=None)

        def update(i: int, n: int, done: int, total: int) -> None:
            progress.update(grid, completed=i + (1 if done >= total else 0), total=n)
            progress.update(point, description=f"  point {i + 1}/{n}", completed=done, total=total)

        yield update


@app.command()
def sweep(
    student: Annotated[str, typer.Argument(help="A student from stillroom.yaml.")],
    rank: Annotated[Optional[str], typer.Option("--rank", help="LoRA ranks, comma-separated (e.g. 16,32).")] = None,
    lr: Annotated[Optional[str], typer.Option("--lr", help="Learning rates, comma-separated (e.g. 1e-4,3e-4).")] = None,
    epochs: Annotated[Optional[str], typer.Option("--epochs", help="Epoch counts, comma-separated (e.g. 2,3).")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="Base models, comma-separated. lora: smollm2-135m-instruct, gemma-3-270m or HF model "
                       "folders; encoder: all-minilm-l6-v2 or local encoder folders.")] = None,
    head: Annotated[Optional[str], typer.Option("--head", help="Encoder heads: logreg,mlp (encoder students).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the grid and train nothing.")] = False,
    promote: Annotated[bool, typer.Option(
        "--promote", help="Make the winner the student's current run and write its values into stillroom.yaml "
                          "(comments kept; if the file cannot be edited safely, the YAML to paste is printed).")] = False,
    force: Annotated[bool, typer.Option(help="Retrain points even if an identical run exists.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Train a grid of settings for one student and pick the best on validation agreement.

    The winner has the highest validation agreement with the teacher (ties: the cheaper config).
    Each list flag replaces the same list of the student's `sweep:` block in stillroom.yaml; the default grid is rank 16,64 x lr 1e-4,3e-4 x 3 epochs (lora)
    or head logreg,mlp (encoder; --base adds encoder bodies to compare). Every point is recorded as a trial run tagged with the sweep id;
    identical earlier runs are reused. Trials do not replace the student's current run unless you
    --promote the winner."""
    from stillroom.train.sweep import run_sweep, sweep_grid

    project = open_project(project_dir)
    points = sweep_grid(project, student, rank=_list("--rank", rank, int, "an integer"),
                        learning_rate=_list("--lr", lr, float, "a number"),
                        epochs=_list("--epochs", epochs, int, "an integer"),
                        base_model=_list("--base", base, str, "a model"), head=_list("--head", head, str, "a head"))
    kind = project.config.student(student).kind
    if dry_run:
        emit(as_json, {"student": student, "points": [p.overrides for p in points]}, lambda: table(
            f"Sweep grid for '{student}' ({len(points)} runs; nothing trained)",
            ["#", *points[0].overrides.keys()], [[i + 1, *p.overrides.values()] for i, p in enumerate(points)]))
        return
    with _sweep_bar(student, enabled=not as_json) as update:
        result = run_sweep(project, student, points, force=force, promote=promote, progress=update)

    def show():
        from rich.markup import escape

        winner = result["winner"]
        if kind == "encoder":
            bases = any("base_model" in r for r in result["runs"])
            columns = ["run", "head", *(["base"] if bases else []), "status", "val agreement", "train s"]
            rows = [[r["run_id"] or "-", r["head"], *([Path(r["base_model"]).name] if bases else []), r["status"],
                     pct(r["val_score"]), _num(r["train_seconds"], ".1f")] for r in result["runs"]]
        else:
            columns = ["run", "rank", "lr", "epochs", "base", "status", "val score", "train s", "tokens/s"]
            rows = [[r["run_id"] or "-", r.get("rank", "-"), f"{r['learning_rate']:g}", r["epochs"], Path(r["base_model"]).name,
                     r["status"], pct(r["val_score"]), _num(r["train_seconds"], ".1f"),
                     _num(r["train_tokens_per_s"], ".0f")] for r in result["runs"]]
        for row, r in zip(rows, result["runs"]):
            if r is winner:
                row[0] = f"{row[0]} *"
        table(f"Sweep {result['sweep_id']} of '{student}' (* = winner: best validation score, ties to the cheaper config)",
              columns, rows)
        out = console()
        for r in result["runs"]:
            if r["status"] == "failed":
                out.print(f"[red]failed[/] {escape(str({k: r[k] for k in _point_keys(r)}))}: {escape(r['error'])}")
        out.print(f"winner: run {winner['run_id']} with {pct(winner['val_score'])} validation score")
        p = result.get("promotion")
        if p is None:
            out.print(f"trial runs only; `stillroom sweep {student} --promote` (same flags, reuses these runs) "
                      "makes the winner the student's current run")
        else:
            out.print(f"promoted: run {p['run_id']} is now the current run of '{student}'")
            out.print(escape(p["message"]))
            if p.get("snippet"):
                out.print(escape(p["snippet"]), soft_wrap=True)
        out.print(f"summary: {result['path']}")

    emit(as_json, result, show)


def _point_keys(r: dict) -> list[str]:
    return [k for k in ("head", "base_model", "rank", "learning_rate", "epochs") if k in r]

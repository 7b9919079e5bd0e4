"""CLI: export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, console, emit, open_project, pct, table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _points(x) -> str:
    return "-" if x is None else f"{x:+.2f}"


@app.command()
def export(
    student: Annotated[str, typer.Argument(help="A lora student from stillroom.yaml, trained.")],
    formats: Annotated[Optional[list[str]], typer.Option(
        "--format", "-f",
        help="adapter | merged | int8 | gguf-f16 | gguf-q8_0 | all (repeat for several; default all).")] = None,
    evaluate: Annotated[bool, typer.Option(
        "--eval/--no-eval", help="Re-evaluate each artifact on the locked eval split (default on).")] = True,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Export the newest trained run of a student for deployment and re-evaluate every artifact
    on the locked eval split: its agreement and macro-F1 change against the fp32 student, labels
    that flipped, latency per input, and the gate verdict for the artifact itself.
    Artifacts go to .stillroom/artifacts/exports/STUDENT-runN/FORMAT/, each with a manifest of
    SHA-256 hashes. GGUF files load in llama.cpp; re-evaluating them needs llama-cpp-python
    (the gguf-serve extra)."""
    from stillroom.cli.common import bar
    from stillroom.train.export import export_student

    project = open_project(project_dir)
    with bar(f"export {student}", enabled=not as_json) as update:
        records = export_student(project, student, formats or ["all"], evaluate=evaluate,
                                 progress=lambda _step, done, total: update(done, total))
    payload = {"student": student, "artifacts": [
        {k: v for k, v in r.items() if k != "evaluation"}
        | ({"evaluation": {k: v for k, v in r["evaluation"].items() if k != "coverage_curve"}}
           if "evaluation" in r else {})
        for r in records]}

    def show():
        rows = []
        for r in records:
            e = r.get("evaluation")
            if e is None:
                rows.append([r["format"], _size(r["size_bytes"]), r["sha256"][:12]]
                            + ["not evaluated"] + ["-"] * 6)
                continue
            d = e["vs_fp32"]
            rows.append([r["format"], _size(r["size_bytes"]), r["sha256"][:12], pct(e["agreement"]),
                         _points(d["agreement_delta_points"]), pct(e["vs_teacher"]["macro_f1"]),
                         _points(d["macro_f1_delta_points"]), f"{d['label_flips']}/{d['compared']}",
                         f"{e['latency_ms']['p50']:.1f}", "PASS" if e["gate"]["passed"] else "FAIL"])
        table(f"Exports of '{student}' (locked eval split; deltas in points vs the fp32 student)",
              ["format", "size", "sha256", "agree", "Δ agree", "macro-F1", "Δ F1", "flips",
               "p50 ms", "gate"], rows)
        from rich.markup import escape

        for r in records:
            if "evaluation_skipped" in r:
                console().print(f"[yellow]{r['format']} not re-evaluated: {escape(r['evaluation_skipped'])}[/]")
            if "evaluation" in r:
                g = r["evaluation"]["gate"]
                console().print(("[green]" if g["passed"] else "[red]") + escape(g["message"]) + "[/]")
        console().print(f"artifacts: {Path(records[0]['path']).parent}" if records else "nothing exported")

    emit(as_json, payload, show)

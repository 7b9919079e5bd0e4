"""CLI: export-recipe, import-adapter (train a student with Axolotl or Unsloth, bring it back)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, console, emit, open_project, pct, table


@app.command("export-recipe")
def export_recipe(
    student: Annotated[str, typer.Argument(help="A lora student from stillroom.yaml.")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="axolotl (config.yml) or unsloth (train_unsloth.py).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the data, config and README into.")],
    dataset: Annotated[Optional[int], typer.Option(
        "--dataset", help="Dataset version id (`stillroom curate snapshot`); default: snapshot the curated set now.")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Write a ready-to-run Axolotl config or Unsloth script (and its data) for a lora student.

    It holds the dataset version's train/validation chat files (never the locked eval set), the student's LoRA rank,
    alpha, dropout, target modules, learning rate, epochs and batch size, and its prompt frame.
    Train with the command in the README, then `stillroom import-adapter`."""
    from stillroom.train.interop import export_recipe as export

    project = open_project(project_dir)
    result = export(project, student, fmt, out, dataset=dataset)

    def show():
        table(f"{fmt} recipe for '{student}' (dataset version {result['dataset_version']})", ["setting", "value"],
              [[k, result[k]] for k in ("base_model", "rank", "alpha", "dropout", "learning_rate", "epochs",
                                         "batch_size", "sequence_len", "train_rows")])
        out_ = console()
        out_.print(f"wrote {', '.join(result['files'])} to {result['out']}")
        out_.print(f"train:     {result['command']}")
        out_.print(f"then:      {result['import_command']}")

    emit(as_json, result, show)


@app.command("import-adapter")
def import_adapter(
    student: Annotated[str, typer.Argument(help="A lora student from stillroom.yaml.")],
    path: Annotated[Path, typer.Argument(help="PEFT adapter folder: adapter_config.json + adapter_model.safetensors.")],
    allow_base_name_mismatch: Annotated[bool, typer.Option(
        "--allow-base-name-mismatch",
        help="Accept an adapter whose recorded base model name differs from the student's (e.g. a renamed "
             "local copy); layer shapes are still checked.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Register a LoRA adapter trained elsewhere (Axolotl, Unsloth, PEFT) as a lora student's run.

    It becomes the newest finished run of the student, so `stillroom eval`, `export` and `serve` use it. The adapter's
    base model and every LoRA layer's shape are checked against the student's base model, and it is
    loaded and scored on the validation split before it is recorded (provenance: imported)."""
    from stillroom.train.interop import import_adapter as do_import

    project = open_project(project_dir)
    run = do_import(project, student, path, allow_base_name_mismatch=allow_base_name_mismatch)
    payload = {"student": student, "run_id": run["id"], "artifact": run["artifact_path"], "metrics": run["metrics"],
               "imported": run["config"]["imported"]}

    def show():
        i = payload["imported"]
        table(f"Imported adapter for '{student}'", ["run", "r", "alpha", "modules", "val agreement", "artifact"],
              [[run["id"], i["r"], i["lora_alpha"], ", ".join(i["target_modules"]),
                pct(run["metrics"].get("val_agreement")), run["artifact_path"]]])
        console().print(f"next: stillroom eval {student}")

    emit(as_json, payload, show)

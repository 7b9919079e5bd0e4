"""CLI: label (ask the live teacher about every input without a teacher label)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, UserError, app, console, emit, open_project, table


def _ids(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"--ids must be example ids separated by commas, got {value!r}") from None


@app.command()
def label(
    max_cost: Annotated[Optional[float], typer.Option(
        "--max-cost", help="Stop before this run's spend (USD) could cross this; finished work is kept.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Label at most this many inputs (in import order).")] = None,
    ids: Annotated[Optional[str], typer.Option(help="Only these example ids, e.g. '3,17,42'.")] = None,
    batch: Annotated[bool, typer.Option(
        "--batch", help="Use the endpoint's batch API (about half price, hours). Re-run to resume polling.")] = False,
    wait: Annotated[bool, typer.Option(help="With --batch: wait for the batch to finish (--no-wait: submit and exit).")] = True,
    ray: Annotated[bool, typer.Option("--ray", help="Fan the calls out over Ray workers (needs the ray extra: pip install ray).")] = False,
    no_redact: Annotated[bool, typer.Option(
        "--no-redact", help="Send inputs without PII redaction, for a teacher inside your own trust boundary; "
                            "the run report says so.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Ask the live teacher (teacher: in stillroom.yaml) for every input without a teacher label.

    Every call is recorded the moment it returns: re-running never pays twice, and a run killed at
    any point resumes where it stopped. Pace, retries, samples per input and the agreement below
    which labels are flagged for review are set under labeling: in stillroom.yaml. Emails, phone
    numbers, cards, IBANs and curation.pii.patterns are replaced by [EMAIL], [CARD], ... before
    anything is sent (curation.pii); --no-redact sends the raw text.
    Exit 1 if some calls failed after their retries (the next run tries them again)."""
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if max_cost is not None and max_cost <= 0:
        raise UserError("--max-cost must be a positive amount in USD")
    from stillroom.label import label_examples

    project = open_project(project_dir)
    kwargs = dict(example_ids=_ids(ids), limit=limit, max_cost=max_cost, batch=batch, wait=wait, use_ray=ray,
                  redact=not no_redact)
    if as_json:
        report = label_examples(project, **kwargs)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("spent [bold]${task.fields[spent]:.4f}[/] of ~${task.fields[projected]:.4f}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console(stderr=True)) as bar:
            task = bar.add_task("teacher calls", total=None, spent=0.0, projected=0.0)

            def progress(p) -> None:
                bar.update(task, completed=p.done, total=p.total, spent=p.spent_usd, projected=p.projected_usd)

            report = label_examples(project, progress=progress, **kwargs)

    def show() -> None:
        c = console()
        r = report
        rows = [["inputs taken on", r.examples], ["calls needed", r.calls_total],
                ["answered earlier (not re-sent)", r.calls_cached], ["answered now (paid)", r.calls_paid],
                ["failed after retries", r.calls_failed], ["not sent", r.calls_not_sent], ["retries", r.retries],
                ["labelled now", r.labelled], ["answered but no label (tie / no valid answer)", r.no_label],
                ["spent now (USD)", f"{r.spent_usd:.4f}"]]
        if r.resumed_in_flight:
            rows.append(["resumed: in flight when the last run stopped", r.resumed_in_flight])
        if r.waiting_on_batch:
            rows.append(["owed by an unfinished batch job", r.waiting_on_batch])
        table(f"stillroom label ({r.mode}, {r.model})", ["", "count"], rows)
        if r.structured_output and r.structured_output != "sent":
            c.print(f"[yellow]structured output[/yellow] {r.structured_output}")
        elif r.structured_output:
            c.print("structured output: the task's JSON schema went with every call (response_format)")
        if r.pii:
            kinds = ", ".join(f"{k} {v}" for k, v in r.pii["by_type"].items())
            if r.pii["redacted"]:
                c.print(f"PII redacted before sending: {r.pii['inputs_with_pii']} input(s)" + (f" ({kinds})" if kinds else ""))
            elif r.pii["off_reason"] == "--no-redact":
                c.print(f"[yellow]PII not redacted[/yellow] (--no-redact): {r.pii['inputs_with_pii']} input(s) "
                        "with PII were sent as they are" + (f" ({kinds})" if kinds else ""))
            else:
                c.print(f"[yellow]PII not redacted[/yellow] ({r.pii['off_reason']})")
        if r.flagged:
            c.print("flagged for review: " + ", ".join(f"{k} {v}" for k, v in sorted(r.flagged.items())))
        for item in r.rejected[:10]:
            c.print(f"  [yellow]example {item['example_id']}[/yellow] not sent: {item['reason']}")
        for item in r.failures[:10]:
            c.print(f"  [red]example {item['example_id']}[/red] sample {item['sample']} failed: {item['reason']}")
        if len(r.failures) > 10:
            c.print(f"  ... and {len(r.failures) - 10} more failures (use --json for all)")
        if r.batch:
            c.print(f"batch jobs: {r.batch['jobs_submitted']} submitted now, {r.batch['jobs_resumed']} resumed")
            for job in r.batch["jobs"]:
                c.print(f"  job {job['job']}: {job['provider_batch_id']} {job['provider_status']} "
                        f"({job['requests']} calls)")
            if r.waiting_on_batch:
                c.print("Run `stillroom label --batch` again to collect the answers when the batch is done.")
        if r.stopped:
            c.print(f"[yellow]stopped early[/yellow]: {r.stopped}. Everything answered so far is kept; "
                    "run `stillroom label` again to continue.")

    emit(as_json, report.as_dict(), show)
    if report.calls_failed:
        raise typer.Exit(1)

"""CLI: curate -- QC, dedupe, PII, review, balance, augment, dataset versions (thin over stillroom.curate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stillroom.cli.common import JsonFlag, ProjectDir, app, bar, console, emit, open_project, table

curate_app = typer.Typer(
    help=("Curate the training data: reject bad teacher outputs, remove near-duplicates and eval "
          "leakage, redact PII, review labels, balance classes, add teacher paraphrases, and freeze "
          "dataset versions."),
    no_args_is_help=True,
)
review_app = typer.Typer(help="The review queue: export items for a human or judge, import the decisions.",
                         no_args_is_help=True)
curate_app.add_typer(review_app, name="review")
app.add_typer(curate_app, name="curate")


def _examples(title: str, rows: list[list], columns: list[str]) -> None:
    if rows:
        table(title, columns, rows)


def _short(text: str | None, n: int = 70) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


@curate_app.command()
def qc(project_dir: ProjectDir = Path("."), as_json: JsonFlag = False):
    """Teacher outputs outside the label set: counts by reason, with examples.

    Rejected outputs give no label (they never train) and go to the review queue."""
    from stillroom.curate.qc import qc_report

    report = qc_report(open_project(project_dir))

    def show():
        console().print(f"{report['teacher_responses']} teacher output(s): {report['accepted']} accepted, "
                        f"{report['rejected']} rejected; {report['labels_outside_label_set']} label(s) outside "
                        f"the label set; {report['examples_without_usable_label']} example(s) without a usable label.")
        if report["by_reason"]:
            console().print("by reason: " + ", ".join(f"{k} {v}" for k, v in report["by_reason"].items()))
        _examples("Rejected (first 10)", [[e["example_id"], e["reason"], _short(e["output"], 50), _short(e["message"])]
                                          for e in report["examples"]], ["example", "reason", "output", "why"])
        if report["rejected"] or report["labels_outside_label_set"]:
            console().print(report["next"])

    emit(as_json, report, show)


@curate_app.command()
def dedupe(
    threshold: Annotated[Optional[float], typer.Option(help="Cosine similarity at or above which two inputs are near-duplicates (default: curation.dedupe.threshold).")] = None,
    apply: Annotated[bool, typer.Option("--apply", help="Take eval near-copies (and all but one of each training cluster) out of training.")] = False,
    keep_duplicates: Annotated[bool, typer.Option("--keep-duplicates", help="With --apply: leave near-duplicates inside training alone; only remove eval leakage.")] = False,
    examples: Annotated[int, typer.Option(help="How many example pairs to show.")] = 10,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Find exact and near-duplicate inputs (MiniLM embeddings) inside training and against eval.

    Reports only, unless --apply. Embeddings are cached in the store: re-runs embed only new inputs."""
    from stillroom.curate.dedupe import apply_dedupe, find_near_duplicates

    project = open_project(project_dir)
    with bar("embedding", enabled=not as_json) as progress:
        report = find_near_duplicates(project, threshold, progress=progress)
    payload = report.as_dict(max_examples=examples)
    if apply:
        payload["applied"] = apply_dedupe(project, report, exclude_train_duplicates=False if keep_duplicates else None)

    def show():
        leak, within = payload["leakage"], payload["within_training"]
        c = console()
        c.print(f"threshold {report.threshold}: {payload['training_examples']} training and {payload['eval_examples']} "
                f"eval example(s); embedded {payload['embedded_now']} now, {payload['from_cache']} from cache.")
        c.print(f"eval leakage: {leak['training_examples']} training example(s) near-copy "
                f"{leak['eval_examples_with_near_duplicate']} eval example(s) ({leak['exact_pairs']} exact after folding).")
        c.print(f"inside training: {within['pairs']} pair(s) in {within['clusters']} cluster(s); "
                f"{within['duplicates_to_exclude']} duplicate(s) beyond one per cluster; "
                f"{within['clusters_with_conflicting_labels']} cluster(s) with conflicting labels.")
        cols = ["example", "other", "score", "input", "other input"]
        _examples("Training ~ eval", [[e["example_id"], e["other_id"], e["score"], _short(e["input"], 45),
                                       _short(e["other_input"], 45)] for e in leak["examples"]], cols)
        _examples("Inside training", [[e["example_id"], e["other_id"], e["score"], _short(e["input"], 45),
                                       _short(e["other_input"], 45)] for e in within["examples"]], cols)
        if apply:
            a = payload["applied"]
            c.print(f"applied: {a['excluded']} example(s) excluded from training "
                    f"({a['by_reason']['eval_near_duplicate']} eval near-copies, {a['by_reason']['train_near_duplicate']} "
                    f"training duplicates); {a['flagged_for_review']} flagged for review.")
        elif leak["training_examples"] or within["duplicates_to_exclude"]:
            c.print("Nothing changed; re-run with --apply to take them out of training.")

    emit(as_json, payload, show)


@curate_app.command()
def pii(
    apply: Annotated[bool, typer.Option("--apply", help="Record a redacted copy of every text with findings (originals are kept).")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Find emails, phone numbers, card numbers, IBANs and curation.pii.patterns in inputs and teacher outputs.

    Exports and teacher calls always use redacted text; examples are never rewritten, so the eval lock holds."""
    from stillroom.curate.pii import pii_report

    report = pii_report(open_project(project_dir), apply=apply)

    def show():
        c = console()
        if not report["enabled"]:
            c.print("PII redaction is off (curation.pii.enabled: false).")
        c.print(f"{report['texts_scanned']} text(s) scanned; with PII: {report['texts_with_pii']['input']} input(s), "
                f"{report['texts_with_pii']['output']} teacher output(s); {report['eval_inputs_with_pii']} in eval.")
        kinds = sorted({k for f in report["findings"].values() for k in f})
        table("Findings", ["type", "in inputs", "in outputs"],
              [[k, report["findings"]["input"].get(k, 0), report["findings"]["output"].get(k, 0)] for k in kinds])
        _examples("Examples (masked)", [[e["example_id"], e["field"], _short(e["redacted"], 90)] for e in report["examples"]],
                  ["example", "field", "redacted"])
        if apply:
            c.print(f"recorded {report['recorded_now']} redacted cop(ies).")

    emit(as_json, report, show)


@review_app.command("export")
def review_export(
    file: Annotated[Path, typer.Argument(help="Where to write the queue: .csv or .jsonl.")],
    include_decided: Annotated[bool, typer.Option(help="Also list items that already have a decision.")] = False,
    unredacted: Annotated[bool, typer.Option(help="Write original texts instead of PII-redacted ones (in-house reviewers only).")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Write the review queue: a stratified sample per label plus every flagged and rejected item.

    Fill in decision (accept | fix | discard), label (for fix) and reviewer, then `review import`."""
    from stillroom.curate.review import export_review

    result = export_review(open_project(project_dir), file, include_decided=include_decided, redact=not unredacted)
    emit(as_json, result, lambda: console().print(
        f"Wrote {result['items']} item(s) to {result['path']} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(result["by_reason"].items())) + "). Labels: "
        + ", ".join(result["labels"]) + "."))


@review_app.command("import")
def review_import(
    file: Annotated[Path, typer.Argument(help="A filled-in review file (.csv or .jsonl).")],
    reviewer: Annotated[Optional[str], typer.Option(help="Who decided, for rows with an empty reviewer column.")] = None,
    strict: Annotated[bool, typer.Option(help="Record nothing if any row is bad.")] = False,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Record review decisions: fix sets the training label (a human label), discard drops the example.

    Rows without a decision are skipped; bad rows are reported by line. Re-importing changes nothing."""
    from stillroom.curate.review import import_review

    report = import_review(open_project(project_dir), file, reviewer=reviewer, strict=strict)

    def show():
        c = console()
        a = report.applied
        c.print(f"{file}: {report.rows} row(s); recorded {a['accept']} accept, {a['fix']} fix, {a['discard']} discard; "
                f"{report.unchanged} unchanged, {report.pending} without a decision, {len(report.problems)} bad.")
        for line, msg in report.problems[:30]:
            c.print(f"  [yellow]line {line}[/yellow]: {msg}")
        for line, msg in report.notes[:10]:
            c.print(f"  line {line}: {msg}")

    emit(as_json, report.as_dict(), show)


@curate_app.command()
def balance(project_dir: ProjectDir = Path("."), as_json: JsonFlag = False):
    """Label counts per split and the train skew, before and after oversampling (curation.balance)."""
    from stillroom.curate.balance import balance_report

    report = balance_report(open_project(project_dir))

    def show():
        before, after = report["train_before"], report["train_after_oversampling"]
        table("Train labels", ["label", "examples", "after oversampling"],
              [[lab, n, after["counts"][lab]] for lab, n in before["counts"].items()])
        console().print(f"imbalance ratio (largest / smallest class): {before['imbalance_ratio']} -> "
                        f"{after['imbalance_ratio']}; {report['oversampled_rows']} oversampled row(s)."
                        + (f" Labels with no train example: {', '.join(before['missing_labels'])}." if before["missing_labels"] else ""))

    emit(as_json, report, show)


def _ids(value: str | None, option: str) -> list[int] | None:
    from stillroom.cli.common import UserError

    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"{option} must be example ids separated by commas, got {value!r}") from None


@curate_app.command()
def augment(
    k: Annotated[int, typer.Option("--k", help="Paraphrases asked for per input (one call per input).")] = 2,
    labels: Annotated[Optional[str], typer.Option(help="Only inputs with these labels, e.g. 'refund,fraud'.")] = None,
    flagged: Annotated[bool, typer.Option("--flagged", help="Only inputs flagged for review (labeling flags, review flags).")] = False,
    per_label_max: Annotated[Optional[int], typer.Option(
        "--per-label-max", help="Stop adding to a label once it has this many train examples, paraphrases "
                                "included (labels already there get none): balances rare labels.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Ask about at most this many new inputs (rarest labels first).")] = None,
    ids: Annotated[Optional[str], typer.Option(help="Only these train example ids, e.g. '3,17,42'.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Label every new paraphrase with the teacher and drop those whose label differs from "
                         "the parent's (costs samples x k more calls per input).")] = False,
    max_cost: Annotated[Optional[float], typer.Option(
        "--max-cost", help="Stop before this run's spend (USD, paraphrases and --verify together) could cross this.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Send nothing: show the calls and their worst-case cost.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the paraphrase calls.")] = 0.7,
    max_tokens: Annotated[Optional[int], typer.Option(help="Output token limit per paraphrase call (default 64 + 128 x k).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Ask the teacher to paraphrase train inputs; keep the good paraphrases as train-only examples.

    Needs a live teacher (teacher: in stillroom.yaml) and the locked eval set. Validation, calibration and eval inputs are never sent. A paraphrase that is empty, over-long, a copy of any input or a near-duplicate of an eval or calibration input is rejected with its reason; each kept one is tagged 'augmented', linked to its parent, and trains with the parent's label.

    Re-running never pays twice and a killed run resumes. Exit 1 if calls failed after their retries."""
    from stillroom.curate.augment import augment as run

    project = open_project(project_dir)
    kwargs = dict(k=k, labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
                  flagged_only=flagged, per_label_max=per_label_max, limit=limit, ids=_ids(ids, "--ids"),
                  max_cost=max_cost, verify=verify, dry_run=dry_run, temperature=temperature, max_tokens=max_tokens)
    if as_json or dry_run:
        report = run(project, **kwargs)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("spent [bold]${task.fields[spent]:.4f}[/] of ~${task.fields[projected]:.4f}"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console(stderr=True)) as bar_:
            tasks = {}

            def track(name: str):
                def update(p) -> None:
                    if name not in tasks:
                        tasks[name] = bar_.add_task(name, total=None, spent=0.0, projected=0.0)
                    bar_.update(tasks[name], completed=p.done, total=p.total, spent=p.spent_usd,
                                projected=p.projected_usd)
                return update

            report = run(project, progress=track("paraphrase calls"), verify_progress=track("verify calls"), **kwargs)

    def show():
        c, r = console(), report
        if r.dry_run:
            c.print(f"Dry run, nothing sent: {r.calls_total} paraphrase call(s) to {r.model} "
                    f"({r.parents_asked} new input(s), {r.parents_resumed} left by an earlier run), k={r.k}; "
                    f"at most ${r.projected_usd:.4f}" + (" with --verify" if verify else "") + ".")
            for call in r.would_send:
                c.print(f"  example {call['parent_id']} ({call['max_tokens']} tokens max):")
                c.print("    " + call["messages"][-1]["content"].replace("\n", "\n    "))
            return
        rows = [["inputs eligible (train, not asked before)", r.parents_eligible], ["new inputs asked", r.parents_asked],
                ["resumed from an earlier run", r.parents_resumed], ["calls paid now", r.calls_paid],
                ["failed after retries", r.calls_failed], ["not sent", r.calls_not_sent],
                ["answers processed", r.answers_processed], ["paraphrases returned", r.paraphrases_returned],
                ["augmented examples created", r.created], ["paraphrases rejected", sum(r.rejected.values())],
                ["spent now (USD)", f"{r.spent_usd:.4f}"]]
        table(f"stillroom curate augment ({r.model}, k={r.k}, {r.prompt_version})", ["", "count"], rows)
        if r.rejected:
            c.print("rejected: " + ", ".join(f"{k_} {v}" for k_, v in sorted(r.rejected.items())))
            for item in r.rejections[:5]:
                what = "the answer" if item["position"] < 0 else f"#{item['position']} {_short(item['text'], 40)!r}"
                c.print(f"  example {item['parent_id']} {what}: {item['reason']}")
        if r.verify is not None:
            v = r.verify
            c.print(f"verify: {v['checked']} checked, {v['kept']} kept, {v['dropped']} dropped (label changed or "
                    f"none), {v['awaiting']} awaiting a later --verify; ${v['spent_usd']:.4f}.")
        table("Train examples per label", ["label", "train", "paraphrases kept"],
              [[lab, x["train"], x["paraphrases_kept"]] for lab, x in r.by_label.items()])
        for item in r.skipped[:5]:
            c.print(f"  [yellow]example {item['example_id']}[/yellow] not sent: {item['reason']}")
        for item in r.failures[:5]:
            c.print(f"  [red]example {item['example_id']}[/red] failed: {item['reason']}")
        if r.stopped:
            c.print(f"[yellow]stopped early[/yellow]: {r.stopped}. Everything answered is kept; run "
                    "`stillroom curate augment` again to continue.")

    emit(as_json, report.as_dict(), show)
    if report.calls_failed:
        raise typer.Exit(1)


@curate_app.command()
def snapshot(
    formats: Annotated[Optional[list[str]], typer.Option("--format", help="openai, parquet or chat (repeatable; default: all available).")] = None,
    project_dir: ProjectDir = Path("."),
    as_json: JsonFlag = False,
):
    """Freeze the curated training set as a dataset version (id + manifest of content hashes) and export it.

    Writes .stillroom/datasets/<id>/: manifest.json, openai/*.jsonl, chat/*.jsonl (TRL, Axolotl), dataset.parquet."""
    from stillroom.curate.datasets import snapshot as take

    result = take(open_project(project_dir), formats)

    def show():
        counts = result["counts"]
        console().print(f"Dataset version {result['id']} ({'new' if result['created'] else 'unchanged, reused'}): "
                        f"{counts['examples']} example(s), {counts['rows']} row(s) "
                        f"({counts['oversampled_rows']} oversampled, {counts['reviewed_labels']} reviewed label(s), "
                        f"{counts['redacted_examples']} redacted) in {result['path']}")
        for name, meta in result["files"].items():
            console().print(f"  {name}: {meta['rows']} row(s), sha256 {meta['sha256'][:12]}")

    emit(as_json, result, show)


@curate_app.command()
def versions(project_dir: ProjectDir = Path("."), as_json: JsonFlag = False):
    """List the dataset versions."""
    from stillroom.curate.datasets import list_versions

    rows = list_versions(open_project(project_dir))
    emit(as_json, {"versions": rows}, lambda: table(
        "Dataset versions", ["id", "examples", "rows", "eval lock", "created", "path"],
        [[r["id"], r["examples"], r["rows"], r["lock_id"], r["created_at"][:19], r["path"]] for r in rows]))

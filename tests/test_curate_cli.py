"""`stillroom curate ...` as a user drives it: every subcommand on a tiny real project, --json for
scripts, and a bad review file as a one-sentence error with exit code 2."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.cli.main import app

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def cli_json(*args):
    return json.loads(cli(*args, "--json").stdout)


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate-cli") / "proj"
    cli("init", root)
    (root / "stillroom.yaml").write_text(project_yaml(), encoding="utf-8")
    rows = synthetic_rows(15) + [("refund to DE89 3704 0044 0532 0130 00 please", "billing"),
                                 ("lorem ipsum", "maybe")]
    write_chat_jsonl(root / "data.jsonl", rows)
    cli("import", root / "data.jsonl", "-C", root)
    cli("split", "-C", root)
    cli("lock", "-C", root)
    return root


def test_help_lists_every_curate_command():
    out = cli("curate", "--help").stdout
    for command in ("qc", "dedupe", "pii", "review", "balance", "snapshot", "versions"):
        assert command in out


def test_curate_stage_by_stage(project_dir, tmp_path):
    qc = cli_json("curate", "qc", "-C", project_dir)
    assert qc["rejected"] == 1 and qc["examples"][0]["output"] == "maybe"
    assert "1 rejected" in cli("curate", "qc", "-C", project_dir).stdout

    pii = cli_json("curate", "pii", "--apply", "-C", project_dir)
    assert pii["findings"]["input"]["iban"] == 1 and pii["recorded_now"] == 1
    assert "[IBAN]" in cli("curate", "pii", "-C", project_dir).stdout

    queue = tmp_path / "queue.csv"
    exported = cli_json("curate", "review", "export", queue, "-C", project_dir)
    assert exported["items"] >= 4 and exported["by_reason"]["rejected"] == 1
    with open(queue, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    lorem = next(r for r in rows if r["teacher_output"] == "maybe")
    lorem.update(decision="discard")
    next(r for r in rows if r["why"] == "sample").update(decision="accept")
    with open(queue, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    imported = cli_json("curate", "review", "import", queue, "--reviewer", "qa-team", "-C", project_dir)
    assert imported["applied"] == {"accept": 1, "fix": 0, "discard": 1} and not imported["problems"]

    dedupe = cli_json("curate", "dedupe", "--threshold", "0.97", "-C", project_dir)
    assert dedupe["threshold"] == 0.97 and dedupe["embedded_now"] > 0
    applied = cli_json("curate", "dedupe", "--threshold", "0.97", "--apply", "-C", project_dir)
    assert applied["embedded_now"] == 0 and "applied" in applied  # the cache served the re-run
    assert "eval leakage" in cli("curate", "dedupe", "-C", project_dir).stdout

    balance = cli_json("curate", "balance", "-C", project_dir)
    assert set(balance["train_before"]["counts"]) == {"billing", "shipping", "other"}

    snap = cli_json("curate", "snapshot", "--format", "openai", "--format", "chat", "-C", project_dir)
    assert snap["created"] and set(snap["files"]) >= {"openai/train.jsonl", "chat/train.jsonl"}
    lines = (Path(snap["path"]) / "openai" / "train.jsonl").read_text().splitlines()
    assert not any("DE89" in line for line in lines)
    assert cli_json("curate", "versions", "-C", project_dir)["versions"][0]["id"] == snap["id"]
    assert "unchanged, reused" in cli("curate", "snapshot", "--format", "openai", "--format", "chat",
                                      "-C", project_dir).stdout


def test_bad_review_file_is_a_clear_error(project_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"example_id": 1, "decision": "maybe", "reviewer": "x"}\n', encoding="utf-8")
    result = cli("curate", "review", "import", bad, "-C", project_dir)
    assert "line 1" in result.stdout and "decision 'maybe' is not one of accept, fix, discard" in result.stdout
    exe = Path(sys.executable).with_name("stillroom")
    proc = subprocess.run([str(exe), "curate", "review", "import", str(bad), "--strict", "-C", str(project_dir)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "line 1: decision 'maybe'" in proc.stderr and "Traceback" not in proc.stderr

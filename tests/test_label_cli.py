"""`stillroom label` as a user runs it: the summary, --json, the exit codes, a clear refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAI, FakeServer  # noqa: E402
from test_label_engine import add_inputs, teacher_extra  # noqa: E402

from stillroom.cli.main import app  # noqa: E402

runner = CliRunner()


def test_label_command_summary_json_and_exit_codes(make_project):
    with FakeServer(FakeOpenAI()) as server:
        project = make_project(extra=teacher_extra(server.url, labeling=", max_retries: 1"))
        add_inputs(project, ["my invoice", "where is my parcel", "[[fail]] hello"])

        result = runner.invoke(app, ["label", "-C", str(project.root)], catch_exceptions=False)
        assert result.exit_code == 1  # one call failed after its retries
        assert "answered now (paid)" in result.output and "labelled now" in result.output
        assert "failed: fake-teacher at" in result.output and "HTTP 500" in result.output

        result = runner.invoke(app, ["label", "-C", str(project.root), "--json", "--ids", "1,2"],
                               catch_exceptions=False)
        assert result.exit_code == 0
        report = json.loads(result.stdout)
        assert report["examples"] == 0 and report["calls_paid"] == 0  # 1 and 2 are labelled already

        result = runner.invoke(app, ["label", "-C", str(project.root), "--json"], catch_exceptions=False)
        report = json.loads(result.stdout)
        assert (report["examples"], report["calls_failed"], report["labelled"]) == (1, 1, 0)
        assert set(report) >= {"spent_usd", "projected_usd", "flagged", "failures", "rejected", "resumed_in_flight"}


def test_a_recorded_teacher_is_refused_in_one_sentence(make_project):
    project = make_project()
    done = subprocess.run([sys.executable, "-m", "stillroom.cli.main", "label", "-C", str(project.root)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 2
    assert "teacher.backend is 'recorded'" in done.stderr and "Traceback" not in done.stderr

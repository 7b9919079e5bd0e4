"""Every CLI command on a tiny real project (real MiniLM encoder), plus exit codes and messages."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.cli.main import app

runner = CliRunner()


def cli(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def sh(*args, cwd=None):
    """The real installed entry point, as a user runs it."""
    exe = Path(sys.executable).with_name("stillroom")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


def test_help_is_fast_path_and_does_not_import_torch():
    code = ("import sys\nfrom stillroom.cli.main import app\n"
            "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'sklearn', 'sqlalchemy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out
    for command in ("init", "import", "split", "lock", "train", "eval", "calibrate", "gate", "serve", "report", "run"):
        assert command in out


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "proj"
    cli("init", root, "--name", "tiny")
    (root / "stillroom.yaml").write_text(project_yaml(extra="gate: {max_gap_points: 0}\n"), encoding="utf-8")
    rows = synthetic_rows(30)
    rng = random.Random(3)
    noisy = [(t, rng.choice(["billing", "shipping", "other"]) if rng.random() < 0.15 else l) for t, l in rows]
    write_chat_jsonl(root / "data.jsonl", noisy)
    return root


def test_stage_by_stage(project_dir):
    out = json.loads(cli("import", project_dir / "data.jsonl", "-C", project_dir, "--json").stdout)
    assert out["examples_added"] == 90 and out["problems"] == []
    assert "0 new example(s), 90 already known" in cli("import", project_dir / "data.jsonl", "-C", project_dir).stdout

    assert "Not locked" not in cli("split", "-C", project_dir).stdout
    lock = json.loads(cli("lock", "-C", project_dir, "--json").stdout)
    assert lock["n_examples"] == 18
    assert "verified" in cli("lock", "--verify", "-C", project_dir).stdout

    train = json.loads(cli("train", "-C", project_dir, "--json").stdout)
    assert train["encoder"]["skipped"] is False and train["encoder"]["metrics"]["val_agreement"] is not None
    assert json.loads(cli("train", "-C", project_dir, "--json").stdout)["encoder"]["skipped"] is True
    # The matching run's folder deleted by hand: trained again as a new run rather than "reused" and
    # failing later where eval loads it.
    shutil.rmtree(train["encoder"]["artifact"])
    again = json.loads(cli("train", "-C", project_dir, "--json").stdout)["encoder"]
    assert again["skipped"] is False and again["run_id"] != train["encoder"]["run_id"]
    assert Path(again["artifact"]).is_dir()

    ev = json.loads(cli("eval", "-C", project_dir, "--json").stdout)["encoder"]
    assert ev["vs_teacher"]["n"] == 18 and 0 <= ev["agreement"] <= 1
    assert "Locked eval split" in cli("eval", "encoder", "-C", project_dir).stdout

    cal = json.loads(cli("calibrate", "encoder", "--target", "0.5", "-C", project_dir, "--json").stdout)["encoder"]
    assert cal["target"] == 0.5 and 0 <= cal["eval"]["coverage"] <= 1

    gate = runner.invoke(app, ["gate", "-C", str(project_dir), "--json"])
    verdict = json.loads(gate.stdout)["encoder"]
    assert gate.exit_code == (0 if verdict["passed"] else 1)
    assert verdict["allowed_points"] == 0
    assert verdict["gap_points"] == pytest.approx((1 - ev["agreement"]) * 100, abs=0.01)

    rep = json.loads(cli("report", "-C", project_dir, "--json").stdout)
    assert Path(rep["html"]).is_file() and Path(rep["markdown"]).is_file()


def _ready(project_dir):
    """Every stage up to evaluation; each is idempotent, so tests need not run in order."""
    cli("import", project_dir / "data.jsonl", "-C", project_dir)
    cli("split", "-C", project_dir)
    cli("lock", "-C", project_dir)
    cli("train", "-C", project_dir)
    cli("eval", "-C", project_dir)


def test_gate_exit_codes_through_the_real_entry_point(project_dir, tmp_path):
    _ready(project_dir)
    result = sh("gate", "-C", project_dir)
    verdict = json.loads(sh("gate", "-C", project_dir, "--json").stdout)["encoder"]
    # The noisy labels keep the student below 100% agreement, so a zero-point gate must fail.
    assert verdict["gap_points"] > 0 and not verdict["passed"]
    assert result.returncode == 1 and "FAIL" in result.stdout and "over the allowed 0" in result.stdout


def test_errors_are_sentences_not_tracebacks(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "stillroom.yaml").write_text("task:\n  name: x\n  labels: [{name: a}]\nstudents: [{name: s, kind: gpt}]\n")
    r = sh("split", "-C", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "task.labels" in r.stderr and "students.0.kind" in r.stderr

    fresh = tmp_path / "fresh"
    assert sh("init", fresh).returncode == 0
    write_chat_jsonl(fresh / "d.jsonl", [("parcel late", "shipping")])
    r = sh("train", "-C", fresh)
    assert r.returncode == 2 and "not locked" in r.stderr and "Traceback" not in r.stderr
    r = sh("import", fresh / "missing.jsonl", "-C", fresh)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = sh("gate", "-C", fresh)
    assert r.returncode == 2 and "no evaluation" in r.stderr
    r = sh("import", fresh / "d.jsonl", "--as", "robot", "-C", fresh)
    assert r.returncode == 2 and "--as must be" in r.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_starts_the_gateway(project_dir, tmp_path):
    """`stillroom serve` as a user runs it: refuses a recorded-only teacher with a sentence, then
    serves the student over HTTP once a live teacher URL is configured."""
    import time

    import httpx

    _ready(project_dir)
    r = sh("serve", "-C", project_dir, "--port", _free_port())
    assert r.returncode == 2 and "live teacher" in r.stderr and "Traceback" not in r.stderr

    live = tmp_path / "live"
    live.mkdir()
    import shutil

    shutil.copytree(project_dir / ".stillroom", live / ".stillroom")
    (live / "stillroom.yaml").write_text(
        project_yaml(extra="gate: {max_gap_points: 0}\n"
                     "teacher: {backend: openai, base_url: 'http://127.0.0.1:9/v1', model: big-teacher}\n"),
        encoding="utf-8")
    port = _free_port()
    exe = Path(sys.executable).with_name("stillroom")
    proc = subprocess.Popen([str(exe), "serve", "-C", str(live), "--port", str(port), "--student", "encoder"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
                time.sleep(0.5)
        assert health["status"] == "ok" and health["student"] == "encoder"
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi my package and delivery question 3 today"}]})
        body = reply.json()
        if reply.status_code == 200:
            assert reply.headers["x-stillroom-route"] == "student"
            assert reply.status_code == 200 and body["choices"][0]["message"]["content"] in ("billing", "shipping", "other")
        else:  # below the threshold: the teacher at port 9 is down -> OpenAI-shaped 502, server stays up
            assert reply.status_code == 502 and body["error"]["type"] == "upstream_error"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""Evaluation on a real small project (MiniLM encoder students): three-way table, intervals, slices,
calibration, comparisons, shadow traffic, promptfoo export, label-set mismatch and stale locks."""

import csv
import json
import random
import shutil

import pytest

from stillroom.errors import StillroomError
import yaml
from sqlalchemy import insert, select
from typer.testing import CliRunner

from conftest import LABELS, project_yaml, synthetic_rows
from stillroom.capture.importers import import_file
from stillroom.cli.main import app
from stillroom.curate.lock import active_lock, lock_eval
from stillroom.curate.split import split_project
from stillroom.evaluate.compare import CompareError, compare_sources, mcnemar
from stillroom.evaluate.evaluator import evaluate_student, latest_evaluation
from stillroom.evaluate.gate import decide
from stillroom.evaluate.shadow import shadow_evaluate
from stillroom.project import Project, ProjectError, init_project
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import split_rows
from stillroom.train.runner import train_student

runner = CliRunner()
STUDENTS = "  - {name: encoder, kind: encoder}\n  - {name: mlp, kind: encoder, head: mlp}\n"
GATE = "gate: {slice_min_examples: 5, bootstrap_resamples: 500}\n"


def cli(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def project_lock(project):
    with project.store.engine.connect() as conn:
        return active_lock(conn)


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for text, label, tags in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": label}], "tags": tags}) + "\n")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-project") / "proj"
    init_project(root)
    (root / "stillroom.yaml").write_text(project_yaml(STUDENTS, GATE), encoding="utf-8")
    rng = random.Random(5)
    rows = synthetic_rows(40, seed=5)
    # 15% of the teacher's labels are noise, so students disagree with it here and there.
    noisy = [(t, rng.choice(list(LABELS)) if rng.random() < 0.15 else l, ["vip"] if k % 3 == 0 else [])
             for k, (t, l) in enumerate(rows)]
    _write(root / "web.jsonl", noisy[:60])
    _write(root / "mail.jsonl", noisy[60:])
    with open(root / "human.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "output"])
        w.writerows(rows[:12])  # the true labels, for 12 inputs
    project = Project.open(root)
    for name in ("web.jsonl", "mail.jsonl"):
        import_file(project, root / name)
    import_file(project, root / "human.csv", role="human")
    split_project(project)
    lock_eval(project)
    for s in ("encoder", "mlp"):
        train_student(project, s)
    results = {s: evaluate_student(project, s) for s in ("encoder", "mlp")}
    yield project, results
    project.close()


def test_evaluation_reports_three_way_gap_interval_slices_and_calibration(evaluated):
    project, results = evaluated
    ev = results["encoder"]
    n = ev["vs_teacher"]["n"]
    assert n == len(project_lock(project).manifest) and ev["vs_human"]["n"] == 12  # humans fill eval first
    tw = ev["three_way"]
    assert tw["student_vs_teacher"]["accuracy"] == ev["agreement"] and tw["student_vs_teacher"]["n"] == n
    assert tw["teacher_vs_human"]["n"] == tw["student_vs_human"]["n"] == 12
    assert tw["teacher_vs_human"]["accuracy"] == ev["vs_human"]["teacher_accuracy"]
    assert ev["vs_teacher"]["micro_f1"] == pytest.approx(ev["agreement"])

    gap = ev["gap"]["teacher"]
    assert gap["estimate"] == pytest.approx((1 - ev["agreement"]) * 100)
    assert gap["low"] <= gap["estimate"] <= gap["high"] and gap["n_resamples"] == 500
    human_gap = ev["gap"]["human"]
    assert human_gap["estimate"] == pytest.approx(
        (ev["vs_human"]["teacher_accuracy"] - ev["vs_human"]["student_accuracy"]) * 100)

    sl = ev["slices"]["teacher"]
    kinds = {s["kind"] for s in sl["slices"]}
    assert kinds == {"class", "length", "source", "tag"}
    assert sum(s["n"] for s in sl["slices"] if s["kind"] == "class") == n
    assert sum(s["n"] for s in sl["slices"] if s["kind"] == "source") == n
    assert {s["name"] for s in sl["slices"] if s["kind"] == "source"} <= {"web.jsonl", "mail.jsonl"}
    assert [s["name"] for s in sl["slices"] if s["kind"] == "tag"] == ["vip"]
    for s in sl["slices"]:
        wrong = [e for e in ev["errors"] if e["example_id"] in {x["example_id"] for x in s["examples"]}]
        assert len(wrong) == len(s["examples"])  # the examples shown are ones the student got wrong
    assert ev["slices"]["human"]["reference"] == "human"

    cal = ev["confidence_calibration"]
    assert 0 <= cal["ece"] <= 1 and sum(b["n"] for b in cal["reliability"]) == n
    stored = latest_evaluation(project, "encoder")
    assert stored["gap"] == json.loads(json.dumps(ev["gap"])) and stored["stale"] is False


def test_gate_modes_on_a_real_evaluation(evaluated):
    project, results = evaluated
    point = json.loads(runner.invoke(app, ["gate", "encoder", "-C", str(project.root), "--json"]).stdout)["encoder"]
    strict = json.loads(runner.invoke(app, ["gate", "encoder", "--mode", "strict", "-C", str(project.root),
                                            "--json"]).stdout)["encoder"]
    assert point["mode"] == "point" and strict["mode"] == "strict"
    assert strict["compared_points"] == pytest.approx(round(strict["ci_high"], 2))
    assert point["compared_points"] == point["gap_points"]
    assert strict["compared_points"] >= point["compared_points"]
    r = runner.invoke(app, ["gate", "--mode", "sideways", "-C", str(project.root)])
    assert r.exit_code != 0


def test_a_student_with_another_label_set_is_refused(evaluated):
    project, _ = evaluated
    cfg = project.config.model_copy(deep=True)
    cfg.task.labels.append(cfg.task.labels[0].model_copy(update={"name": "returns"}))
    other = Project(project.root, cfg)
    with pytest.raises(ProjectError, match="different label set.*cannot answer returns"):
        evaluate_student(other, "encoder")
    other.close()


def test_compare_two_students_with_mcnemar(evaluated):
    project, _ = evaluated
    out = json.loads(cli("eval", "--compare", "encoder", "mlp", "-C", project.root, "--json").stdout)
    vt = out["vs_teacher"]
    assert out["a"] == "encoder" and out["b"] == "mlp" and vt["n"] == len(project_lock(project).manifest)
    # the table must match the recorded predictions
    with project.store.engine.connect() as conn:
        runs = {s: conn.execute(select(T.training_runs.c.id).where(T.training_runs.c.student == s)).scalar_one()
                for s in ("encoder", "mlp")}
        preds = {s: dict(conn.execute(select(T.predictions.c.example_id, T.predictions.c.label)
                                      .where(T.predictions.c.run_id == r).order_by(T.predictions.c.id)).all())
                 for s, r in runs.items()}
    with project.store.engine.connect() as conn:
        teacher = {ex.id: label for ex, label in split_rows(conn, "eval")}
    a_only = sum(preds["encoder"][i] == t != preds["mlp"][i] for i, t in teacher.items())
    b_only = sum(preds["mlp"][i] == t != preds["encoder"][i] for i, t in teacher.items())
    assert (vt["table"]["a_only"], vt["table"]["b_only"]) == (a_only, b_only)
    assert vt["test"]["p_value"] == pytest.approx(mcnemar(a_only, b_only)["p_value"])
    assert vt["a_score"] == pytest.approx(latest_evaluation(project, "encoder")["agreement"])
    assert out["vs_human"]["n"] == 12

    same = compare_sources(project, "encoder", f"encoder@run{runs['encoder']}")
    assert same["vs_teacher"]["test"]["p_value"] == 1.0 and same["vs_teacher"]["table"]["a_only"] == 0
    with pytest.raises(CompareError, match="no finished training run"):
        compare_sources(project, "encoder", "encoder@run999")
    with pytest.raises(StillroomError, match="no gguf-q8_0 export of its newest run; run `stillroom export encoder"):
        compare_sources(project, "encoder", "encoder@q8_0")
    r = runner.invoke(app, ["eval", "--compare", "encoder", "nobody", "-C", str(project.root)])
    assert r.exit_code != 0


def test_shadow_evaluation_on_logged_traffic(evaluated, tmp_path):
    project, _ = evaluated
    with pytest.raises(ProjectError, match="no logged traffic"):
        shadow_evaluate(project, "encoder")
    texts = [t for t, _ in synthetic_rows(10, seed=99)]
    logged = [
        {"input": texts[0], "route": "teacher", "output": "Billing.", "status_code": 200},
        {"input": texts[1], "route": "teacher", "output": "shipping", "status_code": 200},
        {"input": texts[2], "route": "teacher", "output": "I am not sure", "status_code": 200},
        {"input": texts[3], "route": "student", "output": "other", "status_code": 200, "student": "encoder"},
        {"input": None, "route": "error", "output": None, "status_code": 400},
    ]
    with project.store.engine.begin() as conn:
        conn.execute(insert(T.routed_requests), [dict(r, request_id=f"req{k}", created_at=now())
                                                 for k, r in enumerate(logged)])
    log = tmp_path / "old-requests.jsonl"
    _write(log, [(texts[4], "other", ["eu"]), (texts[5], "billing", [])])
    out = json.loads(cli("eval", "encoder", "--shadow", "--log", log, "-C", project.root, "--json").stdout)["encoder"]
    t = out["traffic"]
    assert t["scored"] == 4 and out["vs_teacher"]["n"] == 4
    assert t["gateway_teacher_answers"] == 3 and t["unparseable_teacher_answers"] == 1
    assert t["gateway_student_served"] == 1 and t["gateway_errors"] == 1 and t["log_rows"] == 2
    # same scorecard as the eval split: gap with interval, slices by source and tag, calibration
    assert out["set"] == "shadow" and out["gap"]["teacher"]["n"] == 4
    sources = {s["name"] for s in out["slices"]["teacher"]["slices"] if s["kind"] == "source"}
    assert sources == {"gateway", "old-requests.jsonl"}
    assert any(s["kind"] == "tag" and s["name"] == "eu" for s in out["slices"]["teacher"]["slices"])
    assert latest_evaluation(project, "encoder", kind="shadow")["traffic"] == t
    assert latest_evaluation(project, "encoder")["set"] == "eval"  # the eval record is untouched
    r = runner.invoke(app, ["eval", "--log", str(log), "-C", str(project.root)])
    assert r.exit_code != 0


def test_promptfoo_export_has_the_documented_shape(evaluated, tmp_path):
    project, results = evaluated
    out = json.loads(cli("eval", "--export-promptfoo", tmp_path / "pf", "--gateway-url",
                         "http://127.0.0.1:8123/v1", "-C", project.root, "--json").stdout)
    config_text = (tmp_path / "pf" / "promptfooconfig.yaml").read_text(encoding="utf-8")
    assert config_text.startswith("# yaml-language-server: $schema=https://promptfoo.dev/config-schema.json")
    config = yaml.safe_load(config_text)
    # top-level keys of promptfoo's configuration reference; prompts, providers and tests are required
    assert {"prompts", "providers", "tests"} <= set(config) <= {
        "description", "tags", "providers", "prompts", "tests", "defaultTest", "scenarios", "outputPath",
        "evaluateOptions", "env", "metadata"}
    assert config["prompts"] == ["{{input}}"]
    (provider,) = config["providers"]
    assert provider["id"] == "openai:chat:tiny"  # the gateway serves the task's name as its model
    assert provider["config"]["apiBaseUrl"] == "http://127.0.0.1:8123/v1"
    assert provider["config"]["apiKeyEnvar"] == "STILLROOM_GATEWAY_KEY"
    assert config["tests"] == "file://tests.yaml" and config["defaultTest"]["options"]["transform"] == "output.trim()"
    tests = yaml.safe_load((tmp_path / "pf" / "tests.yaml").read_text(encoding="utf-8"))
    assert isinstance(tests, list) and len(tests) == out["n_tests"] == len(project_lock(project).manifest)
    with project.store.engine.connect() as conn:
        expected = {ex.input: label for ex, label in split_rows(conn, "eval")}
    for test in tests:
        assert set(test) <= {"description", "vars", "assert", "metadata", "options", "threshold"}
        assert set(test["vars"]) == {"input"}
        assert test["assert"] == [{"type": "equals", "value": expected[test["vars"]["input"]]}]
    assert {t["vars"]["input"] for t in tests} == set(expected)


def test_stale_evaluations_are_marked_everywhere(evaluated, tmp_path):
    project, _ = evaluated
    root = tmp_path / "copy"
    shutil.copytree(project.root, root)
    copy = Project.open(root)
    try:
        lock_eval(copy, reason="added reviewed refund examples", relock=True)
        ev = latest_evaluation(copy, "encoder")
        assert ev["stale"] and ev["lock_status"]["relock_reason"] == "added reviewed refund examples"
        assert "re-locked since as lock 2" in ev["lock_status"]["message"]
        verdict = decide(ev, copy.config.gate)
        assert not verdict.passed and "added reviewed refund examples" in verdict.message

        gate = runner.invoke(app, ["gate", "encoder", "-C", str(root)])
        assert gate.exit_code == 1 and "stale" in gate.stdout and "added reviewed refund examples" in gate.stdout
        shown = cli("eval", "--show", "-C", root).stdout
        assert "STALE (1)" in shown and "STALE encoder: the evaluation ran against eval lock 1" in shown
        assert "added reviewed refund examples" in shown
        as_json = json.loads(cli("eval", "--show", "-C", root, "--json").stdout)
        assert as_json["encoder"]["stale"] is True and as_json["encoder"]["lock_status"]["active_lock_id"] == 2

        rep = json.loads(cli("report", "-C", root, "--json").stdout)
        md = open(rep["markdown"], encoding="utf-8").read()
        html = open(rep["html"], encoding="utf-8").read()
        assert "| encoder (stale) |" in md and "added reviewed refund examples" in md
        assert 'class="badge fail">stale</span>' in html and "added reviewed refund examples" in html
        saved = json.loads(open(rep["json"], encoding="utf-8").read())
        student = next(s for s in saved["students"] if s["name"] == "encoder")
        assert student["stale"] is True and "added reviewed refund examples" in student["stale_reason"]
        assert saved["students"] == rep["summary"]["students"]

        fresh = evaluate_student(copy, "encoder")
        assert fresh["lock_id"] == 2 and latest_evaluation(copy, "encoder")["stale"] is False
    finally:
        copy.close()


def test_report_json_and_sections(evaluated, tmp_path):
    project, _ = evaluated
    rep = json.loads(cli("report", "--out", tmp_path / "r", "-C", project.root, "--json").stdout)
    saved = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert saved["slices"]["slices_all"] and saved["calibration"]["ece"] is not None
    assert saved == json.loads(json.dumps(rep["summary"]))
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    for heading in ("## Three-way comparison", "## Calibration", "## Slices"):
        assert heading in md

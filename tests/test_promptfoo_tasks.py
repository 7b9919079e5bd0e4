"""The promptfoo export for extraction and generation: the suite's JavaScript assertions score a
gateway answer the way stillroom does (run with node, the runtime promptfoo uses)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from stillroom.capture.importers import import_file
from stillroom.curate.lock import lock_eval
from stillroom.curate.split import split_project
from stillroom.evaluate.promptfoo import export_promptfoo
from stillroom.project import Project, init_project

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"vendor": {"type": "string"}, "amount": {"type": "number"}, "tags": {"type": "array"}}}
NODE = shutil.which("node")


def _project(root, task: str, rows: list[dict]) -> Project:
    init_project(root)
    (root / "stillroom.yaml").write_text(task + "split: {train: 0.5, validation: 0.1, calibration: 0.1, eval: 0.3}\n",
                                         encoding="utf-8")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project, reason="test")
    return project


def _run_js(code: str, output: str, expected: str) -> dict:
    script = (f"const output = {json.dumps(output)}; const context = {{vars: {{expected: {json.dumps(expected)}}}}};\n"
              f"const result = (function () {{\n{code}\n}})();\nprocess.stdout.write(JSON.stringify(result));")
    done = subprocess.run([NODE, "-e", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def extraction(tmp_path):
    rows = [{"input": f"invoice {i} from Acme for {10 * i} EUR", "output": json.dumps({"vendor": "Acme", "amount": 10 * i})}
            for i in range(1, 21)]
    project = _project(tmp_path / "x", f"task:\n  name: invoices\n  type: extraction\n  schema: {json.dumps(SCHEMA)}\n", rows)
    yield project
    project.close()


def test_extraction_suite_shape(extraction, tmp_path):
    out = export_promptfoo(extraction, tmp_path / "pf")
    config = yaml.safe_load((tmp_path / "pf" / "promptfooconfig.yaml").read_text(encoding="utf-8"))
    kinds = [a["type"] for a in config["defaultTest"]["assert"]]
    assert kinds == ["is-json", "javascript"] and config["defaultTest"]["assert"][0]["value"] == SCHEMA
    tests = yaml.safe_load((tmp_path / "pf" / "tests.yaml").read_text(encoding="utf-8"))
    assert len(tests) == out["n_tests"] > 0
    first = tests[0]["vars"]
    assert extraction.task.parse(first["expected"]) == first["expected"] and "assert" not in tests[0]


@pytest.mark.skipif(NODE is None, reason="node is not installed (promptfoo runs on it)")
@pytest.mark.parametrize("answer, reference", [
    ('{"amount":10,"vendor":"Acme"}', '{"amount":10,"vendor":"Acme"}'),
    ('{"amount":10,"vendor":"  ACME "}', '{"amount":10,"vendor":"Acme"}'),
    ('{"amount":12.5,"vendor":"Acme"}', '{"amount":10,"vendor":"Acme"}'),
    ('{"vendor":"Acme"}', '{"amount":10,"vendor":"Acme"}'),
    ('{"tags":["a","b","a"]}', '{"tags":["a","a"]}'),
    ("{}", "{}"),
    ('{"vendor":null}', '{}'),
])
def test_field_f1_javascript_matches_the_task(extraction, tmp_path, answer, reference):
    export_promptfoo(extraction, tmp_path / "pf")
    config = yaml.safe_load((tmp_path / "pf" / "promptfooconfig.yaml").read_text(encoding="utf-8"))
    code = config["defaultTest"]["assert"][1]["value"]
    result = _run_js(code, answer, reference)
    task = extraction.task
    assert result["score"] == pytest.approx(task.score(answer, reference))
    assert result["pass"] == task.agrees(answer, reference)


@pytest.mark.skipif(NODE is None, reason="node is not installed (promptfoo runs on it)")
def test_rouge_l_javascript_matches_rouge_score_without_stemming_differences(tmp_path):
    rows = [{"input": f"venue {i}", "output": f"The Copper Kettle is a cheap cafe number {i}."} for i in range(20)]
    project = _project(tmp_path / "g", "task: {name: blurbs, type: generation, agreement_threshold: 0.6}\n", rows)
    try:
        export_promptfoo(project, tmp_path / "pf")
        config = yaml.safe_load((tmp_path / "pf" / "promptfooconfig.yaml").read_text(encoding="utf-8"))
        code = config["defaultTest"]["assert"][0]["value"]
        reference = "The Copper Kettle is a cheap cafe in the old town."
        for answer in ("The Copper Kettle is a cheap cafe in the old town.", "A cheap cafe: the Copper Kettle.",
                       "Nothing alike at all"):
            result = _run_js(code, answer, reference)
            assert result["score"] == pytest.approx(project.task.score(answer, reference))
            assert result["pass"] == project.task.agrees(answer, reference)
    finally:
        project.close()

"""The report on a real small project: import -> split -> lock -> train (MiniLM encoder) -> eval -> report."""

import csv
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from stillroom.capture.importers import import_file
from stillroom.curate.lock import lock_eval
from stillroom.curate.split import split_project
from stillroom.economics.costs import economics
from stillroom.evaluate.evaluator import evaluate_student, latest_evaluation
from stillroom.evaluate.gate import decide
from stillroom.project import Project, init_project
from stillroom.config import GateConfig
from stillroom.report.render import money, pct, write_report
from stillroom.train.runner import train_student

CONFIG = """\
task:
  name: support triage
  labels:
    - name: billing
    - name: shipping
    - name: other
teacher:
  price_per_million_input_tokens: 2.50
  price_per_million_output_tokens: 10.00
students:
  - name: encoder
    kind: encoder
  - name: big          # configured but never trained: the report must list it, not fail
    kind: lora
gate:
  min_human_examples: 10
routing:
  target_agreement: 0.95
costs:
  student_hosting_per_hour: 0.50
  project_cost: 1500
volume:
  requests_per_month: 2000000
  input_tokens_per_request: 200
  output_tokens_per_request: 5
"""

TEMPLATES = {
    "billing": ["I was charged twice for order {n}", "Please refund the payment on invoice {n}",
                "My credit card was billed {n} dollars too much", "Why is there an extra fee on bill {n}"],
    "shipping": ["Where is my package with tracking number {n}", "My delivery {n} has not arrived yet",
                 "Please change the shipping address for parcel {n}", "The courier lost shipment {n}"],
    "other": ["How do I reset my password, attempt {n}", "Do you have a store in district {n}",
              "I want to leave feedback about product {n}", "What are your opening hours on holiday {n}"],
}
# Billing text the teacher called shipping: the student is expected to get it "wrong", so the
# input lands in the error sample, where it must come out escaped.
SCRIPT_INPUT = "<script>alert('pwned')</script> refund the double charge on my credit card invoice"


def _examples(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for label, templates in TEMPLATES.items():
        numbers = rng.sample(range(100, 9999), 40)
        rows += [(templates[k % 4].format(n=n), label) for k, n in enumerate(numbers)]
    rng.shuffle(rows)
    return rows


def _new_project(root) -> Project:
    init_project(root, name="support triage")
    (root / "stillroom.yaml").write_text(CONFIG, encoding="utf-8")
    return Project.open(root)


def _import(project: Project, root, rows, humans=None) -> None:
    data = root / "teacher.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text},
                                                     {"role": "assistant", "content": label}]}) + "\n"
                            for text, label in rows), encoding="utf-8")
    import_file(project, data)
    if humans:
        path = root / "human.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["input", "output"])
            w.writerows(humans)
        import_file(project, path, role="human")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-project")
    project = _new_project(root)
    rows = _examples() + [(SCRIPT_INPUT, "shipping")]
    # Human labels for 20 inputs (they fill the eval split first); the human disagrees with the
    # teacher on the script input.
    humans = [(text, label) for text, label in rows[:19]] + [(SCRIPT_INPUT, "billing")]
    _import(project, root, rows, humans)
    split_project(project)
    lock_eval(project)
    train_student(project, "encoder")
    evaluate_student(project, "encoder")
    result = write_report(project)
    yield project, result
    project.close()


def test_markdown_has_eval_table_gate_and_money(evaluated):
    project, result = evaluated
    md = result["markdown"].read_text(encoding="utf-8")
    ev = latest_evaluation(project, "encoder")
    verdict = decide(ev, project.config.gate)
    assert verdict.reference == "human"  # 20 human labels >= min_human_examples 10

    row = next(line for line in md.splitlines() if line.startswith("| encoder | encoder |"))
    assert f"| {pct(ev['agreement'])} |" in row
    assert f"| {pct(ev['vs_teacher']['macro_f1'])} |" in row
    assert f"| {pct(ev['vs_human']['teacher_accuracy'])} | {ev['vs_human']['n']} |" in row
    assert ("PASS" if verdict.passed else "FAIL") in row
    assert f"gap {verdict.gap_points:.2f} / allowed 3 pts, vs human" in row
    assert "| big | lora | not trained |" in md
    assert "student 'big' is not trained" in md

    cfg = project.config
    econ = economics(cfg.teacher, cfg.costs, cfg.volume, ev["throughput"]["inputs_per_s"],
                     ev["at_threshold"]["coverage"])
    assert f"| monthly savings | {money(econ.monthly_savings)} |" in md
    assert f"| annual savings | {money(econ.annual_savings)} |" in md
    payback_line = next(line for line in md.splitlines() if line.startswith("| payback |"))
    assert "project cost of $1,500.00" in payback_line
    assert (f"{econ.payback_months:.1f} months" if econ.pays_back else "never") in payback_line
    assert f"measured student throughput {ev['throughput']['inputs_per_s']:,.1f} inputs/s" in md
    assert "2,000,000 requests/month" in md

    assert md.splitlines()[0] == "# stillroom report: support triage"
    assert "**Verdict:**" in md and "'encoder'" in md.split("**Verdict:**")[1].splitlines()[0]
    assert f"Eval lock {ev['lock_id']}:" in md and ev["lock_sha256"] in md
    for name in ("confusion", "coverage", "reliability", "slices", "cost"):
        assert f"]({name}.png)" in md
        assert (result["markdown"].parent / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_and_escapes_inputs(evaluated):
    project, result = evaluated
    html = result["html"].read_text(encoding="utf-8")
    # Five embedded plots: confusion heatmap, coverage curve, reliability diagram, per-slice gap bars, cost.
    assert html.count("data:image/png;base64,") == 5
    for alt in ("confusion matrix", "coverage vs agreement", "reliability diagram", "gap by slice", "monthly cost"):
        assert f'<img class="plot" alt="{alt}" src="data:image/png;base64,' in html, alt
    assert "<script" not in html
    ev = latest_evaluation(project, "encoder")
    if any(e["input"] == SCRIPT_INPUT for e in ev["errors"]):
        assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in html
    else:  # the student happened to agree with the teacher on it
        pytest.skip("the script-like input was not a student error in this run")


def test_summary_is_machine_readable(evaluated):
    project, result = evaluated
    summary = json.loads(json.dumps(result["summary"]))
    assert summary["chosen_student"] == "encoder"
    assert summary["task"] == "support triage"
    assert [s["status"] for s in summary["students"]] == ["evaluated", "not trained"]
    assert summary["data"]["examples"] == 121 and summary["data"]["human_labelled"] == 20
    assert summary["economics"]["requests_per_month"] == 2_000_000
    assert summary["verdict"]["passed"] == summary["students"][0]["gate"]["passed"]
    assert any(m.startswith("train: student 'big'") for m in summary["missing_stages"])


def test_report_without_evaluations_names_missing_stages(tmp_path):
    project = _new_project(tmp_path)
    _import(project, tmp_path, _examples(seed=1)[:30])
    split_project(project)
    result = write_report(project, tmp_path / "out")
    md = result["markdown"].read_text(encoding="utf-8")
    html = result["html"].read_text(encoding="utf-8")
    assert "| examples | 30 |" in md and "| teacher-labelled | 30 |" in md
    assert "No student has been evaluated yet" in md
    for stage in ("stillroom lock", "stillroom train encoder", "stillroom train big"):
        assert stage in md and stage in html
    assert "| encoder | encoder | not trained |" in md
    assert "data:image/png" not in html and not list((tmp_path / "out").glob("*.png"))
    assert result["summary"]["economics"] is None and result["summary"]["chosen_student"] is None
    project.close()


def test_report_on_an_empty_project(tmp_path):
    project = _new_project(tmp_path)
    result = write_report(project)
    md = result["markdown"].read_text(encoding="utf-8")
    assert result["markdown"].parent == project.workspace / "report"
    assert "stillroom import FILE" in md and "stillroom lock" in md
    assert "Economics needs an evaluated student" in md
    project.close()


def test_failed_gate_says_do_not_deploy(evaluated, tmp_path):
    project, _ = evaluated
    original = project.config
    project.config = original.model_copy(update={"gate": GateConfig(reference="teacher", max_gap_points=0.0)})
    try:
        if latest_evaluation(project, "encoder")["agreement"] == 1.0:
            pytest.skip("the student matched the teacher everywhere; a zero-gap gate passes")
        result = write_report(project, tmp_path)
    finally:
        project.config = original
    md = result["markdown"].read_text(encoding="utf-8")
    assert "**Verdict:** Do not deploy yet: 'encoder' (encoder) FAILS the gate" in md
    assert "vs teacher)" in md and "| FAIL (gap" in md
    assert result["summary"]["verdict"]["passed"] is False
    assert 'class="verdict fail"' in result["html"].read_text(encoding="utf-8")


def test_money_format():
    assert money(1234.5) == "$1,234.50"
    assert money(-47.5) == "-$47.50"
    assert money(0.5) == "$0.50"
    assert money(0.0262) == "$0.0262"
    assert money(None) == "—"

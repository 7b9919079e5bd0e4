"""Evaluation, the gate, calibration, comparison, the report and the LLM judge on extraction and
generation projects. The student is a table of answers (any object with `predict` can be
evaluated, as an exported artifact is); the judge is the fake OpenAI-compatible server on loopback."""

import csv
import json
import re

import pytest
from sqlalchemy import func, insert, select
from typer.testing import CliRunner

from fake_openai_server import FakeOpenAI, FakeServer
from stillroom.capture.importers import import_file
from stillroom.cli.main import app
from stillroom.curate.lock import lock_eval
from stillroom.curate.split import split_project
from stillroom.evaluate.calibration import calibrate_student
from stillroom.evaluate.compare import compare_sources
from stillroom.evaluate.evaluator import evaluate_student
from stillroom.evaluate.gate import decide
from stillroom.project import Project, init_project
from stillroom.report.render import write_report
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import split_rows
from stillroom.train.base import Prediction

runner = CliRunner()
GATE = "gate: {slice_min_examples: 3, bootstrap_resamples: 200}\n"
SPLIT = "split: {train: 0.5, validation: 0.1, calibration: 0.2, eval: 0.2, seed: 0}\n"


class TableStudent:
    """A student that answers from a table (input -> answer); confident when it is right."""

    labels: list[str] = []

    def __init__(self, answers: dict[str, str], right: dict[str, str]):
        self.answers, self.right = answers, right

    def predict(self, texts):
        return [Prediction(self.answers[t], 0.9 if self.answers[t] == self.right[t] else 0.3) for t in texts]


def _project(root, task_yaml: str, records: list[tuple[str, str]], students: str, extra: str = "") -> Project:
    init_project(root)
    (root / "stillroom.yaml").write_text(task_yaml + "students:\n" + students + SPLIT + GATE + extra, encoding="utf-8")
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for text, answer in records:
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    return project


def _finished_run(project, name: str, kind: str = "lora") -> int:
    """A finished training run without a saved model: evaluation is given the student object."""
    with project.store.engine.begin() as conn:
        return conn.execute(insert(T.training_runs).values(
            student=name, kind=kind, status="finished", config="{}", data_fingerprint="test",
            started_at=now(), finished_at=now())).inserted_primary_key[0]


def _teacher(project) -> dict[str, str]:
    with project.store.engine.connect() as conn:
        rows = split_rows(conn, "eval") + split_rows(conn, "calibration")
    return {ex.input: label for ex, label in rows}


# ---- generation ---------------------------------------------------------------------------------

TOPICS = ["late parcel", "double charge", "broken screen", "lost password"]


def _summaries():
    rows = []
    for i in range(40):
        topic = TOPICS[i % 4]
        text = f"ticket {i}: the customer writes about a {topic} and wants help quickly"
        rows.append((text, f"Customer {i} reports a {topic} and asks for quick help."))
    return rows


class FakeJudge(FakeOpenAI):
    """Prefers the longer answer (tie when equal); rubric 4 for a full sentence, else 2; never
    gives a readable verdict on an answer marked [[garbage]], not even when reminded."""

    def answer(self, content: str) -> str:
        if "[[garbage]]" in content or "could not read" in content:
            return "Both answers have merit; I cannot decide."
        pair = re.search(r"Answer A:\n(.*?)\n\nAnswer B:\n(.*?)\n\nEnd your reply", content, re.S)
        if pair:
            a, b = (len(x.split()) for x in pair.groups())
            return "Verdict: tie" if a == b else "Verdict: A" if a > b else "Verdict: B"
        one = re.search(r"Answer:\n(.*?)\n\nEnd your reply", content, re.S).group(1)
        return "Score: 4" if one.endswith(".") else "Score: 2"


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    fake = FakeJudge()
    with FakeServer(fake) as server:
        root = tmp_path_factory.mktemp("gen") / "proj"
        judge = (f"judge: {{backend: openai, base_url: '{server.url}', model: fake-judge, "
                 "api_key_env: STILLROOM_TEST_NO_KEY, max_retries: 1}\n")
        project = _project(root, "task: {name: summaries, type: generation, agreement_threshold: 0.6}\n",
                           _summaries(), "  - {name: gen, kind: lora}\n", judge)
        teacher = _teacher(project)
        # every third answer is cut short (worse), every fifth is empty (invalid); the rest are the teacher's
        answers = {}
        for k, (text, ref) in enumerate(sorted(teacher.items())):
            answers[text] = "" if k % 5 == 0 else " ".join(ref.split()[:3]) if k % 3 == 0 else ref
        with project.store.engine.connect() as conn:
            unreadable = split_rows(conn, "eval")[3][0].input
        answers[unreadable] = teacher[unreadable] + " [[garbage]]"  # the judge can never read a verdict on it
        _finished_run(project, "gen")
        result = evaluate_student(project, "gen", TableStudent(answers, teacher))
        yield project, result, answers, teacher, fake, root
        project.close()


def test_generation_evaluation_scores_text(generation):
    project, ev, answers, teacher, _, _ = generation
    with project.store.engine.connect() as conn:
        eval_inputs = [ex.input for ex, _ in split_rows(conn, "eval")]
    from stillroom.tasks.generation import rouge_l

    expected = [rouge_l(answers[t], teacher[t]) if answers[t] else 0.0 for t in eval_inputs]
    assert ev["task_type"] == "generation" and ev["metric"] == "rouge_l"
    assert ev["agreement"] == pytest.approx(sum(expected) / len(expected))
    vt = ev["vs_teacher"]
    assert vt["n_invalid"] == sum(not answers[t] for t in eval_inputs) and vt["bleu"] is not None
    assert vt["length"]["reference"]["mean"] > vt["length"]["prediction"]["mean"]
    # the error list is the worst examples first, by score; no class slices, length/source ones instead
    scores = [e["score"] for e in ev["errors"]]
    assert scores == sorted(scores) and ev["n_disagreements"] == len(ev["errors"])
    assert {s["kind"] for s in ev["slices"]["teacher"]["slices"]} == {"length", "source"}
    # against the teacher a generation student is gated on the share of answers that agree (ROUGE-L >= 0.6),
    # not on 100 - mean ROUGE-L, which would fail even a perfect paraphrase
    agree = [e >= 0.6 for e in expected]
    assert ev["agree_rate"] == pytest.approx(sum(agree) / len(agree))
    verdict = decide(ev, project.config.gate)
    assert "(rouge_l >= 0.6" in verdict.message and verdict.gap_points == round((1 - ev["agree_rate"]) * 100, 2)
    assert verdict.ci_low <= verdict.gap_points <= verdict.ci_high
    # calibration from the recorded predictions agrees with the evaluation's own
    cal = calibrate_student(project, "gen")
    assert cal["threshold"] == ev["calibration"]["threshold"]


def test_llm_judge_command_caches_and_agrees_with_humans(generation):
    project, _, answers, teacher, fake, root = generation
    with project.store.engine.connect() as conn:
        eval_inputs = [ex.input for ex, _ in split_rows(conn, "eval")]
    # humans preferred the teacher on the first three eval inputs, except one tie
    prefs = root / "prefs.csv"
    with open(prefs, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "preferred"])
        w.writerows([[eval_inputs[0], "teacher"], [eval_inputs[1], "tie"], [eval_inputs[2], "teacher"],
                     ["an input nobody imported", "student"]])
    out = runner.invoke(app, ["judge", "--import-preferences", str(prefs), "-C", str(root), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["imported"] == 3

    first = runner.invoke(app, ["judge", "gen", "-C", str(root), "--json"])
    assert first.exit_code == 0, first.output
    j = json.loads(first.stdout)["gen"]
    n = len(eval_inputs)
    garbage = sum("[[garbage]]" in answers[t] for t in eval_inputs)
    # the fake prefers the longer answer: a cut or empty answer loses, the teacher's own answer ties
    shorter = sum(len(answers[t].split()) < len(teacher[t].split()) for t in eval_inputs)
    assert j["n_items"] == n and j["outcomes"]["missing"] == garbage
    assert j["outcomes"]["teacher"] == shorter and j["outcomes"]["student"] == 0
    assert j["win_rate"]["estimate"] == pytest.approx((n - garbage - shorter) / (n - garbage))
    assert j["win_rate"]["low"] <= j["win_rate"]["estimate"] <= j["win_rate"]["high"]
    assert j["position_consistency"] == 1.0
    assert {p["name"]: p["version"] for p in j["prompts"]} == {"pairwise": "1", "rubric": "1"}
    assert garbage == 1 and j["human_agreement"]["n"] == 3
    # identical prompts are asked once: where the student gave the teacher's answer, both orders (and
    # both rubric calls) are the same request, so the second is served from the record
    assert j["calls"]["sent"] == fake.charged and j["calls"]["cached"] > 0

    billed = fake.charged
    again = json.loads(runner.invoke(app, ["judge", "gen", "-C", str(root), "--json"]).stdout)["gen"]
    total = j["calls"]["sent"] + j["calls"]["cached"]
    assert fake.charged == billed and again["calls"] == {"sent": 0, "cached": total}  # never paid twice
    assert again["win_rate"] == j["win_rate"] and again["outcomes"] == j["outcomes"]
    with project.store.engine.connect() as conn:
        recorded = conn.execute(select(func.count()).select_from(T.TABLES["judge_scores"])).scalar()
        judged = conn.execute(select(func.count()).select_from(T.responses)
                              .where(T.responses.c.role == "judge")).scalar()
        missing = conn.execute(select(T.TABLES["judge_scores"].c.attempts)
                               .where(T.TABLES["judge_scores"].c.verdict.is_(None))).scalars().all()
    assert recorded == 2 * (4 * n) and judged == billed  # both runs' judgements; each call stored once
    # both orders and the student's rubric of the unreadable item, in both runs: asked again once, then missing
    assert missing == [2] * 6

    shown = json.loads(runner.invoke(app, ["judge", "gen", "--show", "-C", str(root), "--json"]).stdout)["gen"]
    assert shown["evaluation_id"] == again["evaluation_id"]

    # once a judge has run, the gate holds the judge's at-or-above rate against the allowed gap
    from stillroom.evaluate.evaluator import latest_evaluation

    ev = latest_evaluation(project, "gen")
    assert ev["judge"]["evaluation_id"] == again["evaluation_id"]
    verdict = decide(ev, project.config.gate)
    assert "the judge rated the student at or above the teacher" in verdict.message
    assert verdict.gap_points == round((1 - again["win_rate"]["estimate"]) * 100, 2)
    assert verdict.ci_high == pytest.approx((1 - again["win_rate"]["low"]) * 100, abs=1e-3)
    strict = decide(ev, project.config.gate, "strict")
    assert strict.compared_points == pytest.approx(verdict.ci_high, abs=0.01)


def test_generation_report_has_text_metrics_lengths_and_the_judge(generation, tmp_path):
    project, ev, *_ = generation
    out = write_report(project, tmp_path / "report")
    html = out["html"].read_text(encoding="utf-8")
    assert 'alt="answer lengths" src="data:image/png;base64,' in html
    assert 'alt="confusion matrix"' not in html and "Per-class results" not in html
    assert "Text metrics" in html and "Worst eval examples" in html
    md = out["markdown"].read_text(encoding="utf-8")
    assert "ROUGE-L F1 (mean)" in md and "![answer lengths](lengths.png)" in md
    assert (tmp_path / "report" / "lengths.png").stat().st_size > 1000
    summary = json.loads(out["json"].read_text(encoding="utf-8"))
    assert summary["students"][0]["metrics"]["rouge_l"] == pytest.approx(ev["vs_teacher"]["rouge_l"])
    if summary["judge"] is not None:  # present once the judge test above has run
        assert "LLM judge" in html and summary["judge"]["prompts"]


# ---- extraction ---------------------------------------------------------------------------------

SCHEMA_YAML = ("task:\n  name: invoices\n  type: extraction\n  schema:\n    type: object\n    properties:\n"
               "      name: {type: string}\n      amount: {type: number}\n      due: {type: string}\n"
               "    required: [name]\n")


def test_extraction_project_end_to_end(tmp_path):
    records = []
    for i in range(40):
        record = {"name": f"Vendor {i}", "amount": i * 10}
        if i % 4 == 0:
            record["due"] = f"2024-0{1 + i % 9}-01"
        records.append((f"invoice {i} from Vendor {i} for {i * 10} dollars", json.dumps(record)))
    project = _project(tmp_path / "proj", SCHEMA_YAML, records,
                       "  - {name: ext, kind: lora}\n  - {name: ext2, kind: lora}\n")
    teacher = _teacher(project)
    # ext gets the amount wrong on a third of the records and answers garbage once; ext2 is perfect
    answers = {}
    for k, (text, ref) in enumerate(sorted(teacher.items())):
        record = json.loads(ref)
        if k % 3 == 0:
            record["amount"] = -1
        answers[text] = json.dumps(record)
    with project.store.engine.connect() as conn:
        eval_inputs = [ex.input for ex, _ in split_rows(conn, "eval")]
    answers[eval_inputs[0]] = "no idea"
    for name, table in (("ext", answers), ("ext2", dict(teacher))):
        _finished_run(project, name)
        evaluate_student(project, name, TableStudent(table, teacher))
    ev = evaluate_student(project, "ext", TableStudent(answers, teacher))
    vt = ev["vs_teacher"]
    assert ev["task_type"] == "extraction" and set(vt["per_field"]) == {"name", "amount", "due"}
    assert vt["per_field"]["name"]["recall"] < 1.0  # the garbage answer states no name
    assert vt["per_field"]["amount"]["precision"] < vt["per_field"]["name"]["precision"] == 1.0
    assert vt["n_invalid"] == sum(answers[t] == "no idea" for t in eval_inputs)
    assert vt["validity"] == pytest.approx(1 - vt["n_invalid"] / len(eval_inputs))
    assert {s["name"] for s in ev["slices"]["teacher"]["slices"] if s["kind"] == "field"} <= {"name", "amount", "due"}
    compared = compare_sources(project, "ext", "ext2")["vs_teacher"]
    assert compared["test"]["method"] == "paired bootstrap" and compared["b_score"] == 1.0

    out = write_report(project, tmp_path / "report")
    html = out["html"].read_text(encoding="utf-8")
    assert 'alt="per-field scores" src="data:image/png;base64,' in html and "Per-field results" in html
    assert 'alt="confusion matrix"' not in html
    assert "schema-valid" in out["markdown"].read_text(encoding="utf-8")
    project.close()

"""Self-training (`students[].pseudo_labels`): another student labels the unlabelled inputs, its
confident answers join training; the eval set never enters the pool; answers are computed once."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import locked_cli_project, project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.cli.main import app
from stillroom.config import ConfigError
from stillroom.train.pseudo import select_rows, unlabelled_pool

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("students, message", [
    ("  - {name: a, kind: encoder, pseudo_labels: {student: b}}\n", "pseudo_labels.student 'b' is not a student"),
    ("  - {name: a, kind: encoder, pseudo_labels: {student: a}}\n", "must be another student than 'a'"),
    ("  - {name: a, kind: encoder, pseudo_labels: {student: b}}\n"
     "  - {name: b, kind: encoder, pseudo_labels: {student: a}}\n", "students a -> b -> a: each needs the next"),
    ("  - {name: a, kind: encoder, pseudo_labels: {student: ens}}\n  - {name: b, kind: encoder, head: mlp}\n"
     "  - {name: ens, kind: ensemble, members: [a, b]}\n", "a -> ens -> a"),
    ("  - {name: a, kind: encoder}\n  - {name: b, kind: encoder, head: mlp}\n"
     "  - {name: ens, kind: ensemble, members: [a, b], pseudo_labels: {student: a}}\n",
     "pseudo_labels does not apply to an ensemble"),
    ("  - {name: a, kind: encoder, pseudo_labels: {student: b, per_label: 0}}\n  - {name: b, kind: encoder}\n",
     "per_label"),
    ("  - {name: a, kind: encoder, pseudo_labels: {student: b, min_confidence: 1.5}}\n  - {name: b, kind: encoder}\n",
     "min_confidence"),
])
def test_pseudo_label_config_errors_name_the_problem(yaml_project, students, message):
    with pytest.raises(ConfigError) as err:
        yaml_project(project_yaml(students))
    assert message in str(err.value)


def test_a_generation_task_cannot_self_train(yaml_project):
    text = ("task: {name: g, type: generation}\nstudents:\n"
            "  - {name: a, kind: lora, pseudo_labels: {student: b}}\n  - {name: b, kind: lora}\n")
    with pytest.raises(ConfigError, match="pseudo_labels needs a classification task"):
        yaml_project(text)


def test_select_rows_caps_each_label_by_confidence_and_keeps_pool_order():
    pool = [(f"h{i}", f"text {i}") for i in range(7)]
    answers = {"h0": ["a", 0.9], "h1": ["a", 0.99], "h2": ["a", 0.95], "h3": ["b", 0.4],
               "h4": ["b", 0.8], "h5": ["a", 0.5], "h6": ["c", 0.49]}
    rows = select_rows(pool, answers, per_label=2, min_confidence=0.5)
    # a: the two surest of four (0.99, 0.95); b: only 0.8 clears 0.5; c: none does
    assert rows == [("text 1", "a"), ("text 2", "a"), ("text 4", "b")]
    assert select_rows(pool, answers, per_label=10, min_confidence=0.0)[-1] == ("text 6", "c")


def test_self_trained_student_learns_from_the_unlabelled_inputs(tmp_path):
    students = ("  - {name: enc, kind: encoder}\n"
                "  - {name: st, kind: encoder, pseudo_labels: {student: enc, per_label: 5, min_confidence: 0.4}}\n")
    root = locked_cli_project(tmp_path / "p", students, 15)
    from stillroom.project import Project
    from stillroom.store.records import split_rows

    project = Project.open(root)
    with project.store.engine.connect() as conn:
        eval_input = split_rows(conn, "eval")[0][0].input
        n_train = len(split_rows(conn, "train"))
    project.close()
    # no unlabelled inputs yet: trained on the labelled rows alone, and told so
    alone = _cli("train", "st", "-C", root).stdout
    assert "no unlabelled inputs to self-train on" in alone

    # captured traffic with no answers: 30 new inputs, plus a case-changed copy of a locked eval input
    unlabelled = [t for t, _ in synthetic_rows(10, seed=7)]
    with open(root / "traffic.jsonl", "w", encoding="utf-8") as f:
        for text in unlabelled + [eval_input.upper()]:
            f.write(json.dumps({"input": text}) + "\n")
    report = json.loads(_cli("import", root / "traffic.jsonl", "-C", root, "--json").stdout)
    assert report["unlabelled"] == 31
    assert "31 unlabelled example(s) were not placed" in _cli("split", "-C", root).stdout  # and where they can go

    project = Project.open(root)
    pool = unlabelled_pool(project)
    assert sorted(t for _, t in pool) == sorted(unlabelled)  # the eval copy stays out, labelled rows too
    project.close()

    out = json.loads(_cli("train", "st", "-C", root, "--json").stdout)["st"]
    info = out["metrics"]["pseudo_labels"]
    assert info["labeller"] == "enc" and info["pool"] == 30 and info["per_label"] == 5
    assert 3 <= info["rows"] <= 15 and info["rows"] <= info["confident"]  # at most 5 for each of 3 labels
    assert out["metrics"]["train_examples"] == n_train + info["rows"]
    # what the student was taught, for review: each added row with the labeller's confidence
    audit = [json.loads(line) for line in (Path(out["artifact"]) / info["file"]).read_text().splitlines()]
    assert len(audit) == info["rows"] and {r["input"] for r in audit} <= set(unlabelled)
    assert min(r["confidence"] for r in audit) == info["lowest_confidence_kept"] >= 0.4
    assert "audit" not in info  # the rows live in the file, not in the database
    cache = root / ".stillroom" / "artifacts" / "pseudo-labels" / f"enc-run{info['labeller_run']}-fp32.json"
    answers = json.loads(cache.read_text())
    assert len(answers) == 30 and all(label in ("billing", "shipping", "other") for label, _ in answers.values())
    stamp = cache.stat().st_mtime_ns

    # nothing changed: nothing trained, nothing labelled again
    again = json.loads(_cli("train", "st", "-C", root, "--json").stdout)["st"]
    assert again["skipped"] and again["run_id"] == out["run_id"]
    forced = json.loads(_cli("train", "st", "--force", "-C", root, "--json").stdout)["st"]
    assert forced["run_id"] != out["run_id"] and forced["metrics"]["pseudo_labels"]["rows"] == info["rows"]
    assert cache.stat().st_mtime_ns == stamp  # the labeller's answers came from the cache

    # more traffic: a new pool, a new run; only the new inputs are labelled
    more = [t for t, _ in synthetic_rows(2, seed=11) if t not in unlabelled]
    (root / "more.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t in more), encoding="utf-8")
    _cli("import", root / "more.jsonl", "-C", root)
    grown = json.loads(_cli("train", "st", "-C", root, "--json").stdout)["st"]
    assert not grown["skipped"] and grown["metrics"]["pseudo_labels"]["pool"] == 30 + len(more)
    assert len(json.loads(cache.read_text())) == 30 + len(more)

    # the self-trained student answers like any other and is evaluated on the locked set
    evaluation = json.loads(_cli("eval", "st", "-C", root, "--json").stdout)
    st_eval = evaluation["st"] if "st" in evaluation else evaluation
    assert 0.5 <= st_eval["agreement"] <= 1
    assert Path(grown["artifact"]).is_dir()


def test_a_labeller_that_deploys_int8_labels_with_its_int8_artifact(tmp_path, tiny_llama_dir):
    root = tmp_path / "p"
    _cli("init", root)
    students = (f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 1, learning_rate: 0.005,"
                " rank: 4, batch_size: 16, deploy: int8}\n"
                "  - {name: st, kind: encoder, pseudo_labels: {student: lora, per_label: 4}}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(12))
    (root / "traffic.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t, _ in synthetic_rows(6, seed=5)),
                                        encoding="utf-8")
    for stage in ("import", "split", "lock"):
        _cli(stage, *([root / "data.jsonl"] if stage == "import" else []), "-C", root)
    _cli("import", root / "traffic.jsonl", "-C", root)

    info = json.loads(_cli("train", "st", "-C", root, "--json").stdout)["st"]["metrics"]["pseudo_labels"]
    assert info["pool"] == 18 and 1 <= info["rows"] <= 12  # at most 4 for each of 3 labels
    # the labeller was trained, its int8 artifact exported and evaluated, and that artifact answered
    cache = root / ".stillroom" / "artifacts" / "pseudo-labels" / f"lora-run{info['labeller_run']}-int8.json"
    assert len(json.loads(cache.read_text())) == 18
    from stillroom.project import Project
    from stillroom.train.artifacts import latest_artifact

    project = Project.open(root)
    with project.store.engine.connect() as conn:
        artifact = latest_artifact(conn, info["labeller_run"], "int8")
    project.close()
    assert artifact is not None and Path(artifact["path"]).is_dir()

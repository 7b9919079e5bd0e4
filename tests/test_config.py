from pathlib import Path

import pytest

from stillroom.config import ConfigError, load_config, parse_config
from stillroom.project import Project, ProjectError, init_project

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"task": {"name": "t", "labels": [{"name": "a"}, {"name": "b"}]}}


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*/stillroom.yaml")), ids=lambda p: p.parent.name)
def test_every_example_config_loads(path):
    config = load_config(path)
    if config.task.type == "classification":
        assert len(config.task.labels) >= 2
    elif config.task.type == "extraction":
        assert config.task.schema["properties"]
    for source in config.data:
        assert (path.parent / source.path).is_file(), f"{source.path} named in {path} is missing"


def test_init_scaffolds_a_valid_project(tmp_path):
    cfg = init_project(tmp_path / "p")
    assert cfg.name == "stillroom.yaml" and (tmp_path / "p" / ".stillroom").is_dir()
    project = Project.open(tmp_path / "p")
    assert project.config.task.name == "p"
    assert project.config.gate.allowed_gap_points == 3.0
    with pytest.raises(ProjectError, match="already exists"):
        init_project(tmp_path / "p")


def test_every_problem_is_reported_with_its_field_path():
    bad = {
        "task": {"name": "t", "labels": [{"name": "a"}], "teacher_prompt": "no slot here"},
        "gate": {"max_gap_points": -1},
        "students": [{"name": "s", "kind": "bert"}],
        "teacher": {"price_per_million_input_tokens": "cheap"},
        "colour": "blue",
    }
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    problems = err.value.problems
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    assert "task.labels: at least 2 labels" in text
    assert "task.teacher_prompt: " in text and "{input}" in text and "'no slot here'" in text
    assert "gate.max_gap_points: " in text and "(got -1)" in text
    assert "students.0.kind: " in text and "'encoder', 'lora', 'full' or 'ensemble'" in text
    assert "teacher.price_per_million_input_tokens" in text and "'cheap'" in text
    assert "colour: unknown field" in text


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "stillroom.yaml"
    path.write_text("task:\n  name: t\n  labels: [a, b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: not valid YAML"):
        load_config(path)


def test_missing_file_says_how_to_create_it(tmp_path):
    with pytest.raises(ConfigError, match="stillroom init"):
        load_config(tmp_path / "stillroom.yaml")


def test_gate_presets():
    assert parse_config({**MINIMAL, "gate": {"preset": "high_stakes"}}).gate.allowed_gap_points == 1.0
    assert parse_config({**MINIMAL, "gate": {"preset": "high_stakes", "max_gap_points": 2}}).gate.allowed_gap_points == 2
    assert parse_config(MINIMAL).routing.target_agreement == 0.99


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="routing.student 'nope'"):
        parse_config({**MINIMAL, "routing": {"student": "nope"}})
    with pytest.raises(ConfigError, match="must sum to 1"):
        parse_config({**MINIMAL, "split": {"train": 0.9, "eval": 0.2}})
    with pytest.raises(ConfigError, match="unique"):
        parse_config({**MINIMAL, "students": [{"name": "a", "kind": "encoder"}, {"name": "a", "kind": "lora"}]})
    with pytest.raises(ConfigError, match="base_url"):
        parse_config({**MINIMAL, "teacher": {"backend": "openai"}})


def test_database_url_env_override(tmp_path, monkeypatch):
    config = parse_config(MINIMAL)
    assert config.database_url(tmp_path).startswith("sqlite:///")
    monkeypatch.setenv("STILLROOM_DB_URL", "postgresql://u@127.0.0.1:1/db")
    assert config.database_url(tmp_path) == "postgresql://u@127.0.0.1:1/db"

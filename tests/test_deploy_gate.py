"""The gate and the gateway judge the artifact that will be deployed (students[].deploy), not the
fp32 training copy."""

import json

import pytest

from typer.testing import CliRunner

from conftest import project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.cli.main import app
from stillroom.errors import StillroomError

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_gate_and_run_use_the_deployed_artifact(tmp_path, tiny_llama_dir):
    root = tmp_path / "p"
    _cli("init", root)
    students = (f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 1, learning_rate: 0.005,"
                " rank: 4, batch_size: 16, deploy: int8}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students, "data:\n  - {path: data.jsonl}\n"), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(12))

    for stage in ("import", "split", "lock", "train", "eval"):
        args = [stage, root / "data.jsonl"] if stage == "import" else [stage]
        assert _cli(*args, "-C", root).exit_code == 0
    with pytest.raises(StillroomError, match=r"deploy: int8\) has no evaluation; run `stillroom export lora --format int8`"):
        _cli("gate", "-C", root)
    from stillroom.evaluate.evaluator import deployed_evaluation, latest_evaluation
    from stillroom.project import Project

    project = Project.open(root)
    assert latest_evaluation(project, "lora") is not None
    assert deployed_evaluation(project, "lora") is None  # int8 not exported yet: nothing to gate

    result = runner.invoke(app, ["run", "-C", str(root), "--json"], catch_exceptions=False)
    out = json.loads(result.stdout)
    deployed = deployed_evaluation(project, "lora")
    assert deployed is not None and deployed["deployed_artifact"] == "int8"
    assert out["gate"]["lora"]["gap_points"] == round((1 - deployed["agreement"]) * 100, 2)

    gate = json.loads(runner.invoke(app, ["gate", "-C", str(root), "--json"]).stdout)["lora"]
    assert gate["deploy"] == "int8" and gate["gap_points"] == out["gate"]["lora"]["gap_points"]

    from stillroom.serve.app import load_routing

    routing = load_routing(project)  # the gateway serves the int8 artifact with its own threshold
    assert routing.threshold == deployed["calibration"]["threshold"]
    from stillroom.evaluate.evaluator import deployed_model_path

    assert "int8" in deployed_model_path(project, "lora")
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__
               for m in routing.student.model.modules()), "the gateway must load the int8 model, not fp32"
    assert routing.student.predict(["my parcel delivery"])[0].label in ("billing", "shipping", "other")

    compared = json.loads(runner.invoke(app, ["eval", "--compare", "lora", "lora@int8", "-C", str(root), "--json"],
                                        catch_exceptions=False).stdout)
    assert compared
    project.close()

"""One full `stillroom run` of a tiny real project: real MiniLM encoder and a LoRA student on a tiny
real Llama, the recorded teacher, human labels; then a re-run that skips unchanged stages."""

import json

from typer.testing import CliRunner

from conftest import project_yaml, synthetic_rows, write_chat_jsonl
from stillroom.cli.main import app

runner = CliRunner()


def run(root, *extra):
    result = runner.invoke(app, ["run", "-C", str(root), "--json", *extra], catch_exceptions=False)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout), result.exit_code


def test_full_run_then_skip_then_rerun_on_new_data(tmp_path, tiny_llama_dir):
    root = tmp_path / "p"
    runner.invoke(app, ["init", str(root)], catch_exceptions=False)
    students = ("  - {name: encoder, kind: encoder}\n"
                f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 2, learning_rate: 0.005,"
                " rank: 8, batch_size: 16}\n")
    data = ("data:\n  - {path: data.jsonl}\n  - {path: human.csv, role: human}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students, data), encoding="utf-8")
    rows = synthetic_rows(20)
    write_chat_jsonl(root / "data.jsonl", rows)
    (root / "human.csv").write_text("input,output\n" + "".join(f"{t},{l}\n" for t, l in rows[:8]), encoding="utf-8")

    first, code = run(root)
    stages = {s["stage"]: s for s in first["stages"]}
    assert list(stages) == ["import", "split", "lock", "train encoder", "train lora", "eval encoder",
                            "eval lora", "report"]
    assert all(s["status"] == "done" for s in stages.values()), stages
    assert set(first["gate"]) == {"encoder", "lora"}
    assert code == (0 if any(v["passed"] for v in first["gate"].values()) else 1)
    html = open(first["report"]["html"], encoding="utf-8").read()
    assert "encoder" in html and "lora" in html

    second, _ = run(root)
    status = {s["stage"]: s["status"] for s in second["stages"]}
    assert status == {"import": "skipped", "split": "skipped", "lock": "verified", "train encoder": "skipped",
                      "train lora": "skipped", "eval encoder": "skipped", "eval lora": "skipped", "report": "done"}

    write_chat_jsonl(root / "data.jsonl", rows + synthetic_rows(4, seed=9))
    third, _ = run(root)
    status = {s["stage"]: s["status"] for s in third["stages"]}
    assert status["import"] == "done" and status["split"] == "done" and status["lock"] == "verified"
    assert status["train encoder"] == "done" and status["eval encoder"] == "done"

"""`stillroom sweep`: a grid of real training runs recorded as trials, the winner picked on
validation agreement, and promotion into the store and into stillroom.yaml (comments kept)."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from typer.testing import CliRunner  # noqa: E402

from conftest import synthetic_rows  # noqa: E402
from stillroom.cli.main import app  # noqa: E402

runner = CliRunner()


def ready(project):
    """Imported, split and locked: what a sweep needs."""
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project

    import_file(project, project.root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    return project


def cli(*args):
    result = runner.invoke(app, [*args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def runs(project, name):
    from sqlalchemy import select

    from stillroom.store import tables as T

    with project.store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(T.training_runs).where(T.training_runs.c.student == name).order_by(T.training_runs.c.id))]


def test_encoder_sweep_records_trials_and_promotes(make_project):
    from stillroom.store.records import latest_run

    project = ready(make_project(synthetic_rows(30)))
    root = str(project.root)

    dry = json.loads(cli("sweep", "encoder", "--head", "logreg,mlp", "--dry-run", "--json", "-C", root).stdout)
    assert dry["points"] == [{"head": "logreg"}, {"head": "mlp"}]
    assert runs(project, "encoder") == []

    result = json.loads(cli("sweep", "encoder", "--head", "logreg,mlp", "--json", "-C", root).stdout)
    rows = result["runs"]
    assert [r["head"] for r in rows] == ["logreg", "mlp"] and all(r["status"] == "trained" for r in rows)
    best = max(r["val_agreement"] for r in rows)
    assert result["winner"]["val_agreement"] == best
    if rows[0]["val_agreement"] == rows[1]["val_agreement"]:
        assert result["winner"]["head"] == "logreg"  # a tie goes to the cheaper head
    recorded = runs(project, "encoder")
    assert [r["status"] for r in recorded] == ["trial", "trial"]
    assert {r["sweep_id"] for r in recorded} == {result["sweep_id"]}
    assert [json.loads(r["config"])["head"] for r in recorded] == ["logreg", "mlp"]
    assert json.loads((project.workspace / "sweeps" / f"{result['sweep_id']}.json").read_text())["winner"]["run_id"] \
        == result["winner"]["run_id"]
    with project.store.engine.connect() as conn:
        assert latest_run(conn, "encoder") is None  # trials are not the student's run

    # Same grid again with --promote: nothing retrained, the winner becomes the current run.
    again = json.loads(cli("sweep", "encoder", "--head", "logreg,mlp", "--promote", "--json", "-C", root).stdout)
    assert [r["status"] for r in again["runs"]] == ["reused", "reused"]
    assert again["winner"]["run_id"] == result["winner"]["run_id"]
    with project.store.engine.connect() as conn:
        assert latest_run(conn, "encoder")["id"] == result["winner"]["run_id"]
    promotion = again["promotion"]
    if result["winner"]["head"] == "mlp":
        assert promotion["config"] == "written" and "head: mlp" in (project.root / "stillroom.yaml").read_text()
    else:
        assert promotion["config"] == "unchanged"  # logreg is already the configured head
    human = cli("sweep", "encoder", "--head", "logreg,mlp", "-C", root).output  # the table, reusing both runs
    assert f"{result['winner']['run_id']} *" in human and "reused" in human and "winner: run" in human

    # The promoted run is what a plain `train` of the (now matching) config finds: no retraining.
    trained = json.loads(cli("train", "encoder", "--json", "-C", root).stdout)
    assert trained["encoder"] == {**trained["encoder"], "run_id": result["winner"]["run_id"], "skipped": True}


@pytest.fixture(scope="module")
def learnable_llama(tmp_path_factory):
    """The tiny 2-layer Llama with a wider init (as in test_lora_student): with only LoRA weights
    training, the frozen tied embeddings must be large enough for the logits to move."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stillroom.models import smollm2_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("learnable-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_lora_sweep_picks_the_point_with_better_val_agreement(make_project, learnable_llama):
    students = (f"  - {{name: lora, kind: lora, base_model: '{learnable_llama}', rank: 16, alpha: 32, "
                "batch_size: 4}  # the student under test\n")
    project = ready(make_project(synthetic_rows(30), students=students))
    yaml_before = (project.root / "stillroom.yaml").read_text()
    result = json.loads(cli("sweep", "lora", "--rank", "8", "--lr", "1e-6,1e-2", "--epochs", "4",
                            "--promote", "--json", "-C", str(project.root)).stdout)
    rows = result["runs"]
    assert [(r["rank"], r["alpha"], r["learning_rate"]) for r in rows] == [(8, 16, 1e-6), (8, 16, 1e-2)]
    assert all(r["status"] == "trained" and r["train_tokens_per_s"] > 0 for r in rows)
    # A learning rate of 1e-6 leaves the random tiny model where it was; 1e-2 learns the easy task.
    assert rows[1]["val_agreement"] > rows[0]["val_agreement"]
    assert result["winner"]["run_id"] == rows[1]["run_id"]
    recorded = {r["id"]: r for r in runs(project, "lora")}
    assert recorded[rows[0]["run_id"]]["status"] == "trial"
    assert recorded[rows[1]["run_id"]]["status"] == "finished"  # promoted
    assert {r["sweep_id"] for r in recorded.values()} == {result["sweep_id"]}

    human = cli("sweep", "lora", "--rank", "8", "--lr", "1e-6,1e-2", "--epochs", "4", "-C", str(project.root)).output
    assert "learnable-llama" in human and "tokens/s" in human and f"{rows[1]['run_id']} *" in human

    # The winning values are written into the flow-style entry; the comment stays.
    text = (project.root / "stillroom.yaml").read_text()
    assert "# the student under test" in text and text != yaml_before
    from stillroom.config import load_config

    lora = load_config(project.root / "stillroom.yaml").student("lora")
    assert (lora.rank, lora.alpha, lora.learning_rate, lora.epochs) == (8, 16, 1e-2, 4)


def test_encoder_sweep_compares_base_models_and_promotes_the_winning_base(make_project, tiny_bert_dir):
    project = ready(make_project(synthetic_rows(20)))
    root = str(project.root)
    bases = f"all-minilm-l6-v2,{tiny_bert_dir}"
    dry = json.loads(cli("sweep", "encoder", "--base", bases, "--head", "logreg", "--dry-run", "--json",
                         "-C", root).stdout)
    assert dry["points"] == [{"head": "logreg", "base_model": "all-minilm-l6-v2"},
                             {"head": "logreg", "base_model": str(tiny_bert_dir)}]
    result = json.loads(cli("sweep", "encoder", "--base", bases, "--head", "logreg", "--promote", "--json",
                            "-C", root).stdout)
    by_base = {r["base_model"]: r for r in result["runs"]}
    assert all(r["status"] == "trained" for r in result["runs"])
    for base, r in by_base.items():
        manifest = json.loads((Path(r["artifact"]) / "student.json").read_text())
        assert manifest["encoder"] == ("all-MiniLM-L6-v2" if base == "all-minilm-l6-v2" else tiny_bert_dir.name)
    # The better validation score wins; a tie goes to the smaller body (the 2-layer BERT).
    scores = {b: r["val_score"] for b, r in by_base.items()}
    best = max(scores.values())
    expected = (str(tiny_bert_dir) if scores[str(tiny_bert_dir)] == best else "all-minilm-l6-v2")
    assert result["winner"]["base_model"] == expected
    from stillroom.config import load_config

    promoted = load_config(project.root / "stillroom.yaml").student("encoder")
    assert promoted.base_model == expected
    human = cli("sweep", "encoder", "--base", bases, "--head", "logreg", "-C", root).output
    assert "base" in human and tiny_bert_dir.name in human


def test_sweep_refuses_bad_grids(make_project):
    from stillroom.config import ConfigError
    from stillroom.train.sweep import SweepError, sweep_grid

    project = make_project(synthetic_rows(5), students="  - {name: encoder, kind: encoder}\n"
                           "  - {name: lora, kind: lora, sweep: {rank: [8, 16], epochs: [2]}}\n")
    with pytest.raises(SweepError, match="encoder student: --rank"):
        sweep_grid(project, "encoder", rank=[8])
    with pytest.raises(ConfigError, match=r"students\.lora\.rank"):
        sweep_grid(project, "lora", rank=[0])
    with pytest.raises(ConfigError, match="base_model"):
        sweep_grid(project, "lora", base_model=["/no/such/model"])
    # The yaml block is the grid; a flag replaces one of its lists.
    points = sweep_grid(project, "lora", learning_rate=[1e-4])
    assert [(p.overrides["rank"], p.overrides["epochs"], p.overrides["learning_rate"]) for p in points] == \
        [(8, 2, 1e-4), (16, 2, 1e-4)]
    result = runner.invoke(app, ["sweep", "lora", "--rank", "8,x", "-C", str(project.root)])
    assert "--rank: 'x' is not an integer" in str(result.exception)  # main() prints it, exit code 2


def test_promote_to_yaml_keeps_comments_in_block_style(tmp_path):
    from stillroom.config import load_config
    from stillroom.train.sweep import promote_to_yaml

    path = tmp_path / "stillroom.yaml"
    path.write_text(
        "# project file\ntask:\n  name: t\n  labels: [{name: a}, {name: b}]\n"
        "students:\n  - name: lora   # the small one\n    kind: lora\n    rank: 16  # tuned by hand\n"
        "    epochs: 3\n  - name: enc\n    kind: encoder\n", encoding="utf-8")
    result = promote_to_yaml(path, "lora", {"rank": 32, "learning_rate": 1e-4, "alpha": 64})
    assert result["config"] == "written", result
    text = path.read_text()
    assert "# project file" in text and "# the small one" in text and "rank: 32  # tuned by hand" in text
    lora = load_config(path).student("lora")
    assert (lora.rank, lora.learning_rate, lora.alpha, lora.epochs) == (32, 1e-4, 64, 3)
    assert load_config(path).student("enc").kind == "encoder"

    # No students list in the file (the default student): nothing to edit safely, a snippet instead.
    path.write_text("task: {name: t, labels: [{name: a}, {name: b}]}  # keep\n", encoding="utf-8")
    before = path.read_text()
    result = promote_to_yaml(path, "encoder", {"head": "mlp"})
    assert result["config"] == "snippet" and path.read_text() == before
    assert "head: mlp" in result["snippet"] and "name: encoder" in result["snippet"]


def test_switching_the_config_back_reuses_the_identical_earlier_run(make_project):
    from stillroom.store.records import latest_run
    from stillroom.train.runner import train_student

    project = ready(make_project(synthetic_rows(30)))
    root = str(project.root)
    first = json.loads(cli("train", "encoder", "--json", "-C", root).stdout)["encoder"]
    config = project.root / "stillroom.yaml"
    text = config.read_text()
    config.write_text(text.replace("{name: encoder, kind: encoder}", "{name: encoder, kind: encoder, head: mlp}"))
    second = json.loads(cli("train", "encoder", "--json", "-C", root).stdout)["encoder"]
    assert second["skipped"] is False and second["run_id"] != first["run_id"]

    config.write_text(text)  # back to the first config: its run is current again, nothing retrained
    assert f"identical to run {first['run_id']} (reused)" in cli("train", "encoder", "-C", root).output
    back = json.loads(cli("train", "encoder", "--json", "-C", root).stdout)["encoder"]  # now simply current
    assert back["skipped"] is True and back["reused_run"] is None
    assert back["artifact"] == first["artifact"] and back["metrics"]["val_agreement"] == first["metrics"]["val_agreement"]
    assert back["metrics"]["promoted_from_run"] == first["run_id"]
    with project.store.engine.connect() as conn:
        assert latest_run(conn, "encoder")["id"] == back["run_id"]  # what eval, export and serve use
    assert [r["status"] for r in runs(project, "encoder")] == ["finished", "finished", "finished"]

    # --force still trains afresh, and a deleted folder is not reused
    import shutil

    shutil.rmtree(second["artifact"])
    config.write_text(text.replace("{name: encoder, kind: encoder}", "{name: encoder, kind: encoder, head: mlp}"))
    project.close()
    from stillroom.project import Project

    reopened = Project.open(project.root)
    try:
        retrained = train_student(reopened, "encoder")
        assert retrained["skipped"] is False and "reused_run" not in retrained
    finally:
        reopened.close()

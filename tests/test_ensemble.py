"""Ensemble students: pooling weights fitted on validation, members built from what they deploy,
a self-contained artifact, and clear errors for configurations that cannot work."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import locked_cli_project, project_yaml
from stillroom.cli.main import app
from stillroom.config import ConfigError
from stillroom.errors import StillroomError
from stillroom.train.ensemble import EnsembleStudent, fit_weights, pool, weight_grid

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_weight_grid_covers_the_simplex_including_each_member_alone():
    grid = weight_grid(3, step=0.25)
    assert len(grid) == 15  # C(4 + 2, 2) points with coordinates in quarters
    assert all(abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in grid)
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)} <= set(grid)


def test_pooling_two_members_that_are_wrong_on_different_inputs_beats_both():
    # Member A is right and sure on the first half, wrong and unsure on the second; B the reverse.
    y = np.array([0, 1, 2, 0, 1, 2])
    sure, unsure = 0.9, 0.4

    def member(right_on):
        p = np.zeros((6, 3))
        for i, label in enumerate(y):
            if i in right_on:
                p[i] = (1 - sure) / 2
                p[i, label] = sure
            else:
                p[i] = (1 - unsure) / 2
                p[i, (label + 1) % 3] = unsure
        return p

    a, b = member({0, 1, 2}), member({3, 4, 5})
    weights, agreement, alone = fit_weights([a, b], y)
    assert alone == [0.5, 0.5]
    assert agreement == 1.0 and weights == (0.5, 0.5)  # symmetric members: the log-loss is lowest at equal weights
    pooled = pool([a, b], weights)
    assert np.allclose(pooled.sum(1), 1) and (pooled.argmax(1) == y).all()
    # A member that is always right: the fitted pool is never worse than the best member alone.
    perfect = np.eye(3)[y] * 0.98 + 0.01
    weights, agreement, _ = fit_weights([a, perfect], y)
    assert agreement == 1.0
    # Both always right, so agreement cannot choose; the log-loss prefers the member that is surer.
    vague, sharp = np.eye(3)[y] * 0.3 + 0.7 / 3, np.eye(3)[y] * 0.9 + 0.1 / 3
    weights, agreement, alone = fit_weights([vague, sharp], y)
    assert alone == [1.0, 1.0] and agreement == 1.0 and weights == (0.0, 1.0)


def _config_error(yaml_project, students: str):
    with pytest.raises(ConfigError) as err:
        yaml_project(project_yaml(students))
    return str(err.value)


@pytest.mark.parametrize("students, message", [
    ("  - {name: ens, kind: ensemble, members: [a]}\n  - {name: a, kind: encoder}\n", "at least two"),
    ("  - {name: ens, kind: ensemble, members: [a, b]}\n  - {name: a, kind: encoder}\n",
     "members b are not students here"),
    ("  - {name: ens, kind: ensemble, members: [a, ens]}\n  - {name: a, kind: encoder}\n", "distinct students other"),
    ("  - {name: ens, kind: ensemble, members: [a, b], rank: 8}\n  - {name: a, kind: encoder}\n"
     "  - {name: b, kind: encoder, head: mlp}\n", "rank does not apply to an ensemble"),
    ("  - {name: ens, kind: ensemble, members: [a, b], deploy: int8}\n  - {name: a, kind: encoder}\n"
     "  - {name: b, kind: encoder, head: mlp}\n", "deploy must be 'fp32'"),
    ("  - {name: e1, kind: ensemble, members: [a, b]}\n  - {name: e2, kind: ensemble, members: [a, e1]}\n"
     "  - {name: a, kind: encoder}\n  - {name: b, kind: encoder, head: mlp}\n", "are ensembles themselves"),
    ("  - {name: a, kind: encoder, members: [b, c]}\n", "members applies to kind 'ensemble' only"),
])
def test_ensemble_config_errors_name_the_problem(yaml_project, students, message):
    assert message in _config_error(yaml_project, students)


def test_ensemble_of_an_encoder_and_an_int8_lora_student(tmp_path, tiny_llama_dir, monkeypatch):
    students = ("  - {name: enc, kind: encoder}\n"
                f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 1, learning_rate: 0.005,"
                " rank: 4, batch_size: 16, deploy: int8}\n"
                "  - {name: ens, kind: ensemble, members: [enc, lora]}\n")
    root = locked_cli_project(tmp_path / "p", students, 20)

    # Training the ensemble trains its members and exports the artifact the lora member deploys.
    out = json.loads(_cli("train", "ens", "-C", root, "--json").stdout)["ens"]
    metrics = out["metrics"]
    assert set(metrics["weights"]) == {"enc", "lora"} and abs(sum(metrics["weights"].values()) - 1) < 1e-9
    assert metrics["fit_objective"] == "log-loss"
    assert metrics["val_log_loss"] <= min(metrics["member_val_log_loss"].values()) + 1e-9  # each alone is on the grid
    assert [m["deploy"] for m in metrics["members"]] == ["fp32", "int8"]
    artifact = Path(out["artifact"])
    manifest = json.loads((artifact / "student.json").read_text())
    assert [m["name"] for m in manifest["members"]] == ["enc", "lora"]
    assert json.loads((artifact / "members" / "lora" / "student.json").read_text())["format"] == "int8"

    # Unchanged members and data: the ensemble is not rebuilt. A retrained member: it is.
    again = json.loads(_cli("train", "ens", "-C", root, "--json").stdout)["ens"]
    assert again["skipped"] and again["run_id"] == out["run_id"]
    # weights fitted another way (an upgrade that changes the objective): refitted, members reused
    monkeypatch.setattr("stillroom.train.ensemble.FIT_OBJECTIVE", "some later objective")
    refit = json.loads(_cli("train", "ens", "-C", root, "--json").stdout)["ens"]
    assert not refit["skipped"] and refit["run_id"] != out["run_id"]
    assert [m["run_id"] for m in refit["metrics"]["members"]] == [m["run_id"] for m in metrics["members"]]
    _cli("train", "enc", "--force", "-C", root)
    rebuilt = json.loads(_cli("train", "ens", "-C", root, "--json").stdout)["ens"]
    assert not rebuilt["skipped"] and rebuilt["run_id"] != out["run_id"]

    evaluation = json.loads(_cli("eval", "ens", "-C", root, "--json").stdout)
    ens_eval = evaluation["ens"] if "ens" in evaluation else evaluation
    assert 0 <= ens_eval["agreement"] <= 1

    # Self-contained: the members' own folders can go; the gateway loads the ensemble alone.
    shutil.rmtree(root / ".stillroom" / "artifacts" / "exports", ignore_errors=True)
    student = EnsembleStudent.load(Path(rebuilt["artifact"]))
    predictions = student.predict(["my parcel delivery is late", "refund my card payment"])
    for p in predictions:
        assert p.label in ("billing", "shipping", "other")
        assert abs(sum(p.probs.values()) - 1) < 1e-6 and p.confidence == p.probs[p.label]

    for command in ("export", "sweep"):
        with pytest.raises(StillroomError, match="'?ens'? is an ensemble"):
            runner.invoke(app, [command, "ens", "-C", str(root)], catch_exceptions=False)


def test_eval_compares_an_ensemble_with_its_members_on_the_same_lock(tmp_path):
    students = ("  - {name: a, kind: encoder}\n  - {name: b, kind: encoder, head: mlp}\n"
                "  - {name: ens, kind: ensemble, members: [a, b]}\n")
    root = locked_cli_project(tmp_path / "p", students, 20)
    _cli("train", "ens", "-C", root)

    # No member evaluated yet: nothing to compare with.
    alone = json.loads(_cli("eval", "ens", "-C", root, "--json").stdout)
    assert "vs_members" not in alone["ens"]

    out = _cli("eval", "a", "b", "ens", "-C", root, "--json")
    results = json.loads(out.stdout)
    vs = results["ens"]["vs_members"]
    assert vs["members"] == {"a": results["a"]["agreement"], "b": results["b"]["agreement"]}
    assert vs["members"][vs["best_member"]] == max(vs["members"].values())
    assert vs["below_best_member"] == (max(vs["members"].values()) > results["ens"]["agreement"])
    assert "vs_members" not in results["a"]  # only ensembles are compared
    stored = json.loads(_cli("eval", "--show", "-C", root, "--json").stdout)
    assert stored["ens"]["vs_members"] == vs

    # The comparison itself: an ensemble result below its best member is flagged; one on another lock
    # finds no member to compare with.
    from stillroom.evaluate.evaluator import ensemble_vs_members
    from stillroom.project import Project

    project = Project.open(root)
    try:
        below = ensemble_vs_members(project, "ens", {**results["ens"], "agreement": -1.0})
        assert below["below_best_member"] and below["members"] == vs["members"]
        assert ensemble_vs_members(project, "ens", {**results["ens"], "lock_id": -1}) is None
        assert ensemble_vs_members(project, "a", results["a"]) is None
    finally:
        project.close()

    human = _cli("eval", "--show", "-C", root).stdout
    best = vs["best_member"]
    expected = f"below its member {best}" if vs["below_best_member"] else f"its best member, {best}"
    assert expected in human

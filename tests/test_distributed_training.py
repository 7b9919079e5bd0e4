"""Data-parallel training under torchrun: two real processes on loopback (gloo on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LABELS, project_yaml, synthetic_rows, write_chat_jsonl

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def torchrun(*args, cwd=None, timeout=600):
    """`torchrun --standalone --nproc_per_node 2 ...` as a user runs it; one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


TRAIN_SCRIPT = '''
import json, sys
from pathlib import Path
from stillroom.train.lora import LoraConfig, train_lora
rows = [tuple(r) for r in json.loads(Path(sys.argv[1]).read_text())]
full = sys.argv[4] == "full"
config = LoraConfig(base_model=sys.argv[2], rank=4, dropout=0.0, epochs=2, batch_size=5,
                    learning_rate=1e-3 if full else 5e-3, threads=1, checkpoint_every=0, full=full)
result = train_lora(rows[:31], rows[31:], sorted(set(y for _, y in rows)), Path(sys.argv[3]), config)
sys.stdout.write("METRICS " + json.dumps(result.metrics) + "\\n")  # one write: ranks share the pipe
sys.stdout.flush()
'''


def run_two_processes(tmp_path: Path, script_text: str, base: Path, kind: str) -> tuple[list, list]:
    """The rows, and each process's printed metrics, of `script_text` trained by two processes into
    tmp_path/two (31 train rows in batches of 5, the last with 1; val 9)."""
    rows = synthetic_rows(14)[:40]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = tmp_path / "train.py"
    script.write_text(script_text)
    done = torchrun(script, tmp_path / "rows.json", base, tmp_path / "two", kind)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("METRICS")]
    assert len(printed) == 2, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
    return rows, printed


def assert_same_training(two: Path, one: Path, base: Path, kind: str) -> None:
    """The weights trained in `two` equal those in `one` within 1e-3 of what training changed."""
    two, one = trained_weights(two), trained_weights(one)
    start = {} if kind == "lora" else trained_weights(base)  # LoRA's B starts at 0
    assert sorted(two) == sorted(one) and one
    for name, weight in one.items():
        update = (weight - start[name]) if start else weight
        assert update.abs().max() > 0  # trained
        assert (two[name] - weight).abs().max() <= 1e-3 * update.abs().max(), name


def trained_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    adapter = folder / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_llama_dir, kind):
    """Each process takes its half of every batch (5 rows: 3 and 2; the last batch's single row
    leaves the second process an empty share) and gradients are averaged, so two processes reach
    the weights one process does, to float rounding. LoRA replicates the model in each process
    (DistributedDataParallel); a full fine-tune shards weights, gradients and AdamW state (FSDP2)."""
    rows, printed = run_two_processes(tmp_path, TRAIN_SCRIPT, tiny_llama_dir, kind)
    assert len(printed) == 2 and all(m["processes"] == 2 for m in printed)
    assert {m["parallelism"] for m in printed} == {"ddp" if kind == "lora" else "fsdp"}
    assert printed[0]["val_agreement_by_epoch"] == printed[1]["val_agreement_by_epoch"]  # both stop alike

    import torch

    from stillroom.train.lora import LoraConfig, train_lora

    torch.set_num_threads(1)
    config = LoraConfig(base_model=str(tiny_llama_dir), rank=4, dropout=0.0, epochs=2, batch_size=5,
                        learning_rate=1e-3 if kind == "full" else 5e-3, threads=1, checkpoint_every=0,
                        full=kind == "full")
    one = train_lora(rows[:31], rows[31:], sorted(LABELS), tmp_path / "one", config)
    assert one.metrics["processes"] == 1 and one.metrics["train_tokens"] == printed[0]["train_tokens"]
    assert_same_training(tmp_path / "two", tmp_path / "one", tiny_llama_dir, kind)
    assert not (tmp_path / "two" / "checkpoint").exists()


def test_torchrun_stillroom_train_records_one_run_and_reports_once(tmp_path, tiny_llama_dir):
    root = tmp_path / "p"
    lora = f"kind: lora, base_model: '{tiny_llama_dir}', epochs: 1, learning_rate: 0.005, rank: 4, batch_size: 8"
    students = (f"  - {{name: lora, {lora}}}\n  - {{name: enc, kind: encoder}}\n"
                f"  - {{name: lora_st, {lora}, pseudo_labels: {{student: enc, per_label: 4}}}}\n")
    env_cli = [sys.executable, "-m", "stillroom"]
    subprocess.run([*env_cli, "init", str(root)], check=True, capture_output=True, cwd=ROOT)
    (root / "stillroom.yaml").write_text(project_yaml(students), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(12))
    for stage in (["import", str(root / "data.jsonl")], ["split"], ["lock"]):
        subprocess.run([*env_cli, *stage, "-C", str(root)], check=True, capture_output=True, cwd=ROOT)

    first = torchrun("-m", "stillroom", "train", "lora", "-C", root, "--json", cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)  # one JSON document: only rank 0 printed
    assert report["lora"]["skipped"] is False and report["lora"]["metrics"]["processes"] == 2
    assert (Path(report["lora"]["artifact"]) / "adapter_model.safetensors").is_file()

    from stillroom.project import Project
    from stillroom.store.records import latest_run

    project = Project.open(root)
    with project.store.engine.connect() as conn:
        run = latest_run(conn, "lora")
        count = conn.exec_driver_sql("SELECT count(*) FROM training_runs").scalar()
    project.close()
    assert run["status"] == "finished" and run["id"] == report["lora"]["run_id"] and count == 1

    again = torchrun("-m", "stillroom", "train", "lora", "-C", root, "--json", cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["lora"]["skipped"] is True  # rank 0's decision reached rank 1: no hang

    # self-training: rank 0 trains the encoder labeller alone, then both processes train lora_st
    (root / "traffic.jsonl").write_text("".join(json.dumps({"input": t}) + "\n" for t, _ in synthetic_rows(6, seed=5)),
                                        encoding="utf-8")
    subprocess.run([*env_cli, "import", str(root / "traffic.jsonl"), "-C", str(root)], check=True,
                   capture_output=True, cwd=ROOT)
    st = torchrun("-m", "stillroom", "train", "lora_st", "-C", root, "--json", cwd=ROOT)
    assert st.returncode == 0, st.stderr[-3000:]
    metrics = json.loads(st.stdout)["lora_st"]["metrics"]
    assert metrics["processes"] == 2 and metrics["pseudo_labels"]["labeller"] == "enc"
    assert 1 <= metrics["pseudo_labels"]["rows"] <= 12 and metrics["pseudo_labels"]["pool"] == 18

    refused = torchrun("-m", "stillroom", "train", "enc", "-C", root, cwd=ROOT)
    assert refused.returncode != 0
    assert "only a plain `stillroom train` of lora and full students runs across processes" in refused.stderr


RESUME_SCRIPT = '''
import json, sys
from pathlib import Path
from stillroom.train.lora import LoraConfig, train_lora
rows = [tuple(r) for r in json.loads(Path(sys.argv[1]).read_text())]
stop = int(sys.argv[4])
def progress(step, total):  # called on rank 0 only; its death takes the other process down too
    if step == stop:
        raise SystemExit(3)
full = sys.argv[5] == "full"
config = LoraConfig(base_model=sys.argv[2], rank=4, dropout=0.1, epochs=2, batch_size=5,
                    learning_rate=1e-3 if full else 5e-3, threads=1, checkpoint_every=3, full=full)
result = train_lora(rows[:31], rows[31:], sorted(set(y for _, y in rows)), Path(sys.argv[3]), config,
                    progress=progress)
sys.stdout.write("METRICS " + json.dumps(result.metrics) + "\\n")  # one write: ranks share the pipe
sys.stdout.flush()
'''


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_killed_two_process_run_resumes_to_the_same_weights(tmp_path, tiny_llama_dir, kind):
    """LoRA, dropout on: each process draws its own masks, and a resume must restore each one's
    generator. Full: the sharded weights and AdamW state are gathered into the checkpoint and
    sharded again on resume. Either way the resumed run ends with exactly the weights of a run that
    was never stopped."""
    import torch

    rows = synthetic_rows(14)[:40]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    straight = torchrun(script, tmp_path / "rows.json", tiny_llama_dir, tmp_path / "straight", 0, kind)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # killed at step 5 of epoch 1's 7, after the checkpoint at step 3: every saved weight comes after the resume
    killed = torchrun(script, tmp_path / "rows.json", tiny_llama_dir, tmp_path / "resumed", 5, kind)
    assert killed.returncode != 0 and (tmp_path / "resumed" / "checkpoint" / "state.pt").is_file()
    resumed = torchrun(script, tmp_path / "rows.json", tiny_llama_dir, tmp_path / "resumed", 0, kind)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line.split(" ", 1)[1]) for line in resumed.stdout.splitlines() if line.startswith("METRICS")]
    assert [m["resumed_from_step"] for m in metrics] == [3, 3]
    a, b = trained_weights(tmp_path / "straight"), trained_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

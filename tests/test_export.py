"""Exports of a trained `lora` student (adapter, merged, int8, GGUF f16/Q8_0) on a tiny real Llama:
each one loads, answers like the fp32 student, is re-evaluated on the locked eval split and recorded.
The llama.cpp checks run when llama-cpp-python is installed (`stillroom[gguf-serve]`)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")

from typer.testing import CliRunner  # noqa: E402

from conftest import project_yaml, synthetic_rows, write_chat_jsonl  # noqa: E402
from stillroom.cli.main import app  # noqa: E402
from stillroom.errors import StillroomError  # noqa: E402

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (pip install 'stillroom[gguf-serve]'); "
    "the GGUF files are still written and checked with the gguf reader")
runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llama_dir):
    """A project whose lora student (on the tiny Llama) is trained against a locked eval split."""
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.project import Project, init_project
    from stillroom.train.runner import train_student

    root = tmp_path_factory.mktemp("export") / "proj"
    init_project(root)
    students = (f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 2, "
                "learning_rate: 0.005, rank: 8, batch_size: 16}\n  - {name: encoder, kind: encoder}\n")
    (root / "stillroom.yaml").write_text(project_yaml(students), encoding="utf-8")
    write_chat_jsonl(root / "data.jsonl", synthetic_rows(20))
    project = Project.open(root)
    import_file(project, root / "data.jsonl")
    split_project(project)
    lock_eval(project)
    train_student(project, "lora")
    yield project
    project.close()


@pytest.fixture(scope="module")
def exported(project):
    """Every format exported through the CLI, re-evaluated, as the --json payload."""
    result = runner.invoke(app, ["export", "lora", "-C", str(project.root), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    return {a["format"]: a for a in payload["artifacts"]}


def eval_texts(project, n=None):
    from stillroom.store.records import split_rows

    with project.store.engine.connect() as conn:
        return [ex.input for ex, _ in split_rows(conn, "eval")][:n]


def fp32_student(project):
    from stillroom.store.records import latest_run
    from stillroom.train.lora import LoraStudent

    with project.store.engine.connect() as conn:
        return LoraStudent.load(latest_run(conn, "lora")["artifact_path"])


# --- every format ------------------------------------------------------------------------------


def test_every_format_is_written_hashed_and_recorded(project, exported):
    from sqlalchemy import select

    from stillroom.store import tables as T

    assert list(exported) == ["adapter", "merged", "int8", "gguf-f16", "gguf-q8_0"]
    for fmt, artifact in exported.items():
        folder = project.root / ".stillroom" / "artifacts" / "exports" / "lora-run1" / fmt
        assert artifact["path"] == str(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["format"] == fmt and manifest["sha256"] == artifact["sha256"]
        for name, entry in manifest["files"].items():  # the manifest matches what is on disk
            assert (folder / name).stat().st_size == entry["bytes"]
        assert json.loads((folder / "student.json").read_text())["format"] == fmt
    with project.store.engine.connect() as conn:
        rows = conn.execute(select(T.TABLES["artifacts"])).all()
        kinds = [r.kind for r in conn.execute(select(T.evaluations.c.kind))]
    assert sorted(r.format for r in rows) == sorted(exported)
    expected = {"eval"} | {f"artifact:{f}" for f in exported if "evaluation" in exported[f]}
    assert set(kinds) == expected
    assert all(json.loads(r.metrics)["evaluation_id"] for r in rows if f"artifact:{r.format}" in kinds)


def test_reevaluation_reports_the_change_against_fp32_and_gates_the_artifact(project, exported):
    from stillroom.evaluate.evaluator import latest_evaluation
    from stillroom.train.artifacts import latest_artifact_evaluation

    fp32 = latest_evaluation(project, "lora")
    for fmt in ("adapter", "merged"):  # the same weights in fp32: nothing may change
        e = exported[fmt]["evaluation"]
        assert e["vs_fp32"]["label_flips"] == 0 and e["vs_fp32"]["agreement_delta_points"] == 0
        assert e["agreement"] == fp32["agreement"]
    for fmt, artifact in exported.items():
        if "evaluation" not in artifact:
            assert not HAVE_LLAMA_CPP and fmt.startswith("gguf") and "gguf-serve" in artifact["evaluation_skipped"]
            continue
        e = artifact["evaluation"]
        assert e["vs_fp32"]["compared"] == e["vs_teacher"]["n"] == len(eval_texts(project))
        assert e["vs_fp32"]["fp32_agreement"] == fp32["agreement"]
        assert e["latency_ms"]["p50"] > 0 and e["artifact"]["format"] == fmt
        assert f"'lora@{fmt}'" in e["gate"]["message"] and e["gate"]["passed"] in (True, False)
        stored = latest_artifact_evaluation(project, "lora", fmt)
        assert stored["evaluation_id"] == e["evaluation_id"] and stored["stale"] is False
        assert stored["agreement"] == e["agreement"] and len(stored["predictions"]) == e["vs_teacher"]["n"]


def test_registry_loads_any_exported_folder(exported):
    from stillroom.train.registry import load_student

    for fmt in ("adapter", "merged", "int8"):
        student = load_student(exported[fmt]["path"])
        assert student.format == fmt and student.labels == ["billing", "shipping", "other"]


# --- merged ------------------------------------------------------------------------------------


def test_merged_loads_with_transformers_alone_and_matches_the_fp32_student(project, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.train.artifacts import load_artifact

    path = exported["merged"]["path"]
    config = json.load(open(os.path.join(path, "config.json")))
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    reference = fp32_student(project)
    ids = tokenizer(eval_texts(project, 4), return_tensors="pt", padding=True)
    with torch.inference_mode():
        diff = (merged(**ids).logits - reference.model(**ids).logits).abs().max().item()
    assert diff < 1e-4

    texts = eval_texts(project)
    want, got = reference.predict(texts), load_artifact(path).predict(texts)
    assert [p.label for p in got] == [p.label for p in want]
    assert max(abs(a.probs[k] - b.probs[k]) for a, b in zip(want, got) for k in a.probs) < 1e-4


# --- int8 --------------------------------------------------------------------------------------


def test_int8_quantizes_the_decoder_linears_and_predicts_close_to_fp32(project, exported):
    from safetensors.torch import load_file

    from stillroom.train.artifacts import load_artifact

    path = exported["int8"]["path"]
    tensors = load_file(os.path.join(path, "model.int8.safetensors"))
    int8 = [k for k, v in tensors.items() if v.dtype == torch.int8]
    assert len(int8) == 2 * 6  # q, k, v, o, gate, up in each of 2 layers; down_proj stays fp32
    fp32_weights = sorted(k for k in tensors if k.endswith("proj.weight"))  # no fp32 copy of a quantized one
    assert fp32_weights == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]

    student = load_artifact(path)
    quantized = [m for m in student.model.modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    assert len(quantized) == 12
    assert student.model.get_output_embeddings().weight.dtype == torch.float32  # the label scorer stays fp32

    texts = eval_texts(project)
    want, got = fp32_student(project).predict(texts), student.predict(texts)
    assert all(p.label in student.labels and abs(sum(p.probs.values()) - 1) < 1e-5 for p in got)
    assert max(abs(a.probs[k] - b.probs[k]) for a, b in zip(want, got) for k in a.probs) < 0.05
    assert exported["int8"]["evaluation"]["vs_fp32"]["flip_rate"] <= 0.25


# --- GGUF --------------------------------------------------------------------------------------


def test_gguf_tokenizer_fields_built_from_hf_equal_the_embedded_smollm2_gguf(tiny_llama_dir):
    """The tiny model carries SmolLM2's tokenizer, so the fields built from it must equal the ones
    in the embedded SmolLM2 GGUF -- except the pre-tokenizer name: the HF tokenizer that
    transformers converts from that GGUF uses GPT-2's split alone (no separate digit split)."""
    from stillroom.models import smollm2_gguf_path
    from stillroom.train.export import _gguf_kv_from_source, gguf_tokenizer_kv

    built = {k: (v, t, s) for k, v, t, s in gguf_tokenizer_kv(tiny_llama_dir)}
    source = {k: (v, t, s) for k, v, t, s in _gguf_kv_from_source(smollm2_gguf_path())}
    assert set(built) == set(source)
    assert built.pop("tokenizer.ggml.pre")[0] == "gpt-2" and source.pop("tokenizer.ggml.pre")[0] == "smollm"
    assert built == source


def _unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0"])
def test_gguf_tensors_read_back_as_the_merged_weights(exported, fmt):
    import numpy as np
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(os.path.join(exported[fmt]["path"], "model.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["general.file_type"] == (1 if fmt == "gguf-f16" else 7)
    merged = load_file(os.path.join(exported["merged"]["path"], "model.safetensors"))
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}
    for name, hf in pairs.items():
        t = tensors[name]
        back = dequantize(t.data, t.tensor_type).reshape(merged[hf].shape)
        if name.endswith("attn_q.weight"):
            back = _unpermute(back, 4)
        elif name.endswith("attn_k.weight"):
            back = _unpermute(back, 2)
        scale = np.abs(merged[hf]).max()
        assert np.abs(back - merged[hf]).max() <= (1e-3 if fmt == "gguf-f16" else 1e-2) * scale, name
    norm_type = tensors["blk.0.attn_norm.weight"].tensor_type
    assert norm_type == gguf.GGMLQuantizationType.F32


def llama_cpp_logit_error(gguf_dir, merged_dir, texts) -> tuple[float, float]:
    """(max |llama.cpp - torch| over every prompt position / std of the torch logits, argmax
    agreement) for the student's prompts built around `texts`."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from stillroom.train.artifacts import load_artifact

    from llama_cpp import Llama

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    student = load_artifact(gguf_dir)  # builds the prompts exactly as the GGUF student does
    llm = Llama(os.path.join(gguf_dir, "model.gguf"), n_ctx=256, logits_all=True, verbose=False)
    errors, agree = [], []
    for text in texts:
        prompt = student.prompt_ids(text)
        llm.reset()
        llm.eval(prompt)
        got = np.asarray(llm.scores[: len(prompt)])
        with torch.inference_mode():
            want = merged(torch.tensor([prompt])).logits[0].numpy()
        errors.append(np.abs(got - want).max() / want.std())
        agree.append((got.argmax(-1) == want.argmax(-1)).mean())
    return float(max(errors)), float(min(agree))


LONG = "hey there my parcel and tracking question 7 asap, it has been a very long week of waiting for it"


@needs_llama_cpp
@pytest.mark.parametrize("fmt, tolerance", [("gguf-f16", 0.01), ("gguf-q8_0", 0.15)])
def test_llama_cpp_next_token_logits_match_the_merged_torch_model(project, exported, fmt, tolerance):
    """The proof of the export (tensor names, q/k permutation, hyperparameters, tokenizer):
    llama.cpp's logits at every position of the student's prompts equal the merged torch model's
    within the storage precision, and llama.cpp's tokenizer splits the inputs exactly as training did."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["merged"]["path"])
    texts = eval_texts(project, 4) + [LONG, "order 12345 was charged $19.99 twice", "ünïcode <|im_end|> test"]
    llm = Llama(os.path.join(exported[fmt]["path"], "model.gguf"), n_ctx=128, verbose=False)
    for text in texts:
        want = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want, text
    error, agreement = llama_cpp_logit_error(exported[fmt]["path"], exported["merged"]["path"], texts)
    assert error < tolerance and agreement >= (1.0 if fmt == "gguf-f16" else 0.9), (error, agreement)
    # llama.cpp answers with it through its own sampler, too
    assert isinstance(llm.create_completion("hello", max_tokens=3, temperature=0)["choices"][0]["text"], str)


@needs_llama_cpp
def test_the_logit_check_catches_a_missing_qk_permutation(exported, tmp_path):
    """Negative control for the test above: the same export without the q/k permutation (written
    from weights pre-permuted the other way) is off by far more than f16 storage error."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from stillroom.train.export import export_gguf

    merged = exported["merged"]["path"]
    wrong = tmp_path / "merged-unpermuted"
    shutil.copytree(merged, wrong)
    weights = load_file(os.path.join(merged, "model.safetensors"))
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = _unpermute(weights[name], 4 if "q_proj" in name else 2)
    save_file(weights, str(wrong / "model.safetensors"), metadata={"format": "pt"})
    export_gguf(wrong, tmp_path / "gguf", "f16")
    right, _ = llama_cpp_logit_error(exported["gguf-f16"]["path"], merged, [LONG])
    broken, _ = llama_cpp_logit_error(tmp_path / "gguf", merged, [LONG])
    assert broken > 5 * right and broken > 0.01


@needs_llama_cpp
def test_gguf_student_predicts_like_the_fp32_student(project, exported):
    from stillroom.train.artifacts import load_artifact

    texts = eval_texts(project)
    want = fp32_student(project).predict(texts)
    got = load_artifact(exported["gguf-f16"]["path"]).predict(texts)
    assert all(abs(sum(p.probs.values()) - 1) < 1e-6 for p in got)
    assert max(abs(a.probs[k] - b.probs[k]) for a, b in zip(want, got) for k in a.probs) < 0.02
    assert [p.label for p in got] == [p.label for p in want]


@needs_llama_cpp
def test_gguf_student_prunes_labels_with_the_same_answers(project, exported, monkeypatch):
    """The GGUF student's many-label pruning, forced on with one label kept: every input gets the label
    that scoring all labels gives. With the task's labels the kept winner's exact score is below a
    left-out label's bound (the tiny model is near uniform), so the rest are scored too. With the
    prompt's likeliest token as a one-token label beside labels that start with its least likely
    tokens, those keep their bound, above their exact score, and are never decoded."""
    import numpy as np

    from stillroom.train import lora
    from stillroom.train.artifacts import load_artifact

    monkeypatch.setattr(lora, "TOP_LABELS", 1)
    student = load_artifact(exported["gguf-f16"]["path"])
    task_answers = [list(a) for a in student.answers]
    for text in eval_texts(project):
        prompt = student.prompt_ids(text)
        student.answers = task_answers
        full = np.array(student.label_logprobs(prompt, prune=False))
        pruned = np.array(student.label_logprobs(prompt, prune=True))
        assert pruned.argmax() == full.argmax()
        assert np.allclose(pruned, full, atol=1e-4)  # the fallback scored every label

        student.answers = [[t] for t in range(student._n_vocab)]  # one-token labels: their first-token scores
        first = np.array(student.label_logprobs(prompt, prune=False))
        unlikely = [int(t) for t in np.argsort(first)[:len(task_answers) - 1]]  # the context holds this many
        student.answers = [[int(first.argmax())]] + [[t, t, 2] for t in unlikely]
        full = np.array(student.label_logprobs(prompt, prune=False))
        pruned = np.array(student.label_logprobs(prompt, prune=True))
        assert pruned.argmax() == full.argmax()
        assert abs(pruned.max() - full.max()) < 1e-4  # the winner is scored exactly
        assert (pruned >= full - 1e-4).all()
        extra = np.arange(1, len(student.answers))
        assert np.allclose(pruned[extra], first[unlikely], atol=1e-4)  # left at their bound
        assert (pruned[extra] > full[extra] + 1e-3).all()  # which is above what decoding them gives


# --- errors ------------------------------------------------------------------------------------


def test_errors_are_one_clear_sentence(project):
    from stillroom.train.artifacts import ArtifactError, load_artifact
    from stillroom.train.export import export_student

    with pytest.raises(StillroomError, match="no student named 'nope'"):
        export_student(project, "nope", "merged")
    with pytest.raises(StillroomError, match=r"unknown export format\(s\) 'onnx'.*adapter, merged"):
        export_student(project, "lora", ["onnx"])
    with pytest.raises(StillroomError, match="encoder student.*exports are for lora students"):
        export_student(project, "encoder", "all")
    with pytest.raises(ArtifactError, match="not an exported student"):
        load_artifact(project.root)

    exe = Path(sys.executable).with_name("stillroom")  # the entry point prints one sentence, exit 2
    done = subprocess.run([str(exe), "export", "lora", "-f", "onnx", "-C", str(project.root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown export format(s) 'onnx'" in done.stderr


def test_reexporting_one_format_is_reproducible_and_keeps_the_others(project, exported):
    from stillroom.train.export import export_student

    again = export_student(project, "lora", ["gguf-f16"], evaluate=False)
    assert again[0]["sha256"] == exported["gguf-f16"]["sha256"]  # same weights, same bytes
    assert (Path(exported["merged"]["path"]) / "model.safetensors").is_file()  # the recorded merged export stays

    shown = runner.invoke(app, ["export", "lora", "-f", "adapter", "--no-eval", "-C", str(project.root)],
                          catch_exceptions=False)
    assert shown.exit_code == 0 and "Exports of 'lora'" in shown.stdout and "not evaluated" in shown.stdout


def test_untrained_then_unexported_student(make_project, tiny_llama_dir):
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval
    from stillroom.curate.split import split_project
    from stillroom.train.artifacts import ArtifactError, evaluate_artifact
    from stillroom.train.export import export_student
    from stillroom.train.runner import train_student

    fresh = make_project(rows=synthetic_rows(8), students=(
        f"  - {{name: lora, kind: lora, base_model: '{tiny_llama_dir}', epochs: 1, rank: 4}}\n"))
    with pytest.raises(StillroomError, match=r"has not been trained; run `stillroom train lora`"):
        export_student(fresh, "lora", "merged")
    import_file(fresh, fresh.root / "data.jsonl")
    split_project(fresh)
    lock_eval(fresh)
    train_student(fresh, "lora")
    with pytest.raises(ArtifactError, match=r"has no merged export; run `stillroom export lora --format merged`"):
        evaluate_artifact(fresh, "lora", "merged")

    # GGUF alone: the merged model it is made from is an intermediate, not left behind
    (record,) = export_student(fresh, "lora", ["gguf-q8_0"], evaluate=False)
    exports = Path(record["path"]).parent
    assert sorted(p.name for p in exports.iterdir()) == ["gguf-q8_0"]


def test_artifacts_are_an_evaluation_source_for_compare(project, exported):
    """`artifact_predictions` has the signature `stillroom.evaluate.compare` expects of a source
    kind (`lora@q8_0`): the labels recorded by the artifact's evaluation, per eval example."""
    from stillroom.store.records import split_rows
    from stillroom.train.artifacts import ArtifactError, artifact_predictions

    with project.store.engine.connect() as conn:
        rows = split_rows(conn, "eval")
    answers = artifact_predictions(project, "lora", "int8", rows)
    recorded = {i: label for i, label, _ in exported["int8"]["evaluation"]["predictions"]}
    assert answers == recorded and set(answers) == {ex.id for ex, _ in rows}
    with pytest.raises(ArtifactError, match="unknown artifact 'fp8'"):
        artifact_predictions(project, "lora", "fp8", rows)


def test_without_llama_cpp_gguf_is_written_but_not_evaluated(project, exported, monkeypatch):
    from stillroom.train.artifacts import ArtifactError, load_artifact
    from stillroom.train.export import export_student

    # Last in this file on purpose: it records a newer, unevaluated gguf-f16 export of the project.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if stillroom[gguf-serve] were not installed
    (record,) = export_student(project, "lora", ["gguf-f16"])
    assert "evaluation" not in record and "pip install 'stillroom[gguf-serve]'" in record["evaluation_skipped"]
    assert (Path(record["path"]) / "model.gguf").stat().st_size > 0
    with pytest.raises(ArtifactError, match=r"needs llama-cpp-python: pip install 'stillroom\[gguf-serve\]'"):
        load_artifact(record["path"])

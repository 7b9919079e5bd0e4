"""Export a trained `lora` student for deployment: adapter, merged safetensors, INT8, GGUF.

Each recipe reads one folder and writes one folder, top to bottom, and every exported folder
carries a `manifest.json` (SHA-256 and size of each file) and a `student.json` (labels, input
format, which format it is), so `stillroom.train.artifacts.load_artifact` can load it as a
Student and re-evaluate it on the locked eval split. `export_student` runs the recipes for a
project's newest training run, records each artifact and (by default) re-evaluates it.

    adapter   the PEFT adapter as trained (needs the base model next to it)
    merged    LoRA folded into the base weights: a plain transformers model, fp32 safetensors
    int8      merged, with the decoder's nn.Linear layers as int8 weights (per-channel scales)
              for torch's dynamic-quantized CPU kernels; outlier-prone layers (down_proj),
              embeddings and norms stay fp32
    gguf-f16  one GGUF file for llama.cpp: 2-D weights in f16, norms in f32
    gguf-q8_0 the same with 2-D weights in Q8_0 (8-bit blocks of 32, one f16 scale per block)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Callable

from stillroom.errors import StillroomError
from stillroom.train.lora import HEAD_FILE

__all__ = ["FORMATS", "ExportError", "export_student", "export_adapter", "export_merged",
           "export_int8", "export_gguf"]

FORMATS = ("adapter", "merged", "int8", "gguf-f16", "gguf-q8_0")
GGUF_FILE = "model.gguf"
INT8_FILE = "model.int8.safetensors"
# The frame and label tokens are stored as ids: a GGUF student then needs no HF tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class ExportError(StillroomError):
    """An export that cannot be made as asked; the message says why and what to do instead."""


# --- manifests ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, fmt: str, source: dict) -> dict:
    """Hash every file in `folder` into its `manifest.json`; returns the manifest.

    `sha256` is the hash of the sorted (path, file hash) list: one content hash for the folder."""
    files = {
        str(p.relative_to(folder)): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }
    digest = hashlib.sha256(json.dumps(sorted((k, v["sha256"]) for k, v in files.items())).encode())
    manifest = {"format": fmt, "sha256": digest.hexdigest(),
                "size_bytes": sum(v["bytes"] for v in files.values()), "files": files,
                "source": source, "versions": _versions()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("stillroom", "torch", "transformers", "peft", "gguf"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _student_json(run_dir: Path, fmt: str, **extra) -> dict:
    manifest = json.loads((run_dir / "student.json").read_text(encoding="utf-8"))
    return {**manifest, "format": fmt, "exported_from": str(run_dir), **extra}


def _fresh(out_dir: Path) -> Path:
    """An empty folder written under a temporary name, so a half-written export never looks finished."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out_dir: Path) -> Path:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


# --- adapter and merged ------------------------------------------------------------------------


def export_adapter(run_dir: Path, out_dir: Path) -> Path:
    """Copy the PEFT adapter folder as trained (adapter weights, adapter config, tokenizer)."""
    tmp = _fresh(Path(out_dir))
    for path in Path(run_dir).iterdir():
        if path.is_file() and path.name not in ("student.json", "manifest.json"):
            shutil.copy2(path, tmp / path.name)
    (tmp / "student.json").write_text(json.dumps(_student_json(run_dir, "adapter"), indent=2) + "\n")
    return _finish(tmp, Path(out_dir))


@contextlib.contextmanager
def _quiet():
    """peft and torch.ao.quantization warn about their own deprecations; not ours to fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        yield


def export_merged(run_dir: Path, out_dir: Path) -> Path:
    """Fold the LoRA weights into the base model and save it as fp32 safetensors + tokenizer,
    loadable by `transformers.AutoModelForCausalLM.from_pretrained` with nothing else."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.train.lora import KNOWN_BASE_MODELS, load_base_lm, resolve_base_model

    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "student.json").read_text(encoding="utf-8"))
    base = manifest["base_model"]
    if manifest.get("kind") == "full":  # a full fine-tune is saved as a whole model already
        model = AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
    else:
        base_dir = resolve_base_model(base["name"] if base["name"] in KNOWN_BASE_MODELS else base["path"])
        # the base cut to the student's depth (`layers`); the merged folder's config then says so itself
        model = load_base_lm(base_dir, manifest["config"].get("layers"), dtype=torch.float32)
        with _quiet():
            model = PeftModel.from_pretrained(model, run_dir).merge_and_unload()
    # The embedded base was converted from a GGUF file and its config still says so, which makes
    # transformers refuse to save it; the weights are plain fp32 by now, and vLLM or transformers
    # must not go looking for that GGUF when they load the merged model.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.quant_method == "gguf":
        model.hf_quantizer = None
        del model.config.quantization_config
    tmp = _fresh(Path(out_dir))
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(run_dir).save_pretrained(tmp)
    if (run_dir / HEAD_FILE).is_file():  # a `scoring: head` student's label head rides along as is
        shutil.copy2(run_dir / HEAD_FILE, tmp / HEAD_FILE)
    student = _student_json(run_dir, "merged")
    (tmp / "student.json").write_text(json.dumps(student, indent=2) + "\n", encoding="utf-8")
    del model
    return _finish(tmp, Path(out_dir))


# --- int8 --------------------------------------------------------------------------------------


# Linear layers whose inputs carry activation outliers that one int8 scale per call cannot span.
# Measured on SmolLM2-135M (demo project): the inputs of mlp.down_proj reach 12,000x their mean
# magnitude; quantizing every linear flipped 53 of 101 eval labels (-33.7 points of agreement),
# keeping down_proj in fp32 brought the next-token KL to the fp32 model from 1.02 down to 0.014.
INT8_KEEP_FP32 = ("down_proj",)


def export_int8(merged_dir: Path, out_dir: Path, keep_fp32: tuple[str, ...] = INT8_KEEP_FP32) -> Path:
    """Quantize the decoder's nn.Linear layers to int8 (per-output-channel symmetric scales),
    except those whose name contains one of `keep_fp32`, and save the int8 weights, their scales
    and the fp32 tensors as safetensors.

    torch's dynamic quantization quantizes the weights once and the activations per call (one
    scale per tensor), which is why layers with outlier activations stay fp32. The LM head stays
    fp32 too (tied to the embeddings in SmolLM2, so it costs no extra disk, and the label scores
    are read straight from it). Saved as plain tensors rather than a pickled module, so the file
    does not depend on torch.ao.quantization's object layout (deprecated in favour of torchao):
    `artifacts.load_int8` rebuilds the modules from the tensors.
    """
    import torch
    from safetensors.torch import save_file
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from transformers import AutoModelForCausalLM

    merged_dir = Path(merged_dir)
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    decoder_prefix = "model."  # LlamaForCausalLM.model is the decoder; lm_head sits beside it
    linear_names = [decoder_prefix + n for n, m in model.get_decoder().named_modules()
                    if isinstance(m, torch.nn.Linear) and not any(k in n for k in keep_fp32)]
    if not linear_names:
        raise ExportError(f"{merged_dir}: the decoder has no nn.Linear layers to quantize")
    fp_tensors = {k: v for k, v in model.state_dict().items()
                  if k.rsplit(".", 1)[0] not in linear_names}
    if model.config.tie_word_embeddings:
        fp_tensors.pop("lm_head.weight", None)  # the same storage as the embeddings
    spec = {name.removeprefix(decoder_prefix): per_channel_dynamic_qconfig for name in linear_names}
    with _quiet():
        quantize_dynamic(model.get_decoder(), spec, dtype=torch.qint8, inplace=True)
    tensors = {k: v.contiguous() for k, v in fp_tensors.items()}
    modules = dict(model.named_modules())
    for name in linear_names:
        weight, bias = modules[name]._packed_params._weight_bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float32).contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()

    tmp = _fresh(Path(out_dir))
    save_file(tensors, str(tmp / INT8_FILE), metadata={"format": "stillroom-int8-dynamic"})
    model.config.save_pretrained(tmp)
    for name in (*TOKENIZER_FILES, HEAD_FILE):  # the label head (if any) stays fp32: 77 x 576 numbers
        if (merged_dir / name).is_file():
            shutil.copy2(merged_dir / name, tmp / name)
    student = json.loads((merged_dir / "student.json").read_text(encoding="utf-8"))
    student.update(format="int8", quantized_linear=linear_names, kept_fp32=list(keep_fp32),
                   scheme="int8 weights per output channel (symmetric), int8 activations per call")
    (tmp / "student.json").write_text(json.dumps(student, indent=2) + "\n", encoding="utf-8")
    del model
    return _finish(tmp, Path(out_dir))


# --- GGUF --------------------------------------------------------------------------------------


def _permute_qk(weights, n_head: int):
    """HF -> GGUF layout of a Llama q or k projection (llama.cpp's convert_hf_to_gguf `permute`).

    HF orders each head's rotary dimensions as two halves; llama.cpp's rope expects them
    interleaved in pairs, so the rows of every head are reordered (k uses the kv-head count)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_kv_from_source(source: Path) -> list[tuple]:
    """(key, value, type, sub_type) for every `tokenizer.*` field of an existing GGUF file."""
    import gguf

    reader = gguf.GGUFReader(source)
    kv = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        kv.append((key, field.contents(), field.types[0], sub))
    return kv


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer; refuses ones we cannot name exactly."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex"), s.get("add_prefix_space"))
             for s in steps]
    if kinds == [("ByteLevel", None, True, False)]:
        return "gpt-2"  # GPT-2's split regex
    if kinds == [("Digits", True, None, None), ("ByteLevel", None, True, False)]:
        return "smollm"  # GPT-2's regex after splitting every digit on its own
    raise ExportError(
        f"GGUF export supports GPT-2-style byte-level BPE tokenizers; this one's pre-tokenizer is "
        f"{json.dumps(pre)[:200]}. Use the merged or int8 export, or convert the merged folder "
        "with llama.cpp's convert_hf_to_gguf.py"
    )


def gguf_tokenizer_kv(model_dir: Path) -> list[tuple]:
    """(key, value, type, sub_type) GGUF tokenizer fields built from an HF byte-level BPE tokenizer:
    tokens by id, token types (control for special added tokens), merges, special token ids."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json (a fast tokenizer); GGUF export needs one")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ExportError(f"GGUF export supports byte-level BPE tokenizers only; {path} is "
                          f"{model.get('type')} with a {decoder} decoder")
    pre = _pre_tokenizer_name(spec)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T, V = gguf.TokenType, gguf.GGUFValueType
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
        else:  # the embedding matrix is larger than the vocabulary (padded for speed)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    kv = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", pre, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
        ("tokenizer.ggml.add_space_prefix", False, V.BOOL, None),
        ("tokenizer.ggml.add_bos_token", bool(probe) and probe[0] == tokenizer.bos_token_id, V.BOOL, None),
    ]
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            kv.append((f"tokenizer.ggml.{key}_token_id", int(token_id), V.UINT32, None))
    if isinstance(tokenizer.chat_template, str):
        kv.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
    return kv


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise ExportError(f"GGUF export supports plain RoPE only; this model uses rope_type={kind!r}")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _iter_safetensors(folder: Path):
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} has no .safetensors weights")
    for path in files:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def export_gguf(merged_dir: Path, out_dir: Path, qtype: str, tokenizer_source: Path | None = None,
                name: str = "student") -> Path:
    """Write the merged weights as one GGUF file (llama architecture) with the `gguf` package.

    qtype is "f16" or "q8_0". Tokenizer fields are copied from `tokenizer_source` (a GGUF file,
    e.g. the embedded SmolLM2 one) or, without it, built from the merged folder's HF tokenizer.
    q/k projections are permuted into llama.cpp's rotary layout; 1-D tensors (norms) stay f32, and
    rows that do not split into Q8_0 blocks of 32 fall back to f16, as llama.cpp's converter does.
    """
    import gguf
    import numpy as np
    from transformers import AutoConfig

    if qtype not in ("f16", "q8_0"):
        raise ExportError(f"GGUF type {qtype!r}: expected 'f16' or 'q8_0'")
    merged_dir = Path(merged_dir)
    config = AutoConfig.from_pretrained(merged_dir)
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports llama-architecture models; this base is "
                          f"{config.model_type!r}. Use the merged or int8 export")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tokenizer_kv = (_gguf_kv_from_source(tokenizer_source) if tokenizer_source
                    else gguf_tokenizer_kv(merged_dir))
    Q = gguf.GGMLQuantizationType
    file_type = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    tmp = _fresh(Path(out_dir))
    writer = gguf.GGUFWriter(tmp / GGUF_FILE, "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tokenizer_kv:
        writer.add_key_value(key, value, vtype, sub_type=sub)

    for hf_name, array in _iter_safetensors(merged_dir):
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output projection from token_embd when output is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of a llama model")
        array = array.astype(np.float32)
        if hf_name.endswith("q_proj.weight"):
            array = _permute_qk(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = _permute_qk(array, n_kv)
        if array.ndim == 1:
            writer.add_tensor(gguf_name, array)
        elif qtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    student = json.loads((merged_dir / "student.json").read_text(encoding="utf-8"))
    student.update(format=f"gguf-{qtype}", gguf_file=GGUF_FILE, **_token_ids(merged_dir, student))
    (tmp / "student.json").write_text(json.dumps(student, indent=2) + "\n", encoding="utf-8")
    return _finish(tmp, Path(out_dir))


def _token_ids(model_dir: Path, student: dict) -> dict:
    """The chat frame and each label's answer as token ids, encoded exactly as in training, so the
    GGUF student only tokenizes the user's text (with llama.cpp's own tokenizer). A generative
    student has no labels: it decodes after the frame and stops at its end-of-turn id."""
    from transformers import AutoTokenizer

    from stillroom.train.lora import _chat_frame, _encode_answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frame = _chat_frame(tokenizer)
    labels = student["labels"]
    return {"frame_ids": {"before": frame[0], "after": frame[1], "end_of_turn": frame[2]},
            "answer_ids": _encode_answers(tokenizer, frame, labels) if labels else []}


# --- a project's student -----------------------------------------------------------------------


def parse_formats(formats: list[str] | tuple[str, ...] | str) -> list[str]:
    """Validated export formats in a fixed order; "all" means every format."""
    wanted = [formats] if isinstance(formats, str) else list(formats)
    if not wanted or "all" in wanted:
        return list(FORMATS)
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(map(repr, unknown))}; "
                          f"expected one of {', '.join(FORMATS)} or all")
    return [f for f in FORMATS if f in wanted]


def export_student(project, name: str, formats=("all",), evaluate: bool = True,
                   progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """Export the newest trained run of a student in each format, record every artifact, and
    (with `evaluate`) re-evaluate each on the locked eval split against the fp32 student.

    Returns one record per artifact: format, path, sha256, size_bytes and, when evaluated, the
    quality change (see `stillroom.train.artifacts.evaluate_artifact`)."""
    from stillroom.store.records import latest_run
    from stillroom.train.artifacts import evaluate_artifact, record_artifact

    student = project.config.student(name)  # UnknownStudent names the students there are
    wanted = parse_formats(formats)
    if student.kind == "full":  # already a plain model folder: exported like a merged LoRA student
        named = [formats] if isinstance(formats, str) else list(formats)
        if "adapter" in named:
            raise ExportError(f"student '{name}' is a full fine-tune: it has no adapter; export 'merged' instead")
        wanted = [f for f in wanted if f != "adapter"]
    elif student.kind == "ensemble":
        raise ExportError(f"student '{name}' is an ensemble: it is built from its members' deployed artifacts "
                          f"(set their `deploy` and retrain it: `stillroom train {name}`); export the members "
                          f"({', '.join(student.members)}) instead")
    elif student.kind != "lora":
        raise ExportError(
            f"student '{name}' is a {student.kind} student: its trained folder (a small head over "
            "the shared MiniLM encoder) is already what gets deployed; exports are for lora students"
        )
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
    if run is None:
        raise ExportError(f"student '{name}' has not been trained; run `stillroom train {name}`")
    run_dir = Path(run["artifact_path"])
    if not (run_dir / "student.json").is_file():
        raise ExportError(f"the trained student of run {run['id']} is missing from {run_dir}; "
                          f"retrain it with `stillroom train {name} --force`")
    trained = json.loads((run_dir / "student.json").read_text(encoding="utf-8"))
    if trained.get("config", {}).get("scoring") == "head":
        gguf = [f for f in wanted if f.startswith("gguf-")]
        named = [formats] if isinstance(formats, str) else list(formats)
        if gguf and "all" not in named:
            raise ExportError(f"student '{name}' reads a label head (scoring: head), which llama.cpp's GGUF "
                              "runtime has no place for; export 'merged' or 'int8' instead")
        wanted = [f for f in wanted if f not in gguf]

    root = project.artifacts / "exports" / f"{name}-run{run['id']}"
    source = {"student": name, "run_id": run["id"], "run_dir": str(run_dir)}
    merged_dir = root / "merged"
    steps = len(wanted) * (2 if evaluate else 1)
    done = 0
    results = []
    intermediate = False  # a merged folder made only to derive int8/GGUF from
    for fmt in wanted:
        if progress:
            progress(f"export {fmt}", done, steps)
        out = root / fmt
        if fmt == "adapter":
            export_adapter(run_dir, out)
        elif fmt == "merged" or not (merged_dir / "manifest.json").is_file():
            export_merged(run_dir, merged_dir)
            write_manifest(merged_dir, "merged", source)
            intermediate = fmt != "merged"
        if fmt == "int8":
            export_int8(merged_dir, out)
        elif fmt.startswith("gguf-"):
            export_gguf(merged_dir, out, fmt.removeprefix("gguf-"), _gguf_tokenizer_source(run_dir), name)
        manifest = (json.loads((out / "manifest.json").read_text()) if fmt == "merged"
                    else write_manifest(out, fmt, source))
        record = record_artifact(project, run["id"], fmt, out, manifest)
        done += 1
        if evaluate and fmt.startswith("gguf-") and not _have_llama_cpp():
            record["evaluation_skipped"] = ("llama-cpp-python is not installed: pip install "
                                            "'stillroom[gguf-serve]', then `stillroom export "
                                            f"{name} --format {fmt}` again")
            done += 1
        elif evaluate:
            if progress:
                progress(f"re-evaluate {fmt}", done, steps)
            record["evaluation"] = evaluate_artifact(project, name, fmt)
            done += 1
        results.append(record)
    if intermediate:
        shutil.rmtree(merged_dir)  # as large as the base model, and not asked for
    if progress:
        progress("done", steps, steps)
    return results


def _have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _gguf_tokenizer_source(run_dir: Path) -> Path | None:
    """The embedded SmolLM2 GGUF when the student's base is SmolLM2 (its tokenizer fields are
    carried over as they are); None for an HF folder base (fields built from its tokenizer)."""
    from stillroom.models import SMOLLM2_NAME, smollm2_gguf_path

    manifest = json.loads((run_dir / "student.json").read_text(encoding="utf-8"))
    return smollm2_gguf_path() if manifest["base_model"]["name"] == SMOLLM2_NAME else None


def export_deployed(project, name: str, force: bool = False, progress=None) -> dict:
    """Export the artifact a student deploys (`students[].deploy`) unless it is already exported and
    evaluated for the student's newest run and the current lock; returns that artifact's evaluation
    (the gate applies to what will be deployed). `progress(what, done, total)` as `export_student`."""
    from stillroom.evaluate.evaluator import deployed_evaluation
    from stillroom.store.records import latest_run

    fmt = project.config.student(name).deploy
    evaluation = deployed_evaluation(project, name)
    with project.store.engine.connect() as conn:
        run_id = latest_run(conn, name)["id"]
    if fmt != "fp32" and (force or evaluation is None or evaluation.get("stale")
                          or evaluation.get("run_id") != run_id):
        export_student(project, name, [fmt], evaluate=True, progress=progress)
        evaluation = deployed_evaluation(project, name)
    return evaluation

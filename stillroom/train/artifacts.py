"""Exported student artifacts as Students, and their re-evaluation on the locked eval split.

`load_artifact(path)` turns any folder written by `stillroom.train.export` into an object with
`.labels` and `.predict(texts) -> list[Prediction]`, scoring every label exactly as the trained
student does. `evaluate_artifact` runs it on the locked eval (and calibration) split, compares it
with the fp32 training copy and applies the gate to it: the gate is about what gets deployed.
"""

from __future__ import annotations

import json
from pathlib import Path

from stillroom.cpus import set_torch_threads, usable_cpus
from stillroom.errors import StillroomError
from stillroom.train.base import Prediction

__all__ = ["ArtifactError", "GGUFStudent", "load_artifact", "load_int8", "evaluate_artifact",
           "latest_artifact_evaluation", "artifact_predictions", "record_artifact"]


MAX_KEPT = 50  # error and flip examples kept in a recorded evaluation


class ArtifactError(StillroomError):
    """An exported artifact that cannot be loaded or evaluated; the message says what to do."""


def _manifest(path: Path) -> dict:
    file = Path(path) / "student.json"
    if not file.is_file():
        raise ArtifactError(f"{path} is not an exported student (no student.json)")
    return json.loads(file.read_text(encoding="utf-8"))


def load_artifact(path: Path | str):
    """Load an exported student folder (any format) as a Student."""
    path = Path(path)
    manifest = _manifest(path)
    fmt = manifest.get("format")
    if fmt == "adapter" or (fmt is None and manifest.get("kind") in ("lora", "full")):
        from stillroom.train.lora import LoraStudent

        student = LoraStudent.load(path)
    elif fmt == "merged":
        student = _load_merged(path, manifest)
    elif fmt == "int8":
        student = load_int8(path)
    elif fmt in ("gguf-f16", "gguf-q8_0"):
        student = GGUFStudent.load(path)
    else:
        raise ArtifactError(f"{path}: unknown artifact format {fmt!r} in student.json")
    student.format = fmt or "adapter"
    return student


def _lora_student(model, path: Path, manifest: dict):
    from transformers import AutoTokenizer

    from stillroom.train.lora import LoraConfig, LoraStudent, load_label_head

    config = LoraConfig(**{**manifest["config"], "base_model": str(path)})
    set_torch_threads(config.threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoraStudent(model.eval(), tokenizer, manifest["labels"], manifest["student_format"], config,
                       task=manifest.get("task"), kind=manifest.get("kind"),
                       label_head=load_label_head(path) if config.scoring == "head" else None)


def _load_merged(path: Path, manifest: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from stillroom.train.lora import inference_dtype

    # stored in fp32; served in the run's precision (bf16 on an AMX CPU), as the trained student is
    dtype = inference_dtype(manifest["config"].get("precision", "fp32"))
    return _lora_student(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dtype), path, manifest)


def load_int8(path: Path | str):
    """The int8 export as a Student: decoder linears rebuilt as torch dynamic-quantized modules
    from the stored int8 weights and per-channel scales (bit-identical to the export)."""
    import torch
    import torch.ao.nn.quantized.dynamic as nnqd
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from stillroom.train.export import INT8_FILE, _quiet

    path = Path(path)
    manifest = _manifest(path)
    if torch.backends.quantized.engine == "none":
        raise ArtifactError("this torch build has no quantized CPU engine (fbgemm/x86/qnnpack); "
                            "use the merged or GGUF export instead")
    tensors = load_file(str(path / INT8_FILE))
    quantized = manifest["quantized_linear"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    # The fp32 tensors first (quantized modules cannot take part in a partial load_state_dict),
    # then each decoder linear swapped for a dynamic-quantized one holding the stored int8 weights.
    fp32 = {k: v for k, v in tensors.items() if not k.endswith((".weight_int8", ".weight_scale"))
            and k.rsplit(".", 1)[0] not in quantized}
    missing, unexpected = model.load_state_dict(fp32, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[0] not in quantized and k != "lm_head.weight"]
    if missing or unexpected:
        raise ArtifactError(f"{path / INT8_FILE} does not match its config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}; re-run `stillroom export --format int8`")
    with _quiet():
        for name in quantized:
            parent, attr = name.rsplit(".", 1)
            old = model.get_submodule(name)
            scale = tensors[f"{name}.weight_scale"].to(torch.float64)
            weight = torch._make_per_channel_quantized_tensor(
                tensors[f"{name}.weight_int8"], scale, torch.zeros(len(scale), dtype=torch.long), 0)
            linear = nnqd.Linear(old.in_features, old.out_features, bias_=old.bias is not None,
                                 dtype=torch.qint8)
            linear.set_weight_bias(weight, tensors.get(f"{name}.bias"))
            setattr(model.get_submodule(parent), attr, linear)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    # int8 kernels take fp32 activations: no bf16 autocast around them
    return _lora_student(model, path, {**manifest, "config": {**manifest["config"], "precision": "fp32"}})


class GGUFStudent:
    """A GGUF export served by llama.cpp, answering like `LoraStudent` for every task type.

    Classification, in two decodes: the prompt once (sequence 0), then every label's answer tokens
    in one batch, each label in its own sequence that shares the prompt's KV cells, so it sees the
    prompt and its own earlier tokens only. Their log-probabilities are summed per label and
    softmaxed over the labels.

    Extraction and generation: greedy decoding as in `stillroom.train.decoding`, `batch_size`
    inputs at a time, each in its own llama.cpp sequence (one decode for all their prompts, then
    one decode per step for every unfinished one). Extraction is constrained by the same xgrammar
    grammar as the torch student (sorted keys, compact separators), built from the GGUF's own
    vocabulary, with the same closing phase; confidence is the geometric-mean probability of the
    emitted tokens under the (masked) distribution each was picked from, end-of-turn included.

    Uses llama-cpp-python's low-level API: the high-level `Llama` class cannot open a context
    with several sequences, and one decode per label made scoring about twice as slow on
    SmolLM2-135M (9 labels: 250-330 ms against 115-130 ms per input on 2 cores)."""

    kind = "lora"

    def __init__(self, path: Path, manifest: dict, n_threads: int | None = None, batch_size: int = 16):
        try:
            import llama_cpp
            from llama_cpp._logger import set_verbose
        except ImportError:
            raise ArtifactError(
                "loading a GGUF student needs llama-cpp-python: pip install 'stillroom[gguf-serve]' "
                "(it compiles llama.cpp: about 5 minutes on 2 cores)"
            ) from None
        if not hasattr(llama_cpp, "llama_memory_seq_cp"):
            raise ArtifactError("the GGUF student needs llama-cpp-python >= 0.3.36 (llama.cpp's memory API); "
                                "pip install -U 'stillroom[gguf-serve]'")
        self._L = L = llama_cpp
        self.task = manifest.get("task") or {"type": "classification"}
        self.generative = self.task.get("type", "classification") != "classification"
        self.labels = manifest["labels"]
        self.student_format = manifest["student_format"]
        self.max_input_tokens = manifest["config"]["max_input_tokens"]
        self.frame = manifest["frame_ids"]
        self.answers = manifest.get("answer_ids") or []
        self.batch_size = max(1, batch_size)
        self._model = self._ctx = self._batch = None
        self._grammar = None  # extraction: compiled on first use (~1 s for SmolLM2's vocabulary)
        prompt_max = len(self.frame["before"]) + self.max_input_tokens + len(self.frame["after"])
        params = L.llama_context_default_params()
        if self.generative:
            from stillroom.train.decoding import CLOSING_TOKENS

            closing = CLOSING_TOKENS if self.task["type"] == "extraction" else 0
            self._limit = self.task["max_output_tokens"] + closing
            # one KV stream per input: each attends to its own cells only
            n_seq, per_seq = self.batch_size, prompt_max + self._limit + 8
            params.n_ctx = n_seq * per_seq
            params.n_batch = n_seq * prompt_max  # every prompt of a batch in one decode
            params.n_ubatch = min(params.n_batch, 512)
            params.n_seq_max = n_seq
            params.kv_unified = False
            batch_tokens = params.n_batch
        else:
            continuation = sum(len(a) - 1 for a in self.answers)
            n_ctx = prompt_max + continuation + 8  # one unified cache: the prompt once, every label after it
            params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
            params.n_seq_max = len(self.answers) + 1
            params.kv_unified = True  # the labels' sequences share the prompt's cells
            batch_tokens = n_ctx
        params.n_threads = params.n_threads_batch = (
            n_threads or manifest["config"].get("threads") or usable_cpus())
        set_verbose(False)
        L.llama_backend_init()
        self._model = L.llama_model_load_from_file(str(path / manifest["gguf_file"]).encode(),
                                                   L.llama_model_default_params())
        if not self._model:
            raise ArtifactError(f"llama.cpp could not load {path / manifest['gguf_file']}; "
                                "re-export it with `stillroom export --format gguf-...`")
        self._ctx = L.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise ArtifactError(f"llama.cpp could not create a context for {path}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self._memory = L.llama_get_memory(self._ctx)
        self._batch = L.llama_batch_init(batch_tokens, 0, 1)

    @classmethod
    def load(cls, path: Path | str, n_threads: int | None = None, batch_size: int = 16) -> "GGUFStudent":
        path = Path(path)
        return cls(path, _manifest(path), n_threads, batch_size)

    def close(self) -> None:
        L = self._L
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the library may already be unloaded
            pass

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization, special-token text kept as plain text (as
        `split_special_tokens=True` does in training)."""
        data = text.encode("utf-8")
        size = len(data) + 8  # byte-level BPE: never more tokens than bytes
        buffer = (self._L.llama_token * size)()
        n = self._L.llama_tokenize(self._vocab, data, len(data), buffer, size, False, False)
        if n < 0:
            raise ArtifactError(f"llama.cpp could not tokenize an input of {len(data)} bytes")
        return list(buffer[:n])

    def detokenize(self, tokens: list[int]) -> str:
        """Text of answer tokens, control tokens rendered as nothing (`skip_special_tokens=True`)."""
        if not tokens:
            return ""
        ids = (self._L.llama_token * len(tokens))(*tokens)
        size = 16 * len(tokens) + 16
        buffer = bytes(size)
        n = self._L.llama_detokenize(self._vocab, ids, len(tokens), buffer, size, False, False)
        if n < 0:
            raise ArtifactError(f"llama.cpp could not detokenize an answer of {len(tokens)} tokens")
        return buffer[:n].decode("utf-8", "replace")

    def prompt_ids(self, text: str) -> list[int]:
        """The chat frame (stored as ids at export) around the formatted input."""
        body = self.tokenize(self.student_format.format(input=text))
        return self.frame["before"] + body[: self.max_input_tokens] + self.frame["after"]

    def _decode(self, tokens: list[tuple[int, int, int, bool]]) -> None:
        """(token, position, sequence, wants logits) for each token of one batch."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, (token, pos, seq, logits) in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        code = self._L.llama_decode(self._ctx, batch)
        if code != 0:
            raise ArtifactError(f"llama.cpp failed to decode a batch (code {code})")

    def _logits(self, i: int):
        import numpy as np

        row = self._L.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,)).copy()

    def _output_logits(self, n: int):
        """[n, vocab] logits of the last decode's n output rows, in batch order."""
        import numpy as np

        rows = self._L.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(rows, shape=(n, self._n_vocab)).copy()

    def label_logprobs(self, prompt: list[int], prune: bool | None = None) -> list[float]:
        """Summed log-probability of each label's answer tokens given the prompt.

        Many labels (over `PRUNE_ABOVE_TOKENS` continuation tokens, or `prune=True`) are pruned as
        the torch student prunes them (`lora._pruned_label_logprobs`): the labels with the best
        first-token bounds, and those tied with them, are scored; the rest keep their bound unless
        one of them could still win, and then they are scored too, from the prompt's cells."""
        from stillroom.train.lora import PRUNE_ABOVE_TOKENS, TOP_LABELS

        n = len(prompt)
        self._L.llama_memory_clear(self._memory, True)
        self._decode([(t, i, 0, i == n - 1) for i, t in enumerate(prompt)])
        first = _log_softmax(self._logits(n - 1))
        bounds = [float(first[a[0]]) for a in self.answers]
        scores = list(bounds)
        if prune is None:
            prune = sum(len(a) - 1 for a in self.answers) > PRUNE_ABOVE_TOKENS
        everything = range(len(self.answers))
        if not prune:
            self._add_continuations(everything, scores, n)
            return scores
        kth = sorted(bounds, reverse=True)[min(TOP_LABELS, len(bounds)) - 1]
        kept = [j for j in everything if bounds[j] >= kth]
        self._add_continuations(kept, scores, n)
        left = [j for j in everything if bounds[j] < kth]
        if left and max(scores[j] for j in kept) < max(bounds[j] for j in left):
            self._add_continuations(left, scores, n)
        return scores

    def _add_continuations(self, labels, scores: list[float], n: int) -> None:
        """Add to `scores[j]` the log-probabilities of label j's tokens after its first, each label in
        its own sequence sharing the prompt's cells (sequence 0, `n` tokens), all in one decode."""
        rest, owners = [], []
        for j in labels:
            answer = self.answers[j]
            if len(answer) > 1:
                self._L.llama_memory_seq_cp(self._memory, 0, j + 1, -1, -1)
            for k, token in enumerate(answer[:-1]):
                rest.append((token, n + k, j + 1, True))
                owners.append((j, answer[k + 1]))
        if rest:
            self._decode(rest)
            for i, (j, target) in enumerate(owners):
                scores[j] += float(_log_softmax(self._logits(i))[target])

    # --- extraction and generation ------------------------------------------------------------

    def _json_grammar(self) -> "_GGUFJsonGrammar":
        if self._grammar is None:
            vocab = [self._L.llama_vocab_get_text(self._vocab, i) for i in range(self._n_vocab)]
            self._grammar = _GGUFJsonGrammar(vocab, self.task["schema"], self.frame["end_of_turn"])
        return self._grammar

    def decode_greedy(self, prompts: list[list[int]]):
        """Greedy answers (`decoding.Decoded`) for up to `batch_size` token-id prompts, each in its
        own sequence; the same loop as `decoding._decode_batch`, on llama.cpp's logits."""
        from stillroom.train.decoding import Decoded

        n, eot = len(prompts), self.frame["end_of_turn"]
        budget = self.task["max_output_tokens"]
        grammar = self._json_grammar() if self.task["type"] == "extraction" else None
        matchers = grammar.matchers(n) if grammar else None
        self._L.llama_memory_clear(self._memory, True)
        self._decode([(t, i, r, i == len(p) - 1) for r, p in enumerate(prompts) for i, t in enumerate(p)])
        logits = self._output_logits(n)
        rows = list(range(n))  # the sequence behind each logits row
        positions = [len(p) for p in prompts]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprob, count, ended = [0.0] * n, [0] * n, [False] * n
        for step in range(self._limit):
            if grammar:
                logits = grammar.mask(logits, matchers, rows)
            logp = _log_softmax(logits)
            if grammar and step >= budget:  # budget spent: finish the record as fast as allowed
                choice = (logits + grammar.closing_bonus).argmax(-1)
            else:
                choice = logp.argmax(-1)
            feed = []
            for k, r in enumerate(rows):
                token = int(choice[k])
                logprob[r] += float(logp[k, token])
                count[r] += 1
                if grammar:
                    matchers[r].accept_token(token)
                if token == eot:
                    ended[r] = True
                    continue
                tokens[r].append(token)
                if step + 1 >= budget and not grammar:
                    continue  # generation: the budget is a hard limit
                feed.append(r)
            if not feed or step + 1 == self._limit:
                break
            self._decode([(tokens[r][-1], positions[r], r, True) for r in feed])
            for r in feed:
                positions[r] += 1
            logits, rows = self._output_logits(len(feed)), feed
        return [Decoded(tokens[r], logprob[r], count[r], ended[r]) for r in range(n)]

    def _answers(self, texts: list[str]) -> list[Prediction]:
        import json

        from stillroom.tasks.extraction import canonical_json

        out = []
        for start in range(0, len(texts), self.batch_size):
            prompts = [self.prompt_ids(t) for t in texts[start : start + self.batch_size]]
            for d in self.decode_greedy(prompts):
                text, confidence = self.detokenize(d.tokens).strip(), d.confidence
                if self.task["type"] == "extraction":
                    try:
                        text = canonical_json(json.loads(text))
                    except json.JSONDecodeError:  # not closed even in the closing phase: never served
                        confidence = 0.0
                out.append(Prediction(label=text, confidence=confidence, probs={}))
        return out

    def predict(self, texts: list[str]) -> list[Prediction]:
        """One prediction per text. Classification: the most probable label and every label's
        probability. Extraction/generation: the greedy answer (canonical JSON for extraction),
        confidence = geometric-mean probability of its tokens, `probs` empty."""
        import numpy as np

        if self.generative:
            return self._answers(list(texts))
        predictions = []
        for text in texts:
            scores = np.array(self.label_logprobs(self.prompt_ids(text)))
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            best = int(probs.argmax())
            predictions.append(Prediction(label=self.labels[best], confidence=float(probs[best]),
                                          probs=dict(zip(self.labels, probs.tolist()))))
        return predictions


class _GGUFJsonGrammar:
    """`decoding.JsonConstraint` for a GGUF student, built from the GGUF's own vocabulary (no HF
    tokenizer in the export) on numpy logits.

    The export only writes byte-level BPE vocabularies, whose token strings are what an HF fast
    tokenizer's `get_vocab()` returns, so `TokenizerInfo(vocab, BYTE_LEVEL)` equals what
    `TokenizerInfo.from_huggingface` builds for the torch student; the schema is sorted and
    compiled with the same options, and the closing preference is the same ranking."""

    def __init__(self, vocab: list[bytes], schema: dict, eot_id: int):
        from stillroom.train.decoding import _xgrammar, closing_bonus, sorted_schema

        xgr = _xgrammar()
        self.xgr = xgr
        info = xgr.TokenizerInfo([t.decode("utf-8") for t in vocab], xgr.VocabType.BYTE_LEVEL,
                                 vocab_size=len(vocab), stop_token_ids=[eot_id], add_prefix_space=False)
        self.grammar = xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(sorted_schema(schema)), any_whitespace=False, separators=(",", ":"), strict_mode=True
        )
        self.vocab_size = len(vocab)
        self.closing_bonus = closing_bonus(info.decoded_vocab, self.vocab_size, eot_id)
        self._bitmask = None

    def matchers(self, n: int) -> list:
        return [self.xgr.GrammarMatcher(self.grammar) for _ in range(n)]

    def mask(self, logits, matchers, rows):
        """Logits with every token the grammar forbids (per row's matcher) set to -inf."""
        import numpy as np

        words = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < len(rows):
            self._bitmask = np.zeros((len(rows), words), dtype=np.int32)
        bitmask = self._bitmask
        for k, r in enumerate(rows):
            matchers[r].fill_next_token_bitmask(bitmask, k)
        allowed = np.unpackbits(bitmask[: len(rows)].view(np.uint8), axis=1, bitorder="little")
        allowed = allowed[:, : logits.shape[1]].astype(bool)
        return np.where(allowed, logits, -np.inf).astype(np.float32)


def _log_softmax(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# --- records -----------------------------------------------------------------------------------


def _artifacts_table():
    from stillroom.store import tables as T

    return T.TABLES["artifacts"]


def record_artifact(project, run_id: int, fmt: str, path: Path, manifest: dict) -> dict:
    """Append an exported artifact to the store; returns its record."""
    from sqlalchemy import insert

    from stillroom.store.db import now

    row = {"run_id": run_id, "format": fmt, "path": str(path), "sha256": manifest["sha256"],
           "size_bytes": manifest["size_bytes"], "created_at": now()}
    with project.store.engine.begin() as conn:
        artifact_id = conn.execute(insert(_artifacts_table()).values(**row)).inserted_primary_key[0]
    return {"id": artifact_id, **row}


def latest_artifact(conn, run_id: int, fmt: str) -> dict | None:
    from sqlalchemy import select

    table = _artifacts_table()
    row = conn.execute(select(table).where(table.c.run_id == run_id, table.c.format == fmt)
                       .order_by(table.c.id.desc()).limit(1)).first()
    return dict(row._mapping) if row else None


def _fp32_evaluation(project, name: str, run: dict) -> dict:
    """The fp32 student's evaluation of this run against the active lock (run now if missing)."""
    from stillroom.evaluate.evaluator import evaluate_student, latest_evaluation

    baseline = latest_evaluation(project, name)
    if baseline is None or baseline.get("stale") or baseline.get("run_id") != run["id"]:
        baseline = evaluate_student(project, name)
    return baseline


def _fp32_labels(conn, run_id: int, example_ids: list[int]) -> dict[int, str]:
    """The newest recorded fp32 prediction per example for a run."""
    from sqlalchemy import select

    from stillroom.store import tables as T

    rows = conn.execute(select(T.predictions.c.example_id, T.predictions.c.label)
                        .where(T.predictions.c.run_id == run_id,
                               T.predictions.c.example_id.in_(example_ids))
                        .order_by(T.predictions.c.id))
    return {example_id: label for example_id, label in rows}


def evaluate_artifact(project, name: str, fmt: str, latency_samples: int = 20) -> dict:
    """Evaluate the newest export of a student's newest run in one format on the locked eval split.

    Returns (and records, as an `evaluations` row of kind `artifact:<format>` and in the
    artifact's `metrics`) a dict shaped like `evaluate_student`'s -- it is `evaluate_student` run on
    the loaded artifact: the same scorecard, routing threshold picked on the calibration split with
    this artifact's own confidences, throughput -- plus `artifact`, `vs_fp32` (agreement and
    macro-F1 change in points with a paired bootstrap interval, answers that flipped against the
    fp32 student), `latency_ms` (one input per call), `predictions` and `gate` (the verdict for this
    artifact, the thing that will be deployed)."""
    from sqlalchemy import insert, select, update

    from stillroom.evaluate.bootstrap import paired_gap_ci
    from stillroom.evaluate.evaluator import evaluate_student
    from stillroom.evaluate.gate import decide
    from stillroom.evaluate.metrics import example_score
    from stillroom.store import tables as T
    from stillroom.store.db import now, to_json
    from stillroom.store.records import latest_run, split_rows

    task = project.task
    gate = project.config.gate
    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        if run is None:
            raise ArtifactError(f"student '{name}' has not been trained; run `stillroom train {name}`")
        artifact = latest_artifact(conn, run["id"], fmt)
        teacher = {ex.id: label for ex, label in split_rows(conn, "eval")}
    if artifact is None:
        raise ArtifactError(f"student '{name}' (run {run['id']}) has no {fmt} export; "
                            f"run `stillroom export {name} --format {fmt}`")
    if not teacher:
        raise ArtifactError("the eval split has no teacher-labelled examples")
    baseline = _fp32_evaluation(project, name, run)
    student = load_artifact(artifact["path"])
    result = evaluate_student(project, name, student, kind=f"artifact:{fmt}", record=False,
                              latency_samples=latency_samples)
    answers = {example_id: (answer, confidence) for example_id, answer, confidence in result["predictions"]}

    with project.store.engine.connect() as conn:
        fp32 = _fp32_labels(conn, run["id"], list(answers))
    both = [i for i in answers if i in fp32]
    flipped = [i for i in both if fp32[i] != answers[i][0]]
    with project.store.engine.connect() as conn:
        inputs = dict(conn.execute(select(T.examples.c.id, T.examples.c.input)
                                   .where(T.examples.c.id.in_(flipped[:MAX_KEPT]))).all()) if flipped else {}
    flips = [{"example_id": i, "input": inputs.get(i), "teacher": teacher[i], "fp32": fp32[i],
              "artifact": answers[i][0], "confidence": round(answers[i][1], 4)} for i in flipped]
    # fp32 minus artifact agreement with the teacher on the same examples, in points: > 0 is a loss.
    loss = paired_gap_ci([example_score(task, fp32[i], teacher[i]) for i in both],
                         [example_score(task, answers[i][0], teacher[i]) for i in both],
                         gate.bootstrap_resamples, gate.bootstrap_seed)

    def points(after, before):
        return None if after is None or before is None else round((after - before) * 100, 2)

    macro, baseline_macro = result["vs_teacher"].get("macro_f1"), baseline["vs_teacher"].get("macro_f1")
    predictions = result.pop("predictions")
    result.update({
        "artifact": {"id": artifact["id"], "format": fmt, "path": artifact["path"],
                     "sha256": artifact["sha256"], "size_bytes": artifact["size_bytes"]},
        "vs_fp32": {
            "fp32_evaluation_id": baseline.get("evaluation_id"),
            "fp32_agreement": baseline["agreement"],
            "fp32_macro_f1": baseline_macro,
            "agreement_delta_points": points(result["agreement"], baseline["agreement"]),
            "macro_f1_delta_points": points(macro, baseline_macro),
            "agreement_loss_ci": loss,
            "compared": len(both),
            "label_flips": len(flips),
            "flip_rate": len(flips) / len(both) if both else None,
            "flips": flips[:MAX_KEPT],
        },
        "predictions": predictions,
    })
    # named as `stillroom compare` names an artifact source: lora@gguf-q8_0
    verdict = decide({**result, "student": f"{name}@{fmt}", "stale": False}, gate)
    result["gate"] = verdict.as_dict()

    summary = {
        "lock_id": result["lock_id"], "agreement": result["agreement"], "macro_f1": macro,
        **{k: v for k, v in result["vs_fp32"].items() if k not in ("flips", "agreement_loss_ci")},
        "threshold": result["calibration"]["threshold"], "coverage": result["at_threshold"]["coverage"],
        "latency_ms_p50": result["latency_ms"]["p50"], "inputs_per_s": result["throughput"]["inputs_per_s"],
        "gate_passed": verdict.passed, "gate_message": verdict.message,
    }
    with project.store.engine.begin() as conn:
        evaluation_id = conn.execute(insert(T.evaluations).values(
            run_id=run["id"], lock_id=result["lock_id"], kind=f"artifact:{fmt}", metrics=to_json(result),
            created_at=now())).inserted_primary_key[0]
        summary["evaluation_id"] = evaluation_id
        table = _artifacts_table()
        conn.execute(update(table).where(table.c.id == artifact["id"]).values(metrics=to_json(summary)))
    result.update(evaluation_id=evaluation_id, stale=False)
    return result


def latest_artifact_evaluation(project, name: str, fmt: str) -> dict | None:
    """The newest evaluation of the newest `fmt` export of a student's newest run, marked stale
    (with the re-lock's reason) when the eval lock changed since -- `evaluator.latest_evaluation`'s
    contract, so `gate.decide` can take it as it is."""
    from sqlalchemy import select

    from stillroom.evaluate.evaluator import lock_status
    from stillroom.store import tables as T
    from stillroom.store.records import latest_run

    with project.store.engine.connect() as conn:
        run = latest_run(conn, name)
        artifact = latest_artifact(conn, run["id"], fmt) if run else None
        if artifact is None:
            return None
        rows = conn.execute(
            select(T.evaluations.c.id, T.evaluations.c.metrics, T.evaluations.c.lock_id)
            .where(T.evaluations.c.run_id == run["id"], T.evaluations.c.kind == f"artifact:{fmt}")
            .order_by(T.evaluations.c.id.desc())
        ).all()
        row = next((r for r in rows if json.loads(r.metrics)["artifact"]["id"] == artifact["id"]), None)
        if row is None:
            return None
        status = lock_status(conn, row.lock_id)
    result = json.loads(row.metrics)
    result.update(evaluation_id=row.id, stale=status["stale"], lock_status=status if status["stale"] else None)
    return result


def _format_of(qualifier: str) -> str:
    from stillroom.train.export import FORMATS

    fmt = {"f16": "gguf-f16", "q8_0": "gguf-q8_0"}.get(qualifier, qualifier)
    if fmt not in FORMATS:
        raise ArtifactError(f"unknown artifact '{qualifier}': expected one of {', '.join(FORMATS)} "
                            "(or f16, q8_0 for the GGUF ones)")
    return fmt


def artifact_predictions(project, student: str, qualifier: str, rows) -> dict[int, str]:
    """An exported artifact's answers on the eval rows, as an evaluation source for
    `stillroom.evaluate.compare` (`student@q8_0`, `student@int8`, ...): the ones recorded by its
    current evaluation, or predicted now when it has none."""
    fmt = _format_of(qualifier)
    evaluation = latest_artifact_evaluation(project, student, fmt)
    recorded = {} if evaluation is None else {i: label for i, label, _ in evaluation["predictions"]}
    todo = [ex for ex, _ in rows if ex.id not in recorded]
    if todo:
        with project.store.engine.connect() as conn:
            from stillroom.store.records import latest_run

            run = latest_run(conn, student)
            artifact = latest_artifact(conn, run["id"], fmt) if run else None
        if artifact is None:
            raise ArtifactError(f"student '{student}' has no {fmt} export of its newest run; "
                                f"run `stillroom export {student} --format {fmt}`")
        predicted = load_artifact(artifact["path"]).predict([ex.input for ex in todo])
        recorded.update({ex.id: p.label for ex, p in zip(todo, predicted)})
    return {ex.id: recorded[ex.id] for ex, _ in rows}

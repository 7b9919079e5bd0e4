"""In-process teachers: a GGUF file through llama-cpp-python (grammar-constrained JSON for
extraction) and a transformers folder named by `teacher.model_path`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_label_engine import add_inputs, count, labels_of  # noqa: E402

from stillroom.backends.registry import TeacherNotServable, teacher_backend  # noqa: E402
from stillroom.config import ConfigError, TeacherConfig  # noqa: E402
from stillroom.label import label_examples  # noqa: E402
from stillroom.store import tables as T  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["people"],
          "properties": {"people": {"type": "string"}, "time": {"type": "string"}}}


def _project(tmp_path, teacher: str, task: str):
    from stillroom.project import Project, init_project

    root = tmp_path / "proj"
    init_project(root)
    (root / "stillroom.yaml").write_text(task + teacher, encoding="utf-8")
    return Project.open(root)


def test_gguf_teacher_answers_extraction_with_schema_valid_json(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the gguf-serve extra) is not installed")
    task = f"task:\n  name: booking\n  type: extraction\n  max_output_tokens: 24\n  schema: {json.dumps(SCHEMA)}\n"
    project = _project(tmp_path, "teacher: {backend: gguf, model: smollm2-q4}\n", task)
    try:
        texts = ["A table for 4 people at 8pm please", "we are two, around noon"]
        add_inputs(project, texts)
        report = label_examples(project)
        labels = labels_of(project)
        # the grammar admits only schema-valid records: every answer parses and becomes a label
        assert set(labels) == set(texts), report
        for record in labels.values():
            value = json.loads(record)
            assert set(value) <= {"people", "time"} and isinstance(value["people"], str)
        calls = count(project, T.responses)
        assert calls == len(texts)
        label_examples(project)  # nothing left to ask: no second call
        assert count(project, T.responses) == calls
    finally:
        project.close()


def test_local_teacher_loads_the_named_model_folder(tmp_path, tiny_llama_dir):
    backend = teacher_backend(TeacherConfig(backend="local", model_path=str(tiny_llama_dir), max_tokens=4))
    assert backend.name == Path(tiny_llama_dir).name
    import asyncio

    completion = asyncio.run(backend.chat([{"role": "user", "content": "hello"}], max_tokens=3))
    assert completion.model == Path(tiny_llama_dir).name and 1 <= completion.output_tokens <= 3


def test_model_path_mistakes_are_named(tmp_path):
    with pytest.raises(TeacherNotServable, match="is not a folder"):
        teacher_backend(TeacherConfig(backend="local", model_path="missing-model"), tmp_path)
    with pytest.raises(ConfigError, match="teacher.backend"):
        from stillroom.config import parse_config

        parse_config({"task": {"name": "t", "labels": [{"name": "a"}, {"name": "b"}]},
                      "teacher": {"backend": "llamafile"}})

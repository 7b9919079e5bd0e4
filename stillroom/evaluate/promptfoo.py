"""Export the locked eval set as a promptfoo suite, for teams that run their evals in promptfoo.

Writes `promptfooconfig.yaml` (prompts, providers, defaultTest, `tests: file://tests.yaml`) and
`tests.yaml` (one test per locked eval example: `vars.input` and an `equals` assertion on the
teacher's label). The provider is stillroom's own gateway through promptfoo's OpenAI provider
(`openai:chat:<task name>` with `config.apiBaseUrl`), so `promptfoo eval` measures the routed
system exactly as clients see it. The gateway renders the task's prompts itself, so the promptfoo
prompt is the raw input.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["export_promptfoo", "DEFAULT_GATEWAY_URL"]

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000/v1"
GATEWAY_KEY_ENV = "STILLROOM_GATEWAY_KEY"  # the gateway's key variable (serve/app.py); fastapi not imported here
HEADER = "# yaml-language-server: $schema=https://promptfoo.dev/config-schema.json\n"


def _dump(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def export_promptfoo(project, out_dir: Path, gateway_url: str = DEFAULT_GATEWAY_URL) -> dict:
    """Write the suite for the active, verified eval lock; returns the paths and counts."""
    from stillroom.curate.lock import verify_lock
    from stillroom.project import ProjectError
    from stillroom.store.records import split_rows

    lock = verify_lock(project)
    with project.store.engine.connect() as conn:
        rows = split_rows(conn, "eval")
    if not rows:
        raise ProjectError("the eval split has no teacher-labelled examples to export")
    task = project.config.task
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "description": (f"stillroom locked eval set for '{task.name}': eval lock {lock.id}, manifest SHA-256 "
                        f"{lock.manifest_sha256}; expected answers are the teacher's labels"),
        "prompts": ["{{input}}"],
        "providers": [{
            "id": f"openai:chat:{task.name}",
            "label": "stillroom gateway (routed: student when confident, else teacher)",
            "config": {"apiBaseUrl": gateway_url, "apiKeyEnvar": GATEWAY_KEY_ENV, "temperature": 0},
        }],
        # A teacher reply may carry stray whitespace; the gateway's student replies are bare labels.
        "defaultTest": {"options": {"transform": "output.trim()"}},
        "tests": "file://tests.yaml",
    }
    tests = [{
        "description": f"eval example {ex.id}",
        "vars": {"input": ex.input},
        "assert": [{"type": "equals", "value": label}],
        "metadata": {"example_id": ex.id, "source": ex.source, "lock_id": lock.id},
    } for ex, label in rows]
    config_path, tests_path = out_dir / "promptfooconfig.yaml", out_dir / "tests.yaml"
    config_path.write_text(HEADER + _dump(config), encoding="utf-8")
    tests_path.write_text(_dump(tests), encoding="utf-8")
    return {"config": str(config_path), "tests": str(tests_path), "n_tests": len(tests), "lock_id": lock.id,
            "provider": config["providers"][0]["id"], "gateway_url": gateway_url,
            "run": f"stillroom serve &  {GATEWAY_KEY_ENV}=<gateway key, or any text if none> "
                   f"npx promptfoo@latest eval -c {config_path}"}

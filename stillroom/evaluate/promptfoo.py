"""Export the locked eval set as a promptfoo suite, for teams that run their evals in promptfoo.

Writes `promptfooconfig.yaml` (prompts, providers, defaultTest, `tests: file://tests.yaml`) and
`tests.yaml` (one test per locked eval example). Classification: an `equals` assertion on the
teacher's label. Extraction: `is-json` against the task's schema plus a `javascript` assertion that
scores per-record field F1 against the teacher's record (`vars.expected`) with stillroom's
normalisation, passing when the record agrees exactly. Generation: a `javascript` ROUGE-L F1 against
the teacher's text, passing at `task.agreement_threshold` (promptfoo's built-in `rouge-n` is n-gram
overlap, not ROUGE-L; this one has no stemming, so it reads slightly lower than `rouge-score`). The provider is stillroom's own gateway through promptfoo's OpenAI provider
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


# promptfoo runs these with `output` (the answer) and `context.vars` (the test's vars) in scope.
FIELD_F1_JS = """
const norm = (v) => {
  if (v === null || v === undefined) return null;
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'number') return String(v);
  const t = String(v).replace(/\\s+/g, ' ').trim().toLowerCase();
  return t === '' ? null : t;
};
const fields = (value, path, out) => {
  if (Array.isArray(value)) { value.forEach((x) => fields(x, path + '[]', out)); }
  else if (value !== null && typeof value === 'object') {
    Object.entries(value).forEach(([k, x]) => fields(x, path ? path + '.' + k : k, out));
  } else { const n = norm(value); if (n !== null) { const key = path + '=' + n; out[key] = (out[key] || 0) + 1; } }
  return out;
};
const got = fields(typeof output === 'string' ? JSON.parse(output) : output, '', {});
const want = fields(JSON.parse(context.vars.expected), '', {});
let match = 0, np = 0, nr = 0;
for (const k in got) { np += got[k]; if (k in want) match += Math.min(got[k], want[k]); }
for (const k in want) nr += want[k];
const score = np + nr === 0 ? 1 : (2 * match) / (np + nr);
return { pass: match === np && match === nr, score, reason: `field F1 ${score.toFixed(3)} vs the teacher's record` };
"""

ROUGE_L_JS = """
const words = (t) => (String(t).toLowerCase().match(/[a-z0-9]+/g) || []);
const a = words(output), b = words(context.vars.expected);
if (!a.length || !b.length) return { pass: false, score: 0, reason: 'empty answer or reference' };
const row = new Array(b.length + 1).fill(0);
for (let i = 1; i <= a.length; i++) {
  let prev = 0;
  for (let j = 1; j <= b.length; j++) {
    const tmp = row[j];
    row[j] = a[i - 1] === b[j - 1] ? prev + 1 : Math.max(row[j], row[j - 1]);
    prev = tmp;
  }
}
const lcs = row[b.length], p = lcs / a.length, r = lcs / b.length;
const score = lcs ? (2 * p * r) / (p + r) : 0;
return { pass: score >= THRESHOLD, score, reason: `ROUGE-L F1 ${score.toFixed(3)} vs the teacher's text` };
"""


def _assertions(task, label: str) -> list[dict]:
    """The per-test assertions for the task type (the shared ones live in defaultTest)."""
    if task.type == "classification":
        return [{"type": "equals", "value": label}]
    return []


def _default_asserts(task) -> list[dict]:
    if task.type == "extraction":
        return [{"type": "is-json", "value": task.schema},
                {"type": "javascript", "value": FIELD_F1_JS.strip(), "metric": "field_f1"}]
    if task.type == "generation":
        threshold = repr(float(task.config.agreement_threshold))
        return [{"type": "javascript", "value": ROUGE_L_JS.strip().replace("THRESHOLD", threshold),
                 "metric": "rouge_l"}]
    return []


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
        "defaultTest": {"options": {"transform": "output.trim()"},
                        **({"assert": _default_asserts(project.task)} if _default_asserts(project.task) else {})},
        "tests": "file://tests.yaml",
    }
    typed = project.task.type != "classification"
    tests = [{
        "description": f"eval example {ex.id}",
        "vars": {"input": ex.input, **({"expected": label} if typed else {})},
        **({"assert": _assertions(project.task, label)} if not typed else {}),
        "metadata": {"example_id": ex.id, "source": ex.source, "lock_id": lock.id},
    } for ex, label in rows]
    config_path, tests_path = out_dir / "promptfooconfig.yaml", out_dir / "tests.yaml"
    config_path.write_text(HEADER + _dump(config), encoding="utf-8")
    tests_path.write_text(_dump(tests), encoding="utf-8")
    return {"config": str(config_path), "tests": str(tests_path), "n_tests": len(tests), "lock_id": lock.id,
            "provider": config["providers"][0]["id"], "gateway_url": gateway_url,
            "run": f"stillroom serve &  {GATEWAY_KEY_ENV}=<gateway key, or any text if none> "
                   f"npx promptfoo@latest eval -c {config_path}"}

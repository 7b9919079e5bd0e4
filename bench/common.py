"""What every benchmark shares: where the datasets are, and writing results in the agreed shape."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATASETS = Path(os.environ.get("STILLROOM_DATASETS", ROOT.parent / "shared" / "datasets"))


def dataset_dir(name: str) -> Path | None:
    """The dataset's folder, or None after saying why (the benchmark then exits 0 writing nothing)."""
    path = DATASETS / name
    if not path.is_dir():
        print(f"skipping: dataset '{name}' not found at {path} (it lives in ../shared/datasets; "
              "set STILLROOM_DATASETS to point elsewhere)")
        return None
    return path


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("stillroom", "torch", "transformers", "peft", "sentence-transformers", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpus": os.cpu_count(), "gpu": gpu, "machine": platform.machine()}


def write_result(name: str, dataset: str, quick: bool, metrics: dict, goals: dict, config: dict,
                 seconds: float, summary: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "dataset": dataset, "quick": quick, "metrics": metrics, "goals": goals,
               "config": config, "hardware": hardware(), "versions": versions(), "seconds": round(seconds, 1),
               "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    with open(RESULTS / "SUMMARY.md", "a", encoding="utf-8") as f:
        f.write(f"- {payload['finished_at']} **{name}**{' (quick)' if quick else ''}: {summary}\n")
    print(f"wrote {path}")
    return path

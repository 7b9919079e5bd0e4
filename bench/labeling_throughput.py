"""Labeling throughput: 5,000 inputs against a loopback teacher that answers every call after a fixed
200 ms, with a concurrency cap of 64.

The ideal is the cap divided by the latency (64 / 0.2 s = 320 calls/s, 15.6 s for 5,000 calls);
achieved / ideal says how much of that the engine delivers with everything it does per call
(intent committed before the send, answer committed on return, label and vote per input, rate
limiter, budget, progress). Client overhead per call is measured two ways: the latency the engine
recorded minus the server's 200 ms (time added on the way out and back), and the labeling
process's CPU time per call. The fake teacher runs in its own process so its CPU is not counted.

For scale, the same calls are first made by the bare HTTP backend (OpenAICompatBackend.chat under
a semaphore: no store, no intents, no votes): the engine's cost is the difference between the two.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, write_result

LATENCY_S = 0.2
CONCURRENCY = 64


def _server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"),
                             "--latency-ms", str(LATENCY_S * 1000), "--lean"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready "):
        proc.kill()
        raise RuntimeError(f"fake teacher did not start: {line!r}")
    return proc, int(line.split()[1])


def _backend_only(base_url: str, n: int) -> tuple[float, float]:
    """(wall s, CPU ms per call) of n calls through the bare backend at the same concurrency."""
    import asyncio

    from stillroom.backends.openai_compat import OpenAICompatBackend

    async def run() -> None:
        backend = OpenAICompatBackend(base_url, "fake-teacher")
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with gate:
                await backend.chat([{"role": "user", "content": f"Message: baseline {i}"}], max_tokens=16,
                                   idempotency_key=f"baseline-{i}")

        await asyncio.gather(*(one(i) for i in range(n)))
        await backend.aclose()

    cpu0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t0, (time.process_time() - cpu0) * 1000 / n


def main(quick: bool = False) -> None:
    import yaml

    from stillroom.capture.importers import import_file
    from stillroom.label import label_examples
    from stillroom.project import Project, init_project
    from stillroom.store import tables as T
    from sqlalchemy import select

    n = 1000 if quick else 5000
    work = Path(tempfile.mkdtemp(prefix="bench-labeling-"))
    server, port = _server()
    started = time.perf_counter()
    try:
        init_project(work)
        config = {"task": {"name": "bench", "labels": [{"name": x} for x in ("billing", "shipping", "other")]},
                  "teacher": {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "fake-teacher",
                              "timeout_s": 30, "price_per_million_input_tokens": 0.15,
                              "price_per_million_output_tokens": 0.60},
                  "labeling": {"concurrency": CONCURRENCY}}
        (work / "stillroom.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        words = ["invoice", "parcel", "hello", "refund", "courier", "weather"]
        (work / "inputs.jsonl").write_text("".join(
            json.dumps({"input": f"message {i}: my {words[i % 6]} and {words[(i * 7) % 6]} question"}) + "\n"
            for i in range(n)), encoding="utf-8")
        project = Project.open(work)
        import_file(project, work / "inputs.jsonl")
        bare_wall, bare_cpu = _backend_only(f"http://127.0.0.1:{port}/v1", n)

        cpu0, t0 = time.process_time(), time.perf_counter()
        report = label_examples(project)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        with project.store.engine.connect() as conn:
            latencies = [r for (r,) in conn.execute(select(T.responses.c.latency_ms))]
        project.close()
    finally:
        server.stdin.close()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    ideal_s = n * LATENCY_S / CONCURRENCY
    metrics = {
        "inputs": n,
        "calls_paid": report.calls_paid,
        "labelled": report.labelled,
        "wall_s": round(wall, 2),
        "ideal_s": round(ideal_s, 2),
        "calls_per_s": round(report.calls_paid / wall, 1),
        "ideal_calls_per_s": round(CONCURRENCY / LATENCY_S, 1),
        "achieved_over_ideal": round(ideal_s / wall, 3),
        "backend_only_over_ideal": round(ideal_s / bare_wall, 3),
        "engine_over_backend_only": round(bare_wall / wall, 3),
        "backend_only_cpu_ms_per_call": round(bare_cpu, 3),
        "latency_overhead_ms_mean": round(statistics.fmean(latencies) - LATENCY_S * 1000, 2),
        "latency_overhead_ms_p50": round(statistics.median(latencies) - LATENCY_S * 1000, 2),
        "latency_overhead_ms_p99": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))] - LATENCY_S * 1000, 2),
        "client_cpu_ms_per_call": round(cpu * 1000 / max(1, report.calls_paid), 3),
    }
    write_result(
        "labeling_throughput", "synthetic (loopback fake teacher)", quick, metrics,
        goals={"achieved_over_ideal": ">= 0.95"},
        config={"latency_ms": LATENCY_S * 1000, "concurrency": CONCURRENCY, "samples": 1, "store": "sqlite",
                "cpus_visible": os.cpu_count()},
        seconds=time.perf_counter() - started,
        summary=(f"{n} inputs at concurrency {CONCURRENCY}, 200 ms teacher: {metrics['calls_per_s']} calls/s, "
                 f"{metrics['achieved_over_ideal']:.1%} of ideal (bare HTTP backend: "
                 f"{metrics['backend_only_over_ideal']:.1%}); client overhead "
                 f"{metrics['latency_overhead_ms_mean']} ms/call latency, {metrics['client_cpu_ms_per_call']} ms/call CPU"),
    )
    print(json.dumps(metrics, indent=1))

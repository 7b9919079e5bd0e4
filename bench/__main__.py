"""Benchmark runner: `bench/run NAME [--quick]`, `bench/run --list`, `bench/run all`."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "banking77": "full pipeline on Banking77: encoder student, train = recorded teacher, test = locked eval",
    "eval_banking77": "evaluation on Banking77: gap with 95% CI, both gate modes, slice report, calibration",
    "near_duplicates": "Banking77 test inputs with a near-duplicate (MiniLM cosine) in train, per threshold",
    "labeling_throughput": "5,000 inputs, loopback teacher at 200 ms, concurrency 64: achieved/ideal, overhead per call",
    "train_speed": "LoRA SmolLM2-135M training tokens/s on the CPU, stillroom vs TRL SFTTrainer, interleaved",
    "head_latency": "label-head LoRA student latency on this CPU: eager, int8, compiled; 30 and 8 layers (~25 min)",
    "students_banking77": "encoder, fine-tuned encoder and LoRA at 1,000 and 10,003 labels: agreement, latency, size, $",
    "restaurant8k": "extraction student (LoRA, constrained JSON) on Restaurant8k: slot F1, exact match, validity",
    "e2e_nlg": "generation student (LoRA) on E2E NLG: multi-reference ROUGE-L, BLEU, chrF; judge when configured",
}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("name", nargs="?", help="benchmark name, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    parser.add_argument("--quick", action="store_true", help="a smaller version of the benchmark")
    parser.add_argument("--part", help="run one part of a benchmark that has parts (students_banking77: "
                                       "'1000' or 'all' labels); the other parts' results are kept")
    parser.add_argument("--students", help="comma-separated student names to re-run (students_banking77); "
                                           "the others' results in the part are kept")
    parser.add_argument("--keep", metavar="DIR", help="students_banking77: keep each part's project in DIR/<part> "
                                                      "and reuse students already trained there")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        for name, what in BENCHMARKS.items():
            print(f"{name:<14} {what}")
        return 0
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    for name in names:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; `bench/run --list` lists them", file=sys.stderr)
            return 2
        module = importlib.import_module(f"bench.{name}")
        kwargs = {"quick": args.quick}
        if args.part is not None or args.students is not None:
            parts = list(getattr(module, "PARTS", []))
            if not parts:
                print(f"{name} has no parts: run it without --part/--students", file=sys.stderr)
                return 2
            if args.part not in parts:
                print(f"--part {args.part!r}: {name} has parts {parts} (--students needs --part)", file=sys.stderr)
                return 2
            kwargs["part"] = args.part
            if args.students:
                kwargs["students"] = args.students.split(",")
        if args.keep:
            if name != "students_banking77":
                print(f"--keep applies to students_banking77, not {name}", file=sys.stderr)
                return 2
            kwargs["keep"] = args.keep
        module.main(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

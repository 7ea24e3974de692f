"""Runs every benchmark script benchmarks/bench_*.py into one table, CSV and PNG.

    python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--full] [--providers ...]
        [--modes ...] [--filter REGEX] [--threads N] [--out-dir DIR] [--no-plot]

A new benchmark is one file benchmarks/bench_<name>.py defining
``cases(cfg: harness.Config) -> (list[harness.Case], list[str] notes)``; it is picked up here
(in file-name order) with no other change. See README.md.
"""
import importlib
import sys
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent


def modules():
    sys.path.insert(0, str(HERE))
    return [importlib.import_module(p.stem) for p in sorted(HERE.glob("bench_*.py"))]


if __name__ == "__main__":
    sys.exit(harness.exit_code(harness.main(modules())))

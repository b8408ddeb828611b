"""Benchmarks: `python launch/bench.py {shards,loader,objectives,train,job,collectives,gpu,remote} [options]` (see BENCHMARKS.md)."""

import sys

from maskcon.cli import run_bench

if __name__ == "__main__":
    sys.exit(run_bench(sys.argv[1:]))

"""Benchmarks behind `python launch/bench.py NAME`; each module exposes main(argv) -> exit status."""

"""What the doors in launch/ call: argument handling and one-line errors around the package."""

from __future__ import annotations

import importlib
import sys

from maskcon.errors import UserError

BENCHMARKS = {
    "shards": "conversion speed: our converter against a plain webdataset.ShardWriter loop",
    "loader": "two-view loading speed: DALI (CPU) against torchvision and an official-style PIL loader",
    "objectives": "time and memory of the MaskCon loss against SelfCon",
    "train": "training images/s: real loader, synthetic batches, official-style loader",
}


def fail(err: UserError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def run_train(argv: list[str]) -> int:
    from maskcon.config import parse_config

    try:
        config = parse_config(argv)
        from maskcon.train import train

        result = train(config)
    except UserError as err:
        return fail(err)
    if result.untrained:
        print("untrained " + "  ".join(f"{k[len('untrained_'):]} {v:.2f}" for k, v in result.untrained.items()))
    if result.metrics:
        print("final " + "  ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()) + f"  ({result.output_dir})")
    return 0


def run_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:<11} {text}" for name, text in BENCHMARKS.items()]
        print("usage: python launch/bench.py {" + ",".join(BENCHMARKS) + "} [options]\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            return fail(UserError(f"unknown benchmark {argv[0]!r}; known: {', '.join(BENCHMARKS)}"))
        return 0
    try:
        return importlib.import_module(f"maskcon.bench.{argv[0]}").main(argv[1:])
    except UserError as err:
        return fail(err)

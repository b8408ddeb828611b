"""Convert a dataset to WebDataset shards, or verify shards.

    python launch/make_shards.py create DATASET --src SRC --out OUT
    python launch/make_shards.py verify OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from maskcon import shards  # noqa: E402
from maskcon.datasets import DATASETS  # noqa: E402
from maskcon.errors import UserError  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="convert DATASET read from SRC into shards under OUT")
    create.add_argument("dataset", choices=list(DATASETS))
    create.add_argument("--src", type=Path, help="the folder you downloaded (not needed for digits)")
    create.add_argument("--out", type=Path, help="output folder (default: shards/DATASET in the repository)")
    create.add_argument("--seed", type=int, default=0, help="seed of the shuffled write order")
    create.add_argument("--samples-per-shard", type=int, default=None,
                        help="fixed shard size (default: the most that gives at least --min-shards shards)")
    create.add_argument("--min-shards", type=int, default=shards.MIN_SHARDS,
                        help="shards per split where the data allows")
    create.add_argument("--max-samples-per-shard", type=int, default=shards.MAX_SAMPLES_PER_SHARD)
    create.add_argument("--compress-level", type=int, default=shards.PNG_COMPRESS_LEVEL,
                        help="zlib level 0..9 of PNG images (lossless at every level)")
    create.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    create.add_argument("--overwrite", action="store_true", help="replace complete shards made otherwise")
    verify = commands.add_parser("verify", help="check every shard under OUT against its manifest")
    verify.add_argument("out", type=Path)
    verify.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        if args.command == "create":
            out = args.out if args.out is not None else REPO / "shards" / args.dataset
            manifest = shards.create(args.dataset, args.src, out, seed=args.seed,
                                     samples_per_shard=args.samples_per_shard, min_shards=args.min_shards,
                                     max_samples_per_shard=args.max_samples_per_shard,
                                     compress_level=args.compress_level, workers=args.workers,
                                     overwrite=args.overwrite, log=log)
            sizes = ", ".join(f"{name} {split['num_samples']} samples in {len(split['shards'])} shards"
                              for name, split in manifest["splits"].items())
            print(f"{args.dataset} shards at {out}: {sizes}")
            return 0
        problems = shards.verify(args.out, workers=args.workers, log=log)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.out}: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"{args.out}: every shard intact")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

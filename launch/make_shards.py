"""Convert a dataset to WebDataset shards, or verify shards (format: shards/README.md).

    python launch/make_shards.py create DATASET --src SRC --out OUT
    python launch/make_shards.py verify OUT
"""

import sys

from maskcon.cli import run_make_shards

if __name__ == "__main__":
    sys.exit(run_make_shards(sys.argv[1:]))

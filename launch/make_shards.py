"""Convert a dataset to WebDataset shards, or verify shards (format: shards/README.md).

    python launch/make_shards.py create DATASET --src SRC --out OUT
    python launch/make_shards.py verify OUT

Exit status: 0 done; 1 problems found (verify: one line per damaged shard); 2 failed (bad arguments or
source, OUT made from other inputs, no space or no permission to write: one line, earlier files intact).
"""

import sys

from maskcon.cli import run_make_shards

if __name__ == "__main__":
    sys.exit(run_make_shards(sys.argv[1:]))

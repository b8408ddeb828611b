"""Start a training run on one machine: check it, then `accelerate launch` one process per GPU.

    python launch/run.py [--processes N|auto] [--accelerate-config FILE] [launch/train.py options]

A mistake (an option, the batch for N processes, missing shards, the --resume checkpoint, W&B) is found in
this process first and printed as one line, exit 2, before any process starts.
"""

import sys

from maskcon.cli import run_launch

if __name__ == "__main__":
    sys.exit(run_launch(sys.argv[1:]))

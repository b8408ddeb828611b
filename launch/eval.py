"""Recall@K of a trained network on a test split, without training:

    python launch/eval.py RUN_OR_BACKBONE_OR_CHECKPOINT [--shards DIR] [--features FILE.pt] [--json]
    accelerate launch --multi_gpu --num_processes N launch/eval.py ...      # several processes

Exit status: 0 done; 2 a mistake (one line).
"""

import sys

from maskcon.cli import run_eval

if __name__ == "__main__":
    sys.exit(run_eval(sys.argv[1:]))

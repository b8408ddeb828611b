"""Run a W&B grid sweep here, one point after another, without a W&B server.

    python launch/grid.py launch/sweeps/cifar100-main.yaml [--runs DIR] [--dry-run] [options for every point]

The same command again skips the finished points and continues the others from their checkpoints.
"""

import sys

from maskcon.cli import run_grid

if __name__ == "__main__":
    sys.exit(run_grid(sys.argv[1:]))

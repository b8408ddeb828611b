"""Turn finished runs into the supplement's tables: Markdown, CSV and a Recall@K plot.

    python launch/report.py runs/                      # every finished run folder under runs/
    python launch/report.py RUN_DIR ... --out report   # chosen runs
    python launch/report.py --wandb ENTITY/maskcon/SWEEP_ID
"""

import sys

from maskcon.cli import run_report

if __name__ == "__main__":
    sys.exit(run_report(sys.argv[1:]))

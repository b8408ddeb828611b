"""Train MaskCon or a baseline: `accelerate launch launch/train.py [--dataset NAME] [--option value ...]`.

With no options it trains MaskCon on the bundled handwritten digits. `--help` lists every option.
"""

import sys

from maskcon.cli import run_train

if __name__ == "__main__":
    sys.exit(run_train(sys.argv[1:]))

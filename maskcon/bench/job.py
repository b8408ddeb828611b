"""The main job as users start it: `python launch/bench.py job [--json] [launch/train.py options]`.

Runs `accelerate launch launch/train.py OPTIONS` (W&B off, the run folder in a scratch folder) and, every
--every seconds while it runs, reads the GPU's utilisation (nvidia-smi, where there is one) and the last row
of the run's metrics.jsonl. From the metrics rows of the last epoch it reports the medians of images_per_s,
data_wait and feed_cpu_ms_per_batch (the loop's own figures); gpu_busy: the mean utilisation of the samples
taken while that epoch's rows came in; each evaluation's wall time (eval_s); the run's wall time and its final
R@1 (results.json).
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskcon import rundir
from maskcon.bench import command, machine, show
from maskcon.bench import parser as bench_parser
from maskcon.config import parse_config
from maskcon.errors import UserError
from maskcon.launcher import launch_command
from maskcon.provenance import gpu_field


def _gpu_busy() -> float | None:
    """The first GPU's utilisation now, percent; None without one."""
    busy = gpu_field("utilization.gpu")
    try:
        return float(busy) if busy is not None else None
    except ValueError:            # "[N/A]" on some devices
        return None


def _last_row(metrics: Path) -> dict | None:
    try:
        lines = metrics.read_bytes().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None      # not written yet, or a row being appended


def _figures(rows: list[dict], samples: list[tuple[dict | None, float | None]]) -> dict:
    """The report's figures from the run's metrics rows and the (last row, utilisation) samples."""
    steps = [row for row in rows if "loss" in row]
    last_epoch = max(math.ceil(row["epoch"]) for row in steps)          # a row's epoch: steps / steps per epoch
    in_last = [row for row in steps if math.ceil(row["epoch"]) == last_epoch]
    busy = [use for row, use in samples if use is not None and row is not None and row in in_last]

    def median(name: str) -> float | None:
        values = [row[name] for row in in_last if row.get(name) is not None]
        return round(statistics.median(values), 4) if values else None

    return {"epoch": last_epoch, "rows": len(in_last),
            **{name: median(name) for name in ("images_per_s", "data_wait", "feed_cpu_ms_per_batch")},
            "gpu_busy": round(statistics.mean(busy) / 100, 3) if busy else None, "gpu_samples": len(busy),
            "eval_s": [row["eval_s"] for row in rows if "eval_s" in row]}


def main(argv: list[str]) -> int:
    parser = bench_parser("job", __doc__, usage="%(prog)s [--every S] [--json] [launch/train.py options]")
    parser.add_argument("--every", type=float, default=0.5, metavar="S", help="seconds between samples (0.5)")
    args, train_options = parser.parse_known_args(argv)
    if args.every <= 0:
        raise UserError(f"--every must be positive, got {args.every}")
    with tempfile.TemporaryDirectory(prefix="maskcon-job-") as scratch:
        run_dir = Path(scratch) / "run"
        options = [*train_options, "--wandb", "disabled", "--output-dir", str(run_dir)]
        parse_config(options)             # a mistake in the options: one line before anything starts
        job = launch_command(options, 1, None)
        samples, started = [], time.monotonic()
        process = subprocess.Popen(job, stdin=subprocess.DEVNULL, stdout=sys.stderr)   # stdout: the report only
        stops = []     # a stop signal goes on to the job (Ctrl-C reaches it by itself), which ends with a checkpoint
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, lambda number, frame: (stops.append(number), process.send_signal(number)))
        try:
            while process.poll() is None:
                samples.append((_last_row(run_dir / rundir.METRICS), _gpu_busy()))
                time.sleep(args.every)
        except KeyboardInterrupt:
            process.wait()
            raise
        if stops:
            raise KeyboardInterrupt(signal.Signals(stops[0]).name)
        wall_s = time.monotonic() - started
        if process.returncode != 0:
            raise UserError(f"the main job stopped with exit status {process.returncode} (its output is above)")
        rows = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
        results = json.loads((run_dir / rundir.RESULTS).read_text())
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else None
    report = {"benchmark": "job", "command": command("job", argv), "machine": machine(device),
              "train_command": " ".join(["accelerate launch launch/train.py", *train_options]),
              **_figures(rows, samples), "wall_s": round(wall_s, 1), "R@1": results.get("R@1")}
    return show(report, args.json)

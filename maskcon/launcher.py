"""Starting a run: check it without training (`--check`), print its configuration (`--print-config`), and
launch several processes so that a mistake prints the project's one line alone.

`accelerate launch` adds a defaults warning unless it is given a configuration file, and, when a process
fails, a traceback (one process) or torchrun's failure table (several). `launch/run.py` therefore checks
the run in one process first (the same checks as `--check`: options, the batch for the number of processes,
shards, the --resume checkpoint, W&B) and only then starts `accelerate launch -q --config_file ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from maskcon.config import Config, parse_config
from maskcon.errors import OneLineParser, UserError
from maskcon.stopping import supervise

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "launch" / "accelerate"
ONE_PROCESS = ACCELERATE_CONFIGS / "one_process.yaml"      # one process, GPU when there is one, else CPU
ONE_NODE = ACCELERATE_CONFIGS / "one_node.yaml"            # N processes of one node (GPUs, or gloo on CPUs)


def check_run(config: Config, processes: int) -> list[str]:
    """The checks a run makes before training, without training: its plan (`maskcon.plan.plan_run`, the one
    the run follows), the run folder, W&B and the pretrained weights; one line per finding, UserError (one
    line) for the first problem."""
    from maskcon import rundir
    from maskcon.plan import plan_run
    from maskcon.tracking import resolve_wandb_mode, wandb_logged_in

    holder = None if config.output_dir is None else rundir.lock_holder(Path(config.output_dir))
    if holder is not None:
        raise rundir.in_use(Path(config.output_dir), holder)
    if config.output_dir is not None and rundir.starts_in_new_folder(config.output_dir, config.resume):
        rundir.check_fresh(Path(config.output_dir), config.resume)
    rundir.check_writable(_writes_in(config))
    lines = plan_run(config, processes).lines()
    mode = resolve_wandb_mode(config.wandb)
    if mode == "online" and not wandb_logged_in():
        raise UserError("--wandb online but W&B finds no API key (WANDB_API_KEY, netrc or `wandb login`); "
                        "log in, or use --wandb offline")
    lines.append(f"W&B: {mode}" + (f", project {config.wandb_project}" if mode != "disabled" else ""))
    if config.pretrained == "imagenet":
        from maskcon.model import check_pretrained_reachable

        check_pretrained_reachable(config.arch)
    if config.pretrained not in (None, "imagenet") and not Path(config.pretrained).expanduser().is_file():
        raise UserError(f"pretrained weights file {config.pretrained!r} not found; pass 'imagenet', a torchvision "
                        f"weights file or none")
    return lines


def _writes_in(config: Config) -> Path:
    """The folder the run will write in: --output-dir, else the run folder --resume PATH names, else runs/."""
    from maskcon import rundir

    if config.output_dir is not None:
        return Path(config.output_dir)
    if config.resume not in (None, "newest", "auto"):
        path = Path(config.resume)
        return path.parent.parent if path.parent.name == rundir.CHECKPOINTS else (
            path.parent if path.name == rundir.CHECKPOINTS else path)
    return rundir.DEFAULT_ROOT


def launcher_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python launch/run.py", add_help=False, allow_abbrev=False,
        usage="%(prog)s [--processes N | --accelerate-config FILE] [trainer options, see launch/train.py --help]")
    parser.add_argument("--processes", default="auto",
                        help="processes of this machine: a number, or auto (one per visible GPU, 1 without one)")
    parser.add_argument("--accelerate-config", type=Path, default=None,
                        help="an accelerate configuration file instead (e.g. launch/accelerate/gpu_8.yaml)")
    return parser


def _processes(text: str, accelerate_config: Path | None) -> int:
    if accelerate_config is not None and text != "auto":
        raise UserError(f"--processes {text} and --accelerate-config {accelerate_config} both set the processes; "
                        f"give one of them")
    if accelerate_config is not None:
        if not accelerate_config.is_file():
            raise UserError(f"accelerate configuration {accelerate_config} not found; see launch/accelerate/")
        values = yaml.safe_load(accelerate_config.read_text()) or {}
        return int(values.get("num_processes", 1))
    if text == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--processes must be a positive number or auto, got {text!r}")
    return int(text)


def launch_command(argv: list[str], processes: int, accelerate_config: Path | None) -> list[str]:
    """The `accelerate launch` command that runs launch/train.py ARGV on `processes` processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q"]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config)]
    elif processes == 1:
        command += ["--config_file", str(ONE_PROCESS)]
    else:
        command += ["--config_file", str(ONE_NODE), "--num_processes", str(processes)]
    return [*command, str(ROOT / "launch" / "train.py"), *argv]


def parse_run(argv: list[str]) -> tuple[argparse.Namespace, list[str], int, Config]:
    """launch/run.py ARGV read as run() reads it: its own options, the trainer's options, the processes and
    the trainer's configuration; UserError (one line) for a mistake."""
    own, rest = launcher_parser().parse_known_args(argv)
    processes = _processes(own.processes, own.accelerate_config)
    return own, rest, processes, parse_config(rest, processes=processes)


def run(argv: list[str]) -> int:
    """Check, then launch. 2 (one line) for a mistake found before launching, else the launcher's status."""
    if argv and argv[0] in ("-h", "--help"):
        launcher_parser().print_help()
        return 0
    own, rest, processes, config = parse_run(argv)
    if config.print_config or config.check:   # answered here, in one process, as the trainer would
        return report_or_check(config, processes)
    check_run(config, processes)
    environment = {**os.environ, "LOGLEVEL": os.environ.get("LOGLEVEL", "ERROR")}   # torchrun's own log lines
    return supervise(launch_command(rest, processes, own.accelerate_config), environment)


def report_or_check(config: Config, processes: int) -> int:
    """--print-config: the resolved configuration as YAML on stdout; --check: one line per check. 0."""
    if config.print_config:
        from maskcon.plan import plan_run

        print(yaml.safe_dump(plan_run(config, processes, shards_required=False).resolved(), sort_keys=False), end="")
    else:
        for line in check_run(config, processes):
            print(line)
        print("check passed: nothing was trained")
    return 0

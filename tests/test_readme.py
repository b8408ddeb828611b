"""README's commands and flags against the real command-line parsers of the doors in launch/."""

import re
import shlex
from pathlib import Path

import pytest

from maskcon.cli import _make_shards_parser
from maskcon.config import build_parser, parse_config
from maskcon.datasets import readme_table
from maskcon.evaluation import build_parser as eval_parser
from maskcon.grid import _parser as grid_parser
from maskcon.launcher import _processes, launcher_parser
from maskcon.report import build_parser as report_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLACEHOLDERS = {"DATASET": "cifar100", "SRC": "/data/src"}
# Flags of other tools that README names: accelerate launch, docker run, sbatch, scancel, pytest.
OTHER_TOOLS = {"--config_file", "--num_processes", "--multi_gpu", "--mixed_precision", "--gpus", "--ipc",
               "--shm-size", "--nodes", "--help", "--init", "--signal", "--build-arg", "--num_machines",
               "--machine_rank", "--main_process_ip", "--main_process_port", "--ntasks-per-node", "--dist"}


def documented_commands() -> list[str]:
    """Every command of README's bash blocks (continuation lines joined) and of its inline code spans
    that runs a door of launch/."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        commands += [line for line in block.replace("\\\n", " ").splitlines() if "launch/" in line]
    commands += [span for span in re.findall(r"`([^`\n]+)`", README)
                 if "launch/" in span and span.split()[0] in ("python", "accelerate", "sbatch", "wandb")]
    return commands


def door_arguments(command: str) -> tuple[str, list[str]]:
    """(door, its arguments) of a command line: the launch/ script and the tokens after it."""
    tokens = [PLACEHOLDERS.get(token, token) for token in shlex.split(command.replace("[", "").replace("]", ""),
                                                                          comments=True)]
    position = next(i for i, token in enumerate(tokens) if token.startswith("launch/"))
    return tokens[position], tokens[position + 1:]


COMMANDS = documented_commands()


def test_readme_documents_the_whole_path():
    doors = {door_arguments(command)[0] for command in COMMANDS}
    assert {"launch/make_shards.py", "launch/train.py", "launch/run.py", "launch/report.py",
            "launch/slurm.sh"} <= doors
    assert any(door.startswith("launch/sweeps/") for door in doors)
    assert "maskcon.load_backbone(" in README and "wandb agent" in README


@pytest.mark.parametrize("command", COMMANDS)
def test_each_documented_command_parses_with_the_real_parser(command):
    door, args = door_arguments(command)
    if "--help" in args:
        return   # --help is run for real in tests/test_config.py
    if door == "launch/train.py":
        parse_config(args, processes=8 if "gpu_8.yaml" in command else 1)
    elif door in ("launch/run.py", "launch/slurm.sh"):
        own, rest = launcher_parser().parse_known_args(args) if door == "launch/run.py" else (None, args)
        processes = 16 if door == "launch/slurm.sh" else (
            1 if own.processes == "auto" else _processes(own.processes, None))
        parse_config(rest, processes=processes)
    elif door == "launch/make_shards.py":
        _make_shards_parser().parse_args(args)
    elif door == "launch/report.py":
        report_parser().parse_args(args)
    elif door == "launch/eval.py":
        eval_parser().parse_args(args)
    elif door == "launch/grid.py":
        own, rest = grid_parser().parse_known_args(args)
        assert (ROOT / own.sweep).is_file(), own.sweep
        parse_config(rest)     # the options every point gets
    elif door.startswith("launch/sweeps/") or door.startswith("launch/accelerate/"):
        assert (ROOT / door).is_file(), door
    else:
        assert (ROOT / door).is_file(), door


def _option_strings(parser) -> set[str]:
    found = set()
    for action in parser._actions:
        found |= set(action.option_strings)
        if isinstance(action.choices, dict):   # subcommands
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def test_every_flag_readme_names_is_a_flag_of_a_door_or_of_the_tool_it_runs():
    known = (_option_strings(build_parser()) | _option_strings(launcher_parser()) | _option_strings(report_parser())
             | _option_strings(_make_shards_parser()) | _option_strings(eval_parser()) | _option_strings(grid_parser())
             | OTHER_TOOLS)
    text = README.replace(readme_table(), "")   # the dataset table is rendered from maskcon.datasets
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", text))
    assert sorted(named - known) == []

"""The `maskcon` console script: the doors of launch/ by name."""

import subprocess
import sys
from pathlib import Path

import yaml

SCRIPT = Path(sys.executable).parent / "maskcon"


def maskcon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_the_console_script_lists_its_doors_and_refuses_an_unknown_one_in_one_line():
    listed = maskcon("--help")
    assert listed.returncode == 0
    for door in ("train", "run", "make-shards", "bench", "report", "eval"):
        assert f"  {door} " in listed.stdout
    unknown = maskcon("trian")
    assert unknown.returncode == 2 and unknown.stderr.strip().splitlines() == [
        "error: unknown command 'trian'; known: train, run, make-shards, bench, report, eval"]


def test_the_console_script_runs_the_trainers_door(tmp_path):
    printed = maskcon("train", "--print-config", "--wandb", "disabled", "--output-dir", str(tmp_path / "run"))
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["dataset"] == "digits" and resolved["num_processes"] == 1

"""The `maskcon` console script: the doors of launch/ by name."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
        "error: unknown command 'trian'; known: train, run, make-shards, bench, grid, report, eval"]


def test_bench_without_a_benchmark_lists_them_and_exits_2_as_a_mistake():
    from maskcon.cli import run_bench

    listed = subprocess.run([sys.executable, "launch/bench.py"], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 2 and listed.stdout.startswith("usage: python launch/bench.py {")
    assert listed.stderr.strip().splitlines() == ["error: name a benchmark: one of shards, loader, objectives, "
                                                  "train, job, collectives, gpu, remote"]
    assert run_bench(["--help"]) == 0


def test_the_console_script_runs_the_trainers_door(tmp_path):
    printed = maskcon("train", "--print-config", "--wandb", "disabled", "--output-dir", str(tmp_path / "run"))
    assert printed.returncode == 0, printed.stderr
    resolved = yaml.safe_load(printed.stdout)
    assert resolved["dataset"] == "digits" and resolved["num_processes"] == 1


def test_advice_names_the_command_that_runs_where_it_is_given_and_followed_it_repairs(tmp_path):
    """verify run from a folder without launch/ (through `maskcon`) names `maskcon make-shards`; from a clone's
    root, `python launch/make_shards.py`. Run as said, the command makes the damaged folder whole."""
    from maskcon import shards

    out = tmp_path / "digits"
    shards.create("digits", None, out, workers=1)
    tar = out / "train" / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-512])
    verified = subprocess.run([str(SCRIPT), "make-shards", "verify", str(out)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    said = verified.stderr.strip().splitlines()[-1]
    assert verified.returncode == 1 and said.endswith(f"re-create them with maskcon make-shards create digits --out "
                                                      f"{out} --overwrite"), verified.stderr
    from_root = subprocess.run([sys.executable, "launch/make_shards.py", "verify", str(out)],
                               cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert from_root.stderr.strip().splitlines()[-1].endswith(
        f"re-create them with python launch/make_shards.py create digits --out {out} --overwrite"), from_root.stderr
    command = said.split("re-create them with ", 1)[1].split()
    repaired = subprocess.run([str(SCRIPT), *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert command[0] == "maskcon" and repaired.returncode == 0, repaired.stderr
    assert shards.verify(out, workers=1) == []


def _group(leader: int) -> list[int]:
    """The live processes of the process group `leader` leads (zombies left for their parent to reap aside)."""
    import psutil

    found = []
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == leader and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("bench, options, started", [("collectives", ["--repeats", "3000"], 3),  # 2 gloo processes
                                                     ("remote", ["--images", "3000"], 2)])         # the S3 server
def test_a_stop_signal_ends_a_benchmark_with_every_process_it_started(bench, options, started):
    process = subprocess.Popen([sys.executable, "launch/bench.py", bench, *options], cwd=Path(__file__).parents[1],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_group(process.pid)) < started:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: ")
    for _ in range(100):
        if not _group(process.pid):
            break
        time.sleep(0.1)
    assert _group(process.pid) == []

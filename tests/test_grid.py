"""launch/grid.py: a W&B grid sweep run here without a server, point after point, as W&B's agent runs each."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from maskcon import grid
from tests.test_sweeps import ALL_SWEEPS, agent_command, load

ROOT = Path(__file__).resolve().parents[1]
DOOR = ROOT / "launch" / "grid.py"
TINY = ["--processes", "1", "--image-size", "8", "--queue-size", "128", "--eval-batch-size", "128",
        "--warmup-epochs", "0.5", "--log-every", "2", "--loader-threads", "1", "--eval-untrained", "false",
        "--wandb", "disabled"]


@pytest.mark.parametrize("path", ALL_SWEEPS, ids=lambda path: path.stem)
def test_each_point_runs_what_a_wandb_agent_runs_in_a_folder_of_its_own(path):
    sweep = load(path)
    found = grid.points(sweep)
    assert len(found) == math.prod(len(spec.get("values", [None])) for spec in sweep["parameters"].values())
    names = {grid.point_name(point, sweep) for point in found}
    assert len(names) == len(found)                          # no two points share a run folder
    for point in found:
        line = grid.command(sweep, point, ["--epochs", "1"], Path("runs/x"))
        agent = agent_command(sweep, point)                  # W&B's own way: /usr/bin/env python PROGRAM ARGS
        assert line[1] == str(ROOT / agent[2]) and line[2:2 + len(agent) - 3] == agent[3:]
        assert line[2 + len(agent) - 3:] == ["--epochs", "1", "--output-dir", "runs/x", "--resume", "auto"]


def _sweep(tmp_path: Path, seeds: list[int]) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "program": "launch/run.py", "method": "grid",
                                    "command": ["${env}", "${interpreter}", "${program}", "${args}"],
                                    "parameters": {"dataset": {"value": "digits"}, "global_batch": {"value": 64},
                                                   "seed": {"values": seeds}}}))
    return path


def _grid(tmp_path: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(DOOR), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.slow
def test_a_grid_runs_every_point_and_the_same_command_skips_the_finished_ones(digits_shards, tmp_path):
    sweep = _sweep(tmp_path, [0, 1])
    options = ["--shards", str(digits_shards), "--max-steps", "2", *TINY]
    first = _grid(tmp_path, str(sweep), *options)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    # --max-steps 2 is not the digits' full recipe: the report needs --all to show these points; the command is
    # the installed one, as this folder holds no launch/report.py
    assert err.strip().splitlines()[-1] == "every point done: maskcon report runs/tiny --all"
    runs = tmp_path / "runs" / "tiny"
    assert sorted(path.name for path in runs.iterdir()) == ["grid.yaml", "seed-0", "seed-1"]
    for seed in (0, 1):
        config = yaml.safe_load((runs / f"seed-{seed}" / "config.yaml").read_text())
        assert (config["seed"], config["global_batch"], config["dataset"]) == (seed, 64, "digits")
        assert json.loads((runs / f"seed-{seed}" / "results.json").read_text())["step"] == 2
    env = {**os.environ, "WANDB_MODE": "disabled"}      # the same grid through the `maskcon` command
    again = subprocess.run([str(Path(sys.executable).parent / "maskcon"), "grid", str(sweep), *options], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    err = again.stderr
    assert again.returncode == 0 and "2 points into runs/tiny, 2 done before" in err, err[-3000:]
    assert "training maskcon" not in err
    assert err.strip().splitlines()[-1] == "every point done: maskcon report runs/tiny --all"
    other = _grid(tmp_path, str(sweep), *[("3" if option == "2" else option) for option in options])
    _, err = other.communicate(timeout=300)       # its points would be taken for done: refused in one line
    lines = err.strip().splitlines()
    assert other.returncode == 2 and lines[-1].startswith("error: runs/tiny holds the points of "), err[-3000:]
    assert "--max-steps 2" in lines[-1] and "--runs" in lines[-1]
    spelled = [options[0] + "=" + options[1], *options[4:], *options[2:4]]    # --shards=X, --max-steps 2 last
    listed = _grid(tmp_path, str(sweep), *spelled, "--dry-run")
    out, err = listed.communicate(timeout=300)      # the same options: its points are done
    assert listed.returncode == 0 and out.splitlines() == ["[1/2] seed-0: done", "[2/2] seed-1: done"], err
    # what a resumed run may change (how often it logs, W&B) does not make the points others: still done
    logging = [option for option in options if option not in ("--wandb", "disabled")]
    logging[logging.index("--log-every") + 1] = "5"
    listed = _grid(tmp_path, str(sweep), *logging, "--dry-run")
    out, err = listed.communicate(timeout=300)
    assert listed.returncode == 0 and out.splitlines() == ["[1/2] seed-0: done", "[2/2] seed-1: done"], err
    sweep.write_text(sweep.read_text().replace("value: 64", "value: 32"))
    for extra in ([], ["--dry-run"]):               # the points ran with global_batch 64: not done for this file
        changed = _grid(tmp_path, str(sweep), *options, *extra)
        out, err = changed.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert changed.returncode == 2 and out == "" and len(lines) == 1, err[-3000:]
        assert lines[0] == (f"error: {Path('runs/tiny/seed-0')} ran with other values than {sweep} now gives "
                            f"(global_batch 64 -> 32); restore the sweep file, or give the changed grid a folder "
                            f"of its own with --runs")


def test_an_added_option_the_grid_sets_itself_is_refused_in_one_line(tmp_path):
    """--output-dir and --resume are each point's own, and a swept parameter added to every point would train
    one value in folders named after the others: each refused before anything is written. A parameter of one
    `value` may be overridden."""
    sweep = _sweep(tmp_path, [0, 1])
    for added, said in (
            (["--output-dir", "mine"], "error: --output-dir is the grid's to choose: each point runs in RUNS/POINT; "
                                       "choose RUNS with --runs"),
            (["--resume"], "error: --resume is the grid's: the same grid command continues each unfinished point "
                           "from its newest checkpoint; leave --resume out"),
            (["--resume=auto"], "error: --resume is the grid's"),
            (["--seed", "3"], f"error: --seed is a parameter that {sweep} sweeps (values: 0, 1); leave --seed out, "
                              f"or edit the sweep file")):
        done = _grid(tmp_path, str(sweep), *added, "--dry-run")
        out, err = done.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert done.returncode == 2 and out == "" and len(lines) == 1 and lines[0].startswith(said), (added, err)
    overridden = _grid(tmp_path, str(sweep), "--global-batch", "32", "--dry-run")
    out, err = overridden.communicate(timeout=120)
    assert overridden.returncode == 0 and all("--global-batch 32" in line for line in out.splitlines()), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mine").exists()


def test_a_sweep_that_cannot_run_here_is_one_line(tmp_path):
    for text, wanted in (("method: bayes\nprogram: launch/run.py\nparameters: {seed: {values: [0, 1]}}\n",
                          "only grid sweeps run without W&B's server"),
                         ("method: grid\nprogram: train.py\nparameters: {seed: {values: [0, 1]}}\n", "runs 'train.py'"),
                         ("method: grid\nprogram: launch/run.py\n", "not a W&B sweep"),
                         ("method: grid\nparameters: {seed: {values: [0, 1]}}\n", "names no `program`; a grid runs"),
                         ("method: grid\nprogram: launch/run.py\nparameters: {seed: {values: []}}\n",
                          "parameter seed has an empty list of `values`, so the grid has no point"),
                         ("method: [grid\n", "cannot read the sweep file")):
        (tmp_path / "sweep.yaml").write_text(text)
        done = _grid(tmp_path, "sweep.yaml")
        _, err = done.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and wanted in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_shards_every_point_lacks_are_refused_once_before_any_point_and_dry_run_lists_on_stdout(tmp_path):
    sweep = _sweep(tmp_path, [0, 1, 2])
    text = sweep.read_text().replace("value: digits", "value: cifar100")
    sweep.write_text(text)
    done = _grid(tmp_path, str(sweep), "--shards", str(tmp_path / "nowhere"))
    out, err = done.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: the grid's first point does not pass --check: no complete shards at ")
    assert "maskcon make-shards create cifar100" in lines[0] and not (tmp_path / "runs").exists()
    listed = _grid(tmp_path, str(sweep), "--dry-run")
    out, err = listed.communicate(timeout=120)
    assert listed.returncode == 0 and [line.split(":")[0] for line in out.splitlines()] == [
        "[1/3] seed-0", "[2/3] seed-1", "[3/3] seed-2"], (out, err)
    assert "3 points into runs/tiny, 0 done before" in err and not (tmp_path / "runs").exists()


def test_a_value_of_a_later_point_or_an_option_no_run_knows_is_one_line_before_any_point_runs(tmp_path):
    """Found before the first point trains, not after: a misspelt method in the last point, and a misspelt option
    added to a grid whose folder holds its earlier points (named as such, not as other options)."""
    sweep = _sweep(tmp_path, [0])
    spec = yaml.safe_load(sweep.read_text())
    spec["parameters"]["method"] = {"values": ["maskcon", "grafitt"]}
    sweep.write_text(yaml.safe_dump(spec))
    done = _grid(tmp_path, str(sweep), "--max-steps", "2", *TINY)
    _, err = done.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: point ") and "grafitt" in lines[0] and "nothing ran" in lines[0], err
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    record = {"sweep": str(sweep.resolve()), "options": ["--epochs", "2"], "points": {}}
    (tmp_path / "runs" / "tiny" / "grid.yaml").write_text(yaml.safe_dump(record))
    again = _grid(tmp_path, str(sweep), "--epochs", "2", "--epocs", "3", "--dry-run")
    _, err = again.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1 and "unrecognized arguments: --epocs 3" in lines[0], err
    assert yaml.safe_load((tmp_path / "runs" / "tiny" / "grid.yaml").read_text()) == record


def test_a_runs_folder_that_is_or_lies_inside_a_run_is_refused_before_anything_is_written(tmp_path):
    sweep = _sweep(tmp_path, [0, 1])
    run = tmp_path / "done"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: digits\n")
    (run / "results.json").write_text('{"R@1": 80.0}\n')
    for runs, words in ((run, f"is the run folder {run}"), (run / "grid", f"lies inside the run folder {run}")):
        for dry in ([], ["--dry-run"]):
            done = _grid(tmp_path, str(sweep), "--runs", str(runs), "--max-steps", "2", *TINY, *dry)
            _, err = done.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1 and words in lines[0], err
    assert sorted(path.name for path in run.iterdir()) == ["config.yaml", "results.json"]


@pytest.mark.slow
def test_a_stop_while_the_first_point_is_checked_ends_the_grid_in_one_line_with_nothing_written(tmp_path):
    sweep = _sweep(tmp_path, [0, 1])
    started = _grid(tmp_path, str(sweep), "--max-steps", "2", *TINY, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any("--check" in child.cmdline() for child in psutil.Process(started.pid).children()):
        assert started.poll() is None and time.monotonic() < deadline, started.communicate()
        time.sleep(0.05)
    os.killpg(started.pid, signal.SIGINT)       # Ctrl-C: the grid and its check, one process group
    out, err = started.communicate(timeout=120)
    assert started.returncode == 3 and err.strip().splitlines() == [
        "stopped before the first point ran; run the same command again to start"], err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_name_is_one_folder_under_runs(tmp_path):
    sweep = _sweep(tmp_path, [0])
    sweep.write_text(sweep.read_text().replace("name: tiny", "name: ../../elsewhere"))
    listed = _grid(tmp_path, str(sweep), "--dry-run")
    out, err = listed.communicate(timeout=120)
    into = Path(err.split(" point into ")[1].split(",")[0])   # one point
    assert listed.returncode == 0 and into.parent == Path("runs") and not into.name.startswith("."), err
    assert f"--output-dir {into / 'point'} " in out      # one value each: the one point is 'point'


@pytest.mark.slow
def test_a_stop_ends_the_running_point_with_a_checkpoint_and_the_grid_continues_from_it(digits_shards, tmp_path):
    sweep = _sweep(tmp_path, [0, 1])
    options = ["--shards", str(digits_shards), "--epochs", "2", *TINY]
    started = _grid(tmp_path, str(sweep), *options)
    metrics = tmp_path / "runs" / "tiny" / "seed-0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert started.poll() is None and time.monotonic() < deadline, started.communicate()[1][-3000:]
        time.sleep(0.2)
    below = psutil.Process(started.pid).children(recursive=True)
    started.send_signal(signal.SIGTERM)                      # `kill PID` of the grid alone
    out, err = started.communicate(timeout=300)
    assert started.returncode == 3, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped at point 1 of 2 (seed-0)")
    said = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step ")]
    assert len(said) == 1 and said[0].endswith("; run the grid's command again to continue it"), out[-3000:]
    assert list((metrics.parent / "checkpoints").glob("step-*")) and not (metrics.parent / "results.json").exists()
    assert not (tmp_path / "runs" / "tiny" / "seed-1").exists()
    _, left = psutil.wait_procs(below, timeout=30)
    assert not left
    listed = _grid(tmp_path, str(sweep), *options, "--dry-run")
    out, _ = listed.communicate(timeout=120)
    step = sorted((metrics.parent / "checkpoints").glob("step-*"))[-1].name
    assert out.splitlines()[1] == f"    continues from {step} (or an older intact checkpoint)", out
    assert out.splitlines()[2].startswith("[2/2] seed-1: ") and len(out.splitlines()) == 3, out
    again = _grid(tmp_path, str(sweep), *options)
    out, err = again.communicate(timeout=900)
    assert again.returncode == 0 and "resumed from" in out, err[-3000:]
    for seed in (0, 1):
        assert json.loads((tmp_path / "runs" / "tiny" / f"seed-{seed}" / "results.json").read_text())["step"] == 44


def test_ctrl_c_while_the_grid_loads_is_one_line_and_exit_3(tmp_path):
    from tests.conftest import stop_while_loading

    sweep = _sweep(tmp_path, [0, 1])
    status, _, err = stop_while_loading(["launch/grid.py", str(sweep), "--runs", str(tmp_path / "runs")],
                                        env={**os.environ, "WANDB_MODE": "disabled"})
    assert status == 3 and len(err.strip().splitlines()) == 1 and err.startswith("stopped "), err
    assert not (tmp_path / "runs").exists()

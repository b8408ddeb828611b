"""Stopping a run as people and schedulers do, with real process trees and real signals: `launch/run.py` of
two gloo processes stopped by SIGTERM (its pid alone, its process group) and Ctrl-C (SIGINT to its group),
SIGKILL of the door, a second Ctrl-C, one writer per run folder, and a start that failed."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 1437 // 64          # digits' train split at a global batch of 64
EPOCHS = 2
RUN = ["--epochs", str(EPOCHS), "--image-size", "8", "--global-batch", "64", "--queue-size", "128",
       "--eval-batch-size", "128", "--warmup-epochs", "0.5", "--log-every", "2", "--loader-threads", "1",
       "--eval-untrained", "false", "--eval-every", "2", "--checkpoint-every", "0"]
GRACE_S = 60            # every process of the run has ended this long after the signal
STOPPED, AT_ONCE = 3, 130   # README's exit statuses of a stop with its checkpoint and of a second Ctrl-C

pytestmark = pytest.mark.slow


def environment() -> dict:
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")


def door(args: list[str], processes: int = 2, output=subprocess.PIPE) -> subprocess.Popen:
    """`python launch/run.py` in a process group of its own, as a shell starts a command."""
    return subprocess.Popen([sys.executable, "launch/run.py", "--processes", str(processes), *args], cwd=ROOT,
                            env=environment(), stdout=output, stderr=output, text=True, start_new_session=True)


def tree(pid: int) -> dict[int, str]:
    """Every process below PID (read with ps), with its start time: a pid names the same process only as
    long as its start time is the same."""
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,lstart="], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in table.splitlines()]
    below, found = {pid}, {}
    changed = True
    while changed:
        changed = False
        for child, parent, started in rows:
            if int(parent) in below and int(child) not in below:
                below.add(int(child))
                found[int(child)] = started
                changed = True
    return found


def alive(processes: dict[int, str]) -> list[int]:
    """Those of PROCESSES (pid -> start time) that still run."""
    left = []
    for pid, started in processes.items():
        now = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True).stdout
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
        if now.strip() == started.strip() and not state.startswith("Z"):
            left.append(pid)
    return left


def metrics_rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}") and '"loss"' in line]


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could stop it: " + process.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


def training_processes(launcher: subprocess.Popen) -> dict[int, str]:
    """The run's processes once both training processes have started."""
    def both() -> bool:
        return len([pid for pid in tree(launcher.pid) if "launch/train.py" in _command(pid)]) >= 2
    wait_for(both, launcher)
    return tree(launcher.pid)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environment(pid: int) -> dict[str, str]:
    try:
        entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)


def fingerprint(folder: Path) -> list[float]:
    return json.loads((folder / "results.json").read_text())["weights_fingerprint_per_process"]


@pytest.fixture(scope="module")
def uninterrupted(digits_shards, module_folder) -> Path:
    out = module_folder / "whole"
    launcher = door(["--shards", str(digits_shards), *RUN, "--wandb", "disabled", "--output-dir", str(out)])
    _, stderr = launcher.communicate(timeout=900)
    assert launcher.returncode == 0, stderr[-3000:]
    return out


@pytest.mark.parametrize("how", ["SIGTERM to the door's pid", "SIGTERM to its process group",
                                 "SIGINT to its process group"])
def test_a_signalled_run_ends_every_process_with_a_checkpoint_and_resumes_to_the_same_weights(
        digits_shards, uninterrupted, tmp_path, how):
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), *RUN, "--output-dir", str(out)]
    launcher = door(args)
    processes = training_processes(launcher)
    wait_for(lambda: len(metrics_rows(out)) >= 1, launcher)
    signum = signal.SIGINT if "SIGINT" in how else signal.SIGTERM
    if "group" in how:
        os.killpg(launcher.pid, signum)
    else:
        launcher.send_signal(signum)
    sent = time.time()
    stdout, stderr = launcher.communicate(timeout=GRACE_S + 60)
    assert time.time() - sent < GRACE_S
    assert launcher.returncode == STOPPED, stderr[-3000:]
    assert alive(processes) == []
    lines = [line for line in stdout.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1 and f"stopped by {signal.Signals(signum).name} at step " in lines[0], stdout[-3000:]
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    assert 0 < step < EPOCHS * STEPS_PER_EPOCH
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert [path.name for path in saved] == [f"step-{step:08d}"] and str(saved[0]) in lines[0]
    assert lines[0].endswith("; run the same command with --resume added"), lines[0]   # it named --output-dir
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert not (out / "results.json").exists()

    resumed = door([*args, "--resume", "auto"])
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert fingerprint(out) == fingerprint(uninterrupted)


def test_a_killed_door_leaves_no_process_of_the_run_behind(digits_shards, tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "output.log", "w")     # a file: it never blocks a writer
    launcher = door(["--shards", str(digits_shards), *RUN, "--epochs", "20", "--output-dir", str(out)],
                    output=log)
    processes = training_processes(launcher)
    status_folders = {_environment(pid).get("MASKCON_STATUS_DIR") for pid in processes
                      if "launch/train.py" in _command(pid)}
    assert len(status_folders) == 1 and None not in status_folders
    wait_for(lambda: len(metrics_rows(out)) >= 1, launcher)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    killed = time.time()
    while alive(processes) and time.time() < killed + GRACE_S:
        time.sleep(0.5)
    assert alive(processes) == [] and time.time() - killed < GRACE_S
    saved = list((out / "checkpoints").glob("step-*"))   # they stopped as if signalled, before the end
    assert len(saved) == 1 and not (out / "results.json").exists()
    assert metrics_rows(out)[-1]["step"] < 20 * STEPS_PER_EPOCH
    assert not Path(status_folders.pop()).exists()     # the door's folder in /tmp went with it
    log.close()
    said = (tmp_path / "output.log").read_text()       # a stop, told as one: no launcher's failure report
    assert "stopped by the end of launch/run.py" in said and "FAILED" not in said and "Traceback" not in said, said


def test_a_second_ctrl_c_ends_at_once_and_keeps_the_last_checkpoint(digits_shards, tmp_path):
    from maskcon import checkpoints

    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), *RUN, "--epochs", "20", "--checkpoint-every", "1",
            "--output-dir", str(out)]
    launcher = door(args)
    processes = training_processes(launcher)
    wait_for(lambda: (out / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}" / "files.json").exists(), launcher)
    os.killpg(launcher.pid, signal.SIGINT)
    time.sleep(0.2)     # a quick double press
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=GRACE_S)
    assert launcher.returncode == AT_ONCE, stderr[-3000:]
    assert alive(processes) == []
    lines = [line for line in (stdout + stderr).splitlines() if "second SIGINT" in line]
    assert len(lines) == 1 and "Traceback" not in stderr + stdout, stderr[-3000:]
    intact = [path for path in checkpoints.list_checkpoints(out / "checkpoints") if checkpoints.damage(path) is None]
    assert intact and str(intact[-1]) in lines[0]
    # the command named --output-dir: --resume is what it lacks
    assert lines[0].endswith("; run the same command with --resume added"), lines[0]
    resumed = door([*args, "--resume", "--max-steps", str(STEPS_PER_EPOCH + 2)])
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]


def one_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_folder_in_use_refuses_a_second_writer_until_its_run_ends(digits_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), *RUN, "--epochs", "20", "--wandb", "disabled"]
    first = one_process([*args, "--output-dir", str(out)])
    wait_for(lambda: len(metrics_rows(out)) >= 1, first)
    for extra in ([], ["--resume", "auto"], ["--resume"], ["--check"]):
        second = subprocess.run([sys.executable, "launch/train.py", *args, "--output-dir", str(out), *extra],
                                cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, (extra, second.stderr[-3000:])
        assert second.stderr.strip().splitlines() == [second.stderr.strip()], second.stderr[-3000:]
        assert "in use" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    first.send_signal(signal.SIGKILL)     # a stale lock of a dead process never blocks
    first.communicate()
    saved = len(list((out / "checkpoints").glob("step-*")))
    resumed = subprocess.run([sys.executable, "launch/train.py", *args, "--output-dir", str(out), "--resume", "auto",
                              "--max-steps", "3"], cwd=ROOT, env=environment(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert saved == 0 and json.loads((out / "results.json").read_text())["step"] == 3   # it started afresh


def test_the_identical_command_after_a_failed_start_runs(digits_shards, tmp_path):
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not a weights file")
    out = tmp_path / "run"
    command = [sys.executable, "launch/run.py", "--processes", "1", "--shards", str(digits_shards), *RUN,
               "--max-steps", "2", "--pretrained", str(weights), "--output-dir", str(out)]
    failed = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2 and "cannot read pretrained weights" in failed.stderr, failed.stderr[-3000:]
    torch.save(torchvision.models.resnet18().state_dict(), weights)   # the user fixes the file
    again = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == 2


def test_a_failure_inside_a_run_of_the_door_exits_2_in_one_line(digits_shards, tmp_path):
    launcher = door(["--shards", str(digits_shards), *RUN, "--lr", "1e30", "--wandb", "disabled",
                     "--output-dir", str(tmp_path / "run")])
    _, stderr = launcher.communicate(timeout=600)
    assert launcher.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss stopped being finite" in errors[0], stderr[-3000:]


def test_readme_documents_the_exit_statuses_and_how_to_stop():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Stopping a run"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    for status in ("0", "2", str(STOPPED), str(AT_ONCE)):
        assert re.search(rf"^\| `{status}` \|", section, re.MULTILINE), status
    for door_name in ("Ctrl-C", "kill", "docker stop -t", "scancel"):
        assert door_name in section


def test_a_stop_during_the_untrained_evaluation_resumes_from_step_0_to_the_same_weights(digits_shards, tmp_path):
    args = ["--shards", str(digits_shards), *RUN, "--eval-untrained", "true", "--max-steps", "6"]
    whole = door([*args, "--wandb", "disabled", "--output-dir", str(tmp_path / "whole")])
    _, stderr = whole.communicate(timeout=900)
    assert whole.returncode == 0, stderr[-3000:]
    out = tmp_path / "run"
    launcher = door([*args, "--output-dir", str(out)])
    wait_for(lambda: (out / "wandb_run_id").exists(), launcher)   # next: the untrained evaluation, the bank fill
    os.killpg(launcher.pid, signal.SIGINT)
    stdout, stderr = launcher.communicate(timeout=GRACE_S + 60)
    assert launcher.returncode == STOPPED and "stopped by SIGINT at step 0" in stdout, stderr[-3000:]
    assert "SIGINT: stopping with a checkpoint" in stderr          # said at once
    resumed = door([*args, "--output-dir", str(out), "--resume"])
    _, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert fingerprint(out) == fingerprint(tmp_path / "whole")
    untrained = [row for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                 if row.get("step") == 0 and "R@1" in row]
    assert len(untrained) == 1                                     # evaluated once, not again on resume


def test_a_stop_while_the_run_is_set_up_ends_before_training_with_nothing_written(digits_shards, tmp_path):
    """Ctrl-C once the run folder is claimed, while the loaders and the learner are made: the run ends before the
    untrained evaluation and the bank fill, without a checkpoint, and the fresh folder it made is gone."""
    out = tmp_path / "new" / "run"
    args = ["--shards", str(digits_shards), *RUN, "--eval-untrained", "true", "--max-steps", "2", "--output-dir",
            str(out)]
    started = one_process(args)
    wait_for(lambda: (out / ".starting").exists(), started)
    started.send_signal(signal.SIGINT)
    stdout, stderr = started.communicate(timeout=GRACE_S + 60)
    assert started.returncode == STOPPED, stdout + stderr[-3000:]
    assert "SIGINT: stopping before training begins" in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "stopped by SIGINT before training began; nothing was written", stderr
    assert "untrained" not in stdout and not (tmp_path / "new").exists()
    again = one_process(args)
    _, stderr = again.communicate(timeout=900)
    assert again.returncode == 0 and json.loads((out / "results.json").read_text())["step"] == 2, stderr[-3000:]


def test_check_refuses_a_folder_of_another_run_as_the_run_would(digits_shards, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    checked = subprocess.run([sys.executable, "launch/run.py", "--processes", "2", "--shards", str(digits_shards),
                              *RUN, "--output-dir", str(out), "--check"], cwd=ROOT, env=environment(),
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 2 and checked.stderr.strip().splitlines() == [checked.stderr.strip()]
    assert "holds another run's files" in checked.stderr



def test_a_stop_while_the_launcher_starts_before_any_training_process_is_one_line_and_exit_3(digits_shards, tmp_path):
    started = door(["--shards", str(digits_shards), *RUN, "--output-dir", str(tmp_path / "run")], processes=1)
    deadline = time.monotonic() + 120
    launcher = None
    while launcher is None:      # accelerate's launcher is up, and has started no training process yet
        assert started.poll() is None and time.monotonic() < deadline, started.communicate()
        try:
            below = psutil.Process(started.pid).children()
            launcher = below[0] if below and not below[0].children() else None
        except psutil.NoSuchProcess:    # a short-lived child of the door's check ended meanwhile
            launcher = None
    os.killpg(started.pid, signal.SIGINT)       # Ctrl-C: the door's group (the launcher has a session of its own)
    out, err = started.communicate(timeout=GRACE_S + 60)
    assert started.returncode == STOPPED and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGINT"), err[-3000:]


@pytest.mark.parametrize("given, auto, advice", [
    ((False, None), False, "resume with the same command and --output-dir RUN --resume"),   # a folder of its own
    ((True, None), False, "run the same command with --resume added"),
    ((True, None), True, "run the same command with --resume auto added"),
    ((True, "newest"), False, "run the same command again to continue it"),
    ((True, "newest"), True, "run the same command with --resume auto in place of --resume"),   # none intact?
    ((True, "auto"), True, "run the same command again to continue it"),
    ((True, "old/checkpoints/step-00000010"), False,
     "run the same command with --resume in place of --resume old/checkpoints/step-00000010"),
])
def test_the_way_on_adds_to_the_command_only_what_it_lacks(monkeypatch, given, auto, advice):
    from pathlib import Path

    from maskcon.stopping import GRID_ENV, how_to_continue

    monkeypatch.delenv(GRID_ENV, raising=False)
    assert how_to_continue(Path("RUN"), auto=auto, given=given) == advice
    assert how_to_continue(None, auto=auto, given=given) == "run the same command again"   # stopped before its folder
    monkeypatch.setenv(GRID_ENV, "1")
    assert how_to_continue(Path("RUN"), auto=auto, given=given) == "run the grid's command again to continue it"

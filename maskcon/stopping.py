"""Stopping a run the way people and schedulers do, and losing nothing: both sides of one protocol.

The trainer's side (`StopRequest`, one per training process, installed first thing by `launch/train.py`):
SIGTERM, SIGINT (Ctrl-C) and SIGHUP all mean "finish the step, agree across processes, write a checkpoint,
say so in one line, exit EXIT_STOPPED". The loop reads the request at its stop votes
(`failures.agree_to_stop`). A repeated SIGTERM or SIGHUP changes nothing (launchers repeat them while the
checkpoint is being written); a second SIGINT ends the process at once (EXIT_AT_ONCE), leaving the last
intact checkpoint as it was. A trainer started by a door also watches that door (LAUNCHER_ENV): when the
door has ended, even by SIGKILL, the trainer stops as if signalled, so no orphan trains on.

The door's side (`supervise`, used by `launch/run.py`): it starts `accelerate launch` in a session of its
own, so a terminal's Ctrl-C or a `kill` of the door's process group reaches the door alone, and passes every
stop signal on to the training processes themselves (not to Accelerate's launcher, which would end them after
a few seconds), then waits for them. Each training process writes its exit status into the door's status
folder (STATUS_ENV); a process that stopped on a signal then exits 0, so the launcher reports no failure,
and the door exits with the status the processes wrote.

Exit statuses (README, "Stopping a run"): 0 finished, 2 a mistake or failure (one line), EXIT_STOPPED a stop
with its checkpoint written, EXIT_AT_ONCE a second Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_STOPPED = 3          # stopped by a signal (or the door's end) with a checkpoint written: resume with --resume
EXIT_AT_ONCE = 130        # a second Ctrl-C: ended at once, without a new checkpoint (128 + SIGINT)
LAUNCHER_ENV = "MASKCON_LAUNCHER"      # "PID:START" of the door that started this process (START: /proc's)
STATUS_ENV = "MASKCON_STATUS_DIR"      # the door's folder where each process writes its exit status
GRID_ENV = "MASKCON_GRID"              # set for a point of launch/grid.py: the grid's command continues it
WATCH_INTERVAL_S = 1.0    # how often a trainer looks whether its door still lives
KILL_AFTER_SIGNALS = 3    # the door's third stop signal SIGKILLs whatever of the run is left


# ------------------------------------------------------------------------------------------ processes


def start_time(pid: int) -> str | None:
    """The start time of process PID in clock ticks since boot (field 22 of /proc/PID/stat), None when
    there is no such process or it has ended (a zombie not yet reaped): with the pid, it names one process
    even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()   # fields after "pid (comm)": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]


def children(pid: int) -> list[int]:
    """The pids of the processes whose parent is PID."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Every process below PID, children first."""
    found, queue = [], [pid]
    while queue:
        below = children(queue.pop(0))
        found += below
        queue += below
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# -------------------------------------------------------------------------------------- the trainer's side


class StopRequest:
    """Whether, and why, this training process was asked to stop. `reason` is None, a signal's name
    ("SIGTERM", "SIGINT", "SIGHUP") or "the end of launch/run.py (pid N)".

    `last_checkpoint`: a callable giving the text of the last intact checkpoint, and `output_dir`: the run's
    folder, both set once the run is built, for the line of a second Ctrl-C."""

    def __init__(self):
        self.reason: str | None = None
        self.checkpointing = False   # whether a stop now ends with a checkpoint: set once the run is built
        self.last_checkpoint: Callable[[], str] = lambda: "no checkpoint was written yet"
        self.output_dir: Path | None = None
        self.given: tuple[bool, str | None] = (False, None)   # the run's command: --output-dir named?, --resume
        self.ended_at: int | None = None   # the last step, once the loop has ended without a stop
        self._lock = threading.Lock()      # reason and ended_at, between the counting thread and the loop
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int] = (-1, -1)   # (the wakeup fd before ours, ours)
        self._watching = False

    @property
    def requested(self) -> bool:
        return self.reason is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopRequest:
        """Take over the stop signals (from the main thread) and watch the door that started this process.

        Each signal is counted by a thread of its own, woken through Python's wakeup file descriptor: the
        second Ctrl-C ends the process even while the main thread waits in a long call (a collective, a
        kernel), where a Python-level handler would run only afterwards, both signals folded into one."""
        readable, writable = os.pipe()
        os.set_blocking(writable, False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, lambda signum, frame: None)   # counted by the thread
        self._wakeup = (signal.set_wakeup_fd(writable, warn_on_full_buffer=False), writable)
        threading.Thread(target=self._count, args=(readable,), name="maskcon-stop-signals", daemon=True).start()
        launcher = os.environ.get(LAUNCHER_ENV)
        if launcher and not self._watching:
            self._watching = True
            pid, started = launcher.split(":", 1)
            threading.Thread(target=self._watch, args=(int(pid), started), name="maskcon-door-watch",
                             daemon=True).start()
        return self

    def ended(self, step: int) -> None:
        """The loop has trained its last step (`step`): a stop from now on changes nothing, and is said so, once
        (also one that came during the final evaluation or checkpoint)."""
        with self._lock:
            self.ended_at, reason = step, self.reason
        if reason is not None:
            self._say_after_end(reason, step)

    @staticmethod
    def _say_after_end(reason: str, step: int) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{reason} came after the last step ({step}): the run ends as it would have, with its results "
                  f"and its last checkpoint", flush=True)

    def ignore_from_now(self) -> None:
        """The process is ending: a stop signal changes nothing any more. Ignored rather than handled, since
        Python's finalization resets handled signals to their default, under which a Ctrl-C in that last second
        would kill a finished run (exit status 130)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        previous_fd, writable = self._wakeup
        signal.set_wakeup_fd(previous_fd)
        os.close(writable)   # the counting thread reads the end of its pipe and ends

    def _count(self, readable: int) -> None:
        with os.fdopen(readable, "rb", buffering=0) as pipe:
            while received := pipe.read(1):
                if received[0] in STOP_SIGNALS:
                    self._received(signal.Signals(received[0]))

    def _received(self, signum: signal.Signals) -> None:
        with self._lock:
            first, ended = self.reason is None, self.ended_at
            if first:
                self.reason = signum.name
        if first:
            if int(os.environ.get("RANK", "0")) != 0:   # the main process speaks at once, before the processes agree
                return
            if ended is not None:
                self._say_after_end(signum.name, ended)
            elif self.checkpointing:
                print(f"\n{signum.name}: stopping with a checkpoint where the processes next agree (within "
                      f"--log-every steps, or after the evaluation or bank fill under way); a second Ctrl-C ends "
                      f"at once without one", file=sys.stderr, flush=True)
            else:
                print(f"\n{signum.name}: stopping before training begins, once the run is set up; nothing is "
                      f"written", file=sys.stderr, flush=True)
        elif signum == signal.SIGINT:
            self._end_at_once(signum.name)

    def _end_at_once(self, name: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            last = self.last_checkpoint()
            then = how_to_continue(self.output_dir, auto="intact" not in last, given=self.given)
            print(f"\nsecond {name}: ended at once, without a new checkpoint; {last}; {then}",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_status(EXIT_AT_ONCE))

    def _watch(self, pid: int, started: str) -> None:
        while start_time(pid) == started:
            time.sleep(WATCH_INTERVAL_S)
        if self.reason is None:
            self.reason = f"the end of launch/run.py (pid {pid})"


def how_to_continue(output_dir: Path | None, *, auto: bool = False, given: tuple[bool, str | None] = (False, None)
                    ) -> str:
    """What continues a stopped run: the grid's command for a point of launch/grid.py; the same command for a run
    stopped before its folder was known; else the same command with what it lacks of --output-dir and --resume
    (`auto`: --resume auto, for a run that may hold no intact checkpoint). `given`: whether the command named
    --output-dir, and its --resume ("newest" for a bare one, "auto", a path or None)."""
    if os.environ.get(GRID_ENV):
        return "run the grid's command again to continue it"
    if output_dir is None:
        return "run the same command again"
    named, resume = given
    if named and (resume == "auto" or resume == "newest" and not auto):   # the command continues as it stands
        return "run the same command again to continue it"
    if named and resume is None:
        return f"run the same command with --resume{' auto' * auto} added"
    if named:     # a bare --resume that may find no intact checkpoint, or --resume PATH (this run is newer)
        return (f"run the same command with --resume{' auto' * auto} in place of --resume"
                + ("" if resume == "newest" else f" {resume}"))
    return f"resume with the same command and --output-dir {output_dir} --resume{' auto' * auto}"


class Stopped(Exception):
    """A stop signal arrived before the run was built: nothing to save; the message is the one line."""


REQUEST = StopRequest()   # the one of this process; installed by `cli.run_train`


def exit_status(code: int) -> int:
    """What this training process exits with: CODE, also written to the door's status folder when a door
    started it; a stop on a signal is then 0 (also when the door has gone), so Accelerate's launcher sees no
    failure, ends the other processes no sooner than they end themselves and prints no failure report."""
    folder = os.environ.get(STATUS_ENV)
    if not folder:
        return code
    pid, _, started = os.environ.get(LAUNCHER_ENV, "").partition(":")
    quiet = 0 if code in (EXIT_STOPPED, EXIT_AT_ONCE) else code   # a stop is no failure to Accelerate's launcher
    if pid.isdigit() and start_time(int(pid)) != started:   # the door has gone: nobody reads a status
        shutil.rmtree(folder, ignore_errors=True)             # its folder would stay behind in /tmp
        return quiet
    rank = os.environ.get("RANK", "0")
    partial = Path(folder) / f".{rank}.partial"
    try:
        partial.write_text(str(code))
        os.replace(partial, Path(folder) / rank)
    except OSError:   # the door has gone (its folder with it): nobody reads the status
        pass
    return quiet


# ----------------------------------------------------------------------------------------- the door's side


def interrupt_once(stops: list[str]) -> Callable:
    """A handler for STOP_SIGNALS that makes a stop end a command as Ctrl-C does: the first one is recorded in
    `stops` (its name) and raises KeyboardInterrupt; the ones after it do nothing, so that the clean-up runs whole
    (a handler that does nothing, not SIG_IGN: one may be pending already)."""
    def handler(signum, frame) -> None:
        stops.append(signal.Signals(signum).name)
        for number in STOP_SIGNALS:
            signal.signal(number, lambda number, frame: None)
        raise KeyboardInterrupt(stops[0])
    return handler


def stop_before_start(signum, frame) -> None:
    """A door's handler until it starts the run: end with one line (cli prints the Stopped), nothing written."""
    raise Stopped(f"stopped by {signal.Signals(signum).name} before the run started; nothing was written")


def supervise(command: list[str], environment: dict) -> int:
    """Run COMMAND (`accelerate launch ... launch/train.py ...`) in a session of its own, pass SIGTERM, SIGINT
    and SIGHUP on to its training processes, wait for it, and return the run's exit status: the one its
    processes wrote (rank 0's first), else the launcher's."""
    with tempfile.TemporaryDirectory(prefix="maskcon-status-") as folder:
        me = os.getpid()
        environment = {**environment, LAUNCHER_ENV: f"{me}:{start_time(me)}", STATUS_ENV: folder}
        launcher = subprocess.Popen(command, env=environment, start_new_session=True)
        received: list[int] = []
        early: list[str] = []      # a stop that came before any training process: the launcher was ended

        def forward(signum, frame) -> None:
            received.append(signum)
            if len(received) >= KILL_AFTER_SIGNALS:
                for pid in [launcher.pid, *descendants(launcher.pid)]:
                    _signal(pid, signal.SIGKILL)
                return
            trainers = children(launcher.pid)
            if trainers:
                for pid in trainers:
                    _signal(pid, signum)
            else:   # no training process yet: nothing to save, the launcher ends quietly
                early.append(signal.Signals(signum).name)
                _signal(launcher.pid, signal.SIGTERM)

        returncode = wait_handling_stops(launcher, forward)
        written = _statuses(Path(folder))
    if written:
        return written.get("0", max(written.values()))
    if early:
        print(f"stopped by {early[0]} before the run started; nothing was written", file=sys.stderr)
        return EXIT_STOPPED
    return 128 - returncode if returncode < 0 else returncode   # a launcher ended by a signal: 128 + its number


def wait_handling_stops(process: subprocess.Popen, handler: Callable) -> int:
    """PROCESS's exit status, with `handler` taking STOP_SIGNALS while it runs (the handlers before, after)."""
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        return process.wait()
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)


def _statuses(folder: Path) -> dict[str, int]:
    found = {}
    for path in folder.iterdir():
        if not path.name.startswith("."):
            try:
                found[path.name] = int(path.read_text())
            except (OSError, ValueError):
                continue
    return found

"""Run folders: which folder a run writes into, and which checkpoint it continues from.

A run folder belongs to one run. A run that does not resume refuses a folder that holds another run's
files (RUN_FILES), so nothing of that run is overwritten; a run without --output-dir gets a folder of its
own, made with one atomic mkdir (a numbered suffix when the name is taken), so runs started together never
share one. --resume chooses the checkpoint:

    --resume            the newest intact checkpoint in OUTPUT_DIR/checkpoints; an error when there is none
    --resume auto       the same when there is one, else a fresh start in OUTPUT_DIR (what a requeued job
                        wants: `--output-dir runs/$SLURM_JOB_ID --resume auto`); a folder that holds a
                        finished run (results.json, backbone.pt) but no checkpoint is refused
    --resume PATH       PATH is a run folder (its newest intact checkpoint) or one checkpoint folder; the
                        run writes into that run's folder, or into --output-dir when given (then a new one)

One writer per folder: the main process of a run holds an exclusive lock on RUN/run.lock (`fcntl.flock`) for its
whole life, with its host and pid written in the file. The system releases it when the process ends, however
it ends, so a lock of a dead process never blocks; a second run, resume or orphan on a folder in use is
refused naming the holder. A fresh start marks its folder (START_MARK) until its first checkpoint or metrics
row. A start whose run could not be built (bad input) removes what it wrote, and the folder when it made it
(`abandon_start`); one that ended otherwise before training (killed, or failing in its first steps) leaves the
mark, and the same command then takes the folder over.

The decision is made on the main process and shared with all processes (claim_everywhere).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskcon import checkpoints, dist, failures
from maskcon.shard_format import data_in
from maskcon.errors import UserError, WriteFailed, file_in_the_way
from maskcon.files import nearest_existing
from maskcon.stopping import LAUNCHER_ENV

RESUME_NEWEST = "newest"  # the value of a bare --resume
RESUME_AUTO = "auto"
# The files of a run folder
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step-XXXXXXXX
CONFIG = "config.yaml"       # the resolved record of the run
METRICS = "metrics.jsonl"    # a row per logging point and evaluation
CONSOLE = "console.log"      # what the main process printed
RESULTS = "results.json"     # the final figures
BACKBONE_FILE = "backbone.pt"  # the trained encoder with its metadata (maskcon.backbone)
WANDB_RUN_ID, WANDB_DIR = "wandb_run_id", "wandb"
# What a run writes into its folder; a folder holding any of them belongs to a run.
RUN_FILES = (CONFIG, METRICS, RESULTS, BACKBONE_FILE, WANDB_RUN_ID, WANDB_DIR, CHECKPOINTS)
RUN_PICTURES = ("retrievals-*.png", "embedding-*.png")
FINISHED_FILES = (RESULTS, BACKBONE_FILE)  # written when a run ends (finished, or at --max-steps)
GRID_FILE = "grid.yaml"   # RUNS/grid.yaml: the record of the grid whose points RUNS holds (maskcon.grid)
DEFAULT_ROOT = Path("runs")
LOCK = "run.lock"           # held by the run writing into the folder (see the module's text)
START_MARK = ".starting"    # a fresh start that has not trained yet; removed at its first row or checkpoint
# What a start writes before training: taken over with the folder when that start failed.
START_FILES = (CONFIG, CONSOLE, METRICS, WANDB_RUN_ID, WANDB_DIR, *RUN_PICTURES)

_held: dict[Path, int] = {}  # folder (resolved) -> descriptor of its lock file, held by this process


@dataclass(frozen=True)
class RunFolder:
    path: Path  # where the run writes
    resume_from: Path | None  # the checkpoint folder it continues from; None: a fresh start


def default_base(dataset: str, method: str, when: float | None = None) -> Path:
    """runs/DATASET-METHOD-YYYYmmdd-HHMMSS (local time `when`, default now): the name new_run_folder() takes
    when it is free."""
    return DEFAULT_ROOT / f"{dataset}-{method}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}"


def new_run_folder(base: Path) -> Path:
    """Create BASE, or BASE-2, BASE-3, ... when taken, with one mkdir each (atomic: of two runs asking at
    once, exactly one gets each name); return the folder made."""
    base.parent.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        path = base if number == 1 else base.with_name(f"{base.name}-{number}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def run_files(folder: Path) -> list[str]:
    """The names of the run files in FOLDER (RUN_FILES, then pictures), [] when it holds none."""
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).exists()]
    return found + sorted(path.name for pattern in RUN_PICTURES for path in folder.glob(pattern))


def claim(output_dir: str | Path | None, resume: str | None, *, default: Path,
          log: Callable[[str], None]) -> RunFolder:
    """The folder a run writes into and the checkpoint it continues from (see the module's text).

    output_dir: --output-dir (None: a new folder named after `default`); resume: --resume (None, RESUME_NEWEST,
    RESUME_AUTO or a path). Creates the folder when the run starts afresh; in a folder it resumes it only
    finishes a checkpoint replacement that a stopped run left half done (checkpoints.restore_replaced).
    UserError (one line) when the folder holds another run or there is nothing to resume.
    """
    if resume is None:
        if output_dir is None:
            folder = new_run_folder(default)
            hold(folder)
            _mark_start(folder)
            return RunFolder(folder, None)
        return RunFolder(_fresh_folder(Path(output_dir), log, None), None)
    writer = _writer(output_dir, resume)
    held = writer is not None and (writer.is_dir() or resume == RESUME_AUTO)
    lock_made = held and not (writer / LOCK).exists() and writer.resolve() not in _held
    if writer is not None:
        check_place(writer)
    if held:
        hold(writer)   # before anything in the folder is read or repaired
    try:
        run, checkpoint = resume_point(output_dir, resume, log)
    except UserError:
        if lock_made:  # a refused resume leaves the folder as it found it
            release(writer)
            (writer / LOCK).unlink(missing_ok=True)
        raise
    if resume in (RESUME_NEWEST, RESUME_AUTO):
        if checkpoint is None:  # --resume auto with nothing to continue
            run.mkdir(parents=True, exist_ok=True)
            _take_over_failed_start(run, log)
            _mark_start(run)
            log(f"--resume auto: no checkpoint in {run / CHECKPOINTS}; starting afresh")
        return RunFolder(run, checkpoint)
    if output_dir is None:
        if run is None:
            raise UserError(f"--resume {resume}: the checkpoint lies outside a run folder; name the folder to "
                            f"write into with --output-dir")
        return RunFolder(run, checkpoint)
    if not starts_in_new_folder(output_dir, resume):
        return RunFolder(Path(output_dir), checkpoint)
    return RunFolder(_fresh_folder(Path(output_dir), log, resume), checkpoint)  # continued in a folder of its own


def resume_point(output_dir: str | Path | None, resume: str, log: Callable[[str], None], *,
                 repair: bool = True) -> tuple[Path | None, Path | None]:
    """(the run folder that --resume RESUME continues, the checkpoint it continues from) as claim() reads
    them: the run is None for a checkpoint outside a run folder, the checkpoint None for --resume auto with
    none yet. UserError (one line) where claim() refuses to resume. With repair=False nothing is written
    (the pre-flight check); otherwise a checkpoint replacement that a stopped run left half done is finished
    first (checkpoints.restore_replaced)."""
    def newest(root: Path) -> Path | None:
        if repair:
            checkpoints.restore_replaced(root)
        return checkpoints.newest_intact(root, log)

    if resume not in (RESUME_NEWEST, RESUME_AUTO):
        return _checkpoint_at(Path(resume), newest)
    flag = "--resume" if resume == RESUME_NEWEST else "--resume auto"
    if output_dir is None:
        raise UserError(f"{flag} needs the folder of the run to continue: pass --output-dir RUN")
    folder = Path(output_dir)
    checkpoint = newest(folder / CHECKPOINTS)
    if checkpoint is not None:
        return folder, checkpoint
    finished = [name for name in FINISHED_FILES if (folder / name).exists()]
    if finished:
        raise UserError(f"{flag}: {folder} holds a finished run ({', '.join(finished)}) and no checkpoint "
                        f"to continue from; start anew in a new --output-dir, without --resume")
    if resume == RESUME_NEWEST:
        if run_files(folder):   # a run that ended before its first checkpoint: only a fresh start is left
            raise UserError(f"--resume: no checkpoint in {folder / CHECKPOINTS} (the run there ended before its "
                            f"first one); start it afresh with --resume auto, or choose a new --output-dir")
        raise UserError(f"--resume: no checkpoint in {folder / CHECKPOINTS}; start without --resume, or pass "
                        f"--resume auto to start afresh when there is none")
    return folder, None


def check_place(folder: Path) -> None:
    """Refuse FOLDER for a run of its own when it is a grid's folder or lies inside another run's folder: the
    run would mix its files with theirs, and the report would count one and leave out the others."""
    if (folder / GRID_FILE).exists():
        raise UserError(f"{folder} holds a grid ({GRID_FILE}); a run needs a folder of its own: choose another "
                        f"--output-dir than the grid's")
    run = enclosing_run(folder)
    if run is not None:
        raise UserError(f"{folder} lies inside the run folder {run}; choose an --output-dir outside it")
    if not run_files(folder):     # a run's own folder holds pictures: it is no dataset source
        for place in (Path(folder), *Path(os.path.abspath(folder)).parents):
            held = data_in(place, sources=place == Path(folder))
            if held is not None:
                where = "holds" if place == Path(folder) else f"lies inside {place}, which holds"
                raise UserError(f"{folder} {where} {held}; a run writes its checkpoints and pictures in a folder "
                                f"of its own: choose another --output-dir")


def enclosing_run(folder: Path, *, itself: bool = False) -> Path | None:
    """The run folder that FOLDER lies inside (or is, with `itself`): one that holds a run's options beside its
    figures or its lock, not merely folders such as wandb/ or checkpoints/ that other tools make too."""
    for candidate in [*([Path(folder)] if itself else []), *Path(os.path.abspath(folder)).parents]:
        if (candidate / CONFIG).is_file() and any((candidate / name).exists() for name in (METRICS, RESULTS, LOCK)):
            return candidate
    return None


def check_fresh(folder: Path, resume: str | None) -> None:
    """The refusal a fresh start in FOLDER (of a run with --resume RESUME: None, or a path continued in FOLDER)
    would meet (another run's files, not those of a start that ended before training), read without writing:
    for --check and launch/run.py's pre-check."""
    check_place(folder)
    if (folder / START_MARK).exists() and not checkpoints.list_checkpoints(folder / CHECKPOINTS):
        return
    found = run_files(folder)
    if found:
        raise _holds_another_run(folder, found, resume)


def _holds_another_run(folder: Path, found: list[str], resume: str | None) -> UserError:
    """The refusal of FOLDER, which holds another run's files, to a fresh start or to --resume PATH continued there."""
    listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    if resume is not None:
        return UserError(f"{folder} holds another run's files ({listed}); --resume {resume} continues in a folder "
                         f"of its own: choose a new or empty --output-dir, or leave --output-dir out to continue in "
                         f"the resumed run's folder")
    return UserError(f"{folder} holds another run's files ({listed}); continue that run with --resume (or "
                     f"--resume auto), or choose a new --output-dir")


def _fresh_folder(folder: Path, log: Callable[[str], None], resume: str | None) -> Path:
    """FOLDER, held for a fresh start (RESUME: None, or the --resume PATH continued in FOLDER): refused when
    another run holds it or its files are there (a start that failed before training excepted: its files are
    taken over)."""
    holder = lock_holder(folder)
    if holder is not None:
        raise in_use(folder, holder)
    check_place(folder)
    if (folder / START_MARK).exists():
        hold(folder)
        _take_over_failed_start(folder, log)
    found = run_files(folder)
    if found:
        release(folder)
        raise _holds_another_run(folder, found, resume)
    hold(folder)
    _mark_start(folder)
    return folder


def starts_in_new_folder(output_dir: str | Path, resume: str | None) -> bool:
    """Whether a run with --output-dir OUTPUT_DIR and --resume RESUME starts in that folder as in a new one (claim()
    then refuses it when another run's files are there): a fresh start, or a --resume PATH continued elsewhere."""
    if resume is None:
        return True
    if resume in (RESUME_NEWEST, RESUME_AUTO):
        return False
    run = _writer(None, resume)
    return run is None or run.resolve() != Path(output_dir).resolve()


def _writer(output_dir: str | Path | None, resume: str) -> Path | None:
    """The folder a run with --resume RESUME writes into, read from the paths alone (None: claim() refuses)."""
    if output_dir is not None:
        return Path(output_dir)
    if resume in (RESUME_NEWEST, RESUME_AUTO):
        return None
    path = Path(resume)
    if (path / checkpoints.FILES_RECORD).exists() or (path / checkpoints.STATE_FILE).exists():
        return path.parent.parent if path.parent.name == CHECKPOINTS else None
    return path.parent if path.name == CHECKPOINTS else path


# ------------------------------------------------------------------------------------ one writer per folder


def hold(folder: Path) -> None:
    """Lock FOLDER (created when missing) for this process until `release` or its end; UserError naming the
    holder when another process holds it. Holding a folder this process holds already changes nothing."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise in_use(folder, lock_holder(folder) or "another process") from None
    os.ftruncate(descriptor, 0)
    door = os.environ.get(LAUNCHER_ENV, "").split(":")[0]
    started_by = f" started by launch/run.py pid {door}" if door else ""
    os.write(descriptor, f"host {socket.gethostname()} pid {os.getpid()}{started_by} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _held[key] = descriptor


def release(folder: Path | None = None) -> None:
    """Give up the lock of FOLDER (every folder this process holds when None)."""
    keys = list(_held) if folder is None else [Path(folder).resolve()]
    for key in keys:
        descriptor = _held.pop(key, None)
        if descriptor is not None:
            os.close(descriptor)


def lock_holder(folder: Path) -> str | None:
    """Who holds FOLDER ("host H pid P since T"), or None when no living process does; writes nothing."""
    if Path(folder).resolve() in _held:
        return None
    try:
        descriptor = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(descriptor, 256).decode(errors="replace").strip() or "another process"
    finally:
        os.close(descriptor)


def in_use(folder: Path, holder: str) -> UserError:
    return UserError(f"{folder} is in use by a run ({holder}); wait for it to end or stop it, or choose "
                     f"another --output-dir")


def _mark_start(folder: Path) -> None:
    (folder / START_MARK).touch()


def mark_trained(folder: Path) -> None:
    """The run in FOLDER has trained (a metrics row or a checkpoint): its files are its own from now on."""
    (Path(folder) / START_MARK).unlink(missing_ok=True)


def _take_over_failed_start(folder: Path, log: Callable[[str], None]) -> None:
    """Remove what a start that failed before training left in FOLDER (it holds START_MARK and no checkpoint)."""
    if _remove_start_files(folder):
        log(f"{folder}: taking over the files of a start that ended before training")


def _remove_start_files(folder: Path) -> bool:
    """Remove START_FILES and START_MARK from FOLDER when it holds the mark and no checkpoint; whether it did."""
    if not (folder / START_MARK).exists() or checkpoints.list_checkpoints(folder / CHECKPOINTS):
        return False
    for pattern in START_FILES:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (folder / START_MARK).unlink()
    return True


def abandon_start(folder: Path, made: Path | None) -> None:
    """A fresh start in FOLDER ended before training (bad input found while the run was built): its files go,
    and the folders the start made (MADE: FOLDER, or the outermost of its parents that it created), so that
    retries leave no empty run folders behind."""
    _remove_start_files(folder)
    release(folder)
    if run_files(folder):
        return
    (folder / LOCK).unlink(missing_ok=True)
    for path in (folder, *folder.parents) if made is not None else ():
        try:
            path.rmdir()
        except OSError:    # something else was put there meanwhile: it stays, and so do the folders above it
            return
        if path == made:
            return


def check_writable(folder: Path) -> None:
    """Refuse a run folder this process could not write in (or create), read without writing: for --check and
    launch/run.py's pre-check, so that no process is started only to fail on its first file."""
    place = nearest_existing(folder)
    if place.is_dir() and not os.access(place, os.W_OK | os.X_OK):
        what = "write in" if place == folder else f"create {folder} in"
        raise UserError(f"cannot {what} {place} (no permission, a read-only file system, or an immutable folder); "
                        f"fix its permissions or choose another --output-dir")


def missing_top(path: Path) -> Path | None:
    """The outermost of PATH and its parents that does not exist (what creating PATH makes); None when PATH exists."""
    top = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        top = candidate
    return top


def _checkpoint_at(path: Path, newest: Callable[[Path], Path | None]) -> tuple[Path | None, Path]:
    """--resume PATH: a run folder, its checkpoints folder, or one checkpoint; (run folder or None, checkpoint)."""
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UserError(f"--resume {path}: {what}; pass a run folder or one of its checkpoints "
                        f"(RUN/{CHECKPOINTS}/step-N), or a bare --resume with --output-dir")
    if (path / checkpoints.FILES_RECORD).exists() or (path / checkpoints.STATE_FILE).exists():
        problem = checkpoints.damage(path)
        if problem is not None:
            raise UserError(f"--resume {path}: the checkpoint is damaged ({problem}); pass an older one, or the "
                            f"run folder to take its newest intact checkpoint")
        return (path.parent.parent if path.parent.name == CHECKPOINTS else None), path
    run = path.parent if path.name == CHECKPOINTS else path
    checkpoint = newest(run / CHECKPOINTS)
    if checkpoint is None:
        raise UserError(f"--resume {path}: no checkpoint in {run / CHECKPOINTS}; pass a run folder that "
                        f"holds one, or start without --resume")
    return run, checkpoint


def claim_everywhere(output_dir: str | None, resume: str | None, *, dataset: str, method: str,
                     log: Callable[[str], None]) -> RunFolder:
    """claim() on the main process (which alone logs and creates folders), its answer on every process.
    Called by all processes at the same point; a refusal raises on all of them."""

    def decide() -> list:
        try:
            claimed = claim(output_dir, resume, default=default_base(dataset, method), log=log)
        except OSError as error:
            blocker = file_in_the_way(error.filename or output_dir or ".")
            if blocker is not None:
                raise UserError(f"{blocker} is a file, not a folder; choose another --output-dir") from None
            raise UserError(f"cannot prepare the run folder {error.filename or output_dir} ({error.strerror}); "
                            f"fix its permissions or choose another --output-dir") from None
        return [str(claimed.path), None if claimed.resume_from is None else str(claimed.resume_from)]

    shared = failures.run_on_main(decide)
    if dist.world_size() > 1:
        from accelerate.utils import broadcast_object_list

        shared = shared or [None, None]
        broadcast_object_list(shared)
    return RunFolder(Path(shared[0]), None if shared[1] is None else Path(shared[1]))


def earlier_results(folder: Path) -> dict:
    """The results.json a run left in FOLDER ({} when none or unreadable): a resumed run keeps what it does
    not measure again (a finished run resumed evaluates nothing more)."""
    try:
        results = json.loads((folder / RESULTS).read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def evaluated_at(folder: Path, step: int) -> dict:
    """The R@K of the last evaluation row at STEP in FOLDER's metrics.jsonl; {} when it holds none."""
    found = {}
    try:
        with open(folder / METRICS) as rows:
            for line in rows:
                try:
                    row = json.loads(line)
                except ValueError:       # a row cut short by a kill: the others stand
                    continue
                if isinstance(row, dict) and row.get("step") == step and "R@1" in row:
                    found = {name: value for name, value in row.items() if name.startswith("R@")}
    except (OSError, UnicodeDecodeError):
        return {}
    return found


def untrained_results(folder: Path) -> dict:
    """untrained_R@K of the run in FOLDER from its metrics.jsonl (the evaluation at step 0, with
    --eval-untrained); {} when it holds none. A run stopped before its end wrote no results.json: its resume
    finds the figures here."""
    return {f"untrained_{name}": value for name, value in evaluated_at(folder, 0).items()}


def write_results(folder: Path, results: dict, *, resumed: bool) -> dict:
    """Write FOLDER/results.json atomically and return what it holds: a resumed run's results extend those it
    found there (or, when a stop left none, the untrained figures of its metrics.jsonl)."""
    content = {**(earlier_results(folder) or untrained_results(folder) if resumed else {}), **results}
    target = folder / RESULTS
    partial = target.with_name(f".{RESULTS}.partial")
    try:
        partial.write_text(json.dumps(content, indent=1))
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise WriteFailed(f"writing {target} failed ({error.strerror}); free space or fix permissions there; "
                        f"the checkpoints are intact") from None
    return content

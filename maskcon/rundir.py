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

The decision is made on the main process and shared with all processes (claim_everywhere).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from maskcon import checkpoints, dist, failures
from maskcon.errors import UserError

RESUME_NEWEST = "newest"  # the value of a bare --resume
RESUME_AUTO = "auto"
CHECKPOINTS = "checkpoints"  # RUN/checkpoints/step-XXXXXXXX
RESULTS = "results.json"
# What a run writes into its folder; a folder holding any of them belongs to a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", RESULTS, "backbone.pt", "wandb_run_id", "wandb", CHECKPOINTS)
RUN_PICTURES = ("retrievals-*.png", "embedding-*.png")
FINISHED_FILES = (RESULTS, "backbone.pt")  # written when a run ends (finished, or at --max-steps)
DEFAULT_ROOT = Path("runs")


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
            return RunFolder(new_run_folder(default), None)
        return RunFolder(_fresh_folder(Path(output_dir)), None)
    run, checkpoint = resume_point(output_dir, resume, log)
    if resume in (RESUME_NEWEST, RESUME_AUTO):
        if checkpoint is None:  # --resume auto with nothing to continue
            run.mkdir(parents=True, exist_ok=True)
            log(f"--resume auto: no checkpoint in {run / CHECKPOINTS}; starting afresh")
        return RunFolder(run, checkpoint)
    if output_dir is None:
        if run is None:
            raise UserError(f"--resume {resume}: the checkpoint lies outside a run folder; name the folder to "
                            f"write into with --output-dir")
        return RunFolder(run, checkpoint)
    folder = Path(output_dir)
    if run is not None and folder.resolve() == run.resolve():
        return RunFolder(folder, checkpoint)
    return RunFolder(_fresh_folder(folder), checkpoint)  # continued in a folder of its own


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
    if resume == RESUME_NEWEST:
        raise UserError(f"--resume: no checkpoint in {folder / CHECKPOINTS}; start without --resume, or pass "
                        f"--resume auto to start afresh when there is none")
    finished = [name for name in FINISHED_FILES if (folder / name).exists()]
    if finished:
        raise UserError(f"--resume auto: {folder} holds a finished run ({', '.join(finished)}) and no checkpoint "
                        f"to continue from; choose a new --output-dir")
    return folder, None


def _fresh_folder(folder: Path) -> Path:
    found = run_files(folder)
    if found:
        listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise UserError(f"{folder} holds another run's files ({listed}); continue that run with --resume "
                        f"(or --resume auto), or choose a new --output-dir")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _checkpoint_at(path: Path, newest: Callable[[Path], Path | None]) -> tuple[Path | None, Path]:
    """--resume PATH: a run folder, its checkpoints folder, or one checkpoint; (run folder or None, checkpoint)."""
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such folder; pass a run folder or one of its checkpoints "
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


def write_results(folder: Path, results: dict, *, resumed: bool) -> None:
    """Write FOLDER/results.json atomically; a resumed run's results extend those it found there."""
    content = {**(earlier_results(folder) if resumed else {}), **results}
    target = folder / RESULTS
    partial = target.with_name(f".{RESULTS}.partial")
    try:
        partial.write_text(json.dumps(content, indent=1))
        os.replace(partial, target)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"writing {target} failed ({error.strerror}); free space or fix permissions there; "
                        f"the checkpoints are intact") from None

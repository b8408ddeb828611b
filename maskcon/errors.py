"""Errors the user can fix: the entry points print them as one line and exit with status 2."""

import argparse
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (a path, a dataset, an option).

    The message is ONE line that says what is wrong and how to fix it; entry points in `launch/` catch
    this, print `error: <message>` to stderr and exit 2, with no traceback.
    """


class WriteFailed(UserError):
    """Writing one of a run's files failed (no space, no permission); what was written before is intact. The
    trainer adds to the line how to continue the run once the cause is fixed."""


class AgreedError(UserError):
    """A UserError that every process of a run raises alike (all processes agreed on it, or learnt it from
    the main process): only the main process prints it, so a run of N processes reports it once."""


class FailedElsewhere(UserError):
    """Raised on a process because another process of the run failed, which reports the failure itself:
    this one exits with status 2 and prints nothing, so the failure is reported once."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one UserError line, no usage dump, and which refuses an option's
    prefix (`--lr-ref 64` is not --lr-reference-batch), so a typo never sets another option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def file_in_the_way(path) -> Path | None:
    """The file that stands where PATH or one of its parents must be a folder; None when there is none."""
    for candidate in (Path(path), *Path(path).parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def door(script: str) -> str:
    """How a command said in advice is typed here: `python launch/SCRIPT.py` where the current folder holds it
    (a clone's root), else the `maskcon` command that installing the package made (`maskcon make-shards`)."""
    if (Path.cwd() / "launch" / f"{script}.py").is_file():
        return f"python launch/{script}.py"
    return f"maskcon {script.replace('_', '-')}"

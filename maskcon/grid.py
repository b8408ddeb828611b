"""A W&B grid sweep run on this machine, without a W&B server: `python launch/grid.py SWEEP.yaml [options]`.

Each point of the grid (the product of every parameter's `values`, or its one `value`, in the file's order) is
the command a W&B agent runs for it, `python PROGRAM --NAME=VALUE ...` (the sweeps' `launch/run.py`: every
GPU of this machine), with the options given after the sweep file added, in a run folder of its own:
RUNS/POINT, where RUNS is --runs (default runs/SWEEP_NAME) and POINT names the values that vary
(`method-grafit_seed-1`). The points run one after another. A point whose folder holds results.json is done
and skipped; any other continues from its newest checkpoint (`--resume auto`), so the same command after a
stop or a failure carries on where the grid was; other options (but those a resumed run may change: W&B, how
often it logs ...), or other values in the sweep file for a point that has run, need a folder of their own
(RUNS/grid.yaml records the grid's options and each point's values). The grid sets --output-dir and --resume
itself, and each swept parameter: added to every point, they are refused.
Before any point runs, every point's options are read as its program reads them, and the first point is checked
(`--check`): a value no run knows, or shards or options that every point shares and that cannot run, are said
once. `--dry-run` lists the points on stdout. `python launch/report.py
RUNS` makes the tables.

Ctrl-C, SIGTERM and SIGHUP go on to the running point, which stops with a checkpoint; then the grid stops
(exit 3, as a stopped run). A point that fails is named and the next one runs; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from maskcon import checkpoints, count, rundir, write_atomic
from maskcon.errors import OneLineParser, UserError, door
from maskcon.stopping import EXIT_AT_ONCE, EXIT_STOPPED, GRID_ENV, wait_handling_stops

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("launch/run.py", "launch/train.py")
GRID_FILE = rundir.GRID_FILE   # RUNS/grid.yaml: the sweep file, the options of the grid and each point's values


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python launch/grid.py", description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           usage="%(prog)s SWEEP.yaml [--runs DIR] [--dry-run] [options added to every point]")
    parser.add_argument("sweep", type=Path, help="a grid sweep file, e.g. launch/sweeps/cifar100-main.yaml")
    parser.add_argument("--runs", type=Path, default=None, help="folder of the points' run folders "
                        "(default: runs/SWEEP_NAME)")
    parser.add_argument("--dry-run", action="store_true", help="print each point's command and state; run nothing")
    return parser


def read_sweep(path: Path) -> dict:
    """The sweep file at PATH, checked: a grid over `parameters`, running one of PROGRAMS; UserError else."""
    try:
        sweep = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"sweep file {path} not found; see launch/sweeps/") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read the sweep file {path} ({str(error).splitlines()[0]})") from None
    if not isinstance(sweep, dict) or not isinstance(sweep.get("parameters"), dict) or not sweep["parameters"]:
        raise UserError(f"{path} is not a W&B sweep (no `parameters`); see launch/sweeps/")
    if sweep.get("method") != "grid":
        raise UserError(f"{path} is a {sweep.get('method')!r} sweep; only grid sweeps run without W&B's server "
                        f"(wandb sweep, then wandb agent)")
    if sweep.get("program") not in PROGRAMS:
        runs = f"runs {sweep['program']!r}" if sweep.get("program") else "names no `program`"
        raise UserError(f"{path} {runs}; a grid runs here when its program is one of {', '.join(PROGRAMS)}")
    for name, spec in sweep["parameters"].items():
        if not isinstance(spec, dict) or not ("value" in spec or isinstance(spec.get("values"), list)):
            raise UserError(f"{path}: parameter {name} has neither `value` nor a list of `values`")
        if spec.get("values") == [] and "value" not in spec:
            raise UserError(f"{path}: parameter {name} has an empty list of `values`, so the grid has no point; "
                            f"give it one value at least")
    return sweep


def points(sweep: dict) -> list[dict]:
    """The grid's points: one dict of parameter values each, the last parameter varying fastest."""
    names = list(sweep["parameters"])
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def point_name(point: dict, sweep: dict) -> str:
    """The folder name of a point: NAME-VALUE of each parameter with several values, joined by `_`."""
    varying = [name for name, spec in sweep["parameters"].items() if "values" in spec and len(spec["values"]) > 1]
    name = "_".join(f"{key}-{point[key]}" for key in varying) or "point"
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", name)


def command(sweep: dict, point: dict, extra: list[str], folder: Path) -> list[str]:
    """What a W&B agent runs for `point` (`${env} ${interpreter} ${program} ${args}`: --NAME=VALUE), with
    `extra`, the point's run folder and --resume auto added."""
    return [sys.executable, str(ROOT / sweep["program"]), *(f"--{name}={value}" for name, value in point.items()),
            *extra, "--output-dir", str(folder), "--resume", "auto"]


def main(argv: list[str]) -> int:
    args, extra = _parser().parse_known_args(argv)
    sweep = read_sweep(args.sweep)
    runs = args.runs or rundir.DEFAULT_ROOT / re.sub(r"[^A-Za-z0-9._=-]+|^\.+", "-", str(sweep.get("name") or
                                                                                          args.sweep.stem))
    _check_added(sweep, args.sweep, extra)
    grid = [(point, runs / point_name(point, sweep)) for point in points(sweep)]
    _check_options(sweep, [(folder.name, command(sweep, point, extra, folder)) for point, folder in grid])
    _check_runs_folder(runs)
    record = _claim(runs, args.sweep, extra, grid)
    done = [folder for _, folder in grid if (folder / rundir.RESULTS).exists()]
    if not args.dry_run:
        try:
            _check_first([command(sweep, point, extra, folder) for point, folder in grid if folder not in done])
        except KeyboardInterrupt:       # the check's process stopped too; nothing ran, nothing was written
            print("stopped before the first point ran; run the same command again to start", file=sys.stderr)
            return EXIT_STOPPED
        runs.mkdir(parents=True, exist_ok=True)
        write_atomic(runs / GRID_FILE, yaml.safe_dump(record, sort_keys=False))
    print(f"{args.sweep}: {count(len(grid), 'point')} into {runs}, {len(done)} done before", file=sys.stderr,
          flush=True)
    listing = sys.stdout if args.dry_run else sys.stderr     # --dry-run's list is its output
    failed = []
    for number, (point, folder) in enumerate(grid, 1):
        line = command(sweep, point, extra, folder)
        if folder in done:
            print(f"[{number}/{len(grid)}] {folder.name}: done", file=listing, flush=True)
            continue
        print(f"[{number}/{len(grid)}] {folder.name}: python {sweep['program']} {' '.join(line[2:])}",
              file=listing, flush=True)
        if args.dry_run:
            newest = checkpoints.list_checkpoints(folder / rundir.CHECKPOINTS)
            if newest:
                print(f"    continues from {newest[-1].name} (or an older intact checkpoint)", file=listing)
            continue
        status = _run_point(line, sweep)
        if status in (EXIT_STOPPED, EXIT_AT_ONCE):
            print(f"stopped at point {number} of {len(grid)} ({folder.name}); run the same command again to continue",
                  file=sys.stderr)
            return status
        if status != 0:
            print(f"point {number} ({folder.name}) failed with exit status {status} (its output is above); the "
                  f"next one runs", file=sys.stderr, flush=True)
            failed.append(folder.name)
    if failed:
        print(f"{len(failed)} of {len(grid)} points failed: {', '.join(failed)}; fix the cause and run the same "
              f"command again (the finished ones are skipped)", file=sys.stderr)
        return 2
    if not args.dry_run:    # options of the grid's own make runs outside the paper's recipes: --all shows them
        print(f"every point done: {door('report')} {runs}{' --all' if extra else ''}", file=sys.stderr)
    return 0


def _check_added(sweep: dict, path: Path, extra: list[str]) -> None:
    """Refuse an added option that each point would override or be overridden by, silently: --output-dir and
    --resume (the grid's own), and a parameter the sweep file gives several values (every point would then
    train the same value, in folders named after the others)."""
    swept = {name.replace("-", "_"): spec["values"] for name, spec in sweep["parameters"].items()
             if "values" in spec and len(spec["values"]) > 1}
    for name in (_name(group) for group in _options(extra) if group[0].startswith("--")):
        option = "--" + name.replace("_", "-")
        if name == "output_dir":
            raise UserError(f"{option} is the grid's to choose: each point runs in RUNS/POINT; choose RUNS with --runs")
        if name == "resume":
            raise UserError(f"{option} is the grid's: the same grid command continues each unfinished point from its "
                            f"newest checkpoint; leave {option} out")
        if name in swept:
            raise UserError(f"{option} is a parameter that {path} sweeps (values: "
                            f"{', '.join(map(str, swept[name]))}); leave {option} out, or edit the sweep file")


def _check_options(sweep: dict, lines: list[tuple[str, list[str]]]) -> None:
    """Every point's options read as its program reads them, before anything runs: a value one point gets
    wrong (a misspelt method in the last point) or an option the grid adds that no run knows is one line
    (UserError) now, not after the points before it have trained."""
    from maskcon.config import parse_config
    from maskcon.launcher import parse_run

    for name, line in lines:
        try:
            parse_run(line[2:]) if sweep["program"] == "launch/run.py" else parse_config(line[2:])
        except UserError as error:
            raise UserError(f"point {name}: {error}; nothing ran") from None


def _check_first(lines: list[str]) -> None:
    """The first point to run, checked (`--check`) before the grid starts: what every point shares (its shards,
    its options) refused once in one line (UserError) rather than by each point in turn."""
    if not lines:
        return
    checked = subprocess.run([*lines[0], "--check"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if checked.returncode != 0:
        said = [line for line in checked.stderr.splitlines() if line.startswith("error: ")] or ["it failed"]
        raise UserError(f"the grid's first point does not pass --check: {said[-1].removeprefix('error: ')}")


def _check_runs_folder(runs: Path) -> None:
    """Refuse a --runs folder that is a run's folder or lies inside one: the grid's record and points would mix
    with that run's files."""
    where = rundir.enclosing_run(runs, itself=True)
    if where is not None:
        raise UserError(f"--runs {runs} {'is' if where == runs else 'lies inside'} the run folder {where}; a grid "
                        f"needs a folder of its own: choose another --runs")


def _claim(runs: Path, sweep: Path, extra: list[str], grid: list[tuple[dict, Path]]) -> dict:
    """The record of RUNS/GRID_FILE for this grid: the sweep, the options and each point's values (with those of
    points the folder holds from earlier). UserError when RUNS holds points run with other options, or a point
    folder whose values the sweep file now gives otherwise: the earlier points would be taken for done."""
    path = runs / GRID_FILE
    earlier = yaml.safe_load(path.read_text()) if path.is_file() else None
    wanted = {"sweep": str(sweep.resolve()), "options": extra, "points": {}}
    if earlier is not None and (earlier.get("sweep"), _defining(earlier.get("options") or [])) != (
            wanted["sweep"], _defining(extra)):
        raise UserError(f"{runs} holds the points of {earlier.get('sweep')} with options "
                        f"{' '.join(earlier.get('options') or []) or '(none)'}; run that grid with the same options, "
                        f"or give this one a folder of its own with --runs")
    wanted["points"] = dict((earlier or {}).get("points") or {})
    for point, folder in grid:
        before = wanted["points"].get(folder.name)
        if before is not None and before != point and folder.exists():
            changed = ", ".join(f"{name} {before.get(name)} -> {point.get(name)}"
                                for name in dict.fromkeys([*before, *point]) if before.get(name) != point.get(name))
            raise UserError(f"{folder} ran with other values than {sweep} now gives ({changed}); restore the sweep "
                            f"file, or give the changed grid a folder of its own with --runs")
        wanted["points"][folder.name] = point
    return wanted


def _options(extra: list[str]) -> list[tuple[str, ...]]:
    """The options added to every point, as the runs read them: `--name=value` as `--name value`, in name order."""
    tokens = [part for token in extra for part in (token.split("=", 1) if token.startswith("--") else [token])]
    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return sorted((tuple(group) for group in groups), key=lambda group: group[0])   # repeats keep their order


def _defining(extra: list[str]) -> list[tuple[str, ...]]:
    """The added options that make a point's run another one: all but those a resumed run may change (where
    and how often it logs, evaluates and writes, how fast it runs; config.option's resume="free"). --max-steps
    and --config stay: a point cut short would be taken for done, and a file may hold any option."""
    from maskcon.config import FIELDS, MUST_MATCH_ON_RESUME

    free = set(FIELDS) - MUST_MATCH_ON_RESUME - {"max_steps", "config"}
    return [group for group in _options(extra) if _name(group) not in free]


def _name(group: tuple[str, ...]) -> str:
    """The option of an added `--name value` group as config names it: `--no-eval-untrained` is eval_untrained."""
    from maskcon.config import FIELDS

    name = group[0][2:].replace("-", "_")
    return name[3:] if name.startswith("no_") and name[3:] in FIELDS else name


def _run_point(line: list[str], sweep: dict) -> int:
    """Run one point in a session of its own (its door passes stops on to the training processes), with every
    stop signal this process gets passed on to it; its exit status."""
    env = {**os.environ, "WANDB_RUN_GROUP": str(sweep.get("name") or "grid"),   # the grid's runs, together in W&B
           GRID_ENV: "1"}                                                         # its stop says: the grid continues it
    child = subprocess.Popen(line, env=env, start_new_session=True)
    stops: list[int] = []

    def forward(signum, frame) -> None:
        stops.append(signum)
        child.send_signal(signum)

    status = wait_handling_stops(child, forward)
    if stops and status == 0:     # the stop came as the point finished: it is done, the grid stops anyway
        return EXIT_STOPPED
    return status

"""What the doors in launch/ call: argument handling and one-line errors around the package."""

from __future__ import annotations

import importlib
import os
import sys

from maskcon.errors import AgreedError, FailedElsewhere, OneLineParser, UserError

BENCHMARKS = {
    "shards": "conversion speed: our converter against a plain webdataset.ShardWriter loop",
    "loader": "two-view loading speed: DALI (CPU) against torchvision and an official-style PIL loader",
    "objectives": "time and memory of the MaskCon loss against SelfCon",
    "train": "training images/s and data time: real loader, synthetic batches, official-style loader, a resume",
    "job": "the main job as users start it (accelerate launch), with its figures and the GPU's utilisation",
    "collectives": "bytes per training step moved by the collectives: MoCo's scheme against ours",
    "gpu": "every GPU figure in one command on the ImageNet32 preset, written as a BENCHMARKS.md block",
    "remote": "shards in object storage: staging MB/s against a local copy, first batch on a warm cache",
}


def fail(err: UserError) -> int:
    """Print the one line of a user error (once per run: only the process of rank 0 speaks) and return 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {err}", file=sys.stderr)
    return 2


def run_launch(argv: list[str]) -> int:
    """launch/run.py: check the run in this process, then start its processes; a mistake is one line, 2; a
    stop signal before the start is one line, EXIT_STOPPED."""
    import signal

    from maskcon import stopping

    for signum in stopping.STOP_SIGNALS:   # first: until the run starts, a stop ends the door with one line
        signal.signal(signum, stopping.stop_before_start)
    try:
        from maskcon.launcher import run

        return run(argv)
    except stopping.Stopped as stopped:
        print(stopped, file=sys.stderr)
        return stopping.EXIT_STOPPED
    except UserError as err:
        return fail(err)


def run_train(argv: list[str]) -> int:
    """One process of a run (launch/train.py); its exit status as README's "Stopping a run" lists them, also
    reported to the door that started it (`maskcon.stopping.exit_status`)."""
    from maskcon import stopping

    stopping.REQUEST.install()   # first: a stop signal from here on is honoured, never a traceback
    try:
        return stopping.exit_status(_train_process(argv))
    finally:   # what is left is the interpreter's exit (W&B's included), which no signal should cut short
        stopping.REQUEST.ignore_from_now()


def _train_process(argv: list[str]) -> int:
    """--print-config and --check answer without training; a run stopped by a signal is EXIT_STOPPED."""
    from maskcon.config import parse_config, world_size
    from maskcon.stopping import EXIT_STOPPED, Stopped

    try:
        config = parse_config(argv)
    except UserError as err:   # every process reads the same options: rank 0 speaks for all
        return fail(err)
    try:
        if config.print_config or config.check:
            from maskcon.launcher import report_or_check

            return report_or_check(config, world_size()) if int(os.environ.get("RANK", "0")) == 0 else 0
        from maskcon.train import train

        result = train(config)
    except Stopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stopped, file=sys.stderr)
        return EXIT_STOPPED
    except FailedElsewhere:  # the process that failed prints its own error
        return 2
    except AgreedError as err:  # raised by every process alike: the main process speaks for all
        return fail(err)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.stopped == "preempted":
        return EXIT_STOPPED
    return 0


def _make_shards_parser():
    import argparse
    from pathlib import Path

    from maskcon import shards
    from maskcon.datasets import DATASETS

    parser = OneLineParser(prog="python launch/make_shards.py",
                                     description="Convert a dataset to WebDataset shards, or verify shards.",
                                     epilog=MAKE_SHARDS_EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="convert DATASET read from SRC into shards under OUT")
    create.add_argument("dataset", choices=list(DATASETS))
    create.add_argument("--src", type=Path, help="the folder you downloaded (not needed for digits)")
    create.add_argument("--labels", type=Path, default=None,
                        help="folder of the official label files when they are not in SRC (imagenet32: the two "
                             "MaskCon maps; sop_split1/2: the folder holding sop_split1/ or sop_split2/)")
    create.add_argument("--out", type=str, help="output folder (default: shards/DATASET under the current folder, "
                        "where training reads), or s3://BUCKET/PREFIX, gs://BUCKET/PREFIX: each shard is uploaded "
                        "once written, manifest.json last")
    create.add_argument("--seed", type=int, default=0, help="seed of the shuffled write order")
    create.add_argument("--samples-per-shard", type=int, default=None,
                        help="fixed shard size (default: the most that gives at least --min-shards shards)")
    create.add_argument("--min-shards", type=int, default=shards.MIN_SHARDS,
                        help="shards per split where the data allows")
    create.add_argument("--max-samples-per-shard", type=int, default=shards.MAX_SAMPLES_PER_SHARD)
    create.add_argument("--compress-level", type=int, default=shards.PNG_COMPRESS_LEVEL,
                        help="zlib level 0..9 of PNG images (lossless at every level)")
    create.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    create.add_argument("--overwrite", action="store_true",
                        help="rebuild OUT when it holds shards, complete or interrupted, made from other inputs "
                             "(another source, coarse map or options)")
    create.add_argument("--shard-cache", default=None,
                        help="with a URL --out: the node-local folder the shards are written in before upload; "
                             "they stay there as its cache entry (default: $MASKCON_SHARD_CACHE, else "
                             "~/.cache/maskcon/shards)")
    verify = commands.add_parser("verify", help="check every shard under OUT against its manifest")
    verify.add_argument("out", type=str, help="a shard folder, or a URL (s3://, gs://, https://): staged into the "
                        "shard cache, every file checked against the manifest, then verified")
    verify.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    verify.add_argument("--shard-cache", default=None,
                        help="node-local folder for staged remote shards (default: $MASKCON_SHARD_CACHE, else "
                             "~/.cache/maskcon/shards)")
    verify.add_argument("--shard-cache-limit", default=None,
                        help="most bytes the shard cache may hold, e.g. 500GB (default: no limit)")
    return parser


MAKE_SHARDS_EXIT_CODES = """exit status:
  0  done: the shards are written (create), every shard is intact (verify)
  1  problems found (verify): one line per damaged or missing shard on stdout
  2  failed: bad arguments or source, OUT made from other inputs, no space or no permission to write
     (one line on stderr; files written before are intact)
  130 stopped by Ctrl-C or a stop signal: the same command again continues where it stopped"""


def run_make_shards(argv: list[str]) -> int:
    """The exit status of MAKE_SHARDS_EXIT_CODES: 0 done, 1 problems found (verify), 2 failed, 130 stopped."""

    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    stops = _stop_as_ctrl_c()   # first: a stop while the libraries load is one line too
    try:
        from maskcon import count, remote, shard_format, shards
        from maskcon.config import default_shards_dir

        args = _make_shards_parser().parse_args(argv)
        remote.check_location(args.out, writing=args.command == "create")
        remote.check_location(args.shard_cache)
        if args.workers is not None and args.workers < 1:
            raise UserError(f"--workers must be at least 1, got {args.workers}")
        if args.shard_cache is not None and not remote.is_url(str(args.out or "")):
            raise UserError("--shard-cache serves a URL --out (s3://, gs://, https://); a local folder is read and "
                            "written in place: leave --shard-cache out")
        if args.command == "create":
            out = args.out if args.out is not None else default_shards_dir(args.dataset)
            manifest = shards.create(args.dataset, args.src, out, seed=args.seed, labels=args.labels,
                                     samples_per_shard=args.samples_per_shard, min_shards=args.min_shards,
                                     max_samples_per_shard=args.max_samples_per_shard,
                                     compress_level=args.compress_level, workers=args.workers,
                                     overwrite=args.overwrite, log=log, cache=args.shard_cache)
            sizes = ", ".join(f"{name} {split['num_samples']} samples in {len(split['shards'])} shards"
                              for name, split in manifest["splits"].items())
            print(f"{args.dataset} shards at {out}: {sizes}")
            return 0
        folder = args.out
        if remote.is_url(args.out):
            folder = remote.stage(args.out, args.shard_cache, limit=remote.parse_size(args.shard_cache_limit),
                                  show_progress=sys.stderr.isatty(), log=log)
        problems = shards.verify(folder, workers=args.workers, log=log)
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt:   # Ctrl-C or a stop signal: what is finished stays (shards, uploads, staged files)
        again = "the same command without --overwrite" if "--overwrite" in argv else "the same command again"
        print(f"stopped by {stops[0] if stops else 'SIGINT'}; run {again} to continue: finished shards, uploads "
              "and downloads are kept", file=sys.stderr)
        return 130
    for problem in problems:
        print(problem)
    if problems:
        print(f"{args.out}: {count(len(problems), 'problem')}; {shard_format.recreate(folder, args.out)}",
              file=sys.stderr)
        return 1
    print(f"{args.out}: every shard intact")
    return 0


def _stop_as_ctrl_c() -> list[str]:
    """SIGTERM, SIGINT and SIGHUP end this command as Ctrl-C does (KeyboardInterrupt, the first one only: the
    clean-up is not cut short); the list gets the name of the signal that came."""
    import signal

    from maskcon.stopping import STOP_SIGNALS, interrupt_once

    stops: list[str] = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, interrupt_once(stops))
    return stops


def run_bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        lines = [f"  {name:<11} {text}" for name, text in BENCHMARKS.items()]
        print("usage: python launch/bench.py {" + ",".join(BENCHMARKS) + "} [options]\n" + "\n".join(lines))
        if not argv:
            return fail(UserError(f"name a benchmark: one of {', '.join(BENCHMARKS)}"))
        if argv[0] not in ("-h", "--help"):
            return fail(UserError(f"unknown benchmark {argv[0]!r}; known: {', '.join(BENCHMARKS)}"))
        return 0
    stops = _stop_as_ctrl_c()   # a stop ends a benchmark as Ctrl-C does: its clean-up runs, and is not cut short
    try:
        status = importlib.import_module(f"maskcon.bench.{argv[0]}").main(argv[1:])
        if not stops:
            return status
        stopped = KeyboardInterrupt(stops[0])   # raised where Python drops it (a finalizer): the benchmark ran on
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt as interrupt:
        stopped = interrupt
    print(f"stopped by {stopped.args[0] if stopped.args else 'SIGINT'}: the benchmark's scratch files and "
          "processes are gone, nothing else was written", file=sys.stderr)
    return 130


def run_eval(argv: list[str]) -> int:
    """launch/eval.py: 0, 2 with one line, or 130 stopped (one line; no --features file half written)."""
    stops = _stop_as_ctrl_c()
    try:
        from maskcon.evaluation import main as evaluate

        return evaluate(argv)
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt:
        return _stopped_writing_nothing(stops, "the evaluation")


def run_report(argv: list[str]) -> int:
    """launch/report.py: 0 when the report is written, 2 with one line, or 130 stopped (one line; an earlier
    report stays as it was)."""
    stops = _stop_as_ctrl_c()
    try:
        from maskcon.report import main as report

        return report(argv)
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt:
        return _stopped_writing_nothing(stops, "the report")


def _stopped_writing_nothing(stops: list[str], what: str) -> int:
    if int(os.environ.get("RANK", "0")) == 0:     # the main process speaks for all
        print(f"stopped by {stops[0] if stops else 'SIGINT'}: {what} wrote nothing; run the same command again",
              file=sys.stderr)
    return 130


def run_grid(argv: list[str]) -> int:
    """launch/grid.py: 0 every point done, 2 a mistake (one line) or a failed point, EXIT_STOPPED when stopped."""
    try:
        from maskcon.grid import main as grid

        return grid(argv)
    except UserError as err:
        return fail(err)
    except KeyboardInterrupt:   # Ctrl-C outside a point (a running point passes it on and ends with a checkpoint)
        from maskcon.stopping import EXIT_STOPPED

        print("stopped by SIGINT; run the same command again: finished points are skipped", file=sys.stderr)
        return EXIT_STOPPED


DOORS = {
    "train": (run_train, "one process of a run (launch/train.py)"),
    "run": (run_launch, "check a run, then start its processes on this machine (launch/run.py)"),
    "make-shards": (run_make_shards, "convert a dataset to shards, or verify shards (launch/make_shards.py)"),
    "bench": (run_bench, "the benchmarks of BENCHMARKS.md (launch/bench.py)"),
    "grid": (run_grid, "a W&B grid sweep run here, point after point, without a server (launch/grid.py)"),
    "report": (run_report, "the supplement's tables from finished runs (launch/report.py)"),
    "eval": (run_eval, "Recall@K of a trained network on a test split, without training (launch/eval.py)"),
}


def main(argv: list[str] | None = None) -> int:
    """The `maskcon` command: `maskcon DOOR [options]`, the doors of launch/ by name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in DOORS:
        lines = [f"  {name:<12} {text}" for name, (_, text) in DOORS.items()]
        print("usage: maskcon {" + ",".join(DOORS) + "} [options]   (each door's --help lists its options)\n"
              + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            return fail(UserError(f"unknown command {argv[0]!r}; known: {', '.join(DOORS)}"))
        return 0
    return DOORS[argv[0]][0](argv[1:])


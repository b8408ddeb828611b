"""The one GPU command: `python launch/bench.py gpu [--out FILE] [--budget S]` (BENCHMARKS.md, "GPU").

On one GPU, within --budget seconds, on the ImageNet32 preset with synthetic ImageNet32-format shards it writes
itself (`maskcon.datasets.synthetic.write_imagenet32_source`, then `launch/make_shards.py create imagenet32`):
    loader      the 32-px loader alone: `bench.py loader --loaders dali_gpu --threads 8`
    step        the training step on synthetic batches: `bench.py train --modes synthetic`, eager
    compiled    the same with `--compile --compile-mode reduce-overhead` (the whole step, CUDA graphs)
    real        real training against synthetic batches, with data wait: `--modes synthetic,real`
    official    the official-style loader: `--modes official`
    objectives  MaskCon's loss against SelfCon's: `bench.py objectives --device cuda --amp bf16`
    jpeg        the 224-px JPEG path: a synthetic JPEG folder -> `make_shards.py create folder` ->
                `bench.py train --dataset folder --modes synthetic,real`
    job         the main job as users start it, 2 epochs, with the GPU's utilisation: `bench.py job`
    gpu_tests   the GPU-marked tests: `pytest -m gpu`
    profile     torch.profiler over 20 steady steps of the real run: `bench.py train --modes real --profile 20`
Before the parts that need them run the data parts: source32 and shards32 (the ImageNet32-format source and its
shards), jpeg_source and jpeg_shards (the JPEG folder and its shards). `--parts speed` runs loader..jpeg,
`--parts job` job..profile (each fits one call of a GPU machine; a second call with the same --work reuses the
shards), `--parts all` both; or name parts, e.g. `--parts real,job`. To tune, `--variant NAME=PART OPTIONS` runs
a chosen part once more with OPTIONS added to its command, reported as NAME, right after it: e.g. `--variant
"real-4=real --workers 4"`, `--variant "compiled-max=compiled --compile-mode max-autotune-no-cudagraphs"`,
`--variant "step-nchw=step --channels-last false"`, `--variant "loader-p8=loader --prefetch 8"`, `--variant
"job-eval2k=job --eval-batch-size 2048"`.
Each part is a subprocess of a door with its own time limit (at most what is left of the budget): a part
that fails or hangs gives one line, and the others still run. The BENCHMARKS.md block (card, driver,
versions, commit, command, each figure, each goal met or not) goes to --out, never into BENCHMARKS.md, and
every part's JSON report to --out with `.json` added. Without CUDA the command stops with one line;
`--device cpu --small` runs every part with tiny sizes on the CPU. Ctrl-C or SIGTERM stops the running part
and every process it started, and writes the block of the parts before it. Exit status: 0 when every part
gave its figures, 1 when some did not, 2 for a usage error, 130 when stopped.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from maskcon import usable_cpus, write_atomic
from maskcon.bench import _cell, command, nvidia_smi, parser
from maskcon.errors import UserError
from maskcon.provenance import code_state, dali_wheel
from maskcon.stopping import STOP_SIGNALS, interrupt_once

ROOT = Path(__file__).resolve().parents[2]
GOALS = {   # the figures a GPU must reach on the ImageNet32 preset (one H100/H200): title, wanted, bound
    "loader": ("32-px loader alone, <= 8 threads", ">= 60,000 img/s", 60_000),
    "host": ("host CPU per image of the 32-px GPU loader", "<= 8 us", 8),
    "step": ("training step, synthetic batches (best of eager and compiled)", ">= 30,000 pairs/s", 30_000),
    "real": ("real training / synthetic", ">= 95 %", 0.95),
    "objectives": ("MaskCon's loss time / SelfCon's", "<= 1.5x", 1.5),
    "jpeg": ("224-px JPEG real training / synthetic", ">= 95 %", 0.95),
    "busy": ("GPU busy during the main job's last epoch", ">= 90 %", 0.9),
}
PARTS = {"speed": ("loader", "step", "compiled", "real", "official", "objectives", "jpeg"),
         "job": ("job", "gpu_tests", "profile")}
GOAL_PARTS = {"loader": ("loader",), "host": ("loader",), "step": ("step", "compiled"), "real": ("real",),
              "objectives": ("objectives",), "jpeg": ("jpeg",), "busy": ("job",)}
STOPPED = "stopped by a signal"
NEEDS = {"shards32": "source32", "jpeg_shards": "jpeg_source", "jpeg": "jpeg_shards",
         **{name: "shards32" for name in ("loader", "step", "compiled", "real", "official", "job", "profile")}}


# how big each part runs: the GPU figures, or --small (a try on the CPU, each time limit 6x the GPU's)
SIZES = {
    "gpu": {"train_images": 100_000, "val_images": 10_000, "jpeg": (6000, 500, 256), "slower": 1.0,
            "loader": "--loaders dali_gpu --threads 8 --batches 50 --warmup 10 --repeats 3",
            "train": "--steps 30 --repeats 3 --warmup 10", "jpeg_train": "--steps 20 --repeats 3 --warmup 5",
            "objectives": "--amp bf16 --repeats 60", "job": "", "profile": "20"},
    "small": {"train_images": 600, "val_images": 100, "jpeg": (120, 20, 72), "slower": 6.0,
              "loader": "--loaders dali_cpu --threads 2 --batches 2 --warmup 1 --repeats 1 --batch-size 32",
              "train": "--steps 1 --repeats 1 --warmup 1 --batch-size 16 --workers 2",
              "jpeg_train": "--steps 1 --repeats 1 --warmup 1 --batch-size 8 --image-size 64 --workers 2",
              "objectives": "--amp bf16 --repeats 2 --batch 32 --queue-size 512",
              "job": "--batch-size 64 --queue-size 512 --image-size 16", "profile": "2"},
}


@dataclass
class Outcome:
    """One part: its report (the door's JSON) or the one line that says why there is none."""

    name: str
    command: list[str]
    seconds: float = 0.0
    report: dict | None = None
    error: str | None = None
    variant: str | None = None      # for a variant: its part and the options added ("real --workers 4")


def main(argv: list[str]) -> int:
    options = parser("gpu", __doc__)
    options.add_argument("--out", type=Path, default=None,
                         help="file for the BENCHMARKS.md block (default: $OUT/gpu-benchmarks.md when $OUT is "
                              "set, else gpu-benchmarks.md here)")
    options.add_argument("--work", type=Path, default=None, help="scratch folder for shards (default: a temporary one)")
    options.add_argument("--budget", type=float, default=None,
                         help="seconds for all parts together (default: 470 on a GPU, 3000 with --small)")
    options.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the parts run")
    options.add_argument("--small", action="store_true", help="tiny sizes: try the command on the CPU")
    options.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD, when known)")
    options.add_argument("--parts", default="all", help="which parts run: all, speed, job or part names, comma-"
                         "separated (default: all)")
    options.add_argument("--variant", action="append", default=[], metavar="NAME=PART OPTIONS",
                         help="run PART again with OPTIONS added, reported as NAME (repeatable)")
    args = options.parse_args(argv)
    chosen = _chosen(args.parts, args.variant)
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu-benchmarks.md"
    _check_places(args, out)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible to PyTorch; run this on the GPU machine, or try the command with "
                        "--device cpu --small")
    sizes = SIZES["small" if args.small else "gpu"]
    budget = args.budget if args.budget is not None else (3000.0 if args.small else 470.0)
    started = time.monotonic()
    stop = interrupt_once([])             # the command itself writes the block of a stopped call
    earlier = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        with tempfile.TemporaryDirectory(prefix="maskcon-gpu-") as scratch:
            outcomes = _run_parts(args.work or Path(scratch), sizes, args.device, chosen, deadline=started + budget)
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)
    context = _context(args, argv, sizes)
    block = _block(outcomes, context)
    out.parent.mkdir(parents=True, exist_ok=True)
    everything = {"context": context, "parts": [vars(outcome) for outcome in outcomes]}
    write_atomic(out, block)
    write_atomic(out.with_name(out.name + ".json"), json.dumps(everything, indent=1))
    print(json.dumps(everything, indent=1) if args.json else block)
    print(f"written to {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if outcomes and outcomes[-1].error == STOPPED:
        print("stopped by a signal: the block holds the parts that ran before it", file=sys.stderr)
        return 130
    return 0 if all(outcome.error is None for outcome in outcomes) else 1


def _check_places(args, out: Path) -> None:
    """One line (UserError) before any part runs for a budget, --out or --work that cannot serve."""
    if args.budget is not None and args.budget <= 0:
        raise UserError(f"--budget must be a positive number of seconds, got {args.budget:g}")
    if out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        raise UserError("--out must not be BENCHMARKS.md: the block is written apart and copied in by hand")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the block's file, e.g. --out {out / 'gpu-benchmarks.md'}")
    if args.work is not None and args.work.exists() and not args.work.is_dir():
        raise UserError(f"--work {args.work} is a file; name a folder for the shards")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: its folder cannot be made ({error.strerror}); name a writable place") from None


# ------------------------------------------------------------------------------------------ the parts


def _chosen(parts: str, variants: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, part, options added to the part's command) of each part that --parts names, in the command's
    order, each part followed by its --variant entries; one line (UserError) for an unknown part or a variant
    of a part that does not run."""
    every = [name for names in PARTS.values() for name in names]
    named = {name.strip() for name in parts.split(",") if name.strip()}
    if not named or named - {"all", *PARTS, *every}:
        wrong = f"unknown {', '.join(sorted(named - {'all', *PARTS, *every}))}" if named else "empty"
        raise UserError(f"--parts: {wrong}; choose all, speed, job or parts among {', '.join(every)}")
    chosen = [(name, name, []) for group, names in PARTS.items() for name in names if {name, group, "all"} & named]
    bases = [name for name, _, _ in chosen]
    for text in variants:
        name, equals, rest = (side.strip() for side in text.partition("="))
        try:
            part, *extra = shlex.split(rest) or [""]
        except ValueError:
            raise UserError(f"--variant {text!r}: a quote is not closed") from None
        if not name or not equals:
            raise UserError(f"--variant {text!r}: write NAME=PART OPTIONS, e.g. --variant \"real-4=real --workers 4\"")
        if name in every or name in [c[0] for c in chosen]:
            raise UserError(f"--variant {text!r}: {name} is already the name of a part or a variant; give it one of "
                            "its own")
        if part not in bases:
            raise UserError(f"--variant {text!r}: " + (f"{part} is not among the parts that run; add it to --parts"
                                                       if part in every else
                                                       f"{part!r} is not a part; choose one of {', '.join(bases)}"))
        chosen.insert(max(i for i, c in enumerate(chosen) if c[1] == part) + 1, (name, part, extra))
    return chosen


def _run_parts(work: Path, sizes: dict, device: str, chosen: list[tuple[str, str, list[str]]], *,
               deadline: float) -> list[Outcome]:
    """The data the chosen parts need first (ImageNet32-format shards, the JPEG folder and its shards; shards
    an earlier call left in `work` are kept), then every chosen part (a name) and variant ((name, part, options),
    the part's command with the options added) in order."""
    src32, shards32, jpeg_src, jpeg_shards = work / "src32", work / "s32", work / "jpeg", work / "sj"
    python, bench = sys.executable, str(ROOT / "launch" / "bench.py")
    make_shards = [python, str(ROOT / "launch" / "make_shards.py"), "create"]
    train = [python, bench, "train", "--dataset", "imagenet32", "--shards", str(shards32), "--device", device,
             *sizes["train"].split(), "--json"]
    write = "import sys; from maskcon.datasets import synthetic; synthetic.{}(sys.argv[1], *map(int, sys.argv[2:]))"
    plan = {   # part -> (time limit on a GPU, s; its command)
        "source32": (150, [python, "-c", write.format("write_imagenet32_source"), str(src32),
                           str(sizes["train_images"]), str(sizes["val_images"])]),
        "shards32": (150, [*make_shards, "imagenet32", "--src", str(src32), "--out", str(shards32)]),
        "loader": (90, [python, bench, "loader", "--dataset", "imagenet32", "--shards", str(shards32),
                        *sizes["loader"].split(), "--json"]),
        "step": (90, [*train, "--modes", "synthetic"]),
        "compiled": (240, [*train, "--modes", "synthetic", "--compile", "--compile-mode", "reduce-overhead"]),
        "real": (120, [*train, "--modes", "synthetic,real"]),
        "official": (90, [*train, "--modes", "official"]),
        "objectives": (60, [python, bench, "objectives", "--device", device, *sizes["objectives"].split(), "--json"]),
        "jpeg_source": (90, [python, "-c", write.format("write_jpeg_folder"), str(jpeg_src), *map(str, sizes["jpeg"])]),
        "jpeg_shards": (90, [*make_shards, "folder", "--src", str(jpeg_src), "--out", str(jpeg_shards)]),
        "jpeg": (150, [python, bench, "train", "--dataset", "folder", "--shards", str(jpeg_shards), "--device", device,
                       *sizes["jpeg_train"].split(), "--modes", "synthetic,real", "--json"]),
        "job": (240, [python, bench, "job", "--dataset", "imagenet32", "--shards", str(shards32), "--pretrained",
                      "none", "--epochs", "2", *sizes["job"].split(), "--json"]),
        "gpu_tests": (240, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]),
        "profile": (120, [*train, "--modes", "real", "--profile", sizes["profile"]]),
    }
    runs, added = [], set()       # before each part, the data it needs that no earlier part needed
    for name, part, extra in chosen:
        needed, need = [], NEEDS.get(part)
        while need is not None and need not in added:
            needed.insert(0, need)
            added.add(need)
            need = NEEDS.get(need)
        runs += [(data, data, []) for data in needed] + [(name, part, extra)]
    outcomes: list[Outcome] = []
    failed: set[str] = set()
    written = {"source32": shards32, "shards32": shards32, "jpeg_source": jpeg_shards, "jpeg_shards": jpeg_shards}
    for name, part, extra in runs:
        limit, part_command = plan[part]
        outcome = Outcome(name=name, command=[*part_command, *extra],
                          variant=" ".join([part, *extra]) if name != part else None)
        left = deadline - time.monotonic()
        if NEEDS.get(part) in failed:
            outcome.error = f"not run: {NEEDS[part]} failed"
        elif name in written and (written[name] / "manifest.json").exists():
            outcome.report = {"output": f"kept: {written[name]} holds the shards already"}
        elif left < 5:
            outcome.error = "not run: the time budget was spent"
        else:
            try:
                _run_one(outcome, timeout=min(limit * sizes["slower"], left))
            except KeyboardInterrupt:       # Ctrl-C or SIGTERM: the part has ended, no other part starts
                outcome.error = STOPPED
        if outcome.error is not None:
            failed.add(name)
        print(f"{name}: {outcome.error or 'ok'} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
        outcomes.append(outcome)
        if outcome.error == STOPPED:
            break
    return outcomes


def _run_one(outcome: Outcome, *, timeout: float) -> None:
    """Run the part's command; its JSON report from stdout, or one line: the timeout, or its last error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    start = time.monotonic()
    # its own session: a part that runs out of time is ended with every process it started (loader workers)
    process = subprocess.Popen(outcome.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end(process, signal.SIGKILL)
        stdout, outcome.error = "", f"timed out after {timeout:.0f} s"
    except BaseException:       # Ctrl-C or a stop signal: the part, in a session of its own, is stopped too
        _end(process, signal.SIGTERM)
        outcome.seconds = time.monotonic() - start
        raise
    outcome.seconds = time.monotonic() - start
    if outcome.error is not None:
        return
    if process.returncode != 0:
        lines = [line.strip() for line in (stderr + stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        outcome.error = f"exit {process.returncode}: {(errors or lines or ['no output'])[-1][:300]}"
    elif "{" not in stdout:           # a door without a JSON report (the tests): its last line
        outcome.report = {"output": ([line.strip() for line in stdout.splitlines() if line.strip()] or ["-"])[-1]}
    else:
        try:
            outcome.report = json.loads(stdout[stdout.index("{"):stdout.rindex("}") + 1])
        except json.JSONDecodeError as error:
            outcome.error = f"unreadable JSON report ({error})"


def _end(process: subprocess.Popen, number: int) -> None:
    """Send `number` to the part's process group and wait for the part; SIGKILL after 30 s."""
    for sent in (number, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sent)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=30)
            return


# ------------------------------------------------------------------------------------------ the block


def _context(args, argv: list[str], sizes: dict) -> dict:
    """The machine and software the figures belong to."""
    import torch

    context = {"date": datetime.date.today().isoformat(), "command": command("gpu", argv),
               "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": usable_cpus(),
               "dali": dali_wheel() or "not installed", "device": args.device,
               "commit": args.commit or (code_state()["commit"] or "unknown")[:7],
               "train_images": sizes["train_images"], "jpeg_images": sizes["jpeg"][0], "jpeg_side": sizes["jpeg"][2],
               "card": "no GPU (a try on the CPU)", "memory_gib": None, "driver": "-"}
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        context.update(card=properties.name, memory_gib=round(properties.total_memory / 2**30),
                       driver=nvidia_smi("driver_version") or "unknown")
    return context


def _figures(outcomes: list[Outcome]) -> dict[str, tuple[str, bool | None]]:
    """goal name -> (the figure as text, met?) from the parts' reports; ("-", None) where a part gave none."""
    reports = collections.defaultdict(dict, {outcome.name: outcome.report or {} for outcome in outcomes})
    loader = reports["loader"]
    steps = {name: reports[name].get("modes", {}).get("synthetic", {}).get("images_per_s") for name in
             ("step", "compiled")}
    best = max((name for name in steps if steps[name]), key=steps.get, default=None)
    # on a GPU: the process's CPU per image, every thread (DALI's own included); on the CPU: the host part
    host_ms = loader.get("cpu_ms_per_image", {}).get("dali_gpu")
    found = {"loader": (loader.get("dali_gpu") or loader.get("dali_cpu"), "{:,.0f} img/s"),
             "host": ((1000 * host_ms, "{:.1f} us (all threads, dali_gpu)") if host_ms is not None else
                      (loader.get("gpu_pipeline_host_us_per_image"), "{:.1f} us (host part, dali_cpu)")),
             "step": (steps.get(best), "{:,.0f} pairs/s (" + ("compiled" if best == "compiled" else "eager") + ")"),
             "real": (reports["real"].get("real_over_synthetic"), "{:.1%}"),
             "objectives": (reports["objectives"].get("maskcon_over_selfcon_time"), "{:.2f}x"),
             "jpeg": (reports["jpeg"].get("real_over_synthetic"), "{:.1%}"),
             "busy": (reports["job"].get("gpu_busy"), "{:.0%}")}

    def judged(goal: str, value: float | None, shape: str) -> tuple[str, bool | None]:
        if value is None:
            return "-", None
        bound = GOALS[goal][2]
        return shape.format(value), value >= bound if GOALS[goal][1].startswith(">=") else value <= bound
    return {goal: judged(goal, *found[goal]) for goal in found}


def _block(outcomes: list[Outcome], context: dict) -> str:
    """The BENCHMARKS.md block: where, what, each part's figures and each goal."""
    card = context["card"] + (f" ({context['memory_gib']} GiB)" if context["memory_gib"] else "")
    lines = [f"### {context['card']}, {context['date']}", "",
             f"Command: `{context['command']}` at commit {context['commit']}.",
             f"Machine: {card}, driver {context['driver']}, {context['cpus']} CPU cores; torch {context['torch']} "
             f"(CUDA {context['cuda']}), DALI {context['dali']}.",
             f"Data: synthetic ImageNet32-format shards ({context['train_images']:,} training images)" +
             (f"; a synthetic JPEG folder ({context['jpeg_images']:,} images of {context['jpeg_side']} px)."
              if any(outcome.name == "jpeg_source" for outcome in outcomes) else "."), "",
             "| part | result | seconds |", "|---|---|---|"]
    lines += [f"| {outcome.name}{f' = {outcome.variant}' if outcome.variant else ''} | "
              f"{outcome.error or _summary(outcome.report)} | {outcome.seconds:.0f} |" for outcome in outcomes]
    lines += ["", "| goal | figure | wanted | met |", "|---|---|---|---|"]
    ran = {outcome.name for outcome in outcomes}
    for goal, (figure, met) in _figures(outcomes).items():
        if not ran & set(GOAL_PARTS[goal]):       # a goal of parts this call did not choose
            continue
        verdict = ("not judged on the CPU" if context["device"] != "cuda" else "no figure" if met is None
                   else "met" if met else "NOT met")
        lines.append(f"| {GOALS[goal][0]} | {figure} | {GOALS[goal][1]} | {verdict} |")
    return "\n".join(lines) + "\n"


def _summary(report: dict) -> str:
    """One cell of a part's own figures: a profile's, each mode's, or the report's top-level figures."""
    if "output" in report:
        return report["output"]
    if "profile" in report:
        profile = report["profile"]
        top = (profile["kernels"] or [{"name": "-", "share": 0}])[0]
        return (f"GPU idle {_cell(profile['gpu_idle_share'])}; per step {profile['kernels_per_step']} kernels, "
                f"{profile['launches_per_step']} launches, {profile['aten_ops_per_step']} aten operators; longest "
                f"kernel {top['name'][:60]} ({top['share']:.0%})")
    if "modes" in report:
        return "; ".join(f"{mode} {m['images_per_s']:,.0f} img/s, data wait {m['data_wait']:.0%}"
                         for mode, m in report["modes"].items())
    if "cpu_ms_per_image" in report:      # the loader's
        rates = [f"{name} {report[name]:,.0f} img/s, {1000 * cpu_ms:.1f} us CPU/img"
                 for name, cpu_ms in report["cpu_ms_per_image"].items()]
        return "; ".join(rates) + f" ({report['threads']} threads, prefetch {report.get('prefetch')})"
    return ", ".join(f"{name} {_cell(value)}" for name, value in report.items()
                     if isinstance(value, (int, float, list)) and not isinstance(value, bool) and name != "windows")

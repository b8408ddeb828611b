"""The one GPU command: `python launch/bench.py gpu [--parts P] [--variant V] [--out FILE]` (BENCHMARKS.md, "GPU").

On one GPU, within --budget seconds, on the ImageNet32 preset with synthetic ImageNet32-format shards it
writes first (parts source32, shards32; jpeg_source, jpeg_shards for the JPEG part), the parts:
    loader      the 32-px loader alone (`bench.py loader`, dali_gpu, 8 threads)
    step        the training step on synthetic batches (`bench.py train --modes synthetic`), eager
    compiled    the same, the whole step compiled with CUDA graphs (reduce-overhead)
    real        real training against synthetic batches, with data wait; official: the official-style loader
    objectives  MaskCon's loss against SelfCon's (`bench.py objectives`, bf16)
    jpeg        the 224-px JPEG path: a synthetic JPEG folder, its shards, real against synthetic
    job         the main job as users start it, 2 epochs, with the GPU's utilisation (`bench.py job`)
    gpu_tests   the GPU-marked tests (`pytest -m gpu`)
    profile     torch.profiler over 20 steady steps of the real run (`bench.py train --profile 20`)
`--parts speed` runs loader..jpeg, `job` job..profile (each fits one call of a GPU machine; a second call with
the same --work reuses the shards), `all` both, or name parts (`real,job`). `--variant "NAME=PART OPTIONS"`
runs a chosen part again with OPTIONS added, reported as NAME: e.g. `"real-4=real --workers 4"`,
`"compiled-max=compiled --compile-mode max-autotune-no-cudagraphs"`, `"job-eval2k=job --eval-batch-size 2048"`.
Each part is a subprocess with its own time limit: one that fails or hangs gives one line and the others
run. The BENCHMARKS.md block (card, driver, versions, commit, command, figures, each goal met or not) goes to
--out, never into BENCHMARKS.md, every part's JSON report to --out with `.json` added. Without CUDA it stops
with one line; `--device cpu --small` runs every part tiny on the CPU. Ctrl-C or SIGTERM stops the running
part and its processes and writes the block of the parts before it. Exit status: 0 when every part gave its
figures, 1 when some did not, 2 for a usage error, 130 when stopped.
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
from maskcon.bench import cell, command, parser
from maskcon.errors import UserError
from maskcon.provenance import code_state, dali_wheel, gpu_field
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
    add = options.add_argument
    add("--out", type=Path, default=None, help="file for the BENCHMARKS.md block (default: $OUT/gpu-benchmarks.md "
        "when $OUT is set, else gpu-benchmarks.md here)")
    add("--work", type=Path, default=None, help="scratch folder for shards (default: a temporary one)")
    add("--budget", type=float, default=None, help="seconds for all parts (default: 470 on a GPU, 3000 with --small)")
    add("--device", choices=("cuda", "cpu"), default="cuda", help="where the parts run")
    add("--small", action="store_true", help="tiny sizes: try the command on the CPU")
    add("--commit", default=None, help="the commit measured (default: git's HEAD, when known)")
    add("--parts", default="all", help="all, speed, job or part names, comma-separated (default: all)")
    add("--variant", action="append", default=[], metavar="NAME=PART OPTIONS",
        help="run PART again with OPTIONS added, reported as NAME (repeatable)")
    args = options.parse_args(argv)
    chosen = _chosen(args.parts, args.variant)
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu-benchmarks.md"
    _check_places(args, out)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible to PyTorch; run this on the GPU machine, or try the command with "
                        "--device cpu --small")
    sizes, started = SIZES["small" if args.small else "gpu"], time.monotonic()
    deadline = started + (args.budget or (3000.0 if args.small else 470.0))
    earlier = {number: signal.signal(number, interrupt_once([])) for number in STOP_SIGNALS}   # the block is written
    try:
        with tempfile.TemporaryDirectory(prefix="maskcon-gpu-") as scratch:
            outcomes = _run_parts(args.work or Path(scratch), sizes, args.device, chosen, deadline=deadline)
    finally:
        for number, handler in earlier.items():
            signal.signal(number, handler)
    context = _context(args, argv, sizes)
    block, everything = _block(outcomes, context), {"context": context, "parts": [vars(o) for o in outcomes]}
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
        wrong = ("write NAME=PART OPTIONS, e.g. --variant \"real-4=real --workers 4\"" if not name or not equals else
                 f"{name} is already the name of a part or a variant; give it one of its own"
                 if name in every or name in [c[0] for c in chosen] else
                 f"{part} is not among the parts that run; add it to --parts" if part in every and part not in bases
                 else f"{part!r} is not a part; choose one of {', '.join(bases)}" if part not in bases else None)
        if wrong:
            raise UserError(f"--variant {text!r}: {wrong}")
        chosen.insert(max(i for i, c in enumerate(chosen) if c[1] == part) + 1, (name, part, extra))
    return chosen


def _commands(work: Path, sizes: dict, device: str) -> dict[str, tuple[int, list[str]]]:
    """part -> (its time limit on a GPU in seconds, its command), the data in `work`."""
    src32, shards32, jpeg_src, jpeg_shards = work / "src32", work / "s32", work / "jpeg", work / "sj"
    python, bench = sys.executable, str(ROOT / "launch" / "bench.py")
    make_shards = [python, str(ROOT / "launch" / "make_shards.py"), "create"]
    on32 = ["--dataset", "imagenet32", "--shards", str(shards32)]
    train = [python, bench, "train", *on32, "--device", device, *sizes["train"].split(), "--json"]
    write = "import sys; from maskcon.datasets import synthetic; synthetic.{}(sys.argv[1], *map(int, sys.argv[2:]))"
    return {
        "source32": (150, [python, "-c", write.format("write_imagenet32_source"), str(src32),
                           str(sizes["train_images"]), str(sizes["val_images"])]),
        "shards32": (150, [*make_shards, "imagenet32", "--src", str(src32), "--out", str(shards32)]),
        "loader": (90, [python, bench, "loader", *on32, *sizes["loader"].split(), "--json"]),
        "step": (90, [*train, "--modes", "synthetic"]),
        "compiled": (240, [*train, "--modes", "synthetic", "--compile", "--compile-mode", "reduce-overhead"]),
        "real": (120, [*train, "--modes", "synthetic,real"]),
        "official": (90, [*train, "--modes", "official"]),
        "objectives": (60, [python, bench, "objectives", "--device", device, *sizes["objectives"].split(), "--json"]),
        "jpeg_source": (90, [python, "-c", write.format("write_jpeg_folder"), str(jpeg_src), *map(str, sizes["jpeg"])]),
        "jpeg_shards": (90, [*make_shards, "folder", "--src", str(jpeg_src), "--out", str(jpeg_shards)]),
        "jpeg": (150, [python, bench, "train", "--dataset", "folder", "--shards", str(jpeg_shards), "--device", device,
                       *sizes["jpeg_train"].split(), "--modes", "synthetic,real", "--json"]),
        "job": (240, [python, bench, "job", *on32, "--pretrained", "none", "--epochs", "2", *sizes["job"].split(),
                      "--json"]),
        "gpu_tests": (240, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]),
        "profile": (120, [*train, "--modes", "real", "--profile", sizes["profile"]]),
    }


def _run_parts(work: Path, sizes: dict, device: str, chosen: list[tuple[str, str, list[str]]], *,
               deadline: float) -> list[Outcome]:
    """The data the chosen parts need first (ImageNet32-format shards, the JPEG folder and its shards; shards
    an earlier call left in `work` are kept), then every chosen part and variant (the part's command with the
    variant's options added) in order."""
    commands, runs, added = _commands(work, sizes, device), [], set()
    for name, part, extra in chosen:       # before each part, the data it needs that no earlier part needed
        needed, need = [], NEEDS.get(part)
        while need is not None and need not in added:
            needed.insert(0, need)
            added.add(need)
            need = NEEDS.get(need)
        runs += [(data, data, []) for data in needed] + [(name, part, extra)]
    outcomes, failed = [], set()
    written = {name: work / folder for names, folder in ((("source32", "shards32"), "s32"),
                                                         (("jpeg_source", "jpeg_shards"), "sj")) for name in names}
    for name, part, extra in runs:
        limit, part_command = commands[part]
        outcome = Outcome(name, [*part_command, *extra], variant=" ".join([part, *extra]) if name != part else None)
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
        failed |= {name} if outcome.error else set()
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
        stdout, stderr, outcome.error = "", "", f"timed out after {timeout:.0f} s"
    except BaseException:       # Ctrl-C or a stop signal: the part, in a session of its own, is stopped too
        _end(process, signal.SIGTERM)
        raise
    finally:
        outcome.seconds = time.monotonic() - start
    lines = [line.strip() for line in (stderr + stdout).splitlines() if line.strip()]
    if outcome.error is not None:
        return
    if process.returncode != 0:
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
                       driver=gpu_field("driver_version") or "unknown")
    return context


def _figures(outcomes: list[Outcome]) -> dict[str, tuple[str, bool | None]]:
    """goal name -> (the figure as text, met?) from the parts' reports; ("-", None) where a part gave none."""
    reports = collections.defaultdict(dict, {outcome.name: outcome.report or {} for outcome in outcomes})
    loader = reports["loader"]
    steps = {name: reports[name].get("modes", {}).get("synthetic", {}).get("images_per_s")
             for name in ("step", "compiled")}
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
    judged = {}
    for goal, (value, shape) in found.items():
        _, wanted, bound = GOALS[goal]
        judged[goal] = ("-", None) if value is None else (
            shape.format(value), value >= bound if wanted.startswith(">=") else value <= bound)
    return judged


def _block(outcomes: list[Outcome], context: dict) -> str:
    """The BENCHMARKS.md block: where, what, each part's figures and each goal."""
    card = context["card"] + (f" ({context['memory_gib']} GiB)" if context["memory_gib"] else "")
    jpeg = any(outcome.name == "jpeg_source" for outcome in outcomes)
    lines = [f"### {context['card']}, {context['date']}", "",
             f"Command: `{context['command']}` at commit {context['commit']}.",
             f"Machine: {card}, driver {context['driver']}, {context['cpus']} CPU cores; torch {context['torch']} "
             f"(CUDA {context['cuda']}), DALI {context['dali']}.",
             f"Data: synthetic ImageNet32-format shards ({context['train_images']:,} training images)" +
             (f"; a synthetic JPEG folder ({context['jpeg_images']:,} images of {context['jpeg_side']} px)." if jpeg
              else "."), "", "| part | result | seconds |", "|---|---|---|"]
    lines += [f"| {o.name}{f' = {o.variant}' if o.variant else ''} | {o.error or _summary(o.report)} | "
              f"{o.seconds:.0f} |" for o in outcomes]
    lines += ["", "| goal | figure | wanted | met |", "|---|---|---|---|"]
    ran = {outcome.name for outcome in outcomes}
    for goal, (figure, met) in _figures(outcomes).items():
        if ran & set(GOAL_PARTS[goal]):       # only the goals of the parts this call chose
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
        return (f"GPU idle {cell(profile['gpu_idle_share'])}; per step {profile['kernels_per_step']} kernels, "
                f"{profile['launches_per_step']} launches, {profile['aten_ops_per_step']} aten operators; longest "
                f"kernel {top['name'][:60]} ({top['share']:.0%})")
    if "modes" in report:
        return "; ".join(f"{mode} {m['images_per_s']:,.0f} img/s, data wait {m['data_wait']:.0%}"
                         for mode, m in report["modes"].items())
    if "cpu_ms_per_image" in report:      # the loader's
        rates = [f"{name} {report[name]:,.0f} img/s, {1000 * cpu_ms:.1f} us CPU/img"
                 for name, cpu_ms in report["cpu_ms_per_image"].items()]
        return "; ".join(rates) + f" ({report['threads']} threads, prefetch {report.get('prefetch')})"
    return ", ".join(f"{name} {cell(value)}" for name, value in report.items()
                     if isinstance(value, (int, float, list)) and not isinstance(value, bool) and name != "windows")

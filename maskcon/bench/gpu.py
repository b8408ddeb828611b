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
`--parts speed` runs the data parts and loader..jpeg, `--parts job` the data parts and job..profile (each fits
one call of a GPU machine; a second call with the same --work reuses the shards), `--parts all` both.
Each part is a subprocess of a door with its own time limit (at most what is left of the budget): a part
that fails or hangs gives one line, and the others still run. The BENCHMARKS.md block (card, driver,
versions, commit, command, each figure, each goal met or not) goes to --out, never into BENCHMARKS.md, and
every part's JSON report to --out with `.json` added. Without CUDA the command stops with one line;
`--device cpu --small` runs every part with tiny sizes on the CPU. Exit status: 0 when every part gave its
figures, 1 when some did not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from maskcon import usable_cpus
from maskcon.bench import command, nvidia_smi
from maskcon.errors import OneLineParser, UserError
from maskcon.provenance import code_state, dali_wheel

ROOT = Path(__file__).resolve().parents[2]
GOALS = {   # the figures a GPU must reach on the ImageNet32 preset (one H100/H200)
    "loader": ("32-px loader alone, <= 8 threads", ">= 60,000 img/s"),
    "host": ("host CPU per image of the 32-px GPU loader", "<= 8 us"),
    "step": ("training step, synthetic batches (best of eager and compiled)", ">= 30,000 pairs/s"),
    "real": ("real training / synthetic", ">= 95 %"),
    "objectives": ("MaskCon's loss time / SelfCon's", "<= 1.5x"),
    "jpeg": ("224-px JPEG real training / synthetic", ">= 95 %"),
    "busy": ("GPU busy during the main job's last epoch", ">= 90 %"),
}
PARTS = {"speed": ("loader", "step", "compiled", "real", "official", "objectives", "jpeg"),
         "job": ("job", "gpu_tests", "profile")}
NEEDS = {"shards32": "source32", "jpeg_shards": "jpeg_source", "jpeg": "jpeg_shards", "loader": "shards32",
         "step": "shards32", "compiled": "shards32", "real": "shards32", "official": "shards32", "job": "shards32",
         "profile": "shards32"}


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


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python launch/bench.py gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="file for the BENCHMARKS.md block (default: $OUT/gpu-benchmarks.md when $OUT is "
                             "set, else gpu-benchmarks.md here)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for shards (default: a temporary one)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together (default: 470 on a GPU, 3000 with --small)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the parts run")
    parser.add_argument("--small", action="store_true", help="tiny sizes: try the command on the CPU")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git's HEAD, when known)")
    parser.add_argument("--parts", choices=("all", *PARTS), default="all", help="which parts run (default: all)")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible to PyTorch; run this on the GPU machine, or try the command with "
                        "--device cpu --small")
    sizes = SIZES["small" if args.small else "gpu"]
    budget = args.budget if args.budget is not None else (3000.0 if args.small else 470.0)
    out = args.out or Path(os.environ.get("OUT", ".")) / "gpu-benchmarks.md"
    if out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        raise UserError("--out must not be BENCHMARKS.md: the block is written apart and copied in by hand")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maskcon-gpu-") as scratch:
        work = args.work or Path(scratch)
        chosen = [name for group, names in PARTS.items() if args.parts in ("all", group) for name in names]
        outcomes = _run_parts(work, sizes, args.device, chosen, deadline=started + budget)
    context = _context(args, argv, sizes)
    block = _block(outcomes, context)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, block)
    _write_atomic(out.with_name(out.name + ".json"),
                  json.dumps({"context": context, "parts": [vars(outcome) for outcome in outcomes]}, indent=1))
    print(block)
    print(f"written to {out} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0 if all(outcome.error is None for outcome in outcomes) else 1


# ------------------------------------------------------------------------------------------ the parts


def _run_parts(work: Path, sizes: dict, device: str, chosen: list[str], *, deadline: float) -> list[Outcome]:
    """The data the chosen parts need first (ImageNet32-format shards, the JPEG folder and its shards; shards
    an earlier call left in `work` are kept), then every chosen part in order."""
    src32, shards32, jpeg_src, jpeg_shards = work / "src32", work / "s32", work / "jpeg", work / "sj"
    python, bench = sys.executable, str(ROOT / "launch" / "bench.py")
    make_shards = [python, str(ROOT / "launch" / "make_shards.py"), "create"]
    train = [python, bench, "train", "--dataset", "imagenet32", "--shards", str(shards32), "--device", device,
             *sizes["train"].split(), "--json"]
    plan = [
        ("source32", 150, [python, "-c", "import sys; from maskcon.datasets.synthetic import "
                           "write_imagenet32_source as w; w(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))",
                           str(src32), str(sizes["train_images"]), str(sizes["val_images"])]),
        ("shards32", 150, [*make_shards, "imagenet32", "--src", str(src32), "--out", str(shards32)]),
        ("loader", 90, [python, bench, "loader", "--dataset", "imagenet32", "--shards", str(shards32),
                        *sizes["loader"].split(), "--json"]),
        ("step", 90, [*train, "--modes", "synthetic"]),
        ("compiled", 240, [*train, "--modes", "synthetic", "--compile", "--compile-mode", "reduce-overhead"]),
        ("real", 120, [*train, "--modes", "synthetic,real"]),
        ("official", 90, [*train, "--modes", "official"]),
        ("objectives", 60, [python, bench, "objectives", "--device", device, *sizes["objectives"].split(), "--json"]),
        ("jpeg_source", 90, [python, "-c", "import sys; from maskcon.datasets.synthetic import write_jpeg_folder; "
                             "write_jpeg_folder(sys.argv[1], *map(int, sys.argv[2:]))", str(jpeg_src),
                             *map(str, sizes["jpeg"])]),
        ("jpeg_shards", 90, [*make_shards, "folder", "--src", str(jpeg_src), "--out", str(jpeg_shards)]),
        ("jpeg", 150, [python, bench, "train", "--dataset", "folder", "--shards", str(jpeg_shards), "--device", device,
                       *sizes["jpeg_train"].split(), "--modes", "synthetic,real", "--json"]),
        ("job", 240, [python, bench, "job", "--dataset", "imagenet32", "--shards", str(shards32), "--pretrained",
                      "none", "--epochs", "2", *sizes["job"].split(), "--json"]),
        ("gpu_tests", 240, [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]),
        ("profile", 120, [*train, "--modes", "real", "--profile", sizes["profile"]]),
    ]
    wanted = set(chosen)
    for name in chosen:                          # the data each chosen part needs, and the data that needs
        while name in NEEDS:
            name = NEEDS[name]
            wanted.add(name)
    plan = [part for part in plan if part[0] in wanted]
    outcomes: list[Outcome] = []
    failed: set[str] = set()
    written = {"source32": shards32, "shards32": shards32, "jpeg_source": jpeg_shards, "jpeg_shards": jpeg_shards}
    for name, limit, part_command in plan:
        outcome = Outcome(name=name, command=part_command)
        needed = NEEDS.get(name)
        left = deadline - time.monotonic()
        if needed in failed:
            outcome.error = f"not run: {needed} failed"
        elif name in written and (written[name] / "manifest.json").exists():
            outcome.report = {"output": f"kept: {written[name]} holds the shards already"}
        elif left < 5:
            outcome.error = "not run: the time budget was spent"
        else:
            _run_one(outcome, timeout=min(limit * sizes["slower"], left))
        if outcome.error is not None:
            failed.add(name)
        print(f"{name}: {outcome.error or 'ok'} ({outcome.seconds:.0f} s)", file=sys.stderr, flush=True)
        outcomes.append(outcome)
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
        os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.communicate(timeout=30)
        outcome.seconds = time.monotonic() - start
        outcome.error = f"timed out after {timeout:.0f} s"
        return
    outcome.seconds = time.monotonic() - start
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


# ------------------------------------------------------------------------------------------ the block


def _context(args, argv: list[str], sizes: dict) -> dict:
    """The machine and software the figures belong to."""
    import torch

    context = {"date": datetime.date.today().isoformat(), "command": command("gpu", argv),
               "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": usable_cpus(),
               "dali": dali_wheel() or "not installed", "device": args.device,
               "commit": args.commit or (code_state()["commit"] or "unknown")[:7],
               "train_images": sizes["train_images"], "jpeg_images": sizes["jpeg"][0], "jpeg_side": sizes["jpeg"][2]}
    if args.device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        context.update(card=properties.name, memory_gib=round(properties.total_memory / 2**30),
                       driver=nvidia_smi("driver_version") or "unknown")
    else:
        context.update(card="no GPU (a try on the CPU)", memory_gib=None, driver="-")
    return context


def _figures(outcomes: list[Outcome]) -> dict[str, tuple[str, bool | None]]:
    """goal name -> (the figure as text, met?) from the parts' reports; None where a part gave no figure."""
    reports = collections.defaultdict(dict, {outcome.name: outcome.report or {} for outcome in outcomes})

    def synthetic(name):
        return reports[name].get("modes", {}).get("synthetic", {}).get("images_per_s")

    figures: dict[str, tuple[str, bool | None]] = {}
    loader = next((reports["loader"].get(name) for name in ("dali_gpu", "dali_cpu") if name in reports["loader"]),
                  None)
    figures["loader"] = (f"{loader:,.0f} img/s", loader >= 60_000) if loader else ("-", None)
    # on a GPU: the process's CPU per image, every thread (DALI's own included); on the CPU: the host part
    host_ms = reports["loader"].get("cpu_ms_per_image", {}).get("dali_gpu")
    host = (1000 * host_ms, "all threads, dali_gpu") if host_ms is not None else (
        reports["loader"].get("gpu_pipeline_host_us_per_image"), "host part, dali_cpu")
    figures["host"] = (f"{host[0]:.1f} us ({host[1]})", host[0] <= 8) if host[0] is not None else ("-", None)
    steps = {mode: synthetic(mode) for mode in ("step", "compiled") if synthetic(mode)}
    best = max(steps, key=steps.get) if steps else None
    figures["step"] = ((f"{steps[best]:,.0f} pairs/s ({'compiled' if best == 'compiled' else 'eager'})",
                        steps[best] >= 30_000) if best else ("-", None))
    for goal, part in (("real", "real"), ("jpeg", "jpeg")):
        ratio = reports[part].get("real_over_synthetic")
        figures[goal] = (f"{ratio:.1%}", ratio >= 0.95) if ratio is not None else ("-", None)
    ratio = reports["objectives"].get("maskcon_over_selfcon_time")
    figures["objectives"] = (f"{ratio:.2f}x", ratio <= 1.5) if ratio is not None else ("-", None)
    busy = reports["job"].get("gpu_busy")
    figures["busy"] = (f"{busy:.0%}", busy >= 0.9) if busy is not None else ("-", None)
    return figures


def _block(outcomes: list[Outcome], context: dict) -> str:
    """The BENCHMARKS.md block: where, what, each part's figures and each goal."""
    card = context["card"] + (f" ({context['memory_gib']} GiB)" if context["memory_gib"] else "")
    lines = [f"### {context['card']}, {context['date']}", "",
             f"Command: `{context['command']}` at commit {context['commit']}.",
             f"Machine: {card}, driver {context['driver']}, {context['cpus']} CPU cores; torch {context['torch']} "
             f"(CUDA {context['cuda']}), DALI {context['dali']}.",
             f"Data: synthetic ImageNet32-format shards ({context['train_images']:,} training images); a synthetic "
             f"JPEG folder ({context['jpeg_images']:,} images of {context['jpeg_side']} px).", "",
             "| part | result | seconds |", "|---|---|---|"]
    for outcome in outcomes:
        lines.append(f"| {outcome.name} | {outcome.error or _summary(outcome)} | {outcome.seconds:.0f} |")
    lines += ["", "| goal | figure | wanted | met |", "|---|---|---|---|"]
    for goal, (figure, met) in _figures(outcomes).items():
        title, wanted = GOALS[goal]
        verdict = ("not judged on the CPU" if context["device"] != "cuda" else "no figure" if met is None
                   else "met" if met else "NOT met")
        lines.append(f"| {title} | {figure} | {wanted} | {verdict} |")
    return "\n".join(lines) + "\n"


def _summary(outcome: Outcome) -> str:
    """One cell of a part's own figures."""
    report = outcome.report or {}
    if "profile" in report:
        profile = report["profile"]
        top = profile["kernels"][0] if profile["kernels"] else {"name": "-", "share": 0}
        if profile["gpu_idle_share"] is None:
            return f"no GPU: per step {profile['aten_ops_per_step']} aten operators"
        return (f"GPU idle {profile['gpu_idle_share']}; per step {profile['kernels_per_step']} kernels, "
                f"{profile['launches_per_step']} launches; longest kernel {top['name'][:60]} ({top['share']:.0%})")
    if "modes" in report:
        cells = [f"{mode} {m['images_per_s']:,.0f} img/s" + (f", data wait {m['data_wait']:.0%}" if mode != "synthetic"
                                                            else "") for mode, m in report["modes"].items()]
        return "; ".join(cells)
    if report.get("benchmark") == "job":
        busy = "-" if report["gpu_busy"] is None else f"{report['gpu_busy']:.0%}"
        return (f"epoch {report['epoch']}: {report['images_per_s']:,.0f} img/s, data wait {report['data_wait']:.1%}, "
                f"feed CPU {report['feed_cpu_ms_per_batch'] or 0:.2f} ms/batch, GPU busy {busy}; evaluations "
                f"{', '.join(f'{s:.1f}' for s in report['eval_s'])} s; {report['wall_s']:.0f} s in all, R@1 "
                f"{report['R@1']:.2f}")
    if "output" in report:
        return report["output"]
    if "maskcon_over_selfcon_time" in report:
        results = report["results"]
        return (f"MaskCon {results['maskcon']['median_ms']:.2f} ms, SelfCon {results['selfcon']['median_ms']:.2f} ms "
                f"({report['amp']})")
    cpu_ms = report.get("cpu_ms_per_image", {})
    rates = [f"{name} {report[name]:,.0f} img/s, {cpu_ms.get(name, '-')} ms CPU/img"
             for name in ("dali_gpu", "dali_cpu", "torch", "reference_pil") if name in report]
    if rates:
        return "; ".join(rates) + f" ({report.get('threads')} threads)"
    return "done"


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)

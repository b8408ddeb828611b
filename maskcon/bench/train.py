"""Training speed: `python launch/bench.py train [--synthetic N] [--device cpu|cuda] [--json] [train.py options]`.

Images per second of the MaskCon training step, in one run on the same shards, model and settings, fed by
    real       the trainer's own loader (maskcon.loaders.build_train_loader, DALI; its GPU pipeline on cuda)
    synthetic  one batch of random tensors already on the device, reused every step: the ceiling
    official   the official MaskCon code's way (maskcon.loaders.reference.official_style_loader): PIL images,
               torchvision transforms (AutoAugment for the strong view of the 32x32 sets), a shuffling torch
               DataLoader with worker processes, batches copied to the device as they are fetched
    resume     the first step of an epoch started at its middle batch, as a resumed run starts it, against
               one started at batch 0, each timed from `set_epoch` to the end of the step
Every option of launch/train.py sets up the run over the dataset's preset; the benchmark fixes MaskCon,
random weights, the DALI loader with --workers threads and no W&B. The run is built by the trainer's builder
(maskcon.run.build_run) and stepped by the loop's step; as in the loop, the loss is read only at the end of
a window. The figures per mode are the loop's own (maskcon.train.DataClock), as in metrics.jsonl:
images_per_s, data_wait (the share of the window spent in next(batches)), data_ms_per_batch and
feed_cpu_ms_per_batch (CPU ms of the loader's host feeding work). Each mode runs `--warmup` untimed steps,
then `--repeats` windows of `--steps` steps: the median window with the range over windows. `--synthetic N`
first writes N synthetic 32x32 ImageNet32-format training images and benchmarks on them.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from maskcon import usable_cpus
from maskcon.bench import command, machine, positive, show
from maskcon.bench import parser as bench_parser
from maskcon.config import parse_config
from maskcon.datasets.synthetic import write_synthetic_imagenet32
from maskcon.errors import UserError
from maskcon.loaders.reference import official_style_loader
from maskcon.loaders.spec import LoaderSpec, TrainBatch
from maskcon.run import Run, build_run, make_accelerator
from maskcon.step import graph_breaks
from maskcon.train import DataClock

MODES = ("real", "synthetic", "official", "resume")


def _parser() -> argparse.ArgumentParser:
    cpus = usable_cpus()
    parser = bench_parser("train", __doc__, usage="%(prog)s [bench options] [launch/train.py options]")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="write N synthetic 32x32 ImageNet32-format training images to --shards (default: a "
                             "temporary folder) and benchmark on them; implies --dataset imagenet32")
    parser.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps per window (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="timed windows per mode (default: 3)")
    parser.add_argument("--warmup", type=int, default=5, metavar="N",
                        help="untimed steps per mode before the first window (default: 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the step and the real loader run (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=min(8, cpus), metavar="N",
                        help="DALI threads of the real loader and worker processes of the official loader "
                             f"(default: min(8, CPU cores) = {min(8, cpus)})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run (default: {','.join(MODES)})")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then profile N steps of the real mode (torch.profiler): the 10 longest kernels, the "
                             "share of the time the GPU idles, kernel launches per step (default: 0, none)")
    return parser


def _checked(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The benchmark's own options, its modes, and the options of the run it builds: launch/train.py's, after
    those the benchmark fixes (MaskCon, random weights, the DALI loader with --workers threads, no W&B)."""
    args, train_options = _parser().parse_known_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(MODES)}")
    positive(args, "steps", "repeats", "workers")
    positive(args, "warmup", "profile", least=0)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    fixed = ["--method", "maskcon", "--pretrained", "none", "--loader", "dali", "--loader-threads", str(args.workers),
             "--wandb", "disabled", *(["--dataset", "imagenet32"] if args.synthetic is not None else [])]
    return args, modes, fixed + train_options


def main(argv: list[str]) -> int:
    args, modes, train_options = _checked(argv)
    with tempfile.TemporaryDirectory(prefix="maskcon-bench-") as scratch:
        config = parse_config([*(["--shards", f"{scratch}/shards"] if args.synthetic is not None else []),
                               *train_options, "--output-dir", f"{scratch}/run"])
        if args.synthetic is not None:
            write_synthetic_imagenet32(Path(config.shards), num_train=args.synthetic,
                                       num_test=max(100, args.synthetic // 50))
        run = build_run(config, make_accelerator(config, args.device))
        bench = _Bench(run, args)
        results = {}
        for mode in modes:
            results[mode] = bench.measure(mode)
            print(f"{mode}: {results[mode]['images_per_s']:.1f} images/s", file=sys.stderr)
        report = _report(results, run, args)
        report["graph_breaks"] = bench.graph_breaks
        if args.profile:
            report["profile"] = bench.profile(args.profile)
        del bench, run
        gc.collect()
    report["command"] = command("train", argv)
    return show(report, args.json)


# ---------------------------------------------------------------------------------------- the modes


class _Bench:
    """The trainer's run (built by maskcon.run.build_run), stepped with the loop's step in every mode."""

    def __init__(self, run: Run, args: argparse.Namespace):
        self.run, self.args, self.steps = run, args, 0
        num_coarse = len(run.manifest["coarse_classes"])
        with torch.no_grad():  # a full bank of labelled entries, as after the first epoch
            run.learner.queue_coarse.copy_(torch.randint(num_coarse, run.learner.queue_coarse.shape))
        run.model.train()
        # graph breaks left in the compiled step (traced on a copy of the parts; before the first compiled call)
        self.graph_breaks = (graph_breaks(run.parts, next(self.batches("synthetic")[0])) if run.resolved["compile"]
                             else [])

    def batches(self, mode: str) -> tuple[Iterator[dict], Callable[[], None], object]:
        """An endless stream of batches on the device for `mode`, a function that releases it, and the loader
        whose feeding work it counts."""
        run, settings, device = self.run, self.run.resolved, self.run.accelerator.device
        if mode == "synthetic":
            generator = torch.Generator().manual_seed(settings["seed"])
            batch = run.train_loader.spec.blank_train_batch()   # the loader's shapes and memory format
            for name, value in batch.items():
                classes = len(run.manifest[f"{name}_classes"]) if value.dtype == torch.int64 else None
                value.copy_(torch.randn(value.shape, generator=generator) if classes is None
                            else torch.randint(classes, value.shape, generator=generator))

            return itertools.repeat(batch), lambda: None, None
        if mode == "real":
            return _epochs(run.train_loader), lambda: None, run.train_loader
        loader = official_style_loader(run.folder, recipe=settings["dataset"], image_size=settings["image_size"],
                                       batch_size=settings["batch_size"], workers=self.args.workers,
                                       seed=settings["seed"], query_view=settings["query_view"],
                                       key_view=settings["key_view"],
                                       pin_memory=device.type == "cuda")
        stream = _to_device(_epochs(loader), run.train_loader.spec)
        return stream, lambda: stream.close(), None

    def step(self, batch: TrainBatch) -> torch.Tensor:
        """The run's step on `batch`, numbered as the loop numbers its steps."""
        self.steps += 1
        return self.run.step_fn(batch, self.steps - 1)

    def measure(self, mode: str) -> dict:
        if mode == "resume":
            return self.measure_resume()
        (stream, release, loader), args, windows = self.batches(mode), self.args, []
        try:
            for _ in range(args.warmup):
                loss = self.step(next(stream))
            if args.warmup:
                loss.item()
            for _ in range(args.repeats):
                clock = DataClock(loader, self.run.resolved["batch_size"])
                for _ in range(args.steps):
                    loss = self.step(clock.next(stream))
                loss.item()  # waits for the device: the window's work is done
                windows.append(clock.figures())
        finally:
            release()
            del stream
            gc.collect()  # the loader's threads or worker processes end before the next mode starts
        return _summary(windows)

    def profile(self, steps: int) -> dict:
        """`steps` steps of the real mode under torch.profiler, after as many unprofiled ones (steady state)."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
        stream = _epochs(self.run.train_loader)
        for _ in range(steps):
            loss = self.step(next(stream))
        loss.item()
        with profile(activities=activities) as profiler:
            began = time.perf_counter()
            for _ in range(steps):
                loss = self.step(next(stream))
            loss.item()                  # the window ends when the device has run the last step
            window_us = 1e6 * (time.perf_counter() - began)
        stream.close()
        return _profile_summary(profiler.events(), steps, window_us)

    def measure_resume(self) -> dict:
        """Windows of one step each: the first step of an epoch started at its middle batch, as a resumed run
        starts it, and (`epoch_start_images_per_s`) of an epoch started at batch 0; then, once, the time to
        reach the middle batch by reading the batches before it (`skip_by_reading_s`)."""
        loader, windows = self.run.train_loader, []
        middle = len(loader) // 2
        for repeat in range(self.args.repeats):
            for start in (0, middle):
                clock = DataClock(loader, self.run.resolved["batch_size"])
                loader.set_epoch(1000 + repeat, start=start)
                loss = self.step(clock.next(iter(loader)))
                loss.item()
                windows.append(clock.figures())     # at batch 0, then at the middle batch
        began = time.perf_counter()
        loader.set_epoch(1000)
        batches = iter(loader)
        for _ in range(middle + 1):
            next(batches)
        skip_by_reading_s = time.perf_counter() - began
        del batches
        gc.collect()
        return {**_summary(windows[1::2], from_start=windows[::2]), "skip_by_reading_s": skip_by_reading_s}


def _profile_summary(events, steps: int, window_us: float) -> dict:
    """From torch.profiler's events of `steps` steps over window_us: the 10 kernels with the most device time
    (share of all kernel time), the share of the window with no kernel running, kernels and kernel launches
    (CUDA graph launches included) per step, and aten operators per step (the host's work)."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for kernel in kernels:
        by_name.setdefault(kernel.name, []).append(kernel.time_range.end - kernel.time_range.start)
    total = sum(sum(times) for times in by_name.values()) or 1.0
    longest = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:10]
    busy, reach = 0.0, float("-inf")          # the union of the kernels' time ranges
    for start, end in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    launches = sum(1 for e in events if "LaunchKernel" in e.name or "GraphLaunch" in e.name)
    return {"steps": steps, "window_ms": round(window_us / 1000, 2),
            "kernels": [{"name": name[:120], "ms": round(sum(times) / 1000, 3), "calls": len(times),
                         "share": round(sum(times) / total, 3)} for name, times in longest],
            "gpu_idle_share": round(1 - busy / window_us, 3) if kernels else None,
            "kernels_per_step": round(len(kernels) / steps, 1), "launches_per_step": round(launches / steps, 1),
            "aten_ops_per_step": round(sum(1 for e in events if e.name.startswith("aten::")) / steps, 1)}


def _summary(windows: list[dict], from_start: list[dict] | None = None) -> dict:
    """The median window (by images/s) with the ranges over windows; for a resume also the median first step of
    an epoch started at batch 0 (`epoch_start_images_per_s`)."""
    middle = sorted(windows, key=lambda window: window["images_per_s"])[len(windows) // 2]
    summary = {name: middle.get(name) for name in ("images_per_s", "data_wait", "data_ms_per_batch",
                                                   "feed_cpu_ms_per_batch")}
    for name in ("images_per_s", "data_wait"):
        summary.update({f"{name}_min": min(w[name] for w in windows), f"{name}_max": max(w[name] for w in windows)})
    summary["windows"] = [window["images_per_s"] for window in windows]
    if from_start:
        summary["epoch_start_images_per_s"] = sorted(w["images_per_s"] for w in from_start)[len(from_start) // 2]
    return summary


def _epochs(loader: Iterable) -> Iterator:
    """The loader's epochs one after another, each shuffled anew (set_epoch, where the loader has it)."""
    for epoch in itertools.count():
        getattr(loader, "set_epoch", lambda epoch: None)(epoch)
        yield from loader


def _to_device(batches: Iterator, spec: LoaderSpec) -> Iterator[TrainBatch]:
    """(query, key, fine, coarse) host batches as TrainBatch dicts on the spec's device (asynchronous copies
    from pinned memory, as the official code moves them), the views in the spec's memory format."""
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    for batch in batches:
        moved = {name: value.to(spec.device, non_blocking=True)
                 for name, value in zip(TrainBatch.__annotations__, batch)}
        yield {name: value.contiguous(memory_format=memory_format) if value.dim() == 4 else value
               for name, value in moved.items()}


def _report(by_mode: dict[str, dict], run: Run, args: argparse.Namespace) -> dict:
    settings, device = run.resolved, run.accelerator.device
    report = {"benchmark": "train", "machine": machine(device), "torch": torch.__version__, "device": str(device),
              **{name: settings[name] for name in ("dataset", "arch", "image_size", "batch_size", "queue_size",
                                                    "compile")},
              "shards": str(run.folder), "train_images": run.manifest["splits"]["train"]["num_samples"],
              "steps_per_epoch": run.steps_per_epoch, "mixed_precision": run.accelerator.mixed_precision,
              "channels_last": run.channels_last, "cudnn_benchmark": torch.backends.cudnn.benchmark,
              **{name: getattr(args, name) for name in ("workers", "steps", "repeats", "warmup")},
              "modes": by_mode}
    rate = {mode: m["images_per_s"] for mode, m in by_mode.items()}
    report.update({f"real_over_{other}": rate["real"] / rate[other] for other in ("official", "synthetic")
                   if "real" in rate and other in rate})
    if "resume" in by_mode:
        report.update(resume_first_step_s=settings["batch_size"] / rate["resume"],
                      epoch_first_step_s=settings["batch_size"] / by_mode["resume"]["epoch_start_images_per_s"],
                      skip_by_reading_s=by_mode["resume"]["skip_by_reading_s"])
        if "real" in rate:
            report["real_step_s"] = settings["batch_size"] / rate["real"]
    return report

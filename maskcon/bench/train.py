"""Training speed: `python launch/bench.py train [--dataset D] [--shards DIR] [--device cpu|cuda] [--json]`.

Images per second of the MaskCon training step, in one run on the same shards, model and settings, fed by
    real       maskcon.loaders.build_train_loader, DALI back end (GPU pipeline with --device cuda)
    synthetic  one batch of random tensors already on the device, reused every step: the ceiling
    official   the official MaskCon code's way (maskcon.bench.loader.reference_pil_loader's dataset): a PIL
               image per sample decoded from its shard tar member, torchvision transforms on PIL images
               (AutoAugment CIFAR-10 policy for the strong view of the 32x32 sets), a shuffling torch
               DataLoader with worker processes; batches are copied to the device as part of fetching them
The step is the training loop's own (maskcon.step.train_step), with the loop's defaults: bf16, channels-last
and fused SGD on CUDA. As in the loop, the loss is read only at the end of a window, which waits for the
device, so the device has finished when the clock stops. Hyperparameters are the dataset's preset.
    data wait = time spent in next(batches) / (fetch + step time)
Each mode runs `--warmup` untimed steps (pipeline start, worker start-up, allocator warm-up), then
`--repeats` windows of `--steps` steps; figures are the median window with the range over windows.
`--synthetic N` first writes N synthetic 32x32 training images as ImageNet32-format shards (1,000 fine
classes in 12 coarse) and benchmarks on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from maskcon import shards
from maskcon.config import ARCHS, parse_config
from maskcon.datasets import DATASETS
from maskcon.bench import machine
from maskcon.errors import UserError
from maskcon.loaders import check_batch_fits
from maskcon.train import resolve_precision
from maskcon.loaders.torch import worker_context

MODES = ("real", "synthetic", "official")


@dataclass
class Measurement:
    mode: str
    images_per_s: float          # median window
    images_per_s_min: float
    images_per_s_max: float
    data_wait: float             # fraction of step time spent waiting for the next batch, median window
    data_wait_min: float
    data_wait_max: float
    windows: list[float]         # images/s of every window


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f"{message} (see python launch/bench.py train --help)")


def _parser() -> argparse.ArgumentParser:
    cpus = os.cpu_count() or 1
    parser = _Parser(prog="python launch/bench.py train", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS), metavar="DATASET",
                        help="recipe, preset and default shard folder (default: digits, written on first use)")
    parser.add_argument("--shards", default=None, metavar="DIR", help="shard folder (default: shards/DATASET)")
    parser.add_argument("--synthetic", type=int, default=None, metavar="N",
                        help="write N synthetic 32x32 ImageNet32-format training images to --shards (default: a "
                             "temporary folder) and benchmark on them; implies --dataset imagenet32")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone (default: resnet18)")
    parser.add_argument("--image-size", type=int, default=None, metavar="S",
                        help="network input side, px (default: the dataset's preset)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="images per step (default: the dataset's preset)")
    parser.add_argument("--steps", type=int, default=20, metavar="N", help="timed steps per window (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="timed windows per mode (default: 3)")
    parser.add_argument("--warmup", type=int, default=5, metavar="N",
                        help="untimed steps per mode before the first window (default: 5)")
    parser.add_argument("--mixed-precision", choices=("bf16", "no"), default=None,
                        help="autocast to bf16 or not (default: as train.py, bf16 on cuda and no on cpu)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: on for cuda, off on cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders, as train.py --compile")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode with --compile (default: default)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the step and the real loader run (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=min(8, cpus), metavar="N",
                        help="DALI threads of the real loader and worker processes of the official loader "
                             f"(default: min(8, CPU cores) = {min(8, cpus)})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated modes to run (default: {','.join(MODES)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, data order and augmentations")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise UserError(f"--modes: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(MODES)}")
    for name in ("steps", "repeats", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    precision = resolve_precision(args.mixed_precision, device)

    with tempfile.TemporaryDirectory(prefix="maskcon-bench-") as scratch:
        dataset = "imagenet32" if args.synthetic is not None else args.dataset
        folder = Path(args.shards) if args.shards else (Path(scratch) / "shards" if args.synthetic is not None
                                                          else Path("shards") / dataset)
        if args.synthetic is not None:
            write_synthetic_imagenet32(folder, num_train=args.synthetic, num_test=max(100, args.synthetic // 50))
        elif not (folder / "manifest.json").exists():
            if dataset != "digits":
                raise UserError(f"no shards in {folder}; make them with: python launch/make_shards.py create "
                                f"{dataset} --src SRC --out {folder} (or pass --synthetic N)")
            shards.create("digits", None, folder)
        manifest = shards.read_manifest(folder)
        if manifest["dataset"] != dataset:
            raise UserError(f"{folder} holds shards of {manifest['dataset']!r}, not {dataset!r}; pass the matching "
                            f"--dataset or --shards")

        config = parse_config(["--dataset", dataset, "--method", "maskcon", "--arch", args.arch, "--pretrained", "none"]
                              + (["--image-size", str(args.image_size)] if args.image_size else [])
                              + (["--batch-size", str(args.batch_size)] if args.batch_size else []))
        check_batch_fits(manifest["splits"]["train"]["num_samples"], 1, config.batch_size)
        bench = _Bench(config, manifest, folder, device, precision, args)
        results = []
        for mode in modes:
            results.append(bench.measure(mode))
            print(f"{mode}: {results[-1].images_per_s:.1f} images/s", file=sys.stderr)

    report = _report(results, config, args, device, precision, folder, manifest)
    report["command"] = shlex.join(["python", "launch/bench.py", "train", *argv])
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_table(report))
    return 0


# ---------------------------------------------------------------------------------------- the step


class _Bench:
    """The learner, its optimiser and the step of the training loop, shared by every mode."""

    def __init__(self, config, manifest: dict, folder: Path, device: torch.device, precision: str, args):
        from maskcon.methods import method_for
        from maskcon.model import MaskConModel
        from maskcon.step import StepParts, make_optimizer

        torch.manual_seed(args.seed)
        self.config, self.manifest, self.folder, self.device, self.args = config, manifest, folder, device, args
        channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
        model = MaskConModel(arch=config.arch, image_size=config.image_size, proj_hidden=config.proj_hidden,
                             proj_dim=config.proj_dim, queue_size=config.queue_size,
                             momentum=config.key_momentum).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        if args.compile:
            model.compile_encoders(mode=args.compile_mode)
        num_coarse = len(manifest["coarse_classes"])
        with torch.no_grad():  # a full bank of labelled entries, as after the first epoch
            model.queue_coarse.copy_(torch.randint(num_coarse, model.queue_coarse.shape))
        model.train()
        optimizer = make_optimizer(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                                   device=device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

        def autocast():
            return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

        self.parts = StepParts(model=model, learner=model, optimizer=optimizer, method=method_for("maskcon"),
                               t0=config.t0, t=config.t, w=config.w, autocast=autocast, channels_last=channels_last)
        self.model = model

    def step(self, batch: dict) -> torch.Tensor:
        """One training step, the loop's own; returns the loss tensor without reading it."""
        from maskcon.step import train_step

        return train_step(self.parts, batch)

    # ------------------------------------------------------------------------------------ the modes

    def batches(self, mode: str) -> tuple[Iterator[dict], Callable[[], None]]:
        """An endless stream of batches on the device for `mode`, and a function that releases it."""
        config, size = self.config, self.config.image_size
        if mode == "synthetic":
            generator = torch.Generator().manual_seed(self.args.seed)
            num_fine, num_coarse = len(self.manifest["fine_classes"]), len(self.manifest["coarse_classes"])
            shape = (config.batch_size, 3, size, size)
            batch = {"query": torch.randn(shape, generator=generator).to(self.device),
                     "key": torch.randn(shape, generator=generator).to(self.device),
                     "fine": torch.randint(num_fine, (config.batch_size,), generator=generator).to(self.device),
                     "coarse": torch.randint(num_coarse, (config.batch_size,), generator=generator).to(self.device)}

            def repeat():
                while True:
                    yield batch
            return repeat(), lambda: None
        if mode == "real":
            from maskcon.loaders import build_train_loader

            loader = build_train_loader(self.folder, recipe=config.dataset, image_size=size,
                                        batch_size=config.batch_size, rank=0, world_size=1, seed=self.args.seed,
                                        device=self.device, backend="dali", query_view=config.query_view,
                                        key_view=config.key_view, num_threads=self.args.workers)
            return _epochs(loader), lambda: None
        loader = official_style_loader(self.folder, recipe=config.dataset, image_size=size,
                                       batch_size=config.batch_size, workers=self.args.workers, seed=self.args.seed,
                                       query_view=config.query_view, key_view=config.key_view,
                                       pin_memory=self.device.type == "cuda")
        stream = _to_device(_repeat(loader), self.device)
        return stream, lambda: stream.close()

    def measure(self, mode: str) -> Measurement:
        stream, release = self.batches(mode)
        batch_size = self.config.batch_size
        try:
            for _ in range(self.args.warmup):
                loss = self.step(next(stream))
            if self.args.warmup:
                loss.item()
            rates, waits = [], []
            for _ in range(self.args.repeats):
                waited = 0.0
                start = time.perf_counter()
                for _ in range(self.args.steps):
                    fetch_start = time.perf_counter()
                    batch = next(stream)
                    waited += time.perf_counter() - fetch_start
                    loss = self.step(batch)
                loss.item()  # waits for the device: the window's work is done
                elapsed = time.perf_counter() - start
                rates.append(self.args.steps * batch_size / elapsed)
                waits.append(waited / elapsed)
        finally:
            release()
            del stream
            gc.collect()  # the loader's threads or worker processes end before the next mode starts
        order = sorted(range(len(rates)), key=rates.__getitem__)
        middle = order[len(order) // 2]
        return Measurement(mode=mode, images_per_s=rates[middle], images_per_s_min=min(rates),
                           images_per_s_max=max(rates), data_wait=waits[middle], data_wait_min=min(waits),
                           data_wait_max=max(waits), windows=rates)


# ----------------------------------------------------------------------- the official-style loader


def official_style_loader(folder: Path, *, recipe: str, image_size: int, batch_size: int, workers: int, seed: int,
                          query_view: str, key_view: str, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The official code's loading: maskcon.bench.loader's reference PIL dataset (a PIL image decoded from its
    shard tar member, torchvision transforms on PIL images, AutoAugment CIFAR-10 policy) with this run's
    query and key views, in a DataLoader set up as the official code sets it up: shuffled, drop_last,
    `workers` worker processes, pinned memory for a GPU. Batches: (query, key, fine, coarse).
    Workers persist across epochs (the official code restarts them every epoch; keeping them is kinder to
    this baseline on small sets).
    """
    from maskcon.datasets import recipe_for
    from maskcon.bench.loader import reference_pil_loader

    chosen = recipe_for(recipe)
    views = dataclasses.replace(chosen, strong=chosen.view(query_view), weak=chosen.view(key_view))
    dataset = reference_pil_loader(folder, views, image_size=image_size, batch_size=batch_size, workers=0).dataset
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=pin_memory, persistent_workers=True,
                                       prefetch_factor=4, generator=torch.Generator().manual_seed(seed),
                                       multiprocessing_context=worker_context(workers))


def _epochs(loader: Iterable[dict]) -> Iterator[dict]:
    """The loader's epochs one after another (a new shuffle each epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _repeat(loader: Iterable) -> Iterator:
    """A DataLoader's epochs one after another (it reshuffles on every pass)."""
    while True:
        yield from loader


def _to_device(batches: Iterator, device: torch.device) -> Iterator[dict]:
    """(query, key, fine, coarse) host batches as dicts on the device (asynchronous copies from pinned
    memory), as the official code moves them."""
    for batch in batches:
        names = ("query", "key", "fine", "coarse")
        yield {name: value.to(device, non_blocking=True) for name, value in zip(names, batch)}


# --------------------------------------------------------------------------------- synthetic shards


def write_synthetic_imagenet32(folder: Path, *, num_train: int, num_test: int) -> Path:
    """ImageNet32-format shards of synthetic 32x32 images: 1,000 fine classes in 12 coarse ones.

    The images are maskcon.bench.loader.cifar_like_image (smooth structure plus noise, CIFAR-sized PNGs).
    """
    from maskcon.bench.loader import cifar_like_image, write_synthetic_shards

    if num_train < 1:
        raise UserError(f"--synthetic must be at least 1, got {num_train}")
    num_fine, num_coarse = 1000, 12

    def labels(position: int) -> tuple[int, int]:
        fine = position % num_fine
        return fine, fine * num_coarse // num_fine  # the manifest's fine_to_coarse

    return write_synthetic_shards(folder, num_train=num_train, num_test=num_test, image=cifar_like_image,
                                  labels=labels, num_fine=num_fine, num_coarse=num_coarse, dataset="imagenet32",
                                  samples_per_shard=5000)


# ----------------------------------------------------------------------------------------- report


def _report(results: list[Measurement], config, args, device, precision, folder: Path, manifest: dict) -> dict:
    by_mode = {m.mode: m for m in results}
    report = {
        "benchmark": "train",
        "machine": machine(device),
        "torch": torch.__version__,
        "device": str(device),
        "dataset": config.dataset,
        "shards": str(folder),
        "train_images": manifest["splits"]["train"]["num_samples"],
        "arch": config.arch,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "queue_size": config.queue_size,
        "mixed_precision": precision,
        "channels_last": device.type == "cuda" if args.channels_last is None else args.channels_last,
        "compile": args.compile,
        "workers": args.workers,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "modes": {m.mode: asdict(m) for m in results},
    }
    if "real" in by_mode and "official" in by_mode:
        report["real_over_official"] = by_mode["real"].images_per_s / by_mode["official"].images_per_s
    if "real" in by_mode and "synthetic" in by_mode:
        report["real_over_synthetic"] = by_mode["real"].images_per_s / by_mode["synthetic"].images_per_s
    return report


def _table(report: dict) -> str:
    lines = [f"{report['dataset']} ({report['train_images']} training images), {report['arch']} "
             f"{report['image_size']}px, batch {report['batch_size']}, K {report['queue_size']}, "
             f"{report['mixed_precision']}, {report['device']}: {report['machine']}, torch {report['torch']}",
             f"{report['repeats']} windows of {report['steps']} steps after {report['warmup']} warm-up steps; "
             "median (min-max)",
             f"{'mode':<10} {'images/s':>24} {'data wait':>22}"]
    for mode, m in report["modes"].items():
        wait = "-" if mode == "synthetic" else \
            f"{m['data_wait']:.1%} ({m['data_wait_min']:.1%}-{m['data_wait_max']:.1%})"
        lines.append(f"{mode:<10} {m['images_per_s']:>9.1f} ({m['images_per_s_min']:.1f}-"
                     f"{m['images_per_s_max']:.1f}){'':>2} {wait:>22}")
    if "real_over_official" in report:
        lines.append(f"real / official images/s: {report['real_over_official']:.2f}")
    if "real_over_synthetic" in report:
        lines.append(f"real / synthetic (ceiling): {report['real_over_synthetic']:.2f}")
    return "\n".join(lines)

"""Two-view loading speed: `python launch/bench.py loader --dataset DATASET --shards OUT --json`.

Source images per second (both views made, labels included) of
    dali_cpu       maskcon.loaders, backend "dali" on the CPU (device_id=None); dali_gpu: the same on a GPU
    torch          maskcon.loaders, backend "torch": torchvision transforms in a DataLoader
    reference_pil  the official-style loader (maskcon/loaders/reference.py): PIL images, torchvision's
                   transforms on them and a shuffling torch DataLoader
on the same shards and cores, timed after `--warmup-epochs` full epochs, and per loader the process's CPU ms
per image (all threads and DataLoader workers), the training thread's CPU ms per batch inside next(), and the
loader's own count of its host feeding work (`feed_cpu_seconds`). gpu_pipeline_host_us_per_image: the host
part of the DALI pipeline, measured on dali_cpu as its feeding work less the copy of CPU outputs into torch
(a GPU pipeline orders that copy on the device): what the pipeline costs the host when its operators run on a
GPU. `--synthetic N` first writes N synthetic cifar100-format 32x32 PNG training samples to OUT;
`--first-batch-workers W` also times a torch loader with W workers from construction to its first batch.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch

from maskcon import usable_cpus
from maskcon.bench import parser as bench_parser
from maskcon.bench import show, spread
from maskcon.datasets.synthetic import cifar_like_image, write_synthetic_shards
from maskcon.errors import UserError
from maskcon.loaders import LoaderSpec, build_train_loader

LOADERS = ("dali_cpu", "torch", "reference_pil", "dali_gpu")


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _measure(loader, *, batches: int, warmup_epochs: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Per repeat of `batches` batches, after `warmup_epochs` full epochs and `warmup` more batches, untimed:
    images/s, the process's CPU ms per image, the training thread's CPU ms per batch (time.thread_time inside
    next()), the loader's feeding CPU us per image (0 where a loader does not count it), and the host part of
    the pipeline (feeding less the copy of CPU outputs, which a GPU pipeline does not make) in us per image."""

    def endless():
        while True:
            yield from loader

    def feeding() -> tuple[float, float]:
        return getattr(loader, "feed_cpu_seconds", 0.0), getattr(loader, "copy_cpu_seconds", 0.0)

    stream = endless()
    for _ in range(warmup_epochs * len(loader) + warmup):
        next(stream)
    figures: dict[str, list[float]] = {name: [] for name in ("rate", "cpu_ms", "thread_ms", "feed_us", "host_us")}
    for _ in range(repeats):
        images, thread, cpu, start, before = 0, 0.0, _cpu_seconds(), time.perf_counter(), feeding()
        for _ in range(batches):
            started = time.thread_time()
            batch = next(stream)
            thread += time.thread_time() - started
            images += (batch["query"] if isinstance(batch, dict) else batch[0]).shape[0]
        figures["rate"].append(images / (time.perf_counter() - start))
        figures["cpu_ms"].append(1000 * (_cpu_seconds() - cpu) / images)
        figures["thread_ms"].append(1000 * thread / batches)
        feed, copy = (1e6 * (after - earlier) / images for after, earlier in zip(feeding(), before))
        figures["feed_us"].append(feed)
        figures["host_us"].append(feed - copy)
    stream.close()
    return figures


def _build(name: str, shards: Path, spec: LoaderSpec):
    """The loader `name` of --loaders on `shards`, from `spec` (its back end and device set by the name)."""
    if name == "reference_pil":
        from maskcon.loaders.reference import official_style_loader

        return official_style_loader(shards, recipe=spec.recipe, image_size=spec.image_size,
                                     batch_size=spec.batch_size, workers=spec.num_threads)
    if name == "dali_gpu" and not torch.cuda.is_available():
        raise UserError("--loaders dali_gpu needs a CUDA GPU; this machine has none")
    return build_train_loader(shards, spec.replace(backend="torch" if name == "torch" else "dali",
                                                   device="cuda" if name == "dali_gpu" else spec.device))


def main(argv: list[str]) -> int:
    parser = bench_parser("loader", __doc__)
    parser.add_argument("--dataset", required=True, help="recipe to run (a dataset name, e.g. cifar100)")
    parser.add_argument("--shards", required=True, type=Path, help="shard folder (manifest.json, train/)")
    parser.add_argument("--image-size", type=int, default=None, help="output side (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=12, help="timed batches per repeat")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="untimed full epochs before the first repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches after those epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="DALI threads = DataLoader workers "
                        "(default: the CPUs this process may use)")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="batches prepared ahead by our loaders (default: maskcon.loaders.LOADER_DEFAULTS)")
    parser.add_argument("--loaders", default="dali_cpu,torch,reference_pil",
                        help=f"comma-separated subset of {','.join(LOADERS)}")
    parser.add_argument("--first-batch-workers", type=int, default=0, metavar="W",
                        help="also time a torch loader with W workers from construction to its first batch")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="first write N synthetic 32x32 PNG train samples (cifar100 format) to --shards")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.loaders.split(",") if name.strip()]
    if not chosen or any(name not in LOADERS for name in chosen):
        raise UserError(f"--loaders takes a comma-separated subset of {', '.join(LOADERS)}")

    from maskcon.config import preset
    from maskcon.datasets import recipe_for

    recipe_for(args.dataset)
    spec = LoaderSpec(recipe=args.dataset, batch_size=args.batch_size, num_threads=args.threads or usable_cpus(),
                      image_size=args.image_size or int(preset(args.dataset, "maskcon")["image_size"]),
                      prefetch=args.prefetch)
    if args.synthetic:
        if (args.shards / "manifest.json").exists():
            raise UserError(f"{args.shards} already holds shards; drop --synthetic or pick an empty folder")
        write_synthetic_shards(args.shards, num_train=args.synthetic, num_test=max(1, args.synthetic // 5),
                               image=cifar_like_image, labels=lambda i: (i % 100, i % 100 // 5), num_fine=100,
                               num_coarse=20, samples_per_shard=1000, dataset="cifar100")
    report = {"dataset": args.dataset, "unit": "source images/s, both views"}
    if args.first_batch_workers:  # before the other loaders, so that the fork server starts cold
        start = time.perf_counter()
        next(iter(build_train_loader(args.shards, spec.replace(backend="torch",
                                                               num_threads=args.first_batch_workers))))
        report.update(torch_first_batch_s=round(time.perf_counter() - start, 2),
                      first_batch_workers=args.first_batch_workers)
        gc.collect()
    measured = {}
    for name in chosen:
        loader = _build(name, args.shards, spec)
        if name.startswith("dali"):
            from maskcon.loaders.dali import operator_count

            report.setdefault("dali_operators", {})[name] = operator_count(loader.pipeline)
        measured[name] = _measure(loader, batches=args.batches, warmup_epochs=args.warmup_epochs,
                                  warmup=args.warmup, repeats=args.repeats)
        del loader
        gc.collect()  # a DALI pipeline reserves much address space: free it before forking DataLoader workers
    report.update(_summary(measured), repeats=args.repeats, batch_size=spec.batch_size, image_size=spec.image_size,
                  threads=spec.num_threads, prefetch=args.prefetch or "default", cpus=usable_cpus(),
                  shards=str(args.shards), load_average_1min=round(os.getloadavg()[0], 2))   # others' work
    return show(report, args.json)


def _summary(measured: dict[str, dict[str, list[float]]]) -> dict:
    """The report's figures: medians over repeats (and the rate's range), ratios between loaders."""
    def median(name: str, figure: str, digits: int) -> float:
        return spread(measured[name][figure], digits)["median"]

    report = {name: median(name, "rate", 1) for name in measured}
    report["spread_min_max"] = {name: [spread(figures["rate"], 1)[end] for end in ("min", "max")]
                                for name, figures in measured.items()}
    for key, figure, digits in (("cpu_ms_per_image", "cpu_ms", 3), ("thread_cpu_ms_per_batch", "thread_ms", 3),
                                ("feed_cpu_us_per_image", "feed_us", 2)):
        report[key] = {name: median(name, figure, digits) for name in measured
                       if key != "feed_cpu_us_per_image" or name != "reference_pil"}
    if "dali_cpu" in measured:  # what the same pipeline does on the host when its operators run on a GPU
        report["gpu_pipeline_host_us_per_image"] = median("dali_cpu", "host_us", 2)
    if "dali_cpu" in measured and "torch" in measured:
        report["dali_cpu_over_torch"] = round(report["dali_cpu"] / report["torch"], 2)
        report["cpu_cost_torch_over_dali"] = round(report["cpu_ms_per_image"]["torch"] /
                                                   report["cpu_ms_per_image"]["dali_cpu"], 2)
    return report

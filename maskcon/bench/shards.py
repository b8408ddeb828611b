"""`python launch/bench.py shards`: conversion speed of maskcon.shards against a plain webdataset loop.

Both convert the same synthetic source in the exact downsampled-ImageNet format (pickled
`train_data_batch_1..10` and `val_data`, rows of 3,072 channel-planar bytes, 1-based labels, plus the two
MaskCon mapping files), from the files on disk to finished tars, in one run:
- ours: `maskcon.shards.create("imagenet32", ...)` with a process pool over shards (all cores), which also
  shuffles, writes DALI index files, checksums and the manifest;
- plain: one process, the pickles loaded in order, every sample written with `webdataset.ShardWriter`
  (its default encoder turns the HWC array into a PNG with PIL), same samples per shard.
The images are 32 x 32 box-downsampled crops of the two photographs scikit-learn ships, so they compress
like natural images rather than like noise.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from maskcon import shards, usable_cpus
from maskcon.bench import machine, positive, show, spread
from maskcon.bench import parser as bench_parser
from maskcon.datasets.synthetic import write_imagenet32_source
from maskcon.shard_format import encode_label, split_files


def plain_loop(src: Path, out: Path, samples_per_shard: int) -> int:
    """The straightforward converter: one process, webdataset.ShardWriter, PNG by its default encoder."""
    import webdataset

    to_fine = json.loads((src / "imagenet32_to_fine.json").read_text())
    fine_to_coarse = json.loads((src / "imagenet_fine_to_coarse.json").read_text())
    written = 0
    for split, names in (("train", [f"train_data_batch_{k}" for k in range(1, 11)]), ("test", ["val_data"])):
        (out / split).mkdir(parents=True)
        index = 0
        with webdataset.ShardWriter(str(out / split / f"{split}-%06d.tar"), maxcount=samples_per_shard,
                                    verbose=0) as sink:
            for name in names:
                with open(src / name, "rb") as handle:
                    batch = pickle.load(handle, encoding="latin1")
                images = batch["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                for image, label in zip(images, batch["labels"]):
                    fine = to_fine[str(label - 1)]
                    sink.write({"__key__": str(index).zfill(7 if split == "train" else 5), "png": image,
                                "fine": encode_label(fine), "coarse": encode_label(fine_to_coarse[str(fine)])})
                    index += 1
        written += index
    return written


def ours(src: Path, out: Path, workers: int) -> int:
    manifest = shards.create("imagenet32", src, out, workers=workers)
    return sum(split["num_samples"] for split in manifest["splits"].values())


def same_images(ours_out: Path, plain_out: Path, count: int = 500) -> bool:
    """Decoded pixels and labels of `count` samples agree between the two outputs."""
    import webdataset
    from PIL import Image

    def first(out: Path, tars: list[str]) -> dict:
        found = {}
        for sample in webdataset.WebDataset(tars, shardshuffle=False, empty_check=False):
            found[sample["__key__"]] = (np.asarray(Image.open(io.BytesIO(sample["png"]))), sample["fine"])
        return found

    mine = first(ours_out, split_files(ours_out, "test")[0])
    theirs = first(plain_out, sorted(str(p) for p in (plain_out / "test").glob("*.tar")))
    keys = sorted(theirs)[:count]
    return len(mine) == len(theirs) and all(np.array_equal(mine[k][0], theirs[k][0]) and mine[k][1] == theirs[k][1]
                                            for k in keys)


def main(argv: list[str]) -> int:
    parser = bench_parser("shards", __doc__)
    parser.add_argument("--train-images", type=int, default=100_000)
    parser.add_argument("--val-images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="processes for ours (default: all cores)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/maskcon-bench-shards"),
                        help="where the synthetic source (kept for reruns) and outputs go")
    args = parser.parse_args(argv)
    positive(args, "train_images", "val_images", "repeats")
    import webdataset  # noqa: F401  imported here, so that its import (it loads torch) is not timed

    workers, src = args.workers or usable_cpus(), args.workdir / "source"
    print(f"writing the synthetic ImageNet32 source ({args.train_images} + {args.val_images} images) to {src}",
          file=sys.stderr, flush=True)
    write_imagenet32_source(src, args.train_images, args.val_images)
    samples_per_shard = shards.shard_size(args.train_images)
    load_before = os.getloadavg()[0]  # other work on the machine slows every converter alike
    runs = {"ours": lambda out: ours(src, out, workers), "ours_1_process": lambda out: ours(src, out, 1),
            "plain": lambda out: plain_loop(src, out, samples_per_shard)}
    rates, cpu_times, counts, sizes = ({name: [] for name in runs} for _ in range(4))  # CPU: this process's
    for repeat in range(args.repeats):
        for name, run in runs.items():
            out = args.workdir / name
            shutil.rmtree(out, ignore_errors=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            counts[name] = run(out)
            rates[name].append(counts[name] / (time.perf_counter() - start))
            cpu_times[name].append(time.process_time() - cpu_start)
            sizes[name] = round(sum(p.stat().st_size for p in out.rglob("*.tar")) / 1e6, 2)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {counts[name]} images, {rates[name][-1]:.0f}/s",
                  file=sys.stderr, flush=True)
    median = {name: statistics.median(rate) for name, rate in rates.items()}
    agree = same_images(args.workdir / "ours", args.workdir / "plain")
    report = {
        "machine": machine(), "python": platform.python_version(),
        "images": counts["ours"], "workers": workers, "repeats": args.repeats,
        "converters": {"ours": f"maskcon.shards.create, {workers} processes", "ours_1_process": "the same, 1 process",
                       "plain": "webdataset.ShardWriter in one process, PNG by its default encoder"},
        "images_per_s": {name: spread(rate, 0) for name, rate in rates.items()}, "tar_mb": sizes,
        "speedup_median": round(median["ours"] / median["plain"], 2),
        "speedup_1_process": round(median["ours_1_process"] / median["plain"], 2),
        # one-process runs only (the pool's workers are not this process): load-independent CPU cost
        "images_per_cpu_s": {name: round(counts[name] / statistics.median(cpu_times[name]))
                             for name in ("ours_1_process", "plain")},
        "same_pixels_and_labels": agree,
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
    }
    show(report, args.json)
    return 0 if agree else 1

"""Shards in object storage: `python launch/bench.py remote [--url s3://BUCKET/PREFIX] [--images N]`.

Writes N synthetic ImageNet32-format training images as shards, uploads them (to --url, or to a local
S3-compatible server it starts: moto's, from the test extra), then reports, each the median of --repeats
    staging_mb_per_s      a cold cache: maskcon.remote.stage, every file downloaded and checked (sha256)
    local_copy_mb_per_s   the same folder copied on local disk (shutil.copytree): what the node's disk allows
    first_batch_s         from build_run (the trainer's builder: shards, plan, loaders, learner) to the first
                          training batch, on the warm cache and on the local folder, and their ratio
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskcon.bench import command, machine, show
from maskcon.bench import parser as bench_parser
from maskcon.datasets.synthetic import write_synthetic_imagenet32
from maskcon.dist import free_port
from maskcon.errors import UserError


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = bench_parser("remote", __doc__, allow_abbrev=False)
    parser.add_argument("--url", default=None, help="a writable s3:// folder (default: a local moto server)")
    parser.add_argument("--images", type=int, default=20_000, help="synthetic training images (default 20000)")
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def _local_server(log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    try:
        import moto  # noqa: F401
    except ImportError:
        raise UserError("the local S3 server needs moto[server] (pip install -e \".[test]\"), or pass --url") from None
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
                                  stdout=handle, stderr=handle)
    deadline = time.monotonic() + 60
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            raise UserError(f"the local S3 server did not start: {log.read_text()[-500:]}")
        time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return server, "s3://bench/imagenet32"


def _upload(folder: Path, url: str) -> None:
    from maskcon import remote

    fs, root = remote.filesystem(url)
    names = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    for name in [name for name in names if name != "manifest.json"] + ["manifest.json"]:
        fs.put_file(str(folder / name), f"{root}/{name}")


def _first_batch_s(shards: str, cache: Path, scratch: Path) -> float:
    """Seconds from build_run to the first training batch, as the trainer builds a run."""
    from maskcon import rundir
    from maskcon.config import parse_config
    from maskcon.run import build_run, make_accelerator

    output = Path(tempfile.mkdtemp(dir=scratch, prefix="run-"))
    config = parse_config(["--dataset", "imagenet32", "--shards", shards, "--shard-cache", str(cache),
                           "--output-dir", str(output), "--pretrained", "none", "--wandb", "disabled",
                           "--batch-size", "256", "--eval-untrained", "false"])
    started = time.perf_counter()
    run = build_run(config, make_accelerator(config))
    next(iter(run.train_loader))
    seconds = time.perf_counter() - started
    run.tracker.close()
    rundir.release()
    return seconds


def measure(url: str, folder: Path, scratch: Path, repeats: int) -> dict:
    from maskcon import remote

    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    staging, copying = [], []
    for repeat in range(repeats):
        started = time.perf_counter()
        remote.stage(url, scratch / f"cold-{repeat}", show_progress=False, log=lambda line: None)
        staging.append(size / 1e6 / (time.perf_counter() - started))
        started = time.perf_counter()
        shutil.copytree(folder, scratch / f"copy-{repeat}")
        copying.append(size / 1e6 / (time.perf_counter() - started))
    warm, local = [], []
    _first_batch_s(str(folder), scratch / "unused", scratch)   # once untimed: imports and first-use set-up
    for _ in range(repeats):   # alternating, so that both see the same machine
        warm.append(_first_batch_s(url, scratch / "cold-0", scratch))
        local.append(_first_batch_s(str(folder), scratch / "unused", scratch))
    first_warm, first_local = statistics.median(warm), statistics.median(local)
    return {"benchmark": "remote", "machine": machine(), "url": url, "megabytes": round(size / 1e6, 1),
            "staging_mb_per_s": round(statistics.median(staging), 1),
            "local_copy_mb_per_s": round(statistics.median(copying), 1),
            "first_batch_s": {"warm_cache": round(first_warm, 2), "local": round(first_local, 2),
                              "ratio": round(first_warm / first_local, 3)}}


def main(argv: list[str]) -> int:
    args = _parse(argv)
    with tempfile.TemporaryDirectory(prefix="maskcon-bench-remote-") as scratch:
        scratch = Path(scratch)
        server, url = _local_server(scratch / "s3.log") if args.url is None else (None, args.url.rstrip("/"))
        try:
            folder = write_synthetic_imagenet32(scratch / "local", num_train=args.images,
                                                num_test=max(100, args.images // 50))
            _upload(folder, url)
            report = measure(url, folder, scratch, args.repeats)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    report["command"] = command("remote", argv)
    return show(report, args.json)

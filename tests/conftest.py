"""Shared fixtures: the bundled digits as shards, synthetic shards, a tiny learner built by the trainer's own
builder, a free TCP port, the two-process gloo harness, the skip of GPU tests on machines without one, and the
number of workers of `pytest -n auto`.

Worker functions of the gloo harness run in spawned processes, where fixtures do not exist: they import the
plain functions of this module (`tiny_learner`, `free_port`) from `tests.conftest`.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from maskcon.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 60    # every process of a harness run must have ended by then (a hang fails instead of blocking)


def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto`: a worker per core this process may use, at most four (each worker holds a PyTorch, and
    many tests start processes of their own)."""
    from maskcon import usable_cpus

    return max(1, min(usable_cpus(), 4))


def pytest_configure(config) -> None:
    """Ctrl-C as a terminal gives it: a suite started in the background (`pytest ... &` in a script) inherits
    SIGINT ignored, and so would every process a test starts, which then could not be stopped by the Ctrl-C
    that tests send. A handler here is reset to the default in each process a test starts."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly where PyTorch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_config(*options: str):
    """The digits preset made tiny (8-pixel inputs, a bank of 64 keys, no pretrained weights), then
    `options` (command-line words) on top."""
    from maskcon.config import parse_config

    return parse_config(["--image-size", "8", "--queue-size", "64", "--pretrained", "none", "--wandb", "disabled",
                         *options])


def tiny_learner(*options: str, num_coarse: int | None = None, seed: int = 0):
    """A small learner built as the trainer builds it (`maskcon.run.build_model`), from `tiny_config(*options)`;
    the torch seed is set first, so equal seeds give equal learners."""
    from maskcon.run import build_model

    torch.manual_seed(seed)
    return build_model(tiny_config(*options), num_coarse)


def _gloo_process(rank: int, fn, world_size: int, port: int, init: str, args: tuple) -> None:
    """One process of `run_gloo`: a gloo process group (init "gloo"), or the environment `accelerate launch`
    gives its workers (init "env": Accelerate starts the group), then fn(rank, *args)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if init == "env":
        fn(rank, *args)
        return
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=30))
    try:
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_gloo(fn, *args, world_size: int = 2, init: str = "gloo", guard_s: float = HANG_GUARD_S) -> None:
    """fn(rank, *args) in `world_size` spawned processes of one process group on 127.0.0.1; fails the test
    when a process fails, or when they have not all ended after guard_s seconds (a collective that hangs)."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_gloo_process, args=(fn, world_size, free_port(), init, args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + guard_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world_size}-process run did not end within {guard_s} s (a collective hangs)")


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory, request) -> Iterator[Path]:
    """A folder for the runs a module's tests share. It goes when the module's tests are done, unless one of
    them failed: a run's checkpoints weigh ~100 MB each, and a whole suite's would fill a small disk."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed_before = request.session.testsfailed
    yield folder
    if request.session.testsfailed == failed_before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The bundled handwritten digits as shards (1,437 training and 360 test images, 10 digits in 2 groups)."""
    from maskcon import shards

    folder = tmp_path_factory.mktemp("shards") / "digits"
    shards.create("digits", None, folder)
    return folder


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """CIFAR-like 32x32 shards: 256 training and 201 test images (an odd count, so two processes evaluate
    parts of different sizes), fine label i % 10 in coarse group (i % 10) // 5."""
    from maskcon.datasets.synthetic import cifar_like_image, write_synthetic_shards

    return write_synthetic_shards(tmp_path_factory.mktemp("synthetic") / "shards", num_train=256, num_test=201,
                                  image=cifar_like_image, labels=lambda i: (i % 10, i % 10 // 5), num_fine=10,
                                  num_coarse=2, samples_per_shard=40)


def stop_while_loading(argv: list[str], *, library: str = "libtorch_cpu.so", env: dict | None = None):
    """Run `python ARGV` from the project's root and send it SIGINT (Ctrl-C) as soon as it has mapped LIBRARY,
    while its imports are under way; (exit status, stdout, stderr)."""
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if library in Path(f"/proc/{process.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err

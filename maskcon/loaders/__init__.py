"""Loaders: shards -> batches of (query view, key view, labels) for training, one view for testing.

Two back ends read the same shards with the same recipes (maskcon/recipes.py):
    "dali"   maskcon/loaders/dali.py: DALI pipelines, on the GPU or (device CPU) on the CPU
    "torch"  maskcon/loaders/torch_backend.py: torchvision transforms in a torch DataLoader; the reference
What both share (reading samples, epoch plans, test parts) is maskcon/loaders/split.py; design notes are in
maskcon/loaders/DESIGN.md.
What each loader yields is in the docstrings of build_train_loader and build_test_loader below; the shards
they read are described in maskcon/shard_format.py (and shards/README.md).
"""

from __future__ import annotations

from pathlib import Path

from maskcon.errors import UserError
from maskcon.loaders.spec import (BACKENDS, LOADER_DEFAULTS, LoaderDefaults, LoaderSpec, TestBatch, TrainBatch,
                                  loader_defaults)
from maskcon.loaders.split import SplitFiles, read_split

__all__ = ["BACKENDS", "LOADER_DEFAULTS", "LoaderDefaults", "LoaderSpec", "SplitFiles", "TestBatch", "TrainBatch",
           "build_test_loader", "build_train_loader", "check_batch_fits", "loader_defaults", "read_split"]


def check_batch_fits(num_samples: int, world_size: int, batch_size: int) -> None:
    """UserError unless each of `world_size` processes gets at least one batch of the train split."""
    if num_samples // world_size < batch_size:
        raise UserError(f"the train split has {num_samples} samples: too few for {world_size} process(es) of "
                        f"batch {batch_size}; lower the batch size")


def build_train_loader(shards: Path | str, spec: LoaderSpec):
    """One epoch per `for batch in loader`: TrainBatch dicts, {"query", "key": float32 N x 3 x S x S, "fine",
    "coarse": int64 N}, the views in the spec's memory format.

    len(loader) is the number of steps per epoch, (num_samples // world_size) // batch_size on every rank;
    each rank reads its own part of the shards, a new one each epoch. `loader.set_epoch(e, start=0)` (any int
    e, negative ones included) makes the next `for` yield batches start..len(loader)-1 of epoch e, identical to
    those of a full pass, without reading or augmenting the skipped ones: its data order and augmentations
    depend only on (seed, rank, world_size, e), whatever was read before; without `set_epoch` each `for` yields
    the epoch after the previous one, from 0. `loader.feed_cpu_seconds` (float) is the CPU time of all the
    loader's host feeding work so far, wherever it ran (feeding thread, decoding threads, workers).
    """
    manifest, split = read_split(shards, "train")
    spec = spec.for_dataset(manifest["dataset"])
    check_batch_fits(split.num_samples, spec.world_size, spec.batch_size)
    train_loader, _ = _backend(spec)
    return train_loader(split, spec)


def build_test_loader(shards: Path | str, spec: LoaderSpec):
    """TestBatch dicts, {"image": float32 N x 3 x S x S, "fine", "coarse", "index": int64 N}; over all ranks
    every test sample exactly once.

    `index` is the sample's position in the test split. All ranks yield len(loader) batches; a rank whose
    part is shorter may end with a shorter (possibly empty) batch. The spec's recipe defaults to the manifest's
    dataset; `feed_cpu_seconds` as for build_train_loader.
    """
    manifest, split = read_split(shards, "test")
    _, test_loader = _backend(spec)
    return test_loader(split, spec.for_dataset(manifest["dataset"]))


def _backend(spec: LoaderSpec) -> tuple[type, type]:
    """The (train, test) loader classes of the spec's back end."""
    if spec.backend == "dali":
        from maskcon.loaders import dali

        dali.require_dali()
        return dali.DaliTrainLoader, dali.DaliTestLoader
    from maskcon.loaders import torch_backend

    return torch_backend.TorchTrainLoader, torch_backend.TorchTestLoader

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

from dataclasses import dataclass
from pathlib import Path

import torch

from maskcon import recipes
from maskcon.errors import UserError
from maskcon.loaders.split import SplitFiles, read_split

__all__ = ["BACKENDS", "LOADER_DEFAULTS", "LoaderDefaults", "SplitFiles", "build_test_loader", "build_train_loader",
           "check_batch_fits", "loader_defaults", "read_split"]

BACKENDS = ("dali", "torch")


@dataclass(frozen=True)
class LoaderDefaults:
    """threads: DALI's CPU threads (they also decode a resident dataset once) or DataLoader workers;
    prefetch: prepared batches the DALI feeding thread keeps queued, or batches per DataLoader worker."""

    threads: int
    prefetch: int


# By the largest image side of a dataset. 32-px sets (pixels resident, a few cheap operators per image): 2
# threads and 4 prepared batches (6 MB each) measured best on the CPU (BENCHMARKS.md, "Two-view loading": 1
# thread 1,914 images/s, prefetch 1 / 2 / 4 with 2 threads 3,509 / 2,568 / 5,074, on a shared machine). The
# photographs (JPEG decoding dominates): 8 threads and 3 batches, not yet measured (no GPU was at hand).
LOADER_DEFAULTS = {64: LoaderDefaults(threads=2, prefetch=4), 10**9: LoaderDefaults(threads=8, prefetch=3)}


def loader_defaults(image_size: int) -> LoaderDefaults:
    """The LOADER_DEFAULTS row for images of side `image_size`."""
    return LOADER_DEFAULTS[min(side for side in LOADER_DEFAULTS if image_size <= side)]


def _check(backend: str, batch_size: int, rank: int, world_size: int, image_size: int, num_samples: int,
           what: str) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown loader backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if batch_size < 1 or image_size < 1:
        raise UserError(f"batch size and image size must be positive, got {batch_size} and {image_size}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0..{world_size - 1}")
    if what == "train":
        check_batch_fits(num_samples, world_size, batch_size)


def check_batch_fits(num_samples: int, world_size: int, batch_size: int) -> None:
    """UserError unless each of `world_size` processes gets at least one batch of the train split."""
    if num_samples // world_size < batch_size:
        raise UserError(f"the train split has {num_samples} samples: too few for {world_size} process(es) of "
                        f"batch {batch_size}; lower the batch size")


def _threads(image_size: int, num_threads: int | None, prefetch: int | None) -> dict:
    defaults = loader_defaults(image_size)
    if (num_threads is not None and num_threads < 0) or (prefetch is not None and prefetch < 1):
        raise UserError(f"loader threads must be >= 0 and prefetch >= 1, got {num_threads} and {prefetch}")
    return {"num_threads": defaults.threads if num_threads is None else num_threads,
            "prefetch": defaults.prefetch if prefetch is None else prefetch}


def _recipe(recipe: str | recipes.Recipe) -> recipes.Recipe:
    if isinstance(recipe, recipes.Recipe):  # a recipe of one's own (tests, experiments): validated the same way
        recipes.validate({recipe.name: recipe})
        return recipe
    from maskcon.datasets import recipe_for

    return recipe_for(recipe)


def build_train_loader(shards: Path | str, *, recipe: str | recipes.Recipe, image_size: int, batch_size: int,
                       rank: int, world_size: int, seed: int, device: torch.device | str, backend: str,
                       query_view: str = "strong", key_view: str = "weak", num_threads: int | None = None,
                       prefetch: int | None = None, channels_last: bool = False):
    """One epoch per `for batch in loader`: {"query", "key": float32 N x 3 x S x S, "fine", "coarse": int64 N},
    the views in channels-last memory format with `channels_last` (the layout a channels-last model wants).

    len(loader) is the number of steps per epoch, (num_samples // world_size) // batch_size on every rank;
    each rank reads its own part of the shards, a new one each epoch. `loader.set_epoch(e, start=0)` (any int
    e, negative ones included) makes the next `for` yield batches start..len(loader)-1 of epoch e, identical to
    those of a full pass, without reading or augmenting the skipped ones: its data order and augmentations
    depend only on (seed, rank, world_size, e), whatever was read before; without `set_epoch` each `for` yields
    the epoch after the previous one, from 0. `loader.feed_cpu_seconds` (float) is the CPU time of all the
    loader's host feeding work so far, wherever it ran (feeding thread, decoding threads, workers).
    `recipe` names a dataset (its recipe, maskcon/datasets) or is a Recipe of one's own; `num_threads` is
    DALI's CPU threads or the number of DataLoader workers (0: transforms in this process) and `prefetch` the
    batches prepared ahead (loader_defaults(image_size) where None).
    """
    device = torch.device(device)
    chosen = _recipe(recipe)
    for view in (query_view, key_view):
        chosen.view(view)
    manifest, split = read_split(shards, "train")
    _check(backend, batch_size, rank, world_size, image_size, split.num_samples, "train")
    options = dict(image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed,
                   device=device, query_view=query_view, key_view=key_view, channels_last=channels_last,
                   **_threads(image_size, num_threads, prefetch))
    if backend == "dali":
        from maskcon.loaders import dali

        dali.require_dali()
        return dali.DaliTrainLoader(split, chosen, **options)
    from maskcon.loaders import torch_backend

    return torch_backend.TorchTrainLoader(split, chosen, **options)


def build_test_loader(shards: Path | str, *, image_size: int, batch_size: int, rank: int, world_size: int,
                      device: torch.device | str, backend: str, recipe: str | recipes.Recipe | None = None,
                      num_threads: int | None = None, prefetch: int | None = None, channels_last: bool = False):
    """{"image": float32 N x 3 x S x S, "fine", "coarse", "index": int64 N} batches; over all ranks every test
    sample exactly once.

    `index` is the sample's position in the test split. All ranks yield len(loader) batches; a rank whose
    part is shorter may end with a shorter (possibly empty) batch. `recipe` defaults to the manifest's dataset;
    `channels_last`, `num_threads`, `prefetch` and `feed_cpu_seconds` as for build_train_loader.
    """
    device = torch.device(device)
    manifest, split = read_split(shards, "test")
    chosen = _recipe(recipe or manifest["dataset"])
    _check(backend, batch_size, rank, world_size, image_size, split.num_samples, "test")
    options = dict(image_size=image_size, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                   channels_last=channels_last, **_threads(image_size, num_threads, prefetch))
    if backend == "dali":
        from maskcon.loaders import dali

        dali.require_dali()
        return dali.DaliTestLoader(split, chosen, **options)
    from maskcon.loaders import torch_backend

    return torch_backend.TorchTestLoader(split, chosen, **options)

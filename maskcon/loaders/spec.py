"""What a loader is built from, and what it yields.

LoaderSpec: one frozen record per run (recipe, image size, batch, rank, processes, device, threads, prefetch,
memory format, seed); the run resolves it once and builds both loaders, train and test, from it (the test
loader with the evaluation batch). The batches are TrainBatch and TestBatch dicts; the blank forms keep a
process in step with the others when it has nothing to give (a failed loader, an exhausted test part).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict

import torch

from maskcon import recipes
from maskcon.errors import UserError

BACKENDS = ("dali", "torch")


class TrainBatch(TypedDict):
    """Two views of N samples, float32 N x 3 x S x S in the loader's memory format, and their labels, int64 N."""

    query: torch.Tensor
    key: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor


class TestBatch(TypedDict):
    """One view of N test samples, their labels and their positions in the test split (`index`)."""

    image: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class LoaderDefaults:
    """threads: DALI's CPU threads or DataLoader workers (a resident dataset's one decoding before training
    takes every CPU the process may use);
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


@dataclass(frozen=True)
class LoaderSpec:
    """Everything but the shards that a train or test loader is built from, checked and resolved on creation.

    recipe: a dataset's name (its recipe, maskcon/datasets), a Recipe of one's own, or None for the recipe of
    the dataset the shards' manifest names; query_view and key_view: the recipe's views of a training pair;
    num_threads: DALI's CPU threads or DataLoader workers (0: transforms in this process) and prefetch: the
    batches prepared ahead (loader_defaults(image_size) where None); channels_last: the images' memory format,
    decided here only (the model is put in the same one)."""

    image_size: int
    batch_size: int
    recipe: str | recipes.Recipe | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device | str = "cpu"
    backend: str = "dali"
    seed: int = 0
    num_threads: int | None = None
    prefetch: int | None = None
    channels_last: bool = False
    query_view: str = "strong"
    key_view: str = "weak"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown loader backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.batch_size < 1 or self.image_size < 1:
            raise UserError(f"batch size and image size must be positive, got {self.batch_size} and "
                            f"{self.image_size}")
        if not 0 <= self.rank < self.world_size:
            raise UserError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if (self.num_threads is not None and self.num_threads < 0) or (self.prefetch is not None and
                                                                       self.prefetch < 1):
            raise UserError(f"loader threads must be >= 0 and prefetch >= 1, got {self.num_threads} and "
                            f"{self.prefetch}")
        defaults = loader_defaults(self.image_size)
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "num_threads", defaults.threads if self.num_threads is None else self.num_threads)
        object.__setattr__(self, "prefetch", defaults.prefetch if self.prefetch is None else self.prefetch)
        if self.recipe is not None:
            chosen = _recipe(self.recipe)
            for view in (self.query_view, self.key_view):
                chosen.view(view)
            object.__setattr__(self, "recipe", chosen)

    def replace(self, **changes) -> LoaderSpec:
        """This spec with `changes` (the test loader's: its batch size)."""
        return dataclasses.replace(self, **changes)

    def for_dataset(self, dataset: str) -> LoaderSpec:
        """This spec, with the recipe of `dataset` where it has none."""
        return self if self.recipe is not None else self.replace(recipe=dataset)

    def blank_train_batch(self) -> TrainBatch:
        """A training batch of zeros: the shapes, dtypes, device and memory format of a real one."""
        def labels() -> torch.Tensor:
            return torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)

        return {"query": self._images(self.batch_size), "key": self._images(self.batch_size), "fine": labels(),
                "coarse": labels()}

    def blank_test_batch(self) -> TestBatch:
        """The batch a rank yields after its part is exhausted: no samples, the shapes and dtypes of a real one."""
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        return {"image": self._images(0), "fine": empty, "coarse": empty, "index": empty}

    def _images(self, count: int) -> torch.Tensor:
        images = torch.zeros(count, 3, self.image_size, self.image_size, device=self.device)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def _recipe(recipe: str | recipes.Recipe) -> recipes.Recipe:
    if isinstance(recipe, recipes.Recipe):  # a recipe of one's own (tests, experiments): validated the same way
        recipes.validate({recipe.name: recipe})
        return recipe
    from maskcon.datasets import recipe_for

    return recipe_for(recipe)

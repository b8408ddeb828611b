"""The torchvision back end: the reference the DALI pipelines are tested against.

TORCHVISION_OPS maps every op of maskcon/recipes.py to its torchvision transform (checked at import).
Samples are read from the WebDataset tars at the offsets their DALI index files give, so a map-style
Dataset can draw a new global permutation every epoch; each rank takes its own slice of it, of the same
length on every rank. Images are decoded once per sample (PIL) and both views are made from the decoded
uint8 tensor with torchvision transforms built from the recipe table, the RNG seeded per sample.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler

from maskcon.errors import UserError
from maskcon.loaders.spec import LoaderSpec
from maskcon.loaders.split import (EpochCursor, SplitFiles, TarSamples, decode_image, epoch_positions, epoch_seed,
                                   test_batches, test_part)
from maskcon.recipes import Recipe, Step, blur_kernel_size, check_implementations


# Imported once by the fork server, so that each worker forked from it starts without importing them.
FORKSERVER_PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "numpy", "maskcon.loaders.torch_backend"]


def worker_context(workers: int):
    """Start DataLoader workers from a fork server: forking a process that holds a DALI pipeline (tens of
    GB of address space) can fail with ENOMEM, and a fork server never holds one. The fork server preloads
    torch, torchvision, PIL and this module (effective when it has not started yet), and workers receive
    only the shard file names, so all workers start at once instead of one after another."""
    if workers <= 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


# op name -> (params, output side S) -> a transform of uint8 3 x H x W tensors (semantics: maskcon/recipes.py)
TORCHVISION_OPS = {
    "random_resized_crop": lambda p, size: T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"],
                                                               antialias=True),
    "resize": lambda p, size: T.Resize((size, size), antialias=True),
    "horizontal_flip": lambda p, size: T.RandomHorizontalFlip(p["p"]),
    "auto_augment": lambda p, size: T.AutoAugment(T.AutoAugmentPolicy.CIFAR10),
    "random_perspective": lambda p, size: T.RandomPerspective(distortion_scale=p["distortion"], p=p["p"]),
    "color_jitter": lambda p, size: T.RandomApply([T.ColorJitter(p["brightness"], p["contrast"], p["saturation"],
                                                                 p["hue"])], p=p["p"]),
    "random_grayscale": lambda p, size: T.RandomGrayscale(p["p"]),
    "gaussian_blur": lambda p, size: T.RandomApply([T.GaussianBlur(blur_kernel_size(p["sigma"][1], size),
                                                                   sigma=p["sigma"])], p=p["p"]),
}
check_implementations(TORCHVISION_OPS, "torchvision")


def view_transform(steps: tuple[Step, ...], recipe: Recipe, size: int) -> T.Compose:
    """uint8 3 x H x W tensor -> normalised float32 3 x size x size, following the recipe's steps."""
    return T.Compose([*(TORCHVISION_OPS[step.op](step.params, size) for step in steps),
                      T.ConvertImageDtype(torch.float32), T.Normalize(recipe.mean, recipe.std)])


def decode_sample(samples: TarSamples, position: int, data: bytes) -> torch.Tensor:
    """uint8 3 x H x W pixels of a sample (split.decode_image: a UserError naming the shard and the sample when
    the bytes are not an image or declare too many pixels)."""
    return torch.from_numpy(decode_image(samples, position, data).copy()).permute(2, 0, 1)


class TwoViewDataset(Dataset):
    """Item (position, seed) -> both views of one decoded image, augmented from the global torch RNG seeded
    with `seed` (so results do not depend on the number of workers; the caller's RNG state is restored)."""

    def __init__(self, samples: TarSamples, query: T.Compose, key: T.Compose):
        self.samples, self.query, self.key = samples, query, key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        started = time.thread_time()
        position, seed = item
        data, fine, coarse = self.samples.read(position)
        image = decode_sample(self.samples, position, data)  # one decode, two views
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only (transforms draw from it)
            query, key = self.query(image), self.key(image)
        return {"query": query, "key": key, "fine": fine, "coarse": coarse,
                FEED_CPU: time.thread_time() - started}


class EvalDataset(Dataset):
    def __init__(self, samples: TarSamples, transform: T.Compose):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> dict:
        started = time.thread_time()
        data, fine, coarse = self.samples.read(position)
        image = decode_sample(self.samples, position, data)
        return {"image": self.transform(image), "fine": fine, "coarse": coarse, "index": position,
                FEED_CPU: time.thread_time() - started}


class EpochSampler(Sampler):
    """The positions of epoch_positions for `epoch` from position `start` on, each with an augmentation seed
    from (seed, epoch, rank, place in the epoch): batches depend on nothing but those."""

    def __init__(self, num_samples: int, *, per_rank: int, rank: int, seed: int):
        self.num_samples, self.per_rank, self.rank, self.seed = num_samples, per_rank, rank, seed
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        positions = epoch_positions(self.num_samples, per_rank=self.per_rank, rank=self.rank, seed=self.seed,
                                    epoch=self.epoch)
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch, self.rank, 1))
        seeds = rng.integers(0, 2**62, len(positions))
        return iter(zip(positions[self.start:].tolist(), seeds[self.start:].tolist()))


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    """The batch on `device`; 4-d images in channels-last memory format with `channels_last`."""
    moved = {}
    for name, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        moved[name] = value
    return moved


FEED_CPU = "feed_cpu_seconds"  # per sample: CPU seconds of the thread that read, decoded and augmented it


class _FeedClock:
    """Counts a DataLoader's host feeding work: the CPU time (time.thread_time) its workers report per sample,
    plus that of the consuming thread inside next() (collation, copies; all the work without workers)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.seconds = 0.0

    def batches(self, loader: DataLoader):
        stream = _batches(loader)
        while True:
            started = time.thread_time()
            try:
                batch = next(stream)
            except StopIteration:
                return
            reported = batch.pop(FEED_CPU)
            self.seconds += time.thread_time() - started + (float(reported.sum()) if self.workers else 0.0)
            yield batch


def _data_loader(dataset: Dataset, spec: LoaderSpec, *, sampler, drop_last: bool) -> tuple[_FeedClock, DataLoader]:
    """The DataLoader of `dataset` with the spec's batch, workers (its num_threads; 0 runs the transforms in
    the calling process, and workers persist between passes) and prefetch, and the clock of its feeding."""
    workers = spec.num_threads
    loader = DataLoader(dataset, batch_size=spec.batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=spec.device.type == "cuda",
                        prefetch_factor=spec.prefetch if workers else None,
                        multiprocessing_context=worker_context(workers))
    return _FeedClock(workers), loader


def _batches(loader: DataLoader):
    """The loader's batches; a UserError raised in a worker comes back as the same one-line UserError
    (the DataLoader would wrap it in a multi-line traceback)."""
    try:
        yield from loader
    except UserError as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        prefix = "maskcon.errors.UserError: "
        raise UserError(last[len(prefix):] if last.startswith(prefix) else last) from None


class TorchTrainLoader(EpochCursor):
    """`for batch in loader` yields one epoch of {"query", "key": float32 N x 3 x S x S, "fine", "coarse": int64
    N} on `device` (channels-last strides with `channels_last`).

    The batches of epoch e depend only on (seed, rank, world_size, e): `set_epoch(e, start)` makes the next
    `iter()` yield batches start..len(loader)-1 of epoch e (the skipped samples neither read nor augmented);
    without it each `iter()` yields the epoch after the previous one, from 0. `feed_cpu_seconds`: see
    _FeedClock.
    """

    def __init__(self, split: SplitFiles, spec: LoaderSpec):
        recipe, size = spec.recipe, spec.image_size
        self.spec, self.device, self.channels_last = spec, spec.device, spec.channels_last
        self.batch_size = spec.batch_size
        self.steps = (split.num_samples // spec.world_size) // spec.batch_size
        dataset = TwoViewDataset(TarSamples(split), view_transform(recipe.view(spec.query_view), recipe, size),
                                 view_transform(recipe.view(spec.key_view), recipe, size))
        self.sampler = EpochSampler(split.num_samples, per_rank=self.steps * spec.batch_size, rank=spec.rank,
                                    seed=spec.seed)
        self.clock, self.loader = _data_loader(dataset, spec, sampler=self.sampler, drop_last=True)

    @property
    def feed_cpu_seconds(self) -> float:
        return self.clock.seconds

    def __iter__(self):
        epoch, start = self._next_pass()
        self.sampler.epoch, self.sampler.start = epoch, start * self.batch_size
        for batch in self.clock.batches(self.loader):
            yield _to_device(batch, self.device, self.channels_last)


class TorchTestLoader:
    """One view per sample; over all ranks every test sample exactly once, with its `index` in the split.
    Every rank yields the same number of batches; a rank with a shorter part may end with an empty batch."""

    def __init__(self, split: SplitFiles, spec: LoaderSpec):
        self.spec, self.device, self.channels_last = spec, spec.device, spec.channels_last
        self.batches = test_batches(split.num_samples, spec.world_size, spec.batch_size)
        dataset = EvalDataset(TarSamples(split), view_transform(spec.recipe.test, spec.recipe, spec.image_size))
        part = test_part(split.num_samples, spec.rank, spec.world_size).tolist()
        self.clock, self.loader = _data_loader(dataset, spec, sampler=part, drop_last=False)

    @property
    def feed_cpu_seconds(self) -> float:
        return self.clock.seconds

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        yielded = 0
        for batch in self.clock.batches(self.loader):
            yielded += 1
            yield _to_device(batch, self.device, self.channels_last)
        for _ in range(self.batches - yielded):
            yield self.spec.blank_test_batch()

"""The torchvision back end: the reference the DALI pipelines are tested against.

Samples are read from the WebDataset tars at the offsets their DALI index files give, so a map-style
Dataset can draw a new global permutation every epoch; each rank takes its own slice of it, of the same
length on every rank. Images are decoded once per sample (PIL) and both views are made from the decoded
uint8 tensor with torchvision transforms built from the recipe table, the RNG seeded per sample.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler
from PIL import Image

from maskcon.errors import UserError
from maskcon.loaders import SplitFiles
from maskcon.recipes import Recipe, Step


def worker_context(workers: int):
    """Start DataLoader workers from a fork server: forking a process that holds a DALI pipeline (tens of
    GB of address space) can fail with ENOMEM, and a fork server never holds one."""
    return "forkserver" if workers > 0 else None


class TarSamples:
    """Random access to the samples of one split: (image bytes, fine, coarse) by position in the split.

    Holds only paths and offsets, so it pickles cheaply into DataLoader workers; files open lazily per process.
    """

    def __init__(self, split: SplitFiles):
        self.tars = list(split.tars)
        rows = []  # per sample: tar number, then (offset, size) of image, fine, coarse
        for number, index in enumerate(split.indexes):
            with open(index) as handle:
                header = handle.readline().split()
                for line in handle:
                    fields = line.split()
                    members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
                    image = members.get("png") or members.get("jpg")
                    if image is None or "fine" not in members or "coarse" not in members:
                        raise UserError(f"a sample in {index} lacks an image, fine or coarse member; "
                                        "recreate the shards")
                    rows.append((number, *image, *members["fine"], *members["coarse"]))
            if header[:1] != ["v1.2"]:
                raise UserError(f"{index} is not a DALI v1.2 index; recreate the shards")
        if len(rows) != split.num_samples:
            raise UserError(f"the index files list {len(rows)} samples but the manifest says {split.num_samples}; "
                            "recreate the shards")
        self.rows = np.array(rows, dtype=np.int64)
        self._files: dict[int, int] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):
        return {"tars": self.tars, "rows": self.rows}

    def __setstate__(self, state):
        self.__dict__.update(state, _files={}, _pid=None)

    def _read(self, tar: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # descriptors are not shared across fork
            self._files, self._pid = {}, os.getpid()
        if tar not in self._files:
            self._files[tar] = os.open(self.tars[tar], os.O_RDONLY)
        return os.pread(self._files[tar], size, offset)

    def read(self, position: int) -> tuple[bytes, int, int]:
        tar, image_offset, image_size, fine_offset, fine_size, coarse_offset, coarse_size = self.rows[position]
        image = self._read(tar, image_offset, image_size)
        fine = int.from_bytes(self._read(tar, fine_offset, fine_size), "little", signed=True)
        coarse = int.from_bytes(self._read(tar, coarse_offset, coarse_size), "little", signed=True)
        return image, fine, coarse


def _blur_kernel(sigma_high: float, size: int) -> int:
    kernel = 2 * math.ceil(3 * sigma_high) + 1  # +-3 sigma of the widest blur
    return max(1, min(kernel, size if size % 2 else size - 1))


def _step_transform(step: Step, size: int):
    p = step.params
    if step.op == "random_resized_crop":
        return T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"], antialias=True)
    if step.op == "resize":
        return T.Resize((size, size), antialias=True)
    if step.op == "horizontal_flip":
        return T.RandomHorizontalFlip(p["p"])
    if step.op == "auto_augment":
        return T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)
    if step.op == "random_perspective":
        return T.RandomPerspective(distortion_scale=p["distortion"], p=p["p"])
    if step.op == "color_jitter":
        jitter = T.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
        return T.RandomApply([jitter], p=p["p"])
    if step.op == "random_grayscale":
        return T.RandomGrayscale(p["p"])
    if step.op == "gaussian_blur":
        return T.RandomApply([T.GaussianBlur(_blur_kernel(p["sigma"][1], size), sigma=p["sigma"])], p=p["p"])
    raise UserError(f"the torchvision loader has no implementation of recipe step {step.op!r}")


def view_transform(steps: tuple[Step, ...], recipe: Recipe, size: int) -> T.Compose:
    """uint8 3 x H x W tensor -> normalised float32 3 x size x size, following the recipe's steps."""
    return T.Compose([*(_step_transform(step, size) for step in steps), T.ConvertImageDtype(torch.float32),
                      T.Normalize(recipe.mean, recipe.std)])


def decode(data: bytes) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 3 x H x W (grey sources become RGB), decoded by PIL."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


class TwoViewDataset(Dataset):
    """Item (position, seed) -> both views of one decoded image, augmented from the global torch RNG seeded
    with `seed` (so results do not depend on the number of workers; the caller's RNG state is restored)."""

    def __init__(self, samples: TarSamples, query: T.Compose, key: T.Compose):
        self.samples, self.query, self.key = samples, query, key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        position, seed = item
        data, fine, coarse = self.samples.read(position)
        image = decode(data)  # one decode, two views
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only (transforms draw from it)
            query, key = self.query(image), self.key(image)
        return {"query": query, "key": key, "fine": fine, "coarse": coarse}


class EvalDataset(Dataset):
    def __init__(self, samples: TarSamples, transform: T.Compose):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> dict:
        data, fine, coarse = self.samples.read(position)
        return {"image": self.transform(decode(data)), "fine": fine, "coarse": coarse, "index": position}


class EpochSampler(Sampler):
    """A new permutation of the whole split each epoch (seeded by seed and epoch, the same on every rank);
    rank r takes the r-th of world_size equal slices of steps * batch_size positions. Yields
    (position, augmentation seed), the seed drawn from (seed, rank, epoch)."""

    def __init__(self, num_samples: int, *, per_rank: int, rank: int, seed: int):
        self.num_samples, self.per_rank, self.rank, self.seed = num_samples, per_rank, rank, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        positions = permutation[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()
        augmentation = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank + 1)
        seeds = torch.randint(0, 2**62, (len(positions),), generator=augmentation).tolist()
        return iter(zip(positions, seeds))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _workers(num_threads: int) -> int:
    """DataLoader worker processes: num_threads (0 runs the transforms in the calling process)."""
    return max(0, int(num_threads))


class TorchTrainLoader:
    """`for batch in loader` yields one epoch of {"query", "key", "fine", "coarse"} on `device`."""

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int, device: torch.device, query_view: str, key_view: str,
                 num_threads: int):
        self.device = device
        self.steps = (split.num_samples // world_size) // batch_size
        dataset = TwoViewDataset(TarSamples(split), view_transform(recipe.view(query_view), recipe, image_size),
                                 view_transform(recipe.view(key_view), recipe, image_size))
        self.sampler = EpochSampler(split.num_samples, per_rank=self.steps * batch_size, rank=rank, seed=seed)
        workers = _workers(num_threads)  # 0: transforms run in this process
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                 multiprocessing_context=worker_context(workers))
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        self.sampler.epoch = self.epoch
        self.epoch += 1
        for batch in self.loader:
            yield _to_device(batch, self.device)


class TorchTestLoader:
    """One view per sample; over all ranks every test sample exactly once, with its `index` in the split.
    Every rank yields the same number of batches; a rank with a shorter part may end with an empty batch."""

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, device: torch.device, num_threads: int):
        self.device = device
        self.image_size = image_size
        start = split.num_samples * rank // world_size
        stop = split.num_samples * (rank + 1) // world_size
        self.batches = math.ceil(math.ceil(split.num_samples / world_size) / batch_size)
        dataset = EvalDataset(TarSamples(split), view_transform(recipe.test, recipe, image_size))
        workers = _workers(num_threads)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=range(start, stop), num_workers=workers,
                                 pin_memory=device.type == "cuda", multiprocessing_context=worker_context(workers))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        yielded = 0
        for batch in self.loader:
            yielded += 1
            yield _to_device(batch, self.device)
        size = self.image_size
        for _ in range(self.batches - yielded):
            yield {"image": torch.empty(0, 3, size, size, device=self.device),
                   "fine": torch.empty(0, dtype=torch.int64, device=self.device),
                   "coarse": torch.empty(0, dtype=torch.int64, device=self.device),
                   "index": torch.empty(0, dtype=torch.int64, device=self.device)}

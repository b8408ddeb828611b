"""The torchvision back end: the reference the DALI pipelines are tested against.

Samples are read from the WebDataset tars at the offsets their DALI index files give, so a map-style
Dataset can draw a new global permutation every epoch; each rank takes its own slice of it, of the same
length on every rank. Images are decoded once per sample (PIL) and both views are made from the decoded
uint8 tensor with torchvision transforms built from the recipe table, the RNG seeded per sample.
"""

from __future__ import annotations

import io
import math
import mmap
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler
from PIL import Image

from maskcon.errors import UserError
from maskcon.loaders import SplitFiles
from maskcon.recipes import Recipe, Step
from maskcon.shard_format import LABEL_BYTES, decode_label, key_at, read_index, read_manifest, remedy


# Imported once by the fork server, so that each worker forked from it starts without importing them.
FORKSERVER_PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "numpy", "maskcon.loaders.torch"]


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


class TarSamples:
    """Random access to the samples of one split: (image bytes, fine, coarse) by position in the split.

    Pickles as the split's file names only (a few hundred bytes, not the sample rows), so DataLoader workers
    start at once; each process reads the index files on first use and opens the tars lazily.
    """

    def __init__(self, split: SplitFiles):
        self.split = split
        self.tars = list(split.tars)
        self._rows: np.ndarray | None = None
        self._files: dict[int, int] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._pid = None

    @property
    def rows(self) -> np.ndarray:
        """num_samples x 7 int64: tar number, then (offset, size) of the image, fine and coarse members."""
        if self._rows is None:
            self._rows = self._index_rows(self.split)
        return self._rows

    @staticmethod
    def _index_rows(split: SplitFiles) -> np.ndarray:
        # rows: per sample, tar number, then (offset, size) of image, fine, coarse
        rows = [(number, entry.image.offset, entry.image.size, entry.members["fine"].offset,
                 entry.members["fine"].size, entry.members["coarse"].offset, entry.members["coarse"].size)
                for number, index in enumerate(split.indexes) for entry in read_index(index)]
        if len(rows) != split.num_samples:
            raise UserError(f"the index files list {len(rows)} samples but the manifest says {split.num_samples}; "
                            "recreate the shards")
        return np.array(rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.split.num_samples

    def __getstate__(self):
        return {"split": self.split, "tars": self.tars}

    def __setstate__(self, state):
        self.__dict__.update(state, _rows=None, _files={}, _maps={}, _pid=None)

    def _map(self, tar: int) -> np.ndarray:
        """The whole tar file as read-only uint8 memory (shared with every process that maps it)."""
        if self._pid != os.getpid():
            self._files, self._maps, self._pid = {}, {}, os.getpid()
        if tar not in self._maps:
            with open(self.tars[tar], "rb") as handle:
                self._maps[tar] = np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ),
                                                dtype=np.uint8)
        return self._maps[tar]

    def image(self, position: int) -> np.ndarray:
        """The encoded image of a sample as a uint8 view of the mapped tar (no copy)."""
        tar, offset, size = self.rows[position, :3].tolist()
        return self._map(tar)[offset:offset + size]

    def images(self, positions: np.ndarray) -> list[np.ndarray]:
        """image() of several samples."""
        return [self._map(tar)[offset:offset + size] for tar, offset, size in self.rows[positions, :3].tolist()]

    def gather(self, positions: np.ndarray, column: int, start: int, length: int) -> np.ndarray:
        """len(positions) x length bytes at member offset + start of each sample's member whose offset is
        in rows[:, column] (1: image, 3: fine, 5: coarse)."""
        rows = self.rows[positions]
        out = np.empty((len(positions), length), dtype=np.uint8)
        for tar in np.unique(rows[:, 0]):
            selected = rows[:, 0] == tar
            out[selected] = self._map(int(tar))[rows[selected, column, None] + start + np.arange(length)]
        return out

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(fine, coarse) of every sample, int64 arrays in split order."""
        if (self.rows[:, [4, 6]] != LABEL_BYTES).any():
            raise UserError(f"a label member in {self.split.tars[0]}'s split is not {LABEL_BYTES} bytes; "
                            "recreate the shards")
        everything = np.arange(len(self))
        return tuple(self.gather(everything, column, 0, LABEL_BYTES).view("<i8")[:, 0].copy() for column in (3, 5))

    def describe(self, position: int) -> str:
        """'shard <tar>, sample <key>' of a sample, for messages."""
        tar, offset = int(self.rows[position, 0]), int(self.rows[position, 1])
        try:
            key = key_at(self.split.indexes[tar], offset)
        except UserError:
            key = None
        return f"shard {self.tars[tar]}, sample {key if key is not None else f'at byte {offset}'}"

    def decode_error(self, position: int, error: Exception) -> UserError:
        """One line: the sample whose image does not decode, and how to find and re-create damaged shards."""
        folder = Path(self.tars[0]).resolve().parent.parent
        try:
            manifest = read_manifest(folder)
        except UserError:
            manifest = None
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        return UserError(f"the image of {self.describe(position)} does not decode ({reason}); "
                         f"{remedy(folder, manifest)}")

    def _read(self, tar: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # descriptors are not shared across fork
            self._files, self._pid = {}, os.getpid()
        if tar not in self._files:
            self._files[tar] = os.open(self.tars[tar], os.O_RDONLY)
        return os.pread(self._files[tar], size, offset)

    def read(self, position: int) -> tuple[bytes, int, int]:
        tar, image_offset, image_size, fine_offset, fine_size, coarse_offset, coarse_size = self.rows[position]
        image = self._read(tar, image_offset, image_size)
        fine = decode_label(self._read(tar, fine_offset, fine_size))
        coarse = decode_label(self._read(tar, coarse_offset, coarse_size))
        return image, fine, coarse


def view_transform(steps: tuple[Step, ...], recipe: Recipe, size: int) -> T.Compose:
    """uint8 3 x H x W tensor -> normalised float32 3 x size x size, following the recipe's steps."""
    return T.Compose([*(step.kind.torchvision(step.params, size) for step in steps), T.ConvertImageDtype(torch.float32),
                      T.Normalize(recipe.mean, recipe.std)])


def decode(data: bytes) -> torch.Tensor:
    """PNG or JPEG bytes -> uint8 3 x H x W (grey sources become RGB), decoded by PIL."""
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_sample(samples: TarSamples, position: int, data: bytes) -> torch.Tensor:
    """decode(), with a UserError naming the shard and the sample when the bytes are not an image."""
    try:
        return decode(data)
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for damaged or truncated files
        raise samples.decode_error(position, error) from None


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
        image = decode_sample(self.samples, position, data)  # one decode, two views
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
        image = decode_sample(self.samples, position, data)
        return {"image": self.transform(image), "fine": fine, "coarse": coarse, "index": position}


def epoch_seed(seed: int, epoch: int, *parts: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, *parts); any int epoch (negative ones too)."""
    words = [w % 2**32 for value in (seed, epoch, *parts) for w in (value, value >> 32)]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).astype(np.uint64) @ [1, 2**32]) >> 1


def epoch_positions(num_samples: int, *, per_rank: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """Sample positions of one rank for one epoch: a permutation of the whole split drawn from (seed, epoch),
    the same on every rank, of which rank r takes the r-th slice of per_rank positions (disjoint slices)."""
    permutation = np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_samples)
    return permutation[rank * per_rank:(rank + 1) * per_rank]


class EpochSampler(Sampler):
    """The positions of epoch_positions for `epoch`, each with an augmentation seed from
    (seed, epoch, rank, step in the epoch): batches depend on nothing but those."""

    def __init__(self, num_samples: int, *, per_rank: int, rank: int, seed: int):
        self.num_samples, self.per_rank, self.rank, self.seed = num_samples, per_rank, rank, seed
        self.epoch, self.start = 0, 0   # start: samples of the epoch to leave out

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        positions = epoch_positions(self.num_samples, per_rank=self.per_rank, rank=self.rank, seed=self.seed,
                                    epoch=self.epoch).tolist()
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch, self.rank, 1))
        seeds = rng.integers(0, 2**62, len(positions)).tolist()
        return iter(zip(positions[self.start:], seeds[self.start:]))


def _to_device(batch: dict, device: torch.device) -> dict:
    return {name: value.to(device, non_blocking=True) for name, value in batch.items()}


def _workers(num_threads: int) -> int:
    """DataLoader worker processes: num_threads (0 runs the transforms in the calling process)."""
    return max(0, int(num_threads))


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


class TorchTrainLoader:
    """`for batch in loader` yields one epoch of {"query", "key", "fine", "coarse"} on `device`.

    The batches of epoch e depend only on (seed, rank, world_size, e): `set_epoch(e)` picks the epoch the
    next `iter()` yields; without it each `iter()` yields the epoch after the previous one, from 0.
    """

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int, device: torch.device, query_view: str, key_view: str,
                 num_threads: int):
        self.device, self.batch_size = device, batch_size
        self.steps = (split.num_samples // world_size) // batch_size
        dataset = TwoViewDataset(TarSamples(split), view_transform(recipe.view(query_view), recipe, image_size),
                                 view_transform(recipe.view(key_view), recipe, image_size))
        self.sampler = EpochSampler(split.num_samples, per_rank=self.steps * batch_size, rank=rank, seed=seed)
        workers = _workers(num_threads)  # 0: transforms run in this process
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                 multiprocessing_context=worker_context(workers))
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iter() yields batches start.. of epoch `epoch`, without reading the ones before."""
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self):
        self.sampler.epoch, self.sampler.start = self.epoch, self.start * self.batch_size
        self.epoch, self.start = self.epoch + 1, 0
        for batch in _batches(self.loader):
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
        # workers persist between evaluations
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=range(start, stop), num_workers=workers,
                                 persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                 multiprocessing_context=worker_context(workers))

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        yielded = 0
        for batch in _batches(self.loader):
            yielded += 1
            yield _to_device(batch, self.device)
        size = self.image_size
        for _ in range(self.batches - yielded):
            yield {"image": torch.empty(0, 3, size, size, device=self.device),
                   "fine": torch.empty(0, dtype=torch.int64, device=self.device),
                   "coarse": torch.empty(0, dtype=torch.int64, device=self.device),
                   "index": torch.empty(0, dtype=torch.int64, device=self.device)}

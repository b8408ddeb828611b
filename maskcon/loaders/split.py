"""What both loader back ends share: a split's files, reading samples from its tars, epoch plans.

Below maskcon/loaders/dali.py and maskcon/loaders/torch_backend.py (and read by maskcon/plots.py); it imports
neither. Epoch e of rank r reads `epoch_positions(...)` (a permutation of the whole split drawn from
(seed, e), sliced per rank); block b of its batches draws its augmentations from `epoch_seed(seed, e, r, b)`
(the DALI back end), or per-sample seeds are drawn from `epoch_seed(seed, e, r, 1)` (the torchvision back
end). The test split is cut into contiguous parts (`test_part`) and every rank yields `test_batches`
batches, ending with blank ones (`LoaderSpec.blank_test_batch`) where its part is shorter.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maskcon.errors import UserError
from maskcon.shard_format import (LABEL_BYTES, check_split, decode_label, image_shape, key_at, read_index,
                                  read_manifest, remedy, split_files, too_many_pixels)


@dataclass(frozen=True)
class SplitFiles:
    """One split of a shard folder: tar paths, DALI index paths (same order), samples, "png" or "jpg"."""

    tars: list[str]
    indexes: list[str]
    num_samples: int
    image_format: str


def read_split(shards: Path | str, split: str) -> tuple[dict, SplitFiles]:
    """(manifest, SplitFiles) of one split of a shard folder, after a check of every shard of the split
    against the manifest (sizes and index files; the tars are not read): UserError naming the first
    missing or damaged shard and how to re-create it."""
    manifest = read_manifest(shards)
    check_split(shards, split, manifest)
    tars, indexes = split_files(shards, split, manifest)
    num_samples = int(manifest["splits"][split]["num_samples"])
    return manifest, SplitFiles(tars, indexes, num_samples, manifest["image_format"])


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


def decode_image(samples: TarSamples, position: int, data: bytes | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB pixels of a sample's PNG or JPEG (grey sources become RGB), decoded by PIL from
    `data` (default: read from its tar). UserError naming the shard and the key when the bytes are not an
    image or its header declares more than MAX_IMAGE_PIXELS pixels (checked before decoding)."""
    from PIL import Image

    if data is None:
        data = samples.image(position).tobytes()
    try:
        problem = too_many_pixels(*image_shape(data))
        if problem is not None:
            raise ValueError(problem)
        with warnings.catch_warnings():  # PIL's own limit: a warning, then an error, both one line here
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise samples.decode_error(position, error) from None  # what PIL raises for damaged or truncated files


def epoch_seed(seed: int, epoch: int, *parts: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, *parts); any int epoch (negative ones too)."""
    words = [w % 2**32 for value in (seed, epoch, *parts) for w in (value, value >> 32)]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint32).astype(np.uint64) @ [1, 2**32]) >> 1


def epoch_positions(num_samples: int, *, per_rank: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """Sample positions of one rank for one epoch: a permutation of the whole split drawn from (seed, epoch),
    the same on every rank, of which rank r takes the r-th slice of per_rank positions (disjoint slices)."""
    permutation = np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_samples)
    return permutation[rank * per_rank:(rank + 1) * per_rank]


class EpochCursor:
    """Which pass a train loader yields next, for both back ends: `set_epoch(e, start)` names batches
    start..len(loader)-1 of epoch e; without it each pass is the epoch after the previous one, from 0.
    A subclass sets `steps` (batches per epoch) and calls `_next_pass()` when a pass begins."""

    steps = 0
    epoch = 0
    start = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.steps:
            raise ValueError(f"start {start} is outside 0..{self.steps}")
        self.epoch, self.start = int(epoch), int(start)

    def _next_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass that begins, and the default for the one after it."""
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        return epoch, start


def test_part(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Positions of the test split read by `rank`: a contiguous part, all parts together every sample once."""
    return np.arange(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def test_batches(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields over the test split (the longest part's count, so collectives stay in step)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)

"""DALI pipelines: shard tars -> decode once -> two augmented views (or one test view) -> NCHW floats.

The same graph runs on the GPU (device_id = the CUDA device; JPEG decoded by `mixed`) and on the CPU
(device_id=None), which is how CI tests it and how CPU-only users train.

Feeding. One external source hands DALI, per batch, the encoded images (read-only views of the memory-
mapped tars, at the offsets of the index files) and every random parameter of both views, drawn in numpy
by the DALI back end's ops (maskcon/loaders/dali_ops.py). The graph itself holds no random operator, and each
op kind appears once
per view with per-sample parameters (no branches over AutoAugment's sub-policies): a two-view cifar100
batch costs about 40 operators (`operator_count`). Labels never enter DALI: they are read once from the
shards and indexed in Python.

Epochs. Epoch e's batches depend only on (seed, rank, world_size, e): positions come from
split.epoch_positions (a permutation of the split drawn from (seed, e), sliced per rank: disjoint parts,
each sample at most once per epoch, the same count on every rank) and batch i's parameters from a numpy
generator seeded with (seed, e, rank, i). `set_epoch(e)` picks the next epoch; an epoch left half way is
cancelled (at most the prefetched batches are computed and dropped), so nothing iterated before changes
what comes next.
"""

from __future__ import annotations

import collections
import io
import struct

import numpy as np
import torch

from maskcon.errors import UserError
from maskcon.loaders.dali_ops import draw_view, view_graph
from maskcon.loaders.split import (SplitFiles, TarSamples, empty_test_batch, epoch_positions, epoch_seed,
                                   test_batches, test_part)
from maskcon.recipes import Recipe
from maskcon.shard_format import png_problem

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
except ImportError:  # reported by the loader builders, so the torch back end works without DALI
    fn = None

PREFETCH = 2  # batches DALI computes ahead


def require_dali() -> None:
    if fn is None:
        raise UserError("NVIDIA DALI is not installed; pip install nvidia-dali-cuda130==2.4.0, "
                        "or pick the torchvision loader (backend 'torch')")


# ------------------------------------------------------------------------------------ pipelines


def _normalise(images, recipe: Recipe, mirror):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
                                    mirror=0 if mirror is None else mirror)


def _decode(encoded, image_format: str, on_gpu: bool):
    if on_gpu and image_format == "jpg":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return images.gpu() if on_gpu else images


def _flatten(drawn: list[list[dict]]) -> list[tuple[int, int, str]]:
    return [(view, step, key) for view, steps in enumerate(drawn) for step, values in enumerate(steps)
            for key in sorted(values)]


@pipeline_def(enable_conditionals=True)
def _views_pipeline(source, names, image_format: str, recipe: Recipe, views: tuple, size: int, on_gpu: bool):
    encoded, *values = fn.external_source(source=source, num_outputs=1 + len(names), batch=True,
                                          batch_info=True)
    images = _decode(encoded, image_format, on_gpu)
    drawn = [[{} for _ in steps] for steps in views]
    for (view, step, key), value in zip(names, values):
        drawn[view][step][key] = value
    outputs = []
    for steps, parameters in zip(views, drawn):  # every view from the one decoded image
        augmented, mirror = view_graph(images, steps, parameters, size)
        outputs.append(_normalise(augmented, recipe, mirror))
    return tuple(outputs)


def operator_count(pipeline) -> int:
    """Operators in a built DALI pipeline (what a batch pays fixed costs for)."""
    return len(pipeline._ops)


def image_shapes(encoded: list[np.ndarray]) -> np.ndarray:
    """N x 2 (height, width) of PNG or JPEG bytes, read from their headers."""
    return np.array([_image_shape(data) for data in encoded], dtype=np.int64).reshape(-1, 2)


def _image_shape(data: np.ndarray) -> tuple[int, int]:
    head = bytes(data[:24])
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    if head[:2] == b"\xff\xd8":
        offset, end = 2, len(data)
        while offset + 9 < end:
            if data[offset] != 0xFF:
                offset += 1
                continue
            marker = int(data[offset + 1])
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                offset += 1 if marker == 0xFF else 2
                continue
            length = int(data[offset + 2]) << 8 | int(data[offset + 3])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height = int(data[offset + 5]) << 8 | int(data[offset + 6])
                width = int(data[offset + 7]) << 8 | int(data[offset + 8])
                return height, width
            offset += 2 + length
    return 0, 0  # not an image: DALI's decoder fails on it and _Feeder names the sample


def _to_torch(output, device: torch.device) -> torch.Tensor:
    tensor = output.as_tensor()
    if device.type == "cpu":  # a view of DALI's buffer (reused by the next run), copied by torch
        return torch.from_numpy(np.asarray(tensor)).clone()
    result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, result, cuda_stream=stream)  # ordered on the current stream: no host wait
    return result


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


class _Feeder:
    """Runs a views pipeline over planned batches of positions; shared by the train and test loaders.

    `_begin(batches, seed_parts)` plans one pass (a list of position arrays); the external source raises
    StopIteration after the last one, or at once when a pass is cancelled.
    """

    def __init__(self, split: SplitFiles, recipe: Recipe, views: tuple, *, image_size: int, batch_size: int,
                 device: torch.device, num_threads: int, seed: int):
        self.samples = TarSamples(split)
        self.fine, self.coarse = (torch.from_numpy(labels) for labels in self.samples.labels())
        self.device = device
        self.views = views
        self.image_size = image_size
        self.image_format = split.image_format
        self._shapes = np.full((split.num_samples, 2), -1, dtype=np.int64)
        self.seed = seed
        self._plan: list[np.ndarray] = []
        self._seed_parts: tuple = ()
        self._cancelled = False
        self._running = False
        self._fed: collections.deque = collections.deque()  # positions of batches handed to DALI, not yet out
        self._damaged: UserError | None = None  # a sample found damaged before DALI decoded it
        probe = [draw_view(steps, np.random.default_rng(0), np.full((1, 2), image_size), image_size)
                 for steps in views]
        self._names = _flatten(probe)
        self.pipeline = _views_pipeline(
            self._source, self._names, split.image_format, recipe, views, image_size, device.type == "cuda",
            batch_size=batch_size, num_threads=num_threads, device_id=_device_id(device), seed=seed % 2**31,
            prefetch_queue_depth=PREFETCH, exec_dynamic=True)
        self.pipeline.build()

    def _source(self, info):
        if self._cancelled or info.iteration >= len(self._plan):
            raise StopIteration
        positions = self._plan[info.iteration]
        encoded = self.samples.images(positions)
        rng = np.random.default_rng(epoch_seed(self.seed, *self._seed_parts, int(info.iteration)))
        shapes = self._image_shapes(positions, encoded)
        drawn = [draw_view(steps, rng, shapes, self.image_size) for steps in self.views]
        self._fed.append(positions)
        # one N x longest array (zeros after each image's end, which decoders ignore): a single copy into
        # DALI instead of one per sample
        padded = np.zeros((len(encoded), max(len(data) for data in encoded)), dtype=np.uint8)
        for row, data in zip(padded, encoded):
            row[:len(data)] = data
        return (padded, *(drawn[view][step][key] for view, step, key in self._names))

    def _image_shapes(self, positions: np.ndarray, encoded: list[np.ndarray]) -> np.ndarray:
        """N x 2 (height, width) of the samples, read from their headers once and kept."""
        unknown = self._shapes[positions, 0] < 0
        if unknown.any():
            if self.image_format == "png":  # IHDR: width, height as big-endian uint32 at bytes 16..23
                for index in np.flatnonzero(unknown):   # DALI's PNG decoder may crash on a damaged file
                    problem = png_problem(encoded[index].tobytes())
                    if problem is not None:
                        self._damaged = self.samples.decode_error(int(positions[index]), ValueError(problem))
                        raise self._damaged
                header = self.samples.gather(positions[unknown], 1, 16, 8).astype(np.int64)
                size = header.reshape(-1, 2, 4) @ (256 ** np.arange(3, -1, -1))
                self._shapes[positions[unknown]] = size[:, ::-1]
            else:
                self._shapes[positions[unknown]] = image_shapes([encoded[i] for i in np.flatnonzero(unknown)])
        return self._shapes[positions]

    def _begin(self, plan: list[np.ndarray], seed_parts: tuple) -> None:
        if self._running:  # a pass left half way: cancel what DALI has queued, then start afresh
            self._cancelled = True
            try:
                while True:
                    self._run()
            except StopIteration:
                pass
            self.pipeline.reset()
        self._fed.clear()
        self._plan, self._seed_parts, self._cancelled, self._running = plan, seed_parts, False, True

    def _end(self) -> None:
        try:
            self._run()
        except StopIteration:
            pass
        self.pipeline.reset()
        self._running = False

    def _run(self):
        """(outputs, positions) of the next batch; StopIteration at the end of the pass."""
        try:
            outputs = self.pipeline.run()
        except StopIteration:
            raise
        except Exception as error:
            if self._damaged is not None:   # found before decoding, by the external source
                raise self._damaged from None
            if isinstance(error, RuntimeError):
                raise self._bad_sample(error) from None
            raise
        return outputs, self._fed.popleft()

    def _bad_sample(self, error: RuntimeError) -> Exception:
        """The UserError naming a sample of the queued batches that does not decode, else the DALI error."""
        from PIL import Image

        for positions in self._fed:
            for position in positions:
                try:
                    with Image.open(io.BytesIO(self.samples.image(int(position)).tobytes())) as image:
                        image.load()
                except Exception as decode_error:  # noqa: BLE001 (PIL raises many types for damaged files)
                    return self.samples.decode_error(int(position), decode_error)
        return error


class DaliTrainLoader(_Feeder):
    """`for batch in loader` yields one epoch of {"query", "key", "fine", "coarse"} on `device`.

    The batches of epoch e depend only on (seed, rank, world_size, e): `set_epoch(e)` (any int) picks the
    epoch the next `iter()` yields; without it each `iter()` yields the epoch after the previous one, from 0.
    """

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int, device: torch.device, query_view: str, key_view: str,
                 num_threads: int):
        super().__init__(split, recipe, (recipe.view(query_view), recipe.view(key_view)), image_size=image_size,
                         batch_size=batch_size, device=device, num_threads=num_threads, seed=seed)
        self.num_samples, self.batch_size, self.rank = split.num_samples, batch_size, rank
        self.steps = (split.num_samples // world_size) // batch_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        positions = epoch_positions(self.num_samples, per_rank=self.steps * self.batch_size, rank=self.rank,
                                    seed=self.seed, epoch=epoch)
        self._begin(np.split(positions, self.steps), (epoch, self.rank))
        for _ in range(self.steps):
            (query, key), taken = self._run()
            index = torch.from_numpy(taken)
            yield {"query": _to_torch(query, self.device), "key": _to_torch(key, self.device),
                   "fine": self.fine[index].to(self.device, non_blocking=True),
                   "coarse": self.coarse[index].to(self.device, non_blocking=True)}
        self._end()


class DaliTestLoader(_Feeder):
    """One view per sample; over all ranks every test sample exactly once, with its `index` in the split.

    Every rank yields the same number of batches (so collective operations stay in step); a rank whose part
    is one sample shorter may end with a shorter, even empty, batch.
    """

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, device: torch.device, num_threads: int):
        super().__init__(split, recipe, (recipe.test,), image_size=image_size, batch_size=batch_size,
                         device=device, num_threads=num_threads, seed=0)
        self.part = test_part(split.num_samples, rank, world_size)
        self.batch_size = batch_size
        self.batches = test_batches(split.num_samples, world_size, batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        full, rest = divmod(len(self.part), self.batch_size)
        plan = [self.part[i * self.batch_size:(i + 1) * self.batch_size] for i in range(full)]
        if rest:  # the last short batch: padded with its last sample, trimmed below
            last = self.part[full * self.batch_size:]
            plan.append(np.concatenate([last, np.repeat(last[-1:], self.batch_size - rest)]))
        self._begin(plan, (0,))
        size = self.image_size
        for batch in range(self.batches):
            if batch >= len(plan):
                yield empty_test_batch(size, self.device)
                continue
            (image,), taken = self._run()
            valid = self.batch_size if batch < full else rest
            index = torch.from_numpy(taken[:valid])
            yield {"image": _to_torch(image, self.device)[:valid], "fine": self.fine[index].to(self.device),
                   "coarse": self.coarse[index].to(self.device), "index": index.to(self.device)}
        self._end()

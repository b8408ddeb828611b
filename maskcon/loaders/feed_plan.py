"""The DALI loaders' feeding plan, in numpy: for each pipeline run of a pass, the samples it takes, their
images (resident pixels or encoded bytes) and every drawn augmentation parameter of their views.

The feeding thread (maskcon/loaders/dali.py) hands DALI what `FeedPlan.run_inputs` returns and nothing else,
so what a pass computes is decided here, without DALI: tests/test_loaders.py checks it on its own. The
parameters of block b of a pass's batches (about DRAW_SAMPLES samples) are drawn from a generator seeded with
(seed, *seed_parts, b): a batch's parameters depend on its epoch and block only, not on where the pass
started (the exact resume). Small PNG datasets are decoded once into resident pixels (`decode_resident`);
the module docstring of maskcon/loaders/dali.py says why.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maskcon.errors import UserError
from maskcon.loaders.dali_ops import draw_view
from maskcon.loaders.split import SplitFiles, TarSamples, decode_image, epoch_seed
from maskcon.shard_format import MAX_IMAGE_PIXELS, image_shape, png_problem, too_many_pixels

DRAW_SAMPLES = 4096  # random parameters are drawn for blocks of whole batches of about this many samples
RUN_BYTES = 32 * 2**20  # one pipeline run makes as many whole batches as fit their float outputs in this
RESIDENT_MAX_PIXELS = 64 * 64  # PNG images of at most this many pixels, all of one size: decoded once


class FeedPlan:
    """The inputs of a pass's pipeline runs.

    `views`: the recipe's steps of each view; `positions`: the samples a pass may read (decoded once when
    resident). `names` lists the drawn parameters, (view, step, key), in the order the pipeline takes them;
    `run_batches` whole batches make one run. `start(batches, seed_parts, first)` begins a pass over the
    batches first.. of `batches` (an epoch's list of position arrays, each of batch_size positions).
    """

    def __init__(self, split: SplitFiles, samples: TarSamples, views: tuple, positions: np.ndarray, *,
                 image_size: int, batch_size: int, seed: int):
        self.samples, self.views, self.positions = samples, views, positions
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.image_format = split.image_format
        self.resident_shape = resident_rows(samples, positions, self.image_format)
        self.pixels: np.ndarray | None = None  # the resident pixels, once decoded
        self.undecodable: dict[int, UserError] = {}  # samples found damaged before DALI decodes them, by position
        self._shapes = np.full((split.num_samples, 2), -1, dtype=np.int64)
        self._rows = None if len(positions) == split.num_samples else np.full(split.num_samples, -1, np.int64)
        if self._rows is not None:
            self._rows[positions] = np.arange(len(positions))
        self.block_batches = max(1, DRAW_SAMPLES // batch_size)  # batches per block of drawn parameters
        # batches per pipeline run: DALI's fixed cost per run (feeding each input, scheduling each operator,
        # handing out the outputs) is spread over them; their outputs stay within RUN_BYTES
        self.run_batches = max(1, RUN_BYTES // (batch_size * len(views) * 3 * image_size ** 2 * 4))
        probe = [draw_view(steps, np.random.default_rng(0), np.full((1, 2), image_size), image_size)
                 for steps in views]
        self.names = [(view, step, key) for view, steps in enumerate(probe) for step, values in enumerate(steps)
                      for key in sorted(values)]
        self.batches: list[np.ndarray] = []
        self.first, self.seed_parts = 0, ()
        self._block: tuple[int, list[np.ndarray]] | None = None  # (block, its parameters) of the running pass

    def start(self, batches: list[np.ndarray], seed_parts: tuple, first: int) -> None:
        self.batches, self.seed_parts, self.first, self._block = batches, seed_parts, first, None

    def decode_resident(self, threads: int) -> float:
        """Decode the resident pixels once (the first pass calls it); the CPU seconds it took."""
        if self.resident_shape is None or self.pixels is not None:
            return 0.0
        self.pixels, self.undecodable, seconds = decode_resident(self.samples, self.positions, self.resident_shape,
                                                                 threads)
        return seconds

    def run_inputs(self, run: int) -> tuple[np.ndarray, tuple]:
        """(positions, inputs) of run `run` of the pass (its next `run_batches` batches, fewer at its end):
        the inputs are the images, then every drawn parameter (self.names). StopIteration past the pass's
        end; the UserError naming a damaged sample of the run."""
        first = self.first + run * self.run_batches
        batches = range(first, min(first + self.run_batches, len(self.batches)))
        if not batches:
            raise StopIteration
        positions = np.concatenate([self.batches[batch] for batch in batches])
        # (reads the image sizes of each batch's block first, and finds damaged headers)
        parameters = [np.concatenate(parts) for parts in zip(*(self.parameters(batch) for batch in batches))]
        if self.undecodable:
            for position in sorted(self.undecodable.keys() & set(positions.tolist())):
                raise self.undecodable[position]
        if self.pixels is not None:
            images = self.pixels[positions if self._rows is None else self._rows[positions]]
        else:
            encoded = self.samples.images(positions)
            # one N x longest array (zeros after each image's end, which decoders ignore): one copy into DALI
            images = np.zeros((len(encoded), max(len(data) for data in encoded)), dtype=np.uint8)
            for row, data in zip(images, encoded):
                row[:len(data)] = data
        return positions, (images, *parameters)

    def parameters(self, batch: int) -> list[np.ndarray]:
        """Batch `batch`'s drawn parameters, in the order of self.names, drawn for its whole block at once
        (numpy's fixed cost per call spread over the block)."""
        block = batch // self.block_batches
        if self._block is None or self._block[0] != block:
            positions = np.concatenate(self.batches[block * self.block_batches:(block + 1) * self.block_batches])
            rng = np.random.default_rng(epoch_seed(self.seed, *self.seed_parts, block))
            drawn = [draw_view(steps, rng, self.sizes(positions), self.image_size) for steps in self.views]
            self._block = block, [drawn[view][step][key] for view, step, key in self.names]
        start = (batch - block * self.block_batches) * self.batch_size
        return [values[start:start + self.batch_size] for values in self._block[1]]

    def sizes(self, positions: np.ndarray) -> np.ndarray:
        """N x 2 (height, width) of the samples at `positions`: the resident size, or read from their headers
        once and kept. A damaged PNG (DALI's decoder may not survive one) or an image declaring more than
        MAX_IMAGE_PIXELS pixels is noted in self.undecodable (its run raises the UserError naming it) and
        drawn for as 1 x 1."""
        if self.resident_shape is not None:
            return np.broadcast_to(np.asarray(self.resident_shape), (len(positions), 2))
        unknown = np.unique(positions[self._shapes[positions, 0] < 0])
        for position, encoded in zip(unknown, self.samples.images(unknown)):
            problem = png_problem(encoded.tobytes()) if self.image_format == "png" else None
            shape = image_shape(encoded)
            problem = problem or too_many_pixels(*shape)
            if problem is not None:
                self.undecodable[int(position)] = self.samples.decode_error(int(position), ValueError(problem))
                shape = (1, 1)
            self._shapes[position] = shape
        return self._shapes[positions]


def resident_rows(samples: TarSamples, positions: np.ndarray, image_format: str) -> np.ndarray | None:
    """(H, W) of the images at `positions` when they can live decoded in memory (PNG, one size, at most
    RESIDENT_MAX_PIXELS pixels), read from their IHDR headers; None otherwise. UserError naming the sample
    when a header declares more than MAX_IMAGE_PIXELS pixels."""
    if image_format != "png" or not len(positions):
        return None
    header = samples.gather(positions, 1, 16, 8).astype(np.int64)  # IHDR: width, height, big-endian uint32
    sizes = (header.reshape(-1, 2, 4) @ (256 ** np.arange(3, -1, -1)))[:, ::-1]  # N x (H, W)
    too_large = np.flatnonzero(sizes.prod(axis=1) > MAX_IMAGE_PIXELS)
    if len(too_large):
        problem = too_many_pixels(*sizes[too_large[0]].tolist())
        raise samples.decode_error(int(positions[too_large[0]]), ValueError(problem))
    if (sizes != sizes[0]).any() or sizes[0].prod() > RESIDENT_MAX_PIXELS:
        return None
    return sizes[0]


def decode_resident(samples: TarSamples, positions: np.ndarray, shape, threads: int) -> tuple[np.ndarray, dict, float]:
    """(len(positions) x H x W x 3 uint8 pixels of the samples, {position: UserError naming it} for those that
    do not decode (their pixels stay 0; a batch that holds one raises it), CPU seconds spent), decoded by PIL
    in `threads` threads."""
    pixels = np.zeros((len(positions), int(shape[0]), int(shape[1]), 3), dtype=np.uint8)
    damaged: dict[int, UserError] = {}

    def decode_chunk(rows: np.ndarray) -> float:
        start = time.thread_time()
        for row in rows:
            try:
                pixels[row] = decode_image(samples, int(positions[row]))
            except UserError as error:
                damaged[int(positions[row])] = error
        return time.thread_time() - start

    chunks = np.array_split(np.arange(len(positions)), max(1, min(len(positions) // 256, 64 * threads)))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        seconds = sum(pool.map(decode_chunk, chunks))
    return pixels, damaged, seconds

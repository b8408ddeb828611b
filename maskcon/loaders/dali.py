"""DALI pipelines: shard tars -> images -> two augmented views (or one test view) -> N x 3 x S x S floats.

The same graph runs on the GPU (device_id = the CUDA device; JPEG decoded by `mixed`) and on the CPU
(device_id=None), which is how CI tests it and how CPU-only users train. Design notes: DESIGN.md.

Images. Small PNG datasets (every image of one size of at most RESIDENT_MAX_PIXELS pixels, feed_plan.py: the
32-px sets) are decoded once when the loader's first pass starts, before training, by PIL in as many threads
as the process may use CPUs (the loader's threads are DALI's), into one resident uint8 array (num_samples x H
x W x 3: 150 MB for CIFAR's 50,000 images, 3.9 GB for ImageNet32's 1.28M), from which each batch is gathered
and fed to DALI as HWC pixels: no image is decoded while training, and no integrity check runs per batch (PIL
checks every file as it decodes it once, and a batch holding a sample that did not decode raises the error
naming it; `verify` reads every sample). Measured on 20,000 synthetic 32-px PNGs (2-core CPU, shared,
BENCHMARKS.md "Two-view loading"): decoding costs 43 us of CPU per image in DALI's CPU decoder (what the GPU
pipeline paid per image and epoch, since DALI decodes PNG on the CPU even with `mixed`) and 85-90 us in PIL
once at start; the gather 0.3 us per image. Raw pixels as a shard member would save only that one decode at
start (4 s of CPU for CIFAR, 2 min for ImageNet32, spread over the threads) for 10 % more disk than these
PNGs, and a second format to write and verify; so the shards keep PNG. Other datasets (JPEG, large PNG) are
decoded by DALI from the encoded bytes (read-only views of the memory-mapped tars), JPEG on the GPU (`mixed`).

Feeding. One external source hands DALI, per run, the images and every random parameter of both views, drawn
in numpy by the DALI back end's ops (maskcon/loaders/dali_ops.py) as the feeding plan
(maskcon/loaders/feed_plan.py) decides; the graph holds no random operator and each op kind appears once per
view with per-sample parameters (`operator_count`: about 50 for a two-view cifar100 batch). A feeding thread
per pass runs the pipeline: the external source's callback (reading, parameter draws), DALI's scheduling, the
outputs' copy into torch tensors (CPU) or the copy ordered on the consumer's CUDA stream without a host wait
(GPU), and the labels (uploaded once, indexed on the device once per pass; a batch takes a slice). One
pipeline run makes several whole batches, as many as fit their float outputs in RUN_BYTES (5 of 256 at 32 px,
one at 224 px): DALI's host cost per run (feeding each input, scheduling each operator, handing out the
outputs) is mostly fixed, so runs of a thousand or more small images spread it (BENCHMARKS.md, "The host part
of the 32-px GPU pipeline"); a sample's views do not depend on which run made them. A damaged sample stops the
pass at the start of its run. The thread keeps up to `prefetch` prepared batches in a bounded queue; the
training thread only takes them. `feed_cpu_seconds` is the CPU time (time.thread_time) of that thread and of
the decoding threads.

Epochs. Epoch e's batches depend only on (seed, rank, world_size, e): positions come from
split.epoch_positions (a permutation of the split drawn from (seed, e), sliced per rank) and the parameters
of block b of batches (DRAW_SAMPLES samples) from a numpy generator seeded with (seed, e, rank, b).
`set_epoch(e, start)` picks the next pass: batches start.. of epoch e, the skipped ones neither decoded nor
augmented; a pass left half way is cancelled (at most the prefetched batches are computed and dropped), so
nothing iterated before changes what comes next.
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np
import torch

from maskcon import usable_cpus
from maskcon.errors import UserError
from maskcon.loaders.dali_ops import view_graph
from maskcon.loaders.feed_plan import FeedPlan
from maskcon.loaders.spec import LoaderSpec
from maskcon.loaders.split import (EpochCursor, SplitFiles, TarSamples, decode_image, epoch_positions, test_batches,
                                   test_part)
from maskcon.recipes import Recipe

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
except ImportError:  # reported by the loader builders (require_dali), so the torch back end works without DALI
    fn = None

    def pipeline_def(**options):   # the pipelines below are defined, never built, without DALI
        return lambda function: function

PIPELINE_PREFETCH = 2  # runs DALI computes ahead, besides the feeding thread's queue


def require_dali() -> None:
    if fn is None:
        raise UserError("NVIDIA DALI is not installed; install maskcon with the extra of your CUDA line, "
                        "pip install -e \".[cuda13]\" or \".[cuda12]\" (README, Install), or use the torchvision "
                        "loader: --loader torch")


# ------------------------------------------------------------------------------------ pipelines


def _normalise(images, recipe: Recipe, mirror, channels_last: bool):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
                                    mirror=0 if mirror is None else mirror)


def _decode(encoded, image_format: str, on_gpu: bool):
    if on_gpu and image_format == "jpg":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return images.gpu() if on_gpu else images


@pipeline_def(enable_conditionals=True)
def _views_pipeline(source, names, image_format: str, recipe: Recipe, views: tuple, size: int, on_gpu: bool,
                    resident: bool, channels_last: bool):
    """Outputs one N x 3 x S x S (or N x S x S x 3 with channels_last) float view per entry of `views`."""
    fed, *values = fn.external_source(source=source, num_outputs=1 + len(names), batch=True, batch_info=True,
                                      layout=["HWC" if resident else ""] + [""] * len(names))
    if resident:  # uint8 pixels, gathered from the resident array
        images = fed.gpu() if on_gpu else fed
    else:
        images = _decode(fed, image_format, on_gpu)
    drawn = [[{} for _ in steps] for steps in views]
    for (view, step, key), value in zip(names, values):
        drawn[view][step][key] = value
    outputs = []
    for steps, parameters in zip(views, drawn):  # every view from the one image
        augmented, mirror = view_graph(images, steps, parameters, size)
        outputs.append(_normalise(augmented, recipe, mirror, channels_last))
    return tuple(outputs)


def operator_count(pipeline) -> int:
    """Operators in a built DALI pipeline (what a batch pays fixed costs for)."""
    return len(pipeline._ops)


def _to_torch(output, device: torch.device, channels_last: bool, stream) -> torch.Tensor:
    """One DALI output batch as an N x 3 x S x S tensor on `device` (channels-last strides when the pipeline
    wrote HWC); on CUDA the copy is ordered on `stream`, without a host wait."""
    tensor = output.as_tensor()
    if device.type == "cpu":  # a view of DALI's buffer (reused by the next run), copied by torch
        result = torch.from_numpy(np.asarray(tensor)).clone()
    else:
        result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
        feed_ndarray(tensor, result, cuda_stream=stream)
    return result.permute(0, 3, 1, 2) if channels_last else result


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


# ------------------------------------------------------------------------------------ feeding


class _Feeder:
    """Runs a views pipeline over a FeedPlan (maskcon/loaders/feed_plan.py) in a feeding thread; shared by
    the train and test loaders. `_start(batches, seed_parts, first)` begins a pass over batches first.. of
    `batches` (see FeedPlan.start); `_next()` returns its next prepared batch, as a dict of the views' names
    (`view_names`) and "fine", "coarse", "index" (the positions), on the device."""

    def __init__(self, split: SplitFiles, spec: LoaderSpec, views: tuple, view_names: tuple, positions: np.ndarray,
                 *, seed: int):
        self.spec, self.device, self.view_names = spec, spec.device, view_names
        self.batch_size, self.seed, self.channels_last = spec.batch_size, seed, spec.channels_last
        self.samples = TarSamples(split)
        fine, coarse = self.samples.labels()
        self.fine, self.coarse = torch.from_numpy(fine).to(self.device), torch.from_numpy(coarse).to(self.device)
        self.plan = FeedPlan(split, self.samples, views, positions, image_size=spec.image_size,
                             batch_size=spec.batch_size, seed=seed)
        self.feed_cpu_seconds_done = 0.0  # CPU seconds of finished work (the running pass adds its own)
        self.copy_cpu_seconds = 0.0  # of which: copying DALI's CPU outputs into torch tensors
        self._live = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, spec.prefetch))
        self._thread: threading.Thread | None = None
        self._cancelled = threading.Event()
        self._fed: collections.deque = collections.deque()  # positions handed to DALI, not yet out
        self._damaged: UserError | None = None  # a sample found damaged before DALI decoded it
        self.pipeline = _views_pipeline(
            self._batch_inputs, self.plan.names, split.image_format, spec.recipe, views, spec.image_size,
            self.device.type == "cuda", self.plan.resident_shape is not None, spec.channels_last,
            batch_size=spec.batch_size * self.plan.run_batches, num_threads=spec.num_threads,
            device_id=_device_id(self.device), seed=seed % 2**31, prefetch_queue_depth=PIPELINE_PREFETCH,
            exec_dynamic=True)
        self.pipeline.build()

    @property
    def feed_cpu_seconds(self) -> float:
        """CPU seconds (time.thread_time) of all host feeding work so far: the feeding thread's (reading,
        parameter draws, DALI's scheduling, output copies, labels) and the one-time decoding threads'."""
        return self.feed_cpu_seconds_done + self._live

    # --------------------------------------------------------------------- in the feeding thread

    def _batch_inputs(self, info) -> tuple:
        """The external source's outputs for one run: FeedPlan.run_inputs of the run DALI asks for."""
        if self._cancelled.is_set():
            raise StopIteration
        try:
            positions, inputs = self.plan.run_inputs(int(info.iteration))
        except UserError as damaged:   # a sample of this run is damaged
            self._damaged = damaged
            raise
        self._fed.append(positions)
        return inputs

    def _feed(self, stream) -> None:
        """The feeding thread: one pass of the plan into the queue, then an end mark (or the error)."""
        start = time.thread_time()
        try:
            self.feed_cpu_seconds_done += self.plan.decode_resident(usable_cpus())   # once, before training
            todo = self.plan.batches[self.plan.first:]
            labels = {}  # the pass's positions and labels, uploaded and indexed once; each batch takes a slice
            if todo:
                index = torch.from_numpy(np.concatenate(todo)).to(self.device)
                labels = {"fine": self.fine[index], "coarse": self.coarse[index], "index": index}
            for run in range(0, len(todo), self.plan.run_batches):
                if self._cancelled.is_set():
                    break
                views = self._views(self._run(stream), stream)
                self._live = time.thread_time() - start
                for batch in range(run, min(run + self.plan.run_batches, len(todo))):
                    rows = slice((batch - run) * self.batch_size, (batch - run + 1) * self.batch_size)
                    item = {name: view[rows] for name, view in views.items()}
                    rows = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
                    item.update({name: values[rows] for name, values in labels.items()})
                    if not self._put(item):
                        break
            self._drain()
        except BaseException as error:  # noqa: BLE001 (handed to the training thread, which raises it)
            self._put(error)
        finally:
            self._live = 0.0
            self.feed_cpu_seconds_done += time.thread_time() - start
            self._put(StopIteration())

    def _views(self, outputs: tuple, stream) -> dict:
        """A run's outputs as tensors on the device, by view name."""
        copy_start = time.thread_time()
        views = {name: _to_torch(output, self.device, self.channels_last, stream)
                 for name, output in zip(self.view_names, outputs)}
        if self.device.type == "cpu":
            self.copy_cpu_seconds += time.thread_time() - copy_start
        return views

    def _put(self, item) -> bool:
        """Queue `item` unless the pass is cancelled first; whether it was queued."""
        while not self._cancelled.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, stream) -> tuple:
        """The next run's outputs (StopIteration at the end of the pass); a sample that does not decode
        becomes the UserError naming it."""
        try:
            outputs = self.pipeline.run(stream) if stream is not None else self.pipeline.run()
        except StopIteration:
            raise
        except Exception as error:
            if self._damaged is not None:  # found before decoding, by the external source
                raise self._damaged from None
            if isinstance(error, RuntimeError):
                raise self._bad_sample(error) from None
            raise
        self._fed.popleft()
        return outputs

    def _drain(self) -> None:
        """End the pass in DALI: run out what it prefetched (the source says StopIteration from the plan's end
        or the cancellation on), then reset."""
        try:
            while True:
                self.pipeline.run()
        except StopIteration:
            pass
        self.pipeline.reset()
        self._fed.clear()

    def _bad_sample(self, error: RuntimeError) -> Exception:
        """The UserError naming a sample of the queued batches that does not decode, else the DALI error."""
        for positions in self._fed:
            for position in positions:
                try:
                    decode_image(self.samples, int(position))
                except UserError as decode_error:
                    return decode_error
        return error

    # --------------------------------------------------------------------- in the training thread

    def _start(self, batches: list[np.ndarray], seed_parts: tuple, first: int) -> None:
        self._stop()
        self.plan.start(batches, seed_parts, first)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._cancelled.clear()
        self._thread = threading.Thread(target=self._feed_on, args=(stream,), name="maskcon-dali-feeder",
                                        daemon=True)
        self._thread.start()

    def _feed_on(self, stream) -> None:
        if stream is None:
            return self._feed(None)
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            return self._feed(stream)

    def _next(self) -> dict:
        item = self._queue.get()
        if isinstance(item, StopIteration):  # the pass's end mark, before the plan's last batch
            raise RuntimeError("the DALI pipeline stopped before the end of the pass")
        if isinstance(item, BaseException):
            self._stop()
            raise item
        return item

    def _stop(self) -> None:
        """Cancel the running pass (if any) and wait for its thread: at most the prefetched batches are
        computed and dropped."""
        if self._thread is None:
            return
        self._cancelled.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread = None
        while not self._queue.empty():
            self._queue.get_nowait()


class DaliTrainLoader(_Feeder, EpochCursor):
    """`for batch in loader` yields one epoch of {"query", "key": float32 N x 3 x S x S, "fine", "coarse": int64
    N} on `device` (channels-last strides with `channels_last`).

    The batches of epoch e depend only on (seed, rank, world_size, e): `set_epoch(e, start)` (any int e) makes
    the next `iter()` yield batches start..len(loader)-1 of epoch e; without it each `iter()` yields the epoch
    after the previous one, from 0.
    """

    def __init__(self, split: SplitFiles, spec: LoaderSpec):
        views = (spec.recipe.view(spec.query_view), spec.recipe.view(spec.key_view))
        super().__init__(split, spec, views, ("query", "key"), np.arange(split.num_samples), seed=spec.seed)
        self.num_samples, self.rank = split.num_samples, spec.rank
        self.steps = (split.num_samples // spec.world_size) // spec.batch_size

    def __iter__(self):
        epoch, start = self._next_pass()
        positions = epoch_positions(self.num_samples, per_rank=self.steps * self.batch_size, rank=self.rank,
                                    seed=self.seed, epoch=epoch)
        self._start(np.split(positions, self.steps), (epoch, self.rank), start)
        try:
            for _ in range(start, self.steps):
                batch = self._next()
                yield {"query": batch["query"], "key": batch["key"], "fine": batch["fine"], "coarse": batch["coarse"]}
        except GeneratorExit:  # a pass left half way: its thread stops now
            self._stop()
            raise


class DaliTestLoader(_Feeder):
    """One view per sample, {"image", "fine", "coarse", "index"}; over all ranks every test sample exactly once,
    with its `index` in the split. Every rank yields the same number of batches (so collective operations stay
    in step); a rank whose part is one sample shorter may end with a shorter, even empty, batch.
    """

    def __init__(self, split: SplitFiles, spec: LoaderSpec):
        self.part = test_part(split.num_samples, spec.rank, spec.world_size)
        super().__init__(split, spec, (spec.recipe.test,), ("image",), self.part, seed=0)
        self.batches = test_batches(split.num_samples, spec.world_size, spec.batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        full, rest = divmod(len(self.part), self.batch_size)
        plan = [self.part[i * self.batch_size:(i + 1) * self.batch_size] for i in range(full)]
        if rest:  # the last short batch: padded with its last sample, trimmed below
            last = self.part[full * self.batch_size:]
            plan.append(np.concatenate([last, np.repeat(last[-1:], self.batch_size - rest)]))
        self._start(plan, (0,), 0)
        try:
            for batch in range(self.batches):
                if batch >= len(plan):
                    yield self.spec.blank_test_batch()
                    continue
                prepared = self._next()
                valid = self.batch_size if batch < full else rest
                yield {name: value[:valid] for name, value in prepared.items()}
        except GeneratorExit:
            self._stop()
            raise

"""DALI pipelines: shard tars -> decode once -> two augmented views (or one test view) -> NCHW floats.

The same graph runs on the GPU (device_id = the CUDA device; JPEG decoded by `mixed`) and on the CPU
(device_id=None), which is how CI tests it and how CPU-only users train. Every augmentation is a DALI
operator or arithmetic on per-sample DALI tensors: no Python callback runs per batch.

Epochs. The reader splits the samples of a split into `world_size` contiguous parts (`shard_id=rank`) and,
with `shuffle_after_epoch`, reshuffles the order of the tar files before every epoch with a seed shared
by all ranks, so the parts stay disjoint while their contents change; `random_shuffle` then draws samples
from a buffer of `initial_fill` (tars are written pre-shuffled). With `pad_last_batch` every rank's reader
epoch is ceil(ceil(N / world_size) / batch) batches, padded with repeats of its last sample. The training
loader yields the first (N // world_size) // batch of them (the same number on every rank, only real
samples) and drops the rest.
"""

from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from maskcon import recipes
from maskcon.errors import UserError
from maskcon.loaders import SplitFiles
from maskcon.recipes import Recipe, Step

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.auto_aug.auto_augment import apply_auto_augment
    from nvidia.dali.auto_aug.core import Policy, augmentation
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
except ImportError:  # reported by the loader builders, so the torch back end works without DALI
    fn = None

# Bytes of encoded samples the shuffle buffer may hold per process (a 32x32 PNG is ~3 kB, a photo ~100 kB).
SHUFFLE_BUFFER_BYTES = 256 * 2**20
MAX_INITIAL_FILL = 16384
MIN_INITIAL_FILL = 256


def require_dali() -> None:
    if fn is None:
        raise UserError("NVIDIA DALI is not installed; pip install nvidia-dali-cuda130==2.4.0, "
                        "or pick the torchvision loader (backend 'torch')")


# ------------------------------------------------------------------------------- AutoAugment (CIFAR-10)
# torchvision's conventions: fill 0 outside the image, nearest-neighbour sampling, shear about the
# top-left corner, rotation about the centre. Parameters per bin come from recipes.auto_augment_magnitudes.


def _shear_param(axis: int):
    def to_param(magnitude):
        shear = [0.0, 0.0]
        shear[axis] = -magnitude  # torchvision's affine maps x -> x - s*y (ShearX), y -> y - s*x (ShearY)
        return np.array(shear, dtype=np.float32)
    return to_param


def _offset_param(axis: int):
    def to_param(magnitude):
        offset = [0.0, 0.0]
        offset[axis] = magnitude
        return np.array(offset, dtype=np.float32)
    return to_param


def _affine(data, matrix, fill_value, interp_type):
    return fn.warp_affine(data, matrix=matrix, fill_value=fill_value, interp_type=interp_type, inverse_map=False)


def _shear(data, shear, fill_value, interp_type):
    return _affine(data, fn.transforms.shear(shear=shear), fill_value, interp_type)


def _translate(data, offset, fill_value, interp_type):
    return _affine(data, fn.transforms.translation(offset=offset), fill_value, interp_type)


def _rotate(data, angle, fill_value, interp_type):
    # counter-clockwise on screen for angle > 0 in both libraries, about the image centre
    return fn.rotate(data, angle=angle, fill_value=fill_value, interp_type=interp_type, keep_size=True)


# Photometric ops follow torchvision on uint8 tensors exactly: grey = 0.2989 R + 0.587 G + 0.114 B truncated to
# an integer, blends computed in float, clamped to [0, 255] and truncated back to uint8.
_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def _constant(value: np.ndarray, like):
    return types.Constant(value, device="gpu" if like.device == "gpu" else "cpu")


def _truncate(x):
    return fn.reshape(fn.cast(dmath.floor(x), dtype=types.UINT8), layout="HWC")


def _grey(data):
    """H x W x 1 float grey levels of HWC uint8 RGB images (torchvision's rgb_to_grayscale)."""
    return dmath.floor(fn.reductions.sum(data * _constant(_LUMA, data), axis_names="C", keep_dims=True))


def _brightness(data, factor):
    return _truncate(data * factor)


def _color(data, factor):  # adjust_saturation: blend with the grey image
    return _truncate(data * factor + _grey(data) * (1.0 - factor))


def _contrast(data, factor):  # adjust_contrast: blend with the mean grey level of the image
    mean = fn.reductions.mean(_grey(data), axis_names="HWC", keep_dims=True)
    return _truncate(data * factor + mean * (1.0 - factor))


def _grayscale(data):  # rgb_to_grayscale(num_output_channels=3)
    grey = _grey(data)
    return _truncate(fn.cat(grey, grey, grey, axis=2))


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13


def _sharpness_op(image_size: int):
    """adjust_sharpness: blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13 (rounded to uint8),
    whose 1-pixel border torchvision leaves unsmoothed."""
    interior = np.zeros((image_size, image_size, 1), dtype=np.float32)
    interior[1:-1, 1:-1] = 1

    def sharpness(data, factor):
        smooth = dmath.floor(fn.filter(data, _constant(_SMOOTH, data), dtype=types.FLOAT) + 0.5)
        degenerate = data + _constant(interior, data) * (smooth - data)
        return _truncate(data * factor + degenerate * (1.0 - factor))
    return sharpness


def _posterize_mask(bits):
    return np.uint8(255 ^ (2 ** (8 - int(round(bits))) - 1))


def _posterize(data, mask):
    return data & mask


def _solarize(data, threshold):
    inverted = types.Constant(255, dtype=types.UINT8) - data
    keep = data < threshold
    return keep * data + (keep ^ True) * inverted


def _auto_contrast(data, _):
    lo = fn.reductions.min(data, axis_names="HW", keep_dims=True)
    hi = fn.reductions.max(data, axis_names="HW", keep_dims=True)
    spread = hi - lo
    stretch = spread > 0
    scale = 255.0 / (spread * stretch + types.Constant(255, dtype=types.UINT8) * (stretch ^ True))
    return _truncate((data - lo * stretch) * scale)


def _equalize_op(image_size: int):
    """torchvision's (PIL's) equalize, per channel: lut[v] = (n + step // 2) // step, where n counts the pixels
    below v and step = (pixels - pixels at the maximum) // 255 (no change when step is 0).

    DALI's equalize follows OpenCV instead; applied to the inverted image it returns
    round((D - n) * 255 / D) with D = pixels - pixels at the maximum, from which n is read to within 2 counts:
    the result is within one level of torchvision's (about a third of the pixels differ by one, in both
    directions: on CIFAR-like 32x32 crops the mean offset is 0.02 levels).
    """
    pixels = float(image_size * image_size)

    def equalize(data, _):
        top = fn.reductions.max(data, axis_names="HW", keep_dims=True)
        spread = pixels - fn.reductions.sum(fn.cast(data == top, dtype=types.FLOAT), axis_names="HW", keep_dims=True)
        step = dmath.floor(spread / 255.0)
        inverted = fn.equalize(types.Constant(255, dtype=types.UINT8) - data)
        below = spread * (1.0 - inverted / 255.0) + 0.5  # + 0.5: no mean offset against torchvision (measured)
        equalized = dmath.min(dmath.floor((below + dmath.floor(step / 2.0)) / dmath.max(step, 1.0)), 255.0)
        flat = step == 0
        return _truncate(equalized * (flat ^ True) + data * flat)
    return equalize


def _invert(data, _):
    return types.Constant(255, dtype=types.UINT8) - data


def _augmentations(image_size: int) -> dict:
    """One DALI Augmentation per torchvision op name, with torchvision's magnitude bins."""

    def bins(op):
        values, signed = recipes.auto_augment_magnitudes(op, image_size)
        return np.array(values, dtype=np.float32), signed

    def make(op, function, to_param=None, param_device=None):
        values, signed = bins(op)
        if values.size == 0:
            return augmentation(function, name=op)
        return augmentation(function, mag_range=values, randomly_negate=signed, mag_to_param=to_param,
                            param_device=param_device, name=op)

    def shift(magnitude):
        return np.float32(1.0 + magnitude)

    return {
        "ShearX": make("ShearX", _shear, _shear_param(0)),
        "ShearY": make("ShearY", _shear, _shear_param(1)),
        "TranslateX": make("TranslateX", _translate, _offset_param(0)),
        "TranslateY": make("TranslateY", _translate, _offset_param(1)),
        "Rotate": make("Rotate", _rotate),
        "Brightness": make("Brightness", _brightness, shift),
        "Color": make("Color", _color, shift),
        "Contrast": make("Contrast", _contrast, shift),
        "Sharpness": make("Sharpness", _sharpness_op(image_size), shift),
        "Posterize": make("Posterize", _posterize, _posterize_mask, "auto"),
        "Solarize": make("Solarize", _solarize, None, "auto"),
        "AutoContrast": make("AutoContrast", _auto_contrast),
        "Equalize": make("Equalize", _equalize_op(image_size)),
        "Invert": make("Invert", _invert),
    }


def cifar10_policy(image_size: int) -> "Policy":
    """torchvision's AutoAugment CIFAR-10 policy (recipes.AUTO_AUGMENT_CIFAR10) as a DALI Policy."""
    ops = _augmentations(image_size)
    sub_policies = [[(ops[name], p, magnitude_bin) for name, p, magnitude_bin in sub_policy]
                    for sub_policy in recipes.AUTO_AUGMENT_CIFAR10]
    with warnings.catch_warnings():  # sub-policy 14 holds ("Invert", 0.0): kept, as torchvision keeps it
        warnings.simplefilter("ignore")
        return Policy("torchvision-cifar10", recipes.AUTO_AUGMENT_BINS, sub_policies)


# ---------------------------------------------------------------------------------------- other steps


def _perspective_matrix(size: int, distortion: float):
    """Per-sample 3x3 source->destination homography of torchvision's RandomPerspective.

    Each corner of the size x size image moves inwards by an integer drawn uniformly from
    0..int(distortion * size // 2) along x and along y; the homography taking the image corners to the
    moved corners is the closed-form square-to-quad map (Heckbert 1989) composed with a scaling.
    """
    bound = int(distortion * (size // 2)) + 1
    moves = fn.cast(fn.random.uniform(values=list(range(bound)), shape=[8], dtype=types.INT32), dtype=types.FLOAT)
    last = float(size - 1)
    x0, y0 = moves[0], moves[1]
    x1, y1 = last - moves[2], moves[3]
    x2, y2 = last - moves[4], last - moves[5]
    x3, y3 = moves[6], last - moves[7]
    sx, sy = x0 - x1 + x2 - x3, y0 - y1 + y2 - y3
    dx1, dx2, dy1, dy2 = x1 - x2, x3 - x2, y1 - y2, y3 - y2
    den = dx1 * dy2 - dx2 * dy1
    g = (sx * dy2 - dx2 * sy) / den
    h = (dx1 * sy - sx * dy1) / den
    a, b, c = x1 - x0 + g * x1, x3 - x0 + h * x3, x0
    d, e, f = y1 - y0 + g * y1, y3 - y0 + h * y3, y0
    one = x0 * 0.0 + 1.0
    matrix = fn.stack(a / last, b / last, c, d / last, e / last, f, g / last, h / last, one)
    return fn.reshape(matrix, shape=[3, 3])


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _hue_shift(images, shift):
    """torchvision's adjust_hue: rotate the HSV hue of every pixel by `shift` turns, keeping V and S.

    In RGB terms a pixel keeps its max M and min m (chroma C = M - m); channel n (R 5, G 3, B 1) becomes
    M - C * clamp(min(K, 4 - K), 0, 1) with K = (n + 6 * hue) mod 6, the standard HSV -> RGB formula.
    """
    x = fn.cast(images, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    top = dmath.max(dmath.max(r, g), b)
    chroma = top - dmath.min(dmath.min(r, g), b)
    divisor = chroma + (chroma == 0)  # grey pixels: any hue, the output is M on every channel
    is_r = top == r
    is_g = (top == g) & (is_r ^ True)
    is_b = (is_r | is_g) ^ True
    sextant = (is_r * ((g - b) / divisor) + is_g * ((b - r) / divisor + 2.0) + is_b * ((r - g) / divisor + 4.0)
               + shift * 6.0)
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + sextant
        k = k - 6.0 * dmath.floor(k / 6.0)
        # torchvision converts back from [0, 1] floats by multiplying by 255.999 and truncating
        channels.append((top - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)) * (255.999 / 255.0))
    return _truncate(fn.stack(*channels, axis=2))


# The 24 orders of (brightness, contrast, saturation, hue), one drawn per image as torch.randperm(4) does.
_ORDERS = np.array(list(itertools.permutations(range(4))), dtype=np.int32)


def _color_jitter(images, brightness, contrast, saturation, hue):
    """torchvision's ColorJitter: factors b, c, s uniform in [1-x, 1+x], hue uniform in [-x, x] turns,
    the four adjustments applied in a random order, each rounding to uint8 as on torchvision's uint8 path."""
    b = fn.random.uniform(range=[1 - brightness, 1 + brightness])
    c = fn.random.uniform(range=[1 - contrast, 1 + contrast])
    s = fn.random.uniform(range=[1 - saturation, 1 + saturation])
    h = fn.random.uniform(range=[-hue, hue])
    order = types.Constant(_ORDERS)[fn.random.uniform(values=list(range(len(_ORDERS))), dtype=types.INT32)]
    for stage in range(4):
        adjustment = order[stage]
        if adjustment == 0:
            images = _brightness(images, b)
        elif adjustment == 1:
            images = _contrast(images, c)
        elif adjustment == 2:
            images = _color(images, s)
        else:
            images = _hue_shift(images, h)
    return images


def _augment(images, steps: tuple[Step, ...], size: int, policy, interp_nearest, flip_at_end: bool):
    """Apply one view's steps to HWC uint8 images; returns (images, mirror flag or None)."""
    mirror = None
    for index, step in enumerate(steps):
        p = step.params
        if step.op == "random_resized_crop":
            images = fn.random_resized_crop(images, size=[size, size], random_area=list(p["scale"]),
                                            random_aspect_ratio=list(p["ratio"]), num_attempts=10,
                                            interp_type=types.INTERP_LINEAR, antialias=True)
        elif step.op == "resize":
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        elif step.op == "horizontal_flip":
            flip = fn.random.coin_flip(probability=p["p"], dtype=types.INT32)
            later = {s.op for s in steps[index + 1:]}
            if flip_at_end and "auto_augment" not in later:
                mirror = flip  # every later step is flip-equivariant in distribution: flip while normalising
            else:
                images = fn.flip(images, horizontal=flip)
        elif step.op == "auto_augment":
            images = apply_auto_augment(policy, images, fill_value=0, interp_type=interp_nearest)
        elif step.op == "random_perspective":
            if _coin(p["p"]):
                images = fn.experimental.warp_perspective(images, matrix=_perspective_matrix(size, p["distortion"]),
                                             fill_value=0, interp_type=types.INTERP_LINEAR, inverse_map=False,
                                             border_mode="constant")
        elif step.op == "color_jitter":
            if _coin(p["p"]):
                images = _color_jitter(images, p["brightness"], p["contrast"], p["saturation"], p["hue"])
        elif step.op == "random_grayscale":
            if _coin(p["p"]):
                images = _grayscale(images)
        elif step.op == "gaussian_blur":
            if _coin(p["p"]):
                images = fn.gaussian_blur(images, sigma=fn.random.uniform(range=list(p["sigma"])))
        else:
            raise UserError(f"the DALI loader has no implementation of recipe step {step.op!r}")
    return images, mirror


def _normalise(images, recipe: Recipe, mirror):
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
                                    mirror=0 if mirror is None else mirror)


def _decode(encoded, image_format: str, on_gpu: bool):
    if on_gpu and image_format == "jpg":
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB)
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return images.gpu() if on_gpu else images


def _reader(split: SplitFiles, *, rank: int, world_size: int, train: bool, seed: int):
    options = dict(paths=split.tars, index_paths=split.indexes, ext=["png;jpg", "fine", "coarse"],
                   dtypes=[types.UINT8, types.INT64, types.INT64], missing_component_behavior="error",
                   shard_id=rank, num_shards=world_size, pad_last_batch=True, name="reader")
    if train:
        sizes = [Path(t).stat().st_size for t in split.tars]
        bytes_per_sample = max(1.0, sum(sizes) / max(1, split.num_samples))
        fill = int(min(MAX_INITIAL_FILL, max(MIN_INITIAL_FILL, SHUFFLE_BUFFER_BYTES // bytes_per_sample)))
        options.update(random_shuffle=True, initial_fill=fill, shuffle_after_epoch=True,
                       shuffle_after_epoch_seed=seed)  # the same on every rank: the parts stay disjoint
    else:
        options.update(random_shuffle=False, stick_to_shard=True)
    return fn.readers.webdataset(**options)


@pipeline_def(enable_conditionals=True)
def _train_pipeline(split: SplitFiles, recipe: Recipe, image_size: int, views: tuple[str, str], rank: int,
                    world_size: int, shuffle_seed: int, on_gpu: bool, policy):
    encoded, fine, coarse = _reader(split, rank=rank, world_size=world_size, train=True, seed=shuffle_seed)
    images = _decode(encoded, split.image_format, on_gpu)
    outputs = []
    for view in views:  # both views from the one decoded image
        augmented, mirror = _augment(images, recipe.view(view), image_size, policy, types.INTERP_NN, True)
        outputs.append(_normalise(augmented, recipe, mirror))
    if on_gpu:
        fine, coarse = fine.gpu(), coarse.gpu()
    return outputs[0], outputs[1], fine, coarse


@pipeline_def
def _test_pipeline(split: SplitFiles, recipe: Recipe, image_size: int, rank: int, world_size: int, on_gpu: bool):
    encoded, fine, coarse = _reader(split, rank=rank, world_size=world_size, train=False, seed=0)
    images = _decode(encoded, split.image_format, on_gpu)
    images, mirror = _augment(images, recipe.test, image_size, None, types.INTERP_NN, False)
    if on_gpu:
        fine, coarse = fine.gpu(), coarse.gpu()
    return _normalise(images, recipe, mirror), fine, coarse


def _to_torch(output, device: torch.device) -> torch.Tensor:
    tensor = output.as_tensor()
    result = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, result, cuda_stream=stream)
    return result


def _device_id(device: torch.device) -> int | None:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def _part_size(num_samples: int, rank: int, world_size: int) -> int:
    """Samples in rank's part of a split (DALI's sharding: contiguous, sizes differ by at most one)."""
    return num_samples * (rank + 1) // world_size - num_samples * rank // world_size


class DaliTrainLoader:
    """`for batch in loader` yields one epoch of {"query", "key", "fine", "coarse"} on `device`."""

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, seed: int, device: torch.device, query_view: str, key_view: str,
                 num_threads: int):
        self.device = device
        self.steps = (split.num_samples // world_size) // batch_size
        self.reader_batches = math.ceil(math.ceil(split.num_samples / world_size) / batch_size)
        self._left_in_reader_epoch = 0  # batches of the current reader epoch not yet run
        # Augmentation seeds differ per rank; the tar-order shuffle seed is shared by all ranks.
        self.pipeline = _train_pipeline(
            split, recipe, image_size, (query_view, key_view), rank, world_size, seed % 2**31, device.type == "cuda",
            cifar10_policy(image_size),
            batch_size=batch_size, num_threads=num_threads, device_id=_device_id(device),
            seed=(seed * 1_000_003 + rank) % 2**31, prefetch_queue_depth=2)
        self.pipeline.build()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        while self._left_in_reader_epoch:  # an earlier epoch was left unfinished: skip to the next one
            self._run()
        self._left_in_reader_epoch = self.reader_batches
        for _ in range(self.steps):
            query, key, fine, coarse = self._run()
            yield {"query": _to_torch(query, self.device), "key": _to_torch(key, self.device),
                   "fine": _to_torch(fine, self.device).reshape(-1),
                   "coarse": _to_torch(coarse, self.device).reshape(-1)}
        while self._left_in_reader_epoch:
            self._run()

    def _run(self):
        self._left_in_reader_epoch -= 1
        return self.pipeline.run()


class DaliTestLoader:
    """One view per sample; over all ranks every test sample exactly once, with its `index` in the split.

    Every rank yields the same number of batches (so collective operations stay in step); a rank whose part
    is one sample shorter may end with a shorter, even empty, batch.
    """

    def __init__(self, split: SplitFiles, recipe: Recipe, *, image_size: int, batch_size: int, rank: int,
                 world_size: int, device: torch.device, num_threads: int):
        self.device = device
        self.batch_size = batch_size
        self.image_size = image_size
        self.start = split.num_samples * rank // world_size
        self.part = _part_size(split.num_samples, rank, world_size)
        self.batches = math.ceil(math.ceil(split.num_samples / world_size) / batch_size)
        self._left_in_reader_epoch = 0
        self.pipeline = _test_pipeline(split, recipe, image_size, rank, world_size, device.type == "cuda",
                                       batch_size=batch_size, num_threads=num_threads,
                                       device_id=_device_id(device), seed=0, prefetch_queue_depth=2)
        self.pipeline.build()

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        while self._left_in_reader_epoch:  # an earlier pass was left unfinished: skip to the next one
            self._left_in_reader_epoch -= 1
            self.pipeline.run()
        self._left_in_reader_epoch = self.batches
        for batch in range(self.batches):
            self._left_in_reader_epoch -= 1
            image, fine, coarse = self.pipeline.run()
            first = batch * self.batch_size
            valid = max(0, min(self.batch_size, self.part - first))
            index = torch.arange(self.start + first, self.start + first + valid, dtype=torch.int64)
            yield {"image": _to_torch(image, self.device)[:valid],
                   "fine": _to_torch(fine, self.device).reshape(-1)[:valid],
                   "coarse": _to_torch(coarse, self.device).reshape(-1)[:valid], "index": index.to(self.device)}

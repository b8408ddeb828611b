"""The DALI back end's ops: per op, the per-sample parameter draw (numpy) and the graph code (DALI `fn`).

DALI_OPS maps every op of maskcon/recipes.py to a DaliOp (checked at import). The graph holds no random
operator: every random parameter is drawn here in numpy (for blocks of whole batches, see loaders/dali.py)
and fed through the external source, so each op kind appears once per view with per-sample parameters (no
branches over AutoAugment's sub-policies). Why AutoAugment is one flat pass and where it differs from
torchvision: DESIGN.md beside this file.

    draw(params, rng, sizes, state) -> {name: per-sample numpy array}; sizes: N x 2 (H, W) of the images
        entering the step; `state` carries a pending horizontal flip to the step that absorbs it.
    graph(images, params, drawn, size, folded) -> (images, mirror): DALI graph code on HWC uint8 images;
        `mirror` is a per-sample flip left for the final crop_mirror_normalize, or None; `folded`: the
        step is a flip that a neighbour carries (flip_folded).
Coordinates fed to DALI's warps are edge coordinates: pixel i spans [i, i + 1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from maskcon.recipes import (AUTO_AUGMENT_CIFAR10, AUTO_AUGMENT_OPS, Step,
                             auto_augment_magnitudes, blur_kernel_size, check_implementations)

try:
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath
except ImportError:  # reported by the loader builders, so the torch back end works without DALI
    fn = None


@dataclass(frozen=True)
class DaliOp:
    """One op's DALI implementation. flip_equivariant: its output distribution does not change when the
    input is mirrored first (a flip before it can wait for the final normalisation); absorbs_flip: its
    draw folds a pending horizontal flip into its own warp; mirrors_region: a horizontal flip right after
    it is folded into its region (roi_start, roi_end N x 2 (y, x): DALI's resize mirrors a region whose x
    end lies before its start)."""

    draw: Callable
    graph: Callable
    flip_equivariant: bool = False
    absorbs_flip: bool = False
    mirrors_region: bool = False


def _coin_flips(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    """N booleans, each True with probability p."""
    return rng.random(n) < p


# ------------------------------------------------------------------------------------------- draws


def _draw_crop(p, rng, sizes, state):
    """torchvision's RandomResizedCrop.get_params, vectorised: roi_start, roi_end N x 2 ((y, x) pixels).

    Up to 10 attempts per image as torchvision makes them, each drawn only for the images whose earlier
    attempts did not fit (most fit at the first), then torchvision's fallback: the whole image, clamped to
    the ratio range."""
    n = len(sizes)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    log_ratio = np.log(p["ratio"])
    crop_h, crop_w = np.empty(n), np.empty(n)
    pending = np.arange(n)
    for _ in range(10):
        area = height[pending] * width[pending] * rng.uniform(p["scale"][0], p["scale"][1], len(pending))
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], len(pending)))
        w, h = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
        fits = (w > 0) & (w <= width[pending]) & (h > 0) & (h <= height[pending])
        crop_w[pending[fits]], crop_h[pending[fits]] = w[fits], h[fits]
        pending = pending[~fits]
        if not len(pending):
            break
    found = np.ones(n, dtype=bool)
    found[pending] = False
    in_ratio = width[pending] / height[pending]
    crop_w[pending] = np.where(in_ratio > p["ratio"][1], np.round(height[pending] * p["ratio"][1]), width[pending])
    crop_h[pending] = np.where(in_ratio < p["ratio"][0], np.round(width[pending] / p["ratio"][0]), height[pending])
    top = np.where(found, np.floor(rng.random(n) * (height - crop_h + 1)), (height - crop_h) // 2)
    left = np.where(found, np.floor(rng.random(n) * (width - crop_w + 1)), (width - crop_w) // 2)
    return {"roi_start": np.stack([top, left], 1).astype(np.float32),
            "roi_end": np.stack([top + crop_h, left + crop_w], 1).astype(np.float32)}


def _draw_nothing(p, rng, sizes, state):
    return {}


def _draw_flip(p, rng, sizes, state):
    flip = _coin_flips(rng, p["p"], len(sizes))
    state["flip"] = flip
    return {"flip": flip.astype(np.int32)}


def _draw_perspective(p, rng, sizes, state):
    """N x 3 x 3 forward matrices in edge coordinates (the identity where the coin says no)."""
    n = len(sizes)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    reach_x = np.floor(p["distortion"] * (width // 2))
    reach_y = np.floor(p["distortion"] * (height // 2))

    def inwards(reach):  # uniform integer in 0..reach
        return np.floor(rng.random(n) * (reach + 1))

    ends = np.stack([
        np.stack([inwards(reach_x), inwards(reach_y)], 1),
        np.stack([width - 1 - inwards(reach_x), inwards(reach_y)], 1),
        np.stack([width - 1 - inwards(reach_x), height - 1 - inwards(reach_y)], 1),
        np.stack([inwards(reach_x), height - 1 - inwards(reach_y)], 1)], 1)       # N x 4 x (x, y)
    starts = np.stack([np.zeros(n), np.zeros(n), width - 1, np.zeros(n), width - 1, height - 1,
                       np.zeros(n), height - 1], 1).reshape(n, 4, 2)
    matrix = _homography(starts, ends)
    # pixel-index coordinates -> DALI's edge coordinates (pixel i spans [i, i + 1))
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    matrix = shift @ matrix @ np.linalg.inv(shift)
    applied = _coin_flips(rng, p["p"], n)
    matrix[~applied] = np.eye(3)
    return {"matrix": (matrix / matrix[:, 2:3, 2:3]).astype(np.float32)}


def _homography(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """N x 3 x 3 matrices mapping the 4 start points to the 4 end points (N x 4 x 2 each, (x, y))."""
    n = len(starts)
    a = np.zeros((n, 8, 8))
    b = np.zeros((n, 8))
    for k in range(4):
        x, y = starts[:, k, 0], starts[:, k, 1]
        u, v = ends[:, k, 0], ends[:, k, 1]
        a[:, 2 * k] = np.stack([x, y, np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n), -u * x, -u * y], 1)
        a[:, 2 * k + 1] = np.stack([np.zeros(n), np.zeros(n), np.zeros(n), x, y, np.ones(n), -v * x, -v * y], 1)
        b[:, 2 * k], b[:, 2 * k + 1] = u, v
    h = np.linalg.solve(a, b[..., None])[..., 0]
    return np.concatenate([h, np.ones((n, 1))], 1).reshape(n, 3, 3)


# ------------------------------------------------------------------------------------ AutoAugment


def auto_augment_draw(rng: np.random.Generator, n: int, image_size: int) -> dict[str, np.ndarray]:
    """Which ops run on each of n images and with which signed magnitude, as torchvision draws them.

    Returns sub_policy (N,), and per slot k in (0, 1): op_k (index into AUTO_AUGMENT_OPS, N), applied_k
    (bool, N) and magnitude_k (signed value from auto_augment_magnitudes, 0 for parameter-free ops).
    """
    op, probability, value, signed = _policy_table(image_size)  # each 2 x 25: per slot, per sub-policy
    sub_policy = rng.integers(0, len(AUTO_AUGMENT_CIFAR10), n)
    drawn = {"sub_policy": sub_policy}
    for slot in range(2):
        applied = rng.random(n) < probability[slot, sub_policy]
        negate = signed[slot, sub_policy] & (rng.random(n) < 0.5)
        drawn[f"op_{slot}"] = op[slot, sub_policy]
        drawn[f"applied_{slot}"] = applied
        drawn[f"magnitude_{slot}"] = np.where(negate, -1.0, 1.0) * value[slot, sub_policy]
    return drawn


@functools.lru_cache(maxsize=16)
def _policy_table(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AUTO_AUGMENT_CIFAR10 as arrays, 2 slots x 25 sub-policies: op index (into AUTO_AUGMENT_OPS),
    probability, magnitude (torchvision's bin value at this image size) and whether its sign is drawn."""
    table = AUTO_AUGMENT_CIFAR10
    op = np.array([[AUTO_AUGMENT_OPS.index(sub[slot][0]) for sub in table] for slot in range(2)])
    probability = np.array([[sub[slot][1] for sub in table] for slot in range(2)])
    value = np.zeros((2, len(table)))
    signed = np.zeros((2, len(table)), dtype=bool)
    for slot in range(2):
        for i, (name, _, magnitude_bin) in enumerate(sub[slot] for sub in table):
            magnitudes, signed[slot, i] = auto_augment_magnitudes(name, image_size)
            value[slot, i] = magnitudes[magnitude_bin] if magnitudes else 0.0
    return op, probability, value, signed


_CODE = {name: code for code, name in enumerate(AUTO_AUGMENT_OPS)}


# 3x3 smoothing kernel of PIL's (and torchvision's) sharpness; sharpness(f) blends f x + (1 - f) smooth(x).
SHARPNESS_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float64) / 13


def _sharpness_bases() -> np.ndarray:
    """3 x 5 x 5: identity, the smoothing kernel, and the smoothing kernel applied twice."""
    identity = np.zeros((5, 5))
    identity[2, 2] = 1
    smooth = np.zeros((5, 5))
    smooth[1:4, 1:4] = SHARPNESS_SMOOTH
    twice = np.zeros((5, 5))
    for dy in range(3):
        for dx in range(3):
            twice[dy:dy + 3, dx:dx + 3] += SHARPNESS_SMOOTH[dy, dx] * SHARPNESS_SMOOTH
    return np.stack([identity, smooth, twice])


_SHARPNESS_BASES = _sharpness_bases()


def auto_augment_parameters(chosen: dict[str, np.ndarray], sizes: np.ndarray, flip: np.ndarray | None) -> dict:
    """The per-sample parameters of the flat DALI AutoAugment (DESIGN.md) for the ops of
    auto_augment_draw, on images of sizes N x 2 (H, W), after a horizontal flip where `flip` is set."""
    n = len(sizes)
    height, width = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    eye = np.broadcast_to(np.eye(3), (n, 3, 3))
    # DALI edge coordinates (pixel i spans [i, i + 1)), x to the right, y down; forward maps
    matrix = eye.copy()
    if flip is not None:
        matrix[flip, 0, 0] = -1
        matrix[flip, 0, 2] = width[flip]
    linear = np.stack([np.ones(n), np.zeros(n), np.zeros(n)], 1)  # a, b, c of the colour map
    sharp = np.stack([np.ones(n), np.zeros(n), np.zeros(n)], 1)   # weights of identity, smooth, smooth twice
    mask = np.full(n, 255, dtype=np.uint8)                           # posterize
    equalize = np.zeros(n, dtype=bool)
    autocontrast = np.zeros(n, dtype=bool)
    threshold = np.full(n, 256.0)                                   # solarize; 256: no pixel changes
    for slot in range(2):
        op = chosen[f"op_{slot}"]  # indices into AUTO_AUGMENT_OPS
        on = chosen[f"applied_{slot}"]
        m = chosen[f"magnitude_{slot}"]
        step = eye.copy()
        for name, row, column, sign in (("ShearX", 0, 1, -1), ("ShearY", 1, 0, -1), ("TranslateX", 0, 2, 1),
                                        ("TranslateY", 1, 2, 1)):  # shear x -> x - m y about the corner, ...
            k = on & (op == _CODE[name])
            step[k, row, column] = sign * m[k]
        rotate = on & (op == _CODE["Rotate"])  # counter-clockwise on screen about the image centre
        angle = np.radians(m[rotate])
        cos, sin = np.cos(angle), np.sin(angle)
        cx, cy = width[rotate] / 2, height[rotate] / 2
        step[rotate, 0, 0], step[rotate, 0, 1], step[rotate, 0, 2] = cos, sin, cx - cos * cx - sin * cy
        step[rotate, 1, 0], step[rotate, 1, 1], step[rotate, 1, 2] = -sin, cos, cy + sin * cx - cos * cy
        matrix = step @ matrix
        factor = 1.0 + m
        a, b, c = linear.T.copy()
        for name in ("Brightness", "Color", "Contrast"):
            k = on & (op == _CODE[name])
            f = factor[k]
            if name == "Brightness":
                linear[k] = np.stack([f * a[k], f * b[k], f * c[k]], 1)
            elif name == "Color":  # blend with grey; grey(a x + b g + c m) = (a + b) g + c m
                linear[k] = np.stack([f * a[k], f * b[k] + (1 - f) * (a[k] + b[k]), c[k]], 1)
            else:  # blend with the mean grey level, (a + b + c) m
                linear[k] = np.stack([f * a[k], f * b[k], f * c[k] + (1 - f) * (a[k] + b[k] + c[k])], 1)
        k = on & (op == _CODE["Sharpness"])
        f = factor[k][:, None]
        sharp[k] = f * sharp[k] + (1 - f) * np.concatenate([np.zeros((k.sum(), 1)), sharp[k][:, :2]], 1)
        k = on & (op == _CODE["Posterize"])
        mask[k] = 255 ^ (2 ** (8 - m[k].astype(np.int64)) - 1)
        equalize |= on & (op == _CODE["Equalize"])
        autocontrast |= on & (op == _CODE["AutoContrast"])
        k = on & (op == _CODE["Solarize"])
        threshold[k] = m[k]
        threshold[on & (op == _CODE["Invert"])] = 0.0
    kernels = np.einsum("nk,kyx->nyx", sharp * linear[:, :1], _SHARPNESS_BASES)  # the colour gain a as well
    def per_sample(values, dtype):  # N x 1 x 1 x 1: broadcasts against H x W x C
        return np.asarray(values, dtype=dtype).reshape(n, 1, 1, 1)

    return {"matrix": matrix[:, :2].astype(np.float32), "colour_b": per_sample(linear[:, 1], np.float32),
            "colour_c": per_sample(linear[:, 2], np.float32),
            # DALI's grey levels are rounded, torchvision's truncated: half a level lower on average;
            # -0.499 turns the rounding of DALI's cast into torchvision's truncation
            "colour_d": per_sample(-0.5 * (linear[:, 1] + linear[:, 2]) - 0.499, np.float32),
            "kernel": kernels.astype(np.float32), "posterize": per_sample(mask, np.uint8),
            "equalize": per_sample(equalize * 255, np.uint8), "autocontrast": per_sample(autocontrast, np.float32),
            "threshold": per_sample(threshold, np.float32)}


# The 24 orders of (brightness, contrast, saturation, hue), one drawn per image as torch.randperm(4) does.
JITTER_ORDERS = np.array([(a, b, c, d) for a in range(4) for b in range(4) for c in range(4) for d in range(4)
                          if len({a, b, c, d}) == 4], dtype=np.int32)


def _draw_jitter(p, rng, sizes, state):
    n = len(sizes)

    def factor(x):
        return rng.uniform(1 - x, 1 + x, n).astype(np.float32)

    return {"apply": _coin_flips(rng, p["p"], n), "order": JITTER_ORDERS[rng.integers(0, len(JITTER_ORDERS), n)],
            "brightness": factor(p["brightness"]), "contrast": factor(p["contrast"]),
            "saturation": factor(p["saturation"]), "hue": rng.uniform(-p["hue"], p["hue"], n).astype(np.float32)}


def _draw_grayscale(p, rng, sizes, state):
    return {"apply": _coin_flips(rng, p["p"], len(sizes))}


def _draw_blur(p, rng, sizes, state):
    n = len(sizes)
    sigma = rng.uniform(p["sigma"][0], p["sigma"][1], n).astype(np.float32)
    return {"apply": _coin_flips(rng, p["p"], n), "sigma": sigma}


def _draw_auto_augment(p, rng, sizes, state):
    chosen = auto_augment_draw(rng, len(sizes), int(sizes[0, 1]) if len(sizes) else 32)
    flip = state.pop("flip", None)
    if len(sizes) and (sizes == sizes[0]).all():  # one size (after a crop): look the parameters up
        table = _auto_augment_table(int(sizes[0, 0]), int(sizes[0, 1]))
        code = ((((chosen["sub_policy"] * 2 + chosen["applied_0"]) * 2 + chosen["applied_1"]) * 2
                 + (chosen["magnitude_0"] < 0)) * 2 + (chosen["magnitude_1"] < 0)) * 2
        if flip is not None:
            code = code + flip
        return {name: values[code] for name, values in table.items()}
    return auto_augment_parameters(chosen, sizes, flip)


@functools.lru_cache(maxsize=16)
def _auto_augment_table(height: int, width: int) -> dict[str, np.ndarray]:
    """auto_augment_parameters for every outcome of auto_augment_draw on height x width images, with and
    without a flip before: 800 rows (sub-policy, applied_0, applied_1, negated_0, negated_1, flipped), so a
    draw costs one lookup per parameter instead of the arithmetic per image."""
    op, _, value, _ = _policy_table(width)
    sub, applied_0, applied_1, negated_0, negated_1, flip = (
        axis.ravel() for axis in np.indices((len(AUTO_AUGMENT_CIFAR10), 2, 2, 2, 2, 2)))
    chosen = {"sub_policy": sub, "op_0": op[0, sub], "applied_0": applied_0.astype(bool),
              "magnitude_0": np.where(negated_0, -1.0, 1.0) * value[0, sub], "op_1": op[1, sub],
              "applied_1": applied_1.astype(bool), "magnitude_1": np.where(negated_1, -1.0, 1.0) * value[1, sub]}
    return auto_augment_parameters(chosen, np.full((len(sub), 2), (height, width)), flip.astype(bool))



# ------------------------------------------------------------------------------------ graph code


def _like(node, images):
    """A per-sample parameter where the images are: arithmetic needs both on one device."""
    return node.gpu() if images.device == "gpu" else node


def resized_crop(images, roi_start, roi_end, size: int):
    """The crop [roi_start, roi_end) ((y, x) pixels, per sample) resized to size x size, bilinear, antialiased."""
    return fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                     interp_type=types.INTERP_LINEAR, antialias=True)


def resize(images, size: int):
    return fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)


def perspective(images, matrix):
    return fn.experimental.warp_perspective(images, matrix=matrix, fill_value=0, interp_type=types.INTERP_LINEAR,
                                            inverse_map=False, border_mode="constant")


def _truncate(x):
    return fn.reshape(fn.cast(dmath.floor(x), dtype=types.UINT8), layout="HWC")


_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)


def _constant(value: np.ndarray, like):
    return types.Constant(value, device="gpu" if like.device == "gpu" else "cpu")


def _grey(data):
    """H x W x 1 float grey levels of HWC uint8 RGB images (torchvision's rgb_to_grayscale)."""
    return dmath.floor(fn.reductions.sum(data * _constant(_LUMA, data), axis_names="C", keep_dims=True))


def _brightness(data, factor):
    return _truncate(data * factor)


def _saturation(data, factor):  # adjust_saturation: blend with the grey image
    return _truncate(data * factor + _grey(data) * (1.0 - factor))


def _contrast(data, factor):  # adjust_contrast: blend with the mean grey level of the image
    mean = fn.reductions.mean(_grey(data), axis_names="HWC", keep_dims=True)
    return _truncate(data * factor + mean * (1.0 - factor))


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


def color_jitter(images, drawn):
    """ColorJitter where `apply` is set: the four adjustments in the drawn order (DALI conditionals)."""
    if drawn["apply"]:
        order = drawn["order"]
        for stage in range(4):
            adjustment = order[stage]
            if adjustment == 0:
                images = _brightness(images, _like(drawn["brightness"], images))
            elif adjustment == 1:
                images = _contrast(images, _like(drawn["contrast"], images))
            elif adjustment == 2:
                images = _saturation(images, _like(drawn["saturation"], images))
            else:
                images = _hue_shift(images, _like(drawn["hue"], images))
    return images


def grayscale(images, apply):
    """rgb_to_grayscale(num_output_channels=3) where `apply` is set."""
    if apply:
        grey = _grey(images)
        images = _truncate(fn.cat(grey, grey, grey, axis=2))
    return images


def gaussian_blur(images, apply, sigma, window: int):
    if apply:
        images = fn.gaussian_blur(images, sigma=sigma, window_size=window)
    return images


def flat_auto_augment(images, drawn):
    """AutoAugment as one pass through each op kind with per-sample parameters (DESIGN.md)."""
    images = fn.warp_affine(images, matrix=drawn["matrix"], fill_value=0, interp_type=types.INTERP_NN,
                            inverse_map=False)
    # sharpness (one 5x5 kernel), then per channel A x + b grey(x) + c mean(grey(x)) + D, truncated once as
    # torchvision truncates: brightness, colour and contrast in (a, b, c, d), with a folded into the kernel,
    # and autocontrast's stretch (x - lo) * 255 / (hi - lo) in A and D where it applies (no sub-policy holds
    # AutoContrast with a colour op or Sharpness, so there a = 1 and the kernel is the identity). Grey and
    # mean are taken before sharpening: no sub-policy holds Color with Sharpness, and sharpening keeps the mean.
    sharpened = fn.filter(images, _like(drawn["kernel"], images), dtype=types.FLOAT)  # a x, sharpened
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    mean = fn.reductions.mean(grey, axis_names="HWC", keep_dims=True)
    lo = fn.reductions.min(images, axis_names="HW", keep_dims=True)      # 1 x 1 x C
    hi = fn.reductions.max(images, axis_names="HW", keep_dims=True)
    spread = hi - lo
    stretch = _like(drawn["autocontrast"], images) * (spread > 0)       # a constant channel stays as it is
    scale = 255.0 / dmath.max(spread, 1)
    gain = 1.0 + stretch * (scale - 1.0)
    offset = _like(drawn["colour_d"], images) - stretch * (lo * scale)
    mixed = (sharpened * gain + grey * _like(drawn["colour_b"], images)
             + (mean * _like(drawn["colour_c"], images) + offset))
    images = fn.cast(mixed, dtype=types.UINT8)  # rounds; `offset` holds -0.499, so this truncates
    images = images & _like(drawn["posterize"], images)
    # DALI's equalize counts pixels up to a level (OpenCV), PIL's those below it: equalizing the inverted
    # image and inverting back counts those below
    white = types.Constant(255, dtype=types.UINT8)
    equalized = white - fn.equalize(white - images)
    images = images ^ ((images ^ equalized) & _like(drawn["equalize"], images))
    inverted = (images >= _like(drawn["threshold"], images)) * types.Constant(255, dtype=types.UINT8)
    return images ^ inverted  # 255 - x where x >= threshold


def _graph_crop(images, p, drawn, size, folded):
    return resized_crop(images, drawn["roi_start"], drawn["roi_end"], size), None


def _graph_resize(images, p, drawn, size, folded):
    return resize(images, size), None


def _graph_flip(images, p, drawn, size, folded):
    """No operator of its own: folded into the crop before it or the warp after it (flip_folded), else
    left as a per-sample mirror flag (applied by the final crop_mirror_normalize or by fn.flip, see
    view_graph)."""
    return images, None if folded else drawn["flip"]


def _graph_perspective(images, p, drawn, size, folded):
    return perspective(images, drawn["matrix"]), None


def _graph_jitter(images, p, drawn, size, folded):
    return color_jitter(images, drawn), None


def _graph_grayscale(images, p, drawn, size, folded):
    return grayscale(images, drawn["apply"]), None


def _graph_blur(images, p, drawn, size, folded):
    return gaussian_blur(images, drawn["apply"], drawn["sigma"], blur_kernel_size(p["sigma"][1], size)), None


def _graph_auto_augment(images, p, drawn, size, folded):
    return flat_auto_augment(images, drawn), None


DALI_OPS: dict[str, DaliOp] = {
    "random_resized_crop": DaliOp(_draw_crop, _graph_crop, mirrors_region=True),
    "resize": DaliOp(_draw_nothing, _graph_resize),
    "horizontal_flip": DaliOp(_draw_flip, _graph_flip, flip_equivariant=True),
    "auto_augment": DaliOp(_draw_auto_augment, _graph_auto_augment, absorbs_flip=True),
    "random_perspective": DaliOp(_draw_perspective, _graph_perspective, flip_equivariant=True),
    "color_jitter": DaliOp(_draw_jitter, _graph_jitter, flip_equivariant=True),
    "random_grayscale": DaliOp(_draw_grayscale, _graph_grayscale, flip_equivariant=True),
    "gaussian_blur": DaliOp(_draw_blur, _graph_blur, flip_equivariant=True),
}
check_implementations(DALI_OPS, "DALI")


# ------------------------------------------------------------------------------------------- views


def _into_previous(steps: tuple[Step, ...], index: int) -> bool:
    """Whether step `index` is a flip folded into the region of the step before it (mirrors_region)."""
    return steps[index].op == "horizontal_flip" and index > 0 and DALI_OPS[steps[index - 1].op].mirrors_region


def flip_folded(steps: tuple[Step, ...], index: int) -> bool:
    """Whether step `index` is a flip that a neighbouring step carries, so that it has no operator or input
    of its own (it is drawn, and its draw is part of that step's parameters): the step before it when that
    step mirrors its region, else the step after it when that step absorbs flips into its warp."""
    return _into_previous(steps, index) or (steps[index].op == "horizontal_flip" and index + 1 < len(steps)
                                            and DALI_OPS[steps[index + 1].op].absorbs_flip)


def draw_view(steps: tuple[Step, ...], rng: np.random.Generator, sizes: np.ndarray, size: int) -> list[dict]:
    """Per step, the per-sample parameters of one view for images of sizes N x 2 (H, W) before the view,
    output side `size` (the first step, a crop or resize, makes every image size x size)."""
    state: dict = {}
    drawn = []
    for index, step in enumerate(steps):
        values = DALI_OPS[step.op].draw(step.params, rng, sizes, state)
        if _into_previous(steps, index):  # the crop's region mirrored: x from its end to its start
            flip, region = state.pop("flip"), drawn[-1]
            region["roi_start"][flip, 1], region["roi_end"][flip, 1] = (region["roi_end"][flip, 1],
                                                                        region["roi_start"][flip, 1])
        drawn.append({} if flip_folded(steps, index) else values)  # a neighbour took it over
        if step.op != "horizontal_flip":
            state.pop("flip", None)
        if index == 0:
            sizes = np.full((len(sizes), 2), size, dtype=np.int64)
    return drawn


def view_graph(images, steps: tuple[Step, ...], drawn: list[dict], size: int):
    """Apply one view's steps to HWC uint8 images; returns (images, per-sample mirror flag or None)."""
    mirror = None
    for index, step in enumerate(steps):
        images, flip = DALI_OPS[step.op].graph(images, step.params, drawn[index], size,
                                                flip_folded(steps, index))
        if flip is not None:
            if all(DALI_OPS[later.op].flip_equivariant for later in steps[index + 1:]):
                mirror = flip  # flip while normalising
            else:
                images = fn.flip(images, horizontal=flip)
    return images, mirror


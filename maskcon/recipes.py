"""The augmentation recipes of the paper (supplement, section A): ops as objects, recipes as data.

An op (`Op` below) is one object that owns everything about one kind of augmentation: its parameter
schema and validation, the per-sample random draw the DALI pipelines are fed with (`draw`, numpy), and its
DALI (`dali`, graph code in maskcon/loaders/dali.py), torchvision (`torchvision`) and PIL (`pil`)
implementations. A back end asks the op for its implementation; an op without one for that back end raises
UserError, so a new op touches this file (plus its DALI graph function) and nothing is silently skipped.

A recipe lists, per view, the steps applied in order to a uint8 RGB image; the output side S is the
loader's `image_size` (the dataset's, not the recipe's):
    random_resized_crop  scale=(lo, hi) of the source area, ratio=(lo, hi) width/height; output S x S
    horizontal_flip      p
    auto_augment         policy="cifar10" (AutoAugment, CIFAR-10 policy; see AutoAugment below)
    random_perspective   distortion (fraction of half the side each corner may move inwards), p
    color_jitter         brightness, contrast, saturation (factor in [1-x, 1+x]), hue (turns in [-x, x]), p
    random_grayscale     p
    gaussian_blur        sigma=(lo, hi) in pixels, uniform, p
    resize               (to S x S; test view only)
after which every view is scaled to [0, 1] and normalised with the recipe's mean and std.

The recipes are the module constants CIFAR, DIGITS, IMAGENET32, CARS and PHOTOS (RECIPES maps their names to
them); each dataset's description (maskcon/datasets) names the one it uses, and `maskcon.datasets.recipe_for`
returns it validated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from maskcon.errors import UserError

# Per-channel statistics of the [0, 1]-scaled training images (RGB).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKEND_NAMES = {"dali": "DALI", "torchvision": "torchvision", "pil": "PIL"}


# ------------------------------------------------------------------------------------------------ ops


class Op:
    """One kind of augmentation step. Subclasses set `name` and `params` (parameter -> meaning) and
    override `check` and the back ends they support.

    draw(params, rng, sizes, state) -> per-sample numpy arrays for the DALI graph, sizes: N x 2 (H, W) of
        the images entering the step; `state` carries a pending horizontal flip between steps.
    dali(images, params, drawn, size, absorbs_next) -> (images, mirror): DALI graph code; `mirror` is a
        per-sample flip left for the final crop_mirror_normalize, or None.
    torchvision(params, size) / pil(params, size) -> a transform on uint8 C x H x W tensors / PIL images.
    """

    name = ""
    params: dict[str, str] = {}
    flip_equivariant = False  # its output distribution does not change when the input is mirrored first
    absorbs_flip = False      # its DALI draw folds a pending horizontal flip into its own warp

    def check(self, where: str, p: dict) -> None:
        """Raise UserError for parameter values outside their range (the keys are already checked)."""

    def validate(self, where: str, p: dict) -> None:
        if set(p) != set(self.params):
            raise UserError(f"{where}: {self.name} takes {sorted(self.params)}, got {sorted(p)}")
        if "p" in p and not 0.0 <= p["p"] <= 1.0:
            raise UserError(f"{where}: probability {p['p']} is outside [0, 1]")
        self.check(where, p)

    def _missing(self, backend: str):
        raise UserError(f"the {BACKEND_NAMES[backend]} loader has no implementation of the {self.name} op; "
                        "pick another loader backend or recipe")

    def draw(self, p: dict, rng: np.random.Generator, sizes: np.ndarray, state: dict) -> dict[str, np.ndarray]:
        return {}

    def dali(self, images, p: dict, drawn: dict, size: int, absorbs_next: bool):
        self._missing("dali")

    def torchvision(self, p: dict, size: int):
        self._missing("torchvision")

    def pil(self, p: dict, size: int):
        self._missing("pil")


def _check_range(where: str, pair, lo: float, hi: float) -> None:
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise UserError(f"{where}: expected a range within [{lo}, {hi}], got {pair}")


def _coins(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return rng.random(n) < p


def _dali_ops():
    from maskcon.loaders import dali

    return dali


class RandomResizedCrop(Op):
    """torchvision's RandomResizedCrop: up to 10 draws of (area fraction uniform in scale, log aspect
    ratio uniform in log(ratio)); the first that fits in the image is taken at a uniform position, else
    a central crop of the image clamped to the ratio range. Resized to S x S, bilinear, antialiased."""

    name = "random_resized_crop"
    params = {"scale": "area fraction range", "ratio": "width / height range"}
    ATTEMPTS = 10

    def check(self, where, p):
        _check_range(where + " scale", p["scale"], 1e-6, 1.0)
        _check_range(where + " ratio", p["ratio"], 1e-6, 1e6)

    def draw(self, p, rng, sizes, state):
        n = len(sizes)
        height, width = sizes[:, 0:1].astype(np.float64), sizes[:, 1:2].astype(np.float64)
        area = height * width * rng.uniform(p["scale"][0], p["scale"][1], (n, self.ATTEMPTS))
        log_ratio = np.log(p["ratio"])
        aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], (n, self.ATTEMPTS)))
        w = np.round(np.sqrt(area * aspect))
        h = np.round(np.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.argmax(axis=1)
        rows = np.arange(n)
        crop_w, crop_h = w[rows, first], h[rows, first]
        found = fits[rows, first]
        # fallback: the whole image, clamped to the ratio range
        in_ratio = width[:, 0] / height[:, 0]
        fallback_w = np.where(in_ratio < p["ratio"][0], width[:, 0],
                              np.where(in_ratio > p["ratio"][1], np.round(height[:, 0] * p["ratio"][1]), width[:, 0]))
        fallback_h = np.where(in_ratio < p["ratio"][0], np.round(width[:, 0] / p["ratio"][0]), height[:, 0])
        crop_w = np.where(found, crop_w, fallback_w)
        crop_h = np.where(found, crop_h, fallback_h)
        top = np.where(found, np.floor(rng.random(n) * (height[:, 0] - crop_h + 1)), (height[:, 0] - crop_h) // 2)
        left = np.where(found, np.floor(rng.random(n) * (width[:, 0] - crop_w + 1)), (width[:, 0] - crop_w) // 2)
        return {"roi_start": np.stack([top, left], 1).astype(np.float32),
                "roi_end": np.stack([top + crop_h, left + crop_w], 1).astype(np.float32)}

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().resized_crop(images, drawn["roi_start"], drawn["roi_end"], size), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"], antialias=True)

    def pil(self, p, size):
        import torchvision.transforms as T

        return T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"])


class Resize(Op):
    """The whole image resized to S x S (bilinear, antialiased): the test view."""

    name = "resize"

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().resize(images, size), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.Resize((size, size), antialias=True)

    def pil(self, p, size):
        import torchvision.transforms as T

        return T.Resize((size, size))


class HorizontalFlip(Op):
    """Mirror left-right with probability p. In DALI the flip is folded into the next step's warp when that
    step absorbs it (AutoAugment), or into the final crop_mirror_normalize when every later step is
    flip-equivariant, so it costs no operator of its own."""

    name = "horizontal_flip"
    params = {"p": "probability"}
    flip_equivariant = True

    def draw(self, p, rng, sizes, state):
        flip = _coins(rng, p["p"], len(sizes))
        state["flip"] = flip
        return {"flip": flip.astype(np.int32)}

    def dali(self, images, p, drawn, size, absorbs_next):
        if absorbs_next:
            return images, None
        return images, drawn["flip"]

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomHorizontalFlip(p["p"])

    pil = torchvision


class RandomPerspective(Op):
    """torchvision's RandomPerspective: with probability p, each corner moves inwards by an integer drawn
    uniformly from 0..int(distortion * side // 2) along x and y; bilinear, fill 0. DALI warps every
    sample, with the identity where the coin says no."""

    name = "random_perspective"
    params = {"distortion": "fraction of half the side a corner may move", "p": "probability"}
    flip_equivariant = True

    def check(self, where, p):
        if not 0.0 <= p["distortion"] <= 1.0:
            raise UserError(f"{where}: distortion {p['distortion']} is outside [0, 1]")

    def draw(self, p, rng, sizes, state):
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
        applied = _coins(rng, p["p"], n)
        matrix[~applied] = np.eye(3)
        return {"matrix": (matrix / matrix[:, 2:3, 2:3]).astype(np.float32)}

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().perspective(images, drawn["matrix"]), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomPerspective(distortion_scale=p["distortion"], p=p["p"])

    pil = torchvision


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


# The 24 orders of (brightness, contrast, saturation, hue), one drawn per image as torch.randperm(4) does.
JITTER_ORDERS = np.array([(a, b, c, d) for a in range(4) for b in range(4) for c in range(4) for d in range(4)
                          if len({a, b, c, d}) == 4], dtype=np.int32)


class ColorJitter(Op):
    """torchvision's ColorJitter under RandomApply(p): factors b, c, s uniform in [1-x, 1+x], hue uniform
    in [-x, x] turns, the four adjustments in a random order, each rounding to uint8 as torchvision's
    uint8 path does."""

    name = "color_jitter"
    params = {"brightness": "factor range half-width", "contrast": "factor range half-width",
              "saturation": "factor range half-width", "hue": "turns", "p": "probability"}
    flip_equivariant = True

    def check(self, where, p):
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= p[key] < 1.0:
                raise UserError(f"{where}: {key} {p[key]} is outside [0, 1)")
        if not 0.0 <= p["hue"] <= 0.5:
            raise UserError(f"{where}: hue {p['hue']} is outside [0, 0.5]")

    def draw(self, p, rng, sizes, state):
        n = len(sizes)

        def factor(x):
            return rng.uniform(1 - x, 1 + x, n).astype(np.float32)

        return {"apply": _coins(rng, p["p"], n), "order": JITTER_ORDERS[rng.integers(0, len(JITTER_ORDERS), n)],
                "brightness": factor(p["brightness"]), "contrast": factor(p["contrast"]),
                "saturation": factor(p["saturation"]), "hue": rng.uniform(-p["hue"], p["hue"], n).astype(np.float32)}

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().color_jitter(images, drawn), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomApply([T.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])], p=p["p"])

    pil = torchvision


class RandomGrayscale(Op):
    """With probability p, grey = 0.2989 R + 0.587 G + 0.114 B (truncated) on all three channels."""

    name = "random_grayscale"
    params = {"p": "probability"}
    flip_equivariant = True

    def draw(self, p, rng, sizes, state):
        return {"apply": _coins(rng, p["p"], len(sizes))}

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().grayscale(images, drawn["apply"]), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomGrayscale(p["p"])

    pil = torchvision


def blur_kernel_size(sigma_high: float, size: int) -> int:
    """torchvision GaussianBlur's kernel side: +-3 sigma of the widest blur, odd, at most the image side."""
    kernel = 2 * math.ceil(3 * sigma_high) + 1
    return max(1, min(kernel, size if size % 2 else size - 1))


class GaussianBlur(Op):
    """With probability p, a Gaussian blur with sigma uniform in the range (MoCo v2's GaussianBlur)."""

    name = "gaussian_blur"
    params = {"sigma": "pixels, range", "p": "probability"}
    flip_equivariant = True

    def check(self, where, p):
        _check_range(where + " sigma", p["sigma"], 1e-3, 100.0)

    def draw(self, p, rng, sizes, state):
        n = len(sizes)
        sigma = rng.uniform(p["sigma"][0], p["sigma"][1], n).astype(np.float32)
        return {"apply": _coins(rng, p["p"], n), "sigma": sigma}

    def dali(self, images, p, drawn, size, absorbs_next):
        window = blur_kernel_size(p["sigma"][1], size)
        return _dali_ops().gaussian_blur(images, drawn["apply"], drawn["sigma"], window), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.RandomApply([T.GaussianBlur(blur_kernel_size(p["sigma"][1], size), sigma=p["sigma"])], p=p["p"])

    def pil(self, p, size):
        import torchvision.transforms as T

        return T.RandomApply([_PilGaussianBlur(p["sigma"])], p=p["p"])


class _PilGaussianBlur:
    """MoCo v2's GaussianBlur, as the official code uses it: PIL's filter with sigma uniform in a range."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image):
        import random

        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


# --------------------------------------------------------------------------------------- AutoAugment

# AutoAugment, CIFAR-10 policy, as torchvision.transforms.AutoAugment(AutoAugmentPolicy.CIFAR10):
# one of the 25 sub-policies is drawn uniformly per image; each (op, probability, magnitude bin) then
# runs with its probability. Magnitudes come from AUTO_AUGMENT_BINS bins (see auto_augment_magnitudes).
AUTO_AUGMENT_BINS = 10
AUTO_AUGMENT_CIFAR10 = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)
AUTO_AUGMENT_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")


def auto_augment_magnitudes(op: str, image_size: int) -> tuple[list[float], bool]:
    """torchvision's AutoAugment magnitude space for one op: (value per bin, sign drawn at random).

    Shear: shear factor; Translate: pixels (truncated to int, as torchvision does); Rotate: degrees;
    Brightness/Color/Contrast/Sharpness: enhancement factor minus 1; Posterize: bits kept;
    Solarize: threshold on 0..255. Parameter-free ops return ([], False).
    """
    n = AUTO_AUGMENT_BINS

    def linspace(lo: float, hi: float) -> list[float]:
        return [lo + (hi - lo) * i / (n - 1) for i in range(n)]

    if op in ("ShearX", "ShearY"):
        return linspace(0.0, 0.3), True
    if op in ("TranslateX", "TranslateY"):
        return [float(int(v)) for v in linspace(0.0, 150.0 / 331.0 * image_size)], True
    if op == "Rotate":
        return linspace(0.0, 30.0), True
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return linspace(0.0, 0.9), True
    if op == "Posterize":
        return [float(8 - round(i / ((n - 1) / 4))) for i in range(n)], False
    if op == "Solarize":
        return linspace(255.0, 0.0), False
    if op in ("AutoContrast", "Equalize", "Invert"):
        return [], False
    raise UserError(f"unknown AutoAugment op {op!r} in the recipe table")


def auto_augment_draw(rng: np.random.Generator, n: int, image_size: int) -> dict[str, np.ndarray]:
    """Which ops run on each of n images and with which signed magnitude, as torchvision draws them.

    Returns sub_policy (N,), and per slot k in (0, 1): op_k (index into AUTO_AUGMENT_OPS, N), applied_k
    (bool, N) and magnitude_k (signed value from auto_augment_magnitudes, 0 for parameter-free ops).
    """
    table = AUTO_AUGMENT_CIFAR10
    sub_policy = rng.integers(0, len(table), n)
    drawn = {"sub_policy": sub_policy}
    for slot in range(2):
        names = [sub[slot][0] for sub in table]
        op = np.array([AUTO_AUGMENT_OPS.index(name) for name in names])[sub_policy]
        probability = np.array([sub[slot][1] for sub in table])[sub_policy]
        value = np.zeros(len(table))
        signed = np.zeros(len(table), dtype=bool)
        for i, (name, _, magnitude_bin) in enumerate(sub[slot] for sub in table):
            magnitudes, signed[i] = auto_augment_magnitudes(name, image_size)
            value[i] = magnitudes[magnitude_bin] if magnitudes else 0.0
        applied = rng.random(n) < probability
        negate = signed[sub_policy] & (rng.random(n) < 0.5)
        drawn[f"op_{slot}"] = op
        drawn[f"applied_{slot}"] = applied
        drawn[f"magnitude_{slot}"] = np.where(negate, -1.0, 1.0) * value[sub_policy]
    return drawn


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


class AutoAugment(Op):
    """AutoAugment with torchvision's CIFAR-10 policy (AUTO_AUGMENT_CIFAR10): 25 sub-policies drawn
    uniformly, each of their two ops applied with its probability at its magnitude bin (torchvision's
    magnitude ranges, auto_augment_magnitudes), signed ops negated with probability 1/2.

    torchvision and PIL run torchvision's AutoAugment itself. The DALI graph is flat: every image passes
    once through each kind of op, with per-sample parameters drawn here and neutral where its sub-policy
    does not apply, in this order:
        warp_affine  flip (the preceding horizontal_flip), shear, translate, rotate composed into one
                     matrix; nearest neighbour, fill 0
        affine       sharpness (one per-sample 5x5 kernel), then brightness, colour (saturation),
                     contrast and autocontrast as one map per channel, A x + b grey(x) + c mean(grey(x)) + D,
                     truncated once (no sub-policy holds AutoContrast with a colour op or Sharpness)
        posterize    x & mask
        equalize     selected per sample (computed for all)
        solarize     x >= threshold -> 255 - x; Invert is solarize at threshold 0
    Differences from torchvision's AutoAugment, all inside one sub-policy's pair of ops:
    - The order is the fixed one above, not the sub-policy's. This changes the result only in sub-policy
      20 (Solarize then AutoContrast runs as AutoContrast then Solarize); elsewhere the reordered ops
      commute (Invert/Contrast, Sharpness/Brightness, Color/TranslateX: colour maps fill 0 to 0) or
      both orders give the same image up to rounding (Equalize then AutoContrast, sub-policies 11 and 15:
      equalize's output already spans 0..255, and equalize ignores a monotonic stretch before it).
    - Two ops of one kind in one sub-policy are composed: the two translations (21) exactly; the two
      sharpness blends (2) as one 5x5 kernel, without the uint8 rounding in between; Equalize twice
      (8, 16) runs once (equalize is nearly idempotent).
    - Colour ops compose in float and round once (torchvision rounds to uint8 after each) and use
      grey = 0.299 R + 0.587 G + 0.114 B rounded (torchvision: 0.2989, 0.587, 0.114, truncated).
    - Sharpness smooths the 1-pixel border too (PIL keeps the border) and is truncated with the colour
      map (torchvision rounds the smoothed image first).
    - Equalize is DALI's (OpenCV's formula) on the inverted image, inverted back: it counts the pixels
      below a level as PIL does, but scales by 255 / (pixels - pixels at the top level) where PIL divides
      by that count // 255; about half a level lower on CIFAR-like 32 x 32 images.
    - Sub-policy 14's Invert has probability 0 and never runs (torchvision's table keeps it).
    """

    name = "auto_augment"
    params = {"policy": "cifar10"}
    absorbs_flip = True

    def check(self, where, p):
        if p["policy"] != "cifar10":
            raise UserError(f"{where}: only the cifar10 AutoAugment policy is implemented, got {p['policy']!r}")

    def draw(self, p, rng, sizes, state):
        chosen = auto_augment_draw(rng, len(sizes), int(sizes[0, 1]) if len(sizes) else 32)
        return auto_augment_parameters(chosen, sizes, state.pop("flip", None))

    def dali(self, images, p, drawn, size, absorbs_next):
        return _dali_ops().flat_auto_augment(images, drawn), None

    def torchvision(self, p, size):
        import torchvision.transforms as T

        return T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    pil = torchvision


def auto_augment_parameters(chosen: dict[str, np.ndarray], sizes: np.ndarray, flip: np.ndarray | None) -> dict:
    """The per-sample parameters of the flat DALI AutoAugment (see AutoAugment) for the ops of
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
        op = np.array(AUTO_AUGMENT_OPS)[chosen[f"op_{slot}"]]
        on = chosen[f"applied_{slot}"]
        m = chosen[f"magnitude_{slot}"]
        step = eye.copy()
        step[on & (op == "ShearX"), 0, 1] = -m[on & (op == "ShearX")]   # x -> x - m y, about the corner
        step[on & (op == "ShearY"), 1, 0] = -m[on & (op == "ShearY")]   # y -> y - m x
        step[on & (op == "TranslateX"), 0, 2] = m[on & (op == "TranslateX")]
        step[on & (op == "TranslateY"), 1, 2] = m[on & (op == "TranslateY")]
        rotate = on & (op == "Rotate")  # counter-clockwise on screen about the image centre
        angle = np.radians(m[rotate])
        cos, sin = np.cos(angle), np.sin(angle)
        cx, cy = width[rotate] / 2, height[rotate] / 2
        step[rotate, 0, 0], step[rotate, 0, 1], step[rotate, 0, 2] = cos, sin, cx - cos * cx - sin * cy
        step[rotate, 1, 0], step[rotate, 1, 1], step[rotate, 1, 2] = -sin, cos, cy + sin * cx - cos * cy
        matrix = step @ matrix
        factor = 1.0 + m
        a, b, c = linear.T.copy()
        for name in ("Brightness", "Color", "Contrast"):
            k = on & (op == name)
            f = factor[k]
            if name == "Brightness":
                linear[k] = np.stack([f * a[k], f * b[k], f * c[k]], 1)
            elif name == "Color":  # blend with grey; grey(a x + b g + c m) = (a + b) g + c m
                linear[k] = np.stack([f * a[k], f * b[k] + (1 - f) * (a[k] + b[k]), c[k]], 1)
            else:  # blend with the mean grey level, (a + b + c) m
                linear[k] = np.stack([f * a[k], f * b[k], f * c[k] + (1 - f) * (a[k] + b[k] + c[k])], 1)
        k = on & (op == "Sharpness")
        f = factor[k][:, None]
        sharp[k] = f * sharp[k] + (1 - f) * np.concatenate([np.zeros((k.sum(), 1)), sharp[k][:, :2]], 1)
        k = on & (op == "Posterize")
        mask[k] = 255 ^ (2 ** (8 - m[k].astype(np.int64)) - 1)
        equalize |= on & (op == "Equalize")
        autocontrast |= on & (op == "AutoContrast")
        k = on & (op == "Solarize")
        threshold[k] = m[k]
        threshold[on & (op == "Invert")] = 0.0
    kernels = np.einsum("nk,kyx->nyx", sharp, _sharpness_bases())
    def per_sample(values, dtype):  # N x 1 x 1 x 1: broadcasts against H x W x C
        return np.asarray(values, dtype=dtype).reshape(n, 1, 1, 1)

    return {"matrix": matrix[:, :2].astype(np.float32), "colour_a": per_sample(linear[:, 0], np.float32),
            "colour_b": per_sample(linear[:, 1], np.float32), "colour_c": per_sample(linear[:, 2], np.float32),
            # DALI's grey levels are rounded, torchvision's truncated: half a level lower on average;
            # -0.499 turns the rounding of DALI's cast into torchvision's truncation
            "colour_d": per_sample(-0.5 * (linear[:, 1] + linear[:, 2]) - 0.499, np.float32),
            "kernel": kernels.astype(np.float32), "posterize": per_sample(mask, np.uint8),
            "equalize": per_sample(equalize * 255, np.uint8), "autocontrast": per_sample(autocontrast, np.float32),
            "threshold": per_sample(threshold, np.float32)}


OPS: dict[str, Op] = {op.name: op for op in (RandomResizedCrop(), Resize(), HorizontalFlip(), AutoAugment(),
                                               RandomPerspective(), ColorJitter(), RandomGrayscale(),
                                               GaussianBlur())}


# -------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Step:
    op: str
    params: dict = field(default_factory=dict)

    @property
    def kind(self) -> Op:
        """The op object of this step (UserError for an unknown op name)."""
        if self.op not in OPS:
            raise UserError(f"unknown augmentation op {self.op!r}; known: {', '.join(sorted(OPS))}")
        return OPS[self.op]


@dataclass(frozen=True)
class Recipe:
    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    strong: tuple[Step, ...]
    weak: tuple[Step, ...]
    test: tuple[Step, ...]

    def view(self, name: str) -> tuple[Step, ...]:
        if name not in VIEW_NAMES:
            raise UserError(f"unknown view {name!r}; choose one of {', '.join(VIEW_NAMES)}")
        return getattr(self, name)


VIEW_NAMES = ("strong", "weak")


def draw_view(steps: tuple[Step, ...], rng: np.random.Generator, sizes: np.ndarray, size: int) -> list[dict]:
    """Per step, the per-sample parameters of one view for images of sizes N x 2 (H, W) before the view,
    output side `size` (the first step, a crop or resize, makes every image size x size)."""
    state: dict = {}
    drawn = []
    for index, step in enumerate(steps):
        values = step.kind.draw(step.params, rng, sizes, state)
        drawn.append({} if absorbed_by_next(steps, index) else values)  # the next step took it over
        if step.op != "horizontal_flip":
            state.pop("flip", None)
        if index == 0:
            sizes = np.full((len(sizes), 2), size, dtype=np.int64)
    return drawn


def absorbed_by_next(steps: tuple[Step, ...], index: int) -> bool:
    """Whether step index + 1 folds step `index`'s flip into its own warp (see HorizontalFlip)."""
    return steps[index].op == HorizontalFlip.name and index + 1 < len(steps) and steps[index + 1].kind.absorbs_flip


# RandomResizedCrop(size, (0.2, 1)) with torchvision's default aspect-ratio range.
_CROP = Step("random_resized_crop", {"scale": (0.2, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)})
_FLIP = Step("horizontal_flip", {"p": 0.5})
# Digits: strokes 1-2 px wide on 8x8 survive only mild crops, and a mirrored digit is not a digit (no flip).
_DIGITS_CROP = Step("random_resized_crop", {"scale": (0.6, 1.0), "ratio": (3.0 / 4.0, 4.0 / 3.0)})
_PERSPECTIVE = Step("random_perspective", {"distortion": 0.5, "p": 0.5})
_TEST = (Step("resize"),)

_AUTO_AUGMENT = Step("auto_augment", {"policy": "cifar10"})
_SMALL_STRONG = (_CROP, _FLIP, _AUTO_AUGMENT)
_SMALL_WEAK = (_CROP, _FLIP)
_CARS_STRONG = (
    _CROP,
    _FLIP,
    _PERSPECTIVE,
    Step("color_jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}),
    Step("random_grayscale", {"p": 0.2}),
    Step("gaussian_blur", {"sigma": (0.1, 2.0), "p": 0.5}),
)
_SOP_STRONG = (_CROP, _FLIP, _PERSPECTIVE)
_LARGE_WEAK = (_CROP, _PERSPECTIVE, _FLIP)

# CIFAR-100 and the CIFAR-toy splits (supplement, section A), with CIFAR-100's statistics.
CIFAR = Recipe("cifar", CIFAR100_MEAN, CIFAR100_STD, _SMALL_STRONG, _SMALL_WEAK, _TEST)
# 8x8 grey digits decoded to RGB; CIFAR statistics are good enough here.
DIGITS = Recipe("digits", CIFAR100_MEAN, CIFAR100_STD, (_DIGITS_CROP, _AUTO_AUGMENT), (_DIGITS_CROP,), _TEST)
IMAGENET32 = Recipe("imagenet32", IMAGENET_MEAN, IMAGENET_STD, _SMALL_STRONG, _SMALL_WEAK, _TEST)
CARS = Recipe("cars", IMAGENET_MEAN, IMAGENET_STD, _CARS_STRONG, _LARGE_WEAK, _TEST)
# Stanford Online Products, and an image folder of the user's: photographs, with ImageNet statistics.
PHOTOS = Recipe("photos", IMAGENET_MEAN, IMAGENET_STD, _SOP_STRONG, _LARGE_WEAK, _TEST)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (CIFAR, DIGITS, IMAGENET32, CARS, PHOTOS)}


def validate(recipes: dict[str, Recipe] | None = None) -> None:
    """Check every recipe (ops, parameters, ranges) and the AutoAugment table; raises UserError."""
    for name, recipe in (RECIPES if recipes is None else recipes).items():
        if recipe.name != name:
            raise UserError(f"recipe table: entry {name!r} is named {recipe.name!r}")
        if len(recipe.mean) != 3 or len(recipe.std) != 3 or min(recipe.std) <= 0:
            raise UserError(f"recipe {name}: mean and std need 3 channels and std > 0")
        for view in (*VIEW_NAMES, "test"):
            steps = getattr(recipe, view)
            first = "resize" if view == "test" else "random_resized_crop"
            if not steps or steps[0].op != first:
                raise UserError(f"recipe {name}, view {view}: the first step must be {first}")
            for i, step in enumerate(steps):
                step.kind.validate(f"recipe {name}, view {view}, step {i}", step.params)
                if i > 0 and step.op in ("random_resized_crop", "resize"):
                    raise UserError(f"recipe {name}, view {view}: {step.op} may only be the first step")
    for i, sub_policy in enumerate(AUTO_AUGMENT_CIFAR10):
        for op, p, magnitude_bin in sub_policy:
            magnitudes, _ = auto_augment_magnitudes(op, 32)
            if not 0.0 <= p <= 1.0 or (magnitude_bin is None) != (not magnitudes):
                raise UserError(f"AutoAugment sub-policy {i}: bad entry {(op, p, magnitude_bin)}")
            if magnitude_bin is not None and not 0 <= magnitude_bin < AUTO_AUGMENT_BINS:
                raise UserError(f"AutoAugment sub-policy {i}: magnitude bin {magnitude_bin} out of range")

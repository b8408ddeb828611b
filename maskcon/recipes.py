"""The augmentation recipes of the paper (supplement, section A) as data: op specs, recipes, AutoAugment's table.

This module holds specs only. An op (`Op` below) is a name and a parameter schema with its checks; each
back end keeps its implementation of every op in a table keyed by op name and checks at import that the
table covers OPS (`check_implementations`): DALI in maskcon/loaders/dali_ops.py, torchvision in
maskcon/loaders/torch_backend.py, the official-style PIL loader in maskcon/loaders/reference.py. How the
back ends implement AutoAugment and where they differ from torchvision: maskcon/loaders/DESIGN.md.

A recipe lists, per view, the steps applied in order to a uint8 RGB image; the output side S is the
loader's `image_size` (the dataset's, not the recipe's):
    random_resized_crop  scale=(lo, hi) of the source area, ratio=(lo, hi) width/height; output S x S
    horizontal_flip      p
    auto_augment         policy="cifar10" (AutoAugment, CIFAR-10 policy: AUTO_AUGMENT_CIFAR10)
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
from typing import Callable

from maskcon.errors import UserError

# Per-channel statistics of the [0, 1]-scaled training images (RGB).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ ops


def _no_check(where: str, p: dict) -> None:
    """Ops whose parameters need no range check beyond the keys (and a probability `p` in [0, 1])."""


@dataclass(frozen=True)
class Op:
    """One kind of augmentation step: its name, its parameters (name -> meaning and unit) and `check`,
    which raises UserError for values outside their range (called with the keys already checked)."""

    name: str
    params: dict[str, str]
    check: Callable[[str, dict], None] = _no_check

    def validate(self, where: str, p: dict) -> None:
        if set(p) != set(self.params):
            raise UserError(f"{where}: {self.name} takes {sorted(self.params)}, got {sorted(p)}")
        if "p" in p and not 0.0 <= p["p"] <= 1.0:
            raise UserError(f"{where}: probability {p['p']} is outside [0, 1]")
        self.check(where, p)


def _check_range(where: str, pair, lo: float, hi: float) -> None:
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise UserError(f"{where}: expected a range within [{lo}, {hi}], got {pair}")


def _check_crop(where: str, p: dict) -> None:
    _check_range(where + " scale", p["scale"], 1e-6, 1.0)
    _check_range(where + " ratio", p["ratio"], 1e-6, 1e6)


def _check_perspective(where: str, p: dict) -> None:
    if not 0.0 <= p["distortion"] <= 1.0:
        raise UserError(f"{where}: distortion {p['distortion']} is outside [0, 1]")


def _check_jitter(where: str, p: dict) -> None:
    for key in ("brightness", "contrast", "saturation"):
        if not 0.0 <= p[key] < 1.0:
            raise UserError(f"{where}: {key} {p[key]} is outside [0, 1)")
    if not 0.0 <= p["hue"] <= 0.5:
        raise UserError(f"{where}: hue {p['hue']} is outside [0, 0.5]")


def _check_blur(where: str, p: dict) -> None:
    _check_range(where + " sigma", p["sigma"], 1e-3, 100.0)


def _check_auto_augment(where: str, p: dict) -> None:
    if p["policy"] != "cifar10":
        raise UserError(f"{where}: only the cifar10 AutoAugment policy is implemented, got {p['policy']!r}")


# torchvision's semantics, which every back end follows (differences: maskcon/loaders/DESIGN.md):
#   random_resized_crop  RandomResizedCrop: up to 10 draws of (area uniform in scale, log ratio uniform), the
#                        first that fits at a uniform position, else a central crop clamped to the ratio range;
#                        bilinear, antialiased
#   horizontal_flip      RandomHorizontalFlip(p)
#   auto_augment         AutoAugment(AutoAugmentPolicy.CIFAR10)
#   random_perspective   RandomPerspective(distortion, p): corners move inwards by a uniform integer up to
#                        int(distortion * side // 2); bilinear, fill 0
#   color_jitter         RandomApply([ColorJitter(b, c, s, h)], p): the four adjustments in a random order
#   random_grayscale     RandomGrayscale(p): grey = 0.2989 R + 0.587 G + 0.114 B, truncated, on 3 channels
#   gaussian_blur        RandomApply([GaussianBlur(blur_kernel_size(sigma_hi, S), sigma)], p) (MoCo v2's blur)
#   resize               Resize((S, S)), bilinear, antialiased
OPS: dict[str, Op] = {op.name: op for op in (
    Op("random_resized_crop", {"scale": "area fraction range", "ratio": "width / height range"}, _check_crop),
    Op("resize", {}),
    Op("horizontal_flip", {"p": "probability"}),
    Op("auto_augment", {"policy": "cifar10"}, _check_auto_augment),
    Op("random_perspective", {"distortion": "fraction of half the side a corner may move", "p": "probability"},
       _check_perspective),
    Op("color_jitter", {"brightness": "factor range half-width", "contrast": "factor range half-width",
                        "saturation": "factor range half-width", "hue": "turns", "p": "probability"}, _check_jitter),
    Op("random_grayscale", {"p": "probability"}),
    Op("gaussian_blur", {"sigma": "pixels, range", "p": "probability"}, _check_blur),
)}


def check_implementations(table: dict, backend: str) -> None:
    """UserError (one line) unless `table` (op name -> a back end's implementation) covers every op of OPS;
    each back end calls it at import on its own table."""
    missing = [name for name in OPS if name not in table]
    if missing:
        raise UserError(f"the {backend} loader has no implementation of the {missing[0]} op; "
                        "add it to that back end's op table, or pick another loader backend or recipe")
    unknown = sorted(set(table) - set(OPS))
    if unknown:
        raise UserError(f"the {backend} loader implements {unknown[0]!r}, which is no op of maskcon/recipes.py")


def blur_kernel_size(sigma_high: float, size: int) -> int:
    """torchvision GaussianBlur's kernel side: +-3 sigma of the widest blur, odd, at most the image side."""
    kernel = 2 * math.ceil(3 * sigma_high) + 1
    return max(1, min(kernel, size if size % 2 else size - 1))


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


# -------------------------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Step:
    op: str
    params: dict = field(default_factory=dict)

    @property
    def kind(self) -> Op:
        """The op spec of this step (UserError for an unknown op name)."""
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

"""The augmentation recipes of the paper as data (supplement, section A).

Both loader back ends (maskcon/loaders/dali.py and maskcon/loaders/torch.py) build their pipelines
from this table and nothing else, so the DALI and the torchvision paths cannot drift apart.
`validate()` checks the whole table at start-up; `recipe_for(name)` is what the loaders call.

A view is a tuple of steps, applied in order to a uint8 RGB image:
    random_resized_crop  scale=(lo, hi) of the source area, ratio=(lo, hi) width/height; output size x size
    horizontal_flip      p
    auto_augment         policy="cifar10" (torchvision AutoAugment(AutoAugmentPolicy.CIFAR10), below)
    random_perspective   distortion (fraction of half the side each corner may move inwards), p
    color_jitter         brightness, contrast, saturation (factor in [1-x, 1+x]), hue (turns in [-x, x]), p
    random_grayscale     p
    gaussian_blur        sigma=(lo, hi) in pixels, uniform, p
    resize               (to size x size; test view only)
after which every view is scaled to [0, 1] and normalised with the dataset's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from maskcon.errors import UserError

# Per-channel statistics of the [0, 1]-scaled training images (RGB).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Step:
    op: str
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    name: str
    image_size: int  # default side of the square output, pixels (32 for the 32x32 sets, 224 for cars/SOP)
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


def _small(name: str, mean=CIFAR100_MEAN, std=CIFAR100_STD) -> Recipe:
    return Recipe(name, 32, mean, std, _SMALL_STRONG, _SMALL_WEAK, _TEST)


RECIPES: dict[str, Recipe] = {
    "cifar100": _small("cifar100"),
    "cifartoy_good": _small("cifartoy_good"),
    "cifartoy_bad": _small("cifartoy_bad"),
    # 8x8 grey digits, decoded to RGB and resized to image_size; CIFAR statistics are good enough here.
    "digits": Recipe("digits", 32, CIFAR100_MEAN, CIFAR100_STD, (_DIGITS_CROP, _AUTO_AUGMENT), (_DIGITS_CROP,),
                     _TEST),
    "imagenet32": _small("imagenet32", IMAGENET_MEAN, IMAGENET_STD),
    "cars196": Recipe("cars196", 224, IMAGENET_MEAN, IMAGENET_STD, _CARS_STRONG, _LARGE_WEAK, _TEST),
    "sop_split1": Recipe("sop_split1", 224, IMAGENET_MEAN, IMAGENET_STD, _SOP_STRONG, _LARGE_WEAK, _TEST),
    "sop_split2": Recipe("sop_split2", 224, IMAGENET_MEAN, IMAGENET_STD, _SOP_STRONG, _LARGE_WEAK, _TEST),
    # An image folder of the user's: photographs, so the SOP recipe and ImageNet statistics.
    "folder": Recipe("folder", 224, IMAGENET_MEAN, IMAGENET_STD, _SOP_STRONG, _LARGE_WEAK, _TEST),
}

# AutoAugment, CIFAR-10 policy, exactly as torchvision.transforms.AutoAugment(AutoAugmentPolicy.CIFAR10):
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


_PARAMS = {
    "random_resized_crop": {"scale", "ratio"},
    "horizontal_flip": {"p"},
    "auto_augment": {"policy"},
    "random_perspective": {"distortion", "p"},
    "color_jitter": {"brightness", "contrast", "saturation", "hue", "p"},
    "random_grayscale": {"p"},
    "gaussian_blur": {"sigma", "p"},
    "resize": set(),
}


def _check_range(where: str, pair, lo: float, hi: float) -> None:
    if len(pair) != 2 or not (lo <= pair[0] <= pair[1] <= hi):
        raise UserError(f"{where}: expected a range within [{lo}, {hi}], got {pair}")


def _validate_step(where: str, step: Step) -> None:
    if step.op not in _PARAMS:
        raise UserError(f"{where}: unknown op {step.op!r}; known: {', '.join(sorted(_PARAMS))}")
    if set(step.params) != _PARAMS[step.op]:
        raise UserError(f"{where}: {step.op} takes {sorted(_PARAMS[step.op])}, got {sorted(step.params)}")
    p = step.params
    if "p" in p and not 0.0 <= p["p"] <= 1.0:
        raise UserError(f"{where}: probability {p['p']} is outside [0, 1]")
    if step.op == "random_resized_crop":
        _check_range(where + " scale", p["scale"], 1e-6, 1.0)
        _check_range(where + " ratio", p["ratio"], 1e-6, 1e6)
    elif step.op == "auto_augment" and p["policy"] != "cifar10":
        raise UserError(f"{where}: only the cifar10 AutoAugment policy is implemented, got {p['policy']!r}")
    elif step.op == "random_perspective" and not 0.0 <= p["distortion"] <= 1.0:
        raise UserError(f"{where}: distortion {p['distortion']} is outside [0, 1]")
    elif step.op == "color_jitter":
        for key in ("brightness", "contrast", "saturation"):
            if not 0.0 <= p[key] < 1.0:
                raise UserError(f"{where}: {key} {p[key]} is outside [0, 1)")
        if not 0.0 <= p["hue"] <= 0.5:
            raise UserError(f"{where}: hue {p['hue']} is outside [0, 0.5]")
    elif step.op == "gaussian_blur":
        _check_range(where + " sigma", p["sigma"], 1e-3, 100.0)


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
                _validate_step(f"recipe {name}, view {view}, step {i}", step)
                if i > 0 and step.op in ("random_resized_crop", "resize"):
                    raise UserError(f"recipe {name}, view {view}: {step.op} may only be the first step")
    for i, sub_policy in enumerate(AUTO_AUGMENT_CIFAR10):
        for op, p, magnitude_bin in sub_policy:
            magnitudes, _ = auto_augment_magnitudes(op, 32)
            if not 0.0 <= p <= 1.0 or (magnitude_bin is None) != (not magnitudes):
                raise UserError(f"AutoAugment sub-policy {i}: bad entry {(op, p, magnitude_bin)}")
            if magnitude_bin is not None and not 0 <= magnitude_bin < AUTO_AUGMENT_BINS:
                raise UserError(f"AutoAugment sub-policy {i}: magnitude bin {magnitude_bin} out of range")


def recipe_for(name: str) -> Recipe:
    """The validated recipe of a dataset (raises UserError naming the known datasets)."""
    validate()
    if name not in RECIPES:
        raise UserError(f"no augmentation recipe for dataset {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]

"""Loaders: the DALI pipelines (on the CPU) against the recipe and the torchvision reference, on real shards.

Source images are built so that each augmentation can be read back from the output:
  ramp   R = 255 x / (W-1), G = 255 y / (H-1), B = 160: the slope of R across the output gives the crop width
         and its sign the flip, the slope of G the crop height; black pixels (B = 0) only come from the fill
         of a perspective warp.
  ident  a solid colour encoding the sample's position, and fine = position: labels and views must agree.
  solid  one solid colour: ColorJitter and grayscale show in the centre pixel.
  edge   a vertical step edge: the width of the blurred edge gives the Gaussian blur's sigma.
Statistical checks are sized so that each has at most a 1-in-1,000 false alarm (Z, P_MIN) while catching
a flip rate of 0.45, a crop scale of (0.3, 1), a blur p of 0.4 or a grayscale p of 0.15 or 0.25 (each back
end against the supplement's numbers, and the back ends against each other).
"""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from maskcon.datasets.synthetic import cifar_like_image, write_synthetic_shards
from maskcon.errors import UserError
from maskcon.loaders import LoaderSpec, build_test_loader, build_train_loader
from maskcon.datasets import DATASETS
from maskcon.recipes import Recipe, Step

BACKENDS = ("dali", "torch")
# torchvision transforms run in the test process (no DataLoader workers to fork next to DALI's pipelines);
# test_torch_workers_change_nothing checks that workers give the same batches.
THREADS = {"dali": 2, "torch": 0}
# Each test makes at most 10 KS checks and at most 5 rate checks: with these levels its false alarms stay
# below 1 in 1,000.
P_MIN = 1e-4  # KS tests: p-values below this mean the two distributions differ
Z = 3.72      # rate checks: the two-sided normal quantile of a 1-in-5,000 false alarm
IDENTITY_CROP = Step("random_resized_crop", {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)})
MANY = 32     # epochs of 256 samples for the rate checks: 8,192 samples per back end


# ------------------------------------------------------------------------------------------ sources


def ramp(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    return np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 160)], -1).round().astype(np.uint8)


def ident_colour(position: int) -> list[int]:
    return [20 + 40 * (position % 6), 20 + 40 * (position // 6 % 6), 20 + 40 * (position // 36 % 6)]


def ident_of(pixel: np.ndarray) -> np.ndarray:
    """Positions from N x 3 pixel colours made by ident_colour."""
    digits = np.clip(np.round((pixel - 20) / 40), 0, 5).astype(int)
    return digits[:, 0] + 6 * digits[:, 1] + 36 * digits[:, 2]


def variable_ramp(position: int) -> np.ndarray:
    rng = np.random.default_rng(position)
    return ramp(int(rng.integers(48, 80)), int(rng.integers(56, 96)))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    labels = lambda position: (position, position % 7)  # noqa: E731
    made = {
        "ramp": write_synthetic_shards(root / "ramp", num_train=256, num_test=8, image=lambda i: ramp(64, 64),
                                       labels=labels, num_fine=256, num_coarse=7, samples_per_shard=64),
        "photo": write_synthetic_shards(root / "photo", num_train=256, num_test=8, image=variable_ramp,
                                        labels=labels, num_fine=256, num_coarse=7, samples_per_shard=50,
                                        image_format="jpg", image_size=None, dataset="cars196"),
        "ident": write_synthetic_shards(root / "ident", num_train=192, num_test=33,
                                        image=lambda i: np.full((32, 32, 3), ident_colour(i), np.uint8),
                                        labels=labels, num_fine=192, num_coarse=7, samples_per_shard=40),
        "solid": write_synthetic_shards(root / "solid", num_train=256, num_test=8,
                                        image=lambda i: np.full((64, 64, 3), [180, 100, 60], np.uint8),
                                        labels=labels, num_fine=256, num_coarse=7, samples_per_shard=64),
        "edge": write_synthetic_shards(root / "edge", num_train=256, num_test=8,
                                       image=lambda i: np.repeat(np.where(np.arange(64) < 32, 60, 200)[None, :, None],
                                                                 64, 0).repeat(3, 2).astype(np.uint8),
                                       labels=labels, num_fine=256, num_coarse=7, samples_per_shard=64),
        "cifar": write_synthetic_shards(root / "cifar", num_train=256, num_test=8, image=cifar_like_image,
                                        labels=labels, num_fine=256, num_coarse=7, samples_per_shard=64),
    }
    return made


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small tensors on 2 cores: intra-op threads only add contention to the in-process transforms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def release_pipelines():
    """A live DALI pipeline reserves tens of GB of address space; forking DataLoader workers next to one
    can fail on machines with strict overcommit, so pipelines are freed as soon as each test ends."""
    yield
    gc.collect()


_RUNS: dict = {}


def collect(path, recipe, backend, *, image_size, epochs=4, batch_size=64, **options) -> dict:
    """Every batch of `epochs` epochs of one process, concatenated; runs of the same arguments are shared."""
    key = (str(path), recipe if isinstance(recipe, str) else repr(recipe), backend, image_size, epochs, batch_size,
           tuple(sorted(options.items())))
    if key not in _RUNS:
        _RUNS[key] = _collect(path, recipe, backend, image_size=image_size, epochs=epochs, batch_size=batch_size,
                              **options)
    return _RUNS[key]


def _collect(path, recipe, backend, *, image_size, epochs, batch_size, **options) -> dict:
    options.setdefault("num_threads", THREADS[backend])
    loader = build_train_loader(path, LoaderSpec(recipe=recipe, image_size=image_size, batch_size=batch_size, rank=0,
                                                 world_size=1, seed=options.pop("seed", 0), device="cpu",
                                                 backend=backend, **options))
    batches = [batch for _ in range(epochs) for batch in loader]
    del loader
    gc.collect()
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


def pixels(images: torch.Tensor, recipe: Recipe) -> np.ndarray:
    """Normalised N x 3 x S x S floats back to 0..255 levels (rounded)."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().clamp(0, 255).numpy().astype(np.float64)


def ramp_statistics(px: np.ndarray) -> dict[str, np.ndarray]:
    size = px.shape[-1]
    a, b = size // 4, 3 * size // 4
    slope_x = (px[:, 0, a:b + 1, b] - px[:, 0, a:b + 1, a]).mean(1) / (b - a)
    slope_y = (px[:, 1, b, a:b + 1] - px[:, 1, a, a:b + 1]).mean(1) / (b - a)
    width, height = np.abs(slope_x) * size / 255, np.abs(slope_y) * size / 255
    black = px.max(axis=1) < 8
    return {"width": width, "height": height, "area": width * height, "flipped": slope_x < 0,
            "black_fraction": black.mean(axis=(1, 2)), "mean": px.mean(axis=(1, 2, 3)), "std": px.std(axis=(1, 2, 3))}


def assert_same_distribution(ours: dict, reference: dict, names, what: str):
    for name in names:
        result = ks_2samp(np.asarray(ours[name], dtype=np.float64), np.asarray(reference[name], dtype=np.float64))
        assert result.pvalue > P_MIN, f"{what}: {name} differs between DALI and torchvision (KS {result})"


def assert_rate(flags: np.ndarray, p: float, what: str, slack: float = 0.0):
    """The rate of `flags` is p (binomial, 1-in-5,000 false alarm; `slack` for a known measurement error)."""
    n = len(flags)
    tolerance = Z * np.sqrt(p * (1 - p) / n) + slack + 1e-9
    assert abs(flags.mean() - p) <= tolerance, f"{what}: rate {flags.mean():.4f}, expected {p} +- {tolerance:.4f}"


def assert_same_rate(ours: np.ndarray, reference: np.ndarray, what: str):
    """Two-proportion z-test between the back ends (1-in-5,000 false alarm)."""
    pooled = np.concatenate([ours, reference]).mean()
    sigma = np.sqrt(pooled * (1 - pooled) * (1 / len(ours) + 1 / len(reference))) + 1e-9
    assert abs(ours.mean() - reference.mean()) <= Z * sigma, \
        f"{what}: DALI rate {ours.mean():.4f}, torchvision {reference.mean():.4f} (sigma {sigma:.4f})"


def one_step_recipe(step: Step) -> Recipe:
    return Recipe("one_step", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (IDENTITY_CROP, step), (IDENTITY_CROP,),
                  (Step("resize"),))


# ---------------------------------------------------------------------------------- named recipes


@pytest.mark.parametrize("dataset, source, size", [("cifar100", "ramp", 32), ("digits", "ramp", 32),
                                                   ("sop_split1", "photo", 48), ("cars196", "photo", 48)])
def test_named_recipes_agree(shards, dataset, source, size):
    recipe = DATASETS[dataset].recipe
    runs = {backend: collect(shards[source], dataset, backend, image_size=size) for backend in BACKENDS}
    for view, steps in (("query", recipe.strong), ("key", recipe.weak)):
        stats = {backend: ramp_statistics(pixels(run[view], recipe)) for backend, run in runs.items()}
        ops = {step.op for step in steps}
        names = ["black_fraction"]
        if "auto_augment" not in ops:
            # AutoAugment's colour ops hide the ramp: its view is checked as crop + flip (the weak view and
            # test_flip_and_crop_*) and AutoAugment alone (test_auto_augment_*)
            names += ["width", "height", "mean", "std", "flipped"]
        assert_same_distribution(stats["dali"], stats["torch"], names, f"{dataset} {view}")
        for backend, stat in stats.items():
            what = f"{dataset} {view} {backend}"
            if ops <= {"random_resized_crop", "horizontal_flip"}:  # (a perspective's fill can hide the slope)
                assert_rate(stat["flipped"], 0.5 if "horizontal_flip" in ops else 0.0, what + " flip")
            if ops <= {"random_resized_crop", "horizontal_flip"}:  # the ramp shows the crop exactly
                smallest = steps[0].params["scale"][0]
                assert stat["area"].min() > smallest - 0.03 and stat["area"].max() < 1 + 0.03, what
                ratio = stat["width"] / stat["height"]
                assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05, what
            if ops == {"random_resized_crop", "horizontal_flip", "random_perspective"}:  # (jitter would hide the fill)
                assert_rate(stat["black_fraction"] > 0, 0.5, what + " perspective")


def test_recipe_groups_cover_every_dataset():
    """The datasets not run above share their steps with one that is."""
    tested = {name: (DATASETS[name].recipe.strong, DATASETS[name].recipe.weak)
              for name in ("cifar100", "digits", "sop_split1", "cars196")}
    for name, description in DATASETS.items():
        assert (description.recipe.strong, description.recipe.weak) in tested.values(), name


# ------------------------------------------------------------------------ crop, flip, view independence


def expected_crop_sizes(source: int, draws: int = 200_000) -> np.ndarray:
    """draws x 2 (height, width) in pixels of torchvision's RandomResizedCrop.get_params with the
    supplement's (0.2, 1) scale on a source x source image: oversized draws rejected as torchvision does."""
    import torchvision.transforms as T

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(12345)
    dummy = torch.empty(1, source, source)
    sizes = np.empty((draws, 2))
    for i in range(draws):
        sizes[i] = T.RandomResizedCrop.get_params(dummy, [0.2, 1.0], [3 / 4, 4 / 3])[2:]
    torch.random.set_rng_state(generator_state)
    return sizes


@pytest.fixture(scope="module")
def weak_ramp_runs(shards):
    """The cifar100 weak view (crop 0.2-1, flip 0.5), both views weak, 8,192 samples per back end."""
    return {backend: collect(shards["ramp"], "cifar100", backend, image_size=32, epochs=MANY, batch_size=256,
                             query_view="weak", key_view="weak") for backend in BACKENDS}


def test_flip_rate(weak_ramp_runs):
    flips = {}
    for backend, run in weak_ramp_runs.items():
        flips[backend] = ramp_statistics(pixels(run["query"], DATASETS["cifar100"].recipe))["flipped"]
        assert_rate(flips[backend], 0.5, f"{backend} flip")  # the supplement's RandomHorizontalFlip()
    assert_same_rate(flips["dali"], flips["torch"], "flip")


def test_crop_area_distribution(weak_ramp_runs):
    """Crop areas follow torchvision's draw for scale (0.2, 1): about 0.57 of them below 0.6 (not 0.5: draws
    too wide or too tall for the image are rejected, and those are large ones), about 0.12 below 0.3."""
    sizes = expected_crop_sizes(64)
    assert 0.55 < (sizes.prod(axis=1) / 64**2 < 0.6).mean() < 0.59
    # what the ramp measures: a crop of w pixels spans (w - 1) of the source's 63 steps, stretched over the
    # output's width, so the measured width is about w / 63
    expected = sizes.prod(axis=1) / 63**2
    areas = {}
    for backend, run in weak_ramp_runs.items():
        stat = ramp_statistics(pixels(run["query"], DATASETS["cifar100"].recipe))
        areas[backend] = stat["area"]
        for threshold in (0.3, 0.6):
            # slack: the ramp measures areas to about +-0.005, around 1 % of the samples near a threshold
            assert_rate(stat["area"] < threshold, float((expected < threshold).mean()),
                        f"{backend} crop area below {threshold:.3f}", slack=0.01)
        ratio = stat["width"] / stat["height"]
        assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05, backend
    assert_same_distribution({"area": areas["dali"]}, {"area": areas["torch"]}, ["area"], "crop")


def test_views_are_augmented_independently(weak_ramp_runs):
    """The query and key views of one image get their own crop and flip: identical crops are rare."""
    for backend, run in weak_ramp_runs.items():
        query, key = (ramp_statistics(pixels(run[view], DATASETS["cifar100"].recipe)) for view in ("query", "key"))
        same = ((np.abs(query["width"] - key["width"]) < 0.02) & (np.abs(query["height"] - key["height"]) < 0.02)
                & (query["flipped"] == key["flipped"]))
        # independent draws: a width and height within 0.02 of each other about 1 % of the time
        assert same.mean() < 0.1, f"{backend}: {same.mean():.2f} of the samples have the same crop in both views"
        assert_rate(query["flipped"] ^ key["flipped"], 0.5, f"{backend} views flipped independently")


# --------------------------------------------------------------------------------- one step at a time


def test_perspective_rate_and_shape(shards):
    recipe = one_step_recipe(Step("random_perspective", {"distortion": 0.5, "p": 0.5}))
    stats = {}
    for backend in BACKENDS:
        px = pixels(collect(shards["ramp"], recipe, backend, image_size=64)["query"], recipe)
        black = px.max(axis=1) < 8
        stats[backend] = {"warped": black.any(axis=(1, 2)), "black_fraction": black.mean(axis=(1, 2)),
                          "top_left_run": black[:, 0, :].argmin(axis=1), "left_column": black[:, :, 0].mean(axis=1)}
        assert_rate(stats[backend]["warped"], 0.5, backend)
        # the corners move inwards by at most int(0.5 * 32) = 16 pixels: at least the middle 32 x 32 stays
        assert stats[backend]["black_fraction"].max() <= 0.75, backend
    assert_same_distribution(stats["dali"], stats["torch"], list(stats["dali"]), "perspective")


def test_color_jitter_rate_and_factors(shards):
    recipe = one_step_recipe(DATASETS["cars196"].recipe.strong[3])
    centre = {}
    for backend in BACKENDS:
        px = pixels(collect(shards["solid"], recipe, backend, image_size=64)["query"], recipe)[:, :, 32, 32]
        centre[backend] = {"r": px[:, 0], "g": px[:, 1], "b": px[:, 2]}
        changed = np.abs(px - [180, 100, 60]).max(axis=1) > 1
        # p = 0.8; a drawn jitter leaves this colour within one level about 2% of the time
        assert_rate(changed, 0.8 * 0.98, backend, slack=0.01)
    assert_same_distribution(centre["dali"], centre["torch"], ["r", "g", "b"], "color jitter")


@pytest.mark.slow          # statistics over many epochs of both back ends
def test_grayscale_rate(shards):
    recipe = one_step_recipe(DATASETS["cars196"].recipe.strong[4])
    grey = {}
    for backend in BACKENDS:
        px = pixels(collect(shards["solid"], recipe, backend, image_size=32, epochs=MANY, batch_size=256)["query"],
                    recipe)[:, :, 16, 16]
        grey[backend] = (px[:, 0] == px[:, 1]) & (px[:, 1] == px[:, 2])
        assert_rate(grey[backend], 0.2, backend)  # the supplement's RandomGrayscale(p=0.2)
        # torchvision's grey level: int(0.2989 R + 0.587 G + 0.114 B)
        assert (px[grey[backend], 0] == int(0.2989 * 180 + 0.587 * 100 + 0.114 * 60)).all(), backend
    assert_same_rate(grey["dali"], grey["torch"], "grayscale")


def edge_sigma(px: np.ndarray) -> np.ndarray:
    """The blur's sigma from the step edge along the middle rows: the standard deviation of the edge's
    derivative, less the 1/12 pixel^2 that sampling a sharp step adds."""
    profile = px[:, 0, 24:40, :].mean(axis=1)
    derivative = np.clip(np.diff(profile, axis=1), 0, None)
    weights = derivative / derivative.sum(axis=1, keepdims=True)
    x = np.arange(derivative.shape[1])
    centre = (weights * x).sum(axis=1)
    variance = (weights * (x - centre[:, None]) ** 2).sum(axis=1)
    return np.sqrt(np.clip(variance - 1 / 12, 0, None))


@pytest.mark.slow          # statistics over many epochs of both back ends
def test_gaussian_blur_rate_and_sigma(shards):
    """The supplement's RandomApply([GaussianBlur([.1, 2.])], p=0.5): the expected rates of measured sigmas
    come from torchvision's gaussian_blur itself, applied to the edge at sigmas spread over [0.1, 2]."""
    import torchvision.transforms.functional as F

    recipe = one_step_recipe(DATASETS["cars196"].recipe.strong[5])
    edge = torch.from_numpy(np.repeat(np.where(np.arange(64) < 32, 60, 200)[None, :], 64, 0)).expand(3, 64, 64)
    grid = np.linspace(0.1, 2.0, 381)
    measured_at = edge_sigma(np.stack([F.gaussian_blur(edge.to(torch.uint8), 13, float(s)).numpy() for s in grid])
                             .astype(np.float64))
    sigma = {}
    for backend in BACKENDS:
        run = collect(shards["edge"], recipe, backend, image_size=64, epochs=MANY, batch_size=256)
        sigma[backend] = edge_sigma(pixels(run["query"], recipe))
        for threshold in (0.5, 1.0):
            expected = 0.5 * float((measured_at > threshold).mean())
            assert_rate(sigma[backend] > threshold, expected, f"{backend} sigma above {threshold}")
        assert sigma[backend].max() < 2.3, backend
    assert_same_rate(sigma["dali"] > 1.0, sigma["torch"] > 1.0, "gaussian blur")
    assert_same_distribution({"sigma": sigma["dali"]}, {"sigma": sigma["torch"]}, ["sigma"], "gaussian blur")


# ------------------------------------------------------------------------------------- AutoAugment


def test_auto_augment_statistics(shards):
    """Which ops run, and how far they move pixels, agree with torchvision (the ops themselves: below)."""
    recipe = one_step_recipe(Step("auto_augment", {"policy": "cifar10"}))
    source = np.stack([cifar_like_image(i) for i in range(256)]).transpose(0, 3, 1, 2).astype(np.float64)
    stats = {}
    for backend in BACKENDS:
        run = collect(shards["cifar"], recipe, backend, image_size=32, epochs=16, batch_size=256)
        change = pixels(run["query"], recipe) - source[run["fine"].numpy()]
        stats[backend] = {"unchanged": (np.abs(change) <= 1).all(axis=(1, 2, 3)),
                          "mean_change": change.mean(axis=(1, 2, 3)),
                          "mean_abs_change": np.abs(change).mean(axis=(1, 2, 3)),
                          "changed_fraction": (np.abs(change) > 1).mean(axis=(1, 2, 3))}
        # an image passes untouched with probability mean over sub-policies of (1 - p1)(1 - p2) = 0.2232,
        # plus applied ops that change nothing on it (posterize keeping 8 bits, magnitude-0 colour, ...)
        unchanged = stats[backend]["unchanged"].mean()
        assert 0.2232 - Z * np.sqrt(0.2232 * 0.7768 / 4096) < unchanged < 0.2232 + 0.05, (backend, unchanged)
    assert_same_rate(stats["dali"]["unchanged"], stats["torch"]["unchanged"], "AutoAugment unchanged")
    for name in ("mean_change", "mean_abs_change", "changed_fraction"):
        # the DALI ops round differently and reorder some pairs (maskcon/loaders/DESIGN.md): their per-image change
        # statistics may differ by rounding (KS distance about 0.06), not by whole ops or magnitudes
        distance = ks_2samp(stats["dali"][name], stats["torch"][name]).statistic
        assert distance < 0.1, f"AutoAugment {name}: KS distance {distance:.3f} between DALI and torchvision"


def _auto_augment_cases(size: int):
    """(op, signed magnitude) for every op of the policy at every bin and sign torchvision uses."""
    from maskcon.recipes import AUTO_AUGMENT_OPS, auto_augment_magnitudes

    cases = []
    for name in AUTO_AUGMENT_OPS:
        magnitudes, signed = auto_augment_magnitudes(name, size)
        for value in magnitudes or [0.0]:
            cases += [(name, value)] + ([(name, -value)] if signed and value else [])
    return cases


def test_auto_augment_ops_follow_torchvision():
    """Each op of the flat DALI AutoAugment, at every magnitude and sign, against torchvision's _apply_op:
    the same geometry and the same colours, within the differences maskcon/loaders/DESIGN.md lists."""
    from nvidia.dali import fn, pipeline_def
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    from maskcon.loaders.dali_ops import auto_augment_parameters, flat_auto_augment
    from maskcon.recipes import AUTO_AUGMENT_OPS

    size = 32
    plain = [cifar_like_image(i) for i in range(4)]
    marked = [image.copy() for image in plain]
    for image in marked:
        image[4:9, 6:10] = [255, 0, 0]  # a marker, so geometry shows
    geometric = ("ShearX", "ShearY", "Rotate", "TranslateX", "TranslateY")
    cases = _auto_augment_cases(size)
    sources = [marked if name in geometric else plain for name, _ in cases]
    images = plain
    batch = [image for source in sources for image in source]
    n = len(batch)
    op = np.repeat([AUTO_AUGMENT_OPS.index(name) for name, _ in cases], len(images))
    chosen = {"sub_policy": np.zeros(n, int), "op_0": op, "applied_0": np.ones(n, bool),
              "magnitude_0": np.repeat([value for _, value in cases], len(images)),
              "op_1": op, "applied_1": np.zeros(n, bool), "magnitude_1": np.zeros(n)}
    parameters = auto_augment_parameters(chosen, np.full((n, 2), size), None)
    names = sorted(parameters)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None, seed=0)
    def run():
        data, *values = fn.external_source(source=lambda: (batch, *(parameters[k] for k in names)),
                                           num_outputs=1 + len(names), batch=True)
        return flat_auto_augment(fn.reshape(data, layout="HWC"), dict(zip(names, values)))

    pipe = run()
    pipe.build()
    (result,) = pipe.run()
    ours = np.stack([np.array(result[i]) for i in range(n)]).astype(int)
    for case, (name, value) in enumerate(cases):
        rows = slice(case * len(images), (case + 1) * len(images))
        theirs = np.stack([_apply_op(torch.from_numpy(img).permute(2, 0, 1).contiguous(), name, value,
                                     interpolation=InterpolationMode.NEAREST, fill=[0.0] * 3)
                           for img in sources[case]]).transpose(0, 2, 3, 1).astype(int)
        difference = np.abs(ours[rows] - theirs)
        what = f"{name} {value}"
        if name in geometric:
            # nearest-neighbour sampling at exact half pixels may pick the other neighbour
            assert (difference > 0).any(axis=-1).mean() < 0.1, what
        elif name == "Sharpness":  # the 1-pixel border is smoothed too (PIL keeps it)
            assert difference[:, 1:-1, 1:-1].max() <= 1 and difference.mean() < 2, what
        else:  # grey weights, rounding, DALI's equalize: within a level
            assert difference.max() <= 1 and difference.mean() < 0.6, what


def test_operator_count_does_not_grow_with_the_policy(shards):
    """A two-view cifar100 batch is a few dozen whole-batch operators (AutoAugment included)."""
    from maskcon.loaders.dali import operator_count

    loader = build_train_loader(shards["cifar"], LoaderSpec(recipe="cifar100", image_size=32, batch_size=16, rank=0,
                                                            world_size=1, seed=0, device="cpu", backend="dali"))
    assert operator_count(loader.pipeline) < 60


# ------------------------------------------------------------------ pairing, labels, epochs, ranks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dataset, views", [("sop_split1", ("strong", "weak")), ("cifar100", ("weak", "weak")),
                                            ("cifar100", ("weak", "strong"))])
def test_views_and_labels_stay_with_their_image(shards, backend, dataset, views):
    recipe = DATASETS[dataset].recipe
    run = collect(shards["ident"], dataset, backend, image_size=32, epochs=1, batch_size=32,
                  query_view=views[0], key_view=views[1])
    fine = run["fine"].numpy()
    assert (run["coarse"].numpy() == fine % 7).all()
    for view, name in zip(("query", "key"), views):
        if DATASETS[dataset].recipe.view(name)[-1].op == "auto_augment":
            continue  # AutoAugment changes colours: no colour code survives it
        centre = pixels(run[view], recipe)[:, :, 16, 16]
        assert (ident_of(centre) == fine).all(), (backend, view)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [16, 20])
def test_every_sample_once_per_epoch_over_two_processes(shards, backend, batch_size):
    world = 2
    loaders = [build_train_loader(shards["ident"], LoaderSpec(recipe="cifar100", image_size=32, batch_size=batch_size,
                                                              rank=rank, world_size=world, seed=3, device="cpu",
                                                              backend=backend,
                                                              num_threads=THREADS[backend])) for rank in range(world)]
    steps = (192 // world) // batch_size
    assert [len(loader) for loader in loaders] == [steps] * world
    orders = []
    for _ in range(3):
        seen = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == steps
            assert all(b["fine"].shape == (batch_size,) and b["query"].shape == (batch_size, 3, 32, 32)
                       for b in batches)
            seen += [f for b in batches for f in b["fine"].tolist()]
        assert len(seen) == len(set(seen)) == steps * batch_size * world
        if steps * batch_size * world == 192:
            assert sorted(seen) == list(range(192))
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2], "no new shuffle each epoch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_under_a_seed(shards, backend):
    def first_epoch(seed):  # a new loader each time (not the shared runs)
        return _collect(shards["ramp"], "cifar100", backend, image_size=32, epochs=1, batch_size=64, seed=seed)

    a, b, c = first_epoch(5), first_epoch(5), first_epoch(6)
    assert torch.equal(a["query"], b["query"]) and torch.equal(a["key"], b["key"])
    assert not torch.equal(a["query"], c["query"])


def _epoch(loader) -> dict:
    batches = list(loader)
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_gives_that_epoch_whatever_came_before(shards, backend):
    """Epoch e's batches (pixels, labels) depend only on (seed, rank, world_size, e)."""
    def loader():
        return build_train_loader(shards["cifar"], LoaderSpec(recipe="cifar100", image_size=32, batch_size=32, rank=1,
                                                              world_size=2, seed=7, device="cpu", backend=backend,
                                                              num_threads=THREADS[backend]))

    straight = loader()
    epochs = [_epoch(straight) for _ in range(3)]              # 0, 1, 2 without set_epoch
    direct = loader()
    direct.set_epoch(2)
    jumped = _epoch(direct)
    interrupted = loader()
    interrupted.set_epoch(-1)                                    # e.g. a memory-bank fill pass
    fill = _epoch(interrupted)
    stream = iter(interrupted)
    next(stream)                                                 # an epoch abandoned after one batch
    del stream
    interrupted.set_epoch(2)
    resumed = _epoch(interrupted)
    for name in ("query", "key", "fine", "coarse"):
        assert torch.equal(epochs[2][name], jumped[name]), name
        assert torch.equal(epochs[2][name], resumed[name]), name
    assert not torch.equal(epochs[1]["query"], epochs[2]["query"])
    assert not torch.equal(epochs[1]["fine"], epochs[2]["fine"])
    assert not torch.equal(fill["fine"], epochs[0]["fine"])
    again = loader()
    again.set_epoch(1)
    assert torch.equal(_epoch(again)["key"], epochs[1]["key"])


def test_torch_workers_change_nothing(shards):
    """Augmentations are seeded per sample: DataLoader workers give the batches the in-process path gives."""
    in_process = collect(shards["ramp"], "cifar100", "torch", image_size=32, epochs=2, num_threads=0)
    workers = collect(shards["ramp"], "cifar100", "torch", image_size=32, epochs=2, num_threads=2)
    for name in ("query", "key", "fine"):
        assert torch.equal(in_process[name], workers[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_loader_gives_every_sample_once(shards, backend):
    recipe = DATASETS["cifar100"].recipe
    world, seen = 2, []
    lengths = []
    for rank in range(world):
        loader = build_test_loader(shards["ident"], LoaderSpec(image_size=32, batch_size=8, rank=rank, world_size=world,
                                                               device="cpu", backend=backend, recipe="cifar100",
                                                               num_threads=THREADS[backend]))
        batches = list(loader)
        lengths.append((len(loader), len(batches)))
        again = [b["index"] for b in loader]  # a second pass gives the same samples
        assert all(torch.equal(a, b["index"]) for a, b in zip(again, batches))
        for batch in batches:
            index = batch["index"].numpy()
            assert batch["index"].dtype == torch.int64
            assert (batch["fine"].numpy() == index).all() and (batch["coarse"].numpy() == index % 7).all()
            px = pixels(batch["image"], recipe)
            colours = np.array([ident_colour(i) for i in index], dtype=np.float64).reshape(-1, 3)
            assert (px == colours[:, :, None, None]).all()
            seen += index.tolist()
    assert sorted(seen) == list(range(33))
    assert lengths == [(3, 3), (3, 3)]  # 16 and 17 samples in batches of 8: rank 0 ends with an empty batch


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_normalised(shards, backend):
    recipe = DATASETS["cars196"].recipe
    run = collect(shards["photo"], "cars196", backend, image_size=48, epochs=1)
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    for view in ("query", "key"):
        images = run[view]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 48, 48) and images.is_contiguous()
        assert (images >= (0 - mean) / std - 1e-5).all() and (images <= (1 - mean) / std + 1e-5).all()
        levels = (images * std + mean) * 255
        assert (levels - levels.round()).abs().max() < 1e-3  # uint8 levels, normalised once
    assert run["fine"].dtype == torch.int64 and run["coarse"].dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_shards(tmp_path, backend):
    pytest.importorskip("sklearn")
    from maskcon.shards import create

    create("digits", None, tmp_path / "digits")
    loader = build_train_loader(tmp_path / "digits", LoaderSpec(recipe="digits", image_size=32, batch_size=64, rank=0,
                                                                world_size=1, seed=0, device="cpu", backend=backend,
                                                                num_threads=THREADS[backend]))
    batch = next(iter(loader))
    assert batch["query"].shape == (64, 3, 32, 32) and batch["key"].shape == (64, 3, 32, 32)
    grey = pixels(batch["key"], DATASETS["digits"].recipe)  # 8x8 grey digits decoded to RGB: R = G = B
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert batch["fine"].max() <= 9 and (batch["coarse"] == (batch["fine"] >= 5).long()).all()
    test = build_test_loader(tmp_path / "digits", LoaderSpec(image_size=32, batch_size=100, rank=0, world_size=1,
                                                             device="cpu", backend=backend,
                                                             num_threads=THREADS[backend]))
    assert sum(len(b["index"]) for b in test) == 360


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_that_does_not_decode_names_its_shard_and_key(tmp_path, backend):
    """PNG bytes damaged inside a real shard: a one-line UserError naming the tar, the key and the remedy."""
    from maskcon.loaders import read_split
    from maskcon.loaders.split import TarSamples

    folder = write_synthetic_shards(tmp_path / "broken", num_train=64, num_test=8, image=cifar_like_image,
                                    labels=lambda i: (i % 10, i % 2), num_fine=10, num_coarse=2, samples_per_shard=32)
    _, split = read_split(folder, "train")
    samples = TarSamples(split)
    tar, offset, size = (int(v) for v in samples.rows[37, :3])
    with open(samples.tars[tar], "r+b") as handle:  # keep the signature and the header, garble the pixel data
        handle.seek(offset + 40)
        handle.write(bytes(range(7, 7 + min(size - 40, 200))))
    loader = build_train_loader(folder, LoaderSpec(recipe="cifar100", image_size=32, batch_size=16, rank=0,
                                                   world_size=1, seed=0, device="cpu", backend=backend,
                                                   num_threads=THREADS[backend]))
    with pytest.raises(UserError) as raised:
        for _ in range(2):
            for _ in loader:
                pass
    message = str(raised.value)
    assert "\n" not in message
    assert "train-000001.tar" in message and "00000037" in message
    assert f"python launch/make_shards.py verify {folder.resolve()} " in message and "re-create" in message


def test_bad_requests_are_user_errors(shards, tmp_path):
    good = dict(recipe="cifar100", image_size=32, batch_size=16, rank=0, world_size=1, seed=0, device="cpu",
                backend="dali")
    bad = [({"backend": "tf"}, shards["ident"]), ({"batch_size": 1000}, shards["ident"]),
           ({"rank": 2, "world_size": 2}, shards["ident"]), ({"query_view": "medium"}, shards["ident"]),
           ({"recipe": "mnist"}, shards["ident"]), ({}, tmp_path / "nothing")]
    for change, path in bad:
        with pytest.raises(UserError) as raised:
            build_train_loader(path, LoaderSpec(**{**good, **change}))
        assert "\n" not in str(raised.value)


def test_a_recipe_of_ones_own_is_validated(shards):
    bad = dataclasses.replace(DATASETS["cifar100"].recipe, name="mine", strong=(Step("horizontal_flip", {"p": 0.5}),))
    with pytest.raises(UserError):
        build_train_loader(shards["ident"], LoaderSpec(recipe=bad, image_size=32, batch_size=16, rank=0, world_size=1,
                                                       seed=0, device="cpu", backend="dali"))


@pytest.mark.gpu
def test_dali_on_the_gpu(shards):
    """The same pipelines on a CUDA device (JPEG decoded by `mixed`): tensors on the GPU, the same statistics."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    for source, dataset, size in (("ramp", "cifar100", 32), ("photo", "cars196", 48)):
        recipe = DATASETS[dataset].recipe
        loader = build_train_loader(shards[source], LoaderSpec(recipe=dataset, image_size=size, batch_size=64, rank=0,
                                                               world_size=1, seed=0, device="cuda", backend="dali"))
        batches = [batch for _ in range(4) for batch in loader]
        assert all(b[name].device.type == "cuda" for b in batches for name in b)
        gpu = {name: torch.cat([b[name].cpu() for b in batches]) for name in batches[0]}
        cpu = collect(shards[source], dataset, "dali", image_size=size)
        for name in gpu:  # the same parameters are drawn on the host: the same pixels up to rounding
            assert gpu[name].shape == cpu[name].shape
        ours, reference = (ramp_statistics(pixels(run["key"], recipe)) for run in (gpu, cpu))
        assert_same_distribution(ours, reference, ["width", "height", "flipped", "black_fraction"], dataset)
        test = build_test_loader(shards[source], LoaderSpec(image_size=size, batch_size=4, rank=0, world_size=1,
                                                            device="cuda", backend="dali"))
        assert sum(len(b["index"]) for b in test) == 8


# ------------------------------------------------------------------------------------- the house


def package_imports() -> dict[str, set[str]]:
    """module -> the maskcon modules it imports (at module level or inside functions), read from the sources."""
    import ast
    from pathlib import Path

    import maskcon

    root = Path(maskcon.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("maskcon",) + path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                named = {f"{base}.{alias.name}" for alias in node.names}
                # `from package import module` needs the module; the package itself only for a name defined there
                found |= named | ({base} if named - set(modules) else set())
        graph[name] = {module for module in found if module in modules and module != name}
    return graph


def test_no_import_circle_in_the_package():
    """Imports run one way (specs <- back ends <- loaders <- run <- doors): no module reaches itself."""
    graph = package_imports()
    assert graph["maskcon.loaders.dali"] >= {"maskcon.loaders.split", "maskcon.loaders.dali_ops"}  # the walk works
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(imported):] + [imported]))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # the recipes are specs: no back end, no loader
    assert graph["maskcon.recipes"] <= {"maskcon.errors"}, graph["maskcon.recipes"]


# --------------------------------------------------------------------- resuming, layout, feeding cost


def _declare_jpeg_size(samples, position: int, width: int, height: int) -> None:
    """Rewrite one baseline JPEG's start-of-frame to declare width x height pixels."""
    import struct

    tar, offset, size = (int(v) for v in samples.rows[position, :3])
    frame = samples.image(position).tobytes().index(b"\xff\xc0")
    with open(samples.tars[tar], "r+b") as handle:
        handle.seek(offset + frame + 5)
        handle.write(struct.pack(">HH", height, width))


@pytest.mark.parametrize("backend", BACKENDS)
def test_set_epoch_start_yields_the_tail_of_the_epoch(shards, backend):
    """set_epoch(e, start): batches start.. of epoch e, equal to a full pass's, and the skipped ones are not
    read: a sample in the first batch whose header is refused (too many pixels) stops the full pass, not the
    one that starts after it."""
    import shutil

    from maskcon.loaders import read_split
    from maskcon.loaders.split import TarSamples, epoch_positions

    def loader(folder):
        return build_train_loader(folder, LoaderSpec(recipe="cars196", image_size=32, batch_size=32, rank=1,
                                                     world_size=2, seed=7, device="cpu", backend=backend,
                                                     num_threads=THREADS[backend]))

    full = loader(shards["photo"])
    full.set_epoch(3)
    everything = list(full)
    tail = loader(shards["photo"])
    tail.set_epoch(3, start=2)
    resumed = list(tail)
    assert len(resumed) == len(everything) - 2 == len(tail) - 2
    for ours, theirs in zip(resumed, everything[2:]):
        for name in ("query", "key", "fine", "coarse"):
            assert torch.equal(ours[name], theirs[name]), name
    assert len(list(tail)) == len(tail)  # the next pass is whole again (epoch 4)
    folder = shards["photo"].parent / f"photo_damaged_{backend}"
    shutil.copytree(shards["photo"], folder)
    _, split = read_split(folder, "train")
    first = epoch_positions(split.num_samples, per_rank=len(full) * 32, rank=1, seed=7, epoch=3)[0]
    _declare_jpeg_size(TarSamples(split), int(first), 20000, 20000)
    skipping = loader(folder)
    skipping.set_epoch(3, start=1)
    assert len(list(skipping)) == len(full) - 1
    whole = loader(folder)
    whole.set_epoch(3)
    with pytest.raises(UserError):
        list(whole)


def test_parameters_are_drawn_afresh_for_every_block_of_an_epoch(tmp_path):
    """An epoch of the DALI loader longer than one block of drawn parameters (DRAW_SAMPLES): one image
    everywhere, so two batches with equal views would have been given equal parameters; no two are equal,
    and passes that start in the middle of the first block or at the second give the full pass's batches."""
    from maskcon.loaders.feed_plan import DRAW_SAMPLES

    batch_size = 512
    per_block = DRAW_SAMPLES // batch_size
    steps = 2 * per_block  # two blocks of equal size
    folder = write_synthetic_shards(tmp_path / "ramp", num_train=steps * batch_size, num_test=8,
                                    image=lambda i: ramp(32, 32), labels=lambda i: (i % 10, i % 10 // 5),
                                    num_fine=10, num_coarse=2, samples_per_shard=1024)

    def loader():
        return build_train_loader(folder, LoaderSpec(recipe="cifar100", image_size=32, batch_size=batch_size, rank=0,
                                                     world_size=1, seed=3, device="cpu", backend="dali", num_threads=2))

    full = loader()
    full.set_epoch(2)
    everything = list(full)
    assert len(everything) == steps
    for name in ("query", "key"):
        views = [batch[name] for batch in everything]
        assert all(not torch.equal(views[i], views[j]) for i in range(steps) for j in range(i)), name
    for start in (3, per_block):
        tail = loader()
        tail.set_epoch(2, start=start)
        resumed = list(tail)
        assert len(resumed) == steps - start
        for ours, theirs in zip(resumed, everything[start:]):
            assert torch.equal(ours["query"], theirs["query"]) and torch.equal(ours["key"], theirs["key"]), start


def test_the_feed_plan_decides_each_run_without_dali(shards):
    """What a DALI pipeline run takes, decided in numpy alone: the planned samples' own pixels, and drawn
    parameters that depend on the epoch (seed_parts) and not on where the pass started."""
    from maskcon.datasets import recipe_for
    from maskcon.loaders.feed_plan import FeedPlan
    from maskcon.loaders.split import TarSamples, decode_image, read_split

    _, split = read_split(shards["ident"], "train")
    samples, recipe = TarSamples(split), recipe_for("cifar100")
    batches = np.split(np.random.default_rng(0).permutation(split.num_samples)[:8 * 16], 8)

    def run_inputs(seed_parts: tuple, first: int) -> tuple[np.ndarray, tuple]:
        plan = FeedPlan(split, samples, (recipe.view("strong"), recipe.view("weak")),
                        np.arange(split.num_samples), image_size=32, batch_size=16, seed=5)
        assert plan.decode_resident(threads=1) > 0 and plan.run_batches >= 8   # the whole pass in one run
        plan.start(batches, seed_parts, first)
        inputs = plan.run_inputs(0)
        with pytest.raises(StopIteration):
            plan.run_inputs(1)
        return inputs

    positions, (images, *parameters) = run_inputs((2, 0), 0)
    np.testing.assert_array_equal(positions, np.concatenate(batches))
    assert all(np.array_equal(image, decode_image(samples, int(p))) for image, p in zip(images, positions))
    assert parameters and all(len(values) == 8 * 16 for values in parameters)
    tail_positions, (_, *tail) = run_inputs((2, 0), 3)
    np.testing.assert_array_equal(tail_positions, positions[3 * 16:])
    for whole, resumed in zip(parameters, tail):
        np.testing.assert_array_equal(resumed, whole[3 * 16:])
    _, (_, *other_epoch) = run_inputs((3, 0), 0)
    assert any(not np.array_equal(a, b) for a, b in zip(parameters, other_epoch))


def test_auto_augment_parameters_looked_up_equal_the_computed_ones():
    """For images of one size the DALI back end looks AutoAugment's parameters up in a table of every
    outcome of the draw: the same values as auto_augment_parameters computes for that draw, with and without
    a flip before it."""
    from maskcon.loaders.dali_ops import DALI_OPS, auto_augment_draw, auto_augment_parameters

    n = 4096
    sizes = np.full((n, 2), 32)
    for flip in (None, np.random.default_rng(5).random(n) < 0.5):
        state = {} if flip is None else {"flip": flip}
        looked_up = DALI_OPS["auto_augment"].draw({"policy": "cifar10"}, np.random.default_rng(1), sizes, state)
        computed = auto_augment_parameters(auto_augment_draw(np.random.default_rng(1), n, 32), sizes, flip)
        assert sorted(looked_up) == sorted(computed)
        for name, values in computed.items():
            assert looked_up[name].shape == values.shape and looked_up[name].dtype == values.dtype, name
            np.testing.assert_allclose(looked_up[name], values, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_views(shards, backend):
    """channels_last=True: the same views, in channels-last memory format (train and test loaders)."""
    plain = _collect(shards["cifar"], "cifar100", backend, image_size=32, epochs=1, batch_size=64)
    last = _collect(shards["cifar"], "cifar100", backend, image_size=32, epochs=1, batch_size=64,
                    channels_last=True)
    for name in ("query", "key"):
        assert torch.equal(plain[name], last[name]), name
    one = build_train_loader(shards["cifar"], LoaderSpec(recipe="cifar100", image_size=32, batch_size=64, rank=0,
                                                         world_size=1, seed=0, device="cpu", backend=backend,
                                                         num_threads=THREADS[backend], channels_last=True))
    batch = next(iter(one))
    for name in ("query", "key"):
        assert batch[name].shape == (64, 3, 32, 32)
        assert batch[name].is_contiguous(memory_format=torch.channels_last) and not batch[name].is_contiguous()
    test = build_test_loader(shards["ident"], LoaderSpec(image_size=32, batch_size=8, rank=0, world_size=2,
                                                         device="cpu", backend=backend, recipe="cifar100",
                                                         num_threads=THREADS[backend], channels_last=True))
    images = [b["image"] for b in test]
    assert all(image.is_contiguous(memory_format=torch.channels_last) for image in images)
    assert [len(image) for image in images] == [8, 8, 0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_blank_batches_have_the_form_of_real_ones(shards, channels_last):
    """A failed loader's stand-in (the loop's) and an exhausted test part's: a real batch's shape, dtype,
    device and strides, all zeros."""
    def form(batch: dict) -> dict:
        return {name: (value.shape[1:], value.dtype, value.device, value[:1].stride()) for name, value in batch.items()}

    spec = LoaderSpec(recipe="cifar100", image_size=32, batch_size=64, backend="dali", num_threads=1,
                      channels_last=channels_last)
    real, blank = next(iter(build_train_loader(shards["cifar"], spec))), spec.blank_train_batch()
    assert form(blank) == form(real) and all(len(value) == 64 for value in blank.values())
    assert all(not value.any() for value in blank.values())
    assert blank["query"].data_ptr() != blank["key"].data_ptr()   # filled in place apart (the benchmarks)
    test_spec = spec.replace(batch_size=8)
    real = next(iter(build_test_loader(shards["ident"], test_spec)))
    blank = test_spec.blank_test_batch()
    assert form(blank) == form(real) and all(len(value) == 0 for value in blank.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_feeding_cost_is_counted(shards, backend):
    """feed_cpu_seconds grows with every batch prepared, wherever the feeding runs."""
    loader = build_train_loader(shards["cifar"], LoaderSpec(recipe="cifar100", image_size=32, batch_size=64, rank=0,
                                                            world_size=1, seed=0, device="cpu", backend=backend,
                                                            num_threads=THREADS[backend]))
    assert loader.feed_cpu_seconds == 0.0
    list(loader)
    first = loader.feed_cpu_seconds
    list(loader)
    # 256 two-view 32-px samples cost well over a millisecond of CPU to read, draw for and copy
    assert first > 1e-3 and loader.feed_cpu_seconds > first + 1e-3


def _declare_size(samples, position: int, width: int, height: int) -> None:
    """Rewrite one PNG's IHDR to declare width x height pixels, with a correct CRC."""
    import struct
    import zlib

    tar, offset, _ = (int(v) for v in samples.rows[position, :3])
    with open(samples.tars[tar], "r+b") as handle:
        handle.seek(offset + 12)
        chunk = bytearray(handle.read(17))  # b"IHDR" + 13 bytes of fields
        chunk[4:12] = struct.pack(">II", width, height)
        handle.seek(offset + 12)
        handle.write(bytes(chunk) + struct.pack(">I", zlib.crc32(bytes(chunk))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", [9000, 20000])  # above MAX_IMAGE_PIXELS; the second above PIL's own limit too
def test_a_decompression_bomb_names_its_shard_and_key(tmp_path, backend, side):
    from maskcon.loaders import read_split
    from maskcon.loaders.split import TarSamples
    from maskcon.shard_format import MAX_IMAGE_PIXELS

    assert side * side > MAX_IMAGE_PIXELS
    folder = write_synthetic_shards(tmp_path / "bomb", num_train=64, num_test=8, image=cifar_like_image,
                                    labels=lambda i: (i % 10, i % 2), num_fine=10, num_coarse=2, samples_per_shard=32)
    _, split = read_split(folder, "train")
    _declare_size(TarSamples(split), 37, side, side)
    with pytest.raises(UserError) as raised:
        loader = build_train_loader(folder, LoaderSpec(recipe="cifar100", image_size=32, batch_size=16, rank=0,
                                                       world_size=1, seed=0, device="cpu", backend=backend,
                                                       num_threads=THREADS[backend]))
        for _ in range(2):
            for _ in loader:
                pass
    message = str(raised.value)
    assert "\n" not in message
    assert "train-000001.tar" in message and "00000037" in message and f"{side} x {side}" in message

"""Loaders: the DALI pipelines (on the CPU) against the torchvision reference, on real WebDataset shards.

Source images are built so that each augmentation can be read back from the output:
  ramp   R = 255 x / (W-1), G = 255 y / (H-1), B = 160: the slope of R across the output gives the crop width
         and its sign the flip, the slope of G the crop height; black pixels (B = 0) only come from the fill
         of a perspective warp.
  ident  a solid colour encoding the sample's position, and fine = position: labels and views must agree.
  solid  one solid colour: ColorJitter and grayscale show in the centre pixel.
  edge   a vertical step edge: the width of the blurred edge gives the Gaussian blur's sigma.
Statistics are compared with two-sample Kolmogorov-Smirnov tests and rates with binomial bounds.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from maskcon.bench.loader import cifar_like_image, write_synthetic_shards
from maskcon.errors import UserError
from maskcon.loaders import build_test_loader, build_train_loader
from maskcon.recipes import RECIPES, Recipe, Step

BACKENDS = ("dali", "torch")
# torchvision transforms run in the test process (no DataLoader workers to fork next to DALI's pipelines);
# test_torch_workers_change_nothing checks that workers give the same batches.
THREADS = {"dali": 2, "torch": 0}
P_MIN = 1e-4  # KS tests: p-values below this mean the two back ends disagree
IDENTITY_CROP = Step("random_resized_crop", {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)})


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
    loader = build_train_loader(path, recipe=recipe, image_size=image_size, batch_size=batch_size, rank=0,
                                world_size=1, seed=options.pop("seed", 0), device="cpu", backend=backend, **options)
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


def assert_rate(flags: np.ndarray, p: float, what: str):
    n = len(flags)
    tolerance = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-9
    assert abs(flags.mean() - p) <= tolerance, f"{what}: rate {flags.mean():.3f}, expected {p} +- {tolerance:.3f}"


def one_step_recipe(step: Step, size: int) -> Recipe:
    return Recipe("one_step", size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (IDENTITY_CROP, step), (IDENTITY_CROP,),
                  (Step("resize"),))


# ---------------------------------------------------------------------------------- named recipes


@pytest.mark.parametrize("dataset, source, size", [("cifar100", "ramp", 32), ("digits", "ramp", 32),
                                                   ("sop_split1", "photo", 48), ("cars196", "photo", 48)])
def test_named_recipes_agree(shards, dataset, source, size):
    recipe = RECIPES[dataset]
    runs = {backend: collect(shards[source], dataset, backend, image_size=size) for backend in BACKENDS}
    for view, steps in (("query", recipe.strong), ("key", recipe.weak)):
        stats = {backend: ramp_statistics(pixels(run[view], recipe)) for backend, run in runs.items()}
        ops = {step.op for step in steps}
        names = ["black_fraction", "flipped"]
        if "auto_augment" not in ops:
            # AutoAugment's colour ops hide the ramp (and Equalize's one-level differences pile up in these):
            # its view is checked as crop + flip (the weak view, test_crop_*) and AutoAugment alone (test_auto_*)
            names += ["width", "height", "mean", "std"]
        assert_same_distribution(stats["dali"], stats["torch"], names, f"{dataset} {view}")
        for backend, stat in stats.items():
            what = f"{dataset} {view} {backend}"
            if ops <= {"random_resized_crop", "horizontal_flip", "random_perspective"}:
                assert_rate(stat["flipped"], 0.5 if "horizontal_flip" in ops else 0.0, what + " flip")
            if ops <= {"random_resized_crop", "horizontal_flip"}:  # the ramp shows the crop exactly
                smallest = steps[0].params["scale"][0]
                assert stat["area"].min() > smallest - 0.03 and stat["area"].max() < 1 + 0.03, what
                ratio = stat["width"] / stat["height"]
                assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05, what
            if ops == {"random_resized_crop", "horizontal_flip", "random_perspective"}:  # (jitter would hide the fill)
                assert_rate(stat["black_fraction"] > 0, 0.5, what + " perspective")
        if ops <= {"random_resized_crop", "horizontal_flip", "random_perspective"}:
            assert_same_distribution(stats["dali"], stats["torch"], ["area", "flipped"], f"{dataset} {view}")


def test_recipe_groups_cover_every_dataset():
    """The datasets not run above share their steps with one that is."""
    tested = {name: (RECIPES[name].strong, RECIPES[name].weak)
              for name in ("cifar100", "digits", "sop_split1", "cars196")}
    for name, recipe in RECIPES.items():
        assert (recipe.strong, recipe.weak) in tested.values(), name


# --------------------------------------------------------------------------------- one step at a time


def test_crop_area_distribution(shards):
    recipe = Recipe("crop", 32, (0.0,) * 3, (1.0,) * 3, RECIPES["cifar100"].weak[:1], (IDENTITY_CROP,),
                    (Step("resize"),))
    stats = {b: ramp_statistics(pixels(collect(shards["ramp"], recipe, b, image_size=32)["query"], recipe))
             for b in BACKENDS}
    assert_same_distribution(stats["dali"], stats["torch"], ["area", "width", "height"], "crop")
    for backend, stat in stats.items():
        # area uniform in [0.2, 1] before the aspect-ratio draw: about half the crops cover less than 0.6
        assert 0.35 < (stat["area"] < 0.6).mean() < 0.65, backend
        assert not stat["flipped"].any(), backend


def test_perspective_rate_and_shape(shards):
    recipe = one_step_recipe(Step("random_perspective", {"distortion": 0.5, "p": 0.5}), 64)
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
    recipe = one_step_recipe(RECIPES["cars196"].strong[3], 64)
    centre = {}
    for backend in BACKENDS:
        px = pixels(collect(shards["solid"], recipe, backend, image_size=64)["query"], recipe)[:, :, 32, 32]
        centre[backend] = {"r": px[:, 0], "g": px[:, 1], "b": px[:, 2]}
        changed = np.abs(px - [180, 100, 60]).max(axis=1) > 1
        # p = 0.8; a drawn jitter leaves this colour within one level about 2% of the time
        assert_rate(changed, 0.8 * 0.98, backend)
    assert_same_distribution(centre["dali"], centre["torch"], ["r", "g", "b"], "color jitter")


def test_grayscale_rate(shards):
    recipe = one_step_recipe(RECIPES["cars196"].strong[4], 64)
    for backend in BACKENDS:
        px = pixels(collect(shards["solid"], recipe, backend, image_size=64)["query"], recipe)[:, :, 32, 32]
        grey = (px[:, 0] == px[:, 1]) & (px[:, 1] == px[:, 2])
        assert_rate(grey, 0.2, backend)
        # torchvision's grey level: int(0.2989 R + 0.587 G + 0.114 B)
        assert (px[grey, 0] == int(0.2989 * 180 + 0.587 * 100 + 0.114 * 60)).all(), backend


def edge_sigma(px: np.ndarray) -> np.ndarray:
    """The standard deviation of the (Gaussian) derivative of the step edge along the middle rows."""
    profile = px[:, 0, 24:40, :].mean(axis=1)
    derivative = np.clip(np.diff(profile, axis=1), 0, None)
    weights = derivative / derivative.sum(axis=1, keepdims=True)
    x = np.arange(derivative.shape[1])
    centre = (weights * x).sum(axis=1)
    return np.sqrt((weights * (x - centre[:, None]) ** 2).sum(axis=1))


def test_gaussian_blur_rate_and_sigma(shards):
    recipe = one_step_recipe(RECIPES["cars196"].strong[5], 64)
    sigma = {}
    for backend in BACKENDS:
        sigma[backend] = {"sigma": edge_sigma(pixels(collect(shards["edge"], recipe, backend, image_size=64)["query"],
                                                     recipe))}
        # applied with p 0.5 and sigma uniform in [0.1, 2]: a sigma above 0.6 shows as a spread edge
        assert_rate(sigma[backend]["sigma"] > 0.6, 0.5 * (2 - 0.6) / 1.9, backend)
        assert sigma[backend]["sigma"].max() < 2.3, backend
    assert_same_distribution(sigma["dali"], sigma["torch"], ["sigma"], "gaussian blur")


def test_auto_augment_statistics(shards):
    """Which ops run, and how far they move pixels, agree (the ops themselves: the next test)."""
    recipe = one_step_recipe(Step("auto_augment", {"policy": "cifar10"}), 32)
    source = np.stack([cifar_like_image(i) for i in range(256)]).transpose(0, 3, 1, 2).astype(np.float64)
    stats = {}
    for backend in BACKENDS:
        run = collect(shards["cifar"], recipe, backend, image_size=32, epochs=8)
        change = pixels(run["query"], recipe) - source[run["fine"].numpy()]
        stats[backend] = {"unchanged": (change == 0).all(axis=(1, 2, 3)), "mean_change": change.mean(axis=(1, 2, 3)),
                          "mean_abs_change": np.abs(change).mean(axis=(1, 2, 3)),
                          "changed_fraction": (change != 0).mean(axis=(1, 2, 3))}
    # an image passes untouched with probability mean over sub-policies of (1 - p1)(1 - p2) = 0.2232,
    # plus applied ops that change nothing on it
    for backend, stat in stats.items():
        assert 0.2232 - 0.04 < stat["unchanged"].mean() < 0.2232 + 0.08, backend
    assert_same_distribution(stats["dali"], stats["torch"], list(stats["dali"]), "AutoAugment")


# ------------------------------------------------------------------- AutoAugment ops, one by one


def test_auto_augment_ops_match_torchvision():
    """Each DALI AutoAugment op, at every magnitude bin and sign, against torchvision's _apply_op."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    from maskcon.loaders.dali import _augmentations
    from maskcon.recipes import auto_augment_magnitudes

    size = 32
    images = [cifar_like_image(i) for i in range(6)]
    for image in images:
        image[4:9, 6:10] = [255, 0, 0]  # a marker, so geometry shows
    augmentations = _augmentations(size)
    for name, augmentation in augmentations.items():
        magnitudes, signed = auto_augment_magnitudes(name, size)
        cases = [(b, s) for b in range(len(magnitudes) or 1) for s in ((0, 1) if signed else (0,))]
        extra = {k: v for k, v in {"fill_value": 0, "interp_type": types.INTERP_NN}.items()
                 if k in inspect.signature(augmentation.op).parameters}

        @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=0)
        def run():
            data = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            outputs = []
            for magnitude_bin, sign in cases:
                if not magnitudes:
                    outputs.append(augmentation(data, **extra))
                    continue
                chosen = (signed_bin(magnitude_bin, random_sign=fn.random.uniform(values=[sign], dtype=types.INT32))
                          if signed else magnitude_bin)
                outputs.append(augmentation(data, magnitude_bin=chosen, num_magnitude_bins=10, **extra))
            return tuple(outputs)

        pipe = run()
        pipe.build()
        results = pipe.run()
        for (magnitude_bin, sign), result in zip(cases, results):
            magnitude = magnitudes[magnitude_bin] if magnitudes else 0.0
            magnitude = -magnitude if signed and sign == 1 else magnitude
            ours = np.stack([np.array(result[i]) for i in range(len(images))]).astype(int)
            theirs = np.stack([_apply_op(torch.from_numpy(img).permute(2, 0, 1).contiguous(), name, magnitude,
                                         interpolation=InterpolationMode.NEAREST, fill=[0.0] * 3)
                               for img in images]).transpose(0, 2, 3, 1).astype(int)
            differing = (ours != theirs).mean()
            what = f"{name} bin {magnitude_bin} sign {sign}"
            if name in ("ShearX", "ShearY"):
                # nearest-neighbour sampling breaks ties at exact half pixels differently
                assert differing < 0.1, what
            elif name == "Equalize":
                # PIL's lookup table, rebuilt from DALI's OpenCV-style equalize: within one level (dali.py)
                assert np.abs(ours - theirs).max() <= 1 and np.abs(ours - theirs).mean() < 0.5, what
            else:  # the same arithmetic; float rounding before truncation to uint8 moves a few pixels by one
                assert np.abs(ours - theirs).mean() < 0.5 and np.abs(ours - theirs).max() <= 1, what


# ------------------------------------------------------------------ pairing, labels, epochs, ranks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dataset, views", [("sop_split1", ("strong", "weak")), ("cifar100", ("weak", "weak")),
                                            ("cifar100", ("weak", "strong"))])
def test_views_and_labels_stay_with_their_image(shards, backend, dataset, views):
    recipe = RECIPES[dataset]
    run = collect(shards["ident"], dataset, backend, image_size=32, epochs=1, batch_size=32,
                  query_view=views[0], key_view=views[1])
    fine = run["fine"].numpy()
    assert (run["coarse"].numpy() == fine % 7).all()
    for view, name in zip(("query", "key"), views):
        if RECIPES[dataset].view(name)[-1].op == "auto_augment":
            continue  # AutoAugment changes colours: no colour code survives it
        centre = pixels(run[view], recipe)[:, :, 16, 16]
        assert (ident_of(centre) == fine).all(), (backend, view)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [16, 20])
def test_every_sample_once_per_epoch_over_two_processes(shards, backend, batch_size):
    world = 2
    loaders = [build_train_loader(shards["ident"], recipe="cifar100", image_size=32, batch_size=batch_size, rank=rank,
                                  world_size=world, seed=3, device="cpu", backend=backend,
                                  num_threads=THREADS[backend]) for rank in range(world)]
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


def test_torch_workers_change_nothing(shards):
    """Augmentations are seeded per sample: DataLoader workers give the batches the in-process path gives."""
    in_process = collect(shards["ramp"], "cifar100", "torch", image_size=32, epochs=2, num_threads=0)
    workers = collect(shards["ramp"], "cifar100", "torch", image_size=32, epochs=2, num_threads=2)
    for name in ("query", "key", "fine"):
        assert torch.equal(in_process[name], workers[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_test_loader_gives_every_sample_once(shards, backend):
    recipe = RECIPES["cifar100"]
    world, seen = 2, []
    lengths = []
    for rank in range(world):
        loader = build_test_loader(shards["ident"], image_size=32, batch_size=8, rank=rank, world_size=world,
                                   device="cpu", backend=backend, recipe="cifar100", num_threads=THREADS[backend])
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
    recipe = RECIPES["cars196"]
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
    loader = build_train_loader(tmp_path / "digits", recipe="digits", image_size=32, batch_size=64, rank=0,
                                world_size=1, seed=0, device="cpu", backend=backend, num_threads=THREADS[backend])
    batch = next(iter(loader))
    assert batch["query"].shape == (64, 3, 32, 32) and batch["key"].shape == (64, 3, 32, 32)
    grey = pixels(batch["key"], RECIPES["digits"])  # 8x8 grey digits decoded to RGB: R = G = B
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert batch["fine"].max() <= 9 and (batch["coarse"] == (batch["fine"] >= 5).long()).all()
    test = build_test_loader(tmp_path / "digits", image_size=32, batch_size=100, rank=0, world_size=1, device="cpu",
                             backend=backend, num_threads=THREADS[backend])
    assert sum(len(b["index"]) for b in test) == 360


def test_bad_requests_are_user_errors(shards, tmp_path):
    good = dict(recipe="cifar100", image_size=32, batch_size=16, rank=0, world_size=1, seed=0, device="cpu",
                backend="dali")
    bad = [({"backend": "tf"}, shards["ident"]), ({"batch_size": 1000}, shards["ident"]),
           ({"rank": 2, "world_size": 2}, shards["ident"]), ({"query_view": "medium"}, shards["ident"]),
           ({"recipe": "mnist"}, shards["ident"]), ({}, tmp_path / "nothing")]
    for change, path in bad:
        with pytest.raises(UserError) as raised:
            build_train_loader(path, **{**good, **change})
        assert "\n" not in str(raised.value)


def test_a_recipe_of_ones_own_is_validated(shards):
    bad = dataclasses.replace(RECIPES["cifar100"], name="mine", strong=(Step("horizontal_flip", {"p": 0.5}),))
    with pytest.raises(UserError):
        build_train_loader(shards["ident"], recipe=bad, image_size=32, batch_size=16, rank=0, world_size=1, seed=0,
                           device="cpu", backend="dali")


@pytest.mark.gpu
def test_dali_on_the_gpu(shards):
    """The same pipelines on a CUDA device (JPEG decoded by `mixed`): tensors on the GPU, the same statistics."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    for source, dataset, size in (("ramp", "cifar100", 32), ("photo", "cars196", 48)):
        recipe = RECIPES[dataset]
        loader = build_train_loader(shards[source], recipe=dataset, image_size=size, batch_size=64, rank=0,
                                    world_size=1, seed=0, device="cuda", backend="dali")
        batches = [batch for _ in range(4) for batch in loader]
        assert all(b[name].device.type == "cuda" for b in batches for name in b)
        gpu = {name: torch.cat([b[name].cpu() for b in batches]) for name in batches[0]}
        cpu = collect(shards[source], dataset, "dali", image_size=size)
        ours, reference = (ramp_statistics(pixels(run["key"], recipe)) for run in (gpu, cpu))
        assert_same_distribution(ours, reference, ["width", "height", "flipped", "black_fraction"], dataset)
        test = build_test_loader(shards[source], image_size=size, batch_size=4, rank=0, world_size=1, device="cuda",
                                 backend="dali")
        assert sum(len(b["index"]) for b in test) == 8

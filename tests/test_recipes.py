"""The recipe table: the paper's augmentations as data, validated, and the exact AutoAugment CIFAR-10 policy."""

import dataclasses

import pytest
from torchvision.transforms import AutoAugment, AutoAugmentPolicy

from maskcon import recipes
from maskcon.errors import UserError
from maskcon.datasets import DATASETS, recipe_for
from maskcon.recipes import RECIPES, Step


def test_table_is_valid():
    recipes.validate()


def test_every_dataset_uses_a_recipe_of_the_table():
    for description in DATASETS.values():
        assert RECIPES[description.recipe.name] is description.recipe


def ops(steps):
    return [step.op for step in steps]


def test_recipes_follow_the_supplement():
    small = ["cifar100", "cifartoy_good", "cifartoy_bad", "imagenet32"]
    for name in small:
        recipe = DATASETS[name].recipe
        assert ops(recipe.strong) == ["random_resized_crop", "horizontal_flip", "auto_augment"]
        assert ops(recipe.weak) == ["random_resized_crop", "horizontal_flip"]
    # the bundled digits (not in the paper): milder crops, no mirror images
    digits = DATASETS["digits"].recipe
    assert ops(digits.strong) == ["random_resized_crop", "auto_augment"]
    assert ops(digits.weak) == ["random_resized_crop"]
    assert digits.weak[0].params["scale"] == (0.6, 1.0)
    for name in ["sop_split1", "sop_split2"]:
        assert ops(DATASETS[name].recipe.strong) == ["random_resized_crop", "horizontal_flip", "random_perspective"]
    cars = DATASETS["cars196"].recipe
    assert ops(cars.strong) == ["random_resized_crop", "horizontal_flip", "random_perspective", "color_jitter",
                                "random_grayscale", "gaussian_blur"]
    assert cars.strong[3].params == {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "p": 0.8}
    assert cars.strong[4].params == {"p": 0.2}
    assert cars.strong[5].params == {"sigma": (0.1, 2.0), "p": 0.5}
    for name in ["cars196", "sop_split1", "sop_split2"]:
        recipe = DATASETS[name].recipe
        assert ops(recipe.weak) == ["random_resized_crop", "random_perspective", "horizontal_flip"]
        assert recipe.mean == recipes.IMAGENET_MEAN
    for recipe in RECIPES.values():
        assert ops(recipe.test) == ["resize"]
        for step in recipe.strong + recipe.weak:
            if step.op == "random_resized_crop" and recipe is not digits:
                assert step.params["scale"] == (0.2, 1.0)
            if step.op == "random_perspective":
                assert step.params == {"distortion": 0.5, "p": 0.5}
            if step.op == "horizontal_flip":  # RandomHorizontalFlip()
                assert step.params == {"p": 0.5}
            if step.op == "random_resized_crop":  # torchvision's default ratio
                assert step.params["ratio"] == (3.0 / 4.0, 4.0 / 3.0)


def test_auto_augment_table_is_torchvision_cifar10():
    torchvision_policy = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    assert [tuple(sub) for sub in torchvision_policy] == list(recipes.AUTO_AUGMENT_CIFAR10)


@pytest.mark.parametrize("size", [8, 32, 64, 96, 224, 331])
def test_auto_augment_magnitudes_are_torchvision_bins(size):
    space = AutoAugment(AutoAugmentPolicy.CIFAR10)._augmentation_space(recipes.AUTO_AUGMENT_BINS, (size, size))
    for op, (magnitudes, signed) in space.items():
        ours, ours_signed = recipes.auto_augment_magnitudes(op, size)
        assert ours_signed == signed, op
        if magnitudes.ndim == 0:
            assert ours == [], op
            continue
        expected = [float(v) for v in magnitudes]
        if op.startswith("Translate"):  # torchvision applies int() to the (signed) pixel offset
            expected = [float(int(v)) for v in expected]
        assert ours == pytest.approx(expected, rel=1e-6, abs=1e-6), op


def test_bad_recipes_are_rejected_with_one_line():
    good = DATASETS["cifar100"].recipe
    bad_cases = [
        dataclasses.replace(good, strong=(Step("horizontal_flip", {"p": 0.5}),)),  # no crop first
        dataclasses.replace(good, weak=good.weak + (Step("sharpen", {}),)),
        dataclasses.replace(good, weak=good.weak + (Step("horizontal_flip", {"p": 1.5}),)),
        dataclasses.replace(good, weak=(Step("random_resized_crop", {"scale": (0.9, 0.2), "ratio": (0.75, 1.33)}),)),
        dataclasses.replace(good, strong=good.strong[:2] + (Step("auto_augment", {"policy": "svhn"}),)),
        dataclasses.replace(good, std=(0.2, 0.0, 0.2)),
    ]
    for bad in bad_cases:
        with pytest.raises(UserError) as raised:
            recipes.validate({"cifar100": bad})
        assert "\n" not in str(raised.value)


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(UserError, match="cifar100"):
        recipe_for("mnist")
    with pytest.raises(UserError, match="strong"):
        DATASETS["cifar100"].recipe.view("medium")


def test_recipes_are_module_constants():
    for name, recipe in RECIPES.items():
        assert getattr(recipes, name.upper()) is recipe


def _back_end_tables():
    from maskcon.loaders.reference import PIL_OPS
    from maskcon.loaders.dali_ops import DALI_OPS
    from maskcon.loaders.torch_backend import TORCHVISION_OPS

    return {"DALI": DALI_OPS, "torchvision": TORCHVISION_OPS, "PIL": PIL_OPS}


def test_every_op_has_every_back_end():
    """Each back end's op table implements every op of the recipes, and nothing else."""
    for backend, table in _back_end_tables().items():
        assert set(table) == set(recipes.OPS), backend


def test_an_op_without_a_back_end_fails_loudly():
    for backend, table in _back_end_tables().items():
        without = {name: value for name, value in table.items() if name != "gaussian_blur"}
        with pytest.raises(UserError, match=f"{backend} loader has no implementation of the gaussian_blur op"):
            recipes.check_implementations(without, backend)
    with pytest.raises(UserError, match="unknown augmentation op 'sepia'"):
        Step("sepia").kind


@pytest.mark.parametrize("module, backend", [("maskcon.loaders.dali_ops", "DALI"),
                                             ("maskcon.loaders.torch_backend", "torchvision"),
                                             ("maskcon.loaders.reference", "PIL")])
def test_a_new_op_fails_at_the_import_of_a_back_end_that_lacks_it(module, backend):
    # the modules a back end imports are imported first (the reference loader imports the torch back end)
    """An op added to the recipes but not to a back end's table stops that back end at import, in one line."""
    import subprocess
    import sys

    code = "import maskcon.loaders.torch_backend\n" if backend == "PIL" else ""
    code += "import maskcon.recipes as r\n"
    code += ("r.OPS['sepia'] = r.Op('sepia', {})\n"
            "from maskcon.errors import UserError\n"
            f"try:\n    import {module}\nexcept UserError as error:\n    print(error); raise SystemExit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == (f"the {backend} loader has no implementation of the sepia op; add it to that "
                                   "back end's op table, or pick another loader backend or recipe")


def test_auto_augment_draw_follows_torchvision_policy():
    """Sub-policies uniform; each op kind applied at the rate torchvision's own policy table implies;
    magnitudes from torchvision's bins with a random sign where torchvision draws one (1-in-1,000 bounds)."""
    import numpy as np

    policy = AutoAugment(AutoAugmentPolicy.CIFAR10)
    space = policy._augmentation_space(recipes.AUTO_AUGMENT_BINS, (32, 32))
    n = 200_000
    from maskcon.loaders.dali_ops import auto_augment_draw

    drawn = auto_augment_draw(np.random.default_rng(1), n, 32)
    counts = np.bincount(drawn["sub_policy"], minlength=25)
    expected = n / 25
    assert np.abs(counts - expected).max() < 3.9 * np.sqrt(expected * (1 - 1 / 25))  # 25 tests, 1e-3 overall
    for slot in range(2):
        names = np.array(recipes.AUTO_AUGMENT_OPS)[drawn[f"op_{slot}"]]
        for sub, sub_policy in enumerate(policy.policies):
            name, p, magnitude_bin = sub_policy[slot]
            chosen = drawn["sub_policy"] == sub
            assert (names[chosen] == name).all()
            applied = drawn[f"applied_{slot}"][chosen]
            assert abs(applied.mean() - p) <= 3.9 * np.sqrt(p * (1 - p) / chosen.sum()) + 1e-9, (sub, slot)
            magnitudes, signed = space[name]
            values = drawn[f"magnitude_{slot}"][chosen]
            if magnitude_bin is None or magnitudes.ndim == 0:
                assert (values == 0).all()
                continue
            value = float(magnitudes[magnitude_bin])
            value = float(int(value)) if name.startswith("Translate") else value
            assert np.allclose(np.abs(values), abs(value), atol=1e-6), (sub, slot)
            if signed and value != 0:
                assert abs((values < 0).mean() - 0.5) <= 3.9 * np.sqrt(0.25 / chosen.sum()), (sub, slot)
            else:
                assert (values >= 0).all()

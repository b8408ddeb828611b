"""The datasets, one description each: reader, training preset, augmentation recipe, size, initial weights.

`DATASETS[name]` is what the configuration (choices and presets), the loaders (recipe), the converters
(reader) and README's table read; adding a dataset means its reader module and one `Dataset` here.
A reader is `read(src) -> DatasetSource` (see source.py), where `src` is the folder the user downloaded
(None for the bundled digits); it checks the source and raises UserError (one line: what is missing and
where to get it); pixels are read lazily, when shards are written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from maskcon import recipes
from maskcon.datasets import cars196, cifar100, cifartoy, digits, folder, imagenet32, sop
from maskcon.datasets.source import ArraySplit, DatasetSource, FileSplit, Sample, Split
from maskcon.errors import UserError


@dataclass(frozen=True)
class Dataset:
    """name: the --dataset value and the shard folder's name; read: the reader of the original files;
    recipe: its augmentation recipe (maskcon/recipes.py); image_size: the network input side
    (px); pretrained: the initial weights ("imagenet": torchvision's, as the official code starts every
    paper dataset; None: random); preset: the options that differ from `Config`'s defaults (supplement,
    section A and Tables 1, 4, 6); source, coarse: what SRC is and where the coarse labels come from
    (README's table); label_files: the official label files the reader takes from `--labels DIR` instead of
    SRC ("": none, the labels come with SRC)."""

    name: str
    read: Callable[..., DatasetSource]
    recipe: recipes.Recipe
    image_size: int
    pretrained: str | None
    source: str
    coarse: str
    preset: dict = field(default_factory=dict)
    label_files: str = ""


DATASETS: dict[str, Dataset] = {d.name: d for d in (
    # The bundled demo, sized to finish in minutes on two CPU cores at the digits' own 8 px: both views weak
    # (the digits' own mild crop), a bank of 4 batches, so that it never holds an older key of a query's own
    # image (1,437 training images).
    Dataset("digits", digits.read, recipes.DIGITS, 8, None,
            "nothing: scikit-learn's bundled digits (written automatically on first use)", "{0–4} vs {5–9}",
            dict(epochs=12, batch_size=64, lr=0.04, queue_size=256, query_view="weak", warmup_epochs=1,
                 eval_every=6, checkpoint_every=6, log_every=5, eval_untrained=True, w=1.0, t=0.05)),
    Dataset("cifar100", cifar100.read, recipes.CIFAR, 32, "imagenet", "the `cifar-100-python` folder",
            "the 20 official superclasses", dict(w=1.0, t=0.05)),
    Dataset("cifartoy_good", cifartoy.read_good, recipes.CIFAR, 32, "imagenet",
            "the `cifar-10-batches-py` folder", "8 classes in 2 groups (deer, frog left out)", dict(w=1.0, t=0.05)),
    Dataset("cifartoy_bad", cifartoy.read_bad, recipes.CIFAR, 32, "imagenet",
            "the `cifar-10-batches-py` folder", "8 classes in 2 groups (deer, frog left out)", dict(w=1.0, t=0.05)),
    Dataset("imagenet32", imagenet32.read, recipes.IMAGENET32, 32, "imagenet",
            "downsampled ImageNet 32×32 (pickled or `.npz` batches, flat or in `Imagenet32_train/`, "
            "`Imagenet32_val/`) plus the official MaskCon files `imagenet32_to_fine.json` and "
            "`imagenet_fine_to_coarse.json` copied into it or in `--labels DIR`", "12 WordNet groups",
            dict(epochs=100, batch_size=256, lr_reference_batch=256, queue_size=16384, w=1.0, t=0.05),
            "`imagenet32_to_fine.json`, `imagenet_fine_to_coarse.json`"),
    Dataset("sop_split1", sop.read_split1, recipes.PHOTOS, 224, "imagenet",
            "the `Stanford_Online_Products` folder with the official `sop_split1/`, `sop_split2/` label folders "
            "copied into it or in `--labels DIR`", "12 super-classes", dict(w=0.8, t=0.1, query_view="weak"),
            "`sop_split1/`"),
    Dataset("sop_split2", sop.read_split2, recipes.PHOTOS, 224, "imagenet",
            "the `Stanford_Online_Products` folder with the official `sop_split1/`, `sop_split2/` label folders "
            "copied into it or in `--labels DIR`", "12 super-classes", dict(w=0.5, t=0.05, query_view="weak"),
            "`sop_split2/`"),
    Dataset("cars196", cars196.read, recipes.CARS, 224, "imagenet",
            "Stanford Cars as torchvision's `StanfordCars` reads it (`devkit/`, `cars_train/`, `cars_test/`, "
            "`cars_test_annos_withlabels.mat`)", "8 body types", dict(w=1.0, t=0.1)),
    Dataset("folder", folder.read, recipes.PHOTOS, 224, "imagenet",
            "`train/<class>/` and `test/<class>/` image folders (JPEG or PNG, one of the two for all) plus "
            "`fine_to_coarse.csv` (header `fine,coarse`, one row per class folder); hidden files, `Thumbs.db` and "
            "`desktop.ini` are skipped", "your own"),
)}


def readme_table() -> str:
    """README's table of datasets, rendered from the descriptions (a test keeps README equal to it)."""
    rows = ["| DATASET | SRC (what you downloaded) | coarse labels |", "|---|---|---|"]
    rows += [f"| `{d.name}` | {d.source} | {d.coarse} |" for d in DATASETS.values()]
    return "\n".join(rows) + "\n"


def dataset_for(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def recipe_for(name: str) -> recipes.Recipe:
    """The augmentation recipe of dataset `name`, validated (UserError naming the known datasets)."""
    recipe = dataset_for(name).recipe
    recipes.validate({recipe.name: recipe})
    return recipe


__all__ = ["DATASETS", "Dataset", "dataset_for", "readme_table", "recipe_for", "ArraySplit", "DatasetSource", "FileSplit", "Sample", "Split"]

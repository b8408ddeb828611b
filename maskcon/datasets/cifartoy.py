"""CIFAR-toy from the `cifar-10-batches-py` folder (pickled `data_batch_1..5`, `test_batch`, `batches.meta`).

8 of the 10 CIFAR-10 classes (deer and frog left out) in 2 coarse classes, numbered as in the official
MaskCon code (datasets/cifartoy.py), so fine labels match it:
- good: coarse 0 = {airplane, automobile, ship, truck}, coarse 1 = {bird, cat, dog, horse};
- bad:  coarse 0 = {airplane, automobile, dog, cat},    coarse 1 = {ship, truck, bird, horse}.
Keys: the zero-padded index in the CIFAR-10 split (train = data_batch_1..5 in order; 5 digits), so the
left-out classes leave gaps. Pixels: lossless RGB PNG of the files' channel-planar rows.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from maskcon.datasets.source import (ArraySplit, DatasetSource, find_folder, load_pickle, planar_rows_to_images,
                                     require_keys, source_folder)
from maskcon.errors import UserError

WHERE = ("download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
         "and pass the cifar-10-batches-py folder as --src")
FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# fine class i of the toy split = CIFAR-10 class FINE[variant][i]; coarse = i // 4 for good
FINE = {"good": ["airplane", "automobile", "ship", "truck", "bird", "cat", "dog", "horse"],
        "bad": ["airplane", "automobile", "bird", "cat", "ship", "truck", "dog", "horse"]}
COARSE_MEMBERS = {"good": [["airplane", "automobile", "ship", "truck"], ["bird", "cat", "dog", "horse"]],
                  "bad": [["airplane", "automobile", "dog", "cat"], ["ship", "truck", "bird", "horse"]]}
COARSE_NAMES = {"good": ["vehicles", "animals"],
                "bad": ["airplane, automobile, cat, dog", "bird, horse, ship, truck"]}


def _fine_to_coarse(variant: str) -> list[int]:
    return [next(c for c, members in enumerate(COARSE_MEMBERS[variant]) if name in members)
            for name in FINE[variant]]


def _load(folder: str, split: str, variant: str):
    images, labels = [], []
    for name in FILES[split]:
        path = Path(folder) / name
        content = load_pickle(path, WHERE)
        require_keys(content, ("data", "labels"), path, WHERE)
        images.append(planar_rows_to_images(content["data"], path, WHERE))
        labels.extend(content["labels"])
    images_all = np.concatenate(images)
    cifar10 = np.asarray(labels, dtype=np.int64)
    if len(cifar10) != len(images_all) or (len(cifar10) and (cifar10.min() < 0 or cifar10.max() > 9)):
        raise UserError(f"{folder} holds {len(images_all)} images with {len(cifar10)} labels, or labels "
                        f"outside 0..9; {WHERE}")
    to_fine = np.full(10, -1, dtype=np.int64)
    for fine, name in enumerate(FINE[variant]):
        to_fine[CIFAR10_CLASSES.index(name)] = fine
    keep = np.flatnonzero(to_fine[cifar10] >= 0)  # drops deer and frog
    fine = to_fine[cifar10[keep]]
    coarse = np.asarray(_fine_to_coarse(variant), dtype=np.int64)[fine]
    return images_all[keep], fine, coarse, keep


def read(src: Path | None, variant: str) -> DatasetSource:
    name = f"cifartoy_{variant}"
    folder = find_folder(source_folder(src, name, WHERE), "cifar-10-batches-py", "batches.meta", WHERE)
    for file_name in FILES["train"] + FILES["test"]:
        if not (folder / file_name).exists():
            raise UserError(f"missing {folder / file_name}; {WHERE}")
    meta_path = folder / "batches.meta"
    meta = load_pickle(meta_path, WHERE)
    require_keys(meta, ("label_names",), meta_path, WHERE)
    if list(meta["label_names"]) != CIFAR10_CLASSES:
        raise UserError(f"{meta_path} names the classes {list(meta['label_names'])}, not CIFAR-10's; {WHERE}")
    return DatasetSource(
        name=name, fine_classes=list(FINE[variant]), coarse_classes=list(COARSE_NAMES[variant]),
        fine_to_coarse=_fine_to_coarse(variant), image_format="png", image_size=(32, 32), channels=3,
        splits={split: ArraySplit(_load, (str(folder), split, variant), None, key_width=5, channels_first=True)
                for split in FILES},
        notes={"source": str(folder),
               "keys": "zero-padded index in the CIFAR-10 split (train: data_batch_1..5 in order)",
               "labels": "CIFAR-10 without deer and frog, fine numbering of the official MaskCon cifartoy.py"},
    )


read_good = functools.partial(read, variant="good")
read_bad = functools.partial(read, variant="bad")

"""CIFAR-100 from the `cifar-100-python` folder (pickled `train`, `test`, `meta`).

Fine = the 100 classes, coarse = the 20 official superclasses, both as the files' own `fine_labels` and
`coarse_labels`. Keys: the zero-padded index in the source file (5 digits). Pixels: the files' rows of
3,072 bytes (channel-planar R, G, B of 32 x 32), stored as lossless RGB PNG.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from maskcon.datasets.source import (ArraySplit, DatasetSource, find_folder, load_pickle, planar_rows_to_images,
                                     require_keys, source_folder)
from maskcon.errors import UserError

WHERE = ("download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it "
         "and pass the cifar-100-python folder as --src")
FILES = {"train": "train", "test": "test"}


def _load(folder: str, split: str):
    path = Path(folder) / FILES[split]
    content = load_pickle(path, WHERE)
    require_keys(content, ("data", "fine_labels", "coarse_labels"), path, WHERE)
    images = planar_rows_to_images(content["data"], path, WHERE)
    fine = np.asarray(content["fine_labels"], dtype=np.int64)
    coarse = np.asarray(content["coarse_labels"], dtype=np.int64)
    if not len(images) == len(fine) == len(coarse):
        raise UserError(f"{path} holds {len(images)} images but {len(fine)} fine and {len(coarse)} coarse "
                        f"labels; {WHERE}")
    if len(fine) and (fine.min() < 0 or fine.max() >= 100 or coarse.min() < 0 or coarse.max() >= 20):
        raise UserError(f"{path} holds labels outside 0..99 / 0..19; {WHERE}")
    return images, fine, coarse, np.arange(len(fine))


def read(src: Path | None) -> DatasetSource:
    folder = find_folder(source_folder(src, "cifar100", WHERE), "cifar-100-python", "meta", WHERE)
    for name in FILES.values():
        if not (folder / name).exists():
            raise UserError(f"missing {folder / name}; {WHERE}")
    meta_path = folder / "meta"
    meta = load_pickle(meta_path, WHERE)
    require_keys(meta, ("fine_label_names", "coarse_label_names"), meta_path, WHERE)
    fine_classes, coarse_classes = list(meta["fine_label_names"]), list(meta["coarse_label_names"])
    if len(fine_classes) != 100 or len(coarse_classes) != 20:
        raise UserError(f"{meta_path} names {len(fine_classes)} fine and {len(coarse_classes)} coarse classes, "
                        f"not 100 and 20; {WHERE}")
    splits = {split: ArraySplit(_load, (str(folder), split), None, key_width=5, channels_first=True)
              for split in FILES}
    # the superclass of each class, read from the labels themselves (every class has one superclass)
    fine_to_coarse = [-1] * 100
    for split in splits.values():
        _, fine, coarse, _ = split.arrays()
        for f, c in set(zip(fine.tolist(), coarse.tolist())):
            if fine_to_coarse[f] not in (-1, c):
                raise UserError(f"{folder} gives class {f} two superclasses; {WHERE}")
            fine_to_coarse[f] = c
    if -1 in fine_to_coarse:
        raise UserError(f"{folder} holds no image of class {fine_to_coarse.index(-1)}; {WHERE}")
    return DatasetSource(
        name="cifar100", fine_classes=fine_classes, coarse_classes=coarse_classes, fine_to_coarse=fine_to_coarse,
        image_format="png", image_size=(32, 32), channels=3,
        splits=splits,
        notes={"source": str(folder), "keys": "zero-padded index in the source file",
               "labels": "the files' fine_labels and coarse_labels (20 superclasses)"},
    )

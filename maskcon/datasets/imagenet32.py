"""Downsampled ImageNet 32 x 32 (Chrabaszcz et al. 2017) with MaskCon's 12 coarse classes.

Source files, pickled or .npz (`train_data_batch_1` ... `train_data_batch_10`, `val_data`, each a dict with
`data`: rows of 3,072 channel-planar bytes and `labels`: 1-based), flat in SRC or in `Imagenet32_train/`
and `Imagenet32_val/` (or the `_npz` folders). The official MaskCon files read from SRC:
- imagenet32_to_fine.json: downsampled label (0-based) -> ImageNet-1k class index (the fine label),
- imagenet_fine_to_coarse.json: ImageNet-1k class index -> coarse class 0..11 (supplement Table 3).
Keys: zero-padded index in the split (train = batches 1..10 in order; 7 digits train, 5 val).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from maskcon.datasets.source import (ArraySplit, DatasetSource, load_json, load_pickle, planar_rows_to_images,
                                     require_keys, source_folder)
from maskcon.errors import UserError

WHERE = ("download Imagenet32_train.zip and Imagenet32_val.zip (or their npz versions) from "
         "https://image-net.org/download-images (Downsampled ImageNet 32x32) and extract them into --src")
WHERE_MAPS = ("copy imagenet32_to_fine.json and imagenet_fine_to_coarse.json from the official MaskCon release "
              "(https://github.com/MrChenFeng/MaskCon_CVPR2023, folder coarse_labels/imagenet32) into --src, or "
              "pass their folder as --labels")
FILES = {"train": [f"train_data_batch_{k}" for k in range(1, 11)], "test": ["val_data"]}
FOLDERS = {"train": ["", "Imagenet32_train", "Imagenet32_train_npz"],
           "test": ["", "Imagenet32_val", "Imagenet32_val_npz"]}
NUM_CLASSES = 1000
COARSE_CLASSES = ["Invertebrate", "Domestic animal", "Bird", "Mammal", "Reptile/Aquatic vertebrate", "Device",
                  "Vehicle", "Container", "Instrument", "Artifact", "Clothing", "Others"]  # supplement, Table 3
KEY_WIDTH = {"train": 7, "test": 5}


def _find(src: Path, split: str, name: str) -> Path:
    for folder in FOLDERS[split]:
        for candidate in (src / folder / name, src / folder / f"{name}.npz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"missing {name} (or {name}.npz) in {src}, {src}/{FOLDERS[split][1]} or "
                    f"{src}/{FOLDERS[split][2]}; {WHERE}")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as content:
                content = {key: content[key] for key in content.files}
        except (OSError, ValueError):
            raise UserError(f"{path} is not a readable .npz file; {WHERE}") from None
    else:
        content = load_pickle(path, WHERE)
    require_keys(content, ("data", "labels"), path, WHERE)
    images = planar_rows_to_images(content["data"], path, WHERE)
    labels = np.asarray(content["labels"], dtype=np.int64).reshape(-1) - 1  # files count from 1
    if len(labels) != len(images):
        raise UserError(f"{path} holds {len(images)} images with {len(labels)} labels; {WHERE}")
    outside = (labels < 0) | (labels >= NUM_CLASSES)
    if outside.any():
        count = int(outside.sum())
        raise UserError(f"{path} holds {count} label{'s' * (count != 1)} outside 1..{NUM_CLASSES} (the first "
                        f"{int(labels[outside][0]) + 1}, of image {int(np.flatnonzero(outside)[0])}); {WHERE}")
    return images, labels


def _load(paths: tuple[str, ...], to_fine: tuple[int, ...], fine_to_coarse: tuple[int, ...]):
    images, labels = zip(*(_read_batch(Path(path)) for path in paths))
    images_all = images[0] if len(images) == 1 else np.concatenate(images)
    del images
    fine = np.asarray(to_fine, dtype=np.int64)[np.concatenate(labels)]
    coarse = np.asarray(fine_to_coarse, dtype=np.int64)[fine]
    return images_all, fine, coarse, np.arange(len(fine))


def _read_map(path: Path, num_values: int) -> list[int]:
    content = load_json(path, WHERE_MAPS)
    try:
        mapping = [int(content[str(i)]) for i in range(NUM_CLASSES)]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} does not map every class 0..{NUM_CLASSES - 1}; {WHERE_MAPS}") from None
    if min(mapping) < 0 or max(mapping) >= num_values:
        raise UserError(f"{path} maps to values outside 0..{num_values - 1}; {WHERE_MAPS}")
    return mapping


def read(src: Path | None, labels: Path | None = None) -> DatasetSource:
    """labels: the folder of the two official MaskCon maps (default: SRC)."""
    src = source_folder(src, "imagenet32", WHERE)
    paths = {split: tuple(str(_find(src, split, name)) for name in names) for split, names in FILES.items()}
    maps = src if labels is None else source_folder(labels, "imagenet32", WHERE_MAPS)
    to_fine = _read_map(maps / "imagenet32_to_fine.json", NUM_CLASSES)
    fine_to_coarse = _read_map(maps / "imagenet_fine_to_coarse.json", len(COARSE_CLASSES))
    if len(set(to_fine)) != NUM_CLASSES:
        raise UserError(f"{maps / 'imagenet32_to_fine.json'} maps two labels to one class; {WHERE_MAPS}")
    return DatasetSource(
        name="imagenet32", fine_classes=[f"imagenet1k-{i:03d}" for i in range(NUM_CLASSES)],
        coarse_classes=list(COARSE_CLASSES), fine_to_coarse=fine_to_coarse, image_format="png",
        image_size=(32, 32), channels=3,
        splits={split: ArraySplit(_load, (paths[split], tuple(to_fine), tuple(fine_to_coarse)), None,
                                  key_width=KEY_WIDTH[split], channels_first=True)
                for split in FILES},
        notes={"source": str(src), "files": {split: [Path(p).relative_to(src).as_posix() for p in ps]
                                             for split, ps in paths.items()},
               "keys": "zero-padded index in the split (train: batches 1..10 in order)",
               "labels": "fine = imagenet32_to_fine.json[file label - 1] (ImageNet-1k index), "
                         "coarse = imagenet_fine_to_coarse.json[fine]"},
    )

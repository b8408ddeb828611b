"""The bundled default: scikit-learn's handwritten digits (1,797 real 8 x 8 grey images, 10 classes).

- split: a fixed stratified split, 80 % train / 20 % test (sklearn train_test_split, random_state=0).
- pixels: load_digits stores 0..16 per pixel; we store round(v * 255 / 16) (round half to even) as an
  8 x 8 grey lossless PNG, so 0 -> 0 and 16 -> 255.
- coarse: the 10 digits in 2 coarse classes of 5, {0, 1, 2, 3, 4} and {5, 6, 7, 8, 9}; like the paper's
  CIFAR-toy, each coarse class holds visually unrelated fine classes, so coarse labels hide the fine ones.
- keys: the zero-padded index in load_digits order (4 digits).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from maskcon.datasets.source import ArraySplit, DatasetSource
from maskcon.errors import UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
FINE_TO_COARSE = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def _split_indices() -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    target = _digits()[1]
    train, test = train_test_split(np.arange(len(target)), test_size=TEST_FRACTION, stratify=target,
                                   random_state=SPLIT_SEED)
    return {"train": np.sort(train), "test": np.sort(test)}


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)  # N x 8 x 8, 0..16 -> 0..255
    return pixels, bunch.target.astype(np.int64)


def _load(split: str):
    pixels, target = _digits()
    index = _split_indices()[split]
    fine = target[index]
    return pixels[index], fine, np.asarray(FINE_TO_COARSE, dtype=np.int64)[fine], index


def read(src: Path | None = None) -> DatasetSource:
    if src is not None:
        raise UserError("digits is bundled with scikit-learn and takes no --src; leave --src out")
    sizes = {name: len(index) for name, index in _split_indices().items()}
    return DatasetSource(
        name="digits",
        fine_classes=[str(d) for d in range(10)],
        coarse_classes=["0-4", "5-9"],
        fine_to_coarse=list(FINE_TO_COARSE),
        image_format="png",
        image_size=(8, 8),
        channels=1,
        splits={name: ArraySplit(_load, (name,), n, key_width=4) for name, n in sizes.items()},
        notes={"source": "sklearn.datasets.load_digits",
               "pixels": "round(v * 255 / 16), round half to even, of load_digits values 0..16",
               "split": f"stratified train_test_split(test_size={TEST_FRACTION}, random_state={SPLIT_SEED})",
               "keys": "zero-padded index in load_digits order"},
    )

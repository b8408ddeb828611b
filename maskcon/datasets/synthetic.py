"""Synthetic shard folders of any size, written with the shard writer from functions of the sample position:
for the benchmarks on machines without the real data, and for the tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maskcon.errors import UserError


def _encode(pixels: np.ndarray, image_format: str) -> np.ndarray | bytes:
    """What the shard writer takes as one image: the pixels for PNG (it encodes them losslessly), the
    file bytes for JPEG (PIL, quality 95)."""
    from PIL import Image

    if image_format == "png":
        return pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_synthetic_shards(out: Path | str, *, num_train: int, num_test: int, image: Callable[[int], np.ndarray],
                           labels: Callable[[int], tuple[int, int]], num_fine: int, num_coarse: int,
                           image_format: str = "png", image_size: tuple[int, int] | None = (32, 32),
                           samples_per_shard: int = 1000, dataset: str = "cifar100",
                           test_image: Callable[[int], np.ndarray] | None = None) -> Path:
    """Write a shard folder with maskcon.shards' writer from functions of the sample position, samples in
    position order (keys: the position, 8 digits); replaces whatever shards OUT held. Returns OUT.

    image(position) -> uint8 H x W x 3 array; labels(position) -> (fine, coarse). The test split uses
    test_image (default: image) and the same labels function. The manifest's fine -> coarse map is what
    `labels` gives, and fine * num_coarse // num_fine for fine classes no sample has.
    """
    from maskcon.datasets.source import DatasetSource, FunctionSplit
    from maskcon.shards import write_shards

    images = {"train": image, "test": test_image or image}
    splits = {name: FunctionSplit(count, lambda position, pixels=images[name]: _encode(pixels(position), image_format),
                                  labels)
              for name, count in (("train", num_train), ("test", num_test))}
    fine_to_coarse = [fine * num_coarse // num_fine for fine in range(num_fine)]
    given: dict[int, int] = {}
    for count in (num_train, num_test):
        for position in range(count):
            fine, coarse = labels(position)
            if given.setdefault(fine, coarse) != coarse:
                raise ValueError(f"labels() puts fine class {fine} in coarse classes {given[fine]} and {coarse}")
            fine_to_coarse[fine] = coarse
    source = DatasetSource(name=dataset, fine_classes=[str(i) for i in range(num_fine)],
                           coarse_classes=[str(i) for i in range(num_coarse)], fine_to_coarse=fine_to_coarse,
                           image_format=image_format, image_size=tuple(image_size) if image_size else None, channels=3,
                           splits=splits, notes={"synthetic": "images and labels are functions of the position"})
    write_shards(source, out, seed=None, samples_per_shard=samples_per_shard, workers=1, overwrite=True)
    return Path(out)


def cifar_like_image(position: int) -> np.ndarray:
    """A 32x32 RGB image with smooth structure and noise, so PNGs are about CIFAR-sized (~2-3 kB)."""
    rng = np.random.default_rng(position)
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    frequency = rng.uniform(0.1, 0.5, size=3)
    channels = [127 + 80 * np.sin(frequency[c] * (x + y * (c - 1)) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(32, 32, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_synthetic_imagenet32(folder: Path, *, num_train: int, num_test: int) -> Path:
    """ImageNet32-format shards of synthetic 32x32 images: 1,000 fine classes in 12 coarse ones.

    The images are cifar_like_image (smooth structure plus noise, CIFAR-sized PNGs).
    """
    if num_train < 1:
        raise UserError(f"--synthetic must be at least 1, got {num_train}")
    num_fine, num_coarse = 1000, 12

    def labels(position: int) -> tuple[int, int]:
        fine = position % num_fine
        return fine, fine * num_coarse // num_fine  # the manifest's fine_to_coarse

    return write_synthetic_shards(folder, num_train=num_train, num_test=num_test, image=cifar_like_image,
                                  labels=labels, num_fine=num_fine, num_coarse=num_coarse, dataset="imagenet32",
                                  samples_per_shard=5000)

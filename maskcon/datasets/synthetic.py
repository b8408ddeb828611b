"""Synthetic data of any size, for the benchmarks on machines without the real data and for the tests: shard
folders written with the shard writer from functions of the sample position, and sources in the original
formats (downsampled ImageNet's pickles; an image folder of JPEG photos) for the converters."""

from __future__ import annotations

import io
import json
import pickle
import shutil
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


def photo_crops(count: int, seed: int) -> np.ndarray:
    """count x 32 x 32 x 3 uint8: random crops of sklearn's sample photos, box-downsampled to 32 x 32."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    pyramids = []  # each photo at several scales, so a 32 x 32 crop covers 64..320 source pixels
    for photo in load_sample_images().images:
        image = Image.fromarray(photo)
        for factor in (2, 3, 4, 6, 8, 10):
            size = (image.width // factor, image.height // factor)
            pyramids.append(np.asarray(image.resize(size, Image.BOX, reducing_gap=None)))
    crops = np.empty((count, 32, 32, 3), dtype=np.uint8)
    choice = rng.integers(0, len(pyramids), count)
    flips = rng.integers(0, 2, count)
    for i in range(count):
        level = pyramids[choice[i]]
        y = int(rng.integers(0, level.shape[0] - 31))
        x = int(rng.integers(0, level.shape[1] - 31))
        crop = level[y:y + 32, x:x + 32]
        crops[i] = crop[:, ::-1] if flips[i] else crop
    return crops


def write_imagenet32_source(src: Path | str, train_images: int, val_images: int, seed: int = 0) -> None:
    """A folder in the exact downsampled-ImageNet format (pickled `train_data_batch_1..10` and `val_data`, rows
    of 3,072 channel-planar bytes, 1-based labels) with the two MaskCon mapping files; its images are
    photo_crops. Kept when it already holds what is asked (`complete.json`)."""
    src = Path(src)
    marker = src / "complete.json"
    wanted = {"train_images": train_images, "val_images": val_images, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    (src / "imagenet32_to_fine.json").write_text(json.dumps({str(i): int(j) for i, j in
                                                             enumerate(rng.permutation(1000))}))
    (src / "imagenet_fine_to_coarse.json").write_text(json.dumps({str(i): i % 12 for i in range(1000)}))
    per_batch = -(-train_images // 10)
    batches = [(f"train_data_batch_{k + 1}", min(per_batch, train_images - k * per_batch)) for k in range(10)]
    for number, (name, count) in enumerate(batches + [("val_data", val_images)]):
        images = photo_crops(count, seed=seed * 100 + number)
        content = {"data": images.transpose(0, 3, 1, 2).reshape(count, -1),
                   "labels": rng.integers(1, 1001, count).tolist()}
        with open(src / name, "wb") as handle:
            pickle.dump(content, handle, protocol=4)
    marker.write_text(json.dumps(wanted))


def write_jpeg_folder(dest: str, train: int, test: int, side: int) -> None:
    """A `folder`-format source of JPEG photos: crops of scikit-learn's two sample photos at random scales,
    resized to side x side px, JPEG quality 90; image i is of fine class i mod 100 (coarse: fine // 10), and
    the classes that get an image are listed. Written by every core."""
    from multiprocessing import Pool

    from maskcon import usable_cpus

    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), split, index, side) for split, count in (("train", train), ("test", test))
            for index in range(count)]
    used = sorted({index % 100 for _, _, index, _ in jobs})     # a class is listed, and has a folder, with images
    (root / "fine_to_coarse.csv").write_text("fine,coarse\n" + "".join(f"f{k:03d},c{k // 10}\n" for k in used))
    for _, split, index, _ in jobs:
        (root / split / f"f{index % 100:03d}").mkdir(parents=True, exist_ok=True)
    with Pool(min(16, usable_cpus())) as pool:
        pool.map(_write_jpeg, jobs, chunksize=32)


def _write_jpeg(job: tuple[str, str, int, int]) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root, split, index, side = job
    photo = Image.fromarray(load_sample_images().images[index % 2])
    rng = np.random.default_rng(index + (0 if split == "train" else 1_000_000))
    crop = int(rng.integers(side // 2, min(photo.size)))
    left, top = int(rng.integers(0, photo.width - crop)), int(rng.integers(0, photo.height - crop))
    image = photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.BILINEAR)
    image.save(Path(root) / split / f"f{index % 100:03d}" / f"{index:07d}.jpg", quality=90)

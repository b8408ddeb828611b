"""Small synthetic sources in each exact original on-disk format, with what each sample must become.

Each writer creates the files a user would download (pickles, .npz, .mat annotations, JPEG folders, split
JSONs, a CSV) under a folder and returns `expected`: {split: {key: (image, fine, coarse)}} where image is
an H x W x C / H x W uint8 array (for PNG sources) or the file's bytes (for JPEG sources).
"""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def planar(images: np.ndarray) -> np.ndarray:
    """N x 32 x 32 x 3 -> rows of 3,072 bytes, channel-planar, as CIFAR and downsampled ImageNet store them."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1).copy()


def jpeg_bytes(rng: np.random.Generator, size=(24, 32), grey=False) -> bytes:
    shape = size if grey else (*size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _dump(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=2)


# --------------------------------------------------------------------------------------------- CIFAR


def write_cifar100(root: Path, seed: int = 0, n_train: int = 200, n_test: int = 120) -> dict:
    """root/cifar-100-python/{train,test,meta}; coarse of fine class f is f // 5."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    expected = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        fine = [(i * 7 + (split == "test")) % 100 for i in range(n)]
        coarse = [f // 5 for f in fine]
        _dump(folder / split, {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
                               "fine_labels": fine, "coarse_labels": coarse, "data": planar(images)})
        expected[split] = {f"{i:05d}": (images[i], fine[i], coarse[i]) for i in range(n)}
    _dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return expected


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, seed: int = 0, per_batch: int = 30, n_test: int = 40) -> dict:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns CIFAR-10 labels per key."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    expected = {"train": {}, "test": {}}
    batches = [(f"data_batch_{k}", "train", per_batch) for k in range(1, 6)] + [("test_batch", "test", n_test)]
    offset = {"train": 0, "test": 0}
    for name, split, n in batches:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        _dump(folder / name, {"batch_label": name, "labels": labels, "data": planar(images),
                              "filenames": [f"{name}_{i}.png" for i in range(n)]})
        for i in range(n):
            expected[split][f"{offset[split] + i:05d}"] = (images[i], labels[i])
        offset[split] += n
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch,
                                    "num_vis": 3072})
    return expected


# ---------------------------------------------------------------------------------------- ImageNet32


def imagenet32_maps(seed: int = 0) -> tuple[dict, dict]:
    """Synthetic stand-ins for the official mapping files: a permutation of 0..999 and a 12-way grouping."""
    permutation = np.random.default_rng(seed).permutation(1000)
    to_fine = {str(i): int(permutation[i]) for i in range(1000)}
    fine_to_coarse = {str(i): i % 12 for i in range(1000)}
    return to_fine, fine_to_coarse


def write_imagenet32(root: Path, *, layout: str = "flat", file_format: str = "pickle", seed: int = 0,
                     per_batch: int = 6, n_val: int = 20, maps: tuple[dict, dict] | None = None) -> dict:
    """train_data_batch_1..10 and val_data (pickled or .npz), flat or in Imagenet32_train/ and Imagenet32_val/."""
    rng = np.random.default_rng(seed)
    to_fine, fine_to_coarse = maps or imagenet32_maps(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "imagenet32_to_fine.json").write_text(json.dumps(to_fine))
    (root / "imagenet_fine_to_coarse.json").write_text(json.dumps(fine_to_coarse))
    expected = {"train": {}, "test": {}}
    batches = [(f"train_data_batch_{k}", "train", per_batch) for k in range(1, 11)] + [("val_data", "test", n_val)]
    offset = {"train": 0, "test": 0}
    for name, split, n in batches:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(1, 1001, n).tolist()  # 1-based, as in the release
        folder = root if layout == "flat" else root / ("Imagenet32_train" if split == "train" else "Imagenet32_val")
        folder.mkdir(parents=True, exist_ok=True)
        content = {"data": planar(images), "labels": labels}
        if split == "train":
            content["mean"] = planar(images).mean(axis=0)
        if file_format == "npz":
            np.savez(folder / f"{name}.npz", **content)
        else:
            _dump(folder / name, content)
        for i in range(n):
            fine = to_fine[str(labels[i] - 1)]
            expected[split][f"{offset[split] + i:0{7 if split == 'train' else 5}d}"] = (
                images[i], fine, fine_to_coarse[str(fine)])
        offset[split] += n
    return expected


# ------------------------------------------------------------------------------------------------ SOP

SOP_SUPER = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa", "stapler",
             "table", "toaster"]


def write_sop(root: Path, seed: int = 0, products_per_class: int = 2, images_per_product: int = 4) -> dict:
    """root/Stanford_Online_Products with JPEG folders, Ebay_info.txt and the sop_split1/2 JSON lists.

    split1: train and test hold different products, each numbered from 0; split2: the same products in
    both, the last image of each product in test. Returns {variant: {split: {key: (bytes, fine, coarse)}}}
    with fine in the converter's numbering (split1 test offset by the number of train products).
    """
    rng = np.random.default_rng(seed)
    folder = root / "Stanford_Online_Products"
    products = []  # (relative paths, coarse)
    for coarse, super_class in enumerate(SOP_SUPER[:3]):
        for p in range(products_per_class * 2):
            item_id = 100000000000 + 1000 * coarse + p
            paths = []
            for k in range(images_per_product):
                path = f"{super_class}_final/{item_id}_{k}.JPG"
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(jpeg_bytes(rng, grey=(k == 1)))
                paths.append(path)
            products.append((paths, coarse))
    (folder / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    expected = {}
    train_products, test_products = products[0::2], products[1::2]

    def write_split(variant: str, split: str, rows: list[tuple[str, int, int]]) -> None:
        split_dir = folder / f"sop_{variant}"
        split_dir.mkdir(exist_ok=True)
        (split_dir / f"{split}_path.json").write_text(json.dumps([r[0] for r in rows]))
        (split_dir / f"{split}_fine_label.json").write_text(json.dumps([r[1] for r in rows]))
        (split_dir / f"{split}_coarse_label.json").write_text(json.dumps([r[2] for r in rows]))

    def key(path: str) -> str:
        return path.replace("/", "_").replace(".", "_")

    expected["split1"] = {}
    for split, chosen, offset in (("train", train_products, 0), ("test", test_products, len(train_products))):
        rows = [(path, label, coarse) for label, (paths, coarse) in enumerate(chosen) for path in paths]
        write_split("split1", split, rows)
        expected["split1"][split] = {key(p): ((folder / p).read_bytes(), f + offset, c) for p, f, c in rows}
    expected["split2"] = {}
    for split, pick in (("train", slice(0, -1)), ("test", slice(-1, None))):
        rows = [(path, label, coarse) for label, (paths, coarse) in enumerate(products) for path in paths[pick]]
        write_split("split2", split, rows)
        expected["split2"][split] = {key(p): ((folder / p).read_bytes(), f, c) for p, f, c in rows}
    return expected


# ----------------------------------------------------------------------------------------------- Cars

CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Type-S 2008",
             "Chevrolet Silverado 1500 Extended Cab 2012", "BMW 6 Series Convertible 2007",
             "Rolls-Royce Phantom Drophead Coupe Convertible 2012", "Audi TT Hatchback 2011",
             "Ford E-Series Wagon Van 2012", "Ram C/V Cargo Van Minivan 2012", "Ford Ranger SuperCab 2011",
             "Infiniti G Coupe IPL 2012"]
CAR_COARSE = [2, 1, 1, 0, 3, 3, 5, 6, 7, 0, 4]  # by hand, from the names (Table 2's E-Series: Wagon)


def _annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
              ("fname", "O")]
    array = np.zeros((1, len(rows)), dtype=fields)
    for i, (file_name, label) in enumerate(rows):
        array[0, i] = (np.uint8(1), np.uint8(2), np.uint16(20), np.uint16(15), np.uint8(label), file_name)
    return array


def write_cars(root: Path, seed: int = 0, n_train: int = 22, n_test: int = 15) -> dict:
    """root/stanford_cars in torchvision's StanfordCars layout, with .mat files as scipy.io.savemat writes them."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = root / "stanford_cars"
    (folder / "devkit").mkdir(parents=True)
    class_names = np.empty((1, len(CAR_NAMES)), dtype=object)
    class_names[0, :] = CAR_NAMES
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": class_names})
    expected = {}
    for split, n, mat in (("train", n_train, folder / "devkit" / "cars_train_annos.mat"),
                          ("test", n_test, folder / "cars_test_annos_withlabels.mat")):
        image_dir = folder / f"cars_{split}"
        image_dir.mkdir()
        rows, expected[split] = [], {}
        for i in range(n):
            file_name = f"{i + 1:05d}.jpg"
            data = jpeg_bytes(rng, size=(20 + i, 30), grey=(i % 5 == 0))
            (image_dir / file_name).write_bytes(data)
            label = (i * 3) % len(CAR_NAMES) + 1  # 1-based, as in the devkit
            rows.append((file_name, label))
            expected[split][f"cars_{split}_{i + 1:05d}_jpg"] = (data, label - 1, CAR_COARSE[label - 1])
        scipy.io.savemat(mat, {"annotations": _annotations(rows)})
    return expected


# --------------------------------------------------------------------------------------------- folder


def write_folder(root: Path, seed: int = 0, per_class: int = 3, file_format: str = "jpg") -> dict:
    """root/fine_to_coarse.csv plus root/{train,test}/<class>/ image files."""
    rng = np.random.default_rng(seed)
    pairs = [("beagle", "dog"), ("persian", "cat"), ("poodle", "dog"), ("siamese", "cat"), ("boxer", "dog")]
    root.mkdir(parents=True, exist_ok=True)
    (root / "fine_to_coarse.csv").write_text("fine,coarse\n" + "".join(f"{f},{c}\n" for f, c in pairs))
    coarse_names = ["dog", "cat"]
    expected = {}
    for split in ("train", "test"):
        expected[split] = {}
        for fine, (name, coarse) in enumerate(pairs):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class + (split == "train")):
                if file_format == "jpg":
                    data = jpeg_bytes(rng)
                else:
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buffer, format="PNG")
                    data = buffer.getvalue()
                (root / split / name / f"img.{i}.{file_format}").write_bytes(data)
                key = f"{split}_{name}_img_{i}_{file_format}"
                expected[split][key] = (data, fine, coarse_names.index(coarse))
    return expected

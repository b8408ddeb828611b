"""Stanford Online Products with MaskCon's two splits (sop_split1, sop_split2).

SRC is the `Stanford_Online_Products` folder (or the folder holding it) into which the user copied the
official split folders `sop_split1/` and `sop_split2/`, each with `{train,test}_path.json` (image paths
relative to the SOP folder), `{train,test}_coarse_label.json` (12 super-classes, the order of
Ebay_info.txt) and `{train,test}_fine_label.json` (product ids renumbered from 0 per file).

Fine labels: the official file's labels, in one class list for both splits. A product is named by its
folder and the eBay item id that starts its file names (`bicycle_final/111375616144`). In sop_split2 the
test products are the train products with the same numbering, so fine labels equal the files'; in
sop_split1 the test products are others, so test fine labels are the file's plus the number of train
products. Images: the original JPEG files byte for byte; keys: the relative path made key-safe.
"""
from __future__ import annotations

import functools
from pathlib import Path

from maskcon.datasets.source import DatasetSource, FileSplit, find_folder, load_json, source_folder
from maskcon.errors import UserError

WHERE_SOP = ("download Stanford_Online_Products.zip from https://cvgl.stanford.edu/projects/lifted_struct/, "
             "extract it and pass the Stanford_Online_Products folder as --src")
COARSE_CLASSES = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa",
                  "stapler", "table", "toaster"]  # the order of Ebay_info.txt


def _where_split(variant: str) -> str:
    return (f"copy the folder sop_{variant} of the official MaskCon release (https://github.com/MrChenFeng/"
            f"MaskCon_CVPR2023, coarse_labels/sop_{variant}) into the Stanford_Online_Products folder")


def _product(path: str) -> str:
    """bicycle_final/111375616144_0.JPG -> bicycle_final/111375616144"""
    folder, _, file_name = path.rpartition("/")
    return f"{folder}/{file_name.rsplit('_', 1)[0]}"


def product_classes(lists: dict[str, tuple[list[str], list[int], list[int]]], split_dir: Path, where_split: str):
    """One class list for both splits: products in the order of their official labels, train first.

    lists: {split: (paths, official fine labels, coarse labels)}. Returns (product names, coarse class of
    each product, {split: fine label of each image}).
    """
    products: list[str] = []
    product_coarse: list[int] = []
    index_of: dict[str, int] = {}
    fine_by_split = {}
    for split, (paths, fine, coarse) in lists.items():
        official_to_product: dict[int, str] = {}
        for path, label, coarse_label in sorted(zip(paths, fine, coarse), key=lambda row: row[1]):
            product = _product(path)
            if official_to_product.setdefault(label, product) != product:
                raise UserError(f"{split_dir / f'{split}_fine_label.json'} gives two products label {label}; "
                                f"{where_split}")
            if product not in index_of:
                index_of[product] = len(products)
                products.append(product)
                product_coarse.append(coarse_label)
            elif product_coarse[index_of[product]] != coarse_label:
                raise UserError(f"{split_dir} gives product {product} two coarse labels; {where_split}")
        fine_by_split[split] = [index_of[_product(path)] for path in paths]
    return products, product_coarse, fine_by_split


def read(src: Path | None, variant: str, labels: Path | None = None) -> DatasetSource:
    """labels: a folder holding the official `sop_splitN/` label folder (default: the SOP folder)."""
    name = f"sop_{variant}"
    where_split = _where_split(variant)
    src = source_folder(src, name, WHERE_SOP)
    if labels is None:
        root = find_folder(src, "Stanford_Online_Products", name, f"{where_split}; {WHERE_SOP}")
        split_dir = root / name
    else:
        root = find_folder(src, "Stanford_Online_Products", "Ebay_info.txt", WHERE_SOP)
        split_dir = source_folder(labels, name, where_split) / name
    lists = {}
    for split in ("train", "test"):
        paths = load_json(split_dir / f"{split}_path.json", where_split)
        fine = load_json(split_dir / f"{split}_fine_label.json", where_split)
        coarse = load_json(split_dir / f"{split}_coarse_label.json", where_split)
        if not (isinstance(paths, list) and isinstance(fine, list) and isinstance(coarse, list)
                and len(paths) == len(fine) == len(coarse) and all(isinstance(p, str) for p in paths)
                and all(isinstance(v, int) for v in fine + coarse)):
            raise UserError(f"{split_dir} holds {split} lists that are not paths and labels of equal length; "
                            f"{where_split}")
        if any(not 0 <= c < len(COARSE_CLASSES) for c in coarse):
            raise UserError(f"{split_dir / f'{split}_coarse_label.json'} holds labels outside 0..11; {where_split}")
        lists[split] = (paths, fine, coarse)

    products, product_coarse, fine_by_split = product_classes(lists, split_dir, where_split)
    missing = [path for paths, _, _ in lists.values() for path in paths if not (root / path).is_file()]
    if missing:
        raise UserError(f"{len(missing)} images listed in {split_dir} are missing from {root}, e.g. {missing[0]}; "
                        f"{WHERE_SOP}")
    return DatasetSource(
        name=name, fine_classes=products, coarse_classes=list(COARSE_CLASSES), fine_to_coarse=product_coarse,
        image_format="jpg", image_size=None, channels=3,
        splits={split: FileSplit(root, lists[split][0], fine_by_split[split], lists[split][2])
                for split in lists},
        notes={"source": str(root), "keys": "image path relative to the SOP folder, made key-safe",
               "labels": f"official {name} files; fine classes are products (folder/eBay id), train first"},
    )


read_split1 = functools.partial(read, variant="split1")
read_split2 = functools.partial(read, variant="split2")

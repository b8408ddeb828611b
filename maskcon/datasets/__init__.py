"""One reader per original dataset format; each returns a `DatasetSource` (see source.py).

DATASETS maps a dataset name to its reader: `DATASETS[name](src) -> DatasetSource`, where `src` is the
folder the user downloaded (None for the bundled digits). Readers check the source and raise UserError
(one line: what is missing and where to get it); pixels are read lazily, when shards are written.
"""
from __future__ import annotations

from typing import Callable

from maskcon.datasets import cars196, cifar100, cifartoy, digits, folder, imagenet32, sop
from maskcon.datasets.source import ArraySplit, DatasetSource, FileSplit, Sample, Split

DATASETS: dict[str, Callable] = {
    "digits": digits.read,
    "cifar100": cifar100.read,
    "cifartoy_good": cifartoy.read_good,
    "cifartoy_bad": cifartoy.read_bad,
    "imagenet32": imagenet32.read,
    "sop_split1": sop.read_split1,
    "sop_split2": sop.read_split2,
    "cars196": cars196.read,
    "folder": folder.read,
}

__all__ = ["DATASETS", "ArraySplit", "DatasetSource", "FileSplit", "Sample", "Split"]

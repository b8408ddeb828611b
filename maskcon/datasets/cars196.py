"""Stanford Cars (196 models) with the supplement's 8 body types as coarse classes.

SRC is the `stanford_cars` folder that torchvision's StanfordCars reads (or the folder holding it):
devkit/cars_meta.mat (class_names), devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat (also
accepted in devkit/), cars_train/ and cars_test/ with the JPEG files. Fine label = annotation class - 1.

Coarse = body type (0 Cab, 1 Sedan, 2 SUV, 3 Convertible, 4 Coupe, 5 Hatchback, 6 Wagon, 7 Van): the last
body-type word of the class name (Crew/Regular/Extended/Quad/Club Cab and SuperCab -> Cab, Minivan -> Van),
and explicit assignments for the 14 names that carry no body type. "Ford E-Series Wagon Van 2012" is a
Wagon, so the counts per coarse class are those of supplement Table 2: 18, 50, 36, 30, 29, 14, 7, 12.
(The official code's table makes it a Van: 6 wagons, 13 vans.)
Images: the original JPEG files byte for byte; keys: the path relative to SRC made key-safe.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from maskcon.datasets.source import DatasetSource, FileSplit, find_folder, source_folder
from maskcon.errors import UserError

WHERE = ("get Stanford Cars in the layout torchvision's StanfordCars reads (stanford_cars/ with devkit/, "
         "cars_train/, cars_test/ and cars_test_annos_withlabels.mat; see https://pytorch.org/vision/stable/"
         "generated/torchvision.datasets.StanfordCars.html) and pass that folder as --src")
COARSE_CLASSES = ["Cab", "Sedan", "SUV", "Convertible", "Coupe", "Hatchback", "Wagon", "Van"]
BODY_WORDS = {"Cab": 0, "SuperCab": 0, "Sedan": 1, "SUV": 2, "Convertible": 3, "Coupe": 4, "Hatchback": 5,
              "Wagon": 6, "Van": 7, "Minivan": 7}
# the 14 names that carry no body-type word, by the body of that model, and the one Table 2 override
EXPLICIT = {
    "Acura TL Type-S 2008": "Sedan",
    "Acura Integra Type R 2001": "Coupe",
    "Buick Regal GS 2012": "Sedan",
    "Chevrolet Corvette ZR1 2012": "Convertible",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007": "Convertible",
    "Chevrolet HHR SS 2010": "SUV",
    "Chevrolet Cobalt SS 2010": "Coupe",
    "Chevrolet TrailBlazer SS 2009": "SUV",
    "Chrysler 300 SRT-8 2010": "Sedan",
    "Dodge Challenger SRT8 2011": "Coupe",
    "Dodge Charger SRT-8 2009": "Sedan",
    "FIAT 500 Abarth 2012": "Hatchback",
    "Jaguar XK XKR 2012": "Convertible",
    "Lamborghini Gallardo LP 570-4 Superleggera 2012": "Convertible",
    "Ford E-Series Wagon Van 2012": "Wagon",  # supplement Table 2 (the official code's table says Van)
}


def body_type(class_name: str) -> int:
    """Coarse class (0..7) of a Stanford Cars class name."""
    name = " ".join(class_name.split())
    if name in EXPLICIT:
        return COARSE_CLASSES.index(EXPLICIT[name])
    types = [BODY_WORDS[word] for word in name.split() if word in BODY_WORDS]
    if not types:
        raise UserError(f"cannot tell the body type of the car class {class_name!r}; is this the Stanford "
                        f"Cars devkit? {WHERE}")
    return types[-1]


def _loadmat(path: Path):
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except FileNotFoundError:
        raise UserError(f"missing {path}; {WHERE}") from None
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError):
        raise UserError(f"{path} is not a MATLAB .mat file of the Stanford Cars devkit; {WHERE}") from None


def _annotations(path: Path, num_classes: int) -> tuple[list[str], list[int]]:
    content = _loadmat(path)
    try:
        annotations = np.atleast_1d(content["annotations"])
        files = [str(a["fname"]) for a in annotations]
        fine = [int(a["class"]) - 1 for a in annotations]  # the devkit counts classes from 1
    except (KeyError, ValueError, IndexError, TypeError):
        raise UserError(f"{path} lacks annotations with fname and class; {WHERE}") from None
    if any(not 0 <= f < num_classes for f in fine):
        raise UserError(f"{path} holds classes outside 1..{num_classes}; {WHERE}")
    return files, fine


def read(src: Path | None) -> DatasetSource:
    root = find_folder(source_folder(src, "cars196", WHERE), "stanford_cars", "devkit/cars_meta.mat", WHERE)
    meta = _loadmat(root / "devkit" / "cars_meta.mat")
    if "class_names" not in meta:
        raise UserError(f"{root / 'devkit' / 'cars_meta.mat'} lacks class_names; {WHERE}")
    fine_classes = [str(name) for name in np.atleast_1d(meta["class_names"]).tolist()]
    fine_to_coarse = [body_type(name) for name in fine_classes]
    test_annos = root / "cars_test_annos_withlabels.mat"
    if not test_annos.exists() and (root / "devkit" / test_annos.name).exists():
        test_annos = root / "devkit" / test_annos.name
    sources = {"train": (root / "devkit" / "cars_train_annos.mat", "cars_train"), "test": (test_annos, "cars_test")}
    splits = {}
    for split, (annotations_path, image_folder) in sources.items():
        files, fine = _annotations(annotations_path, len(fine_classes))
        paths = [f"{image_folder}/{file_name}" for file_name in files]
        missing = [path for path in paths if not (root / path).is_file()]
        if missing:
            raise UserError(f"{len(missing)} images listed in {annotations_path.name} are missing from {root}, "
                            f"e.g. {missing[0]}; {WHERE}")
        splits[split] = FileSplit(root, paths, fine, [fine_to_coarse[f] for f in fine])
    return DatasetSource(
        name="cars196", fine_classes=fine_classes, coarse_classes=list(COARSE_CLASSES),
        fine_to_coarse=fine_to_coarse, image_format="jpg", image_size=None, channels=3, splits=splits,
        notes={"source": str(root), "keys": "image path relative to the stanford_cars folder, made key-safe",
               "labels": "fine = devkit class - 1; coarse = body type from the class name (supplement Table 2)"},
    )

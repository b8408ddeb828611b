"""Your own data: a class-per-folder image tree plus a CSV that maps each fine class to a coarse class.

    SRC/fine_to_coarse.csv     header `fine,coarse`, one row per fine class (a folder name), e.g. `beagle,dog`
    SRC/train/<fine class>/*.jpg
    SRC/test/<fine class>/*.jpg

Fine classes are numbered in the CSV's row order, coarse classes in the order they first appear in it.
Images are JPEG (.jpg/.jpeg) or PNG (.png) files, all of one kind, passed through byte for byte (hidden files and
the file browsers' Thumbs.db and desktop.ini are skipped); keys are
the paths relative to SRC made key-safe (`train/beagle/001.jpg` -> `train_beagle_001_jpg`).
"""
from __future__ import annotations

import csv
import difflib
from pathlib import Path

from maskcon.datasets.source import DatasetSource, FileSplit, source_folder
from maskcon.errors import UserError
from maskcon.shard_format import IMAGE_SUFFIXES

CSV_NAME = "fine_to_coarse.csv"
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}   # written by file browsers (as are dot-files): not images, skipped
WHERE = (f"make SRC hold {CSV_NAME} (header fine,coarse) and train/<class>/ and test/<class>/ image folders")


def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:     # a BOM, as spreadsheets write, is skipped
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise UserError(f"missing {path}; {WHERE}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read {path} ({error}); {WHERE}") from None
    rows = [[cell.strip() for cell in row] for row in rows if any(cell.strip() for cell in row)]
    if not rows or rows[0][:2] != ["fine", "coarse"]:
        raise UserError(f"{path} must start with the header fine,coarse; {WHERE}")
    pairs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0] or not row[1]:
            raise UserError(f"{path} line {number} is not `fine class,coarse class`; {WHERE}")
        pairs.append((row[0], row[1]))
    fine_names = [fine for fine, _ in pairs]
    if len(set(fine_names)) != len(fine_names):
        duplicate = next(name for name in fine_names if fine_names.count(name) > 1)
        raise UserError(f"{path} lists the fine class {duplicate!r} twice; give each fine class one row")
    return pairs


def _class_files(src: Path, fine_classes: list[str]) -> dict[str, dict[Path, list[Path]]]:
    """{split: {class folder: its files}} of train/ and test/, read once (hidden and system files left out),
    after checking that they hold one folder per fine class of the map and nothing but images in them; UserError
    naming what is not (a folder the map lacks, with the map's row that may be its misspelling; every file that
    is no image)."""
    found: dict[str, dict[Path, list[Path]]] = {}
    for split in ("train", "test"):
        split_dir = src / split
        if not split_dir.is_dir():
            raise UserError(f"missing the folder {split_dir}; {WHERE}")
        found[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if not p.name.startswith(".")):
            if not class_dir.is_dir() and class_dir.name.lower() not in SYSTEM_FILES:
                raise UserError(f"{class_dir} is a file; {split_dir} must hold one folder per fine class")
            if class_dir.is_dir():
                found[split][class_dir] = sorted(p for p in class_dir.rglob("*") if p.is_file() and not
                                                 p.name.startswith(".") and p.name.lower() not in SYSTEM_FILES)
    folders = [class_dir for split in found.values() for class_dir in split]
    names = {folder.name for folder in folders}
    for class_dir in folders:
        if class_dir.name not in fine_classes:
            rowless = [name for name in fine_classes if name not in names]
            close = difflib.get_close_matches(class_dir.name, rowless, n=1)
            fix = (f"its row may be {close[0]!r}, which has no folder: correct that row to {class_dir.name}" if close
                   else f"add a row {class_dir.name},<coarse class>")
            raise UserError(f"the class folder {class_dir} is not listed in {src / CSV_NAME}; {fix}")
    strangers = [path.relative_to(src).as_posix() for split in found.values() for files in split.values()
                 for path in files if path.suffix.lower() not in IMAGE_SUFFIXES]
    if strangers:
        more = f" (and {len(strangers) - 3} more)" if len(strangers) > 3 else ""
        raise UserError(f"{len(strangers)} file(s) under {src} are neither JPEG (.jpg, .jpeg) nor PNG (.png): "
                        f"{', '.join(strangers[:3])}{more}; convert them or move them out of SRC")
    return found


def read(src: Path | None) -> DatasetSource:
    src = source_folder(src, "folder", WHERE)
    pairs = _read_csv(src / CSV_NAME)
    fine_classes = [fine for fine, _ in pairs]
    coarse_classes = list(dict.fromkeys(coarse for _, coarse in pairs))
    fine_to_coarse = [coarse_classes.index(coarse) for _, coarse in pairs]
    fine_index = {name: i for i, name in enumerate(fine_classes)}
    formats: dict[str, list[str]] = {}      # format -> the files of it
    splits = {}
    for split, class_folders in _class_files(src, fine_classes).items():
        split_dir = src / split
        paths, fine = [], []
        for class_dir, images in class_folders.items():
            if not images:
                raise UserError(f"the class folder {class_dir} holds no images; add them, or remove the folder")
            for image in images:
                kind = IMAGE_SUFFIXES[image.suffix.lower()]
                formats.setdefault(kind, []).append(image.relative_to(src).as_posix())
                paths.append(image.relative_to(src).as_posix())
                fine.append(fine_index[class_dir.name])
        if not paths:
            raise UserError(f"{split_dir} holds no images; {WHERE}")
        splits[split] = FileSplit(src, paths, fine, [fine_to_coarse[f] for f in fine])
    if len(formats) > 1:
        counts = ", ".join(f"{len(files)} {kind.upper()} (e.g. {files[0]})" for kind, files in sorted(formats.items()))
        raise UserError(f"{src} mixes JPEG and PNG images: {counts}; convert them to one format (files pass "
                        "through unchanged, so one format per dataset)")
    seen = {label for split in splits.values() for label in split.fine}
    unused = [name for name in fine_classes if fine_index[name] not in seen]
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise UserError(f"{src / CSV_NAME} lists the fine class {unused[0]!r}{more}, which has no folder under "
                        f"train/ or test/; remove its row, or add its images")
    return DatasetSource(
        name="folder", fine_classes=fine_classes, coarse_classes=coarse_classes, fine_to_coarse=fine_to_coarse,
        image_format=next(iter(formats)), image_size=None, channels=3, splits=splits,
        notes={"source": str(src), "keys": "image path relative to SRC, made key-safe",
               "labels": f"fine = class folder in {CSV_NAME} row order; coarse from {CSV_NAME}"},
    )

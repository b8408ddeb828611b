"""The readers of maskcon/datasets: every sample of each original format, class maps, and bad sources."""
from __future__ import annotations

import collections
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from maskcon.datasets import DATASETS, cars196, sop
from maskcon.datasets.imagenet32 import COARSE_CLASSES as IMAGENET_COARSE
from maskcon.errors import UserError
from tests import sources

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "coarse_labels"
needs_official = pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the official label files are not on this machine")


def samples_of(split) -> dict:
    items = [split.item(i) for i in range(len(split))]
    keys = [item.key for item in items]
    assert len(set(keys)) == len(keys), "keys are unique within a split"
    return {item.key: item for item in items}


def assert_arrays_match(split, expected: dict) -> None:
    got = samples_of(split)
    assert set(got) == set(expected)
    for key, (image, fine, coarse) in expected.items():
        sample = got[key]
        assert sample.image.dtype == np.uint8 and np.array_equal(sample.image, image), key
        assert (sample.fine, sample.coarse) == (fine, coarse), key


def assert_files_match(split, expected: dict) -> None:
    got = samples_of(split)
    assert set(got) == set(expected)
    for key, (data, fine, coarse) in expected.items():
        assert got[key].image == data, key  # the file's bytes, not re-encoded
        assert (got[key].fine, got[key].coarse) == (fine, coarse), key


def test_registry_names():
    assert list(DATASETS) == ["digits", "cifar100", "cifartoy_good", "cifartoy_bad", "imagenet32", "sop_split1",
                              "sop_split2", "cars196", "folder"]


def test_digits_is_a_fixed_stratified_split_of_load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    source = DATASETS["digits"].read(None)
    train, test = samples_of(source.splits["train"]), samples_of(source.splits["test"])
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    for key, sample in {**train, **test}.items():
        index = int(key)
        assert key == f"{index:04d}"
        assert np.array_equal(sample.image, np.round(digits.images[index] * 255 / 16).astype(np.uint8))
        assert sample.fine == digits.target[index] and sample.coarse == int(digits.target[index] >= 5)
    test_counts = collections.Counter(s.fine for s in test.values())
    assert all(35 <= test_counts[d] <= 37 for d in range(10))  # stratified: 20 % of each digit
    assert source.fine_to_coarse == [0] * 5 + [1] * 5 and source.image_size == (8, 8) and source.channels == 1
    again = DATASETS["digits"].read(None).splits["test"]
    assert [again.item(i).key for i in range(len(again))] == sorted(test)  # the same split every time


def test_cifar100_reads_pickles_with_official_superclasses(tmp_path):
    expected = sources.write_cifar100(tmp_path)
    for src in (tmp_path, tmp_path / "cifar-100-python"):  # the folder or the folder holding it
        source = DATASETS["cifar100"].read(src)
        assert source.fine_classes == [f"fine{i}" for i in range(100)] and len(source.coarse_classes) == 20
        assert source.fine_to_coarse == [f // 5 for f in range(100)]
        for split in ("train", "test"):
            assert_arrays_match(source.splits[split], expected[split])


@pytest.mark.parametrize("dataset, write, folder", [("cifar100", sources.write_cifar100, "cifar-100-python"),
                                                    ("cifartoy_good", sources.write_cifar10, "cifar-10-batches-py")])
def test_cifar_batches_saved_again_by_python_3_read_as_the_originals(tmp_path, dataset, write, folder):
    # the CIFAR page's loader, pickle.load(f, encoding="bytes"), gives the release's Python 2 strings as bytes
    # (keys, class names, file names); saved again by Python 3, they stay bytes
    def as_python_2_strings(value):
        if isinstance(value, str):
            return value.encode()
        return [as_python_2_strings(item) for item in value] if isinstance(value, list) else value

    write(tmp_path / "original")
    (tmp_path / "again" / folder).mkdir(parents=True)
    for path in (tmp_path / "original" / folder).iterdir():
        with open(path, "rb") as handle:
            content = pickle.load(handle)
        with open(tmp_path / "again" / folder / path.name, "wb") as handle:
            pickle.dump({key.encode(): as_python_2_strings(value) for key, value in content.items()}, handle)
    original, again = (DATASETS[dataset].read(tmp_path / name / folder) for name in ("original", "again"))
    assert again.fine_classes == original.fine_classes and again.coarse_classes == original.coarse_classes
    assert all(isinstance(name, str) for name in again.fine_classes + again.coarse_classes)
    for split in ("train", "test"):
        assert len(again.splits[split]) == len(original.splits[split])
        for i in (0, len(original.splits[split]) - 1):
            first, second = original.splits[split].item(i), again.splits[split].item(i)
            assert (first.key, first.fine, first.coarse) == (second.key, second.fine, second.coarse)
            assert np.array_equal(first.image, second.image)


@pytest.mark.parametrize("variant", ["good", "bad"])
def test_cifartoy_keeps_eight_classes_in_two_coarse(tmp_path, variant):
    cifar10 = sources.write_cifar10(tmp_path)
    source = DATASETS[f"cifartoy_{variant}"].read(tmp_path / "cifar-10-batches-py")
    groups = {"good": [{"airplane", "automobile", "ship", "truck"}, {"bird", "cat", "dog", "horse"}],
              "bad": [{"airplane", "automobile", "dog", "cat"}, {"ship", "truck", "bird", "horse"}]}[variant]
    # the fine numbering of the official cifartoy.py (_cifar10_to_cifartoy)
    official = {"good": {0: 0, 1: 1, 8: 2, 9: 3, 2: 4, 3: 5, 5: 6, 7: 7},
                "bad": {0: 0, 1: 1, 2: 2, 3: 3, 8: 4, 9: 5, 5: 6, 7: 7}}[variant]
    assert len(source.fine_classes) == 8 and "deer" not in source.fine_classes and "frog" not in source.fine_classes
    for coarse, members in enumerate(groups):
        assert {name for name, c in zip(source.fine_classes, source.fine_to_coarse) if c == coarse} == members
    for split in ("train", "test"):
        expected = {key: (image, official[label], source.fine_to_coarse[official[label]])
                    for key, (image, label) in cifar10[split].items() if label not in (4, 6)}
        assert_arrays_match(source.splits[split], expected)


@pytest.mark.parametrize("layout", ["flat", "folders"])
@pytest.mark.parametrize("file_format", ["pickle", "npz"])
def test_imagenet32_reads_every_layout(tmp_path, layout, file_format):
    expected = sources.write_imagenet32(tmp_path, layout=layout, file_format=file_format)
    source = DATASETS["imagenet32"].read(tmp_path)
    assert len(source.fine_classes) == 1000 and source.coarse_classes == IMAGENET_COARSE
    assert source.fine_to_coarse == [i % 12 for i in range(1000)]
    for split in ("train", "test"):
        assert_arrays_match(source.splits[split], expected[split])


@needs_official
def test_imagenet32_official_maps_give_table_3_counts(tmp_path):
    maps = tuple(json.loads((OFFICIAL / "imagenet32" / name).read_text())
                 for name in ("imagenet32_to_fine.json", "imagenet_fine_to_coarse.json"))
    expected = sources.write_imagenet32(tmp_path, maps=maps, per_batch=3, n_val=10)
    source = DATASETS["imagenet32"].read(tmp_path)
    counts = collections.Counter(source.fine_to_coarse)
    assert [counts[c] for c in range(12)] == [61, 123, 59, 95, 60, 130, 70, 53, 105, 71, 93, 80]  # Table 3
    assert_arrays_match(source.splits["test"], expected["test"])


@pytest.mark.parametrize("variant", ["split1", "split2"])
def test_sop_passes_jpegs_through_with_split_labels(tmp_path, variant):
    expected = sources.write_sop(tmp_path)[variant]
    source = DATASETS[f"sop_{variant}"].read(tmp_path / "Stanford_Online_Products")
    assert source.image_format == "jpg" and source.coarse_classes[0] == "bicycle" and len(source.coarse_classes) == 12
    for split in ("train", "test"):
        assert_files_match(source.splits[split], expected[split])
    products = {"split1": 6 + 6, "split2": 12}[variant]  # split1: other products in test
    assert len(source.fine_classes) == products


@needs_official
def test_sop_official_lists_keep_official_fine_labels():
    for variant, (n_train, n_test, n_classes) in {"split1": (25368, 25278, 2517 + 2518),
                                                   "split2": (14980, 2996, 1498)}.items():
        split_dir = OFFICIAL / f"sop_{variant}"
        lists = {split: tuple(json.loads((split_dir / f"{split}_{what}.json").read_text())
                              for what in ("path", "fine_label", "coarse_label")) for split in ("train", "test")}
        products, product_coarse, fine = sop.product_classes(lists, split_dir, "")
        assert (len(fine["train"]), len(fine["test"]), len(products)) == (n_train, n_test, n_classes)
        offset = 2517 if variant == "split1" else 0  # split1's test products are other products
        assert fine["train"] == lists["train"][1]
        assert fine["test"] == [f + offset for f in lists["test"][1]]
        for split in ("train", "test"):
            assert [product_coarse[f] for f in fine[split]] == lists[split][2]


def test_cars196_reads_torchvision_layout(tmp_path):
    expected = sources.write_cars(tmp_path)
    source = DATASETS["cars196"].read(tmp_path)
    assert source.fine_classes == sources.CAR_NAMES and source.fine_to_coarse == sources.CAR_COARSE
    for split in ("train", "test"):
        assert_files_match(source.splits[split], expected[split])
    torchvision_datasets = pytest.importorskip("torchvision.datasets")
    for split in ("train", "test"):  # torchvision's own reader agrees on files and fine labels
        reference = torchvision_datasets.StanfordCars(tmp_path, split=split, download=False)
        ours = source.splits[split]
        assert [(Path(path).read_bytes(), label) for path, label in reference._samples] == [
            (ours.item(i).image, ours.item(i).fine) for i in range(len(ours))]


@needs_official
def test_cars196_body_types_match_table_2_and_official_grouping():
    official = json.loads((OFFICIAL / "cars196" / "cars196_fine_to_coarse.json").read_text())
    ours = [cars196.body_type(name) for name in official["fine_names"]]
    assert [ours.count(c) for c in range(8)] == [18, 50, 36, 30, 29, 14, 7, 12]  # supplement Table 2
    differ = [name for i, name in enumerate(official["fine_names"]) if ours[i] != official["fine_to_coarse"][str(i)]]
    assert differ == ["Ford E-Series Wagon Van 2012"]  # Table 2 makes it a Wagon, the official code a Van


@pytest.mark.parametrize("file_format", ["jpg", "png"])
def test_folder_reads_class_folders_and_csv(tmp_path, file_format):
    expected = sources.write_folder(tmp_path, file_format=file_format)
    source = DATASETS["folder"].read(tmp_path)
    assert source.fine_classes == ["beagle", "persian", "poodle", "siamese", "boxer"]
    assert source.coarse_classes == ["dog", "cat"] and source.fine_to_coarse == [0, 1, 0, 1, 0]
    assert source.image_format == file_format
    for split in ("train", "test"):
        assert_files_match(source.splits[split], expected[split])


# ------------------------------------------------------------------------------------------ bad sources


def _one_line_error(dataset: str, src, *must_mention: str) -> str:
    with pytest.raises(UserError) as raised:
        source = DATASETS[dataset].read(src)
        for split in source.splits.values():  # array readers load pixels lazily
            len(split), split.item(0)
    message = str(raised.value)
    assert "\n" not in message and message
    for text in must_mention:
        assert text in message, message
    return message


def test_bad_cifar_sources(tmp_path):
    _one_line_error("cifar100", tmp_path / "nowhere", "does not exist", "cifar-100-python")
    _one_line_error("cifar100", None, "needs --src")
    sources.write_cifar10(tmp_path / "c10")
    _one_line_error("cifar100", tmp_path / "c10", "meta", "cifar.html")  # another dataset's folder
    sources.write_cifar100(tmp_path / "c100")
    (tmp_path / "c100" / "cifar-100-python" / "test").unlink()
    _one_line_error("cifar100", tmp_path / "c100", "missing", "test")
    (tmp_path / "c100" / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    _one_line_error("cifar100", tmp_path / "c100", "not a pickled batch")
    folder = tmp_path / "c100" / "cifar-100-python"
    (folder / "test").write_bytes((folder / "train").read_bytes()[:5000])   # a download cut short
    _one_line_error("cifar100", tmp_path / "c100", "test ends before", "cut short")
    (tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    _one_line_error("cifartoy_good", tmp_path / "c10", "data_batch_3")
    with open(tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3", "wb") as handle:
        pickle.dump({"labels": [1]}, handle)  # right name, wrong content
    _one_line_error("cifartoy_bad", tmp_path / "c10", "data_batch_3", "lacks data")


def test_bad_imagenet32_sources(tmp_path):
    sources.write_cifar100(tmp_path / "c100")     # another dataset's folder: the batches are what is missing
    _one_line_error("imagenet32", tmp_path / "c100", "train_data_batch_1", "image-net.org")
    sources.write_imagenet32(tmp_path)
    (tmp_path / "imagenet_fine_to_coarse.json").unlink()
    _one_line_error("imagenet32", tmp_path, "imagenet_fine_to_coarse.json", "MaskCon_CVPR2023", "--labels")
    (tmp_path / "imagenet_fine_to_coarse.json").write_text('{"0": 1}')
    _one_line_error("imagenet32", tmp_path, "does not map every class")
    (tmp_path / "imagenet_fine_to_coarse.json").write_text(json.dumps(sources.imagenet32_maps()[1]))
    (tmp_path / "train_data_batch_7").unlink()
    _one_line_error("imagenet32", tmp_path, "train_data_batch_7", "image-net.org")
    np.savez(tmp_path / "train_data_batch_7.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    _one_line_error("imagenet32", tmp_path, "train_data_batch_7.npz", "3072 bytes")
    for labels, wanted in (([1, 2, 3], "holds 2 images with 3 labels;"),
                           ([1, 0], "holds 1 label outside 1..1000 (the first 0, of image 1);")):
        np.savez(tmp_path / "train_data_batch_7.npz", data=np.zeros((2, 3072), np.uint8), labels=labels)
        assert "or labels" not in _one_line_error("imagenet32", tmp_path, "train_data_batch_7.npz", wanted)


def test_bad_sop_cars_and_folder_sources(tmp_path):
    sources.write_sop(tmp_path / "sop")
    sop_root = tmp_path / "sop" / "Stanford_Online_Products"
    shutil.rmtree(sop_root / "sop_split2")
    _one_line_error("sop_split2", sop_root, "sop_split2", "MaskCon_CVPR2023")
    (sop_root / "chair_final" / "100000002000_0.JPG").unlink()
    _one_line_error("sop_split1", sop_root, "missing", "chair_final/100000002000_0.JPG")
    assert "sop_split1" in sop.__doc__

    sources.write_cars(tmp_path / "cars")
    (tmp_path / "cars" / "stanford_cars" / "cars_test" / "00003.jpg").unlink()
    _one_line_error("cars196", tmp_path / "cars", "cars_test/00003.jpg", "StanfordCars")
    (tmp_path / "cars" / "stanford_cars" / "devkit" / "cars_train_annos.mat").write_text("MATLAB? no")
    _one_line_error("cars196", tmp_path / "cars", "cars_train_annos.mat")
    _one_line_error("cars196", tmp_path / "sop", "devkit/cars_meta.mat")

    sources.write_folder(tmp_path / "folder")
    (tmp_path / "folder" / "train" / "husky").mkdir()
    _one_line_error("folder", tmp_path / "folder", "husky", "fine_to_coarse.csv")
    shutil.rmtree(tmp_path / "folder" / "train" / "husky")
    (tmp_path / "folder" / "test" / "beagle" / "x.gif").write_bytes(b"GIF89a")
    _one_line_error("folder", tmp_path / "folder", "x.gif", "neither JPEG")
    (tmp_path / "folder" / "fine_to_coarse.csv").write_text("class;group\n")
    _one_line_error("folder", tmp_path / "folder", "header fine,coarse")


def test_folder_sources_as_users_get_them_wrong_are_one_line_each_and_a_bom_is_read(tmp_path):
    src = tmp_path / "folder"
    sources.write_folder(src)
    csv = src / "fine_to_coarse.csv"
    text = csv.read_text()
    csv.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())     # as a spreadsheet saves it
    assert DATASETS["folder"].read(src).fine_classes == ["beagle", "persian", "poodle", "siamese", "boxer"]
    csv.write_text(text + "owl,bird\nhusky,dog\n")
    _one_line_error("folder", src, "lists the fine class 'owl' (and 1 more), which has no folder", "remove its row")
    csv.write_text(text)
    shutil.rmtree(src / "train" / "boxer")      # a class of the test split alone, as SOP's and Cars196's are
    assert len(DATASETS["folder"].read(src).splits["train"]) == 4 * 4
    (src / "train" / "boxer").mkdir()
    _one_line_error("folder", src, f"the class folder {src / 'train' / 'boxer'} holds no images")
    (src / "train" / "boxer").rmdir()
    (src / "test" / "poodle" / "odd.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    _one_line_error("folder", src, "mixes JPEG and PNG images: 31 JPG (e.g. train/beagle/img.0.jpg), 1 PNG (e.g. "
                    "test/poodle/odd.png)")
    (src / "test" / "poodle" / "odd.png").unlink()
    # a misspelt row: the folder it misses and the row without a folder are named together, with the fix
    csv.write_text(text.replace("persian,cat", "persain,cat"))
    assert _one_line_error("folder", src) == (
        f"the class folder {src / 'train' / 'persian'} is not listed in {csv}; its row may be 'persain', which has no "
        f"folder: correct that row to persian")
    csv.write_text(text)
    # what file browsers leave is skipped; every other file that is no image is named in the one line
    for system in ("Thumbs.db", "desktop.ini", ".DS_Store"):
        (src / "train" / "beagle" / system).write_bytes(b"\0" * 16)
    (src / "test" / "Thumbs.db").write_bytes(b"\0" * 16)
    assert len(DATASETS["folder"].read(src).splits["train"]) == 4 * 4
    for name in ("notes.txt", "a.gif", "b.webp", "c.heic"):
        (src / "train" / "siamese" / name).write_bytes(b"x")
    assert _one_line_error("folder", src) == (
        f"4 file(s) under {src} are neither JPEG (.jpg, .jpeg) nor PNG (.png): train/siamese/a.gif, "
        f"train/siamese/b.webp, train/siamese/c.heic (and 1 more); convert them or move them out of SRC")


class _CreatesAFile:
    """What a crafted pickle can hold: unpickling it calls `how` with arguments that create TARGET."""

    def __init__(self, how: str, target: Path):
        self.how, self.target = how, target

    def __reduce__(self):
        import os

        if self.how == "open":
            return open, (str(self.target), "w")
        return os.system, (f"touch {self.target}",)


@pytest.mark.parametrize("how", ["open", "os.system"])
@pytest.mark.parametrize("dataset, write, relative", [
    ("cifar100", sources.write_cifar100, "cifar-100-python/train"),
    ("cifar100", sources.write_cifar100, "cifar-100-python/meta"),
    ("cifartoy_good", sources.write_cifar10, "cifar-10-batches-py/data_batch_2"),
    ("imagenet32", sources.write_imagenet32, "val_data"),
])
def test_a_crafted_source_pickle_creates_no_file(tmp_path, dataset, write, relative, how):
    src = tmp_path / "src"
    write(src)
    target = tmp_path / "created-by-the-pickle"
    with open(src / relative, "rb") as handle:
        content = pickle.load(handle, encoding="latin1")  # the test's own file, written just above
    content["extra"] = _CreatesAFile(how, target)
    with open(src / relative, "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    message = _one_line_error(dataset, src, str(src / relative), "holds a pickled", "not run")
    assert ("open" in message) if how == "open" else ("system" in message)
    assert not target.exists()


def test_official_label_files_read_from_a_labels_folder_outside_the_source(tmp_path):
    """--labels DIR: the maps of imagenet32 and the sop_splitN/ folder come from DIR, the images from SRC
    (a shared, read-only dataset folder stays as downloaded); a dataset without label files refuses it."""
    from maskcon import shards

    expected = sources.write_imagenet32(tmp_path / "imagenet32")
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in ("imagenet32_to_fine.json", "imagenet_fine_to_coarse.json"):
        shutil.move(tmp_path / "imagenet32" / name, labels / name)
    with pytest.raises(UserError, match="imagenet32_to_fine.json"):
        DATASETS["imagenet32"].read(tmp_path / "imagenet32")
    source = DATASETS["imagenet32"].read(tmp_path / "imagenet32", labels=labels)
    assert_arrays_match(source.splits["train"], expected["train"])

    sop_expected = sources.write_sop(tmp_path / "sop")["split2"]
    shutil.move(tmp_path / "sop" / "Stanford_Online_Products" / "sop_split2", labels / "sop_split2")
    source = DATASETS["sop_split2"].read(tmp_path / "sop" / "Stanford_Online_Products", labels=labels)
    assert_files_match(source.splits["test"], sop_expected["test"])

    with pytest.raises(UserError, match="--labels"):
        shards.create("cifar100", tmp_path / "imagenet32", tmp_path / "out", labels=labels)
    assert not (tmp_path / "out").exists()

"""maskcon/shards.py, maskcon/shard_format.py and launch/make_shards.py: exact samples, shuffle, manifest,
DALI index files, interruption and resume, verify, the check before every run, and bad sources, on real
webdataset tars read by webdataset and DALI."""
from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskcon import shard_format, shards
from maskcon.cli import run_make_shards
from maskcon.errors import UserError
from tests import sources

REPO = Path(__file__).resolve().parents[1]
DOOR = REPO / "launch" / "make_shards.py"


def read_split(out: Path, split: str) -> list[dict]:
    """Every sample of a split as the webdataset library reads it, in shard order."""
    import webdataset

    tars, _ = shard_format.split_files(out, split)
    return list(webdataset.WebDataset(tars, shardshuffle=False, empty_check=False))


def shards_keys(out: Path, split: str) -> list[str]:
    """Keys of a split in shard order, read from the DALI index files."""
    return [entry.key for index in shard_format.split_files(out, split)[1] for entry in shard_format.read_index(index)]


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def label(data: bytes) -> int:
    return int(np.frombuffer(data, dtype="<i8")[0])


def door(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOOR), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_shards_match(out: Path, expected: dict, image_format: str) -> None:
    """Every sample's pixels (or file bytes) and labels equal the source's; keys name the source item."""
    manifest = shard_format.read_manifest(out)
    for split, wanted in expected.items():
        samples = read_split(out, split)
        assert sorted(s["__key__"] for s in samples) == sorted(wanted), split
        for sample in samples:
            image, fine, coarse = wanted[sample["__key__"]]
            assert set(sample) >= {image_format, "fine", "coarse"}
            if image_format == "png" and isinstance(image, np.ndarray):
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), image), sample["__key__"]
            else:
                assert sample[image_format] == image, sample["__key__"]  # byte for byte
            assert (label(sample["fine"]), label(sample["coarse"])) == (fine, coarse)
            assert manifest["fine_to_coarse"][fine] == coarse
        keys = [s["__key__"] for s in samples]
        assert keys != sorted(keys), "samples are written in a shuffled order"
        sizes = [shard["num_samples"] for shard in manifest["splits"][split]["shards"]]
        per_shard = manifest["splits"][split]["samples_per_shard"]
        assert sum(sizes) == len(wanted) and all(n == per_shard for n in sizes[:-1]) and 0 < sizes[-1] <= per_shard


# ------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    shards.create("digits", None, out, workers=1)
    return out


def test_digits_shards_hold_load_digits_exactly(digits_shards):
    from sklearn.datasets import load_digits

    digits = load_digits()
    manifest = shard_format.read_manifest(digits_shards)
    assert manifest["dataset"] == "digits" and manifest["image_format"] == "png"
    assert manifest["image_size"] == [8, 8] and manifest["channels"] == 1
    assert manifest["label_encoding"] == "int64 little-endian"
    assert manifest["fine_classes"] == [str(d) for d in range(10)] and manifest["fine_to_coarse"] == [0] * 5 + [1] * 5
    assert "255 / 16" in manifest["source"]["pixels"]
    assert manifest["splits"]["train"]["num_samples"] == 1437 and manifest["splits"]["test"]["num_samples"] == 360
    assert len(manifest["splits"]["train"]["shards"]) >= 64 and len(manifest["splits"]["test"]["shards"]) >= 64
    expected = {split: {f"{i:04d}": (np.round(digits.images[i] * 255 / 16).astype(np.uint8), int(digits.target[i]),
                                     int(digits.target[i] >= 5))
                        for i in map(int, shards_keys(digits_shards, split))}
                for split in ("train", "test")}
    assert len(expected["train"]) == 1437 and not set(expected["train"]) & set(expected["test"])
    assert_shards_match(digits_shards, expected, "png")
    for shard in manifest["splits"]["train"]["shards"]:
        assert shards.file_sha256(digits_shards / shard["tar"]) == shard["sha256"]
    tars, indexes = shard_format.split_files(digits_shards, "test")
    assert [Path(t).name for t in tars][:2] == ["test-000000.tar", "test-000001.tar"]
    assert all(Path(i).exists() and i == t[:-4] + ".idx" for t, i in zip(tars, indexes))


@pytest.mark.slow
def test_index_files_equal_those_of_dali_wds2idx(digits_shards, tmp_path):
    tool = Path(sys.executable).parent / "wds2idx"
    if not tool.exists():
        pytest.skip("DALI's wds2idx tool is not installed")
    tars, indexes = shard_format.split_files(digits_shards, "train")
    for tar, index in list(zip(tars, indexes))[:3]:
        reference = tmp_path / (Path(tar).stem + ".idx")
        subprocess.run([str(tool), tar, str(reference)], check=True, capture_output=True, timeout=60)
        assert Path(index).read_text() == reference.read_text()
        assert shard_format.index_of_tar(Path(tar)) == reference.read_text()


def test_dali_reads_every_sample_with_the_index_files(digits_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    tars, indexes = shard_format.split_files(digits_shards, "test")

    @pipeline_def(batch_size=40, num_threads=1, device_id=None)
    def pipeline():
        image, fine, coarse = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["png;jpg", "fine", "coarse"],
                                                    dtypes=[types.UINT8, types.INT64, types.INT64], name="reader")
        return fn.decoders.image(image, device="cpu", output_type=types.GRAY), fine, coarse

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == 360
    fines = []
    for _ in range(9):
        images, fine, coarse = pipe.run()
        for i in range(len(fine)):
            assert np.array(images.at(i)).shape == (8, 8, 1)
            assert int(np.array(coarse.at(i))[0]) == int(np.array(fine.at(i))[0] >= 5)
            fines.append(int(np.array(fine.at(i))[0]))
    wanted = collections.Counter(label(s["fine"]) for s in read_split(digits_shards, "test"))
    assert collections.Counter(fines) == wanted


def test_png_tar_and_label_encodings_are_standard():
    import tarfile

    rng = np.random.default_rng(0)
    for shape in [(32, 32, 3), (8, 8), (1, 1, 3), (5, 7)]:
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(shards.encode_png(pixels)))), pixels)
    for name, size in [("0001234.png", 2123), ("k" * 94 + ".fine", 8), ("a.jpg", 10**9)]:
        header = tarfile.TarInfo(name)
        header.size, header.mode, header.mtime = size, 0o444, 0
        assert shards._tar_header(name, size) == header.tobuf(tarfile.USTAR_FORMAT, "ascii", "strict")
    for value in (0, 7, -1, 2**40):
        assert shard_format.decode_label(shard_format.encode_label(value)) == value and len(shard_format.encode_label(value)) == 8
    assert shard_format.encode_label(1) == (1).to_bytes(8, "little")


def test_dali_decodes_rgb_shards_to_the_source_pixels(tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    src, expected, _ = _fixture("cifar100", tmp_path / "src")
    out = tmp_path / "out"
    shards.create("cifar100", src, out, samples_per_shard=30, workers=1)
    tars, indexes = shard_format.split_files(out, "test")
    in_order = [s["__key__"] for s in read_split(out, "test")]

    @pipeline_def(batch_size=len(in_order), num_threads=1, device_id=None)
    def pipeline():
        image, fine = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["png;jpg", "fine"],
                                            dtypes=[types.UINT8, types.INT64])
        return fn.decoders.image(image, device="cpu", output_type=types.RGB), fine

    pipe = pipeline()
    pipe.build()
    images, fine = pipe.run()
    for i, key in enumerate(in_order):  # one reader, no shuffling: the order of the tars
        assert np.array_equal(np.array(images.at(i)), expected["test"][key][0])
        assert int(np.array(fine.at(i))[0]) == expected["test"][key][1]


# ------------------------------------------------------------------------------------ every dataset


def _fixture(dataset: str, root: Path):
    """(src, expected {split: {key: (image, fine, coarse)}}, image format) for a small source in original format."""
    if dataset == "cifar100":
        return root, sources.write_cifar100(root), "png"
    if dataset.startswith("cifartoy"):
        from maskcon.datasets import DATASETS

        cifar10 = sources.write_cifar10(root)
        source = DATASETS[dataset].read(root)
        to_fine = {sources.CIFAR10_CLASSES.index(name): i for i, name in enumerate(source.fine_classes)}
        return root, {split: {key: (image, to_fine[c], source.fine_to_coarse[to_fine[c]])
                              for key, (image, c) in samples.items() if c in to_fine}
                      for split, samples in cifar10.items()}, "png"
    if dataset == "imagenet32":
        return root, sources.write_imagenet32(root, layout="folders", file_format="npz"), "png"
    if dataset.startswith("sop"):
        return root / "Stanford_Online_Products", sources.write_sop(root)[dataset[4:]], "jpg"
    if dataset == "cars196":
        return root / "stanford_cars", sources.write_cars(root), "jpg"
    return root, sources.write_folder(root), "jpg"


@pytest.mark.parametrize("dataset", ["cifar100", "cifartoy_good", "cifartoy_bad", "imagenet32", "sop_split1",
                                     "sop_split2", "cars196", "folder"])
def test_every_dataset_converts_exactly(tmp_path, dataset):
    src, expected, image_format = _fixture(dataset, tmp_path / "src")
    out = tmp_path / "out"
    manifest = shards.create(dataset, src, out, samples_per_shard=7, workers=1)
    assert manifest["image_format"] == image_format and manifest["dataset"] == dataset
    assert manifest["create_args"] == [dataset, "--src", str(src.resolve()), "--samples-per-shard", "7"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert_shards_match(out, expected, image_format)
    assert shards.verify(out, workers=1) == []
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]
    assert leftovers == []


def test_shard_count_allows_many_readers():
    assert shards.shard_size(1_281_167) == 10_000  # ImageNet32 train: 129 shards
    assert shards.shard_size(25_368) == 396 and -(-25_368 // 396) >= 64  # SOP split1 train
    assert shards.shard_size(50) == 1  # fewer samples than shards: one each
    assert shards.shard_size(1000, samples_per_shard=300) == 300


@pytest.mark.slow
def test_shuffle_is_fixed_by_the_seed_and_pool_equals_one_process(tmp_path):
    src, _, _ = _fixture("cifar100", tmp_path / "src")
    runs = {}
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, 1)):
        shards.create("cifar100", src, tmp_path / name, seed=seed, samples_per_shard=16, workers=workers)
        runs[name] = tree(tmp_path / name)
    assert runs["a"] == runs["b"]  # the process pool writes the same bytes as one process
    keys = {name: [s["__key__"] for s in read_split(tmp_path / name, "train")] for name in ("a", "c")}
    assert keys["a"] != keys["c"] and sorted(keys["a"]) == sorted(keys["c"])


# ------------------------------------------------------------------------------ interruption, resume


def _kill_during_create(out: Path, *args: str) -> None:
    """Start the door's create and SIGKILL it once it has written some shards."""
    process = subprocess.Popen([sys.executable, str(DOOR), "create", "digits", "--out", str(out), *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "train").is_dir() and len(os.listdir(out / "train")) > 40:
            break
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the run was stopped before it finished"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_ends_create_as_ctrl_c_does_and_the_same_command_finishes_it(tmp_path, stop):
    import psutil

    out = tmp_path / "out"
    command = [sys.executable, str(DOOR), "create", "digits", "--out", str(out), "--samples-per-shard", "4",
               "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "train").is_dir() and len(os.listdir(out / "train")) > 20):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.01)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(stop)
    _, err = process.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith(f"stopped by {stop.name}; run the same command again to continue"), lines[-1]
    _, left = psutil.wait_procs(workers, timeout=15)     # the workers and the fork server end with the command
    assert not (out / "manifest.json").exists() and not left
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and shards.verify(out, workers=1) == [], again.stderr[-2000:]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    shards.create("digits", None, reference, samples_per_shard=4, workers=1)
    out = tmp_path / "out"
    _kill_during_create(out, "--samples-per-shard", "4", "--workers", "1")
    with pytest.raises(UserError, match="interrupted"):
        shard_format.read_manifest(out)
    # beyond the kill itself: shards lost, damaged or half-written while the run was stopped
    finished = [json.loads(line)["tar"] for line in (out / ".progress.jsonl").read_text().splitlines()[:-1]]
    assert len(finished) >= 4
    (out / finished[0]).unlink()  # a finished shard lost,
    (out / (finished[1][:-4] + ".idx")).unlink()  # a shard whose index is gone,
    (out / finished[2]).write_bytes(b"")  # a finished shard damaged since,
    (out / "train" / "train-000300.tar.partial").write_bytes(b"half a shard")  # a shard being written
    on_disk = sum((out / split / f"{split}-{tar.stem.split('-')[1]}.idx").exists()
                  for split in ("train", "test") for tar in (out / split).glob("*.tar"))
    lines = []
    shards.create("digits", None, out, samples_per_shard=4, workers=2, log=lines.append)
    assert tree(out) == tree(reference)
    assert f"({on_disk} finished before)" in lines[0] and on_disk >= len(finished) - 2, lines[0]


def test_verify_of_a_folder_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(UserError, match="nosuch: no such folder"):
        shards.verify(tmp_path / "nosuch")


def test_the_same_source_named_by_its_parent_folder_is_the_same_input(tmp_path):
    sources.write_cifar100(tmp_path / "src")
    out = tmp_path / "shards"
    shards.create("cifar100", tmp_path / "src" / "cifar-100-python", out, workers=1)
    before = tree(out)
    shards.create("cifar100", tmp_path / "src", out, workers=1)     # the folder that holds cifar-100-python
    assert tree(out) == before
    (tmp_path / "src" / "cifar-100-python" / "extra").write_bytes(b"a file more")
    with pytest.raises(UserError, match="the source files"):
        shards.create("cifar100", tmp_path / "src", out, workers=1)


def test_complete_shards_made_otherwise_need_overwrite(tmp_path):
    shards.create("digits", None, tmp_path, samples_per_shard=200, workers=1)
    before = tree(tmp_path)
    assert shards.create("digits", None, tmp_path, samples_per_shard=200, workers=1)["options"]["seed"] == 0
    assert tree(tmp_path) == before  # already complete: nothing rewritten
    with pytest.raises(UserError, match="--overwrite"):
        shards.create("digits", None, tmp_path, samples_per_shard=200, seed=3, workers=1)
    with pytest.raises(UserError, match=r"--samples-per-shard 200 -> default\b"):
        shards.create("digits", None, tmp_path, workers=1)
    assert tree(tmp_path) == before
    manifest = shards.create("digits", None, tmp_path, samples_per_shard=200, seed=3, workers=1, overwrite=True)
    assert manifest["options"]["seed"] == 3 and shards.verify(tmp_path, workers=1) == []


# ------------------------------------------------------------------------------ the check before a run


def _truncate_tar(out: Path) -> str:
    tar = out / "train" / "train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:len(tar.read_bytes()) // 2])  # a copy that stopped half way
    return "train-000002.tar"


def _cut_tar_end(out: Path) -> str:
    tar = out / "train" / "train-000003.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])  # every sample whole, the end-of-archive blocks gone
    return "train-000003.tar"


def _remove_index(out: Path) -> str:
    (out / "test" / "test-000001.idx").unlink()
    return "test-000001.tar"


def _miscount_index(out: Path) -> str:
    index = out / "train" / "train-000005.idx"
    lines = index.read_text().splitlines()
    index.write_text(f"v1.2 {len(lines) - 2}\n" + "".join(line + "\n" for line in lines[1:-1]))  # one sample short
    return "train-000005.tar"


def _remove_tar(out: Path) -> str:
    (out / "train" / "train-000000.tar").unlink()
    return "train-000000.tar"


DAMAGES = {"truncated tar": _truncate_tar, "tar end cut": _cut_tar_end, "missing index": _remove_index,
           "index count": _miscount_index, "missing tar": _remove_tar}


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "digits"
    shards.create("digits", None, out, samples_per_shard=40, workers=1)
    return out


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, to))


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_stops_every_loader_with_one_line(small_digits, tmp_path, damage):
    from maskcon.loaders import LoaderSpec, build_train_loader, read_split

    out = _copy(small_digits, tmp_path / "digits")
    split = "test" if damage == "missing index" else "train"
    named = DAMAGES[damage](out)
    with pytest.raises(UserError) as caught:
        read_split(out, split)
    message = str(caught.value)
    assert "\n" not in message and named in message, message
    assert f"python launch/make_shards.py verify {out} " in message
    assert f"python launch/make_shards.py create digits --samples-per-shard 40 --out {out} --overwrite" in message
    if split == "train":
        with pytest.raises(UserError, match=named):
            build_train_loader(out, LoaderSpec(recipe="digits", image_size=8, batch_size=16, rank=0, world_size=1,
                                               seed=0, device="cpu", backend="dali"))
    read_split(out, "train" if split == "test" else "test")  # the other split is intact
    # the remedy the message gives: verify names the shard, create --overwrite makes the folder whole
    assert any(named in line for line in shards.verify(out, workers=1))
    shards.create("digits", None, out, samples_per_shard=40, workers=1, overwrite=True)
    assert tree(out) == tree(small_digits)


def test_rerunning_create_on_damaged_shards_re_creates_them(small_digits, tmp_path):
    out = _copy(small_digits, tmp_path / "digits")
    _truncate_tar(out)
    logged = []
    shards.create("digits", None, out, samples_per_shard=40, workers=1, log=logged.append)
    assert any(f"{out}: 1 shard no longer matches the manifest (first " in line for line in logged), logged
    assert [line for line in logged if "samples in" in line][0].endswith(" 1 process")
    assert tree(out) == tree(small_digits)
    logged.clear()       # once more: complete, and said to be so by sizes and indexes alone
    shards.create("digits", None, out, samples_per_shard=40, workers=1, log=logged.append)
    assert logged == [f"{out} already holds complete digits shards (sizes and indexes checked; make_shards.py verify "
                      f"reads every byte)"]


def test_the_check_names_the_first_shard_and_counts_the_others(small_digits, tmp_path):
    out = _copy(small_digits, tmp_path / "digits")
    _truncate_tar(out)
    _miscount_index(out)
    with pytest.raises(UserError, match=r"train-000002.tar .*\(and 1 more damaged shards\)"):
        shard_format.check_split(out, "train")


def test_manifests_without_file_sizes_get_the_other_checks(small_digits, tmp_path):
    out = _copy(small_digits, tmp_path / "digits")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["create_args"]
    for split in manifest["splits"].values():
        for record in split["shards"]:
            del record["tar_bytes"], record["index_bytes"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "test"):
        shard_format.check_split(out, split)  # intact
    _truncate_tar(out)
    with pytest.raises(UserError, match="train-000002.tar ends at byte .* cut short.* create digits --src SRC"):
        shard_format.check_split(out, "train")
    _remove_index(out)
    with pytest.raises(UserError, match="test-000001.tar has lost its index"):
        shard_format.check_split(out, "test")
    (out / "train" / "train-000002.tar").write_bytes((small_digits / "train" / "train-000002.tar").read_bytes())
    _miscount_index(out)
    with pytest.raises(UserError, match="train-000005.tar has an index .* of 39 samples, the manifest says 40"):
        shard_format.check_split(out, "train")


# ------------------------------------------------------------------------------------- format module


def test_member_names_split_as_dali_and_webdataset_split_them():
    assert shard_format.member_name("0001", "png") == "0001.png"
    assert shard_format.split_member("0001.png") == ("0001", "png")
    assert shard_format.split_member("a/b.c/0001.seg.png") == ("a/b.c/0001", "seg.png")
    assert shard_format.split_member(".hidden") is None and shard_format.split_member("noext") is None
    for key in ("a.b", "a/b", ""):
        with pytest.raises(ValueError):
            shard_format.member_name(key, "png")
    with pytest.raises(ValueError):
        shard_format.decode_label(b"\x01" * 4)


def test_read_index_and_key_at_name_samples_by_tar_offset(small_digits):
    import tarfile

    tar, index = (small_digits / name for name in shard_format.shard_names("train", 3))
    entries = shard_format.read_index(index)
    with tarfile.open(tar) as archive:
        members = {member.name: member for member in archive}
    assert len(entries) == 40 and len(members) == 120
    for entry in entries:
        for extension, member in entry.members.items():
            assert (member.offset, member.size) == (members[f"{entry.key}.{extension}"].offset_data,
                                                   members[f"{entry.key}.{extension}"].size)
        assert entry.image.extension == "png"
        # DALI names an undecodable sample "<tar>:<offset of its image>:<member name>"
        assert shard_format.key_at(index, entry.image.offset) == entry.key
    assert shard_format.key_at(index, 0) is None  # a header, no member's data


@pytest.mark.parametrize("text, problem", [("v1.1 1\npng 512 10 a.png\n", "version"),
                                           ("v1.2 2\npng 512 10 a.png fine 1536 8 a.fine coarse 2560 8 a.coarse\n",
                                            "says 2 samples"),
                                           ("v1.2 1\npng 512 10 a.png\n", "lacks"),
                                           ("v1.2 1\npng 512\n", "groups")])
def test_read_index_rejects_damaged_index_files_in_one_line(tmp_path, text, problem):
    index = tmp_path / "train" / "train-000000.idx"
    index.parent.mkdir()
    index.write_text(text)
    with pytest.raises(UserError, match=f"{index} is damaged .*{problem}.*make_shards.py verify {tmp_path} "):
        shard_format.read_index(index)


def test_synthetic_shards_come_from_the_writer_in_position_order(tmp_path):
    from maskcon.datasets.synthetic import cifar_like_image, write_synthetic_shards

    out = write_synthetic_shards(tmp_path / "synthetic", num_train=30, num_test=7, image=cifar_like_image,
                                 labels=lambda position: (position % 10, position % 10 // 5), num_fine=10,
                                 num_coarse=2, samples_per_shard=8)
    manifest = shard_format.read_manifest(out)
    assert manifest["fine_to_coarse"] == [0] * 5 + [1] * 5 and shards.verify(out, workers=1) == []
    samples = read_split(out, "train")
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(30)]
    for position, sample in enumerate(samples):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), cifar_like_image(position))
        assert label(sample["fine"]) == position % 10
    for split in ("train", "test"):
        shard_format.check_split(out, split)


# ------------------------------------------------------------------------------------------- verify


def test_verify_names_each_damaged_or_missing_shard(tmp_path, capsys):
    out = tmp_path / "out"
    shards.create("digits", None, out, samples_per_shard=40, workers=1)
    assert run_make_shards(["verify", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    tar = out / "train" / "train-000004.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # one byte of the first image
    tar.write_bytes(bytes(data))
    (out / "test" / "test-000003.tar").unlink()
    (out / "test" / "test-000005.idx").write_text("v1.2 0\n")
    assert run_make_shards(["verify", str(out), "--workers", "1"]) == 1
    said = capsys.readouterr()
    lines = said.out.strip().splitlines()
    assert len(lines) == 3  # one line per damaged or missing shard
    # and on stderr the count, with the command that makes the folder whole: the create that made it, --overwrite
    assert said.err.strip().splitlines()[-1] == (f"{out}: 3 problems; re-create them with python launch/make_shards.py "
                                                 f"create digits --samples-per-shard 40 --out {out} --overwrite")
    assert lines[0].startswith("train/train-000004.tar: damaged") and "1 bad sample, e.g. " in lines[0]
    assert lines[1] == "test/test-000003.tar: missing"
    assert lines[2].startswith("test/test-000005.tar: its index test/test-000005.idx does not match")


# -------------------------------------------------------------------------------- door, bad sources


@pytest.mark.slow
def test_door_creates_and_verifies_shards_under_out(tmp_path):
    src = tmp_path / "src"
    sources.write_cifar10(src)
    result = door("create", "cifartoy_good", "--src", src, "--out", tmp_path / "out", "--samples-per-shard", "20")
    assert result.returncode == 0, result.stderr
    assert "cifartoy_good shards at" in result.stdout
    assert shard_format.read_manifest(tmp_path / "out")["splits"]["train"]["samples_per_shard"] == 20
    (tmp_path / "out" / "test" / "test-000000.tar").write_bytes(b"")
    result = door("verify", tmp_path / "out", "--workers", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.startswith("test/test-000000.tar: damaged")
    result = door("create", "nothing", "--out", tmp_path / "other")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("dataset, make_src, mention", [
    ("cifar100", lambda root: None, "does not exist"),
    ("cifar100", lambda root: sources.write_cifar10(root), "cifar-100-python"),
    ("imagenet32", lambda root: (sources.write_imagenet32(root), (root / "imagenet32_to_fine.json").unlink()),
     "imagenet32_to_fine.json"),
    ("cifartoy_bad", lambda root: (sources.write_cifar10(root),
                                   (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")),
     "test_batch"),
    ("sop_split1", lambda root: sources.write_sop(root), "sop_split1"),
    ("cars196", lambda root: sources.write_folder(root), "cars_meta.mat"),
    ("folder", lambda root: sources.write_cars(root), "fine_to_coarse.csv"),
])
def test_bad_source_is_one_line_and_leaves_nothing_complete(tmp_path, capsys, dataset, make_src, mention):
    src = tmp_path / "src"
    make_src(src)
    if dataset == "sop_split1":
        src = src / "Stanford_Online_Products"
        for name in ("train_path.json", "test_path.json"):
            (src / "sop_split1" / name).unlink()
    out = tmp_path / "out"
    status = run_make_shards(["create", dataset, "--src", str(src), "--out", str(out), "--samples-per-shard", "5",
                              "--workers", "1"])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mention in lines[0], lines
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.tar")) if out.exists() else True
    with pytest.raises(UserError):
        shard_format.read_manifest(out)


def test_read_manifest_and_split_files_errors(tmp_path):
    with pytest.raises(UserError, match="make_shards.py create"):
        shard_format.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not a maskcon shard manifest"):
        shard_format.read_manifest(tmp_path)
    shards.create("digits", None, tmp_path / "d", samples_per_shard=500, workers=1)
    with pytest.raises(UserError, match="no 'val' split"):
        shard_format.split_files(tmp_path / "d", "val")


@pytest.mark.slow
def test_benchmark_runs_and_both_converters_agree(tmp_path, capsys):
    from maskcon.bench import shards as bench

    assert bench.main(["--train-images", "300", "--val-images", "60", "--repeats", "1", "--workers", "2",
                       "--workdir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 360 and result["same_pixels_and_labels"] is True
    assert set(result["images_per_s"]) == {"ours", "ours_1_process", "plain"} == set(result["converters"])
    assert result["speedup_median"] > 0 and set(result["tar_mb"]) == set(result["images_per_s"])
    assert bench.main(["--train-images", "300", "--val-images", "60", "--repeats", "1", "--workers", "2",
                       "--workdir", str(tmp_path)]) == 0
    assert "speedup_median: " in capsys.readouterr().out


@pytest.mark.slow
def test_a_file_that_is_not_the_announced_format_stops_the_run(tmp_path):
    src = tmp_path / "src"
    sources.write_folder(src)
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(src / "test" / "poodle" / "img.1.jpg", format="GIF")  # a real GIF
    result = door("create", "folder", "--src", src, "--out", tmp_path / "out", "--workers", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]      # found when the source is checked, before any shard
    assert line.startswith("error: 1 source file") and line.endswith("nothing was written"), line
    assert f"{src / 'test' / 'poodle' / 'img.1.jpg'}: its name says JPG but it holds no JPEG or PNG image" in line
    assert not (tmp_path / "out").exists()


def test_png_problems_are_found_without_decoding():
    from maskcon.shard_format import png_problem

    good = shards.encode_png(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    assert png_problem(good) is None
    pixels_gone = good[:41] + bytes(len(good) - 41)                  # header kept, image data zeroed
    assert "CRC" in png_problem(pixels_gone)
    flipped = bytearray(good)
    flipped[45] ^= 1                                                  # one bit of the image data
    assert "IDAT chunk fails its CRC" in png_problem(bytes(flipped))
    assert "ends before" in png_problem(good[:-12])                  # cut before IEND
    assert "runs past the end" in png_problem(good[:-20])
    assert "signature" in png_problem(b"\xff\xd8\xff" + good[3:])


def test_a_source_folder_given_for_shards_is_named_as_one_and_not_offered_as_the_out(tmp_path):
    sources.write_folder(tmp_path / "photos")
    sources.write_cifar100(tmp_path / "c100")
    for folder, dataset in ((tmp_path / "photos", "folder"), (tmp_path / "c100" / "cifar-100-python", "cifar100")):
        with pytest.raises(UserError) as raised:
            shard_format.read_manifest(folder, dataset)
        assert str(raised.value) == (f"{folder} holds a dataset's source files, not shards; make its shards in a "
                                     f"folder of their own with python launch/make_shards.py create {dataset} --src "
                                     f"{folder} --out shards/NAME, and pass that folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"is missing; make them with .* --out {tmp_path / 'empty'}$"):
        shard_format.read_manifest(tmp_path / "empty", "folder")


@pytest.mark.parametrize("argv, wanted", [
    (["create", "digits", "--out", "{tmp}/d", "--workers", "0"], "error: --workers must be at least 1, got 0"),
    (["verify", "{tmp}/d", "--workers", "-2"], "error: --workers must be at least 1, got -2"),
    (["create", "digits", "--out", "{tmp}/d", "--shard-cache", "{tmp}/cache"], "error: --shard-cache serves a URL"),
    (["verify", "{tmp}/d", "--shard-cache", "{tmp}/cache"], "error: --shard-cache serves a URL"),
])
def test_options_that_could_do_nothing_are_one_line(tmp_path, capsys, argv, wanted):
    assert run_make_shards([part.format(tmp=tmp_path) for part in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(wanted), lines
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_while_create_stages_its_arrays_is_named_as_full(tmp_path):
    import resource

    def at_most_50_kb() -> None:      # a real limit on file sizes: the kernel stops the write, as a full disk does
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    done = subprocess.run([sys.executable, "launch/make_shards.py", "create", "digits", "--out", str(tmp_path / "d"),
                           "--workers", "2"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          preexec_fn=at_most_50_kb, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: create failed at {tmp_path / 'd'} (a file cut short, ") and \
        "bytes requested and" in lines[0] and "the disk or a quota is full); free space" in lines[0], lines[0]
    assert not (tmp_path / "d" / ".staging").exists() and not (tmp_path / "d" / "manifest.json").exists()


def test_ctrl_c_while_make_shards_loads_is_one_line_and_exit_130(tmp_path):
    from tests.conftest import stop_while_loading

    status, _, err = stop_while_loading(["launch/make_shards.py", "create", "digits", "--out", str(tmp_path / "d")])
    lines = err.strip().splitlines()
    assert status == 130 and len(lines) == 1 and lines[0].startswith("stopped by SIGINT; run the same command"), err

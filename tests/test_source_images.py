"""Source images as users have them: other modes (16-bit, grey+alpha, palette, CMYK) decode alike in both
loader back ends; empty, unreadable and oversized files are refused before any shard is written; shards
know the inputs they were made from. Real image files, real shards, real DALI (CPU) and torch loaders."""

import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskcon import shards
from maskcon.datasets import DATASETS
from maskcon.datasets.source import MAX_IMAGE_PIXELS
from maskcon.errors import UserError
from maskcon.loaders import LoaderSpec, build_test_loader
from tests import sources


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def folder_source(src: Path, test_images: dict[str, bytes], extension: str) -> None:
    """One fine class per test image (so a batch's fine label names the image), plain RGB training images."""
    rng = np.random.default_rng(1)
    plain = png if extension == "png" else jpg
    (src / "test").mkdir(parents=True)
    (src / "fine_to_coarse.csv").write_text("fine,coarse\n" + "".join(f"{name},group{i % 2}\n"
                                                                      for i, name in enumerate(test_images)))
    for name, data in test_images.items():
        for split in ("train", "test"):
            (src / split / name).mkdir(parents=True, exist_ok=True)
        (src / "test" / name / f"a.{extension}").write_bytes(data)
        (src / "train" / name / f"a.{extension}").write_bytes(
            plain(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))))


def decoded(out: Path, names: list[str], backend: str) -> dict[str, np.ndarray]:
    """name -> 3 x 32 x 32 pixel levels (0..255) of each test image as the back end's test loader gives it."""
    recipe = DATASETS["cifar100"].recipe  # no resize at 32 px: the pixels as decoded
    mean, std = np.array(recipe.mean).reshape(1, 3, 1, 1), np.array(recipe.std).reshape(1, 3, 1, 1)
    loader = build_test_loader(out, LoaderSpec(image_size=32, batch_size=8, rank=0, world_size=1, device="cpu",
                                               backend=backend, recipe="cifar100",
                                               num_threads=1 if backend == "dali" else 0))
    found = {}
    for batch in loader:
        levels = np.round((batch["image"].numpy() * std + mean) * 255)  # float noise of the normalisation
        for fine, image in zip(batch["fine"].tolist(), levels):
            found[names[fine]] = image
    return found


def test_png_modes_decode_alike_in_both_back_ends(tmp_path):
    rng = np.random.default_rng(0)
    grey16 = (np.arange(32 * 32).reshape(32, 32) * 64 + 17).astype(np.uint16)  # 17 .. 65489
    grey_alpha = rng.integers(0, 256, (32, 32, 2), dtype=np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).quantize(16)
    images = {"grey16": png(Image.fromarray(grey16)), "grey_alpha": png(Image.fromarray(grey_alpha, "LA")),
              "palette": png(palette)}
    folder_source(tmp_path / "src", images, "png")
    shards.create("folder", tmp_path / "src", tmp_path / "out", workers=1)
    names = list(images)
    dali, torch_path = decoded(tmp_path / "out", names, "dali"), decoded(tmp_path / "out", names, "torch")
    for name in names:
        assert np.abs(dali[name] - torch_path[name]).max() <= 1, name
    expected = {"grey16": np.round(grey16 / 257.0),       # 16 bits to 8, rounded
                "grey_alpha": grey_alpha[:, :, 0],        # alpha dropped, grey to three equal channels
                "palette": np.asarray(palette.convert("RGB")).transpose(2, 0, 1)}
    for name, pixels in expected.items():
        assert np.abs(torch_path[name] - pixels).max() <= 1, name


def test_cmyk_and_grey_jpegs_decode_alike_in_both_back_ends(tmp_path):
    rng = np.random.default_rng(0)
    cmyk = Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "CMYK")
    images = {"cmyk": jpg(cmyk), "grey": jpg(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)))}
    folder_source(tmp_path / "src", images, "jpg")
    shards.create("folder", tmp_path / "src", tmp_path / "out", workers=1)
    names = list(images)
    dali, torch_path = decoded(tmp_path / "out", names, "dali"), decoded(tmp_path / "out", names, "torch")
    for name in names:
        assert np.array_equal(dali[name], torch_path[name]), name
    as_pil_reads_it = np.asarray(Image.open(io.BytesIO(images["cmyk"])).convert("RGB")).transpose(2, 0, 1)
    # re-encoded at quality 95, 4:4:4 (random pixels: JPEG's worst case); inverted colours would differ by ~128
    assert np.abs(torch_path["cmyk"] - as_pil_reads_it).mean() < 6


def bomb_jpeg() -> bytes:
    """A valid 16 x 16 JPEG whose frame header declares 60000 x 60000 pixels."""
    data = bytearray(jpg(Image.new("RGB", (16, 16), (200, 30, 30))))
    frame = data.index(b"\xff\xc0")  # baseline frame: marker, length, precision, height, width
    data[frame + 5:frame + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def test_bad_source_files_are_named_before_any_shard_is_written(tmp_path):
    src = tmp_path / "src"
    sources.write_folder(src)
    bomb = src / "train" / "beagle" / "bomb.jpg"
    bomb.write_bytes(bomb_jpeg())
    empty = src / "test" / "boxer" / "empty.jpg"
    empty.write_bytes(b"")
    cut = src / "train" / "poodle" / "cut.jpg"
    cut.write_bytes(b"\xff\xd8\xff\xe0\x00")  # a JPEG that ends inside its first header
    lines = []
    with pytest.raises(UserError) as caught:
        shards.create("folder", src, tmp_path / "out", workers=1, log=lines.append)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("3 source file(s) cannot be converted")
    named = [line for line in lines if line.startswith("bad source file:")]
    assert len(named) == 3
    assert any(str(bomb) in line and str(MAX_IMAGE_PIXELS) in line for line in named)
    assert any(str(empty) in line and "empty" in line for line in named)
    assert any(str(cut) in line and "header" in line for line in named)
    assert not (tmp_path / "out").exists()


def test_create_after_a_changed_coarse_map_is_refused_naming_it(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sources.write_folder(src, file_format="png")
    shards.create("folder", src, out, workers=1)
    manifest = (out / "manifest.json").read_bytes()
    csv = src / "fine_to_coarse.csv"
    csv.write_text(csv.read_text().replace("poodle,dog", "poodle,cat"))
    with pytest.raises(UserError) as caught:
        shards.create("folder", src, out, workers=1)
    message = str(caught.value)
    assert "\n" not in message and "the coarse map" in message and "--overwrite" in message
    assert (out / "manifest.json").read_bytes() == manifest
    rebuilt = shards.create("folder", src, out, workers=1, overwrite=True)
    assert rebuilt["coarse_classes"][rebuilt["fine_to_coarse"][rebuilt["fine_classes"].index("poodle")]] == "cat"


def test_an_interrupted_create_is_not_finished_from_another_source(tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    sources.write_folder(first, seed=0, file_format="png")
    sources.write_folder(second, seed=1, file_format="png")  # the same names and counts, other pixels

    def stop_after_the_first_shards(line: str) -> None:
        if line.startswith("folder: ") and "/" in line and not line.endswith("0/0 shards"):
            raise KeyboardInterrupt  # as a user's Ctrl-C between two shards

    with pytest.raises(KeyboardInterrupt):
        shards.create("folder", first, out, samples_per_shard=2, workers=1, log=stop_after_the_first_shards)
    written = sorted(p.name for p in (out / "train").glob("*.tar"))
    assert written and not (out / "manifest.json").exists()
    with pytest.raises(UserError, match="interrupted conversion of other inputs .*the source files.*--overwrite"):
        shards.create("folder", second, out, samples_per_shard=2, workers=1)
    with pytest.raises(UserError, match=r"other inputs \(--compress-level \d -> 9\)"):      # the option as typed
        shards.create("folder", first, out, samples_per_shard=2, workers=1, compress_level=9)
    manifest = shards.create("folder", first, out, samples_per_shard=2, workers=1)  # the same inputs resume
    assert manifest["source_files"]["folder"] == str(first.resolve())
    assert shards.verify(out, workers=1) == []
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 20
    touched = sorted(first.rglob("*.png"))[0]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))   # saved again, alike
    with pytest.raises(UserError, match=r"made from other inputs \(the source files \(36 files, .* as before, but "
                                        r"one was renamed or rewritten"):
        shards.create("folder", first, out, samples_per_shard=2, workers=1)


def test_an_image_cut_short_inside_is_named_by_create_and_the_same_command_finishes_once_it_is_replaced(tmp_path,
                                                                                                        monkeypatch):
    monkeypatch.setattr(shards, "CHECK_POOL_FILES", 0)      # read in the worker processes, as large sources are
    src = tmp_path / "src"
    sources.write_folder(src)
    victim = sorted((src / "train").rglob("*.jpg"))[3]
    whole = victim.read_bytes()
    victim.write_bytes(whole[:len(whole) * 2 // 3])      # a copy that stopped: the header reads, the pixels do not
    for workers in (1, 2):
        with pytest.raises(UserError, match=f"1 source file.* {victim}: its pixels do not decode") as caught:
            shards.create("folder", src, tmp_path / "out", workers=workers)
        assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()      # found before any shard
    victim.write_bytes(whole)
    manifest = shards.create("folder", src, tmp_path / "out", workers=2)
    assert manifest["splits"]["train"]["num_samples"] == len(list((src / "train").rglob("*.jpg")))


@pytest.mark.parametrize("file_format, other", [("png", "jpg"), ("jpg", "png")])
def test_an_image_of_the_other_format_under_the_name_of_this_one_is_named_before_any_shard(tmp_path, file_format,
                                                                                           other):
    src = tmp_path / "src"
    sources.write_folder(src, file_format=file_format)
    sources.write_folder(tmp_path / "other", file_format=other)
    victim = sorted((src / "train").rglob(f"*.{file_format}"))[2]      # a scraped file: a JPEG saved as .png
    victim.write_bytes(sorted((tmp_path / "other" / "train").rglob(f"*.{other}"))[0].read_bytes())
    wanted = (f"{victim}: its name says {file_format.upper()} but it holds a {other.upper()} image; convert it to "
              f"{file_format.upper()} (or rename it to .{other} when the dataset's images are {other.upper()})")
    with pytest.raises(UserError, match=f"1 source file.* {re.escape(wanted)}"):
        shards.create("folder", src, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
    victim.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(UserError, match=f"{victim}: its name says {file_format.upper()} but it holds no JPEG or PNG"):
        shards.create("folder", src, tmp_path / "out", workers=1)


def test_a_manifest_json_of_the_users_own_is_not_taken_for_shards_even_with_overwrite(tmp_path):
    src, out = tmp_path / "src", tmp_path / "mine"
    sources.write_folder(src)
    out.mkdir()
    (out / "manifest.json").write_text('{"my": "config"}')
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f"{out / 'manifest.json'} is not a shard manifest and {out} holds no "
                                            f"shards: not a shard folder .*choose another --out"):
            shards.create("folder", src, out, workers=1, overwrite=overwrite)
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
        assert (out / "manifest.json").read_text() == '{"my": "config"}'
    made = shards.create("folder", src, tmp_path / "shards", workers=1)
    (tmp_path / "shards" / "manifest.json").write_text("{")      # shards with their manifest damaged: rebuilt
    with pytest.raises(UserError, match="unreadable.*--overwrite"):
        shards.create("folder", src, tmp_path / "shards", workers=1)
    assert shards.create("folder", src, tmp_path / "shards", workers=1, overwrite=True) == made


def test_shards_written_into_their_own_source_are_refused_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    sources.write_folder(src)
    before = sorted(path.relative_to(src) for path in src.rglob("*"))
    for out in (src, src / "shards", src / "train" / "shards"):
        with pytest.raises(UserError, match=f"--out {out} lies inside --src {src}: .*choose an --out outside it"):
            shards.create("folder", src, out, workers=1)
    assert sorted(path.relative_to(src) for path in src.rglob("*")) == before
    assert shards.create("folder", src, tmp_path / "shards", workers=1)["dataset"] == "folder"   # beside it: fine


def test_a_stopped_overwrite_continues_when_run_again_without_overwrite(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sources.write_folder(src, file_format="png")
    shards.create("folder", src, out, samples_per_shard=2, workers=1)
    csv = src / "fine_to_coarse.csv"
    csv.write_text(csv.read_text().replace("poodle,dog", "poodle,cat"))      # needs --overwrite

    def stop_after_the_first_shards(line: str) -> None:
        if line.startswith("folder: ") and "/" in line and not line.endswith("0/0 shards"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        shards.create("folder", src, out, samples_per_shard=2, workers=1, overwrite=True,
                      log=stop_after_the_first_shards)
    lines = []
    manifest = shards.create("folder", src, out, samples_per_shard=2, workers=1, log=lines.append)
    assert manifest["coarse_classes"][manifest["fine_to_coarse"][manifest["fine_classes"].index("poodle")]] == "cat"
    finished = [int(found) for line in lines for found in re.findall(r"\((\d+) finished before\)", line)]
    assert finished and max(finished) > 0, lines                                # it continued, not afresh
    assert shards.verify(out, workers=1) == []

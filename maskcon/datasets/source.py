"""What every dataset reader returns: class names, the fine -> coarse map, and lazily read splits.

A split is a sequence of samples: `len(split)` and `split.item(i) -> Sample`. Splits are cheap to pickle
(they hold paths, never pixels) so that a process pool can call `item(i)` in every worker; each process
loads what it needs once and keeps it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from maskcon.errors import UserError
# MAX_IMAGE_PIXELS: the pixel cap, refused before any shard is written
from maskcon.shard_format import IMAGE_MAGIC, IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, PNG_SIGNATURE


@dataclass(frozen=True)
class Sample:
    key: str  # names the source item: zero-padded source index, or the key-safe relative path
    image: bytes | np.ndarray  # encoded file bytes (passed through), or uint8 H x W / H x W x C pixels
    fine: int
    coarse: int


class Split:
    """A sequence of samples read lazily from the source."""

    def __len__(self) -> int:
        raise NotImplementedError

    def item(self, i: int) -> Sample:
        raise NotImplementedError

    def check(self, executor) -> list[str]:
        """One line per source file that cannot become a sample, read before any is converted (default:
        none; array sources are checked as they load); executor: where the files are read (its map)."""
        return []

    def staged(self, work_dir: Path) -> "Split":
        """A split with the same samples that worker processes can open cheaply (default: itself)."""
        return self


@dataclass
class DatasetSource:
    name: str
    fine_classes: list[str]
    coarse_classes: list[str]
    fine_to_coarse: list[int]
    image_format: str  # "png" (pixels, encoded losslessly) or "jpg" (file bytes, passed through)
    image_size: tuple[int, int] | None  # (h, w), or None when images vary in size
    channels: int
    splits: dict[str, Split]
    notes: dict = field(default_factory=dict)  # provenance written into the manifest (pixel maps, key rule)


# ---------------------------------------------------------------------------------------------- arrays


_ARRAYS: dict[str, tuple] = {}  # per-process cache: digest of (function, args) -> arrays, the last few splits


def _arrays_once(cache_key: str, load: Callable, args: tuple) -> tuple:
    if cache_key not in _ARRAYS:
        while len(_ARRAYS) >= 2:  # bound memory: a process works on one or two splits at a time
            _ARRAYS.pop(next(iter(_ARRAYS)))
        _ARRAYS[cache_key] = load(*args)
    return _ARRAYS[cache_key]


class ArraySplit(Split):
    """Samples held as arrays: images, fine (N,), coarse (N,), source index (N,).

    `load(*args)` is a module-level function returning (images, fine, coarse, source_index); it runs at
    most once per process (args must be hashable: paths as str, ints). Images are N x H x W (grey),
    N x H x W x C, or N x C x H x W when `channels_first` (the channel-planar rows of CIFAR and downsampled
    ImageNet, transposed one image at a time). Keys are the zero-padded source index, `key_width` digits.
    `length` may be None: it is then read from the arrays (which loads them).
    """

    def __init__(self, load: Callable, args: tuple, length: int | None, key_width: int,
                 channels_first: bool = False):
        self.load = load
        self.args = tuple(args)
        self.length = length
        self.key_width = key_width
        self.channels_first = channels_first
        self.cache_key = hashlib.sha256(repr((load.__module__, load.__qualname__, self.args)).encode()).hexdigest()
        self._arrays = None  # this process's arrays, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> tuple:
        if self._arrays is None:
            self._arrays = _arrays_once(self.cache_key, self.load, self.args)
        return self._arrays

    def __len__(self) -> int:
        if self.length is None:
            self.length = len(self.arrays()[1])
        return self.length

    def item(self, i: int) -> Sample:
        images, fine, coarse, source_index = self.arrays()
        image = images[i].transpose(1, 2, 0) if self.channels_first else images[i]
        return Sample(key=str(int(source_index[i])).zfill(self.key_width), image=image,
                      fine=int(fine[i]), coarse=int(coarse[i]))

    def staged(self, work_dir: Path) -> "ArraySplit":
        """Write the arrays once as .npy files that every worker memory-maps (shared page cache)."""
        work_dir.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays()
        names = ("images", "fine", "coarse", "source_index")
        for name, array in zip(names, arrays):
            np.save(work_dir / f"{name}.npy", np.ascontiguousarray(array))
        _ARRAYS.pop(self.cache_key, None)  # from now on the workers read the files
        self._arrays = None
        return ArraySplit(_load_npy, (str(work_dir),), len(self), self.key_width, self.channels_first)


def _load_npy(work_dir: str):
    return tuple(np.load(Path(work_dir) / f"{name}.npy", mmap_mode="r")
                 for name in ("images", "fine", "coarse", "source_index"))


# ------------------------------------------------------------------------------------------- functions


class FunctionSplit(Split):
    """Samples made by functions of their position (synthetic data for tests and benchmarks).

    image(i) -> uint8 pixels or encoded file bytes; labels(i) -> (fine, coarse); keys are the zero-padded
    position, `key_width` digits. It pickles (for a process pool) only when the functions do.
    """

    def __init__(self, length: int, image: Callable[[int], bytes | np.ndarray],
                 labels: Callable[[int], tuple[int, int]], key_width: int = 8):
        self.length, self.image, self.labels, self.key_width = length, image, labels, key_width

    def __len__(self) -> int:
        return self.length

    def item(self, i: int) -> Sample:
        fine, coarse = self.labels(i)
        return Sample(key=str(i).zfill(self.key_width), image=self.image(i), fine=int(fine), coarse=int(coarse))


# ----------------------------------------------------------------------------------------------- files


class FileSplit(Split):
    """Samples that are image files under `root`, passed through byte for byte."""

    def __init__(self, root: Path, paths: list[str], fine: list[int], coarse: list[int]):
        self.root = Path(root)
        self.paths = list(paths)  # relative to root, with "/" separators
        self.fine = [int(f) for f in fine]
        self.coarse = [int(c) for c in coarse]
        path_of_key: dict[str, str] = {}
        for path in self.paths:
            key = key_from_path(path)
            if key in path_of_key:
                raise UserError(f"{self.root / path_of_key[key]} and {self.root / path} give the same sample key "
                                f"{key}; rename one of them")
            path_of_key[key] = path

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int) -> Sample:
        path = self.root / self.paths[i]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UserError(f"cannot read image {path}: {error.strerror}; is the dataset folder complete?") from None
        return Sample(key=key_from_path(self.paths[i]), image=decoded_alike(data, path), fine=self.fine[i],
                      coarse=self.coarse[i])

    def check(self, executor) -> list[str]:
        files = [self.root / path for path in self.paths]
        return [f"{file}: {problem}" for file, problem in zip(files, executor.map(file_problem, files, chunksize=64))
                if problem is not None]


def file_problem(path: Path) -> str | None:
    """What makes the image file at PATH unusable, in a few words (empty, another format than its name says,
    unreadable header, more pixels than MAX_IMAGE_PIXELS, pixels that do not decode: a file cut short or damaged
    inside), or None."""
    from PIL import Image

    try:
        if path.stat().st_size == 0:
            return "empty file"
        named = IMAGE_SUFFIXES.get(path.suffix.lower())
        with open(path, "rb") as handle:
            head = handle.read(8)
        held = next((kind for kind, magic in IMAGE_MAGIC.items() if head.startswith(magic)), None)
        if named is not None and held != named:
            return (f"its name says {named.upper()} but it holds " + (
                f"a {held.upper()} image; convert it to {named.upper()} (or rename it to .{held} when the dataset's "
                f"images are {held.upper()})" if held else "no JPEG or PNG image"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height <= MAX_IMAGE_PIXELS:
                    try:
                        image.load()
                    except (OSError, ValueError, SyntaxError, struct.error) as error:
                        return f"its pixels do not decode ({error})"
    except Image.DecompressionBombError:
        return f"declares more than {MAX_IMAGE_PIXELS} pixels (the limit)"
    except OSError as error:  # PIL's UnidentifiedImageError included
        return f"unreadable image header ({error.strerror or error})"
    except (ValueError, SyntaxError, struct.error) as error:
        return f"unreadable image header ({error})"
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width} x {height} pixels, more than the limit of {MAX_IMAGE_PIXELS} (8192 x 8192)"
    return None


JPEG_QUALITY = 95  # of a JPEG re-encoded because the loaders would decode its colours differently


def decoded_alike(data: bytes, path: Path) -> bytes:
    """The image file DATA as it goes into the shards: unchanged when every loader back end decodes it to
    the same 8-bit pixels, else converted to 8-bit RGB.

    Unchanged: 8-bit grey or RGB PNGs; JPEGs that PIL reads as grey or RGB. Converted: PNGs of 16 bits per
    channel (grey: v / 257 rounded; colour: the high byte, as PIL reads it), with alpha, or with a palette,
    to an 8-bit RGB PNG; CMYK and YCCK JPEGs
    to an RGB JPEG (quality JPEG_QUALITY, no chroma subsampling). Alpha is dropped, never composited: the
    colour channels are kept as stored, as both decoders do for 8-bit RGBA.
    """
    if data.startswith(PNG_SIGNATURE) and len(data) > 25 and data[24] == 8 and data[25] in (0, 2):
        return data  # IHDR: bit depth 8, colour type grey (0) or RGB (2)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and image.mode in ("L", "RGB"):
                return data
            pixels = rgb8(image)
            kind = image.format
    except (OSError, ValueError, SyntaxError) as error:
        raise UserError(f"cannot decode image {path} ({error}); replace the file or remove it from SRC") from None
    buffer = io.BytesIO()
    if kind == "JPEG":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb8(image) -> np.ndarray:
    """H x W x 3 uint8 pixels of a PIL image of any mode (16-bit values / 257, rounded; alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.round(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def key_from_path(relative_path: str) -> str:
    """A relative path made key-safe: every character other than letters, digits, '_' and '-' becomes '_'.

    Tar readers (DALI, webdataset) split a member name at its first '.', so keys carry no dots or slashes.
    """
    return _UNSAFE.sub("_", relative_path)


# --------------------------------------------------------------------------------------------- helpers


def describe_files(folder: Path) -> dict:
    """What identifies the files under FOLDER (recursively, links followed, hidden names skipped): their
    count, total bytes and a sha256 over every relative path, size and modification time (ns). Equal for
    the same files wherever the folder lies; different when a file is added, removed, resized or rewritten."""
    lines, total = [], 0
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            if name.startswith("."):
                continue
            path = Path(directory) / name
            stat = path.stat()
            lines.append(f"{path.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
            total += stat.st_size
    digest = hashlib.sha256("".join(sorted(lines)).encode())
    count = len(lines)
    return {"folder": str(Path(folder).resolve()), "files": count, "bytes": total, "sha256": digest.hexdigest()}


def source_folder(src: Path | str | None, dataset: str, where_to_get: str) -> Path:
    """The --src folder a converter reads; UserError when it is not given, missing, or not a folder."""
    if src is None:
        raise UserError(f"{dataset} needs --src; {where_to_get}")
    src = Path(src)
    if not src.exists():
        raise UserError(f"--src {src} does not exist; {where_to_get}")
    if not src.is_dir():
        raise UserError(f"--src {src} is not a folder; {where_to_get}")
    return src


def find_folder(src: Path, name: str, marker: str, where_to_get: str) -> Path:
    """SRC (a folder, see source_folder) itself when it holds `marker`, else SRC/name when that does."""
    for folder in (src, src / name):
        if (folder / marker).exists():
            return folder
    raise UserError(f"{src} holds neither {marker} nor {name}/{marker}; {where_to_get}")


def load_json(path: Path, where_to_get: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"missing {path}; {where_to_get}") from None
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not a readable JSON file; {where_to_get}") from None


# What the pickled CIFAR and downsampled-ImageNet batches hold: dicts, lists, strings, bytes and numbers (no
# global needed) and numpy arrays, rebuilt from these functions; `_codecs.encode` is how Python 3 pickles
# bytes at protocol 2. Nothing else is looked up, so a crafted file cannot call os.system or open().
PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
})


class ForbiddenPickle(pickle.UnpicklingError):
    """A pickle asked for a global outside PICKLE_GLOBALS."""


class _SourceUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise ForbiddenPickle(f"{module}.{name}")
        return super().find_class(module, name)


def load_pickle(path: Path, where_to_get: str) -> dict:
    """A pickled dict from the CIFAR / downsampled-ImageNet releases, with str keys, read by an unpickler
    that admits only PICKLE_GLOBALS."""
    try:
        with open(path, "rb") as handle:
            content = _SourceUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"missing {path}; {where_to_get}") from None
    except ForbiddenPickle as error:
        raise UserError(f"{path} holds a pickled {error}, which the official files never hold (such a file can "
                        f"run code; it was not run); {where_to_get}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as error:
        cut = isinstance(error, EOFError) or "truncated" in str(error)
        what = "ends before its pickled batch does (cut short?)" if cut else "is not a pickled batch of the expected format"
        raise UserError(f"{path} {what}; {where_to_get}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path} is not a pickled batch of the expected format; {where_to_get}")
    return {_text(key): _text(value) for key, value in content.items()}


def _text(value):
    """Names as str: the release's Python 2 pickles give str, but a batch loaded with encoding="bytes" and saved
    again by Python 3 (as the CIFAR page's own loader does) holds bytes, for keys and for lists of class names."""
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, list) and value and all(isinstance(item, bytes) for item in value):
        return [item.decode("latin1") for item in value]
    return value


def require_keys(content: dict, keys: tuple[str, ...], path: Path, where_to_get: str) -> None:
    missing = [k for k in keys if k not in content]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not the expected format; {where_to_get}")


def planar_rows_to_images(data: np.ndarray, path: Path, where_to_get: str, side: int = 32) -> np.ndarray:
    """Rows of 3 * side * side bytes, channel-planar (all R, all G, all B) -> N x 3 x side x side uint8."""
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * side * side or data.dtype != np.uint8:
        raise UserError(f"{path} holds rows of {data.shape[1:]} {data.dtype} instead of {3 * side * side} "
                        f"bytes; {where_to_get}")
    return data.reshape(-1, 3, side, side)

"""The shard format in one place: folder layout, member names, labels, DALI index files and the manifest.

The writer (maskcon/shards.py), the loaders, the plots and `verify` all name, parse and check shards
through this module; shards/README.md describes the same format for people. A shard folder OUT holds

    manifest.json                  written last: its presence means every shard is complete
    train/train-000000.tar  .idx   each tar with its DALI index file (DALI's wds2idx format, v1.2)
    test/test-000000.tar    .idx

and every sample is three tar members named `<key>.<extension>`: the image (`png` or `jpg`), `fine` and
`coarse` (8-byte little-endian int64 labels). A key holds no '.' and no '/'.
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import struct
import tarfile
import zlib
from pathlib import Path
from typing import NamedTuple

from maskcon.errors import UserError, door

SPLITS = ("train", "test")
MANIFEST = "manifest.json"
PLAN = ".plan.json"  # present while a conversion is unfinished (written and removed by the writer)
IMAGE_FORMATS = ("png", "jpg")
LABEL_MEMBERS = ("fine", "coarse")
LABEL_ENCODING = "int64 little-endian"
LABEL_BYTES = 8
INDEX_VERSION = "v1.2"  # DALI wds2idx: "v1.2 <samples>", then per sample "<ext> <offset> <size> <name>" per member
MANIFEST_KEYS = ("dataset", "version", "image_format", "image_size", "channels", "label_encoding",
                 "fine_classes", "coarse_classes", "fine_to_coarse", "options", "splits")
SHARD_KEYS = ("tar", "index", "num_samples", "sha256")  # in every shard record; see shard_record for the rest
# The most pixels (height x width) an image of a shard may declare: a larger header is a damaged file or a
# decompression bomb, and every reader refuses it before decoding (8192 x 8192, a 201 MB RGB image).
MAX_IMAGE_PIXELS = 8192 * 8192


# --------------------------------------------------------------------------------------------- names


def shard_names(split: str, number: int) -> tuple[str, str]:
    """(tar, index) paths of shard `number` of a split, relative to the shard folder."""
    stem = f"{split}/{split}-{number:06d}"
    return stem + ".tar", stem + ".idx"


def member_name(key: str, extension: str) -> str:
    """The tar member name of one part of a sample: `<key>.<extension>`."""
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
    return f"{key}.{extension}"


def split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member name, split as DALI and webdataset do: at the first '.' after the
    last '/'. None for a name that belongs to no sample (no extension, or a hidden file)."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return None
    key = name[:dot]
    if not key or key.endswith("/"):
        return None
    return key, name[dot + 1:]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_MAGIC = {"jpg": b"\xff\xd8\xff", "png": PNG_SIGNATURE}   # first bytes of every file of each image format
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png"}   # a source file's name -> its image format


def png_problem(data: bytes) -> str | None:
    """What is wrong with a PNG file, in a few words, or None when its chunks are whole: every chunk within
    the data, every chunk's CRC-32 right, and the file ending in IEND. A few microseconds per 32-px image
    (no decoding), so loaders can check each sample once before a decoder that does not survive damage."""
    if data[:8] != PNG_SIGNATURE:
        return "not a PNG file: its signature is wrong"
    position = 8
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        end = position + 12 + length
        if end > len(data):
            return f"its {kind.decode(errors='replace')} chunk runs past the end of the file"
        if zlib.crc32(data[position + 4:end - 4]) != struct.unpack(">I", data[end - 4:end])[0]:
            return f"its {kind.decode(errors='replace')} chunk fails its CRC check"
        if kind == b"IEND":
            return None
        position = end
    return "it ends before its IEND chunk"


def image_shape(data) -> tuple[int, int]:
    """(height, width) a PNG or JPEG file declares in its header (bytes or a uint8 array); (0, 0) when the
    data is neither or its header is missing."""
    head = bytes(data[:24])
    if head[:8] == PNG_SIGNATURE and len(head) == 24:  # IHDR: width, height as big-endian uint32
        width, height = struct.unpack(">II", head[16:24])
        return height, width
    if head[:2] == b"\xff\xd8":
        offset, end = 2, len(data)
        while offset + 9 < end:  # JPEG markers up to the first start-of-frame
            if data[offset] != 0xFF:
                offset += 1
                continue
            marker = int(data[offset + 1])
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                offset += 1 if marker == 0xFF else 2
                continue
            length = int(data[offset + 2]) << 8 | int(data[offset + 3])
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height = int(data[offset + 5]) << 8 | int(data[offset + 6])
                width = int(data[offset + 7]) << 8 | int(data[offset + 8])
                return height, width
            offset += 2 + length
    return 0, 0


def too_many_pixels(height: int, width: int) -> str | None:
    """Why an image that declares height x width pixels is refused (MAX_IMAGE_PIXELS), or None."""
    if height * width > MAX_IMAGE_PIXELS:
        return f"its header declares {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} allowed"
    return None


def encode_label(value: int) -> bytes:
    return struct.pack("<q", value)


def decode_label(data: bytes) -> int:
    """A label member's value; ValueError when it is not 8 bytes."""
    if len(data) != LABEL_BYTES:
        raise ValueError(f"a label member holds {LABEL_BYTES} bytes, not {len(data)}")
    return struct.unpack("<q", data)[0]


# --------------------------------------------------------------------------------------------- index


class Member(NamedTuple):
    extension: str
    offset: int  # bytes from the start of the tar to the member's data (its header is the 512 bytes before)
    size: int  # bytes of data
    name: str


class IndexEntry(NamedTuple):
    """One line of an index file: a sample's key and its members by extension."""

    key: str
    members: dict[str, Member]

    @property
    def image(self) -> Member | None:
        for extension in IMAGE_FORMATS:
            if extension in self.members:
                return self.members[extension]
        return None


def format_index(samples: list[list[Member]]) -> str:
    """The text of an index file: the header, then one line per sample listing its members in tar order."""
    lines = [" ".join(f"{m.extension} {m.offset} {m.size} {m.name}" for m in members) for members in samples]
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)


def index_of_tar(tar_path: Path | str) -> str:
    """The index file of an existing tar, as DALI's wds2idx writes it: consecutive members with one key
    form a sample; members that belong to no sample are left out."""
    samples: list[list[Member]] = []
    last_key = None
    with tarfile.open(tar_path, "r:") as archive:
        for member in archive:
            parts = split_member(member.name) if member.isreg() else None
            if parts is None:
                continue
            entry = Member(parts[1], member.offset_data, member.size, member.name)
            if parts[0] != last_key:
                samples.append([entry])
                last_key = parts[0]
            else:
                samples[-1].append(entry)
    return format_index(samples)


def index_header(index_path: Path | str) -> tuple[str, int]:
    """(version, sample count) from an index file's first line; ValueError when it has none."""
    with open(index_path) as handle:
        return _parse_header(handle.readline())


def _parse_header(line: str) -> tuple[str, int]:
    fields = line.split()
    if len(fields) != 2 or not fields[1].isdigit():
        raise ValueError("its first line is not '<version> <samples>'")
    return fields[0], int(fields[1])


def _parse_line(line: str) -> IndexEntry:
    fields = line.split()
    if not fields or len(fields) % 4:
        raise ValueError("a line does not hold whole '<ext> <offset> <size> <name>' groups")
    members = {}
    for i in range(0, len(fields), 4):
        extension, offset, size, name = fields[i:i + 4]
        members[extension] = Member(extension, int(offset), int(size), name)
    parts = split_member(fields[3])
    if parts is None:
        raise ValueError(f"member {fields[3]!r} names no sample")
    return IndexEntry(parts[0], members)


def read_index(index_path: Path | str) -> list[IndexEntry]:
    """Every sample of an index file, in tar order; each holds an image, `fine` and `coarse` member.

    UserError (naming the file and the remedy) when the file is not such an index.
    """
    try:
        with open(index_path) as handle:
            version, count = _parse_header(handle.readline())
            entries = [_parse_line(line) for line in handle]
        if version != INDEX_VERSION:
            raise ValueError(f"version {version}, not {INDEX_VERSION}")
        if len(entries) != count:
            raise ValueError(f"its header says {count} samples but it lists {len(entries)}")
        for entry in entries:
            if entry.image is None or any(label not in entry.members for label in LABEL_MEMBERS):
                raise ValueError(f"sample {entry.key} lacks an image, fine or coarse member")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        folder = Path(index_path).parent.parent
        raise UserError(f"index file {index_path} is damaged ({error}); {remedy(folder)}") from None
    return entries


def key_at(index_path: Path | str, offset: int) -> str | None:
    """The key of the sample whose member data starts at or spans byte `offset` of the tar the index
    describes (DALI names a sample "<tar>:<offset>:<member name>"); None when no member is there."""
    for entry in read_index(index_path):
        for member in entry.members.values():
            if member.offset <= offset < member.offset + max(member.size, 1):
                return entry.key
    return None


def _last_member_end(index_path: Path) -> int:
    """Byte just past the data of the last member the index lists (read from the file's end only)."""
    with open(index_path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        block = 4096
        while True:
            start = max(0, size - block)
            handle.seek(start)
            lines = handle.read(size - start).rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                break
            block *= 4
    last = _parse_line(lines[-1].decode())
    return max(member.offset + member.size for member in last.members.values())


# ------------------------------------------------------------------------------------------ manifest


def shard_record(tar: str, index: str, num_samples: int, sha256: str, tar_bytes: int, index_bytes: int,
                 index_sha256: str | None = None) -> dict:
    """One shard's entry in the manifest: paths relative to the folder, samples, checksums, file sizes.

    Manifests written before the sizes were recorded lack `tar_bytes` and `index_bytes`, and those written
    before the index's checksum lack `index_sha256`; readers accept them (a staged index is then checked by
    its size alone).
    """
    record = {"tar": tar, "index": index, "num_samples": num_samples, "sha256": sha256, "tar_bytes": tar_bytes,
              "index_bytes": index_bytes}
    return record if index_sha256 is None else {**record, "index_sha256": index_sha256}


def remedy(folder: Path | str, manifest: dict | None = None) -> str:
    """What to run about damaged shards under `folder`: the verify command, then the one that re-creates them."""
    return (f"list every damaged shard with {door('make_shards')} verify {folder} and re-create them with "
            f"{_create_command(folder, manifest)}")


def recreate(folder: Path | str, out: Path | str | None = None) -> str:
    """What re-creates the shards of `folder` (a local folder, or the staged copy of the remote `out`) from their
    source, from its manifest where it can be read."""
    manifest = _json(Path(folder) / MANIFEST)
    return f"re-create them with {_create_command(out or folder, manifest if isinstance(manifest, dict) else None)}"


def _create_command(folder: Path | str, manifest: dict | None) -> str:
    if manifest is not None and manifest.get("create_args"):  # recorded by `create`; older manifests lack it
        made_by = shlex.join(manifest["create_args"])
    else:
        made_by = f"{manifest.get('dataset', 'DATASET') if manifest is not None else 'DATASET'} --src SRC"
    return f"{door('make_shards')} create {made_by} --out {folder} --overwrite"


SOURCE_FILES = ("fine_to_coarse.csv", "meta", "batches.meta", "val_data", "val_data.npz")   # a download's own


def _looks_like_a_source(folder: Path, looked_at: int = 2000, *, nested: bool = False) -> bool:
    """Whether FOLDER holds a download (an image folder, CIFAR's or ImageNet32's files) rather than shards: a
    look at its first `looked_at` files, no more (`nested`: only images in its subfolders count, as a dataset
    keeps them; loose pictures beside a run's files do not)."""
    if any((folder / name).is_file() for name in SOURCE_FILES):
        return True
    files = (name for place, _, names in os.walk(folder) if not nested or Path(place) != folder for name in names)
    return any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in itertools.islice(files, looked_at))


def data_in(folder: Path, *, sources: bool = True) -> str | None:
    """What dataset files FOLDER holds, in words ("shards", or with `sources` "a dataset's source files"), or
    None: a run writing there would mix its files into a dataset."""
    if (folder / PLAN).exists() or (folder / MANIFEST).is_file() and _is_manifest(_json(folder / MANIFEST)):
        return "shards"
    return ("a dataset's source files" if sources and folder.is_dir() and _looks_like_a_source(folder, nested=True)
            else None)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def check_folder_for_digits(folder: Path | str) -> None:
    """UserError when FOLDER, where the bundled digits' shards are written on first use, holds files that are
    neither shards nor an interrupted conversion's: a folder of the user's own stays as it is."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / PLAN).exists() and next(folder.iterdir(), None) is not None:
        what = "a dataset's source files" if _looks_like_a_source(folder) else "files of its own"
        raise UserError(f"{folder} holds {what} and no shards; the bundled digits' shards are written only into a "
                        f"new or empty folder: choose another --shards, or leave --shards out")


def read_manifest(folder: Path | str, dataset: str = "DATASET") -> dict:
    """The manifest of the shards under `folder`; UserError when it is missing or malformed, naming the command
    that makes them (for `dataset`, when the caller knows it)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        if _looks_like_a_source(Path(folder)):
            raise UserError(f"{folder} holds a dataset's source files, not shards; make its shards in a folder of "
                            f"their own with {door('make_shards')} create {dataset} --src {folder} --out "
                            f"shards/NAME, and pass that folder")
        hint = " (a conversion was interrupted: rerun the same create command)" if (Path(folder) / PLAN).exists() else ""
        raise UserError(f"no complete shards at {folder}: {path} is missing{hint}; make them with "
                        f"{door('make_shards')} create {dataset} --src SRC --out {folder}")
    manifest = _json(path)
    if not _is_manifest(manifest):
        raise UserError(f"{path} is not a maskcon shard manifest; recreate the shards with "
                        f"{door('make_shards')} create {dataset} --src SRC --out {folder} --overwrite")
    return manifest


def _is_manifest(manifest) -> bool:
    if not isinstance(manifest, dict) or any(key not in manifest for key in MANIFEST_KEYS):
        return False
    if manifest["image_format"] not in IMAGE_FORMATS or manifest["label_encoding"] != LABEL_ENCODING:
        return False
    splits = manifest["splits"]
    return isinstance(splits, dict) and all(
        isinstance(split, dict) and isinstance(split.get("num_samples"), int) and isinstance(split.get("shards"), list)
        and all(isinstance(record, dict) and all(key in record for key in SHARD_KEYS) for record in split["shards"])
        for split in splits.values())


def _split_records(folder: Path | str, manifest: dict, split: str) -> list[dict]:
    if split not in manifest["splits"]:
        raise UserError(f"the shards at {folder} have no {split!r} split (they have {', '.join(manifest['splits'])})")
    return manifest["splits"][split]["shards"]


def split_files(folder: Path | str, split: str, manifest: dict | None = None) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) of one split, in shard order; `manifest` saves reading it again."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    records = _split_records(folder, manifest, split)
    return [str(Path(folder) / r["tar"]) for r in records], [str(Path(folder) / r["index"]) for r in records]


# ---------------------------------------------------------------------------------------- pre-flight


def shard_problem(folder: Path | str, record: dict) -> str | None:
    """What is wrong with one shard, judged from file sizes and the index alone (the tar is not read):
    None when it looks intact. `verify` reads every sample; this is the check before every run."""
    tar, index = Path(folder) / record["tar"], Path(folder) / record["index"]
    if not tar.is_file():
        return "is missing"
    tar_bytes = tar.stat().st_size
    if "tar_bytes" in record and tar_bytes != record["tar_bytes"]:
        return f"is {tar_bytes} bytes long, the manifest says {record['tar_bytes']} (cut short or replaced)"
    if not index.is_file():
        return f"has lost its index {record['index']}"
    if "index_bytes" in record and index.stat().st_size != record["index_bytes"]:
        return f"has an index {record['index']} of {index.stat().st_size} bytes, the manifest says {record['index_bytes']}"
    try:
        version, count = index_header(index)
        if version != INDEX_VERSION:
            return f"has an index {record['index']} of version {version}, not {INDEX_VERSION}"
        if count != record["num_samples"]:
            return f"has an index {record['index']} of {count} samples, the manifest says {record['num_samples']}"
        end = _last_member_end(index)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"has an unreadable index {record['index']} ({error})"
    if end > tar_bytes:
        return f"ends at byte {tar_bytes}, before its last sample (byte {end}): it was cut short"
    return None


def check_split(folder: Path | str, split: str, manifest: dict | None = None) -> None:
    """Check every shard of a split against the manifest without reading the tars: tar present and of the
    recorded size, index present, of the recorded size, with the manifest's sample count, and its last
    member inside the tar. Raises UserError naming the first damaged shard and the remedy.

    Folders written before the manifest recorded file sizes get every check but the two sizes.
    """
    manifest = manifest if manifest is not None else read_manifest(folder)
    damaged = [(record, problem) for record in _split_records(folder, manifest, split)
               if (problem := shard_problem(folder, record)) is not None]
    if damaged:
        record, problem = damaged[0]
        more = f" (and {len(damaged) - 1} more damaged shards)" if len(damaged) > 1 else ""
        raise UserError(f"shard {Path(folder) / record['tar']} {problem}{more}; {remedy(folder, manifest)}")

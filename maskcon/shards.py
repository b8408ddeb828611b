"""Writing and verifying WebDataset shards in the format of maskcon/shard_format.py (shards/README.md).

Images are `<key>.png` (lossless PNG of array pixels) or `<key>.jpg` (the source file byte for byte).
Samples are written in a shuffled order fixed by the seed; every shard of a split holds
`samples_per_shard` samples except the last. Shards are written by a process pool, each under a temporary
name renamed when complete, so an interrupted run resumes where it stopped and gives byte for byte the
files of an uninterrupted run. The manifest, written last, records each shard's checksum and file sizes.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import struct
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from maskcon import count, usable_cpus, write_atomic
from maskcon.errors import UserError, file_in_the_way
from maskcon.shard_format import (IMAGE_MAGIC, LABEL_BYTES, LABEL_ENCODING, LABEL_MEMBERS, MANIFEST, PLAN, PNG_SIGNATURE, SPLITS,
                                  Member, decode_label, encode_label, format_index, index_of_tar, member_name,
                                  read_manifest, shard_names, shard_problem, shard_record, split_member)

if TYPE_CHECKING:
    from maskcon.datasets.source import DatasetSource

CHECK_POOL_FILES = 512   # source files read whole in a pool of the workers above this many (below: no pool to start)
MIN_SHARDS = 64  # per split where the data allows: more than 8 GPUs x loader workers read at once
MAX_SAMPLES_PER_SHARD = 10_000  # ImageNet32 train: 129 shards of ~25 MB
PNG_COMPRESS_LEVEL = 6  # zlib level of PNG image data (lossless at every level)
_PARTIAL = ".partial"  # suffix of files being written; never read as shards
_PROGRESS = ".progress.jsonl"  # one line per finished shard (its checksum) of an unfinished run
_STAGING = ".staging"  # arrays written once for the worker processes to memory-map


def _version() -> str:
    import maskcon

    return getattr(maskcon, "__version__", "0+unknown")


# ------------------------------------------------------------------------------------------ encodings


def encode_png(pixels: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Lossless 8-bit PNG of H x W (grey) or H x W x 3 (RGB) uint8 pixels."""
    return encode_pngs(np.asarray(pixels)[None], compress_level)[0]


def encode_pngs(batch: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> list[bytes]:
    """Lossless 8-bit PNGs of N x H x W (grey) or N x H x W x 3 (RGB) uint8 pixels, one per image.

    Every row uses PNG filter type 1 ("Sub": each byte minus the byte one pixel to its left, modulo 256),
    computed for the whole batch at once; zlib at `compress_level` (0..9, lossless at every level).
    """
    if batch.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8, got {batch.dtype}")
    if batch.ndim == 3 or (batch.ndim == 4 and batch.shape[3] == 1):
        colour_type, channels = 0, 1
    elif batch.ndim == 4 and batch.shape[3] == 3:
        colour_type, channels = 2, 3
    else:
        raise ValueError(f"PNG pixels must be H x W or H x W x 3, got {batch.shape[1:]}")
    count, height, width = batch.shape[:3]
    flat = batch.reshape(count, height, width * channels)
    rows = np.empty((count, height, 1 + width * channels), dtype=np.uint8)  # N x H x (1 + W*C)
    rows[:, :, 0] = 1  # filter type "Sub"
    rows[:, :, 1:1 + channels] = flat[:, :, :channels]
    np.subtract(flat[:, :, channels:], flat[:, :, :-channels], out=rows[:, :, 1 + channels:])
    head = PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    tail = _png_chunk(b"IEND", b"")
    return [head + _png_chunk(b"IDAT", zlib.compress(image_rows.tobytes(), compress_level)) + tail
            for image_rows in rows]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # archives end padded to a whole record, as GNU tar and tarfile write them


def _tar_template() -> bytes:
    """The constant fields of our ustar headers: regular file, mode 0444, owner 0/0, mtime 0.

    Headers are byte for byte those of Python's tarfile (USTAR_FORMAT) for the same name and size.
    """
    header = bytearray(_TAR_BLOCK)
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime (0: output does not depend on when it was made)
    header[148:156] = b"        "  # checksum field, counted as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"  # devmajor, devminor, uname, gname, prefix: empty
    return bytes(header)


_TEMPLATE = _tar_template()
_TEMPLATE_SUM = sum(_TEMPLATE)


def _tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file named `name` (ASCII, at most 100 bytes) of `size` bytes."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise UserError(f"sample name {name!r} is longer than the 100 characters a tar header holds; "
                        "use shorter file names in the source")
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(encoded) + sum(size_field)
    return b"".join((encoded, bytes(100 - len(encoded)), _TEMPLATE[100:124], size_field, _TEMPLATE[136:148],
                     b"%06o\0 " % checksum, _TEMPLATE[156:]))


class _TarBuilder:
    """Builds a tar archive in memory and the matching DALI index as it goes."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.offset = 0
        self.samples: list[list[Member]] = []

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        indexed = []
        for extension, data in members:
            name = member_name(key, extension)
            self.parts.append(_tar_header(name, len(data)))
            data_offset = self.offset + _TAR_BLOCK
            self.parts.append(data)
            padding = -len(data) % _TAR_BLOCK
            if padding:
                self.parts.append(bytes(padding))
            self.offset = data_offset + len(data) + padding
            indexed.append(Member(extension, data_offset, len(data), name))
        self.samples.append(indexed)

    def tar_bytes(self) -> bytes:
        end = self.offset + 2 * _TAR_BLOCK
        end += -end % _TAR_RECORD
        return b"".join(self.parts) + bytes(end - self.offset)

    def index_text(self) -> str:
        return format_index(self.samples)


# ------------------------------------------------------------------------------------------- planning


def shard_size(num_samples: int, *, samples_per_shard: int | None = None, min_shards: int = MIN_SHARDS,
               max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD) -> int:
    """Samples per shard: as many as allow at least `min_shards` shards, at most `max_samples_per_shard`."""
    if samples_per_shard is not None:
        return max(1, int(samples_per_shard))
    return max(1, min(max_samples_per_shard, num_samples // max(1, min_shards)))


def shard_order(num_samples: int, seed: int | None, split: str) -> np.ndarray:
    """The shuffled write order of a split's samples (positions in the source split), fixed by seed;
    seed None keeps the source order."""
    if seed is None:
        return np.arange(num_samples)
    split_code = int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, split_code]).permutation(num_samples)


def _record(out: Path, split: str, shard: int, num_samples: int, sha256: str) -> dict:
    """The manifest record of a finished shard, its file sizes read from disk."""
    tar, index = shard_names(split, shard)
    return shard_record(tar, index, num_samples, sha256, (out / tar).stat().st_size, (out / index).stat().st_size,
                        index_sha256=file_sha256(out / index))


# -------------------------------------------------------------------------------------------- workers


def _write_shard(split, out: str, split_name: str, shard: int, positions: np.ndarray, image_format: str,
                 compress_level: int) -> dict:
    """Write one shard (tar + index) under temporary names, then rename them into place."""
    out_path = Path(out)
    tar_path, idx_path = (out_path / name for name in shard_names(split_name, shard))
    samples = [split.item(int(position)) for position in positions]
    arrays = [sample.image for sample in samples if isinstance(sample.image, np.ndarray)]
    if arrays and len(arrays) == len(samples) and len({a.shape for a in arrays}) == 1:
        images = encode_pngs(np.stack(arrays), compress_level)  # one batch: the common case
    else:
        images = [encode_png(s.image, compress_level) if isinstance(s.image, np.ndarray) else s.image
                  for s in samples]
    builder = _TarBuilder()
    for sample, image in zip(samples, images):
        if not image.startswith(IMAGE_MAGIC[image_format]):
            raise UserError(f"sample {sample.key} of {split_name} is not a {image_format.upper()} file; the "
                            f"source must hold the original {image_format.upper()} images")
        builder.add_sample(sample.key, [(image_format, image), ("fine", encode_label(sample.fine)),
                                        ("coarse", encode_label(sample.coarse))])
    data = builder.tar_bytes()
    tar_partial = tar_path.with_name(tar_path.name + _PARTIAL)
    idx_partial = idx_path.with_name(idx_path.name + _PARTIAL)
    try:
        tar_partial.write_bytes(data)
        idx_partial.write_text(builder.index_text())
        os.replace(tar_partial, tar_path)  # tar first: a shard counts as finished once its index exists
        os.replace(idx_partial, idx_path)
    finally:
        for leftover in (tar_partial, idx_partial):
            leftover.unlink(missing_ok=True)
    return _record(out_path, split_name, shard, len(positions), hashlib.sha256(data).hexdigest())


def _shard_job(split, out: str, split_name: str, shard: int, positions: np.ndarray, image_format: str,
               compress_level: int, recorded_sha256: str | None) -> dict:
    """Keep a shard an earlier run finished (both files in place, its checksum as recorded), else write it."""
    out_path = Path(out)
    tar_path, idx_path = (out_path / name for name in shard_names(split_name, shard))
    if tar_path.exists() and idx_path.exists():
        sha256 = file_sha256(tar_path)
        # no record: the run stopped between the rename and the record; the rename means the file is whole
        if recorded_sha256 in (None, sha256):
            return _record(out_path, split_name, shard, len(positions), sha256)
    return _write_shard(split, out, split_name, shard, positions, image_format, compress_level)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class _Deferred:
    """A future that runs its call when its result is asked for (in this process, in order)."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def result(self):
        return self.function(*self.args)

    def cancel(self) -> bool:
        return True


class _InProcess:
    """The executor interface, run in this process (workers=1)."""

    def submit(self, function, *args) -> _Deferred:
        return _Deferred(function, args)

    def map(self, function, items, chunksize: int = 1):
        return map(function, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def _executor(workers: int):
    if workers <= 1:
        return _InProcess()
    # forkserver: workers do not inherit the threads of the caller (a training script may hold some); they
    # leave Ctrl-C to the caller, which stops them and speaks for them (no traceback per worker)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


def _run_all(executor, jobs: list[tuple], log: Callable[[str], None], what: str,
             on_result: Callable[[object], None] = lambda result: None) -> list:
    """Submit (function, *args) jobs, return their results in order; stop at the first failure."""
    futures = [executor.submit(*job) for job in jobs]
    results = []
    step = max(1, len(futures) // 10)
    try:
        for done, future in enumerate(futures, 1):
            results.append(future.result())
            on_result(results[-1])
            if done % step == 0 or done == len(futures):
                log(f"{what}: {done}/{len(futures)} shards")
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    return results


# ---------------------------------------------------------------------------------------------- create


def create(dataset: str, src: Path | str | None, out: Path | str, *, seed: int = 0,
           samples_per_shard: int | None = None, min_shards: int = MIN_SHARDS,
           max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD, compress_level: int = PNG_COMPRESS_LEVEL,
           workers: int | None = None, overwrite: bool = False, labels: Path | str | None = None,
           log: Callable[[str], None] | None = None, cache: Path | str | None = None) -> dict:
    """Convert DATASET read from SRC (official label files from LABELS when given) into shards under OUT;
    return the manifest (see write_shards). OUT may be a URL: written in the shard cache CACHE, uploaded."""
    from maskcon.datasets import DATASETS

    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    _check_options(compress_level, samples_per_shard)
    _check_apart(src, out)
    if labels is not None and not DATASETS[dataset].label_files:
        raise UserError(f"--labels: {dataset} reads no official label files; leave --labels out")
    reader_options = {} if labels is None else {"labels": Path(labels)}
    source = DATASETS[dataset].read(Path(src) if src is not None else None, **reader_options)
    from maskcon.datasets.source import describe_files

    # the folder the reader read (SRC, or the dataset's folder inside it): the same files however SRC names them
    source_files = describe_files(Path(source.notes.get("source", src))) if src is not None else None
    create_args = [dataset] + (["--src", str(Path(src).resolve())] if src is not None else [])
    create_args += ["--labels", str(Path(labels).resolve())] if labels is not None else []
    for flag, value, default in (("--seed", seed, 0), ("--samples-per-shard", samples_per_shard, None),
                                 ("--min-shards", min_shards, MIN_SHARDS),
                                 ("--max-samples-per-shard", max_samples_per_shard, MAX_SAMPLES_PER_SHARD),
                                 ("--compress-level", compress_level, PNG_COMPRESS_LEVEL)):
        if value != default:
            create_args += [flag, str(value)]
    from maskcon import remote

    def changes(manifest) -> list[str]:     # what differs between a remote folder's shards and these inputs
        options = _plan_options(seed, samples_per_shard, min_shards, max_samples_per_shard, compress_level)
        recorded = _plan_of(manifest) if isinstance(manifest, dict) else None
        return _changes(recorded, _inputs(source, options, source_files))

    def write(folder: Path | str, on_shard: Callable[[dict], None] | None = None) -> dict:
        return write_shards(source, folder, create_args=create_args, source_files=source_files, seed=seed,
                            samples_per_shard=samples_per_shard, min_shards=min_shards,
                            max_samples_per_shard=max_samples_per_shard, compress_level=compress_level,
                            workers=workers, overwrite=overwrite, log=log, on_shard=on_shard)

    try:
        if remote.is_url(str(out)):   # written locally, each shard uploaded once finished, the manifest last
            return remote.create_remote(str(out), write, changes, overwrite=overwrite,
                                        log=log or (lambda line: None), cache=cache)
        return write(out)
    except OSError as error:  # no space, no permission: in this process or in a worker
        shutil.rmtree(Path(out) / _STAGING, ignore_errors=True)
        blocker = file_in_the_way(out)
        if blocker is not None:
            raise UserError(f"{blocker} is a file, not a folder; name a folder for the shards") from None
        reason = error.strerror or str(error)
        if error.errno is None and "requested and" in reason:     # numpy's short write of a staged array
            reason = f"a file cut short, {reason.replace('requested', 'bytes requested')}: the disk or a quota is full"
        raise UserError(f"create failed at {error.filename or out} ({reason}); free space or fix permissions there, "
                        f"then rerun the same command: finished shards are kept") from None


def _check_apart(src: Path | str | None, out: Path | str) -> None:
    """UserError when the shards would be written into the source: they would become source files of it."""
    from maskcon import remote

    if src is None or remote.is_url(str(out)):
        return
    source, target = Path(src).resolve(), Path(out).resolve()
    if target == source or source in target.parents:
        raise UserError(f"--out {out} lies inside --src {src}: the shards would become files of the source; "
                        f"choose an --out outside it")


def _check_options(compress_level: int, samples_per_shard: int | None) -> None:
    if not 0 <= compress_level <= 9:
        raise UserError(f"--compress-level must be 0..9, got {compress_level}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")


def write_shards(source: DatasetSource, out: Path | str, *, create_args: list[str] | None = None,
                 source_files: dict | None = None, seed: int | None = 0,
                 samples_per_shard: int | None = None, min_shards: int = MIN_SHARDS,
                 max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD, compress_level: int = PNG_COMPRESS_LEVEL,
                 workers: int | None = None, overwrite: bool = False,
                 log: Callable[[str], None] | None = None,
                 on_shard: Callable[[dict], None] | None = None) -> dict:
    """Write the samples of `source` (a dataset reader's result) as shards under OUT; return the manifest.

    Resumes an interrupted run with the same inputs (finished shards are kept); returns at once when OUT
    already holds the complete, undamaged result, and re-creates it when the shard files no longer match
    their manifest. The inputs are the plan: dataset, options, split sizes, class names and coarse map, and
    `source_files` (describe_files() of --src: what identifies the source). OUT holding shards, complete or
    interrupted, made from other inputs is an error naming what changed, unless `overwrite`. Every source
    file is checked (Split.check) before the first shard is written. `seed` fixes the shuffled write order
    (None: the source's order); `create_args`, the arguments of `make_shards.py create` that give the same
    shards (but --out), go into the manifest so that error messages can say how to re-create them.
    `workers` > 1 pickles the splits into a process pool; on_shard(record) is called in this process as
    each shard is finished (create --out URL uploads it). Raises UserError for a bad source or bad options.
    """
    log = log or (lambda message: None)
    _check_options(compress_level, samples_per_shard)
    dataset = source.name
    out = Path(out)
    plan = _inputs(source, _plan_options(seed, samples_per_shard, min_shards, max_samples_per_shard,
                                         compress_level), source_files)
    for name, split_plan in plan["splits"].items():
        if split_plan["num_samples"] == 0:
            raise UserError(f"the {name} split of {dataset} is empty; check --src")

    workers = usable_cpus() if workers is None else max(1, workers)
    complete = _prepare_out(out, plan, source, overwrite, log, workers)
    if complete is not None:
        return complete
    manifest_path, plan_path, progress_path = out / MANIFEST, out / PLAN, out / _PROGRESS
    recorded = _read_progress(progress_path)  # tar -> sha256 of the shards an earlier run finished

    staging = out / _STAGING
    jobs, split_jobs, found = [], {}, 0
    for name, split in source.splits.items():
        (out / name).mkdir(exist_ok=True)
        for leftover in (out / name).glob(f"*{_PARTIAL}"):
            leftover.unlink()  # pieces of shards an interrupted run was writing
        size = plan["splits"][name]["samples_per_shard"]
        order = shard_order(len(split), seed, name)
        if workers > 1:
            split = split.staged(staging / name)
        split_jobs[name] = []
        for shard in range(-(-len(split) // size)):
            tar, idx = shard_names(name, shard)
            found += (out / tar).exists() and (out / idx).exists()   # kept when whole (see _shard_job)
            split_jobs[name].append(len(jobs))
            jobs.append((_shard_job, split, str(out), name, shard, order[shard * size:(shard + 1) * size],
                         source.image_format, compress_level, recorded.get(tar)))
    log(f"{dataset}: {sum(s['num_samples'] for s in plan['splits'].values())} samples in {len(jobs)} shards "
        f"({found} finished before), {count(min(workers, len(jobs)), 'process', 'processes')}")
    with open(progress_path, "a") as progress, _executor(min(workers, len(jobs))) as executor:
        def record(result: dict) -> None:
            progress.write(json.dumps(result) + "\n")
            progress.flush()
            if on_shard is not None:
                on_shard(result)

        records = _run_all(executor, jobs, log, dataset, on_result=record)
    shutil.rmtree(staging, ignore_errors=True)

    manifest = _manifest(source, plan, create_args, {name: [records[j] for j in jobs_of_split]
                                                      for name, jobs_of_split in split_jobs.items()})
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")  # last: from now on OUT counts as complete
    plan_path.unlink(missing_ok=True)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {manifest_path}")
    return manifest


def _prepare_out(out: Path, plan: dict, source: DatasetSource, overwrite: bool, log: Callable[[str], None],
                 workers: int) -> dict | None:
    """Make OUT ready for writing by `plan`, or return its manifest when it already holds the complete,
    undamaged result. Refuses (UserError naming what changed) a folder made, or being made, from other
    inputs unless `overwrite`; checks the source's files before anything is removed or written."""
    manifest_path, plan_path, progress_path = out / MANIFEST, out / PLAN, out / _PROGRESS
    replaces_manifest = manifest_path.exists()
    if replaces_manifest:
        existing = _load_json(manifest_path)
        recorded = _plan_of(existing) if isinstance(existing, dict) else None
        if recorded is None and not any(next((out / split).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"), None)
                                        for split in SPLITS):
            raise UserError(f"{manifest_path} is not a shard manifest and {out} holds no shards: not a shard folder "
                            f"(nothing was changed); choose another --out")
        changes = _changes(recorded, plan) if isinstance(existing, dict) else [f"{MANIFEST} unreadable"]
        if not changes and not overwrite:
            damaged = [record["tar"] for split in existing["splits"].values() for record in split["shards"]
                       if shard_problem(out, record) is not None]
            if not damaged:
                log(f"{out} already holds complete {plan['dataset']} shards (sizes and indexes checked; "
                    f"make_shards.py verify reads every byte)")
                return existing
            log(f"{out}: {count(len(damaged), 'shard')} no longer {'matches' if len(damaged) == 1 else 'match'} the "
                f"manifest (first {damaged[0]}); re-creating")
            overwrite = True
        if changes and not overwrite:
            raise UserError(f"{out} holds shards made from other inputs ({'; '.join(changes)}); pass --overwrite "
                            "to rebuild them from these, or choose another --out")
    previous = _load_json(plan_path) if plan_path.exists() else None
    changes = _changes(previous, plan) + _version_change(previous, plan) if isinstance(previous, dict) else []
    resumable = isinstance(previous, dict) and not changes and not overwrite
    if changes and not overwrite:
        raise UserError(f"{out} holds an interrupted conversion of other inputs ({'; '.join(changes)}); pass "
                        "--overwrite to start afresh from these, or choose another --out")
    _check_source(source, log, workers)
    if replaces_manifest:
        manifest_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not resumable:
        _remove_shards(out)  # shards of an unfinished run with other inputs, or --overwrite
        progress_path.unlink(missing_ok=True)
    write_atomic(plan_path, json.dumps(plan, indent=1) + "\n")
    return None


def _manifest(source: DatasetSource, plan: dict, create_args: list[str] | None, records: dict[str, list]) -> dict:
    """The manifest of finished shards: the plan's inputs, what readers need, and each shard's record."""
    return {
        "dataset": plan["dataset"],
        "version": plan["version"],
        "image_format": source.image_format,
        "image_size": list(source.image_size) if source.image_size is not None else None,
        "channels": source.channels,
        "label_encoding": LABEL_ENCODING,
        "fine_classes": list(source.fine_classes),
        "coarse_classes": list(source.coarse_classes),
        "fine_to_coarse": [int(c) for c in source.fine_to_coarse],
        "options": plan["options"],
        "create_args": create_args,
        "source": dict(source.notes),
        "source_files": plan["source_files"],
        "splits": {name: {"num_samples": plan["splits"][name]["num_samples"],
                          "samples_per_shard": plan["splits"][name]["samples_per_shard"],
                          "shards": records[name]}
                   for name in source.splits},
    }


def _plan_of(manifest: dict) -> dict | None:
    """The plan a complete folder was made by, read back from its manifest (None when malformed)."""
    try:
        return {"dataset": manifest["dataset"], "options": manifest["options"],
                "source_files": manifest.get("source_files"),
                "classes": {"fine": manifest["fine_classes"], "coarse": manifest["coarse_classes"],
                            "fine_to_coarse": manifest["fine_to_coarse"]},
                "splits": {name: {"num_samples": split["num_samples"], "samples_per_shard": split["samples_per_shard"]}
                           for name, split in manifest["splits"].items()}}
    except (KeyError, TypeError, AttributeError):
        return None


def _plan_options(seed: int | None, samples_per_shard: int | None, min_shards: int, max_samples_per_shard: int,
                  compress_level: int) -> dict:
    """The options of a conversion, as its plan and manifest record them."""
    return {"seed": seed, "samples_per_shard": samples_per_shard, "min_shards": min_shards,
            "max_samples_per_shard": max_samples_per_shard, "png_compress_level": compress_level}


def _inputs(source: DatasetSource, options: dict, source_files: dict | None) -> dict:
    """The plan of a conversion: what its shards are made from (see write_shards)."""
    sizes = {name: shard_size(len(split), samples_per_shard=options["samples_per_shard"],
                              min_shards=options["min_shards"], max_samples_per_shard=options["max_samples_per_shard"])
             for name, split in source.splits.items()}
    return {"dataset": source.name, "version": _version(), "options": options, "source_files": source_files,
            "classes": {"fine": list(source.fine_classes), "coarse": list(source.coarse_classes),
                        "fine_to_coarse": [int(c) for c in source.fine_to_coarse]},
            "splits": {name: {"num_samples": len(split), "samples_per_shard": sizes[name]}
                       for name, split in source.splits.items()}}


def _changes(recorded: dict | None, plan: dict) -> list[str]:
    """What differs between the inputs a folder was made from and those of this run, in a few words each."""
    if recorded is None:
        return [f"{MANIFEST} malformed"]
    changes = []
    if recorded.get("dataset") != plan["dataset"]:
        changes.append(f"dataset {recorded.get('dataset')} -> {plan['dataset']}")
    old_options = recorded.get("options") or {}
    def shown(value) -> str:   # None: the option was left out (its default)
        return "default" if value is None else str(value)

    flag = {"png_compress_level": "compress_level"}     # the option of make_shards create that sets it
    changes += [f"--{flag.get(name, name).replace('_', '-')} {shown(old_options.get(name))} -> {shown(value)}"
                for name, value in plan["options"].items() if old_options.get(name) != value]
    old_files, new_files = recorded.get("source_files") or {}, plan["source_files"] or {}
    if old_files.get("sha256") != new_files.get("sha256"):
        alike = old_files and all(old_files.get(key) == new_files.get(key) for key in ("files", "bytes"))
        changes.append(f"the source files ({_files_text(new_files)} as before, but one was renamed or rewritten: "
                       f"names or modification times differ)" if alike else
                       f"the source files ({_files_text(old_files)} -> {_files_text(new_files)})")
    old_classes = recorded.get("classes") or {}
    if old_classes.get("fine") != plan["classes"]["fine"] or old_classes.get("coarse") != plan["classes"]["coarse"]:
        changes.append("the class names")
    elif old_classes.get("fine_to_coarse") != plan["classes"]["fine_to_coarse"]:
        changes.append("the coarse map (fine -> coarse)")
    if recorded.get("splits") != plan["splits"]:
        changes.append("the split sizes")
    return changes


def _files_text(files: dict) -> str:
    if not files:
        return "not recorded"
    return f"{files['files']} files, {files['bytes']} bytes in {files['folder']}"


def _version_change(recorded: dict, plan: dict) -> list[str]:
    if recorded.get("version") == plan["version"]:
        return []
    return [f"maskcon version {recorded.get('version')} -> {plan['version']}"]


def _check_source(source: DatasetSource, log: Callable[[str], None], workers: int) -> None:
    """Every source file read whole (in `workers` processes) before the first shard is written: each bad one
    named in a log line, then one UserError."""
    files = sum(len(split) for split in source.splits.values())
    with _executor(workers if files > CHECK_POOL_FILES else 1) as executor:
        problems = [problem for split in source.splits.values() for problem in split.check(executor)]
    for problem in problems:
        log(f"bad source file: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise UserError(f"{len(problems)} source file(s) cannot be converted: {problems[0]}{more}; replace or "
                        "remove them in SRC; nothing was written")


def _remove_shards(out: Path) -> None:
    for split in SPLITS:
        for path in (out / split).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].*"):
            path.unlink()


def _read_progress(path: Path) -> dict[str, str]:
    recorded = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                recorded[record["tar"]] = record["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short when the run was stopped
    return recorded


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- verify


def _check_shard(out: str, record: dict, manifest: dict) -> list[str]:
    """What is wrong with one shard (its tar and its index): [] when it is intact."""
    from PIL import Image

    tar_path = Path(out) / record["tar"]
    idx_path = Path(out) / record["index"]
    problems = []
    if not tar_path.exists():
        return ["missing"]
    if file_sha256(tar_path) != record["sha256"]:
        problems.append("damaged: its sha256 differs from the manifest")
    image_format = manifest["image_format"]
    num_fine, fine_to_coarse = len(manifest["fine_classes"]), manifest["fine_to_coarse"]
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(tar_path, "r:") as archive:
            for member in archive:
                parts = split_member(member.name)
                handle = archive.extractfile(member) if member.isreg() else None
                if parts is None or handle is None:
                    if not any(p.startswith("unexpected member") for p in problems):
                        problems.append(f"unexpected member {member.name!r}")
                    continue
                key, extension = parts
                samples.setdefault(key, {})[extension] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        return problems + [f"unreadable tar ({error})"]
    if len(samples) != record["num_samples"]:
        problems.append(f"holds {len(samples)} samples, the manifest says {record['num_samples']}")
    bad_samples = []
    for key, members in samples.items():
        if set(members) != {image_format, *LABEL_MEMBERS}:
            bad_samples.append(f"{key} has members {sorted(members)}")
            continue
        try:
            fine, coarse = decode_label(members["fine"]), decode_label(members["coarse"])
        except ValueError:
            bad_samples.append(f"{key} has labels that are not {LABEL_BYTES} bytes")
            continue
        if not 0 <= fine < num_fine or fine_to_coarse[fine] != coarse:
            bad_samples.append(f"{key} has labels fine={fine} coarse={coarse} outside the manifest's map")
            continue
        try:
            with Image.open(io.BytesIO(members[image_format])) as image:
                expected = {"png": "PNG", "jpg": "JPEG"}[image_format]
                if image.format != expected:
                    raise ValueError(f"a {image.format} image")
                image.load()
                size = [image.height, image.width]
        except Exception as error:  # whatever the decoder raises, the sample is damaged
            bad_samples.append(f"{key} has an image that does not decode ({error})")
            continue
        if manifest["image_size"] is not None and size != list(manifest["image_size"]):
            bad_samples.append(f"{key} has an image of {size[0]}x{size[1]}, not {manifest['image_size']}")
    if bad_samples:
        problems.append(f"{count(len(bad_samples), 'bad sample')}, e.g. {bad_samples[0]}")
    if not idx_path.exists():
        problems.append(f"its index {record['index']} is missing")
    elif not problems and idx_path.read_text() != index_of_tar(tar_path):
        problems.append(f"its index {record['index']} does not match it (damaged)")
    return problems


def verify(out: Path | str, *, workers: int | None = None, log: Callable[[str], None] | None = None) -> list[str]:
    """Recompute checksums and counts and read every sample of every shard.

    Returns one line per damaged or missing shard (naming its tar), plus lines for split-level problems;
    [] when everything is intact.
    """
    log = log or (lambda message: None)
    if not Path(out).is_dir():
        raise UserError(f"{out}: no such folder; name a folder of shards (e.g. shards/cifar100)")
    manifest = read_manifest(out)
    problems = []
    jobs = []
    for split_name, split_plan in manifest["splits"].items():
        shards = split_plan["shards"]
        total = sum(shard["num_samples"] for shard in shards)
        if total != split_plan["num_samples"]:
            problems.append(f"{split_name}: the shards hold {total} samples, the manifest says "
                            f"{split_plan['num_samples']}")
        if any(shard["num_samples"] != split_plan["samples_per_shard"] for shard in shards[:-1]):
            problems.append(f"{split_name}: shards before the last do not all hold "
                            f"{split_plan['samples_per_shard']} samples")
        jobs += [(_check_shard, str(out), shard, manifest) for shard in shards]
    workers = usable_cpus() if workers is None else max(1, workers)
    with _executor(min(workers, len(jobs))) as executor:
        for job, shard_problems in zip(jobs, _run_all(executor, jobs, log, "verify")):
            if shard_problems:  # one line per shard, naming it
                problems.append(f"{job[2]['tar']}: {'; '.join(shard_problems)}")
    return problems

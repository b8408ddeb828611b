"""Shard folders in object storage: `s3://bucket/prefix`, `gs://bucket/prefix` and read-only `https://` folders,
staged once per node into a verified local cache, and written there by `make_shards create --out URL`.

A run reads shards from local disk only: the builder (`maskcon.run.build_run`) stages a remote folder into
the node's cache and hands the loaders that copy, so every local figure and the exact resume hold. The cache
(`--shard-cache DIR`, else $MASKCON_SHARD_CACHE, else ~/.cache/maskcon/shards) holds one entry per remote
folder and manifest,

    CACHE/.lock                          held while one process stages or evicts (fcntl.flock)
    CACHE/<name>-<url hash>-<manifest sha256>/
        train/train-000000.tar .idx      each renamed into place only once its size and sha256 match
        manifest.json                    written last: its presence means every file is verified
        .in-use                          a shared flock per process that reads the entry (never evicted)
        .last-used                       its mtime orders eviction (least recently used first)

Per node one process downloads while the others (of this run or of other runs) wait on the cache's lock,
then find the entry complete. Files download in parallel threads into `<name>.partial`, are checked against
the manifest's size and sha256 and renamed; an interrupted staging keeps every finished file. Remote
libraries (fsspec, s3fs, gcsfs) are the optional `cloud` extra; each store's own credential chain applies
(environment, profiles, instance roles) and AWS_ENDPOINT_URL names an S3-compatible store.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from maskcon.errors import UserError, door
from maskcon.files import nearest_existing
from maskcon.shard_format import MANIFEST, _is_manifest

SCHEMES = ("s3", "gs", "https")
CLOUD_EXTRA = 'pip install -e ".[cloud]"'
CACHE_ENV = "MASKCON_SHARD_CACHE"
ATTEMPTS = max(1, int(os.environ.get("MASKCON_REMOTE_ATTEMPTS", "5")))   # tries per file before the one-line failure
TIMEOUT_S = float(os.environ.get("MASKCON_REMOTE_TIMEOUT", "60"))   # seconds without a byte: a try has failed
BACKOFF_S = 0.5              # wait after the first failed try, doubled after each further one
BLOCK_BYTES = 8 << 20        # read and hash size of a download, bytes
THREADS = 8                  # parallel downloads (and uploads) per node
PARTIAL = ".partial"
_HELD: list = []             # open .in-use files of the entries this process reads (a shared flock each)


# ------------------------------------------------------------------------------------------------ URLs


def is_url(text: object) -> bool:
    """True for a remote shard folder: s3://, gs:// or https://."""
    return isinstance(text, str) and re.match(r"^(s3|gs|https)://[^/]", text) is not None


def check_location(text: object, *, writing: bool = False) -> None:
    """One line for a shard location that looks like a URL but is not one we read (http://, s3:/, S3://),
    which would otherwise become a local folder of that name, and for writing to a read-only https:// one."""
    if not isinstance(text, str):
        return
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):/", text)
    if is_url(text):
        if writing and text.startswith("https://"):
            raise UserError(f"{text}: https:// shard folders are read-only; write the shards to s3:// or gs:// "
                            f"(or a local folder you then serve over https://)")
        return
    if scheme is None or len(scheme.group(1)) == 1:   # a Windows drive letter is a path
        return
    name = scheme.group(1)
    if name in SCHEMES and text.startswith(f"{name}://"):   # s3:// or s3:///x: no bucket or host
        raise UserError(f"{text} names no {'host' if name == 'https' else 'bucket'}: write "
                        f"{name}://{'HOST/PATH' if name == 'https' else 'BUCKET/PREFIX'}")
    if name.lower() in SCHEMES and not text.startswith(f"{name}://"):
        raise UserError(f"{text} is not a shard URL: write {name.lower()}://BUCKET/PREFIX (two slashes, lower case)")
    if name.lower() in SCHEMES:
        raise UserError(f"{text}: write the scheme in lower case, {name.lower()}://")
    raise UserError(f"{text}: {name}:// shard folders are not supported; use s3://, gs:// or https:// (or a "
                    f"local folder)")


def _require_cloud(url: str) -> None:
    try:
        import fsspec  # noqa: F401
    except ImportError:
        raise UserError(f"{url} is a remote shard folder but the cloud libraries are not installed; "
                        f"install them with {CLOUD_EXTRA}") from None


def filesystem(url: str):
    """(fsspec filesystem, path of the folder in it) of a remote URL; UserError without the cloud extra."""
    _require_cloud(url)
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        if protocol == "s3":
            import s3fs

            endpoint = os.environ.get("AWS_ENDPOINT_URL")   # an S3-compatible store (MinIO, Ceph, R2, ...)
            fs = s3fs.S3FileSystem(endpoint_url=endpoint or None, skip_instance_cache=True, config_kwargs={
                "connect_timeout": TIMEOUT_S, "read_timeout": TIMEOUT_S, "retries": {"max_attempts": 1}})
            fs.retries = 1   # our own loop retries a file, with backoff
        elif protocol == "gs":
            import gcsfs

            fs = gcsfs.GCSFileSystem(skip_instance_cache=True, timeout=TIMEOUT_S)   # gcsfs also retries itself
        else:
            import aiohttp

            fs = fsspec.filesystem("https", skip_instance_cache=True, client_kwargs={
                "timeout": aiohttp.ClientTimeout(sock_connect=TIMEOUT_S, sock_read=TIMEOUT_S)})
    except ImportError as error:
        raise UserError(f"{url} needs {error.name}, which is not installed; install it with {CLOUD_EXTRA}") from None
    path = url if protocol == "https" else url.split("://", 1)[1]
    return fs, path.rstrip("/")


def _credentials_problem(error: BaseException) -> bool:
    return type(error).__name__ in ("NoCredentialsError", "DefaultCredentialsError", "PartialCredentialsError",
                                    "RefreshError")


def remote_error(error: BaseException, url: str, doing: str) -> UserError:
    """One line for a failed remote operation: missing credentials, access denied, no such bucket or prefix,
    or the store unreachable."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if _credentials_problem(error):
        return UserError(f"{doing} {url}: no credentials found ({text}); set them as the store expects "
                         f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile for s3://, "
                         f"GOOGLE_APPLICATION_CREDENTIALS or gcloud auth for gs://)")
    if isinstance(error, PermissionError):
        return UserError(f"{doing} {url}: access denied ({text}); check the credentials and that they may "
                         f"read (and, for create, write) this bucket")
    if isinstance(error, FileNotFoundError) and doing.startswith("uploading"):
        return UserError(f"{doing} {url}: no such bucket ({text}); create the bucket first, or fix the URL")
    if isinstance(error, FileNotFoundError):
        return UserError(f"{doing} {url}: no such bucket or prefix ({text}); check the URL, or make the shards "
                         f"there with {door('make_shards')} create DATASET --src SRC --out {url}")
    where = "AWS_ENDPOINT_URL (for an S3-compatible store)" if url.startswith("s3://") else "the URL"
    then = "rerun: finished files are kept" if doing.startswith(("downloading", "uploading")) else "rerun"
    return UserError(f"{doing} {url} failed: {text}; check the network and {where}, then {then}")


def _permanent(error: BaseException) -> bool:
    """An error that a retry cannot mend (no retry, at once the one line)."""
    return isinstance(error, (PermissionError, FileNotFoundError, UserError, CacheWriteError)) or \
        _credentials_problem(error)


def _plain(error: BaseException) -> str:
    """What went wrong in a try, in words: the notice of a retry is not an error line."""
    name = type(error).__name__.lower()
    if "timeout" in name or isinstance(error, TimeoutError):
        return "no answer in time"
    if "payload" in name or "incomplete" in name or "reset" in name or "broken" in name:
        return "the connection broke off"
    if "connect" in name:
        return "cannot reach the store"
    return "the store failed to answer"


class SharedNotices:
    """The retry notices of transfers running in parallel. When the store fails, every transfer under way
    meets it at once: the first to retry says so, and the others at the same try keep quiet for QUIET_S (a
    failure after that is said again)."""

    QUIET_S = 30.0

    def __init__(self):
        self.lock, self.said = threading.Lock(), {}

    def first(self, attempt: int) -> bool:
        now = time.monotonic()
        with self.lock:
            if now - self.said.get(attempt, -self.QUIET_S) < self.QUIET_S:
                return False
            self.said[attempt] = now
            return True


def with_retries(action: Callable[[], object], url: str, doing: str, log: Callable[[str], None],
                 notices: SharedNotices | None = None):
    """action(), tried ATTEMPTS times with a doubling pause after each transient failure; one line at the end.
    Each retry is said, unless `notices` (shared by parallel transfers) has just said it for another."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return action()
        except Exception as error:   # whatever the store's library raises is classified here
            if _permanent(error) or attempt == ATTEMPTS:
                if isinstance(error, (UserError, CacheWriteError)):
                    raise
                raise remote_error(error, url, doing) from None
            if notices is None or notices.first(attempt):
                log(f"{doing} {url}: {_plain(error)}; try {attempt + 1} of {ATTEMPTS} in "
                    f"{BACKOFF_S * 2 ** (attempt - 1):g} s")
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))


def read_remote_manifest(url: str, log: Callable[[str], None] = lambda line: None) -> tuple[dict, bytes]:
    """(manifest, its bytes) of a remote shard folder; UserError (one line) when it is missing or malformed."""
    fs, root = filesystem(url)
    try:
        raw = with_retries(lambda: fs.cat_file(f"{root}/{MANIFEST}"), url, "reading the manifest of", log)
    except UserError as error:
        if "no such bucket or prefix" in str(error):
            bucket = root.split("/", 1)[0]
            if not url.startswith("https://") and not _exists(fs, bucket):
                raise UserError(f"no bucket {bucket!r} at the store of {url} (or these credentials may not see "
                                f"it); check the bucket's name") from None
            raise UserError(f"no complete shards at {url}: {MANIFEST} is missing there; make them with python "
                            f"launch/make_shards.py create DATASET --src SRC --out {url}") from None
        raise
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not _is_manifest(manifest):
        raise UserError(f"{url}/{MANIFEST} is not a maskcon shard manifest; recreate the shards with python "
                        f"launch/make_shards.py create DATASET --src SRC --out {url} --overwrite")
    return manifest, raw


def _exists(fs, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:   # an answer we cannot read: let the missing manifest speak
        return True


def manifest_sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | None) -> int | None:
    """Bytes of a size such as 500GB, 1.5T, 200MiB or 4096; None for none."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if found is None or found.group(2).upper() not in _UNITS:
        raise UserError(f"--shard-cache-limit: cannot read {text!r} as a size; write e.g. 500GB, 1.5TB or 200MiB")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def format_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def space_problem(needed: int, free: int, where: Path | str) -> str | None:
    """Why `needed` more bytes cannot go into a cache with `free` bytes free, or None."""
    if needed <= free:
        return None
    return (f"the shards need {format_size(needed)} more in the shard cache {where} but its file system has "
            f"{format_size(free)} free; free space there or pass --shard-cache on a larger disk")


# ---------------------------------------------------------------------------------------------- files


def remote_files(manifest: dict) -> list[tuple[str, int | None, str | None]]:
    """(relative path, size, sha256) of every file of a shard folder but its manifest; None where the manifest
    does not record it (older manifests: no index sha256, no sizes)."""
    files = []
    for split in manifest["splits"].values():
        for record in split["shards"]:
            files.append((record["tar"], record.get("tar_bytes"), record["sha256"]))
            files.append((record["index"], record.get("index_bytes"), record.get("index_sha256")))
    return files


def file_digest(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _matches(size: int, sha256: str, expected_size: int | None, expected_sha256: str | None) -> bool:
    return (expected_size is None or size == expected_size) and (expected_sha256 is None or sha256 == expected_sha256)


def default_cache() -> Path:
    """$MASKCON_SHARD_CACHE, else the user's cache directory ($XDG_CACHE_HOME or ~/.cache)/maskcon/shards."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maskcon" / "shards"


def entry_name(url: str, sha256: str) -> str:
    """The cache entry of one remote folder and manifest: readable name, then hashes of both."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "shards"
    return f"{tail}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}-{sha256[:16]}"


# --------------------------------------------------------------------------------------------- download


class _Bar:
    """A tqdm bar of bytes (it shows MB/s) shared by the download threads; silent when not shown."""

    def __init__(self, total: int, label: str, shown: bool):
        self.lock = threading.Lock()
        self.bar = None
        if shown:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label, mininterval=0.5)

    def update(self, count: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(count)

    def above(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log`, its lines written above the bar: the bar is cleared first and drawn again below them."""
        if self.bar is None:
            return log

        def say(line: str) -> None:
            with self.lock, type(self.bar).external_write_mode():
                log(line)

        return say

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CacheWriteError(Exception):
    """Writing into the shard cache failed (no space, no permission): not the store's fault, never retried."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


def _fetch(fs, source: str, partial: Path, bar: _Bar) -> tuple[int, str]:
    """Stream one remote file into `partial`, hashing it on the way: (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    try:
        local = open(partial, "wb")
    except OSError as error:
        raise CacheWriteError(error) from None
    try:
        with fs.open(source, "rb", block_size=BLOCK_BYTES) as remote, local:
            while block := remote.read(BLOCK_BYTES):
                try:
                    local.write(block)
                except OSError as error:
                    raise CacheWriteError(error) from None
                digest.update(block)
                size += len(block)
                bar.update(len(block))
    except BaseException:
        bar.update(-size)
        raise
    return size, digest.hexdigest()


def download(fs, root: str, url: str, entry: Path, file: tuple[str, int | None, str | None], bar: _Bar,
             log: Callable[[str], None], notices: SharedNotices | None = None) -> None:
    """Download one file of the folder into the entry: under a `.partial` name, checked against the manifest,
    then renamed into place. UserError (one line) when the remote file differs from the manifest."""
    name, size, sha256 = file
    target = entry / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + PARTIAL)
    try:
        got_size, got_sha256 = with_retries(lambda: _fetch(fs, f"{root}/{name}", partial, bar), url,
                                            f"downloading {name} of", log, notices)
        if not _matches(got_size, got_sha256, size, sha256):
            what = f"{got_size} bytes" if size is not None and got_size != size else "its sha256"
            raise UserError(f"{url}/{name} differs from the folder's manifest ({what}, changed or damaged after "
                            f"create); re-create the shards with make_shards create ... --out {url} --overwrite, "
                            f"or restore the file")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _kept(entry: Path, file: tuple[str, int | None, str | None]) -> bool:
    """True when an earlier, interrupted staging left this file complete and verified."""
    path = entry / file[0]
    if not path.is_file() or (file[1] is not None and path.stat().st_size != file[1]):
        return False
    return _matches(*file_digest(path), file[1], file[2])


def _sizes(fs, root: str, url: str, files: list, log) -> list[tuple[str, int, str | None]]:
    """The files with every size known: older manifests lack sizes, which the store then tells."""
    return [(name, size if size is not None else
             with_retries(lambda name=name: fs.size(f"{root}/{name}"), url, f"reading the size of {name} of", log),
             sha256) for name, size, sha256 in files]


def _download_all(fs, root: str, url: str, entry: Path, files: list, shown: bool, log) -> None:
    """Every file, THREADS at a time; the first file that fails for good ends the staging: the files not yet
    begun are left for the rerun (the network is likely lost; each would only fail after its own retries)."""
    bar = _Bar(sum(size for _, size, _ in files), f"staging {url}", shown)
    failed, notices, log = threading.Event(), SharedNotices(), bar.above(log)

    def one(file) -> None:
        if failed.is_set():
            return
        try:
            download(fs, root, url, entry, file, bar, log, notices)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(max_workers=THREADS)
    try:
        futures = [pool.submit(one, file) for file in files]
        failures = [future.exception() for future in futures]
    except BaseException:   # Ctrl-C, a stop: the files under way finish or fail, none more begins
        failed.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    first = next((error for error in failures if error is not None), None)
    if first is not None:
        raise first


# ---------------------------------------------------------------------------------------------- the cache


class _Locked:
    """An fcntl.flock on `path` (created when missing) for a `with` block: exclusive, or shared; announce(line)
    is told when another process holds it and this one waits."""

    def __init__(self, path: Path, shared: bool = False, announce: Callable[[str], None] | None = None):
        self.path, self.mode, self.announce = path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, announce

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, self.mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.announce is not None:
                self.announce(f"waiting for {self.path.parent}: another process of this node is staging into it")
            fcntl.flock(self.handle, self.mode)
        return self.handle

    def __exit__(self, *exc_info):
        self.handle.close()
        return False


def _hold(entry: Path) -> None:
    """Hold a shared flock on the entry's .in-use file for the rest of this process: never evicted."""
    handle = open(entry / ".in-use", "a")
    fcntl.flock(handle, fcntl.LOCK_SH)
    _HELD.append(handle)
    (entry / ".last-used").touch()


def _in_use(entry: Path) -> bool:
    marker = entry / ".in-use"
    if not marker.exists():
        return False
    with open(marker, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _last_used(entry: Path) -> float:
    marker = entry / ".last-used"
    return marker.stat().st_mtime if marker.exists() else entry.stat().st_mtime


def evict(cache: Path, keep: Path, needed: int, limit: int, log: Callable[[str], None]) -> None:
    """Remove whole entries not in use, least recently used first, until `needed` more bytes fit under
    `limit`; UserError when the entries in use leave too little room."""
    entries = sorted((path for path in cache.iterdir() if path.is_dir() and path != keep
                      and not path.name.startswith(".")), key=_last_used)
    used = sum(folder_bytes(path) for path in entries) + (folder_bytes(keep) if keep.exists() else 0)
    for entry in entries:
        if used + needed <= limit:
            return
        if _in_use(entry):
            continue
        size = folder_bytes(entry)
        shutil.rmtree(entry)
        used -= size
        log(f"shard cache: evicted {entry.name} ({format_size(size)}, least recently used)")
    if used + needed > limit:
        raise UserError(f"the shards need {format_size(needed)} more in the shard cache {cache}, which holds "
                        f"{format_size(used)} in use of its --shard-cache-limit {format_size(limit)}; raise the "
                        f"limit or pass another --shard-cache")


def stage(url: str, cache: Path | str | None = None, *, limit: int | None = None, show_progress: bool = True,
          log: Callable[[str], None] = print, check: Callable[[dict], None] | None = None,
          announce_wait: bool = False) -> Path:
    """The local copy of the remote shard folder `url` in the node's cache: downloaded by the first process
    that asks (the others wait on the cache's lock), verified file by file, reused while the remote manifest
    is unchanged. The entry stays held (never evicted) while this process lives. check(manifest) may refuse
    the folder before anything is downloaded; announce_wait: say so when another process holds the cache.
    A staging that failed while this process waited for it is this process's failure too (not tried again)."""
    started = time.time()
    manifest, raw = read_remote_manifest(url, log)
    if check is not None:
        check(manifest)
    cache = Path(cache).expanduser() if cache else default_cache()
    entry = cache / entry_name(url, manifest_sha256(raw))
    failed = cache / f".failed-{entry.name}"
    try:
        with _Locked(cache / ".lock", announce=log if announce_wait else None):
            if (entry / MANIFEST).is_file() and (entry / MANIFEST).read_bytes() == raw:
                _hold(entry)
                return entry
            if failed.is_file() and failed.stat().st_mtime >= started:
                raise UserError(failed.read_text().strip())
            try:
                _fill(url, manifest, raw, cache, entry, limit, show_progress, log)
            except UserError as error:   # the processes waiting for this staging fail with it
                (failed.parent / (failed.name + PARTIAL)).write_text(str(error))
                os.replace(failed.parent / (failed.name + PARTIAL), failed)
                raise
            failed.unlink(missing_ok=True)
            _hold(entry)
    except (OSError, CacheWriteError) as error:
        reason = error.error if isinstance(error, CacheWriteError) else error
        raise UserError(f"the shard cache {cache} cannot be written ({reason.strerror or reason}); free space or "
                        f"fix permissions there, or pass another --shard-cache") from None
    return entry


def _refuse_over_limit(url: str, size: int, limit: int) -> None:
    if size > limit:
        raise UserError(f"the shards at {url} hold {format_size(size)}, more than the --shard-cache-limit "
                        f"{format_size(limit)}; raise the limit")


def staging_state(url: str, manifest: dict, raw: bytes, cache: Path | str | None, limit: int | None) -> str:
    """What --check says of a remote folder on this node, read without writing: already in the cache, or to
    be staged into it (with its size); UserError for a folder larger than the cache's limit."""
    cache = Path(cache).expanduser() if cache else default_cache()
    sizes = [size for _, size, _ in remote_files(manifest)]
    size = None if None in sizes else sum(sizes)
    if limit is not None and size is not None:
        _refuse_over_limit(url, size, limit)
    entry = cache / entry_name(url, manifest_sha256(raw))
    if (entry / MANIFEST).is_file() and (entry / MANIFEST).read_bytes() == raw:
        return f"already staged in {entry}"
    made = nearest_existing(cache)   # the cache, or the folder above where it would be made
    if not (made.is_dir() and os.access(made, os.W_OK | os.X_OK)):
        raise UserError(f"the shard cache {cache} cannot be written ({made} is "
                        f"{'not writable' if made.is_dir() else 'a file'}); fix permissions there, or pass another "
                        f"--shard-cache")
    if size is not None:     # what an interrupted staging left at its size counts as there (the run checks it)
        left = sum(size for name, size, _ in remote_files(manifest)
                   if not ((entry / name).is_file() and (entry / name).stat().st_size == size))
        problem = space_problem(left, shutil.disk_usage(made).free, cache)
        if problem:
            raise UserError(problem)
    return f"staged by the run into the shard cache {cache}" + (f" ({format_size(size)})" if size else "")


def _fill(url: str, manifest: dict, raw: bytes, cache: Path, entry: Path, limit: int | None, shown: bool,
          log: Callable[[str], None]) -> None:
    """Download what the entry lacks (checking space first), then write its manifest last."""
    fs, root = filesystem(url)
    files = _sizes(fs, root, url, remote_files(manifest), log)
    missing = [file for file in files if not _kept(entry, file)]
    needed = sum(size for _, size, _ in missing)
    if limit is not None:
        _refuse_over_limit(url, sum(size for _, size, _ in files), limit)
        evict(cache, entry, needed, limit, log)
    problem = space_problem(needed, shutil.disk_usage(cache).free, cache)
    if problem:
        raise UserError(problem)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / ".last-used").touch()
    kept = len(files) - len(missing)
    log(f"staging {url} into {entry}: {len(missing)} files, {format_size(needed)}"
        + (f" ({kept} files kept from an interrupted staging)" if kept else ""))
    started = time.monotonic()
    _download_all(fs, root, url, entry, missing, shown, log)
    seconds = max(time.monotonic() - started, 1e-9)
    partial = entry / (MANIFEST + PARTIAL)
    partial.write_bytes(raw)
    os.replace(partial, entry / MANIFEST)
    log(f"staged {url}: {format_size(needed)} in {seconds:.1f} s ({needed / seconds / 1e6:.1f} MB/s)")


# ---------------------------------------------------------------------------------------------- upload


UPLOADED = ".uploaded"   # in the local staging folder: one line per file put, "<name> <bytes> <mtime_ns>"


def upload(fs, root: str, url: str, folder: Path, name: str, log: Callable[[str], None]) -> None:
    """Put one file of a local shard folder at the same place under the remote folder, unless this staging
    folder already put it unchanged and the remote holds it at its size (an interrupted create continues;
    a remote file of another create is replaced)."""
    local, target = folder / name, f"{root}/{name}"
    stat = local.stat()
    line = f"{name} {stat.st_size} {stat.st_mtime_ns}"
    journal = folder / UPLOADED
    done = journal.is_file() and line in journal.read_text().splitlines()

    def put() -> None:
        if done:
            try:
                if fs.size(target) == stat.st_size:
                    return
            except FileNotFoundError:
                pass
        fs.put_file(str(local), target)

    with_retries(put, url, f"uploading {name} to", log)
    if not done:
        with _JOURNAL_LOCK, open(journal, "a") as handle:
            handle.write(line + "\n")


_JOURNAL_LOCK = threading.Lock()


def create_remote(url: str, write: Callable[[Path, Callable[[dict], None]], dict],
                  changes: Callable[[dict | None], list[str]], *, overwrite: bool, log: Callable[[str], None],
                  cache: Path | str | None = None) -> dict:
    """`make_shards create --out URL`: write(folder, on_shard) writes the shards into a local staging folder
    and calls on_shard(record) as each is finished, which uploads its tar and index at once; manifest.json is
    uploaded last, so a remote folder without one is never read. A rerun continues where it stopped. A folder
    that holds shards already: changes(its manifest) says what differs from this create's inputs; none, and
    it is left as it is (as a local folder is); some, and it is refused unless `overwrite`."""
    fs, root = filesystem(url)
    staging = (Path(cache).expanduser() if cache else default_cache()) / ".uploads" / entry_name(url, "0" * 16)
    manifest_path = f"{root}/{MANIFEST}"
    bucket = root.split("/", 1)[0]
    try:    # before any shard is written: a listing says no credentials, access denied or no bucket apart
        with_retries(lambda: fs.ls(bucket, refresh=True), url, "reading", log)
    except UserError as error:
        if "no such bucket or prefix" not in str(error):
            raise
        raise UserError(f"no bucket {bucket!r} at the store of {url}; create the bucket first, or fix the "
                        f"URL") from None
    present = with_retries(lambda: fs.exists(manifest_path), url, "reading", log)
    if present and not overwrite:
        raw = with_retries(lambda: fs.cat_file(manifest_path), url, "reading the manifest of", log)
        if not ((staging / MANIFEST).is_file() and (staging / MANIFEST).read_bytes() == raw):
            try:
                manifest = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                manifest = None
            changed = changes(manifest)
            if changed:
                raise UserError(f"{url} holds shards made from other inputs ({'; '.join(changed)}); pass --overwrite "
                                f"to rebuild them from these, or choose another --out")
            log(f"{url} already holds complete {manifest['dataset']} shards")
            return manifest
    if present and overwrite:
        with_retries(lambda: fs.rm_file(manifest_path), url, "removing the old manifest of", log)
    if overwrite:   # every file is put again
        (staging / UPLOADED).unlink(missing_ok=True)

    def on_shard(record: dict) -> None:
        for name in (record["tar"], record["index"]):
            upload(fs, root, url, staging, name, log)

    manifest = write(staging, on_shard)
    for split in manifest["splits"].values():   # shards an earlier, complete local run left un-uploaded
        for record in split["shards"]:
            on_shard(record)
    with_retries(lambda: fs.put_file(str(staging / MANIFEST), manifest_path), url, "uploading the manifest to", log)
    log(f"uploaded {url}/{MANIFEST}; {_keep_as_staged(url, staging)}")
    return manifest


def _keep_as_staged(url: str, staging: Path) -> str:
    """The written folder, now uploaded whole, becomes the node's cache entry of the remote folder (a run here
    downloads nothing; the cache's limit and eviction apply to it). Says where it went."""
    cache = staging.parent.parent
    entry = cache / entry_name(url, manifest_sha256((staging / MANIFEST).read_bytes()))
    with _Locked(cache / ".lock"):
        if entry.exists():
            shutil.rmtree(staging)
            return f"this node's shard cache already holds it ({entry})"
        (staging / UPLOADED).unlink(missing_ok=True)
        os.replace(staging, entry)
        (entry / ".last-used").touch()
    return f"the local copy is this node's shard cache entry of it ({entry})"

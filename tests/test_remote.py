"""Shard folders in object storage, against a real S3-compatible server: moto's standalone server, started on
127.0.0.1 by these tests, with IAM credentials enforced, real buckets and real digits shards. Network loss is a
real TCP proxy in front of it that cuts every connection after a number of bytes."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

pytestmark = pytest.mark.slow   # a server process and the doors' subprocesses in every test
ROOT = Path(__file__).resolve().parents[1]
BUCKET = "maskcon-data"
FAST = ["--image-size", "8", "--batch-size", "64", "--queue-size", "128", "--eval-batch-size", "128",
        "--warmup-epochs", "0.5", "--log-every", "1", "--loader-threads", "1", "--eval-untrained", "false",
        "--epochs", "1", "--max-steps", "3", "--checkpoint-every", "0", "--wandb", "disabled"]


class MotoServer:
    """moto's S3 server as a separate process; every request it answers is a line of its log."""

    def __init__(self, folder: Path, auth: bool):
        self.port, self.log = free_port(), folder / f"moto-{time.monotonic_ns()}.log"
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3" if auth else "-1")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(self.port), "-H",
                                             "127.0.0.1"], stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 60
        while not _listening(self.port):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-2000:]
            time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def gets(self, key_part: str) -> int:
        """GET requests whose path holds key_part, answered so far."""
        return sum(1 for line in self.log.read_text().splitlines() if "GET /" in line and key_part in line)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _credentials(server: MotoServer) -> dict:
    """An IAM user allowed everything, made through the server's first three (unauthenticated) actions."""
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                       aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """(server, environment of a user with credentials) of a moto server that enforces credentials."""
    folder = tmp_path_factory.mktemp("s3")
    server = MotoServer(folder, auth=True)
    env = dict(os.environ, AWS_ENDPOINT_URL=server.endpoint, AWS_DEFAULT_REGION="us-east-1",
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(folder / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(folder / "none"), PYTHONPATH=str(ROOT), WANDB_MODE="offline",
               WANDB_SILENT="true", MASKCON_SHARD_CACHE=str(folder / "upload-cache"), **_credentials(server))
    _make_bucket(env, BUCKET)
    yield server, env
    server.stop()


def _make_bucket(env: dict, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)


def make_shards(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/make_shards.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a refused command: its last line, after progress lines at most; no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert result.returncode == 2 and errors == lines[-1:] and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return lines[-1]


@pytest.fixture(scope="session")
def remote_digits(s3) -> str:
    """The bundled digits made by `create --out s3://...`."""
    url = f"s3://{BUCKET}/digits"
    made = make_shards("create", "digits", "--out", url, "--workers", "1", env=s3[1])
    assert made.returncode == 0, made.stderr[-3000:]
    return url


def manifest_of(env: dict, url: str) -> dict:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    return json.loads(fs.cat_file(url.removeprefix("s3://") + "/manifest.json"))


def files_of(manifest: dict) -> list[str]:
    return [record[kind] for split in manifest["splits"].values() for record in split["shards"]
            for kind in ("tar", "index")]


def copy_prefix(env: dict, source: str, target: str) -> None:
    """A second remote folder: every object of `source` copied under `target` (the manifest last)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    source, target = source.removeprefix("s3://"), target.removeprefix("s3://")
    for name in files_of(json.loads(fs.cat_file(f"{source}/manifest.json"))) + ["manifest.json"]:
        fs.copy(f"{source}/{name}", f"{target}/{name}")


def entries(cache: Path) -> list[Path]:
    """The cache's entries (one folder per remote folder and manifest), without its lock file."""
    return sorted(path for path in cache.iterdir() if path.is_dir() and not path.name.startswith("."))


def cache_files(cache: Path) -> list[Path]:
    return sorted(path for path in cache.rglob("*") if path.is_file() and not path.name.startswith("."))


def test_create_uploads_every_shard_and_verify_stages_them_once(s3, remote_digits, tmp_path):
    server, env = s3
    manifest = manifest_of(env, remote_digits)
    assert all("index_sha256" in record for split in manifest["splits"].values() for record in split["shards"])
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    before = server.gets("/digits/train/")
    first = make_shards("verify", remote_digits, "--workers", "1", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "every shard intact" in first.stdout
    train_files = [name for name in files_of(manifest) if name.startswith("train/")]
    assert server.gets("/digits/train/") - before == len(train_files)
    staged = entries(tmp_path / "cache")[0]
    assert (staged / "manifest.json").read_bytes() == json.dumps(manifest, indent=1).encode() + b"\n"
    for record in manifest["splits"]["train"]["shards"]:
        assert hashlib.sha256((staged / record["tar"]).read_bytes()).hexdigest() == record["sha256"]
    second = make_shards("verify", remote_digits, "--workers", "1", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert server.gets("/digits/train/") - before == len(train_files)   # the second reads the cache alone
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_the_same_create_again_leaves_the_folder_as_it_is_and_other_inputs_are_named(s3, remote_digits, tmp_path):
    server, env = s3
    before = manifest_of(env, remote_digits)
    for cache in (None, tmp_path / "other-cache"):      # this node's staging, or another node's: the same answer
        again = make_shards("create", "digits", "--out", remote_digits, "--workers", "1",
                            env=env if cache is None else dict(env, MASKCON_SHARD_CACHE=str(cache)))
        assert again.returncode == 0 and f"{remote_digits} already holds complete digits shards" in again.stderr, \
            again.stderr[-3000:]
        assert manifest_of(env, remote_digits) == before
    line = one_line(make_shards("create", "digits", "--out", remote_digits, "--seed", "1", env=env))
    assert line == (f"error: {remote_digits} holds shards made from other inputs (--seed 0 -> 1); pass --overwrite "
                    f"to rebuild them from these, or choose another --out")
    assert manifest_of(env, remote_digits) == before


def test_two_processes_of_one_node_download_each_file_once(s3, remote_digits, tmp_path):
    server, env = s3
    url = f"s3://{BUCKET}/twice"
    copy_prefix(env, remote_digits, url)
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "launch/make_shards.py", "verify", url, "--workers", "1"]
    both = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    for process in both:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    for name in files_of(manifest_of(env, url)):
        assert server.gets(f"/twice/{name}") == 1, name


def test_a_remote_shard_changed_after_create_is_refused_in_one_line(s3, remote_digits, tmp_path):
    import s3fs

    server, env = s3
    url = f"s3://{BUCKET}/changed"
    copy_prefix(env, remote_digits, url)
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                           secret=env["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    tar = f"{url.removeprefix('s3://')}/train/train-000003.tar"
    data = bytearray(fs.cat_file(tar))
    data[700] ^= 0xFF   # same size, other bytes
    fs.pipe_file(tar, bytes(data))
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    line = one_line(make_shards("verify", url, env=env))
    assert "train/train-000003.tar differs from the folder's manifest" in line
    entry = entries(tmp_path / "cache")[0]
    assert not (entry / "manifest.json").exists() and not (entry / "train" / "train-000003.tar").exists()
    assert not list(entry.rglob("*.partial"))


def test_wrong_credentials_a_missing_bucket_and_no_credentials_are_one_line_each(s3, remote_digits, tmp_path):
    server, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    wrong = one_line(make_shards("verify", remote_digits, env=dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")))
    assert "access denied" in wrong and remote_digits in wrong
    missing = one_line(make_shards("verify", "s3://no-such-bucket/digits", env=env))
    assert "no bucket 'no-such-bucket' at the store of s3://no-such-bucket/digits" in missing
    bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    none = one_line(make_shards("verify", remote_digits, env=bare))
    assert "no credentials found" in none
    for wanted, environment in (("access denied", dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")),
                                ("no credentials found", bare)):     # create says the same, before any shard
        out = f"s3://{BUCKET}/made-{wanted.split()[0]}"
        line = one_line(make_shards("create", "digits", "--out", out, env=environment))
        assert wanted in line and "no bucket" not in line, line
    assert not cache_files(tmp_path / "cache") if (tmp_path / "cache").exists() else True


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 in front of `target` that, once it has passed `cut_after` bytes to clients,
    closes every connection and stops listening (the network is lost); `restore()` listens again on the
    same port and passes everything."""

    def __init__(self, target: int, cut_after: int, uploads: bool = False):
        """uploads: count the bytes clients send (a create), not those they receive."""
        self.target, self.cut_after, self.passed, self.port = target, cut_after, 0, free_port()
        self.uploads = uploads
        self.lock, self.sockets = threading.Lock(), []
        self._listen()

    def _listen(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.uploads), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, not self.uploads), daemon=True).start()

    def _pump(self, source, sink, counted: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                if counted:
                    with self.lock:
                        self.passed += len(data)
                        cut = self.cut_after is not None and self.passed > self.cut_after
                    if cut:
                        self.cut()
                        return
        except OSError:
            pass

    def cut(self) -> None:
        with self.lock:
            everything, self.sockets = [self.listener, *self.sockets], []
        for open_socket in everything:
            try:
                open_socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            open_socket.close()

    def restore(self) -> None:
        self.cut_after = None
        self._listen()


def cut_a_third_in(s3, remote_digits: str, tmp_path: Path) -> tuple:
    """(server, manifest, proxy, env): the store behind a proxy that cuts every connection a third of the way
    through the folder's bytes; two tries per file."""
    server, env = s3
    manifest = manifest_of(env, remote_digits)
    total = sum(record["tar_bytes"] + record["index_bytes"] for split in manifest["splits"].values()
                for record in split["shards"])
    proxy = CuttingProxy(server.port, cut_after=total // 3)
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"), AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
               MASKCON_REMOTE_ATTEMPTS="2")
    return server, manifest, proxy, env


def test_network_lost_mid_download_is_one_line_and_the_same_command_then_completes(s3, remote_digits, tmp_path):
    server, manifest, proxy, env = cut_a_third_in(s3, remote_digits, tmp_path)
    cut = make_shards("verify", remote_digits, "--workers", "1", env=env, timeout=120)
    line = one_line(cut)
    assert "failed" in line and "rerun" in line
    # the parallel downloads all meet the cut at once: one notice of the retry for them all, not one per file
    assert sum("; try 2 of 2 in" in said for said in cut.stderr.splitlines()) == 1, cut.stderr[-3000:]
    entry = entries(tmp_path / "cache")[0]
    kept = cache_files(entry)
    assert kept and not (entry / "manifest.json").exists() and not list(entry.rglob("*.partial"))
    assert len(kept) < 2 * sum(len(split["shards"]) for split in manifest["splits"].values())
    proxy.restore()
    before = server.gets("/digits/")
    again = make_shards("verify", remote_digits, "--workers", "1", env=env)
    assert again.returncode == 0 and "every shard intact" in again.stdout, again.stderr[-3000:]
    assert f"{len(kept)} files kept from an interrupted staging" in again.stderr
    assert server.gets("/digits/") - before == len(files_of(manifest)) - len(kept) + 1   # + the manifest
    for record in manifest["splits"]["train"]["shards"]:
        assert hashlib.sha256((entry / record["tar"]).read_bytes()).hexdigest() == record["sha256"]


def test_a_retry_notice_on_a_terminal_starts_its_own_line_above_the_progress_bar(s3, remote_digits, tmp_path):
    """On a terminal (a pty: one screen for stdout and stderr) the bar is cleared before a retry notice is
    written, so the notice is not glued to the end of the bar's line."""
    import fcntl
    import pty
    import struct
    import termios

    server, manifest, proxy, env = cut_a_third_in(s3, remote_digits, tmp_path)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # 40 rows of 160 columns
    command = subprocess.Popen([sys.executable, "launch/make_shards.py", "verify", remote_digits], cwd=ROOT,
                               env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:    # the command ended and closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(controller)
    assert command.wait(timeout=120) == 2
    text = screen.decode(errors="replace")
    assert "%|" in text, repr(text)     # the bar was drawn
    notice = text.index("; try 2 of 2 in")
    start = text.rindex("downloading ", 0, notice)
    assert text[start - 1] in "\r\n", repr(text[max(0, start - 200):notice])


def test_the_cache_limit_evicts_the_least_recently_used_folder(s3, remote_digits, tmp_path):
    server, env = s3
    manifest = manifest_of(env, remote_digits)
    size = sum(record["tar_bytes"] + record["index_bytes"] for split in manifest["splits"].values()
               for record in split["shards"]) + len(json.dumps(manifest, indent=1)) + 1
    copy_prefix(env, remote_digits, f"s3://{BUCKET}/second")
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    limit = ["--shard-cache-limit", str(int(size * 1.5))]
    first = make_shards("verify", remote_digits, *limit, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    (old,) = entries(tmp_path / "cache")
    second = make_shards("verify", f"s3://{BUCKET}/second", *limit, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"evicted {old.name}" in second.stderr
    (new,) = entries(tmp_path / "cache")
    assert new != old and new.name.startswith("second-")
    too_small = one_line(make_shards("verify", remote_digits, "--shard-cache-limit", str(size // 2), env=env))
    assert "more than the --shard-cache-limit" in too_small


def test_a_dataset_larger_than_the_free_space_is_refused_naming_both_sizes(s3, remote_digits, tmp_path):
    """A real small file system (tmpfs) where this machine may mount one; the decision itself with the
    dataset's real size against a real free-space figure in any case."""
    from maskcon import remote

    server, env = s3
    manifest = manifest_of(env, remote_digits)
    needed = sum(size for _, size, _ in remote.remote_files(manifest))
    free = shutil.disk_usage(tmp_path).free
    assert remote.space_problem(needed, free, tmp_path) is None
    problem = remote.space_problem(needed, needed // 2, tmp_path)
    assert remote.format_size(needed) in problem and remote.format_size(needed // 2) in problem
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={needed // 2}", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here; the decision was checked above with real sizes")
    try:
        line = one_line(make_shards("verify", remote_digits, "--shard-cache", str(small / "cache"), env=env))
        assert "free" in line and remote.format_size(needed) in line
        assert not cache_files(small / "cache")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_check_reads_the_remote_manifest_alone(s3, remote_digits, tmp_path):
    server, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    before = server.gets("/digits/train/")
    checked = subprocess.run([sys.executable, "launch/train.py", "--check", "--shards", remote_digits, *FAST,
                              "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert f"shards: {remote_digits} (manifest sha256" in checked.stdout
    assert server.gets("/digits/train/") == before and not (tmp_path / "cache").exists()


def test_without_the_cloud_extra_a_url_names_it(remote_digits, s3, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "fsspec.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(s3[1], PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]))
    line = one_line(make_shards("verify", remote_digits, env=env))
    assert 'pip install -e ".[cloud]"' in line


def test_a_run_on_s3_shards_ends_with_the_weights_of_the_run_on_local_shards(s3, remote_digits, digits_shards,
                                                                             tmp_path):
    server, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))

    def train(shards: str, out: Path) -> dict:
        done = subprocess.run([sys.executable, "launch/train.py", "--shards", shards, *FAST, "--output-dir",
                               str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((out / "results.json").read_text())

    remote_run = train(remote_digits, tmp_path / "remote")
    local_run = train(str(digits_shards), tmp_path / "local")
    assert remote_run["weights_fingerprint_per_process"] == local_run["weights_fingerprint_per_process"]
    recorded = yaml.safe_load((tmp_path / "remote" / "config.yaml").read_text())
    raw = (digits_shards / "manifest.json").read_bytes()
    assert recorded["shards"] == remote_digits
    assert recorded["provenance"]["shards"]["url"] == remote_digits
    staged = entries(tmp_path / "cache")[0]
    assert recorded["provenance"]["shards"]["manifest_sha256"] == hashlib.sha256(
        (staged / "manifest.json").read_bytes()).hexdigest()
    assert json.loads(raw)["splits"]["train"]["num_samples"] == 1437
    before = server.gets("/digits/")
    train(remote_digits, tmp_path / "again")   # a second run on the node: the cache alone
    assert server.gets("/digits/") - before == 1   # the manifest, compared
    # eval.py reads the remote shards the run recorded, or those of --shards URL, staged as training stages them
    for options, cache in (([], tmp_path / "cache"), (["--shards", remote_digits, "--shard-cache", "other"],
                                                      tmp_path / "other")):
        evaluated = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), str(tmp_path / "remote"),
                                    "--json", *options], cwd=tmp_path, env=env, capture_output=True, text=True,
                                   timeout=600)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads(evaluated.stdout)["R@1"] == pytest.approx(remote_run["R@1"], abs=1e-9)
        assert [entry.name for entry in entries(cache)] == [staged.name]


def test_an_interrupted_create_continues_where_it_stopped(s3, remote_digits, tmp_path):
    """The network lost a third of the way through `create --out s3://`: one line, no manifest remote; the
    same command again puts only what the first did not, then the manifest, and the folder verifies."""
    server, env = s3
    manifest = manifest_of(env, remote_digits)
    total = sum(record["tar_bytes"] + record["index_bytes"] for split in manifest["splits"].values()
                for record in split["shards"])
    url = f"s3://{BUCKET}/interrupted"
    proxy = CuttingProxy(server.port, cut_after=total // 3, uploads=True)
    cut = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"), AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
               MASKCON_REMOTE_ATTEMPTS="2")
    line = one_line(make_shards("create", "digits", "--out", url, "--workers", "1", env=cut, timeout=300))
    assert "rerun" in line
    puts = lambda: sum(1 for entry in server.log.read_text().splitlines()   # noqa: E731
                       if "PUT /" in entry and "/interrupted/" in entry)
    first_puts = puts()
    assert 0 < first_puts < len(files_of(manifest))
    proxy.restore()
    again = make_shards("create", "digits", "--out", url, "--workers", "1", env=cut)
    assert again.returncode == 0, again.stderr[-3000:]
    # each file put once more at most: the ones the cut broke off, and none that the first run finished
    assert puts() - first_puts <= len(files_of(manifest)) - first_puts + 8 + 1
    assert puts() - first_puts < len(files_of(manifest))
    verified = make_shards("verify", url, "--workers", "1", env=dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "c2")))
    assert verified.returncode == 0 and "every shard intact" in verified.stdout, verified.stderr[-3000:]


HTTPS_SERVER = """
import functools, http.server, ssl, sys
port, folder, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
server = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                         functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""


@pytest.fixture
def https_folder(digits_shards, tmp_path):
    """(URL, environment, copy of the digits' shards it serves, request log) of a real HTTPS server on
    127.0.0.1 with a self-signed certificate that the environment trusts (SSL_CERT_FILE)."""
    served = tmp_path / "served"
    shutil.copytree(digits_shards, served / "digits")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port, log = free_port(), tmp_path / "https.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-c", HTTPS_SERVER, str(port), str(served), str(cert), str(key)],
                                  stdout=handle, stderr=handle)
    deadline = time.monotonic() + 30
    while not _listening(port):
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    env = dict(os.environ, SSL_CERT_FILE=str(cert), MASKCON_SHARD_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    yield f"https://127.0.0.1:{port}/digits", env, served / "digits", log
    server.terminate()
    server.wait(timeout=30)


def test_an_https_folder_is_staged_verified_and_read_from_the_cache_after(https_folder, tmp_path):
    url, env, served, log = https_folder
    files = files_of(json.loads((served / "manifest.json").read_text()))
    gets = lambda: sum(1 for line in log.read_text().splitlines() if '"GET /digits/' in line   # noqa: E731
                       and "manifest.json" not in line)
    first = make_shards("verify", url, "--workers", "1", env=env)
    assert first.returncode == 0 and "every shard intact" in first.stdout, first.stderr[-3000:]
    assert gets() == len(files)
    entry = entries(tmp_path / "cache")[0]
    assert sorted(str(path.relative_to(entry)) for path in cache_files(entry)) == sorted(files + ["manifest.json"])
    again = make_shards("verify", url, "--workers", "1", env=env)
    assert again.returncode == 0 and gets() == len(files)   # the cache serves the second


def test_an_https_file_that_differs_from_its_manifest_is_one_line(https_folder, tmp_path):
    url, env, served, _ = https_folder
    shard = served / json.loads((served / "manifest.json").read_text())["splits"]["train"]["shards"][0]["tar"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF                            # the same size, another byte
    shard.write_bytes(bytes(data))
    line = one_line(make_shards("verify", url, "--workers", "1", env=env))
    assert "differs from the folder's manifest" in line and shard.name in line
    assert not (entries(tmp_path / "cache")[0] / "manifest.json").exists()


def test_two_training_processes_of_one_node_download_each_file_once(s3, remote_digits, tmp_path):
    server, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    files = files_of(manifest_of(env, remote_digits))
    gets = lambda: sum(server.gets(f"/digits/{name}") for name in files)   # noqa: E731
    before = gets()
    done = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "-q", "--multi_gpu",
                           "--num_processes", "2", "--main_process_port", str(free_port()), "launch/train.py",
                           "--shards", remote_digits, *FAST, "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert gets() - before == len(files)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["weights_fingerprint_per_process"]) == 2
    assert len(entries(tmp_path / "cache")) == 1


@pytest.mark.parametrize("where, says", [
    ("http://127.0.0.1:9/data/digits", "http:// shard folders are not supported"),
    ("s3:/data/digits", "write s3://BUCKET/PREFIX (two slashes, lower case)"),
    ("S3://data/digits", "write the scheme in lower case, s3://"),
])
def test_a_location_that_looks_like_a_url_but_is_none_we_read_is_one_line(where, says, tmp_path):
    """Not a local folder named 'http:' or 's3:' (which a run would write, and create would fill)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    checked = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--check", "--shards", where,
                              "--output-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert says in one_line(checked)
    created = make_shards("create", "digits", "--out", where, env=env)
    assert says in one_line(created)
    assert sorted(path.name for path in tmp_path.iterdir()) == [] and not (ROOT / where.split(":")[0]).exists()


def test_create_refuses_a_read_only_https_folder_at_once():
    line = one_line(make_shards("create", "digits", "--out", "https://127.0.0.1:9/x", env=dict(os.environ)))
    assert "https:// shard folders are read-only" in line


def test_a_bucket_typo_and_a_missing_bucket_on_create_say_what_is_missing(s3, remote_digits, tmp_path):
    _, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    typo = one_line(make_shards("verify", "s3://maskcon-dta/digits", env=env))
    assert "no bucket 'maskcon-dta'" in typo and "create" not in typo
    prefix = one_line(make_shards("verify", f"s3://{BUCKET}/digitz", env=env))
    assert "manifest.json is missing there" in prefix and "--out s3://maskcon-data/digitz" in prefix
    create = one_line(make_shards("create", "digits", "--out", "s3://maskcon-dta/digits", env=env))
    assert "no bucket 'maskcon-dta'" in create and "create the bucket first" in create


def test_check_says_whether_the_node_holds_the_folder_and_refuses_a_folder_over_the_cache_limit(s3, remote_digits,
                                                                                               tmp_path):
    _, env = s3
    env = dict(env, WANDB_MODE="disabled")
    cache = tmp_path / "cache"

    def check(*extra):
        return subprocess.run([sys.executable, "launch/train.py", "--check", "--shards", remote_digits,
                               "--shard-cache", str(cache), "--output-dir", str(tmp_path / "run"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    before = check()
    assert before.returncode == 0 and f"staged by the run into the shard cache {cache}" in before.stdout
    over = one_line(check("--shard-cache-limit", "1MB"))
    assert "more than the --shard-cache-limit 1.0 MB" in over
    assert not cache.exists()                      # read without writing, the refusal too
    assert make_shards("verify", remote_digits, "--shard-cache", str(cache), env=env).returncode == 0
    after = check()
    assert after.returncode == 0 and f"already staged in {entries(cache)[0]}" in after.stdout


def test_the_folder_create_uploaded_is_the_nodes_cache_entry(s3, tmp_path):
    server, env = s3
    env = dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "cache"))
    url = f"s3://{BUCKET}/created-here"
    made = make_shards("create", "digits", "--out", url, "--workers", "1", "--shard-cache", str(tmp_path / "cache"),
                       env=dict(env, MASKCON_SHARD_CACHE=str(tmp_path / "elsewhere")))
    assert made.returncode == 0, made.stderr[-3000:]
    assert "shard cache entry" in made.stderr and list((tmp_path / "cache" / ".uploads").iterdir()) == []
    assert not (tmp_path / "elsewhere").exists()
    before = server.gets("/created-here/")
    verified = make_shards("verify", url, env=env)
    assert verified.returncode == 0 and "every shard intact" in verified.stdout
    assert server.gets("/created-here/") - before == 1      # the manifest, compared; no shard downloaded


def test_ctrl_c_while_a_store_is_retried_is_one_line_and_exit_130(tmp_path):
    """SIGINT to the command's process group, as a terminal sends it, during the backoff of an unreachable
    store."""
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT), AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
               AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
               MASKCON_SHARD_CACHE=str(tmp_path / "cache"), MASKCON_REMOTE_ATTEMPTS="8")
    command = subprocess.Popen([sys.executable, "launch/make_shards.py", "verify", f"s3://{BUCKET}/digits"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)   # imports done, the store retried with backoff (0.5, 1, 2, 4 s ...)
    assert command.poll() is None
    os.killpg(command.pid, signal.SIGINT)
    _, err = command.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert command.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("stopped by SIGINT; run the same command again to continue")


def test_a_remote_folder_of_another_dataset_is_refused_before_any_download(s3, remote_digits, tmp_path):
    _, env = s3
    env = dict(env, WANDB_MODE="disabled")
    cache = tmp_path / "cache"
    for extra in (["--check"], ["--max-steps", "1"]):
        done = subprocess.run([sys.executable, "launch/train.py", "--dataset", "cifar100", "--shards", remote_digits,
                               "--shard-cache", str(cache), "--output-dir", str(tmp_path / "run"), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        line = one_line(done)
        assert f"{remote_digits} holds shards of 'digits', not 'cifar100'" in line, extra
    assert not cache.exists() or cache_files(cache) == []


def test_check_refuses_a_cache_it_cannot_write_or_fill_before_anything_is_read(tmp_path, digits_shards):
    """staging_state (what --check says of a remote folder) reads the local disk alone: a --shard-cache under a
    file, and shards larger than the cache's free space, are each one line, as the run would meet them."""
    from maskcon.errors import UserError
    from maskcon.remote import staging_state

    raw = (digits_shards / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(UserError) as error:
        staging_state("s3://bucket/digits", manifest, raw, tmp_path / "notes.txt" / "cache", None)
    assert str(error.value).startswith(f"the shard cache {tmp_path / 'notes.txt' / 'cache'} cannot be written "
                                       f"({tmp_path / 'notes.txt'} is a file)")
    huge = json.loads(raw)
    huge["splits"]["train"]["shards"][0]["tar_bytes"] = 2**62          # more than any disk holds
    with pytest.raises(UserError) as error:
        staging_state("s3://bucket/digits", huge, raw, tmp_path / "cache", None)
    assert str(error.value).startswith("the shards need ") and f"in the shard cache {tmp_path / 'cache'}" in \
        str(error.value)
    assert "staged by the run" in staging_state("s3://bucket/digits", manifest, raw, tmp_path / "cache", None)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "notes.txt"]      # nothing written

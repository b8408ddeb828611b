"""Where a run's numbers go: OUTPUT_DIR/metrics.jsonl always, Weights & Biases when enabled; the main
process's console output goes to OUTPUT_DIR/console.log (and to W&B as a file of the run).

Used on the main process only. wandb is imported only when the mode is not 'disabled'.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from maskcon import rundir
from maskcon.errors import UserError, WriteFailed


def wandb_logged_in() -> bool:
    """True when the places W&B looks for credentials hold some for its configured host: WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE, a netrc entry (NETRC, else ~/.netrc or ~/_netrc) for the host of
    WANDB_BASE_URL or of the settings files' base_url (W&B's cloud by default), or an api_key in a
    settings file. Read from the files alone: it starts no W&B process, never prompts, never touches the
    network (wandb.login may wait on the network to greet a user)."""
    import configparser
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    settings: dict[str, str] = {}
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for path in (config_dir / "settings", Path(os.environ.get("WANDB_DIR") or ".") / "wandb" / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section("default"):
            settings.update(parser["default"])
    base_url = os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or "https://api.wandb.ai"
    if settings.get("api_key"):
        return True
    host = urlparse(base_url.strip()).netloc   # as W&B writes its netrc entries: the port included
    candidates = [Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC") else \
        [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            entry = netrc.netrc(str(path)).authenticators(host or "")
        except (netrc.NetrcParseError, OSError, UnicodeDecodeError):
            return False
        return bool(entry and entry[2])
    return False


class ConsoleLog:
    """Copies what this process writes to stdout and stderr into a file (appended to on --resume), line by
    line per stream, keeping of a progress-bar line only its last state (the text after its last \\r)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = self.path.open("a")
        self._streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        sys.stdout = _Tee(sys.stdout, self)
        sys.stderr = _Tee(sys.stderr, self)

    def close(self) -> None:
        for name, stream in self._streams.items():
            if isinstance(getattr(sys, name), _Tee):
                getattr(sys, name).finish()
                setattr(sys, name, stream)
        self._file.close()


class _Tee:
    """A text stream that writes to `stream` and, by whole lines, to a ConsoleLog's file."""

    def __init__(self, stream, log: ConsoleLog):
        self._stream, self._log, self._line = stream, log, ""

    def write(self, text: str) -> int:
        if not self._log._file.closed:
            for piece in text.splitlines(keepends=True):
                self._line = self._line + piece if "\r" not in piece else piece.rsplit("\r", 1)[1]
                if self._line.endswith("\n"):
                    self._log._file.write(self._line)
                    self._line = ""
            self._log._file.flush()
        return self._stream.write(text)

    def finish(self) -> None:
        if self._line.strip():
            self._log._file.write(self._line + "\n")
        self._line = ""

    def __getattr__(self, name):
        return getattr(self._stream, name)


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online when logged in, else offline. WANDB_MODE in the environment wins over auto."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_logged_in() else "offline"


class Tracker:
    """Appends one JSON object per row to metrics.jsonl and mirrors it to W&B."""

    def __init__(self, output_dir: Path, *, config: dict, wandb_mode: str, project: str, name: str,
                 resume: bool = False, resume_step: int = 0):
        self.output_dir = Path(output_dir)
        self.console = ConsoleLog(self.output_dir / rundir.CONSOLE)
        self.metrics_path = self.output_dir / rundir.METRICS
        if resume and self.metrics_path.exists():
            # rows written after the checkpoint we resume from are logged again by the resumed run
            _keep_rows_until(self.metrics_path, resume_step)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resume else os.O_TRUNC)
        self._file = _failed_write_explained(self.metrics_path, lambda: os.open(self.metrics_path, flags, 0o644))
        self.mode = resolve_wandb_mode(wandb_mode)
        self.run = None
        if self.mode != "disabled":
            import wandb

            run_id_file = self.output_dir / rundir.WANDB_RUN_ID
            run_id = run_id_file.read_text().strip() if resume and run_id_file.exists() else None
            try:
                self.run = wandb.init(project=project, name=name, config=config, dir=str(self.output_dir),
                                      settings=wandb.Settings(quiet=True, console="off"),
                                      mode=self.mode, id=run_id, resume="allow" if run_id else None)
            except Exception as err:  # wandb raises many types for login and network trouble
                raise UserError(f"W&B could not start in {self.mode} mode ({str(err).splitlines()[0]}); "
                                "use --wandb offline or --wandb disabled") from None
            run_id_file.write_text(self.run.id)
            if self.mode == "offline":    # a resumed run's parts, one per start: wandb sync sends them in order
                this = self.run.dir.rsplit("/files", 1)[0]
                parts = sorted({str(path) for path in Path(this).parent.glob(f"offline-run-*-{self.run.id}")} | {this})
                print(f"W&B is offline; upload later with: wandb sync {shlex.join(parts)}", file=sys.stderr)

    def log(self, row: dict) -> None:
        _append(self._file, self.metrics_path, (json.dumps(row) + "\n").encode())
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def log_images(self, step: int, images: dict) -> None:
        """images: name -> PIL image. Saved next to the metrics, and to W&B as wandb.Image."""
        for name, image in images.items():
            _save_picture(image, self.output_dir / f"{name}-{step:07d}.png")
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(image) for name, image in images.items()}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def close(self) -> None:
        os.close(self._file)
        self.console.close()
        if self.run is not None:   # files in the run's folder are uploaded with it
            shutil.copyfile(self.console.path, Path(self.run.dir) / self.console.path.name)
        if self.run is not None:
            self.run.finish()


# ------------------------------------------------------------------------------------------ metrics files


def _failed_write_explained(path: Path, write):
    """write(), with an OSError (no space, no permission) turned into one line naming PATH."""
    try:
        return write()
    except OSError as error:
        raise WriteFailed(f"writing {path} failed ({error.strerror or error}); free space or fix permissions "
                        f"there; what was written before is intact") from None


def _append(descriptor: int, path: Path, data: bytes) -> None:
    """Append DATA (one row) to the open file; a row that fails is cut off again, so the file ends with
    whole rows."""
    start = os.lseek(descriptor, 0, os.SEEK_END)

    def write() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
        except OSError:
            os.ftruncate(descriptor, start)
            raise

    _failed_write_explained(path, write)


def _keep_rows_until(path: Path, last_step: int) -> None:
    """Rewrite PATH (metrics.jsonl) atomically with the rows up to `last_step`; rows that are not whole
    JSON (cut short when the run was stopped or the disk filled) are dropped with one warning line."""
    kept, cut = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            cut.append(number)
            continue
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            kept.append(line)
    if cut:
        print(f"warning: {path}: dropped {len(cut)} row(s) cut short (line {', '.join(map(str, cut[:3]))}), "
              f"written when the run was stopped", file=sys.stderr)
    partial = path.with_name(f".{path.name}.partial")

    def rewrite() -> None:
        try:
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    _failed_write_explained(path, rewrite)


def _save_picture(image, path: Path) -> None:
    """Save a PIL image as PNG at PATH atomically (under a temporary name, then renamed)."""
    partial = path.with_name(f".{path.name}.partial")

    def save() -> None:
        from PIL.PngImagePlugin import PngInfo

        texts = PngInfo()   # what the picture says (its title and legend), kept in the file
        for name in ("Title", "Description"):
            if isinstance(image.info.get(name), str):
                texts.add_text(name, image.info[name])
        try:
            image.save(partial, format="PNG", pnginfo=texts)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    _failed_write_explained(path, save)

"""--wandb auto follows W&B's own credential lookup: environment, netrc for the configured host, none."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEY = "k" * 40


def mode(home: Path, **environment) -> str:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WANDB_") and name not in ("NETRC", "HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), **environment)
    out = subprocess.run([sys.executable, "-c", "from maskcon.tracking import resolve_wandb_mode as r; print(r('auto'))"],
                         env=env, capture_output=True, text=True, cwd=home, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def home(tmp_path) -> Path:
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_no_credentials_is_offline(home):
    assert mode(home) == "offline"


def test_an_api_key_in_the_environment_is_online(home):
    assert mode(home, WANDB_API_KEY=KEY) == "online"


def test_a_netrc_entry_for_a_self_hosted_server_is_online(home):
    (home / ".netrc").write_text(f"machine wandb.example.org\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)
    assert mode(home, WANDB_BASE_URL="https://wandb.example.org") == "online"
    assert mode(home) == "offline"      # the entry is for another host than W&B's default one


def test_the_host_of_the_settings_file_picks_the_netrc_entry(home):
    (home / ".netrc").write_text(f"machine wandb.example.org\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)
    (home / ".config" / "wandb").mkdir(parents=True)
    (home / ".config" / "wandb" / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    assert mode(home) == "online"


def test_a_netrc_entry_of_a_server_on_its_own_port_is_online(home):
    """W&B writes `machine HOST:PORT` for a server on a port of its own, and reads it so."""
    (home / ".netrc").write_text(f"machine localhost:8080\n  login user\n  password {KEY}\n")
    (home / ".netrc").chmod(0o600)
    assert mode(home, WANDB_BASE_URL="http://localhost:8080") == "online"


def test_an_unreadable_netrc_is_offline(home):
    (home / ".netrc").write_text("machine\n")
    assert mode(home) == "offline"


def test_wandb_mode_in_the_environment_wins(home):
    assert mode(home, WANDB_API_KEY=KEY, WANDB_MODE="offline") == "offline"


def test_the_offline_sync_command_of_a_folder_with_a_space_pastes_as_it_is(tmp_path):
    """The command the tracker prints runs as printed: a run folder `my run` is quoted."""
    folder = tmp_path / "my run"
    folder.mkdir()
    script = ("import sys; from pathlib import Path; from maskcon.tracking import Tracker; "
              "t = Tracker(Path(sys.argv[1]), config={}, wandb_mode='offline', project='p', name='n'); t.close()")
    env = {name: value for name, value in os.environ.items() if not name.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", script, str(folder)], env=dict(env, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "upload later with: " in line]
    assert len(said) == 1, done.stderr[-3000:]
    command = said[0].split("upload later with: ", 1)[1]
    synced = subprocess.run(["bash", "-c", f'for a in {command.removeprefix("wandb sync ")}; do echo "$a"; done'],
                            capture_output=True, text=True)
    parts = synced.stdout.splitlines()
    assert command.startswith("wandb sync ") and len(parts) == 1 and Path(parts[0]).is_dir(), command
    assert Path(parts[0]).parent == folder / "wandb"

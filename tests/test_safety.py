"""Writes that fail for lack of space: checkpoints, shards, metrics and pictures end in one line naming the
path, leave what was written before intact and leave no partial file. Real small tmpfs mounts (root
only; skipped elsewhere), real checkpoints, real shards through the door."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from maskcon import checkpoints
from maskcon.errors import UserError
from maskcon.tracking import Tracker
from tests.test_checkpoints import build, train_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a folder on a fresh tmpfs of that size ("150m"); unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Leave no free byte on FOLDER's file system."""
    with open(folder / "filler", "wb") as handle:
        try:
            while True:
                handle.write(bytes(1 << 16))
                handle.flush()
        except OSError:
            pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".partial") or p.name.endswith(".partial"))


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_the_older_one_stays(tmpfs):
    root = tmpfs("150m") / "checkpoints"  # one checkpoint of the small learner fits, two do not
    accelerator, model, optimizer = build(seed=0)
    first = checkpoints.save(accelerator, root, step=1, epoch=0, extra_state={"note": 1}, keep=2)
    train_steps(accelerator, model, optimizer, 1, seed=1)
    with pytest.raises(UserError) as caught:
        checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={"note": 2}, keep=2)
    message = str(caught.value)
    assert "\n" not in message and str(root / "step-00000002") in message and "No space left" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    assert checkpoints.damage(first) is None and checkpoints.newest_intact(root, print) == first


@pytest.mark.slow
def test_create_that_fills_the_disk_exits_2_in_one_line_and_resumes_after(tmpfs):
    out = tmpfs("1m") / "digits"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "launch" / "make_shards.py"), "create", "digits", "--out", str(out),
               "--workers", "1"]
    failed = subprocess.run(command, capture_output=True, text=True, env=env)
    assert failed.returncode == 2, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr and "No space left" in errors[0]
    assert str(out) in errors[0] and "rerun the same command" in errors[0]
    assert leftovers(out.parent) == [] and not (out / "manifest.json").exists()
    kept = sorted(p.name for p in out.rglob("*.tar"))
    assert kept  # the shards finished before the disk filled

    subprocess.run(["mount", "-o", "remount,size=20m", str(out.parent)], check=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    verify = subprocess.run([sys.executable, str(ROOT / "launch" / "make_shards.py"), "verify", str(out)],
                            capture_output=True, text=True, env=env)
    assert verify.returncode == 0 and "every shard intact" in verify.stdout


def test_metrics_and_pictures_on_a_full_disk_are_one_line_and_keep_what_was_written(tmpfs):
    folder = tmpfs("1m")
    tracker = Tracker(folder, config={}, wandb_mode="disabled", project="p", name="n")
    tracker.log({"step": 1, "loss": 2.0})
    tracker.log_images(1, {"retrievals": Image.new("RGB", (64, 64), (10, 20, 30))})
    picture = (folder / "retrievals-0000001.png").read_bytes()
    fill(folder)
    with pytest.raises(UserError) as caught:
        tracker.log({"step": 2, "loss": 1.0, "note": "x" * 8192})  # larger than what a block may still take
    assert "\n" not in str(caught.value) and str(folder / "metrics.jsonl") in str(caught.value)
    with pytest.raises(UserError) as caught:
        tracker.log_images(2, {"retrievals": Image.new("RGB", (256, 256), (1, 2, 3))})
    assert "\n" not in str(caught.value) and str(folder / "retrievals-0000002.png") in str(caught.value)
    tracker.close()
    assert [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "loss": 2.0}]
    assert (folder / "retrievals-0000001.png").read_bytes() == picture
    assert leftovers(folder) == [] and not (folder / "retrievals-0000002.png").exists()

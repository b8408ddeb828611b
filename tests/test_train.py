"""End-to-end runs of launch/train.py on the bundled digits, as users start it."""

import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# small and quick: 8-pixel inputs, 32 images per step, a bank of 64 keys
FAST = ["--image-size", "8", "--batch-size", "32", "--queue-size", "64", "--eval-batch-size", "128",
        "--warmup-epochs", "0.5", "--log-every", "2", "--loader-threads", "1", "--eval-untrained", "false"]
STEPS_PER_EPOCH = 1437 // 32  # digits' train split, 1 process


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    from maskcon import shards

    folder = tmp_path_factory.mktemp("shards") / "digits"
    shards.create("digits", None, folder)
    return folder


def environment(**extra):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def train(args, *, timeout=600, **popen):
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def read_metrics(output_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()
            if line.endswith("}")]
    return [r for r in rows if "loss" in r], [r for r in rows if "R@1" in r]


def test_short_run_writes_metrics_results_and_exports(digits_shards, tmp_path):
    out = tmp_path / "run"
    result = train(["--shards", str(digits_shards), "--output-dir", str(out), "--epochs", "2", *FAST,
                    "--eval-every", "1", "--checkpoint-every", "1", "--wandb", "disabled", "--eval-untrained"])
    assert result.returncode == 0, result.stderr[-3000:]
    steps, evals = read_metrics(out)
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps})
    assert steps[-1]["step"] == 2 * STEPS_PER_EPOCH
    for row in steps:
        assert set(row) == {"step", "epoch", "loss", "lr", "images_per_s", "data_wait"}
        assert math.isfinite(row["loss"]) and row["lr"] > 0 and row["images_per_s"] > 0
        assert 0 <= row["data_wait"] <= 1
    assert [r["epoch"] for r in evals] == [0, 1, 2]  # the untrained network first
    assert evals[0]["step"] == 0
    for row in evals:
        assert {"R@1", "R@2", "R@5", "R@10", "R@50", "R@100"} <= set(row)
        assert 0 < row["R@1"] <= row["R@2"] <= row["R@5"] <= row["R@10"] <= row["R@50"] <= row["R@100"] <= 100
    results = json.loads((out / "results.json").read_text())
    assert results["R@1"] == evals[-1]["R@1"] and results["step"] == 2 * STEPS_PER_EPOCH
    assert results["untrained_R@1"] == evals[0]["R@1"]
    assert "final R@1" in result.stdout and "untrained R@1" in result.stdout
    assert (out / "backbone.pt").exists() and (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        f"step-{STEPS_PER_EPOCH:08d}", f"step-{2 * STEPS_PER_EPOCH:08d}"]
    assert list(out.glob("retrievals-*.png")) and list(out.glob("embedding-*.png"))


@pytest.mark.parametrize("method, extra", [
    ("maskcon", ["--mixed-precision", "bf16"]),
    ("selfcon", []),
    ("grafit", ["--w", "0.8"]),
    ("coins", ["--w", "0.5"]),
    ("supfine", []),
])
def test_every_method_trains(method, extra, digits_shards, tmp_path):
    out = tmp_path / method
    result = train(["--shards", str(digits_shards), "--output-dir", str(out), "--method", method, "--epochs", "1",
                    "--max-steps", "4", *FAST, "--checkpoint-every", "0", "--wandb", "disabled", *extra])
    assert result.returncode == 0, result.stderr[-3000:]
    steps, evals = read_metrics(out)
    assert steps[-1]["step"] == 4 and all(math.isfinite(r["loss"]) for r in steps)
    assert len(evals) == 1 and evals[0]["R@1"] > 0
    if method == "maskcon":
        config = (out / "config.yaml").read_text()
        assert "mixed_precision: bf16" in config


def _wait_for(condition, process, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


def test_resume_after_sigkill_matches_an_uninterrupted_run(digits_shards, tmp_path):
    args = ["--shards", str(digits_shards), "--epochs", "2", *FAST, "--eval-every", "2",
            "--checkpoint-every", "1", "--wandb", "disabled"]
    whole = tmp_path / "whole"
    assert train([*args, "--output-dir", str(whole)]).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "launch/train.py", *args, "--output-dir", str(killed)], cwd=ROOT,
                               env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}"
    _wait_for(lambda: (first / "trainer_state.json").exists(), process)
    _wait_for(lambda: read_metrics(killed)[0][-1]["step"] > STEPS_PER_EPOCH, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()
    resumed = train([*args, "--output-dir", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {STEPS_PER_EPOCH}" in resumed.stdout
    whole_steps, _ = read_metrics(whole)
    resumed_steps, resumed_evals = read_metrics(killed)
    assert [r["step"] for r in resumed_steps] == [r["step"] for r in whole_steps]  # none repeated or lost
    assert json.loads((killed / "results.json").read_text())["step"] == 2 * STEPS_PER_EPOCH
    assert len(resumed_evals) == 1


def test_sigterm_leaves_a_checkpoint_to_resume_from(digits_shards, tmp_path):
    out = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, "launch/train.py", "--shards", str(digits_shards), "--epochs", "5",
                                *FAST, "--checkpoint-every", "0", "--wandb", "disabled", "--output-dir", str(out)],
                               cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and read_metrics(out)[0], process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM" in stdout
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert 0 < state["step"] < 5 * STEPS_PER_EPOCH
    resumed = train(["--shards", str(digits_shards), "--epochs", "5", *FAST, "--wandb", "disabled",
                     "--output-dir", str(out), "--resume", "--max-steps", str(state["step"] + 1)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == state["step"] + 1


def test_two_gloo_processes_end_with_the_same_weights(digits_shards, tmp_path):
    out = tmp_path / "two"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "launch/train.py", "--shards", str(digits_shards), "--epochs", "1", "--max-steps", "6", *FAST,
               "--wandb", "disabled", "--output-dir", str(out)]
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    results = json.loads((out / "results.json").read_text())
    first, second = results["weights_fingerprint_per_process"]
    assert first == second and results["step"] == 6


def test_wandb_offline_files_hold_metrics_and_images(digits_shards, tmp_path):
    out = tmp_path / "wandb-run"
    result = train(["--shards", str(digits_shards), "--output-dir", str(out), "--epochs", "1", "--max-steps", "4",
                    *FAST, "--wandb", "offline"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb sync" in result.stderr
    run_dirs = list((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    history = read_wandb_history(next(run_dirs[0].glob("run-*.wandb")))
    logged = {key for row in history for key in row}
    assert {"loss", "lr", "R@1", "R@100", "retrievals", "embedding"} <= logged
    images = list(run_dirs[0].glob("files/media/images/*.png"))
    assert any(p.name.startswith("retrievals") for p in images)
    assert any(p.name.startswith("embedding") for p in images)


def read_wandb_history(path: Path) -> list[dict]:
    """History rows of a W&B run file (a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, payload, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # block trailer or padding
            position += left
            continue
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(item.key or item.nested_key[0]): item.value_json for item in record.history.item})
    return rows


def test_missing_shards_name_the_command_to_run(tmp_path):
    result = train(["--dataset", "cifar100", "--shards", str(tmp_path / "nowhere"), "--wandb", "disabled",
                    "--output-dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: no shards in {tmp_path / 'nowhere'}; make them with: python "
                                     f"launch/make_shards.py create cifar100 --src SRC --out {tmp_path / 'nowhere'}")


def test_batch_larger_than_the_dataset_is_refused(digits_shards, tmp_path):
    result = train(["--shards", str(digits_shards), "--batch-size", "5000", "--wandb", "disabled",
                    "--output-dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --batch-size 5000 is larger than the 1437 training images")
    assert "Traceback" not in result.stderr

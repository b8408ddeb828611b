"""End-to-end runs of launch/train.py on the bundled digits, as users start it: outputs, every method,
exact resume, faults (damaged shards and checkpoints, changed options), and several gloo processes."""

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# small and quick: 8-pixel inputs, 64 images per step, a bank of 128 keys
FAST = ["--image-size", "8", "--batch-size", "64", "--queue-size", "128", "--eval-batch-size", "128",
        "--warmup-epochs", "0.5", "--log-every", "2", "--loader-threads", "1", "--eval-untrained", "false"]
STEPS_PER_EPOCH = 1437 // 64  # digits' train split, 1 process: 22

pytestmark = pytest.mark.slow


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
        assert set(row) == {"step", "epoch", "loss", "lr", "images_per_s", "data_wait", "data_ms_per_batch",
                            "feed_cpu_ms_per_batch"}
        assert math.isfinite(row["loss"]) and row["lr"] > 0 and row["images_per_s"] > 0
        assert 0 <= row["data_wait"] <= 1 and row["data_ms_per_batch"] >= 0 and row["feed_cpu_ms_per_batch"] >= 0
    assert sum(row["feed_cpu_ms_per_batch"] for row in steps) > 0   # the loader's feeding work is counted
    assert [r["epoch"] for r in evals] == [0, 1, 2]  # the untrained network first
    assert evals[0]["step"] == 0
    for row in evals:
        assert {"R@1", "R@2", "R@5", "R@10", "R@50", "R@100"} <= set(row)
        assert 0 < row["R@1"] <= row["R@2"] <= row["R@5"] <= row["R@10"] <= row["R@50"] <= row["R@100"] <= 100
        assert 0 < row["eval_s"] < 600                                   # the evaluation's wall time, seconds
    results = json.loads((out / "results.json").read_text())
    assert results["R@1"] == evals[-1]["R@1"] and results["step"] == 2 * STEPS_PER_EPOCH
    assert results["untrained_R@1"] == evals[0]["R@1"]
    assert "final R@1" in result.stdout and "untrained R@1" in result.stdout
    assert "precision fp32;" in result.stdout and "1 process x batch" in result.stdout   # the start line
    final = f"final R@1 {results['R@1']:.2f}"
    assert final in result.stdout and final in (out / "console.log").read_text()   # the last words are logged too
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


def test_a_metrics_row_holds_the_mean_loss_of_the_steps_since_the_last_row(digits_shards, tmp_path):
    """Logging does not change training: a run that logs every 3 steps logs the mean of the losses that the
    same run, logging every step, logged for those 3 steps (not the last step's loss alone)."""
    rows = {}
    for every in ("1", "3"):
        out = tmp_path / f"every-{every}"
        result = train(["--shards", str(digits_shards), "--output-dir", str(out), "--epochs", "1", "--max-steps", "6",
                        *FAST, "--log-every", every, "--checkpoint-every", "0", "--wandb", "disabled"])
        assert result.returncode == 0, result.stderr[-3000:]
        rows[every] = losses_by_step(out)
    each = rows["1"]
    assert sorted(each) == [1, 2, 3, 4, 5, 6] and sorted(rows["3"]) == [3, 6]
    assert len(set(each.values())) == 6                       # the steps' losses differ, so the mean tells
    for end in (3, 6):
        assert rows["3"][end] == pytest.approx(sum(each[step] for step in range(end - 2, end + 1)) / 3, rel=1e-5)


def _wait_for(condition, process, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the test could interrupt it"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


RUN = ["--epochs", "2", *FAST, "--eval-every", "2", "--checkpoint-every", "1", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def uninterrupted(digits_shards, module_folder):
    """Two epochs that were never stopped: the reference of every resume test."""
    out = module_folder / "whole"
    result = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def losses_by_step(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir)[0]}


def assert_same_run(resumed: Path, whole: Path, after_step: int) -> None:
    """The resumed run logged the same losses after its resume point and ended with the same weights. A row
    holds the mean loss of the steps since the row before it: the resumed run's first row covers only the
    steps since its resume, so the rows are compared from the one after it."""
    ours, reference = losses_by_step(resumed), losses_by_step(whole)
    later = [step for step in reference if step > after_step][1:]
    assert later and [ours[step] for step in later] == [reference[step] for step in later]
    fingerprint = json.loads((resumed / "results.json").read_text())["weights_fingerprint_per_process"]
    assert fingerprint == json.loads((whole / "results.json").read_text())["weights_fingerprint_per_process"]


def test_resume_after_sigkill_at_an_epoch_checkpoint_ends_with_the_same_weights(digits_shards, uninterrupted,
                                                                               tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "launch/train.py", "--shards", str(digits_shards), *RUN,
                                "--output-dir", str(killed)], cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}"
    _wait_for(lambda: (first / "files.json").exists(), process)
    _wait_for(lambda: read_metrics(killed)[0][-1]["step"] > STEPS_PER_EPOCH, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists()
    resumed = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(killed), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = f"resumed from {killed / 'checkpoints' / f'step-{STEPS_PER_EPOCH:08d}'} at step {STEPS_PER_EPOCH}"
    assert said in resumed.stdout and said in (killed / "console.log").read_text()
    assert [r["step"] for r in read_metrics(killed)[0]] == [r["step"] for r in read_metrics(uninterrupted)[0]]
    assert_same_run(killed, uninterrupted, STEPS_PER_EPOCH)


def test_a_run_killed_and_resumed_keeps_its_untrained_figures(digits_shards, tmp_path):
    killed = tmp_path / "killed"
    options = ["--shards", str(digits_shards), *RUN, "--eval-untrained", "true", "--output-dir", str(killed)]
    process = subprocess.Popen([sys.executable, "launch/train.py", *options], cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (killed / "checkpoints" / f"step-{STEPS_PER_EPOCH:08d}" / "files.json").exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    step_zero = read_metrics(killed)[1][0]                  # the evaluation before the first step
    assert step_zero["step"] == 0 and not (killed / "results.json").exists()
    resumed = train([*options, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((killed / "results.json").read_text())
    assert {name: results[f"untrained_{name}"] for name in ("R@1", "R@10")} == \
        {name: step_zero[name] for name in ("R@1", "R@10")}
    assert f"untrained R@1 {step_zero['R@1']:.2f}" in resumed.stdout


def test_resuming_a_finished_run_says_it_is_finished_and_keeps_its_results(digits_shards, uninterrupted, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(uninterrupted, out)
    before = json.loads((out / "results.json").read_text())
    resumed = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    end = 2 * STEPS_PER_EPOCH
    assert f"the run is already at step {end} of {end}: nothing is left to train" in resumed.stdout
    assert f"final R@1 {before['R@1']:.2f}" in resumed.stdout
    after = json.loads((out / "results.json").read_text())
    assert {name: after[name] for name in before if name.startswith("R@")} == \
        {name: value for name, value in before.items() if name.startswith("R@")}


@pytest.mark.parametrize("logged", [True, False], ids=["final-row-logged", "no-final-row"])
def test_a_run_ended_after_its_last_checkpoint_before_its_results_gets_them_on_resume(digits_shards, uninterrupted,
                                                                                     tmp_path, logged):
    """A kill between the last checkpoint and results.json: the resume has nothing to train, and still ends
    with the final figures (those of the whole run), in results.json and in the backbone's metadata: those the
    run logged at its last step (not logged twice), or, without that row, an evaluation of the last checkpoint."""
    out, end = tmp_path / "cut", 2 * STEPS_PER_EPOCH
    shutil.copytree(uninterrupted, out)
    for name in ("results.json", "backbone.pt", "MODEL_CARD.md"):
        (out / name).unlink(missing_ok=True)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    if not logged:
        rows = [row for row in rows if not (json.loads(row)["step"] == end and "R@1" in json.loads(row))]
        (out / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
    resumed = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = json.loads((uninterrupted / "results.json").read_text())
    after = json.loads((out / "results.json").read_text())
    recall = {name: value for name, value in whole.items() if name.startswith("R@")}
    assert recall and {name: after.get(name) for name in recall} == pytest.approx(recall)
    assert after["step"] == end and after["stopped"] == "finished"
    assert f"final R@1 {whole['R@1']:.2f}" in resumed.stdout
    final_rows = [row for row in read_metrics(out)[1] if row["step"] == end]
    assert len(final_rows) == 1
    from maskcon import load_backbone

    assert load_backbone(out).metadata["recall_at_k"] == pytest.approx(recall)


def test_resume_in_the_middle_of_an_epoch_ends_with_the_same_weights(digits_shards, uninterrupted, tmp_path):
    out = tmp_path / "mid"
    middle = STEPS_PER_EPOCH + 7
    first = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--max-steps", str(middle),
                   "--log-every", "3"])                   # logging may differ between the two parts
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / f"step-{middle:08d}").is_dir()
    resumed = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {middle}" in resumed.stdout
    assert_same_run(out, uninterrupted, middle)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(digits_shards, uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    (out / "results.json").unlink()
    newest = out / "checkpoints" / f"step-{2 * STEPS_PER_EPOCH:08d}"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])                  # a copy that stopped half way
    checked = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume", "--check"])
    resumed = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    notice = [line for line in resumed.stdout.splitlines() if "is damaged" in line]
    assert len(notice) == 1 and str(newest) in notice[0] and "model.safetensors" in notice[0]
    assert f"warning: {notice[0]}" in checked.stdout.splitlines(), checked.stdout     # --check says it first
    assert f"resumed from {out / 'checkpoints' / f'step-{STEPS_PER_EPOCH:08d}'} at step {STEPS_PER_EPOCH}" in \
        resumed.stdout
    assert_same_run(out, uninterrupted, STEPS_PER_EPOCH)


@pytest.mark.parametrize("change, names", [
    (["--batch-size", "32"], ["batch_size (64 -> 32)"]),
    (["--method", "grafit", "--t", "0.1"], ["method (maskcon -> grafit)", "t (0.05 -> 0.1)"]),
])
def test_resume_refuses_changed_options_and_leaves_the_run_untouched(digits_shards, uninterrupted, tmp_path,
                                                                    change, names):
    out = tmp_path / "changed"
    shutil.copytree(uninterrupted, out)
    def files() -> dict:    # the run's files; run.lock names whichever run held the folder last
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.name != "run.lock"}

    before = files()
    result = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume", *change])
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("error: --resume:") and "\n" not in line and "Traceback" not in result.stderr
    assert all(name in line for name in names) and "--accept-changes" in line
    assert files() == before


def test_more_epochs_can_be_accepted_on_resume(digits_shards, uninterrupted, tmp_path):
    out = tmp_path / "longer"
    shutil.copytree(uninterrupted, out)
    result = train(["--shards", str(digits_shards), *RUN, "--output-dir", str(out), "--resume", "--epochs", "3",
                    "--accept-changes", "epochs"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs (2 -> 3)" in result.stdout and "recomputed" in result.stdout
    assert json.loads((out / "results.json").read_text())["step"] == 3 * STEPS_PER_EPOCH


def damaged_copy(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    return copy


def test_a_shard_cut_short_stops_before_training_with_one_line(digits_shards, tmp_path):
    shards_copy = damaged_copy(digits_shards, tmp_path)
    tar = sorted((shards_copy / "train").glob("*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:5000])
    result = train(["--shards", str(shards_copy), *RUN, "--output-dir", str(tmp_path / "run")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line
    assert str(tar) in line and "make_shards.py verify" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def damage_image(shards: Path, split: str, position: int) -> tuple[Path, str]:
    """Zero the pixel data of the PNG at `position` of `split` in place (same size, header kept); returns its
    tar and key."""
    from maskcon.loaders import read_split
    from maskcon.shard_format import read_index

    _, files = read_split(shards, split)
    entries = [(Path(tar), entry) for tar, index in zip(files.tars, files.indexes) for entry in read_index(index)]
    tar, entry = entries[position]
    image = entry.members["png"]
    data = bytearray(tar.read_bytes())
    header = 8 + 25 + 8                                  # PNG signature, IHDR chunk, IDAT length and type
    data[image.offset + header:image.offset + image.size] = bytes(image.size - header)
    tar.write_bytes(bytes(data))
    return tar, entry.key


def test_an_undecodable_image_names_its_shard_and_key(digits_shards, tmp_path):
    shards_copy = damaged_copy(digits_shards, tmp_path)
    tar, key = damage_image(shards_copy, "train", 40)
    out = tmp_path / "run"
    result = train(["--shards", str(shards_copy), *RUN, "--output-dir", str(out)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(tar) in errors[0] and key in errors[0] and "make_shards.py verify" in errors[0]
    assert "checkpoint" in errors[0]


def read_by_rank_1_in_the_loop_only() -> int:
    """A training sample that only process 1 of 2 reads, in epoch 0 after its 4th batch (seed 0, batch 64):
    the bank fill's epoch -1 leaves it out on both processes."""
    from maskcon.loaders.split import epoch_positions

    per_rank = 1437 // 2 // 64 * 64
    bank = {int(p) for rank in (0, 1) for p in epoch_positions(1437, per_rank=per_rank, rank=rank, seed=0, epoch=-1)}
    late = epoch_positions(1437, per_rank=per_rank, rank=1, seed=0, epoch=0)[4 * 64:]
    return next(int(p) for p in late if int(p) not in bank)


def read_by_rank_1_in_the_bank_fill_only() -> int:
    """A training sample in the first batch of process 1 of 2 in the bank fill's epoch (seed 0, batch 64: one
    batch per process fills a bank of 128), which process 0 reads neither there nor in epoch 0."""
    from maskcon.loaders.split import epoch_positions
    from maskcon.train import BANK_FILL_EPOCH

    per_rank = 1437 // 2 // 64 * 64
    rank_0 = {int(p) for epoch in (BANK_FILL_EPOCH, 0)
              for p in epoch_positions(1437, per_rank=per_rank, rank=0, seed=0, epoch=epoch)}
    first = epoch_positions(1437, per_rank=per_rank, rank=1, seed=0, epoch=BANK_FILL_EPOCH)[:64]
    return next(int(p) for p in first if int(p) not in rank_0)


@pytest.mark.parametrize("where", ["loop", "evaluation", "bank fill"])
def test_a_loader_failing_on_one_process_ends_both_with_one_line(where, digits_shards, tmp_path):
    shards_copy = damaged_copy(digits_shards, tmp_path)
    if where == "bank fill":
        tar, key = damage_image(shards_copy, "train", read_by_rank_1_in_the_bank_fill_only())
    elif where == "loop":
        tar, key = damage_image(shards_copy, "train", read_by_rank_1_in_the_loop_only())
    else:
        tar, key = damage_image(shards_copy, "test", 300)    # process 1 evaluates test samples 180..359
    out, steps = tmp_path / "run", 2 if where == "evaluation" else 8
    started = time.time()
    result = launch_two(["--shards", str(shards_copy), "--epochs", "1", "--max-steps", str(steps), *FAST,
                         "--wandb", "disabled", "--output-dir", str(out)], timeout=300)
    assert time.time() - started < 60
    assert result.returncode != 0     # the launcher reports the exit status of the failed process
    assert str(ROOT / "maskcon") not in result.stderr, result.stderr[-3000:]   # no traceback of our processes
    # the other process's progress bar may share the error's line on the terminal
    errors = re.findall(r"error: [^\r\n]*", result.stderr)
    assert len(errors) == 1 and str(tar) in errors[0] and key in errors[0], result.stderr[-3000:]
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    if where != "evaluation":  # the learner has seen blank batches since the failure: nothing to keep
        assert "no checkpoint was written yet" in errors[0] and saved == []
    else:                   # evaluation leaves the learner intact: it is kept
        assert f"checkpoint saved at step {steps}" in errors[0] and saved == [f"step-{steps:08d}"]
        assert (out / "checkpoints" / saved[0] / "files.json").exists()
    assert not (out / "results.json").exists()


def test_sigterm_leaves_a_checkpoint_to_resume_from(digits_shards, tmp_path):
    out = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, "launch/train.py", "--shards", str(digits_shards), "--epochs", "5",
                                *FAST, "--checkpoint-every", "0", "--wandb", "disabled", "--output-dir", str(out)],
                               cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and read_metrics(out)[0], process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-3000:]     # README: stopped, with its checkpoint
    assert "stopped by SIGTERM" in stdout
    checkpoints = list((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert 0 < state["step"] < 5 * STEPS_PER_EPOCH
    resumed = train(["--shards", str(digits_shards), "--epochs", "5", *FAST, "--wandb", "disabled",
                     "--output-dir", str(out), "--resume", "--max-steps", str(state["step"] + 1)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == state["step"] + 1


def test_a_stop_after_the_last_step_ends_the_run_with_its_results_and_says_so(digits_shards, tmp_path):
    """The last metrics row is written after the last stop vote: a SIGTERM then arrives during the final evaluation,
    which the run finishes (results, backbone, checkpoint), and it says why it did not stop."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "launch/train.py", "--shards", str(digits_shards), "--max-steps", "4",
                                *FAST, "--wandb", "disabled", "--output-dir", str(out)],
                               cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300      # the final evaluation takes a second: the signal is sent within 10 ms of the row
    while not ((out / "metrics.jsonl").exists() and [r for r in read_metrics(out)[0] if r["step"] == 4]):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    said = ("SIGTERM came after the last step (4): the run ends as it would have, with its results and its last "
            "checkpoint")
    assert said in stdout.splitlines() and said in (out / "console.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 4 and results["stopped"] == "max_steps" and "R@1" in results
    assert [path.name for path in (out / "checkpoints").glob("step-*")] == ["step-00000004"]
    assert (out / "backbone.pt").exists()


def test_a_ctrl_c_after_the_final_line_leaves_a_finished_run_finished(digits_shards, tmp_path):
    """Ctrl-C (SIGINT to the process group, W&B's process included) as the final figures are printed, while the
    tracker closes, and a second later, while the interpreter exits: both times the run ends as finished, 0,
    and nothing says a checkpoint stop is coming."""
    said_after = ("SIGINT came after the last step (3): the run ends as it would have, with its results and its "
                  "last checkpoint")
    for delay in (0.0, 1.0):
        out = tmp_path / f"run-{delay}"
        process = subprocess.Popen([sys.executable, "launch/train.py", "--shards", str(digits_shards),
                                    "--max-steps", "3", *FAST, "--wandb", "offline", "--output-dir", str(out)],
                                   cwd=ROOT, env=environment(WANDB_SILENT="false"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        before = []
        for line in process.stdout:
            before.append(line)
            if line.startswith("final R@1"):
                break
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (delay, process.returncode, stderr[-3000:])
        assert "stopping with a checkpoint" not in stderr and "Traceback" not in stderr, stderr[-3000:]
        if delay == 0.0:   # the tracker was still closing: the line says why the run did not stop
            assert stdout.splitlines() == [said_after], stdout
        assert json.loads((out / "results.json").read_text())["step"] == 3 and (out / "backbone.pt").exists()


def test_a_write_that_fails_mid_run_says_how_to_continue_and_that_advice_works(digits_shards, tmp_path):
    """The run folder turns unwritable (made immutable) after the first metrics row: the final picture cannot be
    written, before any checkpoint was. The line says so, and how to continue once fixed (--resume auto, since
    no checkpoint is there); followed, the run completes."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("making a folder immutable needs root and chattr")
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), "--max-steps", "6", *FAST, "--checkpoint-every", "0", "--wandb",
            "disabled", "--output-dir", str(out)]
    process = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "metrics.jsonl").exists() and read_metrics(out)[0], process)
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        process.kill()
        pytest.skip("this file system cannot make a folder immutable")
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert process.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"error: writing {out}/") and "Operation not permitted" in lines[0], lines[0]
    assert lines[0].endswith("; no checkpoint was written yet; once that is fixed, run the same command with "
                             "--resume auto added"), lines[0]
    resumed = train([*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == 6


def two_processes(args) -> list[str]:
    """`accelerate launch` of launch/train.py in two CPU processes (gloo)."""
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", "0",   # a free port: tests beside it launch too
            "--mixed_precision", "no", "--dynamo_backend", "no", "launch/train.py", *args]


def launch_two(args, *, timeout=600, env=None, **popen):
    return subprocess.run(two_processes(args), cwd=ROOT, env=env or environment(), capture_output=True, text=True,
                          timeout=timeout, **popen)


def test_two_gloo_processes_train_one_learner_and_evaluate_like_one_process(synthetic_shards, tmp_path):
    args = ["--dataset", "cifar100", "--shards", str(synthetic_shards), "--pretrained", "none", "--epochs", "1",
            "--max-steps", "3", *FAST, "--batch-size", "32", "--eval-untrained", "--wandb", "disabled"]
    two = launch_two([*args, "--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 processes x batch 32" in two.stdout and "(stops at step 3, --max-steps)" in two.stdout
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    first, second = results["weights_fingerprint_per_process"]
    assert first == second and results["step"] == 3
    one = train([*args, "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    untrained = {name: value for name, value in json.loads((tmp_path / "one" / "results.json").read_text()).items()
                 if name.startswith("untrained_R@")}
    assert untrained and untrained == {name: results[name] for name in untrained}


def test_two_processes_stop_together_on_sigterm_outside_the_steps_with_a_checkpoint(digits_shards, tmp_path):
    out = tmp_path / "preempted"
    command = two_processes(["--shards", str(digits_shards), "--epochs", "3", *FAST, "--eval-untrained",
                             "--wandb", "disabled", "--output-dir", str(out)])
    # as SLURM does: every process of the job gets SIGTERM; the launcher waits for its workers meanwhile
    process = subprocess.Popen(command, cwd=ROOT, env=environment(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="120"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for(lambda: (out / "console.log").exists(), process)   # set up; next: the untrained evaluation, the fill
    os.killpg(process.pid, signal.SIGTERM)
    started = time.time()
    stdout, stderr = process.communicate(timeout=300)
    assert time.time() - started < 60
    assert "stopped by SIGTERM at step 0" in stdout, stderr[-3000:]
    saved = list((out / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000000"] and (saved[0] / "files.json").exists()


def test_a_failure_on_the_main_process_alone_ends_both_with_one_line(digits_shards, tmp_path):
    # W&B online without a login fails on the main process only, which alone talks to W&B
    env = environment(HOME=str(tmp_path), WANDB_MODE="", NETRC=str(tmp_path / "netrc"))
    env.pop("WANDB_API_KEY", None)
    started = time.time()
    result = launch_two(["--shards", str(digits_shards), "--epochs", "1", *FAST, "--wandb", "online",
                         "--output-dir", str(tmp_path / "run")], env=env, timeout=300)
    assert time.time() - started < 60
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "W&B could not start" in errors[0], result.stderr[-3000:]


def test_a_loss_that_is_no_longer_finite_stops_both_processes_with_one_line(digits_shards, tmp_path):
    started = time.time()
    result = launch_two(["--shards", str(digits_shards), "--epochs", "1", *FAST, "--lr", "1e30",
                         "--wandb", "disabled", "--output-dir", str(tmp_path / "run")], timeout=300)
    assert time.time() - started < 60
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss stopped being finite" in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes_is_refused_or_accepted(digits_shards, tmp_path, first, then):
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), "--epochs", "2", *FAST, "--checkpoint-every", "1", "--wandb",
            "disabled", "--output-dir", str(out)]
    start = (launch_two if first == 2 else train)([*args, "--max-steps", "4"])
    assert start.returncode == 0, start.stderr[-3000:]
    again = launch_two if then == 2 else train
    refused = again([*args, "--resume"])
    assert refused.returncode != 0 and f"world_size ({first} -> {then})" in refused.stderr
    accepted = again([*args, "--resume", "--accept-changes", "world_size"])
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 * (1437 // then // 64) and len(set(results["weights_fingerprint_per_process"])) == 1


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
    more = train(["--shards", str(digits_shards), "--output-dir", str(out), "--epochs", "1", "--max-steps", "6",
                  *FAST, "--wandb", "offline", "--resume"])
    assert more.returncode == 0, more.stderr[-3000:]
    parts = sorted(str(path) for path in (out / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and f"upload later with: wandb sync {' '.join(parts)}" in more.stderr   # both starts


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


def test_the_main_job_learns_beyond_the_untrained_network(tmp_path):
    """README's first command trains the bundled digits with their preset; the trained network must retrieve
    better than the same network untrained."""
    out = tmp_path / "main-job"
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "launch/train.py", "--output-dir", str(out),
               "--wandb", "disabled"]
    result = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["R@1"] > results["untrained_R@1"] + 1.0, results


def test_missing_shards_name_the_command_to_run_and_every_door_says_it_alike(tmp_path):
    nowhere = tmp_path / "nowhere"
    options = ["--dataset", "cifar100", "--shards", str(nowhere), "--wandb", "disabled"]
    said = []
    for door, extra in (("launch/train.py", ["--output-dir", str(tmp_path / "a")]), ("launch/train.py", ["--check"]),
                        ("launch/run.py", ["--output-dir", str(tmp_path / "b")])):
        result = subprocess.run([sys.executable, door, *options, *extra], cwd=ROOT, env=environment(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        said.append(result.stderr.strip())
    assert said == [f"error: no complete shards at {nowhere}: {nowhere / 'manifest.json'} is missing; make them with "
                    f"python launch/make_shards.py create cifar100 --src SRC --out {nowhere}"] * 3
    assert sorted(path.name for path in tmp_path.iterdir()) == []          # no run folder left behind


def test_the_bundled_digits_are_never_written_into_a_folder_of_the_users_own(tmp_path):
    from tests import sources

    sources.write_folder(tmp_path / "photos")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for folder, what in ((tmp_path / "photos", "a dataset's source files"), (tmp_path / "notes", "files of its own")):
        before = sorted((path.relative_to(folder), path.stat().st_mtime_ns) for path in folder.rglob("*"))
        said = []
        for extra in (["--check"], ["--output-dir", str(tmp_path / "run")]):
            result = train(["--dataset", "digits", "--shards", str(folder), "--wandb", "disabled", *extra])
            assert result.returncode == 2, result.stderr[-3000:]
            said.append(result.stderr.strip().splitlines()[-1])
        assert said == [f"error: {folder} holds {what} and no shards; the bundled digits' shards are written only "
                        f"into a new or empty folder: choose another --shards, or leave --shards out"] * 2
        assert sorted((path.relative_to(folder), path.stat().st_mtime_ns) for path in folder.rglob("*")) == before
        assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    checked = train(["--dataset", "digits", "--shards", str(tmp_path / "empty"), "--wandb", "disabled", "--check"])
    assert checked.returncode == 0 and "is written on first use" in checked.stdout, checked.stderr[-3000:]
    ran = train(["--dataset", "digits", "--shards", str(tmp_path / "empty"), *FAST, "--max-steps", "1",
                 "--eval-untrained", "false", "--wandb", "disabled", "--output-dir", str(tmp_path / "run")])
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert f"writing the bundled digits' shards to {tmp_path / 'empty'} (once" in ran.stdout   # said, not silent


def test_batch_larger_than_the_dataset_is_refused(digits_shards, tmp_path):
    result = train(["--shards", str(digits_shards), "--batch-size", "5000", "--wandb", "disabled",
                    "--output-dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: the train split has 1437 samples: too few for 1 process(es) "
                                            "of batch 5000")
    assert "Traceback" not in result.stderr


def test_two_processes_resumed_mid_epoch_end_with_the_weights_of_an_uninterrupted_run(digits_shards, tmp_path):
    args = ["--shards", str(digits_shards), "--epochs", "2", *FAST, "--checkpoint-every", "1", "--eval-every", "2",
            "--wandb", "disabled"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert launch_two([*args, "--output-dir", str(whole)]).returncode == 0
    steps_per_epoch = 1437 // 2 // 64
    first = launch_two([*args, "--output-dir", str(stopped), "--max-steps", str(steps_per_epoch + 4)])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = launch_two([*args, "--output-dir", str(stopped), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, reference = losses_by_step(stopped), losses_by_step(whole)
    later = [step for step in reference if step > steps_per_epoch + 4][1:]   # from the second row (assert_same_run)
    assert later and [ours[step] for step in later] == [reference[step] for step in later]
    # parameters, bank and batch-norm statistics bit for bit: the evaluation at the --max-steps stop, which the
    # whole run does not make, leaves each process's own statistics in the checkpoint it continues from
    from safetensors.torch import load_file

    final = f"checkpoints/step-{2 * steps_per_epoch:08d}"
    for name in ("model.safetensors", "own_0.safetensors", "own_1.safetensors"):
        resumed_state, whole_state = load_file(stopped / final / name), load_file(whole / final / name)
        assert resumed_state.keys() == whole_state.keys()
        assert all(torch.equal(resumed_state[key], value) for key, value in whole_state.items()), name
    fingerprints = [json.loads((folder / "results.json").read_text())["weights_fingerprint_per_process"]
                    for folder in (stopped, whole)]
    assert fingerprints[0] == fingerprints[1]


def test_without_dali_the_default_loader_is_one_line_and_the_torch_loader_trains(digits_shards, tmp_path):
    hide = tmp_path / "no_dali"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None   # import fails\n")
    env = environment(PYTHONPATH=os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "launch/train.py", "--shards", str(digits_shards), "--epochs", "1", *FAST,
            "--wandb", "disabled", "--max-steps", "2"]
    refused = subprocess.run([*args, "--output-dir", str(tmp_path / "dali")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: NVIDIA DALI is not installed") and "--loader torch" in lines[0]
    torch_loader = subprocess.run([*args, "--loader", "torch", "--output-dir", str(tmp_path / "torch")], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=600)
    assert torch_loader.returncode == 0, torch_loader.stderr[-3000:]
    assert json.loads((tmp_path / "torch" / "results.json").read_text())["step"] == 2


def test_the_bar_counts_to_max_steps_names_the_epoch_and_leaves_evaluation_lines_whole(digits_shards, tmp_path):
    out = tmp_path / "run"
    result = train(["--shards", str(digits_shards), "--output-dir", str(out), "--epochs", "3", *FAST,
                    "--max-steps", str(STEPS_PER_EPOCH + 3), "--wandb", "disabled"])
    assert result.returncode == 0, result.stderr[-3000:]
    console = (out / "console.log").read_text().splitlines()
    bars = [line for line in console if re.match(r"epoch \d/3:", line)]
    end = STEPS_PER_EPOCH + 3
    assert bars and bars[-1].startswith("epoch 2/3:") and f"{end}/{end}" in bars[-1], console[-5:]
    assert any(line.startswith(f"epoch 2 step {end}: R@1 ") for line in console)   # a line of its own
    fill = [line for line in console if line.startswith("filling the memory bank:")]   # a bar of its own
    assert fill and "128/128" in fill[-1], console[:10]
    assert "x batch 64 on the CPU," in result.stdout

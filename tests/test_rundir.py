"""Run folders: a folder belongs to one run, --resume auto / PATH choose where to continue, runs started
together get folders of their own, and metrics.jsonl survives a cut row and a full disk. Real folders,
real checkpoints, real processes; end-to-end runs of launch/train.py are marked slow."""

import errno
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskcon import checkpoints, rundir
from maskcon.errors import UserError
from maskcon.tracking import Tracker
from tests.test_checkpoints import build, truncate

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--image-size", "8", "--batch-size", "64", "--queue-size", "128", "--eval-batch-size", "128",
        "--warmup-epochs", "0.5", "--log-every", "2", "--loader-threads", "1", "--eval-untrained", "false",
        "--wandb", "disabled"]
STEPS_PER_EPOCH = 1437 // 64  # digits' train split, 1 process


def contents(folder: Path) -> dict:
    """Every file's sha256 but the lock's (a run holds the folder it claims)."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != rundir.LOCK}


def quiet(line: str) -> None:
    pass


def an_earlier_run(folder: Path, steps: tuple[int, ...] = (5,)) -> list[Path]:
    """A run folder as the trainer leaves it: options, metrics, results and real checkpoints."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("dataset: digits\n")
    (folder / "metrics.jsonl").write_text('{"step": 5, "loss": 1.5}\n')
    (folder / "results.json").write_text('{"step": 5, "R@1": 80.0}\n')
    accelerator, model, optimizer = build(seed=0)
    return [checkpoints.save(accelerator, folder / "checkpoints", step=step, epoch=0, extra_state={}, keep=3)
            for step in steps]


# ------------------------------------------------------------------------------------------ claiming


def test_a_fresh_run_refuses_a_folder_of_another_run_and_leaves_it_byte_for_byte(tmp_path):
    folder = tmp_path / "run"
    an_earlier_run(folder)
    before = contents(folder)
    with pytest.raises(UserError) as caught:
        rundir.claim(folder, None, default=tmp_path / "unused", log=quiet)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message and "config.yaml" in message
    assert "--resume" in message and "new --output-dir" in message  # both ways out
    assert contents(folder) == before


def test_a_shard_folder_or_a_dataset_source_is_refused_as_a_run_folder_and_left_as_it_was(tmp_path, digits_shards):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(digits_shards, shards)
    source = tmp_path / "photos"
    (source / "train" / "gull").mkdir(parents=True)
    (source / "train" / "gull" / "0.jpg").write_bytes(b"\xff\xd8\xff an image")
    for folder, words in ((shards, f"{shards} holds shards"),
                          (shards / "run", f"lies inside {shards}, which holds shards"),
                          (source, f"{source} holds a dataset's source files")):
        before = contents(tmp_path)
        for check in (lambda: rundir.claim(folder, None, default=tmp_path / "unused", log=quiet),
                      lambda: rundir.check_fresh(folder, None)):       # the run, and --check
            with pytest.raises(UserError) as caught:
                check()
            assert words in str(caught.value) and "another --output-dir" in str(caught.value), caught.value
            assert "\n" not in str(caught.value) and contents(tmp_path) == before
    # a manifest.json that is not a shard manifest (a web app's, say) is no dataset, nor are loose pictures
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.json").write_text('{"name": "my app"}')
    (tmp_path / "site" / "run").mkdir()
    (tmp_path / "site" / "run" / "loss-curve.png").write_bytes(b"\x89PNG\r\n\x1a\n a plot")
    folder = tmp_path / "site" / "run"
    assert rundir.claim(folder, None, default=tmp_path / "unused", log=quiet) == rundir.RunFolder(folder, None)


def test_a_folder_without_run_files_is_taken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "slurm-7.out").write_text("a scheduler's log beside the run\n")
    assert rundir.claim(folder, None, default=tmp_path / "unused", log=quiet) == rundir.RunFolder(folder, None)


def test_resume_auto_starts_afresh_in_an_empty_folder_and_resumes_an_interrupted_one(tmp_path):
    empty = tmp_path / "empty"
    lines = []
    assert rundir.claim(empty, "auto", default=tmp_path / "unused", log=lines.append) == rundir.RunFolder(empty, None)
    assert empty.is_dir() and len(lines) == 1 and "starting afresh" in lines[0]

    interrupted = tmp_path / "interrupted"
    older, newer = an_earlier_run(interrupted, steps=(5, 9))
    (interrupted / "results.json").unlink()
    truncate(newer / "model.safetensors")
    before = contents(interrupted)
    claimed = rundir.claim(interrupted, "auto", default=tmp_path / "unused", log=quiet)
    assert claimed == rundir.RunFolder(interrupted, older)
    assert contents(interrupted) == before


def test_resume_auto_refuses_a_finished_run_without_checkpoints(tmp_path):
    folder = tmp_path / "finished"
    folder.mkdir()
    (folder / "results.json").write_text('{"R@1": 80.0}\n')
    with pytest.raises(UserError, match="holds a finished run .*results.json.* new --output-dir"):
        rundir.claim(folder, "auto", default=tmp_path / "unused", log=quiet)
    assert json.loads((folder / "results.json").read_text()) == {"R@1": 80.0}


def test_a_bare_resume_of_a_finished_run_without_checkpoints_names_a_new_folder_not_auto(tmp_path):
    """--resume auto refuses that folder too: advising it would send the user round in a circle."""
    folder = tmp_path / "finished"
    folder.mkdir()
    (folder / "results.json").write_text('{"R@1": 80.0}\n')
    (folder / "config.yaml").write_text("dataset: digits\n")
    for resume in ("newest", "auto"):
        with pytest.raises(UserError) as refused:
            rundir.claim(folder, resume, default=tmp_path / "unused", log=quiet)
        message = str(refused.value)
        assert "holds a finished run" in message and "new --output-dir, without --resume" in message
        assert "--resume auto" not in message.split(":", 1)[1], message
    assert sorted(path.name for path in folder.iterdir()) == ["config.yaml", "results.json"]


def test_resume_path_into_a_folder_of_another_run_says_to_choose_another_folder(tmp_path):
    """The user already resumes: the refusal names the folder to change, not --resume."""
    run = tmp_path / "a"
    _, checkpoint = an_earlier_run(run, steps=(5, 9))
    other = tmp_path / "b"
    an_earlier_run(other, steps=(3,))
    before = contents(other)
    with pytest.raises(UserError) as refused:
        rundir.claim(other, str(checkpoint), default=tmp_path / "unused", log=quiet)
    message = str(refused.value)
    assert message.startswith(f"{other} holds another run's files") and "continue that run" not in message
    assert "new or empty --output-dir" in message and "leave --output-dir out" in message
    assert contents(other) == before


def test_a_grid_folder_or_a_folder_inside_a_run_is_refused_for_a_run_of_its_own(tmp_path):
    """Such a run would mix its files with the grid's or the run's, and the report would leave one out."""
    grid = tmp_path / "runs" / "sweep"
    grid.mkdir(parents=True)
    (grid / "grid.yaml").write_text("sweep: cifar100-main.yaml\noptions: []\n")
    run = tmp_path / "runs" / "run1"
    an_earlier_run(run)
    for folder, words in ((grid, "holds a grid"), (run / "sub", f"lies inside the run folder {run}"),
                          (run / "checkpoints" / "x", f"lies inside the run folder {run}")):
        before = contents(tmp_path)
        for resume in (None, "auto"):
            with pytest.raises(UserError, match=words):
                rundir.claim(folder, resume, default=tmp_path / "unused", log=quiet)
        with pytest.raises(UserError, match=words):
            rundir.check_fresh(folder, None)
        assert contents(tmp_path) == before and not (run / "sub").exists()
    # a grid's point, and a folder in a project that holds W&B's and other tools' folders, are taken
    point = grid / "method=maskcon"
    assert rundir.claim(point, None, default=tmp_path / "unused", log=quiet) == rundir.RunFolder(point, None)
    project = tmp_path / "project"
    for name in ("wandb", "checkpoints"):
        (project / name).mkdir(parents=True)
    (project / "config.yaml").write_text("lr: 1\n")
    mine = project / "runs" / "a"
    assert rundir.claim(mine, None, default=tmp_path / "unused", log=quiet) == rundir.RunFolder(mine, None)
    rundir.release()


def test_a_bare_resume_without_a_checkpoint_names_auto(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .*--resume auto"):
        rundir.claim(tmp_path / "new", "newest", default=tmp_path / "unused", log=quiet)
    assert not (tmp_path / "new").exists()


def test_resume_path_takes_a_run_folder_or_one_checkpoint(tmp_path):
    run = tmp_path / "run"
    first, second = an_earlier_run(run, steps=(5, 9))
    assert rundir.claim(None, str(run), default=tmp_path / "unused", log=quiet) == rundir.RunFolder(run, second)
    assert rundir.claim(None, str(first), default=tmp_path / "unused", log=quiet) == rundir.RunFolder(run, first)
    elsewhere = tmp_path / "branch"
    assert rundir.claim(elsewhere, str(first), default=tmp_path / "unused", log=quiet) == \
        rundir.RunFolder(elsewhere, first)
    truncate(second / "optimizer.bin")
    with pytest.raises(UserError, match="checkpoint is damaged .*optimizer.bin"):
        rundir.claim(None, str(second), default=tmp_path / "unused", log=quiet)
    with pytest.raises(UserError, match="no such folder"):
        rundir.claim(None, str(tmp_path / "missing"), default=tmp_path / "unused", log=quiet)


def test_the_resume_option_reads_bare_auto_a_path_and_yaml_booleans(tmp_path):
    from maskcon.config import parse_config

    assert parse_config([]).resume is None
    assert parse_config(["--resume"]).resume == rundir.RESUME_NEWEST
    assert parse_config(["--resume", "--epochs", "3"]).resume == rundir.RESUME_NEWEST
    assert parse_config(["--resume", "auto"]).resume == rundir.RESUME_AUTO
    assert parse_config(["--resume=runs/a/checkpoints/step-00000010"]).resume == "runs/a/checkpoints/step-00000010"
    (tmp_path / "on.yaml").write_text("resume: true\n")
    (tmp_path / "off.yaml").write_text("resume: false\n")
    assert parse_config(["--config", str(tmp_path / "on.yaml")]).resume == rundir.RESUME_NEWEST
    assert parse_config(["--config", str(tmp_path / "off.yaml")]).resume is None


def _claim_at_once(barrier, base: str, queue) -> None:
    barrier.wait()
    queue.put(str(rundir.claim(None, None, default=Path(base), log=quiet).path))


def test_runs_started_together_get_folders_of_their_own(tmp_path):
    context = multiprocessing.get_context("fork")
    count = 6
    barrier, queue = context.Barrier(count), context.Queue()
    base = tmp_path / "runs" / "digits-maskcon-20260101-000000"
    workers = [context.Process(target=_claim_at_once, args=(barrier, str(base), queue)) for _ in range(count)]
    for worker in workers:
        worker.start()
    folders = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert len(set(folders)) == count
    assert sorted(p.name for p in base.parent.iterdir()) == sorted(Path(f).name for f in folders)


def test_a_resumed_run_keeps_the_results_it_does_not_measure_again(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"step": 44, "stopped": "finished", "R@1": 81.5,
                                                       "untrained_R@1": 20.0}))
    rundir.write_results(tmp_path, {"step": 44, "stopped": "finished", "weights_fingerprint_per_process": [1.5]},
                         resumed=True)
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "step": 44, "stopped": "finished", "R@1": 81.5, "untrained_R@1": 20.0, "weights_fingerprint_per_process": [1.5]}
    rundir.write_results(tmp_path, {"step": 3, "stopped": "max_steps"}, resumed=False)  # a fresh run: its own
    assert json.loads((tmp_path / "results.json").read_text()) == {"step": 3, "stopped": "max_steps"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ------------------------------------------------------------------------------------------ metrics file


def tracker(folder: Path, **resume) -> Tracker:
    return Tracker(folder, config={}, wandb_mode="disabled", project="p", name="n", **resume)


def test_a_row_cut_short_is_dropped_with_one_warning_and_the_rest_kept(tmp_path, capsys):
    rows = [{"step": step, "loss": 1.0 / step} for step in (2, 4, 6)]
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 8, "lo')  # killed while writing
    logger = tracker(tmp_path, resume=True, resume_step=4)
    logger.log({"step": 5, "loss": 0.1})
    logger.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "line 4" in warnings[0]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [rows[0], rows[1], {"step": 5, "loss": 0.1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["console.log", "metrics.jsonl"]  # no partial file left


def test_a_full_disk_while_logging_is_one_line_and_leaves_whole_rows(tmp_path, monkeypatch):
    logger = tracker(tmp_path)
    logger.log({"step": 1, "loss": 2.0})
    real_write = os.write

    def half_then_full(descriptor, data):
        if len(data) > 10:
            return real_write(descriptor, bytes(data[:10]))  # the disk takes part of the row, then fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError) as caught:
        logger.log({"step": 2, "loss": 1.0})
    monkeypatch.setattr(os, "write", real_write)
    assert "\n" not in str(caught.value) and str(tmp_path / "metrics.jsonl") in str(caught.value)
    assert "No space left" in str(caught.value)
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss": 2.0}) + "\n"
    logger.close()


# ------------------------------------------------------------------------------------------ end to end


def train(args, cwd=ROOT, **popen):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, **popen)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    from maskcon import shards

    folder = tmp_path_factory.mktemp("shards") / "digits"
    shards.create("digits", None, folder)
    return folder


@pytest.mark.slow
def test_reusing_a_run_folder_is_refused_and_resume_auto_continues_and_keeps_recall(digits_shards, tmp_path):
    out = tmp_path / "run"
    common = ["--shards", str(digits_shards), *FAST, "--epochs", "2", "--eval-every", "1",
              "--checkpoint-every", "1", "--output-dir", str(out)]
    first = train([*common, "--max-steps", str(STEPS_PER_EPOCH + 3)])
    assert first.returncode == 0, first.stderr[-3000:]
    before = contents(out)

    again = train(common)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert again.stderr.startswith(f"error: {out} holds another run's files") and "--resume" in again.stderr
    assert contents(out) == before

    resumed = train([*common, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {STEPS_PER_EPOCH + 3}" in resumed.stdout
    finished = json.loads((out / "results.json").read_text())
    assert finished["step"] == 2 * STEPS_PER_EPOCH and "R@1" in finished

    again = train([*common, "--resume"])  # a finished run resumed: nothing left to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["R@1"] == finished["R@1"]


@pytest.mark.slow
def test_resume_auto_on_an_empty_folder_starts_afresh(digits_shards, tmp_path):
    out = tmp_path / "new"
    result = train(["--shards", str(digits_shards), *FAST, "--epochs", "1", "--max-steps", "4",
                    "--output-dir", str(out), "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting afresh" in result.stdout and json.loads((out / "results.json").read_text())["step"] == 4


@pytest.mark.slow
def test_two_runs_started_together_write_into_two_folders(digits_shards, tmp_path):
    args = ["--shards", str(digits_shards), *FAST, "--epochs", "1", "--max-steps", "2", "--checkpoint-every", "1"]
    env = dict(os.environ, WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    runs = [subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [run.communicate(timeout=900)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert json.loads((folder / "results.json").read_text())["step"] == 2
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-00000002"]


# ------------------------------------------------------------------------------------ one writer per folder

HOLDER = "import sys; from pathlib import Path; from maskcon import rundir; rundir.hold(Path(sys.argv[1])); " \
         "print('held', flush=True); sys.stdin.read()"


def test_a_folder_held_by_a_living_process_is_refused_naming_it_until_that_process_dies(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for resume in (None, "auto", "newest", str(folder)):
            with pytest.raises(UserError) as caught:
                rundir.claim(folder, resume, default=tmp_path / "unused", log=quiet)
            assert "in use" in str(caught.value) and f"pid {holder.pid}" in str(caught.value), resume
            assert "\n" not in str(caught.value)
        assert f"pid {holder.pid}" in rundir.lock_holder(folder)
    finally:
        holder.kill()        # the system lets go of a dead process's lock
        holder.wait()
    assert rundir.lock_holder(folder) is None
    assert rundir.claim(folder, None, default=tmp_path / "unused", log=quiet) == rundir.RunFolder(folder, None)
    assert f"pid {os.getpid()}" in (folder / rundir.LOCK).read_text()
    rundir.release(folder)


def test_a_start_that_failed_before_training_is_taken_over_and_one_that_trained_is_not(tmp_path):
    folder = tmp_path / "run"
    rundir.claim(folder, None, default=tmp_path / "unused", log=quiet)
    (folder / "config.yaml").write_text("dataset: digits\n")       # what a start writes, then it fails
    (folder / "metrics.jsonl").write_text('{"step": 0, "R@1": 80.0}\n')
    rundir.release(folder)
    lines = []
    assert rundir.claim(folder, None, default=tmp_path / "unused", log=lines.append) == rundir.RunFolder(folder, None)
    assert not (folder / "config.yaml").exists() and not (folder / "metrics.jsonl").exists()
    assert len(lines) == 1 and "ended before training" in lines[0]
    (folder / "config.yaml").write_text("dataset: digits\n")
    rundir.mark_trained(folder)                                     # its first metrics row
    rundir.release(folder)
    with pytest.raises(UserError, match="holds another run's files"):
        rundir.claim(folder, None, default=tmp_path / "unused", log=quiet)
    assert (folder / "config.yaml").exists()


@pytest.mark.parametrize("door", ["launch/train.py", "launch/run.py"])
def test_a_start_with_bad_input_leaves_no_run_folder_behind(door, tmp_path):
    """Missing shards, found once the run folder is claimed: the start removes the folders it made (the default
    one under a new runs/, and a new --output-dir with its new parent) and what it wrote in a folder the user made."""
    mine = tmp_path / "mine"
    mine.mkdir()
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for where in ([], ["--output-dir", "new/run"], ["--output-dir", str(mine)]):
        done = subprocess.run([sys.executable, str(ROOT / door), "--dataset", "cifar100", "--shards", "nowhere",
                               "--wandb", "disabled", *where], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and last.startswith("error: ") and "create cifar100 --src SRC" in last, last
        assert "Traceback" not in done.stderr
    # launch/run.py checks before it starts anything; the trainer removes the folders it made, parents too
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == ["mine"]


def test_a_failed_start_in_a_folder_of_an_earlier_run_leaves_its_files(tmp_path):
    """--resume auto in a folder whose run trained but saved no checkpoint, then bad input: nothing of it goes."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("dataset: digits\n")
    (folder / "metrics.jsonl").write_text('{"step": 2, "loss": 5.0}\n')
    before = contents(folder)
    done = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--dataset", "cifar100", "--shards",
                           "nowhere", "--wandb", "disabled", "--output-dir", str(folder), "--resume", "auto"],
                          cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert {name: value for name, value in contents(folder).items() if name in before} == before


def test_logged_figures_are_read_past_a_row_cut_short_by_a_kill(tmp_path):
    rows = [{"step": 0, "R@1": 50.0, "R@10": 90.0}, {"step": 2, "loss": 4.8}, {"step": 4, "loss": 4.7},
            {"step": 4, "R@1": 61.5, "R@10": 93.0}]
    lines = [json.dumps(row) for row in rows]
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:9], *lines[3:]]) + "\n")
    assert rundir.evaluated_at(tmp_path, 4) == {"R@1": 61.5, "R@10": 93.0}
    assert rundir.evaluated_at(tmp_path, 2) == {}                     # a loss row holds no figures
    assert rundir.untrained_results(tmp_path) == {"untrained_R@1": 50.0, "untrained_R@10": 90.0}
    assert rundir.untrained_results(tmp_path / "nothing-here") == {}

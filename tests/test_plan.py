"""`--check` and the run cannot disagree: what `--check` prints of the plan (start step, batch, lr, steps) is
what the run then does, read from the run's own files and lines, for a fresh run, a resume with an accepted
change, and two processes."""

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--epochs", "2", "--image-size", "8", "--queue-size", "128", "--eval-batch-size", "128",
       "--warmup-epochs", "0.5", "--log-every", "1", "--loader-threads", "1", "--eval-untrained", "false",
       "--eval-every", "2", "--checkpoint-every", "1", "--wandb", "disabled"]
PLAN_LINE = re.compile(r"(\d+) process(?:es)? x batch (\d+) = global batch (\d+), lr ([0-9.e-]+), (\d+) epochs?, "
                       r"(\d+) steps/epoch")


def door(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def checked(script: str, args: list[str]) -> dict:
    """What --check says the run will do."""
    result = door(script, [*args, "--check"])
    assert result.returncode == 0, result.stderr[-3000:]
    processes, batch, global_batch, lr, epochs, steps = PLAN_LINE.search(result.stdout).groups()
    resume = re.search(r"resume: from (\S+) at step (\d+)", result.stdout)
    return {"processes": int(processes), "batch": int(batch), "global_batch": int(global_batch), "lr": float(lr),
            "epochs": int(epochs), "steps_per_epoch": int(steps),
            "resume": None if resume is None else (resume.group(1), int(resume.group(2))), "text": result.stdout}


def ran(out: Path, result: subprocess.CompletedProcess) -> dict:
    """What the run did, from its files and its lines."""
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    resumed = re.search(r"resumed from (\S+) at step (\d+)", result.stdout + result.stderr)
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    record = json.loads((newest / "trainer_state.json").read_text())["run"]
    return {"processes": resolved["num_processes"], "batch": resolved["batch_size"],
            "global_batch": resolved["global_batch"], "lr": resolved["base_lr"], "rows": rows,
            "steps_per_epoch": json.loads((newest / "trainer_state.json").read_text())["steps_per_epoch"],
            "resume": None if resumed is None else (resumed.group(1), int(resumed.group(2))), "record": record}


def assert_agree(plan: dict, run: dict) -> None:
    for name in ("processes", "batch", "global_batch", "steps_per_epoch", "resume"):
        assert plan[name] == run[name], name
    assert run["lr"] == pytest.approx(plan["lr"], rel=1e-5)
    assert run["record"]["world_size"] == plan["processes"] and run["record"]["batch_size"] == plan["batch"]
    rows = run["rows"]     # a resumed run's rows follow those of the run it continues
    starts = [rows[0]["step"]] + [later["step"] for earlier, later in zip(rows, rows[1:])
                                  if later["step"] != earlier["step"] + 1]
    assert starts[-1] == (plan["resume"][1] if plan["resume"] else 0) + 1   # the run's first step is the plan's


@pytest.mark.slow
def test_check_and_the_run_agree_fresh_resumed_with_a_change_and_on_two_processes(digits_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), *RUN, "--batch-size", "64", "--output-dir", str(out)]
    plan = checked("train.py", args)
    run = ran(out, door("train.py", [*args, "--max-steps", "22"]))      # its checkpoint: the end of epoch 1
    assert_agree(plan, run)
    assert plan["steps_per_epoch"] == 1437 // 64 and plan["lr"] == pytest.approx(0.04 * 64 / 128)

    changed = ["--shards", str(digits_shards), *RUN, "--batch-size", "32", "--output-dir", str(out), "--resume",
               "--accept-changes", "batch_size", "--max-steps", "50"]
    plan = checked("train.py", changed)
    assert "accepted change batch_size (64 -> 32)" in plan["text"]
    assert plan["resume"][1] == 1437 // 32      # the same epoch boundary, counted in steps of the new batch
    assert_agree(plan, ran(out, door("train.py", changed)))

    two = tmp_path / "two"
    args = ["--processes", "2", "--shards", str(digits_shards), *RUN, "--global-batch", "64", "--max-steps", "3",
            "--output-dir", str(two)]
    plan = checked("run.py", args)
    assert (plan["processes"], plan["batch"]) == (2, 32)
    assert "2 processes x batch 32" in plan["text"] and "stops at step 3 (--max-steps)" in plan["text"]
    assert_agree(plan, ran(two, door("run.py", args)))

    # the run's own config.yaml, given back, resolves to the same run
    written = yaml.safe_load((two / "config.yaml").read_text())
    again = door("run.py", ["--processes", "2", "--config", str(two / "config.yaml"), "--print-config"])
    assert again.returncode == 0, again.stderr[-3000:]
    resolved = yaml.safe_load(again.stdout)
    for record in (written, resolved):
        record.pop("provenance")
    assert resolved == {**written, "config": str(two / "config.yaml")}


@pytest.mark.slow
def test_fewer_epochs_than_the_checkpoint_has_trained_are_refused_by_check_and_run_alike(digits_shards, tmp_path):
    """--epochs 1 --accept-changes epochs on a checkpoint at step 24 (an epoch is 22 steps): its weights lie past
    the end of the shorter run, which would end at once and label them step 22."""
    out = tmp_path / "run"
    args = ["--shards", str(digits_shards), *RUN, "--output-dir", str(out)]
    first = door("train.py", [*args, "--max-steps", "24"])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-00000024"
    for extra in (["--check"], []):
        result = door("train.py", [*args, "--epochs", "1", "--accept-changes", "epochs", "--resume", *extra])
        assert result.returncode == 2 and result.stderr.strip() == (
            f"error: {checkpoint} is at step 24, past the end of a run of 1 epoch (22 steps); give --epochs 2 or "
            f"more to continue it"), result.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["step"] == 24


def test_the_plan_names_a_max_steps_stop_only_where_it_cuts_the_run(digits_shards):
    for max_steps, cuts in (("5", True), ("1000", False)):
        text = checked("train.py", ["--shards", str(digits_shards), *RUN, "--max-steps", max_steps])["text"]
        assert ("stops at step 5 (--max-steps)" in text) == cuts and "stops at step 1000" not in text, text


def test_the_plan_refuses_what_the_run_refuses_without_writing(digits_shards, tmp_path):
    from maskcon.config import parse_config
    from maskcon.errors import UserError
    from maskcon.plan import plan_run

    config = parse_config(["--shards", str(digits_shards), "--batch-size", "1000", "--output-dir",
                           str(tmp_path / "run")])
    with pytest.raises(UserError, match="too few for 2 process.*; lower the batch size, or start at most 1 process$"):
        plan_run(config, 2)
    config = parse_config(["--shards", str(digits_shards), "--output-dir", str(tmp_path / "run"), "--resume"])
    with pytest.raises(UserError, match="no checkpoint"):
        plan_run(config, 1)
    assert not (tmp_path / "run").exists()


def test_shards_of_another_dataset_say_which_dataset_they_are_and_that_advice_works(digits_shards, tmp_path):
    """The likely mistake: shards right, --dataset forgotten or wrong (the default is digits)."""
    args = ["--shards", str(digits_shards), "--output-dir", str(tmp_path / "run"), "--check"]
    result = door("train.py", [*args, "--dataset", "cifar100"])
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {digits_shards} holds shards of 'digits', not 'cifar100'; pass --dataset digits to train on "
        f"them, or --shards with shards of cifar100"), result.stderr
    assert checked("train.py", [*args[:-1], "--dataset", "digits"])["processes"] == 1   # the advice, followed
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, fix", [("--output-dir", "choose another --output-dir"),
                                         ("--shards", "name a folder for the shards")])
def test_a_file_where_a_folder_must_be_is_one_line_from_check_and_run_alike(tmp_path, option, fix):
    (tmp_path / "file").write_text("notes\n")
    said = set()
    for script, extra in (("train.py", ["--check"]), ("train.py", []), ("run.py", [])):
        where = [] if option == "--output-dir" else ["--output-dir", str(tmp_path / "runs" / script)]
        result = door(script, [option, str(tmp_path / "file" / "sub"), *where, "--epochs", "1", *extra])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        said.add(result.stderr.strip())
    assert said == {f"error: {tmp_path / 'file'} is a file, not a folder; {fix}"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "notes\n"
    result = door("train.py", ["--resume", str(tmp_path / "file")])
    assert result.stderr.strip().startswith(f"error: --resume {tmp_path / 'file'}: a file, not a folder; pass a run")


def _unwritable(folder: Path) -> Callable[[], None]:
    """Make FOLDER unwritable to this process (immutable for root, read-only for others); the undo."""
    folder.mkdir()
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        undo = lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)   # noqa: E731
    else:
        folder.chmod(0o555)
        made, undo = subprocess.CompletedProcess([], 0), lambda: folder.chmod(0o755)
    if made.returncode != 0 or os.access(folder, os.W_OK):
        undo() if made.returncode == 0 else None
        pytest.skip("this file system cannot make a folder unwritable here")
    return undo


def test_a_run_folder_that_cannot_be_written_is_one_line_before_any_process_starts(tmp_path):
    undo = _unwritable(tmp_path / "locked")
    try:
        for script, target, said in (
                ("train.py", ["--output-dir", str(tmp_path / "locked" / "run"), "--check"],
                 f"cannot create {tmp_path / 'locked' / 'run'} in {tmp_path / 'locked'}"),
                ("run.py", ["--processes", "2", "--output-dir", str(tmp_path / "locked" / "run"), "--max-steps", "2"],
                 f"cannot create {tmp_path / 'locked' / 'run'} in {tmp_path / 'locked'}"),
                ("train.py", ["--output-dir", str(tmp_path / "locked"), "--check"],
                 f"cannot write in {tmp_path / 'locked'}")):
            result = door(script, target)
            assert result.returncode == 2 and result.stderr.strip() == (
                f"error: {said} (no permission, a read-only file system, or an immutable folder); fix its permissions "
                f"or choose another --output-dir"), (script, result.stderr)
            assert "training" not in result.stdout + result.stderr      # no process of the run started
    finally:
        undo()
    assert os.listdir(tmp_path / "locked") == []


def test_a_resume_continued_in_a_folder_of_another_run_is_refused_by_check_and_run_alike(digits_shards, tmp_path):
    options = ["--shards", str(digits_shards), "--image-size", "8", "--batch-size", "64", "--queue-size", "128",
               "--eval-batch-size", "128", "--eval-untrained", "false", "--loader-threads", "1", "--epochs", "1",
               "--max-steps", "2"]
    for name in ("a", "b"):
        assert door("train.py", [*options, "--output-dir", str(tmp_path / name)]).returncode == 0
    before = sorted(path.name for path in (tmp_path / "b").iterdir())
    said = []
    for extra in (["--check"], []):
        result = door("train.py", [*options, "--resume", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b"),
                                   *extra])
        assert result.returncode == 2, result.stdout + result.stderr
        said.append(result.stderr.strip().splitlines()[-1])
    assert said[0] == said[1] and said[0].startswith(f"error: {tmp_path / 'b'} holds another run's files")
    assert "new or empty --output-dir" in said[0] and "continue that run" not in said[0]
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == before


def test_the_plan_warns_of_a_warm_up_as_long_as_the_run(digits_shards):
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    short = plan_run(parse_config(["--shards", str(digits_shards), "--epochs", "2", "--warmup-epochs", "5"]), 1)
    assert [line for line in short.lines() if line.startswith("warning: the warm-up (5 epochs) is longer than "
                                                               "the run (2 epochs)")]
    one = plan_run(parse_config(["--shards", str(digits_shards), "--epochs", "1", "--warmup-epochs", "1"]), 1)
    assert [line for line in one.lines() if line.startswith("warning: the warm-up (1 epoch) is as long as the run "
                                                             "(1 epoch):")]
    fine = plan_run(parse_config(["--shards", str(digits_shards), "--epochs", "12", "--warmup-epochs", "5"]), 1)
    assert not [line for line in fine.lines() if line.startswith("warning:")]


@pytest.mark.parametrize("options, unused", [
    (["--method", "grafit", "--t", "0.3"], ["t"]),             # Grafit's target has no temperature
    (["--method", "supfine", "--w", "0.5", "--t", "0.2"], ["w", "t"]),
    (["--method", "selfcon", "--w", "0.9"], ["w"]),            # SelfCon: InfoNCE alone
    (["--method", "maskcon", "--w", "0.5", "--t", "0.3"], []),
    (["--method", "coins", "--w", "0.3"], []),                  # CoIns weighs its coarse classifier by w
    (["--method", "coins", "--t", "0.05"], []),                 # the recipe's own t: nothing was set
])
def test_the_plan_warns_of_a_w_or_t_the_method_does_not_use(digits_shards, options, unused):
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    plan = plan_run(parse_config(["--shards", str(digits_shards), *options]), 1)
    warned = [line for line in plan.lines() if "has no effect" in line]
    assert [line.split()[1] for line in warned] == unused, warned
    for line in warned:
        assert f"has no effect with --method {options[1]}" in line


def test_the_warning_names_a_w_from_a_config_file_without_calling_it_an_option(digits_shards, tmp_path):
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    (tmp_path / "run.yaml").write_text("w: 0.25\n")
    plan = plan_run(parse_config(["--shards", str(digits_shards), "--config", str(tmp_path / "run.yaml"),
                                  "--method", "selfcon"]), 1)
    assert [line for line in plan.lines() if "has no effect" in line] == [
        "warning: w = 0.25 (from --w or --config) has no effect with --method selfcon: only maskcon, grafit and "
        "coins use w"]


def test_the_plan_warns_of_a_bank_larger_than_the_train_split(digits_shards):
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    def warnings(queue_size: int) -> list[str]:
        plan = plan_run(parse_config(["--shards", str(digits_shards), "--queue-size", str(queue_size)]), 1)
        return [line for line in plan.lines() if line.startswith("warning: the memory bank")]

    assert warnings(1437) == []                       # digits' train split: 1,437 images
    found = warnings(1438)
    assert len(found) == 1 and "passes over them 2 times" in found[0] and "--queue-size 1437 or less" in found[0]


def test_gpus_that_nvidia_smi_lists_while_cuda_sees_none_are_counted(tmp_path, monkeypatch):
    import torch

    from maskcon import plan, provenance

    if torch.cuda.is_available():
        pytest.skip("CUDA sees a GPU here: none is unusable")
    smi = tmp_path / "nvidia-smi"     # a driver that lists two GPUs, as nvidia-smi prints them
    smi.write_text('#!/bin/sh\nif [ "$1" = -L ]; then echo "GPU 0: NVIDIA H100 (UUID: GPU-1)"; '
                   'echo "GPU 1: NVIDIA H100 (UUID: GPU-2)"; else echo " 580.65 "; fi\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert plan.unusable_gpus() == 2 and provenance.gpu_field("driver_version") == "580.65"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed'\nexit 9\n")
    assert plan.unusable_gpus() == 0 and provenance.gpu_field("driver_version") is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert plan.unusable_gpus() == 0 and provenance.nvidia_smi("-L") is None


def test_the_plan_warns_of_a_recall_at_k_that_ranks_the_whole_test_split(tmp_path):
    from maskcon.config import parse_config
    from maskcon.datasets.synthetic import write_synthetic_imagenet32
    from maskcon.plan import plan_run

    small = write_synthetic_imagenet32(tmp_path / "shards", num_train=64, num_test=51)
    plan = plan_run(parse_config(["--dataset", "imagenet32", "--shards", str(small), "--batch-size", "8",
                                  "--queue-size", "64"]), 1)
    assert [line for line in plan.lines() if "test split" in line] == [
        "warning: the test split has 51 images: R@50 and R@100 rank all the others, so they say nothing of the "
        "network; judge the run by the smaller K"]


def test_the_plan_warns_of_shards_whose_fine_classes_share_one_coarse_class(tmp_path):
    """A coarse map that sends every class to one coarse class (a mistake) is said; the usual map is not."""
    from maskcon import shards
    from maskcon.config import parse_config
    from maskcon.plan import plan_run
    from tests import sources

    said = {}
    for name, rows in (("two", None), ("one", "fine,coarse\n" + "".join(
            f"{fine},animal\n" for fine in ("beagle", "persian", "poodle", "siamese", "boxer")))):
        sources.write_folder(tmp_path / name)
        if rows is not None:
            (tmp_path / name / "fine_to_coarse.csv").write_text(rows)
        shards.create("folder", tmp_path / name, tmp_path / f"shards-{name}")
        plan = plan_run(parse_config(["--dataset", "folder", "--shards", str(tmp_path / f"shards-{name}"),
                                      "--batch-size", "4", "--queue-size", "8"]), 1)
        said[name] = [line for line in plan.lines() if "coarse" in line]
    assert said == {"two": [], "one": [
        "warning: the shards put all 5 fine classes in one coarse class ('animal'): the coarse labels tell the "
        "samples nothing apart; check the coarse map the shards were made from"]}


def test_the_plan_warns_when_several_processes_each_take_the_recipes_batch(digits_shards):
    """The digits' recipe trains a global batch of 64: two processes of 64 train 128, which the plan says, with
    the option that keeps the recipe; that option, or one process, says nothing."""
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    def batch_notes(options: list[str], processes: int) -> list[str]:
        config = parse_config(["--shards", str(digits_shards), *options], processes=processes)
        return [line for line in plan_run(config, processes).lines() if "recipe's" in line]

    assert batch_notes([], 2) == [
        "warning: 2 processes x batch 64 = global batch 128, 2 times the recipe's 64 (the learning rate scales with "
        "it, and the report counts the run apart from the recipe's); --global-batch 64 keeps the recipe"]
    assert batch_notes(["--global-batch", "64"], 2) == [] and batch_notes([], 1) == []
    assert batch_notes(["--batch-size", "32"], 2) == []


def test_the_plan_warns_of_a_bank_smaller_than_one_steps_batch(digits_shards):
    from maskcon.config import parse_config
    from maskcon.plan import plan_run

    def bank_notes(options: list[str]) -> list[str]:
        config = parse_config(["--shards", str(digits_shards), *options], processes=1)
        return [line for line in plan_run(config, 1).lines() if "memory bank" in line]

    assert bank_notes(["--queue-size", "10"]) == [
        "warning: the memory bank (--queue-size 10) holds fewer keys than one step enqueues (global batch 64): each "
        "step replaces it whole, so the bank is the last 10 keys of the step before; use --queue-size 64 or more"]
    assert bank_notes(["--queue-size", "64"]) == []

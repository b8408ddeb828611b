"""Checkpoints: atomic writes with a record of their files, a damaged newest one skipped, exact loads in
any number of processes (real 2-process gloo), and the resume check of the run's options."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import Accelerator

from maskcon import checkpoints, plan, rundir
from maskcon.config import Config
from maskcon.errors import UserError
from maskcon.methods import method_for
from maskcon.step import StepParts, train_step
from tests.conftest import run_gloo, tiny_learner

IMAGE_SIZE = 8
QUEUE_SIZE = 64
BATCH = 4  # per process


def build(seed: int, *, channels_last: bool = False, compiled: bool = False):
    """A fresh Accelerator, a small learner and its SGD optimizer, prepared (DDP when several processes)."""
    accelerator = Accelerator(cpu=True)
    model = tiny_learner("--queue-size", str(QUEUE_SIZE), seed=seed)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model.encoder = torch.compile(model.encoder)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def train_steps(accelerator, model, optimizer, steps: int, seed: int) -> None:
    """Real steps (keys, objective, backward, SGD, enqueue), so weights, momentum buffers, batch-norm
    statistics and the bank all change."""
    parts = StepParts(model=model, learner=accelerator.unwrap_model(model), optimizer=optimizer,
                      method=method_for("selfcon"), t0=0.1, t=0.05, w=0.5, backward=accelerator.backward)
    generator = torch.Generator().manual_seed(seed * 100 + accelerator.process_index)
    for step in range(steps):
        query = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        key = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        coarse = torch.randint(0, 3, (BATCH,), generator=generator)
        train_step(parts, {"query": query, "key": key, "coarse": coarse, "fine": coarse}, step)


def snapshot(accelerator, model, optimizer) -> dict:
    """Copies of the unwrapped learner's state and the optimizer's momentum buffers."""
    weights = {name: tensor.detach().clone() for name, tensor in accelerator.unwrap_model(model).state_dict().items()}
    momenta = {index: state["momentum_buffer"].clone() for index, state in optimizer.state_dict()["state"].items()}
    return {"weights": weights, "momenta": momenta}


def assert_same(first: dict, second: dict) -> None:
    assert first["weights"].keys() == second["weights"].keys()
    for name in first["weights"]:
        torch.testing.assert_close(first["weights"][name], second["weights"][name], rtol=0, atol=0, msg=name)
    assert first["momenta"].keys() == second["momenta"].keys() and first["momenta"]
    for index in first["momenta"]:
        torch.testing.assert_close(first["momenta"][index], second["momenta"][index], rtol=0, atol=0)


def folder_contents(folder: Path) -> dict:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def truncate(file: Path) -> tuple[int, int]:
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        handle.truncate(size // 2)
    return size // 2, size


# ------------------------------------------------------------------------------------------ one process


def test_save_records_every_file_and_keeps_the_newest(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    stale = root / ".partial-step-00000007"  # a save stopped half way by an earlier run
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    for step in (1, 2, 3):
        train_steps(accelerator, model, optimizer, 1, seed=step)
        path = checkpoints.save(accelerator, root, step=step, epoch=0, extra_state={"note": step}, keep=2)
        assert path == root / f"step-{step:08d}"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]

    record = json.loads((path / "files.json").read_text())["files"]
    on_disk = {p.name for p in path.iterdir()} - {"files.json"}
    assert set(record) == on_disk and {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= on_disk
    for name, entry in record.items():
        assert entry == {"bytes": (path / name).stat().st_size,
                         "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
    assert checkpoints.read_state(path) == {"note": 3, "step": 3, "epoch": 0}
    assert checkpoints.newest_intact(root, print) == path


def test_every_file_of_a_checkpoint_gets_the_mode_the_umask_gives(tmp_path):
    """The weights (which safetensors writes 600) are readable wherever the run's other files are: a team's
    shared run folder."""
    accelerator, model, optimizer = build(seed=0)
    previous = os.umask(0o022)
    try:
        path = checkpoints.save(accelerator, tmp_path / "checkpoints", step=1, epoch=0, extra_state={}, keep=1,
                                own_tensors={"running_mean": torch.zeros(3)})
    finally:
        os.umask(previous)
    modes = {file.name: oct(file.stat().st_mode & 0o777) for file in path.iterdir()}
    assert "model.safetensors" in modes and "own_0.safetensors" in modes
    assert set(modes.values()) == {"0o644"}, modes


def test_truncated_newest_is_skipped_in_one_line_and_the_older_loads_exactly(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    train_steps(accelerator, model, optimizer, 2, seed=1)
    older = checkpoints.save(accelerator, root, step=2, epoch=1, extra_state={"loader": {"epoch": 1}}, keep=3)
    at_older = snapshot(accelerator, model, optimizer)
    train_steps(accelerator, model, optimizer, 2, seed=2)
    newer = checkpoints.save(accelerator, root, step=4, epoch=2, extra_state={"loader": {"epoch": 2}}, keep=3)
    cut, full = truncate(newer / "model.safetensors")

    lines = []
    assert checkpoints.newest_intact(root, lines.append) == older
    assert lines == [f"checkpoint {newer} is damaged (model.safetensors: {cut} bytes, expected {full}); "
                     f"skipped, resuming from {older}"]

    accelerator, model, optimizer = build(seed=5)  # another start: every tensor differs before the load
    before = accelerator.unwrap_model(model).encoder.conv1.weight
    assert not torch.equal(before, at_older["weights"]["encoder.conv1.weight"])
    state = checkpoints.load(accelerator, older)
    assert state == {"loader": {"epoch": 1}, "step": 2, "epoch": 1}
    assert_same(snapshot(accelerator, model, optimizer), at_older)


def test_a_damaged_newest_then_a_resume_from_the_older_and_a_save_keeping_one_stays_resumable(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    older = checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={"note": "older"}, keep=1)
    newer = checkpoints.save(accelerator, root, step=4, epoch=0, extra_state={"note": "newer"}, keep=2)
    truncate(newer / "model.safetensors")
    assert checkpoints.newest_intact(root, lambda line: None) == older
    checkpoints.load(accelerator, older)
    train_steps(accelerator, model, optimizer, 1, seed=3)
    stopped = checkpoints.save(accelerator, root, step=3, epoch=0, extra_state={"note": "resumed"}, keep=1)
    assert [p.name for p in root.iterdir()] == ["step-00000003"]
    assert checkpoints.newest_intact(root, lambda line: None) == stopped
    assert checkpoints.read_state(stopped)["note"] == "resumed"


def test_steps_numbered_anew_are_kept_and_resumed_in_the_order_they_were_written(tmp_path):
    """A run resumed with --accept-changes batch_size (or world_size) numbers its steps anew, lower."""
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        checkpoints.save(accelerator, root, step=step, epoch=0, extra_state={}, keep=2)
    for step in (6, 8):
        train_steps(accelerator, model, optimizer, 1, seed=step)
        last = checkpoints.save(accelerator, root, step=step, epoch=0, extra_state={"after": "resume"}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000008"]
    assert checkpoints.newest_intact(root, lambda line: None) == last
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["step-00000006", "step-00000008"]


def test_a_save_that_fails_while_replacing_a_checkpoint_of_its_name_leaves_the_old_one(tmp_path, monkeypatch):
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={"note": "first"}, keep=3)
    same = checkpoints.save(accelerator, root, step=4, epoch=0, extra_state={"note": "first"}, keep=3)
    real_replace = os.replace

    def replace_failing_for_the_new_one(source, target):
        if Path(source).name.startswith(".partial-"):
            raise OSError(28, "No space left on device", str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_failing_for_the_new_one)
    train_steps(accelerator, model, optimizer, 1, seed=1)
    with pytest.raises(UserError, match="No space left on device"):
        checkpoints.save(accelerator, root, step=4, epoch=0, extra_state={"note": "second"}, keep=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert rundir.resume_point(tmp_path, "newest", lambda line: None)[1] == same   # as a resumed run picks
    assert checkpoints.read_state(same)["note"] == "first"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]


def test_a_changed_byte_of_the_same_size_is_found_by_its_checksum(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    root = tmp_path / "checkpoints"
    older = checkpoints.save(accelerator, root, step=1, epoch=0, extra_state={}, keep=2)
    train_steps(accelerator, model, optimizer, 1, seed=1)
    newer = checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={}, keep=2)
    data = bytearray((newer / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newer / "optimizer.bin").write_bytes(bytes(data))
    lines = []
    assert checkpoints.newest_intact(root, lines.append) == older
    assert len(lines) == 1 and "optimizer.bin: sha256 differs" in lines[0] and str(newer) in lines[0]


def test_without_an_intact_checkpoint_resume_is_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoints.newest_intact(root, print) is None  # nothing written yet: the trainer says so
    accelerator, model, optimizer = build(seed=0)
    first = checkpoints.save(accelerator, root, step=1, epoch=0, extra_state={}, keep=2)
    second = checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={}, keep=2)
    (first / "files.json").unlink()
    (second / "random_states_0.pkl").unlink()
    lines = []
    with pytest.raises(UserError) as caught:
        checkpoints.newest_intact(root, lines.append)
    message = str(caught.value)
    assert "\n" not in message and not lines
    assert "step-00000002: random_states_0.pkl missing" in message
    assert "step-00000001: files.json missing" in message and "new --output-dir" in message


def test_loading_a_damaged_checkpoint_is_one_user_error(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    path = checkpoints.save(accelerator, tmp_path, step=1, epoch=0, extra_state={}, keep=1)
    truncate(path / "model.safetensors")
    with pytest.raises(UserError) as caught:
        checkpoints.load(accelerator, path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot load checkpoint {path} (SafetensorError")

    path = checkpoints.save(accelerator, tmp_path, step=2, epoch=0, extra_state={}, keep=1)
    truncate(path / "optimizer.bin")
    with pytest.raises(UserError, match=r"cannot load checkpoint .*step-00000002 \("):
        checkpoints.load(accelerator, path)


def test_a_checkpoint_of_another_model_is_one_user_error(tmp_path):
    accelerator, model, optimizer = build(seed=0)
    path = checkpoints.save(accelerator, tmp_path, step=1, epoch=0, extra_state={}, keep=1)
    accelerator = Accelerator(cpu=True)
    other = tiny_learner("--queue-size", str(QUEUE_SIZE), num_coarse=3)
    other, other_optimizer = accelerator.prepare(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(UserError, match=r"lacks 2 and has 0 unknown tensors of this model, e\.g\. classifier"):
        checkpoints.load(accelerator, path)


def test_channels_last_and_compiled_weights_load_into_a_plain_model_and_back(tmp_path):
    accelerator, model, optimizer = build(seed=0, channels_last=True, compiled=True)
    train_steps(accelerator, model, optimizer, 1, seed=1)
    saved = snapshot(accelerator, model, optimizer)
    path = checkpoints.save(accelerator, tmp_path, step=1, epoch=0, extra_state={}, keep=1)
    names = set(safetensors.torch.load_file(str(path / "model.safetensors")))
    assert names == {checkpoints.portable_name(name) for name in saved["weights"]}
    assert not any("_orig_mod" in name or name.startswith("module.") for name in names)

    portable = {**saved, "weights": {checkpoints.portable_name(name): tensor
                                     for name, tensor in saved["weights"].items()}}
    accelerator, model, optimizer = build(seed=3)
    checkpoints.load(accelerator, path)
    assert_same(snapshot(accelerator, model, optimizer), portable)

    accelerator, model, optimizer = build(seed=4, compiled=True)  # and back into a compiled one
    checkpoints.load(accelerator, path)
    assert_same(snapshot(accelerator, model, optimizer), saved)


# ------------------------------------------------------------------------------------------ the resume check


def record(**changes) -> dict:
    values = {**dataclasses.asdict(Config(dataset="digits", batch_size=64)), "accept_changes": None,
              "mixed_precision": "no", "world_size": 1, "shards_fingerprint": "0123456789abcdef"}
    return {**values, **changes}


def test_every_option_is_classified_once():
    names = {field.name for field in dataclasses.fields(Config)} | {"accept_changes"}
    both = checkpoints.MUST_MATCH_ON_RESUME & checkpoints.MAY_DIFFER_ON_RESUME
    assert not both
    unclassified = names - checkpoints.MUST_MATCH_ON_RESUME - checkpoints.MAY_DIFFER_ON_RESUME
    assert not unclassified, f"classify these options in maskcon/checkpoints.py: {sorted(unclassified)}"
    assert checkpoints.MUST_MATCH_ON_RESUME - names == {"world_size", "shards_fingerprint"}


def test_each_difference_is_listed_in_one_line():
    saved = record()
    new = record(batch_size=32, method="grafit", world_size=2, shards_fingerprint="fedcba9876543210")
    assert checkpoints.compare_configs(saved, new, set()) == [
        "method (maskcon -> grafit)", "batch_size (64 -> 32)", "world_size (1 -> 2)",
        "shards_fingerprint (0123456789abcdef -> fedcba9876543210)"]
    with pytest.raises(UserError) as caught:
        checkpoints.check_resume(saved, record(batch_size=32, method="grafit"), set())
    assert str(caught.value) == (
        "--resume: this run differs from the checkpoint's in method (maskcon -> grafit), batch_size (64 -> 32); "
        "pass --accept-changes method,batch_size to continue anyway, or start afresh in a new --output-dir")


def test_accepted_differences_pass_and_are_returned():
    saved, new = record(), record(epochs=400, batch_size=32, log_every=1, wandb="disabled", max_steps=5)
    accept = checkpoints.parse_accept("epochs, batch-size")
    assert accept == {"epochs", "batch_size"}
    assert checkpoints.parse_accept("num_processes") == {"world_size"}     # config.yaml's name of it
    assert checkpoints.check_resume(saved, new, accept) == ["epochs (200 -> 400)", "batch_size (64 -> 32)"]
    with pytest.raises(UserError, match=r"in batch_size \(64 -> 32\); pass --accept-changes batch_size "):
        checkpoints.check_resume(saved, new, {"epochs"})


def test_options_that_do_not_change_training_may_differ():
    new = record(**{name: f"changed-{name}" for name in checkpoints.MAY_DIFFER_ON_RESUME})
    assert checkpoints.check_resume(record(), new, set()) == []


def test_an_unknown_accepted_option_is_refused():
    with pytest.raises(UserError, match=r"--accept-changes: unknown option batchsize;"):
        checkpoints.parse_accept("epochs,batchsize")
    with pytest.raises(UserError, match=r"unknown option batchsize;"):
        checkpoints.check_resume(record(), record(), {"batchsize"})


@pytest.mark.parametrize("method, unread", [("supfine", {"w", "t"}), ("selfcon", {"w", "t"}),
                                           ("grafit", {"t"}), ("coins", {"t"}), ("maskcon", set())])
def test_a_w_or_t_the_method_does_not_read_may_differ_on_resume(method, unread):
    # SupFINE and SelfCon read neither; Grafit and CoIns read w alone; MaskCon both (supplement section 4)
    saved, new = record(method=method, w=0.5, t=0.2), record(method=method, w=1.0, t=0.05)
    expected = [change for name, change in (("w", "w (0.5 -> 1.0)"), ("t", "t (0.2 -> 0.05)")) if name not in unread]
    assert checkpoints.compare_configs(saved, new, set()) == expected


def test_an_option_only_one_side_has_counts_as_a_difference():
    saved = {name: value for name, value in record().items() if name != "key_momentum"}
    assert checkpoints.compare_configs(saved, record(), set()) == ["key_momentum (unset -> 0.99)"]


def test_the_shards_fingerprint_follows_the_shards_not_their_folder():
    manifest = {"dataset": "digits", "splits": {"train": {"shards": [{"tar": "train-000000.tar", "sha256": "aa"}]},
                                                "test": {"shards": [{"tar": "test-000000.tar", "sha256": "bb"}]}}}
    moved = json.loads(json.dumps(manifest))
    moved["splits"]["train"]["shards"][0]["tar"] = "elsewhere/train-000000.tar"
    remade = json.loads(json.dumps(manifest))
    remade["splits"]["train"]["shards"][0]["sha256"] = "cc"
    assert checkpoints.shards_fingerprint(moved) == checkpoints.shards_fingerprint(manifest)
    assert checkpoints.shards_fingerprint(remade) != checkpoints.shards_fingerprint(manifest)
    config = Config(dataset="digits")
    made = plan.run_record(config, world_size=2, manifest=manifest, mixed_precision="bf16")
    assert made["world_size"] == 2 and made["mixed_precision"] == "bf16" and made["batch_size"] == config.batch_size


def test_a_failed_resume_leaves_the_output_folder_as_it_was(tmp_path):
    output = tmp_path / "run"
    accelerator, model, optimizer = build(seed=0)
    root = output / "checkpoints"
    checkpoints.save(accelerator, root, step=1, epoch=0, extra_state={"run": record()}, keep=2)
    newest = checkpoints.save(accelerator, root, step=2, epoch=0, extra_state={"run": record()}, keep=2)
    (output / "config.yaml").write_text("batch_size: 64\n")
    truncate(newest / "model.safetensors")
    before = folder_contents(output)

    chosen = rundir.resume_point(output, "newest", lambda line: None)[1]
    with pytest.raises(UserError):
        checkpoints.check_resume(checkpoints.read_state(chosen)["run"], record(batch_size=32), set())
    with pytest.raises(UserError):
        checkpoints.load(accelerator, newest)
    (chosen / "files.json").unlink()
    after_unlink = folder_contents(output)
    with pytest.raises(UserError):
        rundir.resume_point(output, "newest", lambda line: None)
    assert folder_contents(output) == after_unlink
    del before["checkpoints/step-00000001/files.json"]
    assert after_unlink == before


# ------------------------------------------------------------------------------------------ several processes


def process(rank: int, world_size: int, task: str, folder: str) -> None:
    """One of world_size gloo processes, set up as `accelerate launch` sets up its workers."""
    accelerator, model, optimizer = build(seed=0)
    assert accelerator.num_processes == world_size
    root = Path(folder) / "checkpoints"
    if task == "save":
        train_steps(accelerator, model, optimizer, 3, seed=1)
        checkpoints.save(accelerator, root, step=3, epoch=0, extra_state={"world_size": world_size}, keep=2)
    else:
        path = rundir.claim_everywhere(folder, "newest", dataset="digits", method="maskcon", log=print).resume_from
        checkpoints.load(accelerator, path)
        try:  # decided on the main process only: the other process must raise too, not wait
            rundir.claim_everywhere(str(Path(folder) / "damaged"), "newest", dataset="digits", method="maskcon",
                                    log=print)
        except UserError as error:
            (Path(folder) / f"refused-rank{rank}.txt").write_text(f"{type(error).__name__}: {error}")
    torch.save(snapshot(accelerator, model, optimizer), Path(folder) / f"{task}-rank{rank}.pt")
    accelerator.end_training()


def run_processes(world_size: int, task: str, folder: Path) -> list[dict]:
    run_gloo(process, world_size, task, str(folder), world_size=world_size, init="env", guard_s=600)
    return [torch.load(folder / f"{task}-rank{rank}.pt", weights_only=True) for rank in range(world_size)]


@pytest.mark.slow
def test_two_processes_save_and_one_process_loads_the_same_weights(tmp_path):
    saved = run_processes(2, "save", tmp_path)  # the main process's state is the one saved
    names = set(safetensors.torch.load_file(str(tmp_path / "checkpoints/step-00000003/model.safetensors")))
    assert names == set(saved[0]["weights"]) and not any(name.startswith("module.") for name in names)

    accelerator, model, optimizer = build(seed=7)
    path = checkpoints.newest_intact(tmp_path / "checkpoints", print)
    assert checkpoints.load(accelerator, path) == {"world_size": 2, "step": 3, "epoch": 0}
    assert_same(snapshot(accelerator, model, optimizer), saved[0])


@pytest.mark.slow
def test_one_process_saves_and_two_processes_load_the_same_weights_and_refuse_together(tmp_path):
    accelerator, model, optimizer = build(seed=4)
    train_steps(accelerator, model, optimizer, 3, seed=2)
    saved = snapshot(accelerator, model, optimizer)
    checkpoints.save(accelerator, tmp_path / "checkpoints", step=3, epoch=0, extra_state={}, keep=2)
    damaged = checkpoints.save(accelerator, tmp_path / "damaged" / "checkpoints", step=1, epoch=0, extra_state={},
                               keep=2)
    (damaged / "files.json").unlink()
    for loaded in run_processes(2, "load", tmp_path):
        assert_same(loaded, saved)
    refusals = [(tmp_path / f"refused-rank{rank}.txt").read_text() for rank in range(2)]
    # the main process reports the refusal; the other one learns it and exits without printing it again
    assert refusals[0].startswith("UserError: --resume: no intact checkpoint in ")
    assert refusals[1] == "MainProcessFailed: the main process failed: " + refusals[0].removeprefix("UserError: ")

"""Checkpoints: written atomically with a record of their files, found intact, loaded in any number of
processes, and a resumed run's options compared with those of the run that wrote them.

A checkpoint is a folder ROOT/step-XXXXXXXX holding Accelerate's state (model.safetensors, optimizer.bin,
random_states_R.pkl, ...), trainer_state.json (what the loop wants back: step, epoch, the run's options,
the loaders' state) and files.json (bytes and sha256 of every other file, written last). It is written
as ROOT/.partial-step-XXXXXXXX and renamed when complete, so a folder without the partial prefix was
finished; files.json then tells whether its files are still whole. files.json also holds the checkpoint's
sequence number (1 + the highest one under ROOT when it was written): checkpoints are ordered, kept and
resumed from in the order they were written, not by step (a run resumed from an older checkpoint, or with
--accept-changes batch_size, numbers its steps anew). A checkpoint that replaces one of the same name moves
the old one aside to ROOT/.replaced-step-XXXXXXXX first, so one of the two is always complete on disk.

Every function that takes an accelerator is called by all processes; a failure on any process raises
on all of them (one UserError line), so no process is left waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError

from maskcon import config, failures
from maskcon.errors import UserError, WriteFailed
from maskcon.methods import METHODS

CHECKPOINT_PREFIX = "step-"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"  # a checkpoint moved aside while another of its name takes its place
STATE_FILE = "trainer_state.json"
FILES_RECORD = "files.json"
MODEL_FILE = "model.safetensors"  # Accelerate's name of the first prepared model's weights
OWN_FILE = "own_{rank}.safetensors"  # what one process keeps for itself (its batch-norm statistics)
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")

# What a resumed run must match, unless the user accepts the change by name (--accept-changes), and what it
# may change silently: the options' own classes (maskcon.config.option), and two things that are not options,
# added by run_record(): "world_size" (the number of processes) and "shards_fingerprint" (the shards' identity).
MUST_MATCH_ON_RESUME = config.MUST_MATCH_ON_RESUME | {"world_size", "shards_fingerprint"}
MAY_DIFFER_ON_RESUME = config.MAY_DIFFER_ON_RESUME


# ------------------------------------------------------------------------------------------ the run's identity


def shards_fingerprint(manifest: dict) -> str:
    """16 hex digits of a sha256 over the dataset name and every shard's recorded sha256, split by split:
    the same for the same shards wherever they lie, different when any shard was re-made differently."""
    digest = hashlib.sha256(str(manifest["dataset"]).encode())
    for split in sorted(manifest["splits"]):
        for record in manifest["splits"][split]["shards"]:
            digest.update(f"\n{split} {record['sha256']}".encode())
    return digest.hexdigest()[:16]


def parse_accept(text: str | None) -> set[str]:
    """The option names of --accept-changes ("batch_size,epochs"; dashes or underscores; num_processes, as
    config.yaml names it, for world_size)."""
    names = {name.strip().replace("-", "_") for name in (text or "").split(",") if name.strip()}
    names = {"world_size" if name == "num_processes" else name for name in names}
    _check_known(names)
    return names


def compare_configs(saved: dict, new: dict, accept: set[str]) -> list[str]:
    """"name (old -> new)" for each option that defines the run and differs, not counting accepted ones;
    in the order of `new` (Config's field order), then any names only the checkpoint has."""
    # a --w or --t that neither the checkpoint's objective nor this run's reads changes nothing
    methods = [METHODS.get(record.get("method")) for record in (saved, new)]
    unread = {name for name in ("w", "t") if all(method is not None and not method.reads(name) for method in methods)}
    names = [name for name in dict.fromkeys([*new, *saved])
             if name in MUST_MATCH_ON_RESUME and name not in accept and name not in unread]
    return [f"{name} ({_shown(saved, name)} -> {_shown(new, name)})" for name in names
            if saved.get(name, _ABSENT) != new.get(name, _ABSENT)]


def check_resume(saved: dict, new: dict, accept: set[str]) -> list[str]:
    """Refuse to continue a run whose defining options changed; return the accepted differences (to log).

    saved: run_record() of the run that wrote the checkpoint; new: that of this run; accept: option names
    the user lets change (parse_accept(config.accept_changes)).
    """
    _check_known(accept)
    differences = compare_configs(saved, new, accept)
    if differences:
        names = ",".join(item.split(" ", 1)[0] for item in differences)
        raise UserError(f"--resume: this run differs from the checkpoint's in {', '.join(differences)}; pass "
                        f"--accept-changes {names} to continue anyway, or start afresh in a new --output-dir")
    return [item for item in compare_configs(saved, new, set()) if item.split(" ", 1)[0] in accept]


_ABSENT = object()


def _shown(values: dict, name: str) -> str:
    value = values.get(name, _ABSENT)
    if value is _ABSENT:
        return "unset"
    return "none" if value is None else str(value)


def _check_known(names: set[str]) -> None:
    unknown = sorted(names - MUST_MATCH_ON_RESUME - MAY_DIFFER_ON_RESUME)
    if unknown:
        raise UserError(f"--accept-changes: unknown option {', '.join(unknown)}; name options that define the "
                        f"run, e.g. --accept-changes epochs,batch_size")


# ------------------------------------------------------------------------------------------ finding them


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(root: Path | str) -> list[Path]:
    """Every finished checkpoint folder under ROOT (intact or not), in the order they were written, oldest
    first: by the sequence number in files.json (0 when unreadable or absent), then by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(sequence_number(path), int(match.group(1)), path) for path in root.iterdir()
             if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, _, path in sorted(found)]


def sequence_number(path: Path | str) -> int:
    """The position in which the checkpoint at PATH was written under its root (1, 2, ...); 0 when its
    files.json is unreadable or holds none."""
    try:
        sequence = json.loads((Path(path) / FILES_RECORD).read_text()).get("sequence", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return sequence if isinstance(sequence, int) else 0


def restore_replaced(root: Path | str) -> None:
    """Finish or undo a replacement that a stopped run left half done: a checkpoint moved aside
    (REPLACED_PREFIX) goes back to its name when nothing took its place, and is removed when its
    successor is there."""
    root = Path(root)
    if not root.is_dir():
        return
    for aside in root.glob(f"{REPLACED_PREFIX}{CHECKPOINT_PREFIX}*"):
        final = root / aside.name.removeprefix(REPLACED_PREFIX)
        if final.exists():
            shutil.rmtree(aside)
        else:
            os.replace(aside, final)


def damage(path: Path | str) -> str | None:
    """What is wrong with the checkpoint at PATH, in a few words, or None when every recorded file is
    present with its recorded size and sha256."""
    path = Path(path)
    try:
        record = json.loads((path / FILES_RECORD).read_text())["files"]
    except FileNotFoundError:
        return f"{FILES_RECORD} missing, so its files cannot be checked"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{FILES_RECORD} unreadable"
    problems = []
    for name, expected in record.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} missing")
        elif file.stat().st_size != expected["bytes"]:
            problems.append(f"{name}: {file.stat().st_size} bytes, expected {expected['bytes']}")
    if not problems:
        problems = [f"{name}: sha256 differs from the recorded one" for name, expected in record.items()
                    if _sha256(path / name) != expected["sha256"]]
    if not problems:
        return None
    more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
    return ", ".join(problems[:2]) + more


def newest_intact(root: Path | str, log: Callable[[str], None]) -> Path | None:
    """The checkpoint under ROOT written last whose files are whole; None when ROOT holds no checkpoint.

    Each damaged newer checkpoint is reported with one line through `log` and skipped; when every
    checkpoint is damaged, UserError (one line naming each).
    """
    damaged = []
    for path in reversed(list_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            for bad, what in damaged:
                log(f"checkpoint {bad} is damaged ({what}); skipped, resuming from {path}")
            return path
        damaged.append((path, problem))
    if not damaged:
        return None
    listed = "; ".join(f"{path.name}: {what}" for path, what in damaged)
    raise UserError(f"--resume: no intact checkpoint in {root} ({listed}); start afresh in a new --output-dir")


def read_state(path: Path | str) -> dict:
    """The trainer state saved with the checkpoint at PATH: step, epoch and the save() call's extra_state."""
    file = Path(path) / STATE_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {file} ({_one_line(error)}); the checkpoint is damaged: remove "
                        f"{path} to resume from an older one") from None


# ------------------------------------------------------------------------------------------ save and load


def save(accelerator: Accelerator, root: Path | str, *, step: int, epoch: int, extra_state: dict,
         keep: int, own_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint of everything Accelerate prepared, plus `extra_state`, and keep the `keep` intact
    ones written last (this one included; see rotate()).

    extra_state: JSON the trainer wants back from load() (the run's options, the loaders' state, ...); step
    and epoch are added to it. Model weights are stored under the unwrapped model's names (no DDP
    `module.`, no torch.compile `_orig_mod.`), so any number of processes can load them. own_tensors: this
    process's own tensors (OWN_FILE of its rank; `own_tensors` gives them back). Returns the checkpoint's
    folder on every process.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    partial = root / f"{PARTIAL_PREFIX}{final.name}"
    what = f"writing checkpoint {final}"

    def make_room() -> None:
        root.mkdir(parents=True, exist_ok=True)
        restore_replaced(root)
        for stale in root.glob(f"{PARTIAL_PREFIX}*"):  # left by a run stopped while writing: never complete
            shutil.rmtree(stale)
        partial.mkdir()

    def finish() -> None:
        state = {**extra_state, "step": step, "epoch": epoch}
        (partial / STATE_FILE).write_text(json.dumps(state, indent=1))
        mode = (partial / STATE_FILE).stat().st_mode & 0o777   # what the umask gives a file: safetensors writes 600
        files = {}
        for file in sorted(p for p in partial.rglob("*") if p.is_file()):
            os.chmod(file, mode)   # readable by whoever may read the run's other files (a team's shared folder)
            files[file.relative_to(partial).as_posix()] = {"bytes": file.stat().st_size,
                                                            "sha256": _sha256(file, sync=True)}
        sequence = 1 + max((sequence_number(path) for path in list_checkpoints(root)), default=0)
        _write_synced(partial / FILES_RECORD, json.dumps({"files": files, "sequence": sequence}, indent=1))
        _sync_folder(partial)
        _replace(partial, final)
        rotate(root, keep, newest=final)

    try:
        _on_main(accelerator, make_room, what)
        _on_all(accelerator, lambda: _save_state(accelerator, partial, own_tensors), what)
        _on_main(accelerator, finish, what)
    except UserError:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def _replace(partial: Path, final: Path) -> None:
    """Rename PARTIAL to FINAL; a checkpoint already named FINAL stays complete on disk until then (moved
    aside, removed after the rename; restore_replaced() finishes the job after a stop in between)."""
    aside = final.with_name(f"{REPLACED_PREFIX}{final.name}")
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(partial, final)
    _sync_folder(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def rotate(root: Path | str, keep: int, *, newest: Path | None = None) -> list[Path]:
    """Remove the checkpoints under ROOT written before the `keep` newest intact ones; return them.

    Order is the order of writing (list_checkpoints), not the step. Damaged checkpoints count for nothing:
    they are removed only when written before the keep-th intact one, so when fewer than `keep` are intact
    nothing is removed, and the last intact checkpoint is never removed. `newest`, the checkpoint just
    written, is known intact without reading it again.
    """
    written = list_checkpoints(root)
    intact = 0
    for position in range(len(written) - 1, -1, -1):
        path = written[position]
        if path == newest or damage(path) is None:
            intact += 1
            if intact == keep:
                removed = written[:position]
                for old in removed:
                    shutil.rmtree(old, ignore_errors=True)
                return removed
    return []


def load(accelerator: Accelerator, path: Path | str) -> dict:
    """Load a checkpoint into what Accelerate prepared (weights, optimizer, scaler, RNG states) and return
    its trainer state (step, epoch and save()'s extra_state).

    Works for any number of processes: the weights are matched by the unwrapped model's names. (The RNG
    state of a process the saving run did not have is left as it is.)
    """
    path = Path(path)

    def restore() -> dict:
        state = read_state(path)
        handle = accelerator.register_load_state_pre_hook(_portable_load(accelerator))
        try:
            accelerator.load_state(str(path))
        except _LOAD_ERRORS as error:
            raise UserError(f"cannot load checkpoint {path} ({type(error).__name__}: {_one_line(error)}); it is "
                            f"damaged or was written for another model; remove it to resume from an older "
                            f"one, or start afresh in a new --output-dir") from None
        finally:
            handle.remove()
        return state

    return _on_all(accelerator, restore, f"loading checkpoint {path}")


# what reading a damaged or unfitting checkpoint raises: safetensors, torch.load, load_state_dict, json
_LOAD_ERRORS = (SafetensorError, RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError)


def portable_name(name: str) -> str:
    """A state-dict key without DDP's `module.` prefix and torch.compile's `_orig_mod.` segments."""
    return name.removeprefix("module.").replace("_orig_mod.", "")


def own_tensors(path: Path | str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """The tensors process RANK saved into checkpoint PATH for itself ({} when it saved none, or when the
    checkpoint was written by another number of processes: then the shared state stands)."""
    file = Path(path) / OWN_FILE.format(rank=rank)
    if not file.exists() or read_state(path)["run"].get("world_size") != world_size:
        return {}
    return safetensors.torch.load_file(str(file))


@torch.no_grad()
def copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """Copy each of SOURCES into the tensor of TARGETS of its name (in place)."""
    for name, source in sources.items():
        targets[name].copy_(source)


def _save_state(accelerator: Accelerator, folder: Path, own: dict[str, torch.Tensor] | None = None) -> None:
    def portable_weights(models, weights, output_dir) -> None:
        # OrderedDict: Accelerate then makes every tensor contiguous (channels-last weights) before safetensors
        for i, state in enumerate(weights):
            weights[i] = OrderedDict((portable_name(name), tensor) for name, tensor in state.items())

    handle = accelerator.register_save_state_pre_hook(portable_weights)
    try:
        accelerator.save_state(str(folder))
        if own:
            safetensors.torch.save_file({name: tensor.detach().cpu().contiguous() for name, tensor in own.items()},
                                        str(folder / OWN_FILE.format(rank=accelerator.process_index)))
    except (SafetensorError, RuntimeError) as error:  # how safetensors and torch.save report a failed write
        raise OSError(f"{type(error).__name__}: {_one_line(error)}") from None
    finally:
        handle.remove()


def _portable_load(accelerator: Accelerator):
    """A load_state pre-hook that loads each model's weights by portable names and leaves the rest
    (optimizer, scaler, RNG) to Accelerate."""

    def hook(models, input_dir) -> None:
        for i, model in enumerate(models):
            file = Path(input_dir) / (MODEL_FILE if i == 0 else MODEL_FILE.replace(".", f"_{i}."))
            saved = safetensors.torch.load_file(str(file))
            target = accelerator.unwrap_model(model)
            names = {portable_name(name): name for name in target.state_dict()}
            missing, unexpected = sorted(names.keys() - saved.keys()), sorted(saved.keys() - names.keys())
            if missing or unexpected:
                raise ValueError(f"{file.name} lacks {len(missing)} and has {len(unexpected)} unknown tensors "
                               f"of this model, e.g. {(missing or unexpected)[0]}")
            target.load_state_dict({names[name]: tensor for name, tensor in saved.items()}, strict=True)
        models.clear()  # loaded here; Accelerate would look for the wrapped names

    return hook


# ------------------------------------------------------------------------------------------ across processes


def _on_all(accelerator: Accelerator, work: Callable, what: str):
    """Run `work` on every process; when it fails on any, every process stops (failures.run_everywhere)."""
    return failures.run_everywhere(_disk_errors_explained, work, what)


def _on_main(accelerator: Accelerator, work: Callable, what: str):
    """Run `work` on the main process only and give its result to every process; a failure there stops
    every process (failures.run_on_main)."""
    result = failures.run_on_main(_disk_errors_explained, work, what)
    if accelerator.num_processes > 1:
        shared = [result]
        broadcast_object_list(shared)
        result = shared[0]
    return result


def _disk_errors_explained(work: Callable, what: str):
    try:
        return work()
    except OSError as error:
        raise WriteFailed(f"{what} failed ({_one_line(error)}); free space or fix permissions there; "
                        f"older checkpoints are intact") from None


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------ files


def _sha256(file: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _write_synced(file: Path, text: str) -> None:
    with open(file, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

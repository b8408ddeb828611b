"""The plan of a run: what it will do, decided once, read-only, by the one function that `--check`,
`--print-config`, `launch/run.py`, `launch/slurm.sh` and the trainer's builder all call.

`plan_run(config, processes)` reads the shards' manifest, the checkpoint that --resume names (compared with
this run's record) and settles the device, the precision, the memory format, the batch per process and in all,
the learning rate, the steps per epoch and in all, the step the run starts from, and the one resolved record
of the run (written to config.yaml and W&B; a checkpoint keeps `record`). It writes nothing: the builder
(`maskcon.run.build_run`) claims the run folder, writes the bundled digits' shards when missing, plans, and
then only carries the plan out, so what `--check` prints is what the run does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskcon import checkpoints, count, remote, rundir
from maskcon.config import NOT_RECORDED, Config, base_learning_rate, preset, shards_dir, to_dict
from maskcon.errors import UserError, file_in_the_way
from maskcon.methods import METHODS
from maskcon.provenance import nvidia_smi
from maskcon.retrieval import whole_split_note
from maskcon.shard_format import check_folder_for_digits, check_split, read_manifest


@dataclass(frozen=True)
class Plan:
    config: Config
    processes: int
    device: str                   # "cuda" | "cpu": where every process of the run computes
    precision: str                # Accelerate's mixed precision: no | bf16 | fp16
    channels_last: bool           # the memory format of the images and the network
    shards: Path
    manifest: dict | None         # None: the bundled digits, written by the run on first use
    base_lr: float                # the learning rate after warm-up, for the real global batch
    steps_per_epoch: int | None   # None until the shards exist (the digits before their first use)
    resume_from: Path | None      # the checkpoint the run continues from; None: a fresh start
    start_step: int               # 0, or where the checkpoint leaves off
    accepted: tuple[str, ...] = field(default=())   # "name (old -> new)" of each accepted change
    notes: tuple[str, ...] = field(default=())      # what makes little sense but may be meant: warnings
    shards_url: str | None = None          # a remote --shards: the URL (`shards` is then its staged copy)
    manifest_sha256: str | None = None     # sha256 of the remote manifest.json's bytes
    staging: str | None = None             # a remote --shards on this node: staged already, or to be

    @property
    def batch_size(self) -> int:
        """Images per process per step."""
        return self.config.batch_size

    @property
    def global_batch(self) -> int:
        """Images per step over all processes."""
        return self.config.batch_size * self.processes

    @property
    def total_steps(self) -> int | None:
        return None if self.steps_per_epoch is None else self.steps_per_epoch * self.config.epochs

    @property
    def warmup_steps(self) -> int | None:
        return None if self.steps_per_epoch is None else round(self.config.warmup_epochs * self.steps_per_epoch)

    @property
    def record(self) -> dict:
        """What a checkpoint records of the run and a resume compares (run_record)."""
        if self.manifest is None:
            raise UserError(f"no shards in {self.shards} yet: the run writes them first")
        return run_record(self.config, world_size=self.processes, manifest=self.manifest,
                                      mixed_precision=self.precision)

    def resolved(self) -> dict:
        """The resolved configuration as config.yaml and W&B hold it: every option, then what the run decided."""
        from maskcon.provenance import provenance

        options = {name: value for name, value in to_dict(self.config).items() if name not in NOT_RECORDED}
        origin = provenance()
        if self.shards_url is not None:
            origin["shards"] = {"url": self.shards_url, "manifest_sha256": self.manifest_sha256}
        return {**options, "mixed_precision": self.precision, "channels_last": self.channels_last,
                "num_processes": self.processes, "global_batch": self.global_batch, "base_lr": self.base_lr,
                "provenance": origin}

    def lines(self) -> list[str]:
        """What `--check` prints of the plan, one line per part."""
        config = self.config
        steps = "steps per epoch once the shards are written" if self.steps_per_epoch is None else \
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps"
        if config.max_steps is not None and (self.total_steps is None or config.max_steps < self.total_steps):
            steps += f"; stops at step {config.max_steps} (--max-steps)"
        lines = [f"{config.method} on {config.dataset}: {count(self.processes, 'process', 'processes')} x batch "
                 f"{self.batch_size} = global batch {self.global_batch}, lr {self.base_lr:g}, "
                 f"{count(config.epochs, 'epoch')}, {steps}",
                 f"device: {self.device}, precision {precision_text(self.precision)}, "
                 f"{'channels-last' if self.channels_last else 'contiguous'} memory format"]
        if self.shards_url is not None and self.shards == Path(self.shards_url):
            sizes = ", ".join(f"{name} {split['num_samples']}" for name, split in self.manifest["splits"].items())
            lines.append(f"shards: {self.shards_url} (manifest sha256 {self.manifest_sha256[:16]}, {sizes} images), "
                         f"{self.staging}")
        elif self.manifest is None:
            lines.append(f"shards: {self.shards} is written on first use (bundled digits)")
        else:
            sizes = ", ".join(f"{name} {split['num_samples']}" for name, split in self.manifest["splits"].items())
            lines.append(f"shards: {self.shards} intact by size and index ({sizes} images)")
        if config.resume and self.resume_from is None:
            lines.append(f"resume: no checkpoint in {Path(config.output_dir) / rundir.CHECKPOINTS} yet; "
                         f"starts afresh")
        elif self.resume_from is not None:
            lines.append(f"resume: from {self.resume_from} at step {self.start_step}"
                         + "".join(f"; accepted change {change}" for change in self.accepted))
        return lines + [f"warning: {note}" for note in self.notes]


def precision_text(precision: str) -> str:
    """A --mixed-precision value as a person reads it: "no" (none) is fp32."""
    return "fp32" if precision == "no" else precision


def resolve_precision(requested: str | None, device: str) -> str:
    """--mixed-precision when given; else what `accelerate launch --mixed_precision` asked for (fp16, bf16);
    else bf16 on a GPU (fp16 where bf16 is not supported) and fp32 on the CPU."""
    import os

    if requested is not None:
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


_READ = object()   # plan_run's resume_from default: read the checkpoint that --resume names


def run_record(config: Config, *, world_size: int, manifest: dict, mixed_precision: str) -> dict:
    """The options of a run as checkpoints.check_resume() compares them: every Config field, the number of processes,
    the shards' fingerprint, and the precision Accelerate resolved (`accelerator.mixed_precision`)."""
    return {**to_dict(config), "mixed_precision": mixed_precision, "world_size": world_size,
            "shards_fingerprint": checkpoints.shards_fingerprint(manifest)}


def plan_run(config: Config, processes: int, *, device: str | None = None, resume_from=_READ,
             shards_required: bool = True, staged: Path | None = None) -> Plan:
    """The plan of `config` on `processes` processes (see the module's text). device: "cuda" or "cpu"
    (default: cuda when there is one); resume_from: the checkpoint the builder claimed (default: the one
    --resume names, read without writing); shards_required=False plans without shards when there are none
    yet (--print-config); staged: the local copy of a remote --shards URL (the builder stages it; without
    it the plan reads the remote manifest alone). UserError (one line) for shards that are missing, of another
    dataset or damaged, and for a checkpoint this run may not continue."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    url, digest, staging = (config.shards, None, None) if remote.is_url(config.shards) else (None, None, None)
    folder = staged if staged is not None else shards_dir(config)
    for place, fix in ((None if url else folder, "name a folder for the shards"),
                       (config.output_dir, "choose another --output-dir")):   # as the builder would find them
        blocker = file_in_the_way(place) if place else None
        if blocker is not None:
            raise UserError(f"{blocker} is a file, not a folder; {fix}")
    if url is not None and staged is None:
        manifest, raw = (None, b"") if not shards_required else remote.read_remote_manifest(url)
        digest = remote.manifest_sha256(raw) if manifest is not None else None
        if manifest is not None:
            check_dataset(config, manifest, url)
        staging = None if manifest is None else remote.staging_state(
            url, manifest, raw, config.shard_cache, remote.parse_size(config.shard_cache_limit))
    else:
        missing = not (folder / "manifest.json").exists() and (config.dataset == "digits" or not shards_required)
        if missing and config.dataset == "digits":
            check_folder_for_digits(folder)
        manifest = None if missing else _manifest(config, folder)
        digest = remote.manifest_sha256((folder / "manifest.json").read_bytes()) if url and manifest else None
    steps_per_epoch = None
    if manifest is not None:
        train_samples = manifest["splits"]["train"]["num_samples"]
        if train_samples // processes < config.batch_size:
            fits = train_samples // config.batch_size
            fewer = f", or start at most {count(fits, 'process', 'processes')}" if processes > 1 and fits else ""
            raise UserError(f"the train split has {train_samples} samples: too few for {processes} process(es) of "
                            f"batch {config.batch_size}; lower the batch size{fewer}")
        steps_per_epoch = train_samples // processes // config.batch_size
    skipped: list[str] = []     # damaged newer checkpoints, as the run will say it skips them
    if resume_from is _READ:
        resume_from = rundir.resume_point(config.output_dir, config.resume, skipped.append, repair=False)[1] \
            if config.resume and manifest is not None else None
    precision = resolve_precision(config.mixed_precision, device)
    plan = Plan(config=config, processes=processes, device=device, precision=precision,
                channels_last=device == "cuda" if config.channels_last is None else config.channels_last,
                shards=folder, manifest=manifest, base_lr=base_learning_rate(config, processes),
                steps_per_epoch=steps_per_epoch, resume_from=resume_from, start_step=0,
                notes=(*skipped, *_notes(config, device, manifest, processes)), shards_url=url,
                manifest_sha256=digest, staging=staging)
    if resume_from is None or manifest is None:
        return plan
    saved = checkpoints.read_state(resume_from)
    accepted = checkpoints.check_resume(saved["run"], plan.record, checkpoints.parse_accept(config.accept_changes))
    start, total = resume_position(saved, steps_per_epoch, plan.record), config.epochs * steps_per_epoch
    if start > total:   # fewer epochs accepted than the checkpoint has trained: its weights are past the end
        raise UserError(f"{resume_from} is at step {start}, past the end of a run of {count(config.epochs, 'epoch')} "
                        f"({total} steps); give --epochs {-(-start // steps_per_epoch)} or more to continue it")
    return Plan(**{**plan.__dict__, "start_step": start, "accepted": tuple(accepted)})


def _notes(config: Config, device: str, manifest: dict | None, processes: int) -> tuple[str, ...]:
    """Warnings of the plan: a --w or --t the method does not use, the recipe's batch on each of several
    processes, a warm-up as long as the run, a bank smaller than a step's batch or larger than the training split,
    a test split too small for some Recall@K, a single coarse class, GPUs that CUDA cannot use."""
    notes = list(_unused_by_the_method(config))
    recipe_batch = preset(config.dataset, config.method).get("batch_size", Config.batch_size)
    if processes > 1 and config.batch_size == recipe_batch:
        notes.append(f"{processes} processes x batch {recipe_batch} = global batch {config.global_batch}, "
                     f"{processes} times the recipe's {recipe_batch} (the learning rate scales with it, and the "
                     f"report counts the run apart from the recipe's); --global-batch {recipe_batch} keeps the recipe")
    train_samples, test_samples = (None, None) if manifest is None else (
        manifest["splits"][split]["num_samples"] for split in ("train", "test"))
    whole = None if test_samples is None else whole_split_note(test_samples)
    if whole:
        notes.append(whole)
    if config.warmup_epochs >= config.epochs:
        than = "as long as" if config.warmup_epochs == config.epochs else "longer than"
        warmup, run = (count(number, "epoch") for number in (config.warmup_epochs, config.epochs))
        notes.append(f"the warm-up ({warmup}) is {than} the run ({run}): the learning rate never reaches its base; "
                     f"lower --warmup-epochs")
    if config.queue_size < config.global_batch:
        notes.append(f"the memory bank (--queue-size {config.queue_size}) holds fewer keys than one step enqueues "
                     f"(global batch {config.global_batch}): each step replaces it whole, so the bank is the last "
                     f"{config.queue_size} keys of the step before; use --queue-size {config.global_batch} or more")
    if train_samples is not None and config.queue_size > train_samples:
        notes.append(f"the memory bank (--queue-size {config.queue_size}) holds more keys than the train split has "
                     f"images ({train_samples}): filling it passes over them {-(-config.queue_size // train_samples)} "
                     f"times and each stands in it as several negatives; use --queue-size {train_samples} or less")
    if manifest is not None and len(manifest["coarse_classes"]) == 1 and len(manifest["fine_classes"]) > 1:
        notes.append(f"the shards put all {len(manifest['fine_classes'])} fine classes in one coarse class "
                     f"({manifest['coarse_classes'][0]!r}): the coarse labels tell the samples nothing apart; check "
                     f"the coarse map the shards were made from")
    unusable = unusable_gpus() if device == "cpu" else 0
    if unusable:
        notes.append(f"nvidia-smi lists {unusable} GPU(s) that CUDA cannot use (a driver older than this PyTorch's "
                     f"CUDA {torch.version.cuda}?): the run computes on the CPU")
    return tuple(notes)


def _unused_by_the_method(config: Config) -> list[str]:
    """A w or t (from --w, --t or --config) set away from the recipe's value for a method whose objective does
    not read it."""
    recipe, method = preset(config.dataset, config.method), METHODS[config.method]
    notes = []
    for name in ("w", "t"):
        value = getattr(config, name)
        if not method.reads(name) and value != recipe.get(name, getattr(Config, name)):
            *others, last = [other.name for other in METHODS.values() if other.reads(name)]
            users = f"{', '.join(others)} and {last} use" if others else f"{last} uses"
            notes.append(f"{name} = {value:g} (from --{name} or --config) has no effect with --method {config.method}: "
                         f"only {users} {name}")
    return notes


def unusable_gpus() -> int:
    """How many GPUs nvidia-smi lists while CUDA sees none (0 when CUDA sees one, or without nvidia-smi)."""
    if torch.cuda.is_available():
        return 0
    return sum(line.startswith("GPU ") for line in nvidia_smi("-L") or [])


def check_dataset(config: Config, manifest: dict, where) -> None:
    """The shards at WHERE (a folder or a URL) are of the run's --dataset (any, for --dataset folder)."""
    if manifest["dataset"] != config.dataset and config.dataset != "folder":
        raise UserError(f"{where} holds shards of {manifest['dataset']!r}, not {config.dataset!r}; pass --dataset "
                        f"{manifest['dataset']} to train on them, or --shards with shards of {config.dataset}")


def _manifest(config: Config, folder: Path) -> dict:
    """The shards' manifest after checking every split by size and index."""
    manifest = read_manifest(folder, config.dataset)
    check_dataset(config, manifest, folder)
    for split in ("train", "test"):
        check_split(folder, split, manifest)
    return manifest


def resume_position(state: dict, steps_per_epoch: int, record: dict) -> int:
    """The step to continue from. With the same processes and batch (the default) it is the checkpoint's
    step; an accepted change of either continues at the same fraction of the same epoch."""
    if state["run"]["world_size"] == record["world_size"] and state["run"]["batch_size"] == record["batch_size"]:
        return state["step"]
    old_steps_per_epoch = state["steps_per_epoch"]
    epoch, position = divmod(state["step"], old_steps_per_epoch)
    return epoch * steps_per_epoch + position * steps_per_epoch // old_steps_per_epoch


def lr_schedule(*, base_lr: float, total_steps: int, warmup_steps: int) -> list[float]:
    """Per-step learning rates: linear warm-up to base_lr, then cosine annealing to 0."""
    rates = []
    for step in range(total_steps):
        if step < warmup_steps:
            rates.append(base_lr * (step + 1) / warmup_steps)
        else:
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            rates.append(base_lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return rates

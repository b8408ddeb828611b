"""Building a run: the one place that decides the parts of a run from its `Config`.

`build_run(config, accelerator)` settles the device (seeds, cudnn, CPU threads, precision, channels-last),
the run folder and its resume point, the shards and both loaders, the learner and its optimizer (prepared by
Accelerate), the learning-rate schedule, the training step's parts and the metrics tracker. The training loop
(`maskcon/train.py`), `python launch/bench.py train` and the tests all build their runs here, so what they
measure or check is what the trainer runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from maskcon import checkpoints, dist, failures, rundir, shards
from maskcon.config import Config, shards_dir, to_dict
from maskcon.errors import AgreedError, UserError
from maskcon.loaders import build_test_loader, build_train_loader
from maskcon.methods import method_for
from maskcon.model import MaskConModel, fetch_pretrained
from maskcon.provenance import provenance
from maskcon.shard_format import read_manifest
from maskcon.step import StepParts, build_step, make_optimizer


@dataclass
class Run:
    """Everything the loop works with; built by `build_run`.

    model: the learner as the optimizer sees it (DDP-wrapped on several processes); learner: the same learner
    unwrapped; step_fn: batch -> loss, eager or the whole step compiled (--compile, maskcon.step.build_step);
    schedule: the learning rate of every step (total_steps floats); step: the step the loop starts
    from (0, or the resume point); tracker: the metrics writer on the main process (None elsewhere).
    """

    config: Config
    accelerator: Accelerator
    output_dir: Path
    folder: Path                 # the shard folder
    manifest: dict
    record: dict                 # what a checkpoint records of the run (checkpoints.run_record)
    resolved: dict               # the config as run: precision and channels-last settled
    train_loader: object
    test_loader: object
    model: torch.nn.Module
    learner: MaskConModel
    optimizer: torch.optim.Optimizer
    parts: StepParts
    step_fn: Callable[[dict], torch.Tensor]   # the step the loop calls (maskcon.step.build_step)
    base_lr: float
    schedule: list[float]
    channels_last: bool
    steps_per_epoch: int
    total_steps: int
    step: int
    resumed_from: Path | None
    tracker: object | None

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes


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


def base_learning_rate(config: Config, num_processes: int) -> float:
    """--lr for a global batch of --lr-reference-batch, scaled linearly to the real global batch
    (batch x processes) unless --no-scale-lr."""
    global_batch = config.batch_size * num_processes
    return config.lr * (global_batch / config.lr_reference_batch if config.scale_lr else 1.0)


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """--mixed-precision when given; else what `accelerate launch --mixed_precision` asked for (fp16, bf16);
    else bf16 on a GPU (fp16 where bf16 is not supported) and fp32 on the CPU."""
    if requested is not None:
        return requested
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def make_accelerator(config: Config, device: str | None = None) -> Accelerator:
    """The run's Accelerator on `device` ("cpu" | "cuda"; default: cuda when available), with the precision
    of `resolve_precision`."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No buffer broadcast every step: the gathered enqueue keeps the banks identical, and the batch-norm
    # statistics are averaged over processes before evaluation and checkpoints.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(minutes=config.dist_timeout))]
    return Accelerator(cpu=chosen.type == "cpu", mixed_precision=resolve_precision(config.mixed_precision, chosen),
                       kwargs_handlers=handlers)


def settle_device(config: Config, accelerator: Accelerator) -> bool:
    """Seeds, cudnn autotuning on a GPU, CPU threads per process on the CPU; returns channels_last."""
    set_seed(config.seed, device_specific=True)
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    else:
        # processes on one CPU share its cores; more threads than cores makes every process wait
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    return on_gpu if config.channels_last is None else config.channels_last


def prepare_shards(config: Config) -> tuple[Path, dict]:
    """The shard folder and its manifest; the bundled digits are written on first use, by the main process
    (a shared file system is assumed), while the others wait for its verdict."""
    folder = shards_dir(config)

    def make_if_missing() -> None:
        if (folder / "manifest.json").exists():
            return
        if config.dataset != "digits":
            raise UserError(f"no shards in {folder}; make them with: python launch/make_shards.py create "
                            f"{config.dataset} --src SRC --out {folder}")
        shards.create("digits", None, folder)

    failures.run_on_main(make_if_missing)
    manifest = read_manifest(folder)
    if manifest["dataset"] != config.dataset and config.dataset != "folder":
        raise UserError(f"{folder} holds shards of {manifest['dataset']!r}, not {config.dataset!r}; "
                        f"pass --shards for the right folder")
    return folder, manifest


def build_model(config: Config, num_coarse: int | None) -> MaskConModel:
    """The learner of the config (on the CPU, in the default memory format); num_coarse: classifier width
    (None: no classifier)."""
    return MaskConModel(arch=config.arch, image_size=config.image_size, proj_hidden=config.proj_hidden,
                        proj_dim=config.proj_dim, num_coarse=num_coarse, queue_size=config.queue_size,
                        momentum=config.key_momentum, pretrained=config.pretrained)


def build_learner(config: Config, accelerator: Accelerator, manifest: dict, channels_last: bool, base_lr: float):
    """(model as prepared by Accelerate, unwrapped learner, optimizer) on the accelerator's device."""
    method = method_for(config.method)
    if config.pretrained is not None and accelerator.num_processes > 1:
        failures.run_on_main(fetch_pretrained, config.arch, config.pretrained)   # downloaded once, then read by all
    model = build_model(config, len(manifest["coarse_classes"]) if method.classifier else None)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)
    optimizer = make_optimizer(model, lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, accelerator.unwrap_model(model), optimizer


def build_loaders(config: Config, accelerator: Accelerator, folder: Path, channels_last: bool = False):
    """(train loader, test loader) of this process; views in the channels-last memory format when asked."""
    common = dict(image_size=config.image_size, rank=accelerator.process_index,
                  world_size=accelerator.num_processes, device=accelerator.device, backend=config.loader,
                  channels_last=channels_last)
    train_loader = build_train_loader(folder, recipe=config.dataset, batch_size=config.batch_size, seed=config.seed,
                                      query_view=config.query_view, key_view=config.key_view,
                                      num_threads=config.loader_threads, **common)
    return train_loader, build_test_loader(folder, batch_size=config.eval_batch_size, **common)


def _saved_state(config: Config, accelerator: Accelerator, resumed_from: Path | None,
                 record: dict) -> dict:
    """The state of the checkpoint to resume from, after checking the run's options against it; {} for a
    fresh start."""
    if resumed_from is None:
        return {}
    saved = checkpoints.read_state(resumed_from)
    try:
        accepted = checkpoints.check_resume(saved["run"], record, checkpoints.parse_accept(config.accept_changes))
    except UserError as error:  # every process compares the same two records
        raise AgreedError(str(error)) from None
    for change in accepted:
        accelerator.print(f"--resume: continuing with a changed {change}; the learning-rate schedule is "
                          f"recomputed for this run")
    return saved


def resume_position(state: dict, steps_per_epoch: int, record: dict) -> int:
    """The step to continue from. With the same processes and batch (the default) it is the checkpoint's
    step; an accepted change of either continues at the same fraction of the same epoch."""
    if state["run"]["world_size"] == record["world_size"] and state["run"]["batch_size"] == record["batch_size"]:
        return state["step"]
    old_steps_per_epoch = state["steps_per_epoch"]
    epoch, position = divmod(state["step"], old_steps_per_epoch)
    return epoch * steps_per_epoch + position * steps_per_epoch // old_steps_per_epoch


def _start_tracker(config: Config, run: Run):
    from maskcon.tracking import Tracker

    extra = {"base_lr": run.base_lr, "global_batch": run.global_batch, "world_size": run.accelerator.num_processes}
    return Tracker(run.output_dir, config={**run.resolved, **extra}, wandb_mode=config.wandb,
                   project=config.wandb_project, name=config.run_name or run.output_dir.name,
                   resume=run.resumed_from is not None, resume_step=run.step)


def build_run(config: Config, accelerator: Accelerator) -> Run:
    """The run of `config` on `accelerator`: every process calls it at the same point."""
    channels_last = settle_device(config, accelerator)
    resolved = {**to_dict(config), "mixed_precision": accelerator.mixed_precision, "channels_last": channels_last,
                "num_processes": accelerator.num_processes,
                "base_lr": base_learning_rate(config, accelerator.num_processes), "provenance": provenance()}
    claimed = rundir.claim_everywhere(config.output_dir, config.resume, dataset=config.dataset,
                                      method=config.method, log=accelerator.print)
    output_dir, resumed_from = claimed.path, claimed.resume_from
    folder, manifest = prepare_shards(config)
    record = checkpoints.run_record(config, world_size=accelerator.num_processes, manifest=manifest,
                                    mixed_precision=accelerator.mixed_precision)
    saved = _saved_state(config, accelerator, resumed_from, record)
    train_loader, test_loader = build_loaders(config, accelerator, folder, channels_last)
    steps_per_epoch = len(train_loader)

    def write_config() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    failures.run_on_main(write_config)
    base_lr = base_learning_rate(config, accelerator.num_processes)
    model, learner, optimizer = build_learner(config, accelerator, manifest, channels_last, base_lr)
    total_steps = steps_per_epoch * config.epochs
    schedule = lr_schedule(base_lr=base_lr, total_steps=total_steps,
                           warmup_steps=round(config.warmup_epochs * steps_per_epoch))
    parts = StepParts(model=model, learner=learner, optimizer=optimizer, method=method_for(config.method),
                      t0=config.t0, t=config.t, w=config.w, autocast=accelerator.autocast,
                      backward=accelerator.backward, channels_last=channels_last)
    step = 0
    if resumed_from is not None:
        checkpoints.load(accelerator, resumed_from)
        checkpoints.copy_into(dist.running_statistics(learner), checkpoints.own_tensors(
            resumed_from, accelerator.process_index, accelerator.num_processes))
        step = resume_position(saved, steps_per_epoch, record)
        accelerator.print(f"resumed from {resumed_from} at step {step}")
    run = Run(config=config, accelerator=accelerator, output_dir=output_dir, folder=folder, manifest=manifest,
              record=record, resolved=resolved, train_loader=train_loader, test_loader=test_loader, model=model,
              learner=learner, optimizer=optimizer, parts=parts,
              step_fn=build_step(parts, compile_mode=(config.compile_mode or "default") if config.compile else None),
              base_lr=base_lr, schedule=schedule,
              channels_last=channels_last, steps_per_epoch=steps_per_epoch, total_steps=total_steps, step=step,
              resumed_from=resumed_from, tracker=None)
    run.tracker = failures.run_on_main(_start_tracker, config, run)
    return run

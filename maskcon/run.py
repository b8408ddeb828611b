"""Building a run: the one place that makes the parts of a run, following its plan (`maskcon.plan`).

`build_run(config, accelerator)` settles the device (seeds, cudnn, CPU threads), claims the run folder, writes
the bundled digits' shards when missing, makes the run's plan with `maskcon.plan.plan_run` (the function
`--check` prints), and carries it out: both loaders, the learner and its optimizer (prepared by Accelerate),
the learning-rate schedule, the resume, the training step's parts and the metrics tracker. The training loop
(`maskcon/train.py`), `python launch/bench.py train` and the tests all build their runs here, so what they
measure or check is what the trainer runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

from maskcon import checkpoints, dist, failures, remote, rundir, shards, stopping, usable_cpus
from maskcon.config import Config, shards_dir
from maskcon.errors import AgreedError, UserError
from maskcon.loaders import LoaderSpec, build_test_loader, build_train_loader
from maskcon.methods import method_for
from maskcon.model import MaskConModel, fetch_pretrained
from maskcon.plan import Plan, check_dataset, lr_schedule, plan_run, resolve_precision
from maskcon.shard_format import check_folder_for_digits, read_manifest
from maskcon.step import StepParts, build_step, make_optimizer


@dataclass(frozen=True)
class LoopSettings:
    """What the training loop reads of the options (the loop gets this section, not the whole configuration):
    the steps' batch and image size per process, the run's length (--epochs, --max-steps), when it logs,
    evaluates and saves, and what it announces."""

    method: str
    dataset: str
    batch_size: int
    image_size: int
    epochs: int
    max_steps: int | None
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    eval_untrained: bool

    @classmethod
    def of(cls, config: Config) -> LoopSettings:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


@dataclass
class Run:
    """Everything the loop works with; built by `build_run`.

    model: the learner as the optimizer sees it (DDP-wrapped on several processes); learner: the same learner
    unwrapped; step_fn: (batch, step number) -> loss, eager or the whole step compiled (--compile, maskcon.step.build_step);
    schedule: the learning rate of every step (total_steps floats); step: the step the loop starts
    from (0, or the resume point); tracker: the metrics writer on the main process (None elsewhere).
    """

    loop: LoopSettings
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
    step_fn: Callable[[dict, int], torch.Tensor]   # the step the loop calls (maskcon.step.build_step)
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
        return self.output_dir / rundir.CHECKPOINTS

    @property
    def global_batch(self) -> int:
        return self.loop.batch_size * self.accelerator.num_processes


def make_accelerator(config: Config, device: str | None = None) -> Accelerator:
    """The run's Accelerator on `device` ("cpu" | "cuda"; default: cuda when available), with the precision
    of `resolve_precision`."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # No buffer broadcast every step: the gathered enqueue keeps the banks identical, and the batch-norm
    # statistics are averaged over processes before evaluation and checkpoints.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(minutes=config.dist_timeout))]
    return Accelerator(cpu=chosen.type == "cpu",
                       mixed_precision=resolve_precision(config.mixed_precision, chosen.type), kwargs_handlers=handlers)


def settle_device(config: Config, accelerator: Accelerator) -> None:
    """Seeds, cudnn autotuning on a GPU, CPU threads per process on the CPU."""
    set_seed(config.seed, device_specific=True)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        # processes on one CPU share its cores; more threads than cores makes every process wait
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(max(1, usable_cpus() // local_processes))


def prepare_shards(config: Config, accelerator: Accelerator | None = None) -> Path:
    """The local shard folder of the run. A remote --shards URL is staged into the node's shard cache by
    every process (maskcon.remote.stage: one per node downloads, the others wait on the cache's lock); the
    bundled digits' shards are written on first use, on the main process (a shared file system is assumed),
    while the others wait for its verdict; other datasets' shards are made by make_shards."""
    folder = shards_dir(config)
    if remote.is_url(config.shards):
        def stage() -> Path:
            try:
                # whichever process of the node downloads shows the bar and its lines; the local main process
                # says when it waits for another; a remote folder of another dataset is refused before
                limit = remote.parse_size(config.shard_cache_limit)
                return remote.stage(config.shards, config.shard_cache, limit=limit, show_progress=True, log=print,
                                    announce_wait=accelerator is None or accelerator.is_local_main_process,
                                    check=lambda manifest: check_dataset(config, manifest, config.shards))
            except UserError as error:   # every process reads the same folder: the main process speaks
                raise AgreedError(str(error)) from None

        return failures.run_everywhere(stage)

    def make_if_missing() -> None:
        if (folder / "manifest.json").exists():
            return
        if config.dataset != "digits":
            read_manifest(folder, config.dataset)     # the line the plan says too: how to make them
        check_folder_for_digits(folder)               # as the plan says: never into a folder of the user's own
        print(f"writing the bundled digits' shards to {folder} (once: later runs read them)", flush=True)
        shards.create("digits", None, folder)

    failures.run_on_main(make_if_missing)
    return folder


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
    with warnings.catch_warnings():   # PyTorch 2.14 renames DDP's broadcast_buffers; 2.11 knows only that name
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, accelerator.unwrap_model(model), optimizer


def build_loaders(config: Config, accelerator: Accelerator, folder: Path, channels_last: bool = False):
    """(train loader, test loader) of this process, from one loader spec: the recipe of the run's --dataset
    (one normalisation for training and evaluation, whatever dataset the shards' manifest names), its
    --loader-threads and memory format; the test loader with the evaluation batch."""
    spec = LoaderSpec(recipe=config.dataset, image_size=config.image_size, batch_size=config.batch_size,
                      rank=accelerator.process_index, world_size=accelerator.num_processes,
                      device=accelerator.device, backend=config.loader, seed=config.seed,
                      num_threads=config.loader_threads, channels_last=channels_last, query_view=config.query_view,
                      key_view=config.key_view)
    return build_train_loader(folder, spec), build_test_loader(folder, spec.replace(batch_size=config.eval_batch_size))


def _start_tracker(config: Config, run: Run):
    from maskcon.tracking import Tracker

    return Tracker(run.output_dir, config=run.resolved, wandb_mode=config.wandb, project=config.wandb_project,
                   name=config.run_name or run.output_dir.name, resume=run.resumed_from is not None,
                   resume_step=run.step)


def planned(config: Config, accelerator: Accelerator, resume_from: Path | None, staged: Path | None = None) -> Plan:
    """The run's plan (maskcon.plan.plan_run), as every process makes it alike: a refusal is said once."""
    try:
        plan = plan_run(config, accelerator.num_processes, device=accelerator.device.type, resume_from=resume_from,
                        staged=staged)
    except UserError as error:   # every process reads the same shards and checkpoint
        raise AgreedError(str(error)) from None
    for change in plan.accepted:
        accelerator.print(f"--resume: continuing with a changed {change}; the learning-rate schedule is "
                          f"recomputed for this run")
    for note in plan.notes:
        accelerator.print(f"warning: {note}")
    return plan


def build_run(config: Config, accelerator: Accelerator) -> Run:
    """The run of `config` on `accelerator`: every process calls it at the same point. It claims the run
    folder, writes the bundled digits' shards when missing, plans (`planned`) and carries the plan out."""
    settle_device(config, accelerator)
    # the folders this start makes, when it is fresh: the missing part of --output-dir, or runs/ and its new folder
    top = rundir.missing_top(Path(config.output_dir) if config.output_dir else
                             rundir.default_base(config.dataset, config.method).parent)
    alone = top or config.output_dir is None or not rundir.run_files(Path(config.output_dir))   # no other run's file
    claimed = rundir.claim_everywhere(config.output_dir, config.resume, dataset=config.dataset,
                                      method=config.method, log=accelerator.print)
    try:
        return _build_claimed(config, accelerator, claimed)
    except BaseException:     # bad input found while building: a fresh start leaves no half-made folder
        if claimed.resume_from is None and alone and accelerator.is_main_process:
            rundir.abandon_start(claimed.path, top or (claimed.path if config.output_dir is None else None))
        raise


def _build_claimed(config: Config, accelerator: Accelerator, claimed: rundir.RunFolder) -> Run:
    folder = prepare_shards(config, accelerator)
    plan = planned(config, accelerator, claimed.resume_from, folder)
    train_loader, test_loader = build_loaders(config, accelerator, plan.shards, plan.channels_last)
    resolved = plan.resolved()

    def write_config() -> None:
        claimed.path.mkdir(parents=True, exist_ok=True)
        (claimed.path / rundir.CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))

    failures.run_on_main(write_config)
    model, learner, optimizer = build_learner(config, accelerator, plan.manifest, plan.channels_last, plan.base_lr)
    parts = StepParts(model=model, learner=learner, optimizer=optimizer, method=method_for(config.method),
                      t0=config.t0, t=config.t, w=config.w, autocast=accelerator.autocast,
                      backward=accelerator.backward, seed=config.seed)
    if plan.resume_from is not None:
        checkpoints.load(accelerator, plan.resume_from)
        checkpoints.copy_into(dist.running_statistics(learner), checkpoints.own_tensors(
            plan.resume_from, accelerator.process_index, accelerator.num_processes))
    run = Run(loop=LoopSettings.of(config), accelerator=accelerator, output_dir=claimed.path, folder=plan.shards,
              manifest=plan.manifest, record=plan.record, resolved=resolved, train_loader=train_loader,
              test_loader=test_loader, model=model, learner=learner, optimizer=optimizer, parts=parts,
              step_fn=build_step(parts, compile_mode=(config.compile_mode or "default") if config.compile else None),
              base_lr=plan.base_lr, schedule=lr_schedule(base_lr=plan.base_lr, total_steps=plan.total_steps,
                                                         warmup_steps=plan.warmup_steps),
              channels_last=plan.channels_last, steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps,
              step=plan.start_step, resumed_from=plan.resume_from, tracker=None)
    _stop_before_training(plan.resume_from)
    run.tracker = failures.run_on_main(_start_tracker, config, run)
    if plan.resume_from is not None:    # once the console is logged: console.log says it too
        accelerator.print(f"resumed from {plan.resume_from} at step {plan.start_step}")
    return run


def _stop_before_training(resume_from: Path | None) -> None:
    """A stop signal while the run was built (shards staged, loaders and learner made) ends it here, before the
    untrained evaluation and the bank fill: nothing to save yet. Every process calls it at the same point; from
    here on a stop ends with a checkpoint (and the first signal's notice says so)."""
    request = stopping.REQUEST
    request.checkpointing = True
    if failures.agree_to_stop(sigterm=request.requested).sigterm:
        then = "" if resume_from is None else f"; --resume continues from {resume_from} as before"
        raise stopping.Stopped(f"stopped by {request.reason or 'a stop request to another process'} before training "
                               f"began; nothing was written{then}")

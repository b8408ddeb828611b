"""The training loop: schedule, steps, evaluation, logging, checkpoints.

The step itself is `maskcon.step.train_step`. The loop reads nothing from the device between logging
points: every --log-every steps it reads the loss and all processes agree, in one small all-reduce
(`dist.agree_to_stop`), on whether to stop (SIGTERM seen, loss not finite), so they stop together.
Sections that run on the main process alone (W&B, metrics, pictures, results) tell the others whether
they succeeded (`dist.run_on_main`).

Exact resume: a loader epoch's batches depend only on (seed, rank, processes, epoch) (`set_epoch`), the
memory bank is filled from epochs of its own, and a checkpoint holds the learner, the bank, the optimizer,
the RNG states and the step, so a run stopped anywhere and resumed ends with the weights of a run that was
never stopped.
"""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from maskcon import checkpoints, dist, shards
from maskcon.backbone import backbone_metadata, save_backbone
from maskcon.config import Config, shards_dir, to_dict
from maskcon.errors import AgreedError, UserError
from maskcon.loaders import build_test_loader, build_train_loader
from maskcon.methods import method_for
from maskcon.model import MaskConModel, fetch_pretrained
from maskcon.provenance import provenance
from maskcon.retrieval import RECALL_KS, recall_at_k
from maskcon.shard_format import read_manifest
from maskcon.step import StepParts, make_optimizer, set_lr, train_step

BANK_FILL_EPOCH = -1  # the loader epoch whose keys fill the memory bank before the first step (then -2, ...)


@dataclass
class RunResult:
    output_dir: Path
    step: int
    metrics: dict  # the last evaluation's R@K
    stopped: str  # "finished" | "preempted" | "max_steps"
    untrained: dict  # R@K of the network before training, when --eval-untrained


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


def default_output_dir(config: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{config.dataset}-{config.method}-{stamp}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


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

    dist.run_on_main(make_if_missing)
    manifest = read_manifest(folder)
    if manifest["dataset"] != config.dataset and config.dataset != "folder":
        raise UserError(f"{folder} holds shards of {manifest['dataset']!r}, not {config.dataset!r}; "
                        f"pass --shards for the right folder")
    return folder, manifest


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def extract_features(model: MaskConModel, loader, accelerator: Accelerator, channels_last: bool) -> dict | None:
    """Backbone features of every test image, ordered by index, on the main process (None elsewhere)."""
    was_training = model.training
    model.eval()
    parts = {"features": [], "fine": [], "coarse": [], "index": []}
    for batch in loader:
        images = batch["image"]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            features = model.features(images)
        parts["features"].append(features.float())
        for name in ("fine", "coarse", "index"):
            parts[name].append(batch[name].long())
    model.train(was_training)
    gathered = {name: dist.gather_to_main(torch.cat(values)) for name, values in parts.items()}
    if not accelerator.is_main_process:
        return None
    order = gathered["index"].argsort()
    return {name: values[order] for name, values in gathered.items()}


# ------------------------------------------------------------------------------------------------ loop


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next point where the processes agree."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _accelerator(config: Config) -> Accelerator:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # No buffer broadcast every step: the gathered enqueue keeps the banks identical, and the batch-norm
    # statistics are averaged over processes before evaluation and checkpoints.
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(minutes=config.dist_timeout))]
    return Accelerator(cpu=device.type == "cpu", mixed_precision=resolve_precision(config.mixed_precision, device),
                       kwargs_handlers=handlers)


def _resume_position(state: dict, steps_per_epoch: int, run: dict) -> int:
    """The step to continue from. With the same processes and batch (the default) it is the checkpoint's
    step; an accepted change of either continues at the same fraction of the same epoch."""
    if state["run"]["world_size"] == run["world_size"] and state["run"]["batch_size"] == run["batch_size"]:
        return state["step"]
    old_steps_per_epoch = state["steps_per_epoch"]
    epoch, position = divmod(state["step"], old_steps_per_epoch)
    return epoch * steps_per_epoch + position * steps_per_epoch // old_steps_per_epoch


def train(config: Config) -> RunResult:
    accelerator = _accelerator(config)
    preemption = _Preemption()   # from the start: a SIGTERM during set-up, evaluation or the bank fill counts too
    try:
        return _train(config, accelerator, preemption)
    finally:
        preemption.restore()


def _train(config: Config, accelerator: Accelerator, preemption: _Preemption) -> RunResult:
    set_seed(config.seed, device_specific=True)
    on_gpu = accelerator.device.type == "cuda"
    channels_last = on_gpu if config.channels_last is None else config.channels_last
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    else:
        # processes on one CPU share its cores; more threads than cores makes every process wait
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    main = accelerator.is_main_process
    method = method_for(config.method)
    resolved = {**to_dict(config), "mixed_precision": accelerator.mixed_precision, "channels_last": channels_last,
                "num_processes": accelerator.num_processes, "base_lr": base_learning_rate(config, accelerator.num_processes),
                "provenance": provenance()}

    # --- where the run writes (decided once, on the main process) ---
    chosen = [str(Path(config.output_dir)) if config.output_dir else str(default_output_dir(config))]
    broadcast_object_list(chosen)
    output_dir = Path(chosen[0])
    checkpoint_root = output_dir / "checkpoints"
    resume_from = None
    if config.resume:
        resume_from = checkpoints.resume_point(accelerator, checkpoint_root, accelerator.print)
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint in {checkpoint_root}; start without --resume")

    # --- data ---
    folder, manifest = prepare_shards(config)
    run = checkpoints.run_record(config, world_size=accelerator.num_processes, manifest=manifest,
                                 mixed_precision=accelerator.mixed_precision)
    saved = checkpoints.read_state(resume_from) if resume_from else None
    if saved:
        try:
            accepted = checkpoints.check_resume(saved["run"], run, checkpoints.parse_accept(config.accept_changes))
        except UserError as error:  # every process compares the same two records
            raise AgreedError(str(error)) from None
        for change in accepted:
            accelerator.print(f"--resume: continuing with a changed {change}; the learning-rate schedule is "
                              f"recomputed for this run")
    loader_args = dict(image_size=config.image_size, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, device=accelerator.device, backend=config.loader)
    train_loader = build_train_loader(folder, recipe=config.dataset, batch_size=config.batch_size,
                                      seed=config.seed, query_view=config.query_view, key_view=config.key_view,
                                      num_threads=config.loader_threads, **loader_args)
    test_loader = build_test_loader(folder, batch_size=config.eval_batch_size, **loader_args)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * config.epochs
    global_batch = config.batch_size * accelerator.num_processes

    def write_config() -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    dist.run_on_main(write_config)

    # --- learner ---
    if config.pretrained is not None and accelerator.num_processes > 1:
        dist.run_on_main(fetch_pretrained, config.arch, config.pretrained)   # downloaded once, then read by all
    model = MaskConModel(arch=config.arch, image_size=config.image_size, proj_hidden=config.proj_hidden,
                         proj_dim=config.proj_dim, num_coarse=len(manifest["coarse_classes"]) if method.classifier
                         else None, queue_size=config.queue_size, momentum=config.key_momentum,
                         pretrained=config.pretrained)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)
    if config.compile:
        model.compile_encoders(mode=config.compile_mode)
    base_lr = base_learning_rate(config, accelerator.num_processes)
    optimizer = make_optimizer(model, lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               device=accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    learner: MaskConModel = accelerator.unwrap_model(model)
    schedule = lr_schedule(base_lr=base_lr, total_steps=total_steps,
                           warmup_steps=round(config.warmup_epochs * steps_per_epoch))
    parts = StepParts(model=model, learner=learner, optimizer=optimizer, method=method, t0=config.t0, t=config.t,
                      w=config.w, autocast=accelerator.autocast, backward=accelerator.backward,
                      channels_last=channels_last)

    step = 0
    if resume_from is not None:
        checkpoints.load(accelerator, resume_from)
        step = _resume_position(saved, steps_per_epoch, run)
        accelerator.print(f"resumed from {resume_from} at step {step}")

    def start_tracker():
        from maskcon.tracking import Tracker

        tracker = Tracker(output_dir, config={**resolved, "base_lr": base_lr, "global_batch": global_batch,
                                              "world_size": accelerator.num_processes},
                          wandb_mode=config.wandb, project=config.wandb_project,
                          name=config.run_name or output_dir.name, resume=resume_from is not None, resume_step=step)
        print(f"training {config.method} on {config.dataset}: {manifest['splits']['train']['num_samples']} images, "
              f"{accelerator.num_processes} process(es) x batch {config.batch_size}, {steps_per_epoch} steps/epoch, "
              f"{config.epochs} epochs, lr {base_lr:g}, precision {accelerator.mixed_precision}; writing to "
              f"{output_dir}", flush=True)
        return tracker

    tracker = dist.run_on_main(start_tracker)
    stopped = "finished"

    def evaluate(epoch: int) -> dict:
        dist.average_buffers(learner)
        table = extract_features(learner, test_loader, accelerator, channels_last)

        def report() -> dict:
            metrics = recall_at_k(table["features"], table["fine"], RECALL_KS)
            tracker.log({"step": step, "epoch": epoch, **metrics})
            _log_pictures(tracker, step, table, folder, final=epoch >= config.epochs or stopped == "max_steps")
            label = "untrained network" if step == 0 else f"epoch {epoch} step {step}"
            print(f"{label}: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
            return metrics

        return dist.run_on_main(report) or {}

    def save(epoch: int) -> None:
        dist.average_buffers(learner)
        checkpoints.save(accelerator, checkpoint_root, step=step, epoch=epoch, keep=config.keep_checkpoints,
                         extra_state={"run": run, "steps_per_epoch": steps_per_epoch})

    def preempted(epoch: int) -> bool:
        """At a point where the processes agree: checkpoint and stop when any of them saw SIGTERM."""
        if not dist.agree_to_stop(sigterm=preemption.requested).sigterm:
            return False
        save(epoch)
        accelerator.print(f"stopped by SIGTERM at step {step}; checkpoint saved, continue with --resume")
        return True

    untrained: dict = {}
    if step == 0:
        if config.eval_untrained:
            untrained = {f"untrained_{k}": v for k, v in evaluate(0).items()}
        fill_memory_bank(learner, train_loader, channels_last)
        if preempted(0):
            stopped = "preempted"

    metrics: dict = {}
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    last_log = time.perf_counter()
    wait_time = 0.0
    images_since_log = 0
    loss_sum = torch.zeros((), device=accelerator.device)    # losses since the last logging point
    start_epoch = step // steps_per_epoch if stopped == "finished" else config.epochs
    try:
        for epoch in range(start_epoch, config.epochs):
            skip = step - epoch * steps_per_epoch  # batches of this epoch trained before a resume
            train_loader.set_epoch(epoch)
            batches = iter(train_loader)
            for position in range(steps_per_epoch):
                fetch_start = time.perf_counter()
                try:
                    batch = next(batches)
                except UserError as error:   # a sample that does not decode: name the checkpoint to resume from
                    raise UserError(f"{error}; {_last_good(checkpoint_root)}") from None
                wait_time += time.perf_counter() - fetch_start
                if position < skip:
                    continue
                set_lr(optimizer, schedule[step])
                dist.reseed_shuffle(config.seed * 2**32 + step)   # shuffle-BN as a function of the step
                loss = train_step(parts, batch)
                loss_sum += loss
                images_since_log += global_batch
                step += 1
                at_max = config.max_steps is not None and step >= config.max_steps
                if step % config.log_every == 0 or position == steps_per_epoch - 1 or at_max:
                    agreement = dist.agree_to_stop(sigterm=preemption.requested, loss=loss_sum)
                    if agreement.loss_not_finite:
                        raise AgreedError(f"the loss stopped being finite by step {step} (epoch {epoch}); "
                                        f"{_last_good(checkpoint_root)}; try a lower --lr or --mixed-precision bf16")
                    now = time.perf_counter()
                    loss_value = loss.item()
                    row = {"step": step, "epoch": epoch + (position + 1) / steps_per_epoch, "loss": loss_value,
                           "lr": schedule[step - 1], "images_per_s": images_since_log / max(now - last_log, 1e-9),
                           "data_wait": min(1.0, wait_time / max(now - last_log, 1e-9))}
                    if main:
                        tracker.log(row)
                        bar.set_postfix(loss=f"{loss_value:.3f}")
                    bar.update(step - bar.n)
                    last_log, wait_time, images_since_log = now, 0.0, 0
                    loss_sum.zero_()
                    if agreement.sigterm:
                        save(epoch)
                        accelerator.print(f"stopped by SIGTERM at step {step}; checkpoint saved, continue with --resume")
                        stopped = "preempted"
                        break
                if at_max:
                    stopped = "max_steps"
                    break
            if stopped == "preempted":
                break
            finished_epoch = epoch + 1
            last = finished_epoch == config.epochs or stopped == "max_steps"
            if finished_epoch % config.eval_every == 0 or last:
                metrics = evaluate(finished_epoch)
            if config.checkpoint_every and (finished_epoch % config.checkpoint_every == 0 or last):
                save(finished_epoch)
            elif preempted(finished_epoch):  # SIGTERM during the evaluation
                stopped = "preempted"
                break
            if stopped == "max_steps":
                break
    finally:
        bar.close()

    fingerprints = accelerator.gather(weights_fingerprint(learner)[None]).tolist()

    def finish() -> None:
        if stopped != "preempted":
            save_backbone(output_dir, learner.encoder, backbone_metadata(resolved, metrics, step))
            results = {"step": step, "stopped": stopped, **metrics, **untrained,
                       "weights_fingerprint_per_process": fingerprints}
            (output_dir / "results.json").write_text(json.dumps(results, indent=1))
        tracker.summary(metrics)
        tracker.close()

    dist.run_on_main(finish)
    accelerator.free_memory()
    del model, optimizer, train_loader, parts   # the rest goes with this frame, before the process group ends
    gc.collect()
    return RunResult(output_dir=output_dir, step=step, metrics=metrics, stopped=stopped, untrained=untrained)


def _last_good(checkpoint_root: Path) -> str:
    found = checkpoints.list_checkpoints(checkpoint_root)
    return f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """One float64 summarising the parameters of both encoders, the query encoder's buffers and the
    memory bank: equal on all processes when they hold the same learner. (The key encoder's batch-norm
    statistics come from each process's own shuffled keys, as in MoCo, and are left out.)"""
    total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    key_encoder_buffers = {f"key_encoder.{name}" for name, _ in model.key_encoder.named_buffers()}
    for position, (name, tensor) in enumerate(model.state_dict().items()):
        if name in key_encoder_buffers:
            continue
        total += (position + 1) * tensor.double().sum()
    return total


@torch.no_grad()
def fill_memory_bank(model: MaskConModel, loader, channels_last: bool) -> None:
    """Fill the K slots of the bank with keys of training images before the first step (official code).

    The keys come from loader epochs of their own (BANK_FILL_EPOCH, then the one before it, as K needs), so
    the training epochs see the same data whether or not a run filled its bank (a resumed run does not).
    """
    slots, filled, epoch = model.queue.shape[0], 0, BANK_FILL_EPOCH
    while filled < slots:
        loader.set_epoch(epoch)
        for batch in loader:
            key = batch["key"]
            if channels_last:
                key = key.contiguous(memory_format=torch.channels_last)
            keys = model.encode_keys(key).float()
            model.enqueue(keys, batch["coarse"], batch["fine"])
            filled += keys.shape[0] * dist.world_size()
            if filled >= slots:
                break
        epoch -= 1


def _log_pictures(tracker, step: int, table: dict, folder: Path, final: bool) -> None:
    from maskcon import plots

    images = {"retrievals": plots.retrieval_grid(table, folder)}
    if final:
        images["embedding"] = plots.embedding_plot(table)
    tracker.log_images(step, images)

"""The training loop: schedule, steps, evaluation, logging, checkpoints.

The run (learner, optimizer, loaders, tracker, resume point) is built by `maskcon.run.build_run`; the step
itself is `maskcon.step.train_step`, eager or compiled whole (`run.step_fn`, `maskcon.step.build_step`).
One loop indexed by the step, as nanoGPT's: logging with the stop vote, evaluation and checkpoints are
gated at the top of each step. The loop reads nothing from the device between logging
points: every --log-every steps it reads the loss and all processes agree, in one small all-reduce
(`failures.agree_to_stop`), on whether to stop (SIGTERM seen, loss not finite), so they stop together.
Sections that run on the main process alone (W&B, metrics, pictures, results) tell the others whether
they succeeded (`failures.run_on_main`).

Stopping: SIGTERM, SIGINT and SIGHUP (`maskcon.stopping`) are read at the stop votes; the processes then write
a checkpoint and end with one line. The run folder is held by the main process for the whole run
(`rundir.hold`) and let go when the run ends.

Exact resume: a loader epoch's batches depend only on (seed, rank, processes, epoch) (`set_epoch`), the
memory bank is filled from epochs of its own, and a checkpoint holds the learner, the bank, the optimizer,
the RNG states and the step, so a run stopped anywhere and resumed ends with the weights of a run that was
never stopped. A resume starts the loader at its batch by index (`set_epoch(epoch, start=position)`): the
batches before it are neither read nor augmented.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from maskcon import checkpoints, count, dist, failures, rundir, stopping
from maskcon.backbone import backbone_metadata, save_backbone
from maskcon.config import Config
from maskcon.errors import AgreedError, UserError, WriteFailed
from maskcon.loaders.spec import TrainBatch
from maskcon.model import MaskConModel
from maskcon.retrieval import RECALL_KS, recall_at_k
from maskcon.plan import base_learning_rate, lr_schedule, precision_text, resolve_precision
from maskcon.run import Run, build_run, make_accelerator

__all__ = ["DataClock", "RunResult", "base_learning_rate", "evaluate", "extract_features", "fill_memory_bank",
           "lr_schedule", "resolve_precision", "save", "train", "train_loop", "weights_fingerprint"]
from maskcon.step import set_lr, shuffle_seed

BANK_FILL_EPOCH = -1  # the loader epoch whose keys fill the memory bank before the first step (then -2, ...)


@dataclass
class RunResult:
    output_dir: Path
    step: int
    metrics: dict  # the last evaluation's R@K
    stopped: str  # "finished" | "preempted" (a stop signal) | "max_steps"
    untrained: dict  # R@K of the network before training, when --eval-untrained


class DataClock:
    """What the training thread spends getting batches between two readings: the figures the loop logs in
    metrics.jsonl and `python launch/bench.py train` reports, under the same names (see `figures`)."""

    def __init__(self, loader, images_per_batch: int):
        self.loader, self.images_per_batch = loader, images_per_batch
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.waited = 0.0        # s of wall time inside next(batches)
        self.batches = 0
        self.feed_start = getattr(self.loader, "feed_cpu_seconds", None)

    def next(self, batches):
        start = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - start
        self.batches += 1
        return batch

    def figures(self) -> dict:
        """images_per_s: images of the batches taken since `reset` over the wall time since then;
        data_wait: the fraction of that time spent in next(batches); data_ms_per_batch: ms in next() per
        batch; feed_cpu_ms_per_batch: CPU ms of the loader's host feeding work per batch, wherever it runs
        (only for loaders that count it in `feed_cpu_seconds`)."""
        elapsed, batches = max(time.perf_counter() - self.started, 1e-9), max(self.batches, 1)
        row = {"images_per_s": self.batches * self.images_per_batch / elapsed,
               "data_wait": min(1.0, self.waited / elapsed), "data_ms_per_batch": 1000 * self.waited / batches}
        feed = getattr(self.loader, "feed_cpu_seconds", None)
        if feed is not None and self.feed_start is not None:
            row["feed_cpu_ms_per_batch"] = 1000 * (feed - self.feed_start) / batches
        return row


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def extract_features(model: MaskConModel, loader, accelerator: Accelerator) -> dict | None:
    """Backbone features of every test image, ordered by index, on the main process (None elsewhere). The
    loader gives the images in the model's memory format (the run builds both with one channels_last).

    A failure on one process (its test loader raising) reaches every process (`failures.run_everywhere`)."""
    parts = failures.run_everywhere(_local_features, model, loader, accelerator)
    gathered = {name: dist.gather_to_main(values) for name, values in parts.items()}
    if not accelerator.is_main_process:
        return None
    order = gathered["index"].argsort()
    return {name: values[order] for name, values in gathered.items()}


def _local_features(model: MaskConModel, loader, accelerator: Accelerator) -> dict:
    """This process's part: {"features": R x F fp32, "fine", "coarse", "index": (R,) int64}."""
    was_training = model.training
    model.eval()
    parts = {"features": [], "fine": [], "coarse": [], "index": []}
    for batch in loader:
        with accelerator.autocast():
            features = model.features(batch["image"])
        parts["features"].append(features.float())
        for name in ("fine", "coarse", "index"):
            parts[name].append(batch[name].long())
    model.train(was_training)
    return {name: torch.cat(values) for name, values in parts.items()}


def evaluate(run: Run, step: int, epoch: int, final: bool) -> dict:
    """R@K of the learner's query encoder on the test split (on the main process; {} elsewhere); logged,
    with the retrieval pictures (and the embedding plot when `final`). When the features fail on some
    process, every process leaves; after training steps, with a checkpoint of the intact learner first. The
    logged row holds the evaluation's wall time, pictures included (eval_s)."""
    started = time.perf_counter()
    dist.average_buffers(run.learner)
    try:
        table = extract_features(run.learner, run.test_loader, run.accelerator)
    except Exception as error:
        if step == 0:
            raise
        save(run, step)
        if isinstance(error, UserError) and not isinstance(error, failures.ProcessFailed):
            raise UserError(f"{error}; checkpoint saved at step {step}, continue with --resume") from None
        raise
    return failures.run_on_main(_report, run, step, epoch, table, final, started) or {}


def _report(run: Run, step: int, epoch: int, table: dict, final: bool, started: float) -> dict:
    metrics = recall_at_k(table["features"], table["fine"], RECALL_KS)
    _log_pictures(run.tracker, step, table, run, final=final)
    run.tracker.log({"step": step, "epoch": epoch, **metrics, "eval_s": round(time.perf_counter() - started, 3)})
    label = "untrained network" if step == 0 else f"epoch {epoch} step {step}"
    tqdm.write(f"{label}: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))   # a line of its own
    return metrics


# ------------------------------------------------------------------------------------------------ loop


class Feed:
    """Batches of a section that every process runs in step (the steps, the bank fill).

    When this process's loader fails, it keeps pace with the others on blank batches (zeros of the batch's
    shapes), so the collectives of every step stay matched, and keeps the error for the next stop vote,
    where every process learns of it (`vote`). The learner has then seen blank batches: no checkpoint is
    written after such a failure; the error names the last one."""

    def __init__(self, blank: TrainBatch):
        self.blank = blank
        self.error: Exception | None = None

    def take(self, batches, clock: DataClock | None = None) -> TrainBatch:
        if self.error is None:
            try:
                return next(batches) if clock is None else clock.next(batches)
            except StopIteration:
                raise
            except Exception as error:   # noqa: BLE001 (every failure of a loader is reported at the vote)
                self.error = error
        return self.blank


def vote(stop: stopping.StopRequest, feed: Feed, run: Run, loss: torch.Tensor | None = None) -> failures.Agreement:
    """The stop vote (`failures.agree_to_stop`; its `sigterm`: some process was asked to stop); when some
    process's loader failed, every process leaves: that one with its error and the last intact checkpoint,
    the others with `failures.ProcessFailed` (silent)."""
    agreement = failures.agree_to_stop(sigterm=stop.requested, loss=loss, failed=feed.error is not None)
    if not agreement.failed:
        return agreement
    if feed.error is None:
        raise failures.ProcessFailed("another process failed; it reports its error")
    if isinstance(feed.error, UserError):
        raise UserError(f"{feed.error}; {_last_good(run.checkpoint_root)}") from None
    raise feed.error


def train(config: Config) -> RunResult:
    """The run of `config`, from start to end. The stop signals are this process's `stopping.REQUEST`,
    installed by `launch/train.py` before anything else; a caller that has not installed it gets it for the
    run's duration (a signal during set-up, evaluation or the bank fill counts too)."""
    stop = stopping.REQUEST
    installed_here = not stop.installed
    if installed_here:
        stop.install()
    stop.checkpointing = False    # until the run is built (run._stop_before_training)
    stop.last_checkpoint, stop.output_dir = (lambda: "no checkpoint was written yet"), None
    stop.given, stop.ended_at = (config.output_dir is not None, config.resume), None
    try:
        if stop.requested:
            raise stopping.Stopped(f"stopped by {stop.reason} before the run started; nothing was written")
        accelerator = make_accelerator(config)
        run = build_run(config, accelerator)
        root = run.checkpoint_root
        stop.last_checkpoint = lambda: _last_good(root)
        stop.output_dir = run.output_dir
        try:
            result = train_loop(run, stop)
        except WriteFailed as error:   # once the disk or the permissions are fixed, the run continues
            last = _last_good(root)
            then = stopping.how_to_continue(run.output_dir, auto="intact" not in last, given=stop.given)
            raise WriteFailed(f"{error}; {last}; once that is fixed, {then}") from None
        del run   # the learner, optimizer and loaders go before the process group ends
        gc.collect()
        return result
    finally:
        rundir.release()
        if installed_here:
            stop.restore()


def train_loop(run: Run, stop: stopping.StopRequest) -> RunResult:
    """From run.step to the end (the last epoch's end, or --max-steps). At the top of each step, in order:
    the logging point (stop vote, one metrics row), the end of an epoch (evaluation, checkpoint), the end."""
    config, steps_per_epoch = run.loop, run.steps_per_epoch
    first = step = logged = run.step
    end = run.total_steps if config.max_steps is None else min(run.total_steps, config.max_steps)
    _announce(run)
    untrained, metrics, stopped = {}, {}, "finished"
    feed = Feed(run.train_loader.spec.blank_train_batch())
    if first >= end:
        metrics = _at_the_end(run, end)
    if step == 0 and run.resumed_from is None:   # a resumed run has its bank (and its untrained figures)
        untrained = _before_training(run, feed)
    clock = DataClock(run.train_loader, run.global_batch)
    loss_sum = torch.zeros((), device=run.accelerator.device)    # losses since the last logging point
    batches = None
    bar = tqdm(total=end, initial=step, disable=not run.accelerator.is_main_process, dynamic_ncols=True,
               desc=_epoch_text(step, run))
    try:
        while True:
            epoch, position = divmod(step, steps_per_epoch)
            boundary = step > first and (position == 0 or step == end)   # an epoch, or the run, has ended
            if step == 0 and vote(stop, feed, run).sigterm:   # after the bank fill
                stopped = _preempted(run, step, stop)
                break
            if step > first and (step % config.log_every == 0 or boundary):
                sigterm = _log(run, step, step - logged, vote(stop, feed, run, loss_sum), clock, bar)
                loss_sum.zero_()
                logged = step
                if sigterm:
                    stopped = _preempted(run, step, stop)
                    break
            if boundary:
                ended = math.ceil(step / steps_per_epoch)   # epochs begun; the last one may be cut by --max-steps
                own = None
                if ended % config.eval_every == 0 or step == end:
                    own = _unscheduled_own(run, step, position)
                    metrics = evaluate(run, step, ended, final=step == end)
                if step == end or (config.checkpoint_every and ended % config.checkpoint_every == 0):
                    save(run, step, own)
                elif vote(stop, feed, run).sigterm:   # a stop signal during the evaluation
                    stopped = _preempted(run, step, stop)
                    break
            if step >= end:
                stopped = "max_steps" if config.max_steps is not None and step >= config.max_steps else "finished"
                break
            if batches is None or position == 0:
                run.train_loader.set_epoch(epoch, start=position)   # a resume skips to its batch by index
                batches = iter(run.train_loader)
            batch = feed.take(batches, clock)
            set_lr(run.optimizer, run.schedule[step])
            loss_sum += run.step_fn(batch, step)
            step += 1
    finally:
        bar.close()
    if stopped == "preempted":
        _say_stopped(run, step, stop)
    else:   # a stop that came during the last evaluation or checkpoint, or comes from now on, is said so
        stop.ended(step)
    return _finish(run, step, stopped, metrics, untrained)


def _at_the_end(run: Run, end: int) -> dict:
    """A run resumed at its last step: nothing is left to train. When its results.json does not hold the final
    figures (it ended after its last checkpoint, before its results were written), they are those its
    metrics.jsonl logged at that step, or, when it holds none, an evaluation of the last checkpoint."""
    earlier = rundir.earlier_results(run.output_dir)     # on every process: the run folder is shared
    already = f"the run is already at step {end} of {end}: nothing is left to train"
    if earlier.get("step") == end and f"R@{RECALL_KS[0]}" in earlier:
        run.accelerator.print(f"{already}; its results stay in {run.output_dir / rundir.RESULTS}", flush=True)
        return {}
    logged = rundir.evaluated_at(run.output_dir, end)
    if logged:
        run.accelerator.print(f"{already}; its final figures, logged before it ended, go to results.json", flush=True)
        return logged
    run.accelerator.print(f"{already}; evaluating the last checkpoint for its results", flush=True)
    return evaluate(run, end, math.ceil(end / run.steps_per_epoch), final=True)


def _epoch_text(step: int, run: Run) -> str:
    """The bar's label at STEP: the epoch under way, of all."""
    return f"epoch {min(step // run.steps_per_epoch + 1, run.loop.epochs)}/{run.loop.epochs}"


def _announce(run: Run) -> None:
    if not run.accelerator.is_main_process:
        return
    config = run.loop
    cut = config.max_steps is not None and config.max_steps < run.total_steps
    print(f"training {config.method} on {config.dataset}: {run.manifest['splits']['train']['num_samples']} images, "
          f"{count(run.accelerator.num_processes, 'process', 'processes')} x batch {config.batch_size} on "
          f"{device_text(run.accelerator)}, {run.steps_per_epoch} steps/epoch, {count(config.epochs, 'epoch')}"
          f"{f' (stops at step {config.max_steps}, --max-steps)' if cut else ''}, lr {run.base_lr:g}, precision "
          f"{precision_text(run.accelerator.mixed_precision)}; writing to {run.output_dir}", flush=True)


def device_text(accelerator) -> str:
    """Where the processes compute: "the CPU", or the GPU's name."""
    if accelerator.device.type != "cuda":
        return "the CPU"
    return f"GPU {torch.cuda.get_device_name(accelerator.device)}"


def _before_training(run: Run, feed: Feed) -> dict:
    """The untrained network's R@K (with --eval-untrained, as untrained_R@K), then the bank fill."""
    untrained = {}
    if run.loop.eval_untrained:
        untrained = {f"untrained_{k}": v for k, v in evaluate(run, 0, 0, final=False).items()}
    fill_memory_bank(run.learner, run.train_loader, feed, seed=run.parts.seed,
                     show_progress=run.accelerator.is_main_process)
    return untrained


def _log(run: Run, step: int, steps: int, agreement: failures.Agreement, clock: DataClock, bar) -> bool:
    """One metrics row after the stop vote `agreement` on the sum of the losses of the last STEPS steps: the
    loss is their mean over those steps and over processes (the lr is read back from the optimizer: the one
    the last step used). Returns whether some process saw SIGTERM; raises when some process's loss is not
    finite. Resets the clock."""
    if agreement.loss_not_finite:
        raise AgreedError(f"the loss stopped being finite by step {step} (epoch {step // run.steps_per_epoch}); "
                          f"{_last_good(run.checkpoint_root)}; try a lower --lr or --mixed-precision bf16")
    loss_value = agreement.mean_loss / steps
    row = {"step": step, "epoch": step / run.steps_per_epoch, "loss": loss_value,
           "lr": float(run.optimizer.param_groups[0]["lr"]), **clock.figures()}
    if run.tracker is not None:
        run.tracker.log(row)
        rundir.mark_trained(run.output_dir)
        bar.set_description(_epoch_text(step, run), refresh=False)
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.update(step - bar.n)
    clock.reset()
    return agreement.sigterm


def save(run: Run, step: int, own: dict | None = None) -> None:
    """The checkpoint of STEP. Its network holds the batch-norm statistics averaged over processes (any number
    of processes can continue from it); each process's own statistics are kept beside them and stay live, so
    a resume on as many processes continues exactly as if never stopped. own: this process's statistics as
    they were before an evaluation that a whole run does not make here (`_unscheduled_own`): saved as its own,
    while the live network keeps the averaged ones it was evaluated with (its backbone.pt)."""
    keep_live = own is not None
    own = own if keep_live else _own_statistics(run)
    dist.average_buffers(run.learner)
    checkpoints.save(run.accelerator, run.checkpoint_root, step=step, epoch=step // run.steps_per_epoch,
                     keep=run.loop.keep_checkpoints, own_tensors=own,
                     extra_state={"run": run.record, "steps_per_epoch": run.steps_per_epoch})
    if not keep_live:
        checkpoints.copy_into(dist.running_statistics(run.learner), own)
    if run.accelerator.is_main_process:
        rundir.mark_trained(run.output_dir)


def _unscheduled_own(run: Run, step: int, position: int) -> dict | None:
    """Before an evaluation at STEP that a whole run does not make (the end of a --max-steps run within an
    epoch, or at an epoch --eval-every skips), this process's batch-norm statistics, which the evaluation
    averages: its checkpoint keeps them, so that a resume continues as the whole run would. None elsewhere."""
    scheduled = step == run.total_steps or (position == 0 and (step // run.steps_per_epoch) % run.loop.eval_every == 0)
    if scheduled:
        return None
    return _own_statistics(run)


def _own_statistics(run: Run) -> dict[str, torch.Tensor]:
    """A copy of this process's batch-norm running statistics, by name."""
    return {name: buffer.clone() for name, buffer in dist.running_statistics(run.learner).items()}


def _preempted(run: Run, step: int, stop: stopping.StopRequest) -> str:
    save(run, step)
    return "preempted"


def _say_stopped(run: Run, step: int, stop: stopping.StopRequest) -> None:
    """The one line of a stop (the reason is the main process's; another process may have been the one asked)."""
    saved = checkpoints.list_checkpoints(run.checkpoint_root)[-1]
    then = stopping.how_to_continue(run.output_dir, given=stop.given)
    run.accelerator.print(f"stopped by {stop.reason or 'a stop request to another process'} at step {step}; "
                          f"checkpoint saved in {saved}; {then}", flush=True)


def _finish(run: Run, step: int, stopped: str, metrics: dict, untrained: dict) -> RunResult:
    fingerprints = run.accelerator.gather(weights_fingerprint(run.learner)[None]).tolist()
    failures.run_on_main(_write_results, run, {"step": step, "stopped": stopped, **metrics, **untrained,
                                           "weights_fingerprint_per_process": fingerprints})
    run.accelerator.free_memory()
    return RunResult(output_dir=run.output_dir, step=step, metrics=metrics, stopped=stopped, untrained=untrained)


def _write_results(run: Run, results: dict) -> None:
    """backbone.pt, results.json and the final figures unless the run was preempted; the tracker's summary;
    closes it."""
    recall = {name: value for name, value in results.items() if name.startswith("R@")}
    if results["stopped"] != "preempted":
        save_backbone(run.output_dir, run.learner.encoder, backbone_metadata(run.resolved, recall, results["step"]))
        _say_results(run, rundir.write_results(run.output_dir, results, resumed=run.resumed_from is not None))
    run.tracker.summary(recall)
    run.tracker.close()


def _say_results(run: Run, results: dict) -> None:
    """The run's last words, in console.log too: R@K before training (with --eval-untrained) and at the end."""
    for prefix, label in (("untrained_R@", "untrained"), ("R@", "final")):
        figures = [f"{name[len(prefix) - 2:]} {value:.2f}" for name, value in results.items() if name.startswith(prefix)]
        if figures:
            print(label + " " + "  ".join(figures) + (f"  ({run.output_dir})" if label == "final" else ""))


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
def fill_memory_bank(model: MaskConModel, loader, feed: Feed | None = None, *, seed: int = 0,
                     show_progress: bool = False) -> None:
    """Fill the K slots of the bank with keys of training images before the first step (official code).

    The keys come from loader epochs of their own (BANK_FILL_EPOCH, then the one before it, as K needs), so
    the training epochs see the same data whether or not a run filled its bank (a resumed run does not).
    With a `feed`, a failure of the loader is kept for the next stop vote (see `Feed`). seed: the run's seed;
    the b-th batch's keys are shuffled as step -1 - b would be (`shuffle_seed`). show_progress: a bar of the
    keys filled (the main process's).
    """
    slots, filled = model.queue.shape[0], 0
    batches = _bank_epochs(loader)
    number = 0                                       # the batch's place in the fill
    with tqdm(total=slots, unit="keys", desc="filling the memory bank", disable=not show_progress,
              dynamic_ncols=True) as bar:
        while filled < slots:
            batch = next(batches) if feed is None else feed.take(batches)
            keys = model.encode_keys(batch["key"], shuffle_seed(seed, -1 - number)).float()
            model.enqueue(keys, batch["coarse"], batch["fine"])
            filled += keys.shape[0] * dist.world_size()
            number += 1
            bar.update(min(filled, slots) - bar.n)


def _bank_epochs(loader):
    """The batches of epochs BANK_FILL_EPOCH, BANK_FILL_EPOCH - 1, ... one after another."""
    epoch = BANK_FILL_EPOCH
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch -= 1


def _log_pictures(tracker, step: int, table: dict, run: Run, final: bool) -> None:
    from maskcon import plots

    images = {"retrievals": plots.retrieval_grid(table, run.folder, step=step)}
    if final:
        images["embedding"] = plots.embedding_plot(table, coarse_names=run.manifest["coarse_classes"],
                                                 fine_names=run.manifest["fine_classes"], step=step)
    tracker.log_images(step, images)

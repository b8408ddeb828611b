"""The training step, on a hand-made batch: which labels each method reads, the bank as it was before the
batch, and the order of momentum update, loss, optimizer step and enqueue."""

import copy
import dataclasses
import math

import pytest
import torch

from maskcon import losses
from maskcon.methods import METHODS, method_for
from maskcon.model import MaskConModel
from maskcon.step import StepParts, make_optimizer, train_step
from maskcon.train import lr_schedule

BATCH, QUEUE, SIZE = 6, 16, 8


def learner(num_coarse=None) -> MaskConModel:
    torch.manual_seed(0)
    model = MaskConModel(arch="resnet18", image_size=SIZE, queue_size=QUEUE, momentum=0.9, num_coarse=num_coarse)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():       # a labelled bank; fine labels 0..5 split into coarse classes {0,1,2} / {3,4,5}
        model.queue_fine.copy_(torch.randint(0, 6, (QUEUE,), generator=generator))
        model.queue_coarse.copy_(model.queue_fine // 3)
        for parameter in [*model.encoder.parameters(), *model.projector.parameters()]:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))   # key encoder differs
    return model


def hand_made_batch() -> dict:
    generator = torch.Generator().manual_seed(2)
    fine = torch.tensor([0, 1, 2, 3, 4, 5])
    return {"query": torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
            "key": torch.randn(BATCH, 3, SIZE, SIZE, generator=generator),
            "fine": fine, "coarse": fine // 3}


def parts_for(model, method="maskcon", lr=0.1):
    optimizer = make_optimizer(model, lr=lr, momentum=0.9, weight_decay=5e-4, device=torch.device("cpu"))
    return StepParts(model=model, learner=model, optimizer=optimizer, method=method_for(method), t0=0.1, t=0.05, w=0.7)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_loss_reads_the_methods_labels_and_the_bank_before_this_batch(method):
    model = learner(num_coarse=2 if METHODS[method].classifier else None)
    reference = copy.deepcopy(model)
    batch = hand_made_batch()
    loss = train_step(parts_for(model, method), batch, 0)

    # by hand, in the order of the step: momentum update, keys, query, objective on the old bank
    reference.momentum_update()
    k = reference.encode_keys(batch["key"], shuffle_seed=0).float()
    out = reference(batch["query"])
    common = dict(q=out["q"], k=k, queue=reference.queue, t0=0.1)
    coarse, fine = batch["coarse"], batch["fine"]
    expected = {
        "selfcon": lambda: losses.selfcon_loss(**common),
        "maskcon": lambda: losses.maskcon_loss(**common, queue_coarse=reference.queue_coarse, coarse=coarse,
                                               t=0.05, w=0.7),
        "grafit": lambda: losses.grafit_loss(**common, queue_coarse=reference.queue_coarse, coarse=coarse, w=0.7),
        "supfine": lambda: losses.supfine_loss(**common, queue_fine=reference.queue_fine, fine=fine),
        "coins": lambda: losses.coins_loss(**common, logits_coarse=out["logits_coarse"], coarse=coarse, w=0.7),
    }[method]()
    torch.testing.assert_close(loss, expected.detach())
    assert loss.ndim == 0 and not loss.requires_grad

    # the labels matter: the other label set (or a bank that already holds this batch) gives another loss
    if method in ("maskcon", "grafit"):
        wrong = getattr(losses, f"{method}_loss")(**{**common, "queue_coarse": reference.queue_fine}, coarse=fine,
                                                   w=0.7, **({"t": 0.05} if method == "maskcon" else {}))
        assert abs(wrong.item() - loss.item()) > 1e-3
    if method != "selfcon":
        after = copy.deepcopy(reference)
        after.enqueue(k, coarse, fine)
        late = METHODS[method].loss(q=out["q"], k=k, logits_coarse=out["logits_coarse"], bank=after,
                                    coarse=coarse, fine=fine, t0=0.1, t=0.05, w=0.7)
        assert abs(late.item() - loss.item()) > 1e-3


def test_momentum_update_precedes_the_optimizer_step_and_the_keys_enter_the_bank_last():
    model = learner()
    before = copy.deepcopy(model)
    batch = hand_made_batch()
    train_step(parts_for(model), batch, 0)

    # the key encoder moved towards the query encoder as it was BEFORE this step's update
    for key, old_key, old_query in zip(model.key_encoder.parameters(), before.key_encoder.parameters(),
                                       before.encoder.parameters()):
        torch.testing.assert_close(key, 0.9 * old_key + 0.1 * old_query)
    changed = [not torch.equal(new, old) for new, old in zip(model.encoder.parameters(), before.encoder.parameters())]
    assert all(changed)                                                   # the optimizer stepped
    # the batch's keys (from the updated key encoder) and labels now sit at the old pointer
    before.momentum_update()
    keys = before.encode_keys(batch["key"], shuffle_seed=0)
    slots = (torch.arange(BATCH) + int(before.queue_ptr)) % QUEUE
    torch.testing.assert_close(model.queue[slots], keys)
    assert model.queue_coarse[slots].tolist() == batch["coarse"].tolist()
    assert model.queue_fine[slots].tolist() == batch["fine"].tolist()
    assert int(model.queue_ptr) == (int(before.queue_ptr) + BATCH) % QUEUE


def test_learning_rate_schedule_warms_up_then_follows_a_per_step_cosine():
    rates = lr_schedule(base_lr=0.4, total_steps=10, warmup_steps=4)
    assert rates[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # cosine over the 6 steps after warm-up: 0.2 * (1 + cos(pi * i / 6))
    half_sqrt3 = math.sqrt(3) / 2                     # cos(pi / 6)
    assert rates[4:] == pytest.approx([0.4, 0.2 * (1 + half_sqrt3), 0.3, 0.2, 0.1, 0.2 * (1 - half_sqrt3)])
    assert lr_schedule(base_lr=1.0, total_steps=3, warmup_steps=0) == pytest.approx([1.0, 0.75, 0.25])


def test_learning_rate_scales_with_the_global_batch():
    from maskcon.config import parse_config
    from maskcon.train import base_learning_rate

    config = parse_config(["--dataset", "cifar100", "--lr", "0.02", "--batch-size", "64"])
    assert base_learning_rate(config, num_processes=4) == pytest.approx(0.02 * 256 / 128)
    assert base_learning_rate(config, num_processes=1) == pytest.approx(0.01)
    fixed = parse_config(["--dataset", "cifar100", "--lr", "0.02", "--batch-size", "64", "--no-scale-lr"])
    assert base_learning_rate(fixed, num_processes=4) == pytest.approx(0.02)


def test_precision_is_bf16_on_a_gpu_unless_asked_and_fp32_on_the_cpu(monkeypatch):
    from maskcon.train import resolve_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision(None, torch.device("cpu")) == "no"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")          # what accelerate launch sets by default
    assert resolve_precision(None, torch.device("cpu")) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")        # accelerate launch --mixed_precision fp16
    assert resolve_precision(None, torch.device("cpu")) == "fp16"
    assert resolve_precision("no", torch.device("cpu")) == "no"     # the trainer's own option wins


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_defaults_to_bf16_even_when_accelerate_launch_says_no(monkeypatch):
    from maskcon.train import resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_precision(None, torch.device("cuda")) in ("bf16", "fp16")
    assert resolve_precision("no", torch.device("cuda")) == "no"


def test_sgd_is_fused_on_cuda_and_multi_tensor_on_the_cpu():
    model = learner()
    optimizer = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=0.0, device=torch.device("cpu"))
    assert optimizer.defaults["foreach"] and not optimizer.defaults.get("fused")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert optimizer.param_groups[0]["params"] == trainable


def test_the_bank_fill_leaves_no_empty_entry(tmp_path):
    from maskcon import shards
    from maskcon.loaders import LoaderSpec, build_train_loader
    from maskcon.train import fill_memory_bank

    shards.create("digits", None, tmp_path / "digits")
    loader = build_train_loader(tmp_path / "digits", LoaderSpec(recipe="digits", image_size=SIZE, batch_size=64, rank=0,
                                                                world_size=1, seed=0, device="cpu", backend="dali",
                                                                query_view="weak", num_threads=1))
    torch.manual_seed(0)
    model = MaskConModel(arch="resnet18", image_size=SIZE, queue_size=1500)   # more keys than one epoch has
    fill_memory_bank(model, loader)
    assert (model.queue_coarse >= 0).all() and (model.queue_fine >= 0).all()
    assert set(model.queue_coarse.tolist()) == {0, 1} and set(model.queue_fine.tolist()) == set(range(10))
    torch.testing.assert_close(model.queue.norm(dim=1), torch.ones(1500))


# ------------------------------------------------------------------------------------ the captured step
# Dynamo traces the whole step and AOTAutograd its forward and backward graphs; backend "aot_eager" runs
# those graphs without generating code (the inductor back end takes minutes to compile on two CPU cores;
# `launch/bench.py train --compile` and the GPU command run it).
#
# Tolerance: the captured step computes in fp32 what eager computes, in another order in places (the SGD
# update as grad * -lr then add, with lr a tensor; decomposed batch norm; MaskCon's whole-batch target).
# Each reordering changes a result by a few fp32 ulps (1.2e-7 relative). Batches of 16 images of 16 px keep
# batch norm well conditioned (over 6 samples at 1 x 1 px in the last stage, ulp differences grow 100x per
# step); there, over three steps of SGD at lr up to 0.3, weights, bank and statistics agreed within 2.4e-6.
# 1e-4 leaves 40x room for other machines and stays 10x below the smallest effect of the bugs these tests
# look for (a skipped momentum update moves the key encoder by 0.1 x |query - key| ~ 5e-3; a learning rate
# off by 0.1 for one step moves the weights by ~1e-2; a skipped enqueue leaves a bank of other keys).
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
CAPTURED_BATCH, CAPTURED_SIZE = 16, 16


def captured_batches(count: int):
    generator = torch.Generator().manual_seed(3)
    for _ in range(count):
        fine = torch.randint(0, 6, (CAPTURED_BATCH,), generator=generator)
        shape = (CAPTURED_BATCH, 3, CAPTURED_SIZE, CAPTURED_SIZE)
        yield {"query": torch.randn(shape, generator=generator), "key": torch.randn(shape, generator=generator),
               "fine": fine, "coarse": fine // 3}


def test_the_captured_step_gives_the_eager_losses_weights_and_bank_as_the_learning_rate_changes():
    from maskcon.step import build_step, set_lr

    eager_model, captured_model = learner(), learner()
    eager, captured = parts_for(eager_model), parts_for(captured_model)
    step = build_step(captured, compile_mode="default", backend="aot_eager")
    for lr, batch in zip((0.1, 0.3, 0.2), captured_batches(3)):   # a new learning rate every step
        set_lr(eager.optimizer, lr)
        set_lr(captured.optimizer, lr)
        torch.testing.assert_close(step(batch, 0), train_step(eager, batch, 0), **TOLERANCE)
    for name, value in eager_model.state_dict().items():     # weights, key encoder, bank, pointer, BN stats
        torch.testing.assert_close(captured_model.state_dict()[name], value, **TOLERANCE,
                                   msg=lambda message, name=name: f"{name}: {message}")
    for parameter, twin in zip(eager_model.parameters(), captured_model.parameters()):
        assert twin.grad is None                              # released after the step, as eager
        if parameter.requires_grad:
            torch.testing.assert_close(captured.optimizer.state[twin]["momentum_buffer"],
                                       eager.optimizer.state[parameter]["momentum_buffer"], **TOLERANCE)


def test_the_captured_step_breaks_only_at_the_backward_pass_and_the_optimizer_step():
    from maskcon.step import graph_breaks

    model = learner()
    before = copy.deepcopy(model.state_dict())
    breaks = graph_breaks(parts_for(model), hand_made_batch())
    assert len(breaks) == 2, breaks
    assert breaks[0].startswith("step.py:") and "`parts.backward(loss)`" in breaks[0]
    assert breaks[1].startswith("step.py:") and "`parts.optimizer.step()`" in breaks[1]
    for name, value in model.state_dict().items():           # traced on a copy: the learner is untouched
        assert torch.equal(value, before[name]), name


def test_set_lr_writes_a_tensor_learning_rate_in_place_and_replaces_a_float():
    from maskcon.step import prepare_optimizer, set_lr

    optimizer = parts_for(learner()).optimizer
    set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == 0.25
    prepare_optimizer(optimizer)
    held = optimizer.param_groups[0]["lr"]
    set_lr(optimizer, 0.125)
    assert optimizer.param_groups[0]["lr"] is held and held.item() == 0.125


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_on_a_gpu_the_step_never_waits_for_the_device_and_cuda_graphs_match_eager(compile_mode):
    from maskcon.step import build_step, set_lr

    cuda = torch.device("cuda")
    eager_model, captured_model = learner().to(cuda), learner().to(cuda)
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, device=cuda)      # fused SGD, as on every GPU
    eager = dataclasses.replace(parts_for(eager_model), optimizer=make_optimizer(eager_model, **sgd))
    captured = dataclasses.replace(parts_for(captured_model), optimizer=make_optimizer(captured_model, **sgd))
    step = build_step(captured, compile_mode=compile_mode)
    batches = [{name: value.to(cuda) for name, value in batch.items()} for batch in captured_batches(5)]
    for number, (lr, batch) in enumerate(zip((0.1, 0.3, 0.2, 0.1, 0.05), batches)):
        set_lr(eager.optimizer, lr)
        set_lr(captured.optimizer, lr)
        expected = train_step(eager, batch, number)
        if number >= 2:                       # after compilation and CUDA-graph recording
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = step(batch, number)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        # GPU kernels reorder more than the CPU's (TF32 off by default in fp32 convolutions: cuDNN picks
        # algorithms per call), so the bound is looser than on the CPU
        torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for name, value in eager_model.state_dict().items():
        torch.testing.assert_close(captured_model.state_dict()[name], value, rtol=1e-2, atol=1e-3,
                                   msg=lambda message, name=name: f"{name}: {message}")


def _two_process_steps(rank: int, port: int, out_dir: str) -> None:
    """One process of a 2-process gloo run: an eager and a compiled learner, DDP-wrapped, take the same
    steps (the same step numbers, so the same shuffle-BN permutations), and a third, eager, takes them with
    other step numbers; their losses and states go to disk."""
    import os

    import torch.distributed
    from torch.nn.parallel import DistributedDataParallel

    from maskcon.step import build_step

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        models = [learner(), learner(), learner()]
        steps, losses = [], [[], [], []]
        for model, mode in zip(models, (None, "default", None)):
            parts = parts_for(model)
            parts = dataclasses.replace(parts, model=DistributedDataParallel(model, broadcast_buffers=False))
            steps.append(build_step(parts, compile_mode=mode, backend="aot_eager"))
        batches = list(captured_batches(3))[rank:rank + 2]     # each process its own batches
        for number, batch in enumerate(batches):
            for step, record, offset in zip(steps, losses, (0, 0, 100)):
                record.append(step(batch, number + offset))
        torch.save({"losses": losses, "states": [model.state_dict() for model in models]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_on_two_processes_the_compiled_step_gives_the_eager_losses_and_weights(tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(_two_process_steps, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(result["losses"][1], result["losses"][0], **TOLERANCE)
        # other step numbers, other shuffles: batch norm of the key encoder sees other sub-batches
        assert all(abs(other - same) > 1e-4 for other, same in zip(result["losses"][2], result["losses"][0]))
        eager, compiled, _ = result["states"]
        for name, value in eager.items():
            torch.testing.assert_close(compiled[name], value, **TOLERANCE,
                                       msg=lambda message, name=name: f"rank {rank} {name}: {message}")

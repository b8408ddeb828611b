"""Cross-process operations: the one-process paths, and a real 2-process gloo run of the training step."""

import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

from maskcon import dist
from maskcon.methods import method_for
from maskcon.step import StepParts, train_step
from tests.conftest import run_gloo, tiny_learner

WORLD_SIZE = 2
BATCH = 4          # per process; global batch 8
QUEUE_SIZE = 20    # not a multiple of the global batch: the bank wraps around mid-batch
STEPS = 4
IMAGE_SIZE = 8


def test_one_process_paths_are_identities():
    x = torch.randn(5, 3)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert dist.concat_all_gather(x) is x
    shuffled, idx_unshuffle = dist.batch_shuffle(x, seed=5)
    assert shuffled is x and idx_unshuffle.tolist() == list(range(5))
    assert dist.batch_unshuffle(shuffled, idx_unshuffle) is x


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """This process's part of the global batch of a step (differs across processes)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return {"query": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "key": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "coarse": torch.randint(0, 3, (BATCH,), generator=generator),
            "fine": torch.randint(0, 9, (BATCH,), generator=generator)}


def train_steps(rank: int, out_dir: str) -> None:
    """One process of the 2-process run: the training step of the loop, then its state to disk."""
    # batch shuffle across processes, then unshuffle, gives each process its own samples back in order
    samples = torch.arange(BATCH, dtype=torch.float32)[:, None] + BATCH * rank
    shuffled, idx_unshuffle = dist.batch_shuffle(samples, seed=0)
    restored = dist.batch_unshuffle(shuffled * 10, idx_unshuffle)

    model = tiny_learner("--queue-size", str(QUEUE_SIZE))   # the same initial model on every process (seed 0)
    # broadcast_buffers=False: DDP must not copy rank 0's bank over the others, so equal banks come
    # from the gathered enqueue alone
    wrapped = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
    parts = StepParts(model=wrapped, learner=model, optimizer=optimizer, method=method_for("maskcon"),
                      t0=0.1, t=0.05, w=0.5)
    slot_labels = []      # per step, the bank labels in the slots where each rank's keys went
    for step in range(STEPS):
        train_step(parts, batch(step, rank), step)
        written = (int(model.queue_ptr) - WORLD_SIZE * BATCH + torch.arange(WORLD_SIZE * BATCH)) % QUEUE_SIZE
        slot_labels.append(torch.stack([model.queue_coarse[written], model.queue_fine[written]]))
    key_state = {**{f"encoder.{n}": p for n, p in model.key_encoder.named_parameters()},
                 **{f"projector.{n}": p for n, p in model.key_projector.named_parameters()}}
    torch.save({"samples": samples, "shuffled": shuffled, "restored": restored, "slot_labels": slot_labels,
                "queue": model.queue, "queue_coarse": model.queue_coarse, "queue_fine": model.queue_fine,
                "queue_ptr": model.queue_ptr, "key_parameters": key_state},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_keep_identical_banks_and_key_encoders(tmp_path):
    run_gloo(train_steps, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]

    # batch shuffle: the samples really moved across processes, and came back in order
    assert ranks[0]["shuffled"].flatten().tolist() != list(range(BATCH))
    assert sorted(torch.cat([r["shuffled"] for r in ranks]).flatten().tolist()) == list(range(WORLD_SIZE * BATCH))
    for result in ranks:
        torch.testing.assert_close(result["restored"], result["samples"] * 10)

    # identical banks, labels, pointers and key encoders on both processes
    for name in ("queue", "queue_coarse", "queue_fine", "queue_ptr"):
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["key_parameters"], ranks[1]["key_parameters"], rtol=0, atol=0)
    assert ranks[0]["queue_ptr"].item() == (STEPS * WORLD_SIZE * BATCH) % QUEUE_SIZE

    # the gathered enqueue writes every process's keys, in rank order, after the pointer
    for step in range(STEPS):
        data = [batch(step, rank) for rank in range(WORLD_SIZE)]
        expected = torch.stack([torch.cat([d["coarse"] for d in data]), torch.cat([d["fine"] for d in data])])
        torch.testing.assert_close(ranks[0]["slot_labels"][step], expected, rtol=0, atol=0)

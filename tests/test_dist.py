"""Cross-process operations: the one-process paths, and a real 2-process gloo run of the training steps."""

import os
import socket

import torch
import torch.distributed
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from maskcon import dist, losses
from maskcon.model import MaskConModel

WORLD_SIZE = 2
BATCH = 4          # per process; global batch 8
QUEUE_SIZE = 20    # not a multiple of the global batch: the bank wraps around mid-batch
STEPS = 4
IMAGE_SIZE = 8


def test_one_process_paths_are_identities():
    x = torch.randn(5, 3)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert dist.concat_all_gather(x) is x
    shuffled, idx_unshuffle = dist.batch_shuffle(x)
    assert shuffled is x and idx_unshuffle.tolist() == list(range(5))
    assert dist.batch_unshuffle(shuffled, idx_unshuffle) is x


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    """This process's part of the global batch of a step (differs across processes)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return {"query": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "key": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "coarse": torch.randint(0, 3, (BATCH,), generator=generator),
            "fine": torch.randint(0, 9, (BATCH,), generator=generator)}


def train_steps(rank: int, port: int, out_dir: str) -> None:
    """One process of the 2-process run: the training loop's order of operations, then its state to disk."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD_SIZE)
    try:
        # batch shuffle across processes, then unshuffle, gives each process its own samples back in order
        torch.manual_seed(rank)                            # only rank 0's permutation may count
        samples = torch.arange(BATCH, dtype=torch.float32)[:, None] + BATCH * rank
        shuffled, idx_unshuffle = dist.batch_shuffle(samples)
        restored = dist.batch_unshuffle(shuffled * 10, idx_unshuffle)

        torch.manual_seed(0)                               # the same initial model on every process
        model = MaskConModel(arch="resnet18", image_size=IMAGE_SIZE, queue_size=QUEUE_SIZE)
        # broadcast_buffers=False: DDP must not copy rank 0's bank over the others, so equal banks come
        # from the gathered enqueue alone
        wrapped = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9)
        keys = []
        for step in range(STEPS):
            data = batch(step, rank)
            q = wrapped(data["query"])["q"]
            k = model.encode_keys(data["key"])
            loss = losses.maskcon_loss(q=q, k=k, queue=model.queue, queue_coarse=model.queue_coarse,
                                       coarse=data["coarse"], t0=0.1, t=0.05, w=0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.momentum_update()
            model.enqueue(k, data["coarse"], data["fine"])
            keys.append(k)
        key_state = {**{f"encoder.{n}": p for n, p in model.key_encoder.named_parameters()},
                     **{f"projector.{n}": p for n, p in model.key_projector.named_parameters()}}
        torch.save({"samples": samples, "shuffled": shuffled, "restored": restored, "keys": keys,
                    "queue": model.queue, "queue_coarse": model.queue_coarse, "queue_fine": model.queue_fine,
                    "queue_ptr": model.queue_ptr, "key_parameters": key_state},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_keep_identical_banks_and_key_encoders(tmp_path):
    mp.spawn(train_steps, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
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

    # the gathered enqueue equals a one-process run on the concatenated batches
    reference = MaskConModel(arch="resnet18", image_size=IMAGE_SIZE, queue_size=QUEUE_SIZE)
    for step in range(STEPS):
        data = [batch(step, rank) for rank in range(WORLD_SIZE)]
        reference.enqueue(torch.cat([r["keys"][step] for r in ranks]),
                          torch.cat([d["coarse"] for d in data]), torch.cat([d["fine"] for d in data]))
    for name in ("queue", "queue_coarse", "queue_fine", "queue_ptr"):
        torch.testing.assert_close(ranks[0][name], getattr(reference, name), rtol=0, atol=0)

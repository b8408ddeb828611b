"""Every collective operation of the learner and the evaluation, each with a one-process path.

How processes learn of a failure elsewhere and agree to stop is maskcon/failures.py, built on these.

When torch.distributed is not initialised (or runs a single process) every function here reduces to its
local meaning, so the model, the losses and the loop run and test on one CPU. The learner's collectives
assume the same batch size on every process (the loaders guarantee it), as MoCo's `concat_all_gather` and
batch shuffle do; `gather_to_main` takes any row counts. All work with the gloo and NCCL back ends.

Traffic of one training step, P processes of N samples with S x S images and D-wide keys (the bytes each
process receives; `python launch/bench.py collectives` measures them):
    shuffle-BN   all-to-all: the (P-1)/P of its N key images that live elsewhere, in the training precision,
                 and the same share of its N x D fp32 keys on the way back
    enqueue      one all-gather of N x (D + 2) fp32 (keys, coarse and fine labels) from every other process
    stop vote    every --log-every steps, one all-reduce of 4 floats (`failures.agree_to_stop`)
Batch-norm running statistics are not sent every step (DDP runs with broadcast_buffers=False): the banks
stay identical through the gathered enqueue, and `average_buffers` syncs the statistics before evaluation
and checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

_RUNNING_STATISTICS = ("running_mean", "running_var")   # buffer names of the batch-norm running statistics


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def rank() -> int:
    """Rank of this process in the default group; 0 when torch.distributed is not initialised."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank()
    return 0


def collective_device() -> torch.device:
    """Where small control tensors of the default group live: the current GPU under NCCL, else the CPU."""
    if world_size() > 1 and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ the learner


def gather_into(output: torch.Tensor, tensor: torch.Tensor) -> None:
    """All-gather TENSOR of every process into OUTPUT, concatenated in rank order: all_gather_single where
    PyTorch has it (2.11 and newer), all_gather_into_tensor before."""
    gather = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor
    gather(output, tensor)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N x ...) of every process along dim 0, in rank order: (world_size * N) x ....

    One all-gather into a preallocated tensor; no gradient flows through it (MoCo, `moco/builder.py`).
    Every process must pass the same shape and dtype.
    """
    processes = world_size()
    if processes == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = tensor.new_empty((processes * tensor.shape[0], *tensor.shape[1:]))
    gather_into(gathered, tensor)
    return gathered


def shuffle_permutation(size: int, seed: int) -> torch.Tensor:
    """The shuffle-BN permutation of a global batch of `size` samples: (size,) int64 on the CPU, a function
    of `seed` alone. Every process passes the same seed (the step derives it from the run's seed and the
    step's index), so all draw the same permutation without a collective or a device wait, and a resumed
    run shuffles as the uninterrupted one did."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def _shuffle_plan(idx_shuffle: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """This process's all-to-all plan for the global permutation idx_shuffle ((P*N,) int64 on the CPU).

    Shuffled position j goes to process j // N and takes global sample idx_shuffle[j], held by process
    idx_shuffle[j] // N. Returns
        send_rows   (N,) rows of the local batch, grouped by destination process, in position order
        send_counts rows sent to each process (P ints; the share for itself stays local in the all-to-all)
        recv_counts rows received from each process (P ints)
    The rows a process receives arrive grouped by source process; batch norm does not depend on the order
    of its batch, so they are used in that order and sent back in it.
    """
    processes, this = world_size(), rank()
    n = idx_shuffle.numel() // processes
    source = idx_shuffle // n                                        # P*N: process holding each sample
    destination = torch.arange(idx_shuffle.numel()) // n             # P*N: process of each position
    mine = (source == this).nonzero().squeeze(1)                     # positions of my samples, ascending
    send_rows = idx_shuffle[mine] - this * n
    send_counts = torch.bincount(destination[mine], minlength=processes).tolist()
    recv_counts = torch.bincount(source[this * n:(this + 1) * n], minlength=processes).tolist()
    return send_rows, send_counts, recv_counts


def _to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host index tensor -> device, without making the host wait for the device's queue."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _exchange(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """all_to_all_single: rows (sum(send_counts) x ..., grouped by destination) -> sum(recv_counts) x ...
    grouped by source."""
    rows = rows.contiguous()
    received = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    torch_dist.all_to_all_single(received, rows, output_split_sizes=recv_counts, input_split_sizes=send_counts)
    return received


def _like_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in the channels-last memory format when `like` (a 4-d image batch) is in it."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across processes, for shuffle-BN (MoCo).

    x: N x ... (this process's part of the global batch, sent in its own dtype: pass the images in the
    training precision). Returns (this process's N samples of the shuffled global batch, grouped by the
    process they came from; idx_unshuffle: (P*N,) int64 on the CPU, to give to `batch_unshuffle`). Every
    process draws the same uniform permutation of the P*N samples, `shuffle_permutation(P*N, seed)` (every
    process must pass the same seed), and one all-to-all sends each process only the samples it gets, not
    the whole global batch. On one process the shuffle is the identity (batch norm statistics do not depend
    on the order of the batch): returns (x, arange(N)).
    """
    processes = world_size()
    if processes == 1:
        return x, torch.arange(x.shape[0])
    idx_shuffle = shuffle_permutation(processes * x.shape[0], seed)   # P*N, same on every process
    send_rows, send_counts, recv_counts = _shuffle_plan(idx_shuffle)
    shuffled = _exchange(x[_to_device(send_rows, x.device)], send_counts, recv_counts)
    return _like_layout(shuffled, x), torch.argsort(idx_shuffle)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle`: x (N x ..., computed on the shuffled samples) -> N x ... in the original order.

    The reverse all-to-all: each process gets back the results of its own samples only.
    """
    processes = world_size()
    if processes == 1:
        return x
    send_rows, send_counts, recv_counts = _shuffle_plan(torch.argsort(idx_unshuffle))
    returned = _exchange(x, recv_counts, send_counts)                  # N x ..., in send_rows order
    return torch.empty_like(returned).index_copy_(0, _to_device(send_rows, x.device), returned)


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average the batch-norm running statistics (running_mean, running_var) of `module` over processes.

    DDP runs without a per-step buffer broadcast, so each process's statistics follow its own batches (and
    the key encoder's its shuffled sub-batches). Call this before evaluation and before a checkpoint: every
    process then holds the same network. One all-reduce of all statistics, as timm's `distribute_bn`;
    other buffers (the memory bank, num_batches_tracked) are left alone. No-op on one process.
    """
    processes = world_size()
    if processes == 1:
        return
    statistics = list(running_statistics(module).values())
    if not statistics:
        return
    flat = torch.cat([buffer.detach().float().flatten() for buffer in statistics])
    torch_dist.all_reduce(flat)
    flat /= processes
    averages = torch.split(flat, [buffer.numel() for buffer in statistics])
    torch._foreach_copy_(statistics, [average.view_as(buffer) for average, buffer in zip(averages, statistics)])


def running_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The batch-norm running statistics of `module` by name (the buffers themselves, not copies)."""
    return {name: buffer for name, buffer in module.named_buffers() if name.rsplit(".", 1)[-1] in _RUNNING_STATISTICS}


@torch.no_grad()
def gather_to_main(tensor: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every process's rows on the main process, in rank order; the others get None.

    tensor: R_p x ... with any row count R_p per process (same trailing shape and dtype everywhere), e.g. the
    evaluation features of each process's share of the test set. Returns (sum of R_p) x ... on rank 0.
    One all-gather of the P row counts (a host sync: evaluation only), then one gather of the rows padded
    to the longest count. On one process: the tensor itself.
    """
    processes = world_size()
    if processes == 1:
        return tensor
    tensor = tensor.contiguous()
    counts = concat_all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()   # P
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))                                  # max R x ...
    padded[:tensor.shape[0]] = tensor
    if rank() != 0:
        torch_dist.gather(padded, None, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in range(processes)]
    torch_dist.gather(padded, parts, dst=0)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the rendezvous of processes started on this machine."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]

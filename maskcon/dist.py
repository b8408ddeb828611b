"""Every cross-process operation of the learner, each with a one-process path.

When torch.distributed is not initialised (or runs a single process) every function here is the identity,
so the model and the losses run and test on one CPU. All collectives assume the same batch size on every
process (the loaders guarantee it), as MoCo's `concat_all_gather` and batch shuffle do; they work with the
gloo and NCCL back ends alike.
"""

import torch
import torch.distributed as torch_dist


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


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (N x ...) of every process along dim 0, in rank order: (world_size * N) x ....

    No gradient flows through the gather (MoCo, `moco/builder.py`). Every process must pass the same shape.
    """
    processes = world_size()
    if processes == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(processes)]
    torch_dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the global batch across processes, for shuffle-BN (MoCo).

    x: N x ... (this process's part of the global batch). Returns (this process's N samples of the shuffled
    global batch, idx_unshuffle: (world_size * N,) int64) to give to `batch_unshuffle`. Rank 0 draws the
    permutation and broadcasts it, so all processes agree. On one process the shuffle is the identity (batch
    norm statistics do not depend on the order of the batch): returns (x, arange(N)).
    """
    processes = world_size()
    if processes == 1:
        return x, torch.arange(x.shape[0], device=x.device)
    x_all = concat_all_gather(x)                                  # (P*N) x ...
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    torch_dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    idx_this = idx_shuffle.view(processes, -1)[rank()]          # N
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle`: x (N x ..., computed on the shuffled samples) -> N x ... in the original order."""
    processes = world_size()
    if processes == 1:
        return x
    x_all = concat_all_gather(x)                                  # (P*N) x ...
    idx_this = idx_unshuffle.view(processes, -1)[rank()]        # N
    return x_all[idx_this]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every buffer of `module` (batch-norm running statistics) from process `src` to all processes.

    Under DDP each process updates its own running statistics after the last synchronised forward; the
    evaluation uses rank 0's, so every process extracts features with the same network. No-op on one process.
    """
    if world_size() == 1:
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer, src=src)

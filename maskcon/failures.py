"""How processes learn of a failure elsewhere and stop together, each with a one-process path.

`agree_to_stop`: one small all-reduce every --log-every steps, by which every process decides together to stop
(SIGTERM seen, loss not finite, a failure reported); `run_on_main` and `run_everywhere`: a section run on the
main process alone or on every process, after which every process knows whether it failed anywhere, so no
process waits in a collective for one that has given up. Built on maskcon/dist.py's process facts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as torch_dist

from maskcon.dist import collective_device, gather_into, rank, world_size
from maskcon.errors import AgreedError, FailedElsewhere, UserError

Result = TypeVar("Result")

STATUS_BYTES = 1024     # size of the status `run_on_main` broadcasts: 1 flag byte + a UTF-8 message


class Agreement(NamedTuple):
    """What every process learns from `agree_to_stop`; the same values on all of them."""

    sigterm: bool            # some process received SIGTERM
    loss_not_finite: bool    # some process's loss was NaN or infinite
    failed: bool             # some process reported a failure
    mean_loss: float         # the given loss averaged over processes (NaN without a loss or when not finite)

    @property
    def stop(self) -> bool:
        """Some process asked to stop, for any of the three reasons."""
        return self.sigterm or self.loss_not_finite or self.failed


@torch.no_grad()
def agree_to_stop(*, sigterm: bool, loss: torch.Tensor | None = None, failed: bool = False) -> Agreement:
    """One small all-reduce that lets every process decide together whether to stop.

    sigterm: this process received SIGTERM; loss: a tensor on the device (the last loss, or the sum of the
    losses since the last call: a sum is finite exactly when every term is), read only after the reduce;
    None where no loss exists (evaluation, the bank fill); failed: this process hit an error and must stop.
    Every process must call it at the same point. One all-reduce of 4 floats and one device-to-host copy.
    """
    processes = world_size()
    device = loss.device if loss is not None else collective_device()
    flags = torch.tensor([float(sigterm), float(failed)], device=device)
    if loss is None:
        loss_sum = torch.zeros((), device=device)
        not_finite = torch.zeros((), device=device)
    else:
        loss_sum = loss.detach().float().sum()
        not_finite = (~torch.isfinite(loss.detach())).any().float()
    votes = torch.stack([flags[0], not_finite, flags[1], loss_sum])       # 4: counts, counts, counts, sum
    if processes > 1:
        torch_dist.all_reduce(votes)
    sigterm_count, not_finite_count, failed_count, total = votes.tolist()
    mean_loss = total / processes if loss is not None and not not_finite_count else float("nan")
    return Agreement(sigterm=sigterm_count > 0, loss_not_finite=not_finite_count > 0, failed=failed_count > 0,
                     mean_loss=mean_loss)


class ProcessFailed(FailedElsewhere):
    """Raised on every other process when a section that every process runs failed on one of them."""


class MainProcessFailed(FailedElsewhere):
    """Raised on every other process when a section that runs on the main process alone failed there.

    The main process raises its own error (with its traceback, or its one line for a UserError); this one
    carries that error's first line, so no process waits for a main process that has given up.
    """


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _status(error: BaseException | None) -> torch.Tensor:
    """STATUS_BYTES uint8: [failed, the error's first line in UTF-8, 0 padding]."""
    status = torch.zeros(STATUS_BYTES, dtype=torch.uint8)
    if error is not None:
        message = _first_line(error).encode()[:STATUS_BYTES - 1]
        status[0] = 1
        status[1:1 + len(message)] = torch.frombuffer(bytearray(message), dtype=torch.uint8)
    return status.to(collective_device())


def _message(status: torch.Tensor) -> str:
    return bytes(status.cpu()[1:].tolist()).rstrip(b"\0").decode(errors="replace")


def _attempt(fn: Callable[..., Result], *args, **kwargs) -> tuple[Result | None, BaseException | None]:
    try:
        return fn(*args, **kwargs), None
    except BaseException as caught:   # every failure, even SystemExit, is reported before it propagates
        return None, caught


def run_on_main(fn: Callable[..., Result], *args, **kwargs) -> Result | None:
    """Run fn(*args, **kwargs) on the main process (rank 0) only, then tell every process how it went.

    Returns fn's result on the main process and None on the others. If fn raises, the main process re-raises
    the original error and every other process raises `MainProcessFailed` with its first line, so all leave
    together instead of waiting in the next collective. Every process must call it at the same point; the
    others wait in one broadcast of STATUS_BYTES bytes for as long as fn runs (keep fn shorter than the
    process-group timeout). On one process: fn(*args, **kwargs).
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = _attempt(fn, *args, **kwargs) if rank() == 0 else (None, None)
    status = _status(error)
    torch_dist.broadcast(status, src=0)
    if error is not None:
        raise error
    if status[0]:
        raise MainProcessFailed(f"the main process failed: {_message(status)}")
    return result


def run_everywhere(fn: Callable[..., Result], *args, **kwargs) -> Result:
    """Run fn(*args, **kwargs) on every process, then tell every process whether it failed anywhere.

    A process where fn raised re-raises its error (an AgreedError as a plain UserError when the main process,
    which prints agreed errors, did not fail); the others raise `ProcessFailed` naming the first such
    process and its error's first line. One all-gather of STATUS_BYTES per process. On one process:
    fn(*args, **kwargs).
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = _attempt(fn, *args, **kwargs)
    statuses = torch.empty(world_size() * STATUS_BYTES, dtype=torch.uint8, device=collective_device())
    gather_into(statuses, _status(error))
    statuses = statuses.view(world_size(), STATUS_BYTES)
    if error is not None:
        if isinstance(error, AgreedError) and not statuses[0, 0]:   # the main process, which speaks for all, did not
            raise UserError(str(error)) from None                     # fail: this one says its own error
        raise error
    failed = [position for position in range(world_size()) if statuses[position, 0]]
    if failed:
        raise ProcessFailed(f"process {failed[0]} failed: {_message(statuses[failed[0]])}")
    return result

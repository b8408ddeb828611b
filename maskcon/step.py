"""The training step: the one function the loop (`maskcon/train.py`), the benchmarks and the tests call.

Order (MoCo v2, official MaskCon): momentum update of the key encoder, keys of the key view (shuffle-BN),
query projection through the wrapped model, the objective against the bank as it was BEFORE this batch,
backward, optimizer step, then the keys of all processes enter the bank. The step returns the loss as a
0-d tensor and never reads it: no host synchronisation, so the host queues the next step while the device
runs this one. The loop reads the loss every --log-every steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from maskcon.methods import Method
from maskcon.model import MaskConModel


@dataclass(frozen=True)
class StepParts:
    """What one step works on.

    model: the learner as the optimizer sees it (possibly wrapped by DDP/Accelerate), whose forward is the
    query branch; learner: the same learner unwrapped (key encoder, bank); method: the objective;
    t0, t, w: temperatures and weight of the objective (maskcon/losses.py); autocast: the mixed-precision
    context (accelerator.autocast); backward: loss -> None (accelerator.backward); channels_last: convert
    the views to the channels-last memory format (the model must be in it too).
    """

    model: torch.nn.Module
    learner: MaskConModel
    optimizer: torch.optim.Optimizer
    method: Method
    t0: float
    t: float
    w: float
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    channels_last: bool = False


def train_step(parts: StepParts, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One step on batch {"query", "key": N x 3 x S x S, "fine", "coarse": (N,) int64}; returns the loss
    (0-d fp32 tensor on the device, detached)."""
    learner = parts.learner
    query, key = batch["query"], batch["key"]
    if parts.channels_last:
        query = query.contiguous(memory_format=torch.channels_last)
        key = key.contiguous(memory_format=torch.channels_last)
    learner.momentum_update()
    with parts.autocast():
        k = learner.encode_keys(key).float()                                    # N x D
        out = parts.model(query)
        loss = parts.method.loss(q=out["q"], k=k, logits_coarse=out["logits_coarse"], bank=learner,
                                 coarse=batch["coarse"], fine=batch["fine"], t0=parts.t0, t=parts.t, w=parts.w)
    parts.backward(loss)
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    learner.enqueue(k, batch["coarse"], batch["fine"])
    return loss.detach()


def make_optimizer(learner: MaskConModel, *, lr: float, momentum: float, weight_decay: float,
                   device: torch.device) -> torch.optim.SGD:
    """SGD over the trainable parameters: one fused kernel on CUDA, the multi-tensor path elsewhere."""
    parameters = [p for p in learner.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

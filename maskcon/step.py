"""The training step: the one function the loop (`maskcon/train.py`), the benchmarks and the tests call.

Order (MoCo v2, official MaskCon): momentum update of the key encoder, keys of the key view (shuffle-BN),
query projection through the wrapped model, the objective against the bank as it was BEFORE this batch,
backward, optimizer step, then the keys of all processes enter the bank and the gradients are released.
The step returns the loss as a 0-d tensor and never reads it: no host synchronisation, so the host queues
the next step while the device runs this one. The loop reads the loss every --log-every steps: one device
wait per window, after which the device idles only until the host has queued the next step's first
kernels (the host stays ahead of the device within that step), a few hundred microseconds against a
window of --log-every steps.

`build_step(parts, compile_mode=...)` gives the step the loop calls: `train_step` itself (eager), or the
whole step captured by torch.compile. On one process everything is compiled: momentum update, keys,
forward, objective, backward (AOTAutograd's backward graph), SGD step and enqueue. What stays between the
compiled graphs, each a graph break that `graph_breaks` reports:
    backward       `parts.backward(loss)`: Dynamo does not trace autograd's engine; the backward graph of
                   the forward graph runs there, compiled.
    optimizer.step PyTorch's optimizers break the graph around their no-grad region on purpose
                   (torch/optim/optimizer.py, `_use_grad_for_differentiable`); the update itself is compiled
                   as a graph of its own, run right after the backward pass.
`Optimizer.zero_grad` is not traceable (PyTorch disables Dynamo in it), so the captured step releases the
gradients after the compiled graphs, on the host (no kernel). Known limits of the capture, handled here:
    - a learning rate given as a Python float is a constant of the graph and recompiles at every new value:
      the captured step turns every group's lr into a 0-d tensor on the parameters' device, and `set_lr`
      writes into that tensor;
    - CUDA graphs ("reduce-overhead", "max-autotune") skip a graph that mutates an input they do not own:
      the batch is copied into persistent buffers marked as static inputs, and the parameters, buffers and
      optimizer state are static already;
    - chained CUDA-graph calls need `torch.compiler.cudagraph_mark_step_begin()` before each step, and a
      graph's outputs are overwritten by its next replay: the captured step marks each step and returns a
      copy of the loss;
    - SGD creates its momentum buffers at the first step (a second graph); they are created as zeros
      before the first capture, which gives the same first update when dampening is 0.
Gradients are set to None after each step, not zeroed in place: the backward pass gives fresh gradient
tensors each step (it runs between graphs), so no graph needs them in place, and autograd hands them over
without a copy.

On several processes (a DDP-wrapped model, the all-to-all of shuffle-BN and the all-gather of the enqueue)
the compiled parts are: the encoders and projectors (forward and backward, DDP's bucketed all-reduce
between their graphs) and the objective (one fullgraph); momentum update (one multi-tensor kernel), the
collectives, the SGD step (fused on CUDA) and the enqueue run eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import re
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from maskcon import dist
from maskcon.loaders.spec import TrainBatch
from maskcon.methods import Method
from maskcon.model import MaskConModel

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # torch.compile modes that capture CUDA graphs
COMPILE_MODES = ("default", *CUDA_GRAPH_MODES, "max-autotune-no-cudagraphs")   # those --compile-mode takes
BATCH_KEYS = tuple(TrainBatch.__annotations__)   # ("query", "key", "fine", "coarse")


@dataclass(frozen=True)
class StepParts:
    """What one step works on.

    model: the learner as the optimizer sees it (possibly wrapped by DDP/Accelerate), whose forward is the
    query branch; learner: the same learner unwrapped (key encoder, bank); method: the objective;
    t0, t, w: temperatures and weight of the objective (maskcon/losses.py); autocast: the mixed-precision
    context (accelerator.autocast, or a torch.autocast factory); backward: loss -> None (accelerator.backward);
    seed: the run's seed, from which each step's shuffle-BN permutation is drawn (`shuffle_seed`).
    The views come in the model's memory format: the loaders' spec decides it.
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
    seed: int = 0


def shuffle_seed(run_seed: int, step: int) -> int:
    """The seed of step `step`'s shuffle-BN permutation in a run seeded `run_seed`: a function of the two
    alone, the same on every process, so a resumed run shuffles as the uninterrupted one (negative steps: the
    bank's filling before the first step)."""
    return (run_seed * 2**32 + step) % 2**64


def train_step(parts: StepParts, batch: TrainBatch, step: int) -> torch.Tensor:
    """Step number `step` (0-based, of the whole run) on batch {"query", "key": N x 3 x S x S, "fine",
    "coarse": (N,) int64}; returns the loss (0-d fp32 tensor on the device, detached)."""
    loss = _update(parts, batch, step)
    parts.optimizer.zero_grad(set_to_none=True)
    return loss


def _update(parts: StepParts, batch: TrainBatch, step: int) -> torch.Tensor:
    """The step up to the gradients' release: what the captured step compiles."""
    learner = parts.learner
    query, key = batch["query"], batch["key"]
    learner.momentum_update()
    with parts.autocast():
        k = learner.encode_keys(key, shuffle_seed(parts.seed, step)).float()   # N x D
        out = parts.model(query)
        loss = parts.method.loss(q=out["q"], k=k, logits_coarse=out["logits_coarse"], bank=learner,
                                 coarse=batch["coarse"], fine=batch["fine"], t0=parts.t0, t=parts.t, w=parts.w)
    parts.backward(loss)
    parts.optimizer.step()
    learner.enqueue(k, batch["coarse"], batch["fine"])
    return loss.detach()


def make_optimizer(learner: MaskConModel, *, lr: float, momentum: float, weight_decay: float,
                   device: torch.device) -> torch.optim.SGD:
    """SGD over the trainable parameters: one fused kernel on CUDA, the multi-tensor path elsewhere."""
    parameters = [p for p in learner.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay, **fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; a tensor lr (the captured step's) is written in place, so a compiled
    step reads the new value without recompiling and without a host wait."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


# ------------------------------------------------------------------------------------ the captured step


def build_step(parts: StepParts, *, compile_mode: str | None = None,
               backend: str = "inductor") -> Callable[[TrainBatch, int], torch.Tensor]:
    """The step the loop calls: (batch, step number) -> loss (0-d, detached, not read).

    compile_mode None: `train_step` itself, eager. Otherwise a torch.compile mode ("default",
    "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"): on one process the whole step
    captured (`_CapturedStep`), on several the encoders, projectors and objective compiled (module
    docstring). backend: torch.compile's backend ("inductor"; "aot_eager" traces and runs the same graphs
    without code generation, with compile_mode "default"). The captured step turns the optimizer's learning
    rates into tensors and creates its momentum buffers: build it before loading a checkpoint or after,
    both work (a loaded float lr is turned into a tensor again at the next call).
    """
    if compile_mode is None:
        return functools.partial(train_step, parts)
    if dist.world_size() > 1:
        return _compiled_parts_step(parts, compile_mode, backend)
    return _CapturedStep(parts, compile_mode, backend)


class _CapturedStep:
    """The whole step under one torch.compile, with static inputs for CUDA graphs (module docstring)."""

    def __init__(self, parts: StepParts, compile_mode: str, backend: str):
        self.parts = parts
        self.cuda_graphs = compile_mode in CUDA_GRAPH_MODES
        self.inputs: dict[str, torch.Tensor] | None = None       # persistent copies of the batch
        options = {"mode": compile_mode} if backend == "inductor" else {}
        # one process: shuffle-BN is the identity, so the step number is not an input of the graph
        self.compiled = torch.compile(functools.partial(_update, parts, step=0), backend=backend, dynamic=False,
                                      **options)

    def __call__(self, batch: TrainBatch, step: int) -> torch.Tensor:
        prepare_optimizer(self.parts.optimizer)
        inputs = self._static_inputs(batch)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = self.compiled(inputs).clone()        # a graph's outputs are overwritten by its next replay
        self.parts.optimizer.zero_grad(set_to_none=True)
        return loss

    def _static_inputs(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """The batch copied into tensors that live as long as the step (one multi-tensor copy); new ones
        only when a shape, dtype, device or layout changes."""
        sources = [batch[name] for name in BATCH_KEYS]
        if self.inputs is None or any(not _same_layout(held, new) for held, new in
                                      zip(self.inputs.values(), sources)):
            self.inputs = {name: torch.empty_like(source) for name, source in zip(BATCH_KEYS, sources)}
            for held in self.inputs.values():
                torch._dynamo.mark_static_address(held)
        torch._foreach_copy_(list(self.inputs.values()), sources)
        return self.inputs


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


@torch.no_grad()
def prepare_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Make the optimizer capturable: every group's lr a 0-d fp32 tensor on its parameters' device (kept
    when it is one already), and SGD's momentum buffers created as zeros (the first update then equals
    SGD's, which copies the gradient, when dampening is 0)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        if not isinstance(group["lr"], torch.Tensor) or group["lr"].device != device:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if group.get("momentum", 0) and not group.get("dampening", 0):
            for parameter in group["params"]:
                state = optimizer.state[parameter]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)


def _compiled_parts_step(parts: StepParts, compile_mode: str,
                         backend: str) -> Callable[[TrainBatch, int], torch.Tensor]:
    """Several processes: the encoders and projectors compiled in place, the objective compiled whole;
    the rest of `train_step` eager (module docstring)."""
    parts.learner.compile_encoders(mode=compile_mode, backend=backend)
    options = {"mode": compile_mode} if backend == "inductor" else {}
    objective = torch.compile(parts.method.objective, fullgraph=True, dynamic=False, backend=backend, **options)
    compiled = dataclasses.replace(parts, method=dataclasses.replace(parts.method, objective=objective))
    return functools.partial(train_step, compiled)


# ----------------------------------------------------------------------------------------- graph breaks


def graph_breaks(parts: StepParts, batch: TrainBatch) -> list[str]:
    """The graph breaks of the captured step, one line each: "file:line `source`: reason".

    Traces one step with Dynamo (backend "eager": no code generation) on a deep copy of `parts` (the
    learner, optimizer and bank are left as they were; parts must be copyable: one process, no DDP
    wrapper) and collects Dynamo's graph-break records, those PyTorch inserts on purpose included. Resets
    Dynamo's caches before and after: call it before building the step that is measured.
    """
    copied = copy.deepcopy(parts)
    records: list[logging.LogRecord] = []
    handler = _Collect(records)
    torch._dynamo.reset()
    torch._logging.set_logs(graph_breaks=True)
    loggers = _graph_break_loggers()
    for logger in loggers:                  # collected here, not printed
        logger.addHandler(handler)
        logger.propagate = False
    try:
        _CapturedStep(copied, "default", "eager")(batch, 0)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.propagate = True
        torch._logging.set_logs()
        torch._dynamo.reset()
    found = [_describe(record.getMessage()) for record in records]
    return list(dict.fromkeys(line for line in found if line))


def _graph_break_loggers() -> list[logging.Logger]:
    """Dynamo's "graph_breaks" artifact loggers (named MODULE.__graph_breaks)."""
    import torch._dynamo.symbolic_convert  # noqa: F401  (registers its loggers)

    names = [name for name in logging.root.manager.loggerDict if name.endswith("__graph_breaks")]
    return [logging.getLogger(name) for name in names]


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(level=logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _describe(message: str) -> str | None:
    """"file:line `source`: reason" of one Dynamo graph-break record; None for a repeat of an earlier one.
    The place is the innermost frame of the captured step's code (maskcon/) or, without one, where Dynamo
    stopped; the reason is Dynamo's first line, with its explanation when it gives one."""
    if "duplicate graph break" in message:
        return None
    lines = message.splitlines()
    frames = [(index, match) for index, line in enumerate(lines)
              if (match := re.match(r'\s*File "(.+)", line (\d+), in (\S+)', line))]
    ours = [(index, match) for index, match in frames if "/maskcon/" in match.group(1)]
    place = re.search(r"user code at (\S+)", lines[0])
    where = place.group(1).rsplit("/", 1)[-1] if place else "?"
    if ours:
        index, match = ours[-1]
        source = lines[index + 1].strip() if index + 1 < len(lines) else ""
        where = f"{match.group(1).rsplit('/', 1)[-1]}:{match.group(2)} `{source}`"
    body = [line.strip() for line in lines[1:] if line.strip() and not line.startswith("Graph Break Reason")]
    reason = next((line for line in body if not line.startswith(("Encountered", "Graph Break"))), "")
    explanation = next((line for line in body if line.startswith("Explanation:")), "")
    return f"{where}: {reason}" + (f" ({explanation.removeprefix('Explanation: ')})" if explanation else "")

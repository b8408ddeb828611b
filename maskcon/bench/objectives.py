"""Time and memory of the MaskCon loss against SelfCon: `python launch/bench.py objectives [options]`.

Both losses run forward + backward on the same inputs in one process, alternating within every repeat:
N = 256 queries (q requires grad), a full bank of K = 16,384 keys, D = 128, 20 coarse classes (CIFAR-100's
coarse split), t0 = 0.1, t = 0.05, w = 0.5. Reports the median time with its spread over the repeats and the
peak memory above the inputs:
    cuda  torch.cuda.max_memory_allocated
    cpu   the peak of the bytes held by tensors created during forward + backward, counted per storage by a
          TorchDispatchMode (the CPU counterpart of max_memory_allocated; allocator overhead not included)
Goal: MaskCon within 1.5x SelfCon's time.
"""

import functools
import os
import statistics
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maskcon import losses
from maskcon.bench import machine, positive, show, spread
from maskcon.bench import parser as bench_parser
from maskcon.errors import UserError

TIME_GOAL = 1.5   # MaskCon time / SelfCon time
COARSE_CLASSES = 20                   # CIFAR-100's coarse split
T0, T, W = 0.1, 0.05, 0.5             # logit temperature, MaskCon temperature and weight (supplement Table 1)
WARMUPS = 3


def main(argv: list[str]) -> int:
    parser = bench_parser("objectives", __doc__)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "none"], default="none",
                        help="run the forward passes under bf16 autocast")
    parser.add_argument("--repeats", type=int, default=30,
                        help=f"timed repeats of each loss (after {WARMUPS} warm-ups)")
    parser.add_argument("--batch", type=int, default=256, help="N, queries per batch")
    parser.add_argument("--queue-size", type=int, default=16384, help="K, bank entries")
    parser.add_argument("--dim", type=int, default=128, help="D, projection width")
    options = parser.parse_args(argv)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; run with --device cpu")
    positive(options, "repeats", "batch", "queue_size", "dim")

    device = torch.device(options.device)
    objectives = _objectives(options.batch, options.queue_size, options.dim, device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=options.amp == "bf16")
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None   # a shared machine shows here
    times = {name: [] for name in objectives}
    for repeat in range(WARMUPS + options.repeats):
        order = list(objectives) if repeat % 2 == 0 else list(reversed(objectives))
        for name in order:
            seconds = _timed(objectives[name], autocast, device)
            if repeat >= WARMUPS:
                times[name].append(seconds)
    peaks = {name: _peak_bytes(step, autocast, device) for name, step in objectives.items()}

    results = {name: _summary(times[name], peaks[name]) for name in objectives}
    ratio = results["maskcon"]["median_ms"] / results["selfcon"]["median_ms"]
    # the two losses run back to back in every repeat: the ratio within a repeat shares the machine's state
    paired = spread([m / s for m, s in zip(times["maskcon"], times["selfcon"])], 3)
    report = {
        "benchmark": "objectives",
        "machine": machine(device),
        "load_average_1min": load,
        "torch": torch.__version__,
        "device": options.device, "amp": options.amp, "repeats": options.repeats,
        "inputs": {"N": options.batch, "K": options.queue_size, "D": options.dim, "coarse_classes": COARSE_CLASSES,
                   "t0": T0, "t": T, "w": W},
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda"
                  else "tensor storages live during forward+backward (TorchDispatchMode count)",
        "results": results,
        "maskcon_over_selfcon_time": round(ratio, 3),
        "paired_ratio": paired,
        "goal": TIME_GOAL, "goal_met": ratio <= TIME_GOAL,
    }
    return show(report, options.json)


def _objectives(n: int, queue_size: int, dim: int, device: torch.device
                ) -> dict[str, Callable[[torch.autocast], None]]:
    """The two losses over the same inputs; each call step(autocast) runs forward (under autocast) and backward.

    Backward runs outside autocast, as in training (Accelerate's autocast covers the forward pass only).
    """
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, dim, generator=generator), dim=1).to(device).requires_grad_()
    k = F.normalize(torch.randn(n, dim, generator=generator), dim=1).to(device)
    queue = F.normalize(torch.randn(queue_size, dim, generator=generator), dim=1).to(device)
    queue_coarse = torch.randint(0, COARSE_CLASSES, (queue_size,), generator=generator).to(device)
    coarse = torch.randint(0, COARSE_CLASSES, (n,), generator=generator).to(device)
    forwards = {
        "selfcon": lambda: losses.selfcon_loss(q=q, k=k, queue=queue, t0=T0),
        "maskcon": lambda: losses.maskcon_loss(q=q, k=k, queue=queue, queue_coarse=queue_coarse, coarse=coarse,
                                               t0=T0, t=T, w=W),
    }

    def step(forward: Callable[[], torch.Tensor], autocast: torch.autocast) -> None:
        q.grad = None
        with autocast:
            loss = forward()
        loss.backward()

    return {name: functools.partial(step, forward) for name, forward in forwards.items()}


def _timed(step: Callable, autocast: torch.autocast, device: torch.device) -> float:
    """Seconds of one forward + backward, from an idle device to an idle device."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    synchronize(device)
    start = time.perf_counter()
    step(autocast)
    synchronize(device)
    return time.perf_counter() - start


def _peak_bytes(step: Callable, autocast: torch.autocast, device: torch.device) -> int:
    """Peak memory of one forward + backward above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(autocast)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    counter = _StorageCounter()
    with counter:
        step(autocast)
    return counter.peak


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of the storages that operators create while active and that are still alive.

    Storages that existed before (the inputs, which views and detach() return again) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}      # data_ptr -> bytes of the storages created under the counter
        self.seen: set[int] = set()         # data_ptr of storages seen as operator inputs first
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in tree_leaves((args, kwargs)):
            if isinstance(tensor, torch.Tensor):
                pointer = tensor.untyped_storage().data_ptr()
                if pointer not in self.live:
                    self.seen.add(pointer)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in self.live or pointer in self.seen or storage.nbytes() == 0:
                continue
            self.live[pointer] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, pointer)
        return out

    def _free(self, pointer: int) -> None:
        self.current -= self.live.pop(pointer)


def _summary(seconds: list[float], peak: int) -> dict[str, float]:
    ms = [1e3 * s for s in seconds]
    quartiles = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    middle = spread(ms, 3)
    return {"median_ms": middle["median"], "p25_ms": round(quartiles[0], 3), "p75_ms": round(quartiles[2], 3),
            "min_ms": middle["min"], "max_ms": middle["max"], "peak_mib": round(peak / 2**20, 2)}

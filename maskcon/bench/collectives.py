"""Bytes moved by the collectives of a training step: `python launch/bench.py collectives [options]`.

P gloo processes on this machine make the cross-process calls of one training step, as maskcon.dist and
MaskConModel.enqueue make them (shuffle-BN by all-to-all of the key images in --precision and of the keys back,
one all-gather per enqueue, the stop vote `agree_to_stop` every --log-every steps, no buffer broadcast), for
every image size S and batch N per process. Every torch.distributed call is counted as the bytes this process
receives from the others:
    all_gather(_single)       (P - 1) x input bytes     broadcast  tensor bytes (none on the source)
    all_to_all_single         rows from other processes gather     (P - 1) x input bytes on the destination
    all_reduce                2 (P - 1) / P x tensor bytes (ring algorithm, as NCCL and gloo use for large tensors)
Figures are per step for the busiest process; with random shuffles they vary, so each is the median over
--repeats steps with the range. `old` is MoCo's scheme (`moco/builder.py`) under DDP's defaults, computed
with the same rules from the model's sizes: the per-step broadcast of every buffer from rank 0; shuffle-BN by
all-gathering every key image in fp32, a broadcast permutation and an all-gather of the keys; three
all-gathers per enqueue; a stop vote every step. The gradient all-reduce of DDP is the same in both. Evaluation
(not per step): the features and labels of --eval-rows test images split over the processes, gathered to the
main process (new, `gather_to_main`) or padded and all-gathered to every process (old), received by the
busiest process and by all processes together.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from maskcon import dist, failures, usable_cpus
from maskcon.bench import command, positive, show, spread
from maskcon.dist import free_port
from maskcon.provenance import cpu_name
from maskcon.bench import parser as bench_parser
from maskcon.config import ARCHS
from maskcon.model import FEATURE_DIMS, MaskConModel

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECTIONS = ("buffer broadcast", "shuffle-BN", "enqueue", "stop vote")
GRADIENTS = "gradient all-reduce"


def _parser() -> argparse.ArgumentParser:
    parser = bench_parser("collectives", __doc__)
    parser.add_argument("--processes", type=int, default=2, metavar="P", help="gloo processes (default: 2)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[32, 224], metavar="S",
                        help="key image sides, px (default: 32 224)")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256], metavar="N",
                        help="images per process per step (default: 128 256)")
    parser.add_argument("--arch", default="resnet18", choices=ARCHS, help="backbone (default: resnet18)")
    parser.add_argument("--queue-size", type=int, default=8192, metavar="K", help="bank entries (default: 8192)")
    parser.add_argument("--dim", type=int, default=128, metavar="D", help="key width (default: 128)")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS),
                        help="training precision: the dtype of the key images in the new scheme (default: bf16)")
    parser.add_argument("--log-every", type=int, default=10, metavar="L",
                        help="steps between stop votes in the new scheme (default: 10, the trainer's)")
    parser.add_argument("--eval-rows", type=int, default=10000, metavar="R",
                        help="test images of the evaluation gather (default: 10000, CIFAR-100's test set)")
    parser.add_argument("--repeats", type=int, default=5, metavar="R", help="steps measured per case (default: 5)")
    return parser


class TrafficMeter:
    """Counts the bytes this process receives in each torch.distributed call, by section of the step."""

    def __init__(self):
        self.received: Counter[str] = Counter()
        self.section = "other"

    @contextlib.contextmanager
    def counting(self, section: str):
        self.section = section
        try:
            yield
        finally:
            self.section = "other"

    def install(self) -> None:
        processes, this = torch_dist.get_world_size(), torch_dist.get_rank()
        rules = {
            "all_gather": lambda outputs, tensor, *a, **k: (processes - 1) * tensor.nbytes,
            "all_gather_single": lambda output, tensor, *a, **k: output.nbytes - tensor.nbytes,
            "all_gather_into_tensor": lambda output, tensor, *a, **k: output.nbytes - tensor.nbytes,
            "broadcast": lambda tensor, src, *a, **k: 0 if this == src else tensor.nbytes,
            "all_reduce": lambda tensor, *a, **k: 2 * (processes - 1) * tensor.nbytes // processes,
            "gather": lambda tensor, gather_list=None, dst=0, *a, **k: (
                (processes - 1) * tensor.nbytes if this == dst else 0),
            "all_to_all_single": lambda output, tensor, output_split_sizes=None, *a, **k: (
                output.nbytes - output.nbytes * (output_split_sizes[this] if output_split_sizes
                                                 else output.shape[0] // processes) // max(output.shape[0], 1)),
        }
        for name, rule in rules.items():
            if hasattr(torch_dist, name):   # all_gather_single from PyTorch 2.11 on
                setattr(torch_dist, name, self._counted(getattr(torch_dist, name), rule))

    def _counted(self, call, rule):
        def counted(*args, **kwargs):
            self.received[self.section] += rule(*args, **kwargs)
            return call(*args, **kwargs)
        return counted


def _old_step(model: MaskConModel, processes: int, size: int, batch: int, dim: int) -> dict[str, int]:
    """The bytes a process other than rank 0 (the busiest) receives per step in MoCo's scheme."""
    others = processes - 1
    return {"buffer broadcast": sum(buffer.nbytes for buffer in model.buffers()),
            "shuffle-BN": others * batch * 3 * size * size * 4 + processes * batch * 8 + others * batch * dim * 4,
            "enqueue": others * batch * (dim * 4 + 8 + 8), "stop vote": 2 * others * 4 // processes}


def _new_step(meter: TrafficMeter, model: MaskConModel, images: torch.Tensor, k: torch.Tensor,
              coarse: torch.Tensor, fine: torch.Tensor, vote: bool, seed: int) -> None:
    with meter.counting("shuffle-BN"):
        shuffled, idx_unshuffle = dist.batch_shuffle(images, seed)
        dist.batch_unshuffle(k, idx_unshuffle)
    with meter.counting("enqueue"):
        model.enqueue(k, coarse, fine)
    if vote:
        with meter.counting("stop vote"):
            failures.agree_to_stop(sigterm=False, loss=torch.ones(()))


def _worker(rank: int, port: int, options: argparse.Namespace, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                  world_size=options.processes)
    meter = TrafficMeter()
    meter.install()
    rows = []
    try:
        for size in options.image_sizes:
            model = MaskConModel(arch=options.arch, image_size=size, proj_dim=options.dim,
                                 queue_size=options.queue_size)
            gradients = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
            with meter.counting(GRADIENTS):
                torch_dist.all_reduce(gradients)
            gradient_bytes = meter.received.pop(GRADIENTS)
            for batch in options.batches:
                generator = torch.Generator().manual_seed(rank)
                images = torch.randn(batch, 3, size, size, generator=generator).to(PRECISIONS[options.precision])
                k = torch.nn.functional.normalize(torch.randn(batch, options.dim, generator=generator), dim=1)
                coarse, fine = torch.randint(0, 20, (batch,)), torch.randint(0, 100, (batch,))
                old = _old_step(model, options.processes, size, batch, options.dim)
                for repeat in range(options.repeats):
                    meter.received.clear()
                    _new_step(meter, model, images, k, coarse, fine, vote=True, seed=repeat)
                    new = dict(meter.received)
                    new["stop vote"] = new.get("stop vote", 0) / options.log_every     # amortised per step
                    rows.append({"image_size": size, "batch": batch, "repeat": repeat, "old": old, "new": new,
                                 "gradients": gradient_bytes})
            del model
        rows.append({"evaluation": _evaluation_bytes(meter, options)})
        torch_dist.barrier()        # every send has arrived before any process leaves the group
    finally:
        torch_dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def _evaluation_bytes(meter: TrafficMeter, options: argparse.Namespace) -> dict:
    """The bytes this process receives while the evaluation's features and labels are gathered (new), and in the
    trainer's former way (old, computed): sizes, then rows padded to the longest share, all-gathered everywhere."""
    processes, this = torch_dist.get_world_size(), torch_dist.get_rank()
    share = options.eval_rows // processes + (1 if this < options.eval_rows % processes else 0)
    meter.received.clear()
    with meter.counting("new"):
        for values in (torch.zeros(share, FEATURE_DIMS[options.arch]),
                       *(torch.zeros(share, dtype=torch.long) for _ in ("fine", "coarse", "index"))):
            dist.gather_to_main(values)
    longest = -(-options.eval_rows // processes)
    return {"new": meter.received["new"],
            "old": (processes - 1) * (5 * 8 + longest * (FEATURE_DIMS[options.arch] * 4 + 3 * 8))}


def _summary(per_rank: list[list[dict]], options: argparse.Namespace, argv: list[str]) -> dict:
    cases = {}
    for rows in zip(*per_rank):
        if "evaluation" in rows[0]:
            continue
        case = cases.setdefault((rows[0]["image_size"], rows[0]["batch"]), {"old": [], "new": []})
        case["gradients_bytes"] = max(row["gradients"] for row in rows)
        for scheme in ("old", "new"):
            busiest = {section: max(row[scheme].get(section, 0) for row in rows) for section in SECTIONS}
            case[scheme].append({**busiest, "total": max(sum(row[scheme].values()) for row in rows)})
    steps, sections = [], []      # per case: the totals; per case and scheme: each section of the step
    for (size, batch), case in sorted(cases.items()):
        kilobytes = {scheme: {section: spread([repeat[section] / 1e3 for repeat in case[scheme]], 1)
                              for section in (*SECTIONS, "total")} for scheme in ("old", "new")}
        steps.append({"image_size": size, "batch": batch, "old kB": kilobytes["old"]["total"],
                      "new kB": kilobytes["new"]["total"],
                      "old/new": round(kilobytes["old"]["total"]["median"] / max(kilobytes["new"]["total"]["median"],
                                                                                 0.1), 1),
                      "gradients kB": round(case["gradients_bytes"] / 1e3)})
        sections += [{"case": f"{size} px, N {batch}", "scheme": scheme,
                      **{f"{section} kB": kilobytes[scheme][section] for section in SECTIONS}}
                     for scheme in ("old", "new")]
    evaluation = [rows[-1]["evaluation"] for rows in per_rank]
    return {"command": command("collectives", argv),
            "machine": f"{cpu_name()}, {usable_cpus()} CPUs, torch {torch.__version__}, gloo",
            **{name: getattr(options, name) for name in ("processes", "arch", "precision", "queue_size", "dim",
                                                         "log_every", "repeats")},
            "steps": steps, "sections": sections,
            "evaluation": {"rows": options.eval_rows,   # kB received by the busiest process, and by all together
                           **{f"{scheme} kB": round(max(e[scheme] for e in evaluation) / 1e3, 1)
                              for scheme in ("old", "new")},
                           **{f"{scheme} kB, all processes": round(sum(e[scheme] for e in evaluation) / 1e3, 1)
                              for scheme in ("old", "new")}}}


def main(argv: list[str]) -> int:
    options = _parser().parse_args(argv)
    positive(options, "processes", least=2)
    positive(options, "repeats", "log_every", "queue_size", "dim", "eval_rows", "image_sizes", "batches")
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(free_port(), options, out_dir), nprocs=options.processes,
                                     start_method="spawn", join=False)
        try:
            while not context.join():
                pass
        except BaseException:           # a stop, or a process that failed: none of them is left behind
            for process in context.processes:
                process.kill()
            raise
        per_rank = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(options.processes)]
    return show(_summary(per_rank, options, argv), options.json)

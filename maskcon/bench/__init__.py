"""Benchmarks behind `python launch/bench.py NAME`; each module exposes main(argv) -> exit status."""
from __future__ import annotations

import contextlib
import platform
from pathlib import Path

from maskcon import usable_cpus


def machine(device=None) -> str:
    """Where a figure was measured, for the reports: the CPU model and the cores this process may use,
    torch's CPU threads, and the GPU's name when `device` (a torch.device) is a CUDA device."""
    import torch

    where = (f"on {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda"
             else "on the CPU")
    return f"{usable_cpus()} CPU cores ({cpu_name()}), {torch.get_num_threads()} torch threads, run {where}"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows of it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()

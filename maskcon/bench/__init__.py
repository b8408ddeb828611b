"""Benchmarks behind `python launch/bench.py NAME`; each module exposes main(argv) -> exit status."""
from __future__ import annotations

import platform
from pathlib import Path

from maskcon import usable_cpus


def machine(device=None) -> str:
    """Where a figure was measured, for the reports: the CPU model and the cores this process may use,
    torch's CPU threads, and the GPU's name when `device` (a torch.device) is a CUDA device."""
    import torch

    cpus = usable_cpus()
    model = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    where = (f"on {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda"
             else "on the CPU")
    return f"{cpus} CPU cores ({model}), {torch.get_num_threads()} torch threads, run {where}"
